#!/usr/bin/env bash
# Installs what Snapvisor's build, demo and tests need on Debian bookworm. Idempotent and
# quiet when everything is already there.
set -euo pipefail

need=()
command -v qemu-img >/dev/null 2>&1 || need+=(qemu-utils)
command -v bzcat >/dev/null 2>&1 || need+=(bzip2)
command -v cc >/dev/null 2>&1 || need+=(gcc)
# nbdinfo and nbdcopy check the NBD server as independent clients.
command -v nbdinfo >/dev/null 2>&1 || need+=(libnbd-bin)
# The test guest's disks are ext4 images, checked from the host.
command -v mkfs.ext4 >/dev/null 2>&1 || need+=(e2fsprogs)
command -v cpio >/dev/null 2>&1 || need+=(cpio)
# The completion tests load the zsh and fish scripts into the real shells.
command -v zsh >/dev/null 2>&1 || need+=(zsh)
command -v fish >/dev/null 2>&1 || need+=(fish)
# UEFI VMs boot OVMF (its own package: it does not pull in Debian's QEMU).
[ -e /usr/share/OVMF/OVMF_CODE_4M.fd ] || need+=(ovmf)

if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo is missing; install the Rust toolchain (rustup) first" >&2
  exit 1
fi
