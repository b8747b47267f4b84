//! The front end's side of a VM's life: starting its worker process and waiting until the
//! guest runs, and waiting for a worker to be gone after a stop or a save.

use crate::error::{Context, Error, Result};
use crate::record::RunStatus;
use crate::run_state::{LOG_DIR, RUN_DIR, RunState};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How a front end starts a VM's worker: a program that, given
/// `--store ROOT vm worker NAME --accel kvm|tcg`, runs [`crate::worker::run`] for that
/// VM (the `snapvisor` binary's hidden `vm worker` command does).
#[derive(Clone, Debug)]
pub struct WorkerLauncher {
    program: PathBuf,
}

impl WorkerLauncher {
    /// Workers run `program`.
    pub fn new(program: impl Into<PathBuf>) -> WorkerLauncher {
        WorkerLauncher {
            program: program.into(),
        }
    }

    /// Workers run the program of this process (the `snapvisor` binary, for the CLI and
    /// the services built into it).
    pub fn current_exe() -> Result<WorkerLauncher> {
        let program = std::env::current_exe().map_err(|e| Error::io("/proc/self/exe", e))?;
        Ok(WorkerLauncher { program })
    }

    fn command(&self, store: &Path, vm: &str, accel: qemu::Accel) -> Command {
        let mut c = Command::new(&self.program);
        c.arg("--store")
            .arg(store)
            .args(["vm", "worker", vm, "--accel"])
            .arg(accel.as_str());
        c
    }
}

/// Starts the worker of VM `name` (folder `dir`) detached, and waits up to `timeout` for
/// the guest to run; returns the worker's pid.
pub(crate) fn start_worker(
    launcher: &WorkerLauncher,
    store: &Path,
    dir: &Path,
    name: &str,
    accel: qemu::Accel,
    timeout: Duration,
) -> Result<u32> {
    let log_dir = dir.join(LOG_DIR);
    for d in [&log_dir, &dir.join(RUN_DIR)] {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    let log_path = log_dir.join("worker.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| Error::io(&log_path, e))?;
    let log_err = log.try_clone().map_err(|e| Error::io(&log_path, e))?;
    use std::os::unix::process::CommandExt;
    // A process group of its own: the worker outlives this command and its terminal.
    let mut child = launcher
        .command(store, name, accel)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .process_group(0)
        .spawn()
        .map_err(|source| Error::Spawn {
            program: launcher.program.clone(),
            source,
        })
        .context("cannot start the VM worker")?;
    let pid = child.id();
    let did_not_start = |reason: String| Error::DidNotStart {
        vm: name.to_owned(),
        reason,
    };
    let t = Instant::now();
    loop {
        let status = RunStatus::read(dir);
        if status.worker_pid() == Some(pid) {
            match status.state {
                RunState::Running => return Ok(pid),
                RunState::Failed | RunState::Off | RunState::StoppedUnexpectedly => {
                    let _ = child.wait();
                    return Err(did_not_start(
                        status
                            .record
                            .and_then(|r| r.error)
                            .unwrap_or_else(|| "the worker stopped".into()),
                    ));
                }
                _ => {}
            }
        }
        if let Some(st) = child.try_wait().map_err(|e| Error::io(dir, e))? {
            let why = RunStatus::read(dir)
                .record
                .filter(|r| r.pid == pid)
                .and_then(|r| r.error)
                .unwrap_or_else(|| {
                    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    let last = log
                        .lines()
                        .rev()
                        .find(|l| !l.trim().is_empty())
                        .unwrap_or("");
                    format!("the worker exited with {st}: {last}")
                });
            return Err(did_not_start(why));
        }
        if t.elapsed() > timeout {
            return Err(Error::TimedOut {
                what: format!(
                    "VM \"{name}\" did not start within {} s (see {})",
                    timeout.as_secs(),
                    log_path.display()
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether the worker of the VM in `dir` is gone (its liveness lock is free).
pub(crate) fn worker_gone(dir: &Path) -> bool {
    vm::lock::Lock::is_free(&dir.join(RUN_DIR))
}

/// Waits up to `timeout` for the worker of the VM in `dir` to be gone: it closes the
/// disks after QEMU exits and runs the merges that waited for the VM to stop first.
pub(crate) fn wait_worker_gone(dir: &Path, timeout: Duration, what: String) -> Result<()> {
    let t = Instant::now();
    while !worker_gone(dir) {
        if t.elapsed() > timeout {
            return Err(Error::TimedOut { what });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
