#!/usr/bin/env bash
# Builds the test guest from Debian packages: the cloud kernel, and an initramfs with
# static busybox, the virtio modules, Debian's qemu-guest-agent with its libraries, a
# power-button handler, a /sbin/shutdown shim, /bin/vmgenid (prints the VM generation ID
# from the guest's memory), and an /init that mounts /dev/vda and,
# when the kernel command line says `workload=counter`, appends a counter to the disk
# several times a second (`tick N boot=ID` lines in /mnt/counter.log, each synced).
#
# Output (cached: rebuilt only when this script changes or the files are missing):
#   target/guest/vmlinuz   target/guest/initrd.gz   target/guest/VERSION
#
# Usage: ./scripts/build-guest.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
out="${1:-target/guest}"
case "$out" in /*) ;; *) out="$root/$out" ;; esac
stamp="$(sha256sum "$root/scripts/build-guest.sh" | cut -c1-16)"
if [ -f "$out/VERSION" ] && [ "$(cat "$out/VERSION")" = "$stamp" ] \
   && [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.gz" ]; then
  exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
need=()
command -v cpio >/dev/null 2>&1 || need+=(cpio)
command -v dpkg-deb >/dev/null 2>&1 || need+=(dpkg)
if [ ${#need[@]} -gt 0 ]; then
  echo "build-guest: installing ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"

# The versioned kernel package the cloud meta package points at.
kpkg="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null \
  | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
if [ -z "$kpkg" ]; then
  $SUDO apt-get update -qq
  kpkg="$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
fi
[ -n "$kpkg" ] || { echo "build-guest: cannot find the cloud kernel package" >&2; exit 1; }
pkgs=("$kpkg" busybox-static qemu-guest-agent libglib2.0-0 libpcre2-8-0 libnuma1 libudev1 liburing2 libc6)
echo "build-guest: downloading ${pkgs[*]}"
apt-get download -qq "${pkgs[@]}" >/dev/null 2>&1 || {
  $SUDO apt-get update -qq
  apt-get download -qq "${pkgs[@]}" >/dev/null
}
mkdir -p x
for d in ./*.deb; do dpkg-deb -x "$d" x; done
kver="${kpkg#linux-image-}"

ir="$work/ir"
mkdir -p "$ir"/{bin,sbin,usr/sbin,dev,proc,sys,run,tmp,mnt,lib/modules,lib64,lib/x86_64-linux-gnu,var/lib}
cp x/bin/busybox "$ir/bin/busybox"
mods="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk virtio_console button evdev"
for m in $mods; do
  f="$(find "x/lib/modules/$kver" -name "$m.ko*" | head -1)"
  [ -n "$f" ] || { echo "build-guest: module $m not found in $kpkg" >&2; exit 1; }
  case "$f" in
    *.ko.xz) xz -dc "$f" > "$ir/lib/modules/$m.ko" ;;
    *.ko.zst) zstd -qdc "$f" > "$ir/lib/modules/$m.ko" ;;
    *) cp "$f" "$ir/lib/modules/$m.ko" ;;
  esac
done

# qemu-ga and every library it loads, from the downloaded packages.
cp x/usr/sbin/qemu-ga "$ir/usr/sbin/qemu-ga"
libdirs="$work/x/lib/x86_64-linux-gnu:$work/x/usr/lib/x86_64-linux-gnu"
for lib in $(LD_LIBRARY_PATH="$libdirs" ldd x/usr/sbin/qemu-ga | awk '/=>/ {print $3}'); do
  name="$(basename "$lib")"
  src=""
  for d in x/lib/x86_64-linux-gnu x/usr/lib/x86_64-linux-gnu; do
    [ -e "$d/$name" ] && { src="$d/$name"; break; }
  done
  [ -n "$src" ] || src="$lib"
  cp -L "$src" "$ir/lib/x86_64-linux-gnu/$name"
done
cp -L x/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$ir/lib64/ld-linux-x86-64.so.2"

cat > "$ir/sbin/shutdown" <<'EOF'
#!/bin/busybox sh
# qemu-ga runs `shutdown -h -P|-H|-r +0 "..."`; busybox has no such applet. The workload
# stops first, so that the unmount finds the file system idle and leaves it clean.
[ -f /run/workload.pid ] && kill "$(cat /run/workload.pid)" 2>/dev/null && sleep 0.3
sync; umount /mnt 2>/dev/null || { sleep 0.5; umount /mnt; }
case "$2" in -r) reboot -f ;; -H) halt -f ;; *) poweroff -f ;; esac
EOF
chmod +x "$ir/sbin/shutdown"

# /bin/vmgenid prints the VM generation ID as the guest sees it in its memory: QEMU's
# vmgenid device names the address of its buffer VGIA in an SSDT (a DWord after the name),
# and the 16-byte GUID sits 40 bytes past it, in the mixed-endian GUID layout.
cat > "$ir/bin/vmgenid" <<'EOF'
#!/bin/sh
a=$(od -An -tx1 -v /sys/firmware/acpi/tables/SSDT | tr -d '\n' \
  | sed -n 's/.* 56 47 49 41 0c \(..\) \(..\) \(..\) \(..\) .*/0x\4\3\2\1/p' | head -1)
[ -n "$a" ] || { echo "no vmgenid device" >&2; exit 1; }
b=""
for off in 40 44 48 52; do
  w=$(devmem $((a + off)) 32)
  b="$b $(printf '%08x' "$w" | sed 's/\(..\)\(..\)\(..\)\(..\)/\4 \3 \2 \1/')"
done
set -- $b
echo "$4$3$2$1-$6$5-$8$7-$9${10}-${11}${12}${13}${14}${15}${16}"
EOF
chmod +x "$ir/bin/vmgenid"
cat > "$ir/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mkdir -p /run /var/run /tmp /mnt /var/lib
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk virtio_console button evdev; do
  insmod /lib/modules/$m.ko 2>/dev/null
done
# ACPI power button (QMP system_powerdown): clean power-off.
for e in /sys/class/input/event*; do
  if grep -q "Power Button" $e/device/name 2>/dev/null; then
    ( head -c 1 /dev/input/${e##*/} >/dev/null; echo "POWERDOWN"; /sbin/shutdown -h -P ) &
    break
  fi
done
n=0; while [ ! -b /dev/vda ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n+1)); done
for p in /sys/class/virtio-ports/vport*; do
  if [ "$(cat $p/name 2>/dev/null)" = org.qemu.guest_agent.0 ]; then
    /usr/sbin/qemu-ga -m virtio-serial -p /dev/${p##*/} -t /run -f /run/qemu-ga.pid -l /run/qemu-ga.log &
  fi
done
BOOTID=$(cut -c1-8 /proc/sys/kernel/random/uuid)
if [ -b /dev/vda ]; then mount -t ext4 /dev/vda /mnt || echo "MOUNT FAILED"; fi
echo "READY boot=$BOOTID up=$(cut -d' ' -f1 /proc/uptime)"
if grep -q "workload=counter" /proc/cmdline; then
  (
    i=$(tail -n 1 /mnt/counter.log 2>/dev/null | sed -n 's/^tick \([0-9]*\) .*/\1/p')
    i=${i:-0}
    while true; do
      i=$((i+1))
      echo "tick $i boot=$BOOTID up=$(cut -d' ' -f1 /proc/uptime)" >> /mnt/counter.log
      sync
      echo "tick $i boot=$BOOTID"
      sleep 0.25
    done
  ) &
  echo $! > /run/workload.pid
fi
while true; do sleep 3600; done
EOF
chmod +x "$ir/init"
mknod -m 600 "$ir/dev/console" c 5 1 2>/dev/null || true

(cd "$ir" && find . | cpio -o -H newc --quiet | gzip -1 > "$work/initrd.gz")
mkdir -p "$out"
cp "$work/x/boot/vmlinuz-$kver" "$out/vmlinuz"
cp "$work/initrd.gz" "$out/initrd.gz"
echo "$stamp" > "$out/VERSION"
echo "build-guest: $out/vmlinuz ($kver), $out/initrd.gz ($(du -h "$out/initrd.gz" | cut -f1))"
