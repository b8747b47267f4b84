#!/usr/bin/env bash
# Sets everything up and runs Snapvisor's main job on its embedded defaults:
#  1. the disk engine's story (`snapvisor demo`: a VHDX, a differencing child, a merge,
#     and the checkpoint tree of a stopped VM, each step verified);
#  2. checkpoints of a running VM on the test guest (built from Debian packages): start it,
#     take a production checkpoint (the guest agent freezes its file systems), a standard
#     one (memory kept), let the guest write, apply the standard checkpoint (the guest comes
#     back running from that instant), show the tree, delete checkpoints (their layers
#     merge under the running guest), back it up twice while it runs (online, then only the
#     changed chunks), stop, verify the disk, and restore the latest backup as a new VM.
# Accelerator: TCG unless SNAPVISOR_ACCEL=kvm (KVM guests hang on some build machines).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release --locked -q -p snapvisor
sv="$PWD/target/release/snapvisor"
"$sv" demo "$@"

./scripts/build-guest.sh
SNAPVISOR_QEMU="$(./scripts/get-qemu.sh)"
export SNAPVISOR_QEMU SNAPVISOR_ACCEL="${SNAPVISOR_ACCEL:-tcg}"
work="$(mktemp -d "${TMPDIR:-/tmp}/snapvisor-live-demo.XXXXXX")"
export SNAPVISOR_STORE="$work/store"
trap '"$sv" vm stop web --force >/dev/null 2>&1 || true' EXIT
guest="$PWD/target/guest"

step() { printf '\n==> %s\n' "$*"; }
run() { printf '$ snapvisor %s\n' "$*"; "$sv" "$@"; }
ticks() { grep -o 'tick [0-9]*' "$SNAPVISOR_STORE/web/logs/serial.log" 2>/dev/null | awk '{print $2}' | tail -n 1; }
wait_ticks() { # wait until the guest's counter passes $1
  for _ in $(seq 1 600); do [ "$(ticks || echo 0)" -gt "$1" ] 2>/dev/null && return 0; sleep 0.1; done
  echo "demo: the guest stopped counting" >&2; exit 1
}
fail() { echo "demo: $*" >&2; exit 1; }

step "checkpoints of a running VM, in $work"
truncate -s 256M "$work/fs.raw" && mkfs.ext4 -q -F "$work/fs.raw"
run vm create web --memory 256M --import-disk "$work/fs.raw" \
  --kernel "$guest/vmlinuz" --initrd "$guest/initrd.gz" \
  --append "console=ttyS0 panic=-1 quiet workload=counter"
run vm start web
wait_ticks 3
for _ in $(seq 1 100); do "$sv" vm status web --json | grep -q '"agent": true' && break; sleep 0.2; done
run vm status web

step "a production checkpoint: the agent freezes the guest's file systems for the disk switch"
run checkpoint create web --name "before upgrade"
wait_ticks "$(( $(ticks) + 4 ))"

step "a standard checkpoint: memory and device state kept, the guest paused for milliseconds"
run vm set web --checkpoint-type standard
run checkpoint create web --name "mid-upgrade"
at="$(ticks)"
echo "    the guest's counter was at $at"
wait_ticks "$(( at + 12 ))"
echo "    the guest went on writing: its counter is at $(ticks)"

step "apply the standard checkpoint: the guest comes back running from that instant"
run checkpoint apply web "mid-upgrade"
wait_ticks 0
first="$(grep -o 'tick [0-9]*' "$SNAPVISOR_STORE/web/logs/serial.log" | head -n 1 | awk '{print $2}')"
echo "    the restored guest's first tick: $first (its counter was at $at when the checkpoint was taken, and at more than $(( at + 12 )) before the apply)"
[ "$first" -le "$(( at + 2 ))" ] || fail "the guest did not come back from the checkpoint's memory"
run checkpoint list web

step "delete the checkpoints: their layers merge under the running guest"
run checkpoint delete web "before upgrade"
run checkpoint delete web "mid-upgrade"
wait_ticks "$(( $(ticks) + 4 ))"
run vm show web

step "a backup of the running VM: the agent freezes the guest, a hidden recovery checkpoint, the copy while the guest runs"
export SNAPVISOR_REPO="$work/repo"
run backup init
run backup create web
wait_ticks "$(( $(ticks) + 4 ))"
step "a second backup: only the chunks that changed are stored"
run backup create web
run backup list web
run checkpoint list web

step "stop, and check the disk: no errors, and every tick the guest wrote is there once"
run vm stop web
disk="$("$sv" vm show web --json | sed -n 's/.*"file": "\(.*\)".*/\1/p' | head -n 1)"
run disk check "$disk"
"$sv" disk convert "$disk" "$work/check.raw" >/dev/null
e2fsck -fy "$work/check.raw" >/dev/null 2>&1 || [ $? -le 1 ] || fail "the guest's file system is damaged"
debugfs -R "cat /counter.log" "$work/check.raw" 2>/dev/null | awk '{print $2}' >"$work/ticks.txt"
awk 'NR > 1 && $1 != prev + 1 { bad = 1 } { prev = $1 } END { exit bad }' "$work/ticks.txt" \
  || fail "the counter on the disk has gaps or repeats"
echo "    $(wc -l <"$work/ticks.txt") ticks on the disk, in order, none missing"

step "restore the latest backup as a new VM (new ids), and check its disk the same way"
run backup verify
run backup restore web@latest --as web-restored
rdisk="$("$sv" vm show web-restored --json | sed -n 's/.*"file": "\(.*\)".*/\1/p' | head -n 1)"
"$sv" disk convert "$rdisk" "$work/restored.raw" >/dev/null
e2fsck -fn "$work/restored.raw" >/dev/null 2>&1 || fail "the restored file system is damaged"
debugfs -R "cat /counter.log" "$work/restored.raw" 2>/dev/null | awk '{print $2}' >"$work/rticks.txt"
[ -s "$work/rticks.txt" ] && head -n "$(wc -l <"$work/rticks.txt")" "$work/ticks.txt" | cmp -s - "$work/rticks.txt" \
  || fail "the restored counter is not a prefix of the original's"
echo "    the restored disk passes e2fsck -fn; its $(wc -l <"$work/rticks.txt") ticks are the original's first ones"
trap - EXIT
rm -rf "$work"
printf '\ndemo: every step verified\n'
