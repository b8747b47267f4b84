#!/usr/bin/env bash
# Runs the benchmarks of docs/benchmarks.md, each against its peer in the same run.
# Usage: ./scripts/bench.sh [--runs N] [--only create-child|scale|seq-write|convert|random-read|merge|checkpoints|nbd|vm|live|live-merge|backup-live|backup]...
# Needs about 12 GiB of free space (32 GiB with scale) in target/bench-data; run it on a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# The backup benchmark's peers (Debian's restic and borgbackup) and /usr/bin/time for the
# peak memory of whole processes.
need=()
command -v restic >/dev/null 2>&1 || need+=(restic)
command -v borg >/dev/null 2>&1 || need+=(borgbackup)
[ -x /usr/bin/time ] || need+=(time)
if [ ${#need[@]} -gt 0 ]; then
  echo "bench: installing ${need[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
./scripts/build-guest.sh
SNAPVISOR_QEMU="$(./scripts/get-qemu.sh)"
export SNAPVISOR_QEMU
cargo build --release --locked -q -p snapvisor -p snapvisor-bench
exec ./target/release/snapvisor-bench --dir target/bench-data "$@"
