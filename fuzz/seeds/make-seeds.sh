#!/bin/sh
# Fills the corpus of the `open` fuzz target with its seeds: the VHDX sample images from
# crates/vhdx/tests/data/samples, decompressed, plus small files made by qemu-img when it is
# installed. The corpus (fuzz/corpus/, git-ignored) is never committed (see the samples
# README for their origin and licence).
#
#   fuzz/seeds/make-seeds.sh            # then: cargo +nightly fuzz run open
set -eu
here=$(cd "$(dirname "$0")" && pwd)
samples=${VHDX_SAMPLES:-$here/../../crates/vhdx/tests/data/samples}
corpus=$here/../corpus/open
mkdir -p "$corpus"
if [ ! -f "$samples/README.md" ]; then
    echo "no samples at $samples (set VHDX_SAMPLES)" >&2
    exit 1
fi
for f in "$samples"/*.vhdx.bz2; do
    name=$(basename "$f" .bz2)
    bzcat "$f" > "$corpus/$name"
    echo "seed $name"
done
if command -v qemu-img >/dev/null 2>&1; then
    qemu-img create -q -f vhdx -o block_size=1M "$corpus/qemu-dynamic-8M.vhdx" 8M
    qemu-io -f vhdx -c 'write -P 0xab 0 64k' -c 'write -z 2M 1M' "$corpus/qemu-dynamic-8M.vhdx" >/dev/null
    qemu-img create -q -f vhdx -o subformat=fixed,block_size=1M "$corpus/qemu-fixed-4M.vhdx" 4M
    echo "seed qemu-dynamic-8M.vhdx qemu-fixed-4M.vhdx"
fi
