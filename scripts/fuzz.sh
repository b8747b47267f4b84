#!/usr/bin/env bash
# Fuzzes one target from its seeds: `open` (the VHDX parser, the default), or
# `control_protocol`, `vm_state`, `journal`.
# Usage: ./scripts/fuzz.sh [SECONDS] [TARGET]   (default 300 s, open)
# cargo-fuzz needs nightly-only compiler flags; this machine has only a stable toolchain,
# so the build runs with RUSTC_BOOTSTRAP=1, which lets stable rustc accept them.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
sh fuzz/seeds/make-seeds.sh
cd fuzz
target=${2:-open}
# 4 MiB inputs keep every seed's header section, log, regions and BAT.
RUSTC_BOOTSTRAP=1 exec cargo fuzz run "$target" "corpus/$target" -- \
  -max_total_time="${1:-300}" -max_len=4194304 -rss_limit_mb=6144
