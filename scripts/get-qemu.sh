#!/usr/bin/env bash
# Makes Debian's qemu-system-x86 available and prints the command to run it.
#
# If qemu-system-x86_64 is installed, that one is used. Otherwise the Debian packages it
# needs (as apt would install them) are downloaded and unpacked under target/qemu, with a
# wrapper that points the loader and firmware paths there: installing the package would
# replace a newer qemu-utils with bookworm's 7.2, and this keeps both. Cached.
#
# Usage: ./scripts/get-qemu.sh     (prints the path of qemu-system-x86_64 to use)
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
if command -v qemu-system-x86_64 >/dev/null 2>&1; then
  command -v qemu-system-x86_64
  exit 0
fi
dest="$root/target/qemu"
wrapper="$dest/qemu-system-x86_64"
if [ -x "$wrapper" ] && "$wrapper" --version >/dev/null 2>&1; then
  echo "$wrapper"
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
command -v dpkg-deb >/dev/null 2>&1 || { echo "get-qemu: dpkg-deb is missing" >&2; exit 1; }
simulate() { apt-get install -s -qq --no-install-recommends qemu-system-x86 2>/dev/null | awk '/^Inst / {print $2}'; }
pkgs="$(simulate)"
if [ -z "$pkgs" ]; then
  $SUDO apt-get update -qq >&2
  pkgs="$(simulate)"
fi
[ -n "$pkgs" ] || { echo "get-qemu: apt cannot resolve qemu-system-x86" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "get-qemu: downloading $(echo "$pkgs" | wc -l) packages for qemu-system-x86" >&2
# shellcheck disable=SC2086
(cd "$work" && apt-get download -qq $pkgs >/dev/null 2>&1)
rm -rf "$dest"
mkdir -p "$dest/root"
for d in "$work"/*.deb; do dpkg-deb -x "$d" "$dest/root"; done
cat > "$wrapper" <<'EOF'
#!/bin/sh
# Debian's qemu-system-x86_64 unpacked by scripts/get-qemu.sh.
d="$(dirname "$(readlink -f "$0")")/root"
LD_LIBRARY_PATH="$d/usr/lib/x86_64-linux-gnu:$d/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  exec "$d/usr/bin/qemu-system-x86_64" -L "$d/usr/share/qemu" -L "$d/usr/share/seabios" "$@"
EOF
chmod +x "$wrapper"
"$wrapper" --version >/dev/null || { echo "get-qemu: the unpacked QEMU does not run" >&2; exit 1; }
echo "$wrapper"
