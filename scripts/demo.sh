#!/usr/bin/env bash
# Sets everything up and runs Snapvisor's main job on its embedded defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release --locked -q -p snapvisor
exec ./target/release/snapvisor demo "$@"
