#!/bin/sh
# Fills the corpora of the fuzz targets with their seeds. `open`: the VHDX sample images
# from crates/vhdx/tests/data/samples, decompressed, plus small files made by qemu-img when
# it is installed. `control_protocol`, `vm_state`, `journal`: the messages and files below.
# The corpus (fuzz/corpus/, git-ignored) is never committed (see the samples' README for
# their origin and licence).
#
#   fuzz/seeds/make-seeds.sh            # then: cargo +nightly fuzz run open
set -eu
here=$(cd "$(dirname "$0")" && pwd)

# The text seeds first: they need nothing.
c=$here/../corpus/control_protocol
mkdir -p "$c"
printf '%s' '{"version":1,"request":{"op":"status"}}' > "$c/status"
printf '%s' '{"version":1,"request":{"op":"stop","force":false,"timeout_secs":60}}' > "$c/stop"
printf '%s' '{"version":1,"request":{"op":"checkpoint-delete","checkpoint":"a","subtree":true}}' > "$c/delete"
printf '%s' '{"version":1,"request":{"op":"checkpoint-settings","checkpoint_type":"standard","max_checkpoints":7,"automatic_checkpoints":null}}' > "$c/settings"
printf '%s' '{"version":1,"result":{"ok":{"reply":"checkpoint-taken","id":"e444b131-891d-4a2c-854c-bb72e87cc868","name":"x","kind":"standard","consistency":"crash-consistent-with-memory","has_memory":true,"paused_ms":12.5,"switch_ms":3.25,"memory":{"file":"/vm/m.vsv","bytes":268435456,"background":true,"ms":900.0},"fallback":null,"frozen_ms":null,"freeze_to_thaw_ms":null}}}' > "$c/taken"
printf '%s' '{"version":1,"result":{"error":{"kind":"no-space","message":"full"}}}' > "$c/error"
state='{"format":1,"seq":2,"config":{"name":"s","uuid":"a418cfbf-effe-4a9a-80c3-23dc1229c0f5","generation_id":"ddf6c2bf-4892-4deb-aa15-64bd63eacbc2","hardware":{"memory":1073741824,"cpus":1,"disks":[{"name":"disk0","disk_id":"a9b6346f-5d9e-4c87-8c7b-2ad8e81a3f5b"}],"boot":null,"firmware":"bios"},"checkpoint_type":"production","max_checkpoints":50,"automatic_checkpoints":false},"now":{"parent":"e444b131-891d-4a2c-854c-bb72e87cc868","disks":["disk0_c13a7ade7dd7.avhdx"]},"checkpoints":[{"id":"e444b131-891d-4a2c-854c-bb72e87cc868","name":"a","parent":null,"created":1796193663,"kind":"production","consistency":"vm-off","has_memory":false,"disks":["disk0.vhdx"]}],"layers":{"disk0.vhdx":{"disk":"disk0","parent":null},"disk0_c13a7ade7dd7.avhdx":{"disk":"disk0","parent":"disk0.vhdx"}}}'
mkdir -p "$here/../corpus/vm_state" "$here/../corpus/journal"
printf '%s' "$state" > "$here/../corpus/vm_state/vm.json"
printf '%s' '{"format":1,"op":"merge layer disk0.vhdx with disk0_c13a7ade7dd7.avhdx","started":1796193663,"steps":[{"step":"merge","parent":"disk0.vhdx","child":"disk0_c13a7ade7dd7.avhdx","direction":"into-parent","relink":[]},{"step":"commit","state":'"$state"'},{"step":"remove-layer","file":"disk0_c13a7ade7dd7.avhdx"},{"step":"copy-file","from":"checkpoints/x/vars.fd","to":"firmware/vars_1.fd"},{"step":"link-file","from":"checkpoints/x/memory.vsv","to":"saved/state.vsv"},{"step":"remove-file","path":"firmware/vars.fd"}]}' > "$here/../corpus/journal/journal.json"
echo "seed control_protocol vm_state journal"

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
