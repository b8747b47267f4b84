#!/usr/bin/env bash
# Runs the benchmarks of docs/benchmarks.md, each against its peer in the same run.
# Usage: ./scripts/bench.sh [--runs N] [--only create-child|scale|seq-write|convert|random-read|merge|checkpoints|nbd|vm|live|live-merge]...
# Needs about 12 GiB of free space (32 GiB with scale) in target/bench-data; run it on a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/build-guest.sh
SNAPVISOR_QEMU="$(./scripts/get-qemu.sh)"
export SNAPVISOR_QEMU
cargo build --release --locked -q -p snapvisor -p snapvisor-bench
exec ./target/release/snapvisor-bench --dir target/bench-data "$@"
