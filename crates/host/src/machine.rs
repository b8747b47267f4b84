//! What QEMU runs: the program, the accelerator, the firmware, and the machine built
//! from a VM's committed state; where its serial console goes.
//!
//! ## Serial console and its logs
//!
//! QEMU listens for one console client on `run/console.sock` (`snapvisor vm console`)
//! and logs every byte the guest writes to its serial port into `logs/serial.log`, also
//! while nobody is attached. Each start of QEMU (`vm start`, a resume from a saved state,
//! the start after an apply with memory) begins a new `serial.log`: the previous one
//! becomes `serial.log.1`, that one `serial.log.2`, and so on; the last
//! [`KEPT_SERIAL_LOGS`] earlier logs are kept, older ones deleted. An empty log is not
//! rotated (a start that failed before the guest wrote anything keeps the history).

use crate::error::{Error, Result};
use crate::run_state::{LOG_DIR, RUN_DIR, SAVED_STATE};
use std::path::{Path, PathBuf};

/// The current serial log, in the VM's log folder.
pub const SERIAL_LOG: &str = "serial.log";
/// Earlier serial logs kept beside the current one (`serial.log.1` is the last run's).
pub const KEPT_SERIAL_LOGS: usize = 5;
/// The console socket, in the VM's run folder.
pub const CONSOLE_SOCKET: &str = "console.sock";

/// The current serial log of the VM in `dir` (written while it runs, or the last run's).
pub fn serial_log(dir: &Path) -> PathBuf {
    dir.join(LOG_DIR).join(SERIAL_LOG)
}

/// The earlier serial logs of the VM in `dir` that exist, newest first.
pub fn older_serial_logs(dir: &Path) -> Vec<PathBuf> {
    (1..=KEPT_SERIAL_LOGS)
        .map(|n| rotated(dir, n))
        .filter(|p| p.is_file())
        .collect()
}

fn rotated(dir: &Path, n: usize) -> PathBuf {
    dir.join(LOG_DIR).join(format!("{SERIAL_LOG}.{n}"))
}

/// The socket QEMU's serial console listens on, for the VM in `dir`.
pub fn console_socket(dir: &Path) -> PathBuf {
    dir.join(RUN_DIR).join(CONSOLE_SOCKET)
}

/// Before QEMU starts: moves `serial.log` to `serial.log.1` (and each earlier log one
/// place on, dropping the oldest beyond [`KEPT_SERIAL_LOGS`]), so that the new run writes
/// a new log and the last runs' output stays. Renames only, then the folder synced: a
/// crash between two renames leaves a gap in the numbers, never a lost current log.
pub fn rotate_serial_logs(dir: &Path) -> Result<()> {
    let current = serial_log(dir);
    match std::fs::metadata(&current) {
        Ok(m) if m.len() > 0 => {}
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(&current, e)),
    }
    let oldest = rotated(dir, KEPT_SERIAL_LOGS);
    match std::fs::remove_file(&oldest) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(&oldest, e)),
    }
    for n in (1..KEPT_SERIAL_LOGS).rev() {
        let from = rotated(dir, n);
        match std::fs::rename(&from, rotated(dir, n + 1)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&from, e)),
        }
    }
    std::fs::rename(&current, rotated(dir, 1)).map_err(|e| Error::io(&current, e))?;
    vm::fsutil::sync_dir(&dir.join(LOG_DIR))?;
    Ok(())
}

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
        serial_log: serial_log(dir),
        console_socket: Some(console_socket(dir)),
        paused: false,
        incoming: dir.join(SAVED_STATE).exists(),
    })
}

/// Overrides the memory of this host that VMs are checked against (bytes, or with a K, M,
/// G or T binary suffix): to prepare VMs here for a bigger host.
pub const HOST_MEMORY_ENV: &str = "SNAPVISOR_HOST_MEMORY";

/// The memory VMs are checked against: [`HOST_MEMORY_ENV`], or `MemTotal` of
/// `/proc/meminfo` (`None` when neither says).
pub fn host_memory() -> Result<Option<u64>> {
    if let Some(v) = std::env::var_os(HOST_MEMORY_ENV).filter(|v| !v.is_empty()) {
        let v = v.to_string_lossy();
        return parse_binary_size(&v).map(Some).ok_or_else(|| {
            vm::Error::InvalidArgument(format!(
                "{HOST_MEMORY_ENV}={v} is not a size (bytes, or a number with K, M, G or T)"
            ))
            .into()
        });
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    Ok(meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .map(|kb| kb << 10))
}

fn parse_binary_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 10),
        (i, 'M' | 'm') => (&s[..i], 20),
        (i, 'G' | 'g') => (&s[..i], 30),
        (i, 'T' | 't') => (&s[..i], 40),
        _ => (s, 0),
    };
    digits.trim().parse::<u64>().ok()?.checked_mul(1 << shift)
}

/// Refuses guest memory larger than this host's (QEMU would fail to start, or the host
/// would swap the guest to a crawl).
pub fn check_memory(memory: u64) -> Result<()> {
    match host_memory()? {
        Some(host) if memory > host => Err(Error::MemoryExceedsHost { memory, host }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn serial_logs_rotate_and_keep_the_last_ones() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path();
        std::fs::create_dir_all(dir.join(super::LOG_DIR)).unwrap();
        // Nothing to rotate yet, and an empty log stays where it is.
        super::rotate_serial_logs(dir).unwrap();
        std::fs::write(super::serial_log(dir), "").unwrap();
        super::rotate_serial_logs(dir).unwrap();
        assert!(super::older_serial_logs(dir).is_empty());
        for run in 0..8 {
            std::fs::write(super::serial_log(dir), format!("run {run}")).unwrap();
            super::rotate_serial_logs(dir).unwrap();
            assert!(!super::serial_log(dir).exists());
        }
        let older = super::older_serial_logs(dir);
        assert_eq!(older.len(), super::KEPT_SERIAL_LOGS);
        let runs: Vec<String> = older
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect();
        assert_eq!(runs, ["run 7", "run 6", "run 5", "run 4", "run 3"]);
        assert!(older[0].ends_with("logs/serial.log.1"), "{older:?}");
    }

    #[test]
    fn sizes_parse() {
        use super::parse_binary_size as p;
        assert_eq!(p("1024"), Some(1024));
        assert_eq!(p("2G"), Some(2 << 30));
        assert_eq!(p("512m"), Some(512 << 20));
        assert_eq!(p("1T"), Some(1 << 40));
        assert_eq!(p("lots"), None);
        assert_eq!(p(""), None);
    }
}
