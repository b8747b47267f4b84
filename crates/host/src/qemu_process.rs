//! QEMU as a child of the worker: starting it (so that it dies with the worker), reaching
//! its QMP socket, and streaming its state to and from files (QEMU's migration).
//!
//! This file holds the project's one `unsafe` block: arming `PR_SET_PDEATHSIG` between
//! fork and exec, so that QEMU never outlives its worker.

use crate::error::{Error, Result};
use serde_json::{Value, json};
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Quotes a path for `/bin/sh` (QEMU runs `exec:` migration URIs through it).
pub(crate) fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.to_string_lossy().replace('\'', "'\\''"))
}

/// Starts QEMU for `spec`, its output into `log`; QEMU gets SIGKILL if this process dies.
pub(crate) fn spawn(spec: &qemu::MachineSpec, log: &Path) -> Result<Child> {
    let program = crate::machine::find_qemu()?;
    let log_file = File::create(log).map_err(|e| Error::io(log, e))?;
    let log_err = log_file.try_clone().map_err(|e| Error::io(log, e))?;
    let mut cmd = Command::new(&program);
    cmd.args(spec.args())
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_err);
    // SAFETY: between fork and exec the child only makes the prctl and getppid system
    // calls, which are async-signal-safe and touch no memory of the parent.
    #[allow(unsafe_code)]
    unsafe {
        let parent = rustix::process::getpid();
        cmd.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
            // The worker may have died before the death signal was armed.
            if rustix::process::getppid() != Some(parent) {
                return Err(std::io::Error::other("the worker exited"));
            }
            Ok(())
        });
    }
    match cmd.spawn() {
        Ok(child) => Ok(child),
        // Gone between the check and the start.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::QemuMissing {
            program,
            set_by_env: std::env::var_os(crate::machine::QEMU_VAR).is_some(),
        }),
        Err(source) => Err(Error::Spawn { program, source }),
    }
}

/// Connects to QEMU's QMP socket once QEMU has opened it (within 30 s).
pub(crate) fn connect_qmp(sock: &Path, child: &mut Child) -> Result<qemu::Qmp> {
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().map_err(|e| Error::io(sock, e))? {
            return Err(Error::QemuFailed {
                message: format!("QEMU exited with {st}"),
            });
        }
        if sock.exists()
            && let Ok(q) = qemu::Qmp::connect(sock, Duration::from_secs(10))
        {
            return Ok(q);
        }
        if t.elapsed() > Duration::from_secs(30) {
            return Err(Error::TimedOut {
                what: "QEMU did not open its QMP socket within 30 s".into(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Turns on migration events and lifts the bandwidth limit (the default of 128 MiB/s
/// makes a local save several times slower).
pub(crate) fn migration_setup(qmp: &qemu::Qmp) -> Result<()> {
    let secs = Duration::from_secs;
    qmp.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
        secs(5),
    )?;
    qmp.execute(
        "migrate-set-parameters",
        json!({"max-bandwidth": 10u64 << 30}),
        secs(5),
    )?;
    Ok(())
}

/// Starts streaming the guest's state into `file` (QEMU writes it through `cat`).
pub(crate) fn migrate_to(qmp: &qemu::Qmp, file: &Path) -> Result<()> {
    qmp.execute(
        "migrate",
        json!({"uri": format!("exec:cat > {}", shell_quote(file))}),
        Duration::from_secs(10),
    )?;
    Ok(())
}

/// Starts loading the guest's state from `file` into a QEMU started with
/// `-incoming defer`.
pub(crate) fn migrate_from(qmp: &qemu::Qmp, file: &Path) -> Result<()> {
    qmp.execute(
        "migrate-incoming",
        json!({"uri": format!("exec:cat {}", shell_quote(file))}),
        Duration::from_secs(10),
    )?;
    Ok(())
}

/// Waits for the migration stream to finish (events must be on).
pub(crate) fn wait_migration(qmp: &qemu::Qmp, timeout: Duration) -> Result<()> {
    let t = Instant::now();
    loop {
        let left = timeout.saturating_sub(t.elapsed());
        let ev = qmp.wait_event("MIGRATION", left)?;
        match ev.data["status"].as_str() {
            Some("completed") => return Ok(()),
            Some("failed") | Some("cancelled") => {
                let info = qmp
                    .execute("query-migrate", Value::Null, Duration::from_secs(5))
                    .unwrap_or(Value::Null);
                return Err(Error::QemuFailed {
                    message: format!(
                        "the migration stream {}: {}",
                        ev.data["status"].as_str().unwrap_or("failed"),
                        info["error-desc"].as_str().unwrap_or("no reason given")
                    ),
                });
            }
            _ => {}
        }
    }
}

/// Syncs a file QEMU wrote (it does not) and renames it into place, durably.
pub(crate) fn keep_file(tmp: &Path, file: &Path) -> Result<()> {
    File::open(tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(tmp, e))?;
    std::fs::rename(tmp, file).map_err(|e| Error::io(file, e))?;
    vm::fsutil::sync_dir_of(file)?;
    Ok(())
}
