//! What QEMU runs: the program, the accelerator, the firmware, and the machine built
//! from a VM's committed state.

use crate::error::{Error, Result};
use crate::run_state::{LOG_DIR, RUN_DIR, SAVED_STATE};
use std::path::{Path, PathBuf};

/// The environment variable naming the QEMU binary.
pub const QEMU_VAR: &str = "SNAPVISOR_QEMU";
/// QEMU's binary on the PATH when [`QEMU_VAR`] is not set.
pub const QEMU_DEFAULT: &str = "qemu-system-x86_64";

/// `SNAPVISOR_QEMU`, else `qemu-system-x86_64` (looked up on the PATH).
pub fn qemu_program() -> PathBuf {
    std::env::var_os(QEMU_VAR)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(QEMU_DEFAULT))
}

/// The QEMU binary to run, checked to exist: a path as given, a bare name on the PATH.
/// Fails with what to install or set when there is none.
pub fn find_qemu() -> Result<PathBuf> {
    let program = qemu_program();
    let set_by_env = std::env::var_os(QEMU_VAR).is_some_and(|v| !v.is_empty());
    let is_program = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let found = if program.components().count() > 1 {
        is_program(&program)
    } else {
        std::env::var_os("PATH").is_some_and(|path| {
            std::env::split_paths(&path).any(|dir| is_program(&dir.join(&program)))
        })
    };
    if found {
        Ok(program)
    } else {
        Err(Error::QemuMissing {
            program,
            set_by_env,
        })
    }
}

/// The accelerator when none is named: `SNAPVISOR_ACCEL` (`kvm` or `tcg`), else KVM
/// where `/dev/kvm` opens, else TCG.
pub fn default_accel() -> qemu::Accel {
    if let Some(a) = std::env::var("SNAPVISOR_ACCEL")
        .ok()
        .and_then(|v| qemu::Accel::from_name(&v))
    {
        return a;
    }
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if usable {
        qemu::Accel::Kvm
    } else {
        qemu::Accel::Tcg
    }
}

/// OVMF's firmware code and empty variable store: `SNAPVISOR_OVMF_CODE` and
/// `SNAPVISOR_OVMF_VARS`, else Debian's `ovmf` package.
pub fn ovmf_paths() -> (PathBuf, PathBuf) {
    let pick = |var: &str, default: &str| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(default))
    };
    (
        pick("SNAPVISOR_OVMF_CODE", "/usr/share/OVMF/OVMF_CODE_4M.fd"),
        pick("SNAPVISOR_OVMF_VARS", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    )
}

/// The machine QEMU runs for the VM in `dir` with committed state `state`, its disks
/// served on `disks`.
pub fn machine_spec(
    state: &vm::VmState,
    dir: &Path,
    accel: qemu::Accel,
    disks: Vec<qemu::NbdDisk>,
) -> Result<qemu::MachineSpec> {
    let hw = &state.config.hardware;
    let run_dir = dir.join(RUN_DIR);
    let uefi = match (hw.firmware, &state.now.nvram) {
        (vm::Firmware::Bios, _) => None,
        (vm::Firmware::Uefi, Some(vars)) => {
            let code = ovmf_paths().0;
            if !code.is_file() {
                return Err(Error::FirmwareMissing { path: code });
            }
            Some((code, dir.join(vm::journal::FIRMWARE_DIR).join(vars)))
        }
        (vm::Firmware::Uefi, None) => {
            return Err(vm::Error::Corrupt {
                path: dir.join(vm::journal::STATE_FILE),
                reason: "the VM has UEFI firmware but no variable store".into(),
            }
            .into());
        }
    };
    Ok(qemu::MachineSpec {
        name: state.config.name.clone(),
        uuid: state.config.uuid.to_string(),
        generation_id: state.config.generation_id.to_string(),
        machine: "pc".into(),
        accel,
        memory_mib: hw.memory >> 20,
        cpus: hw.cpus,
        kernel: hw
            .boot
            .as_ref()
            .map(|b| (b.kernel.clone(), b.initrd.clone(), b.append.clone())),
        uefi,
        disks,
        qmp_socket: run_dir.join("qmp.sock"),
        agent_socket: Some(run_dir.join("qga.sock")),
        serial_log: dir.join(LOG_DIR).join("serial.log"),
        paused: false,
        incoming: dir.join(SAVED_STATE).exists(),
    })
}
