#!/usr/bin/env bash
# Installs what the tests need and runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# The test guest (kernel + initramfs from Debian packages) and Debian's QEMU, both cached.
./scripts/build-guest.sh
SNAPVISOR_QEMU="$(./scripts/get-qemu.sh)"
export SNAPVISOR_QEMU SNAPVISOR_GUEST="$PWD/target/guest"
# Doc tests first, so that the last lines are the main runner's summary.
cargo test --workspace --locked --doc -q
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast "$@"
else
  cargo test --workspace --locked --no-fail-fast "$@"
fi
