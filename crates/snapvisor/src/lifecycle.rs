//! `vm start|stop|pause|resume|status`: the CLI side of the VM worker.

use crate::disk_cmd::print_json;
use anyhow::{Context, Result, bail};
use host::worker::{self, LOG_DIR, RUN_DIR};
use serde_json::json;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};
use vm::Store;

fn vm_dir(store: &Store, name: &str) -> Result<std::path::PathBuf> {
    let (dir, _, _) = store
        .read_vm(name)
        .with_context(|| format!("cannot read VM {name:?}"))?;
    Ok(dir)
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

pub fn start(
    store: &Store,
    name: &str,
    accel: Option<qemu::Accel>,
    timeout: u64,
) -> Result<ExitCode> {
    let pid = start_quiet(store, name, accel, timeout)?;
    println!("started VM {name:?} (worker pid {pid})");
    Ok(ExitCode::SUCCESS)
}

/// Starts the VM's worker and waits until the guest runs; returns the worker's pid.
pub fn start_quiet(
    store: &Store,
    name: &str,
    accel: Option<qemu::Accel>,
    timeout: u64,
) -> Result<u32> {
    let dir = vm_dir(store, name)?;
    let (state, record) = worker::run_state(&dir);
    if matches!(state.as_str(), "starting" | "running" | "paused") {
        bail!(
            "VM {name:?} is already {state} (worker pid {})",
            record.map(|r| r.pid).unwrap_or(0)
        );
    }
    let accel = accel.unwrap_or_else(default_accel);
    std::fs::create_dir_all(dir.join(LOG_DIR))?;
    std::fs::create_dir_all(dir.join(RUN_DIR))?;
    let log_path = dir.join(LOG_DIR).join("worker.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)?;
    let exe = std::env::current_exe()?;
    use std::os::unix::process::CommandExt;
    // A process group of its own: the worker outlives this command and its terminal.
    let mut child = Command::new(exe)
        .arg("--store")
        .arg(store.root())
        .args(["vm", "worker", name, "--accel"])
        .arg(accel.as_str())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("cannot start the VM worker")?;
    let pid = child.id();
    let t = Instant::now();
    loop {
        let (state, record) = worker::run_state(&dir);
        let ours = record.as_ref().is_some_and(|r| r.pid == pid);
        if ours {
            match state.as_str() {
                "running" => break,
                "failed" | "off" | "stopped-unexpectedly" => {
                    let _ = child.wait();
                    bail!(
                        "VM {name:?} did not start: {}",
                        record
                            .and_then(|r| r.error)
                            .unwrap_or_else(|| "the worker stopped".into())
                    );
                }
                _ => {}
            }
        }
        if let Some(st) = child.try_wait()? {
            let (_, record) = worker::run_state(&dir);
            let why = record
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
            bail!("VM {name:?} did not start: {why}");
        }
        if t.elapsed() > Duration::from_secs(timeout) {
            bail!(
                "VM {name:?} did not start within {timeout} s (see {})",
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(pid)
}

fn require_running(dir: &std::path::Path, name: &str) -> Result<()> {
    let (state, _) = worker::run_state(dir);
    if !matches!(state.as_str(), "running" | "paused") {
        bail!("VM {name:?} is not running (it is {state})");
    }
    Ok(())
}

pub fn stop(store: &Store, name: &str, force: bool, timeout: u64) -> Result<ExitCode> {
    let dir = vm_dir(store, name)?;
    if worker::run_state(&dir).0 == "saved" {
        // Hyper-V's "delete saved state": the VM is off, as after a power loss.
        vm::fsutil::remove_file(&dir.join(worker::SAVED_STATE))?;
        println!("discarded the saved state of VM {name:?}; it is off");
        return Ok(ExitCode::SUCCESS);
    }
    require_running(&dir, name)?;
    let how = stop_worker(&dir, name, force, timeout)?;
    println!("stopped VM {name:?} ({how})");
    Ok(ExitCode::SUCCESS)
}

/// Stops a running VM and waits until its worker has exited (its disks closed and
/// merged where a merge waited for the stop); returns how it stopped.
pub fn stop_worker(dir: &std::path::Path, name: &str, force: bool, timeout: u64) -> Result<String> {
    let reply = worker::request(
        dir,
        &json!({"cmd": "stop", "force": force, "timeout": timeout}),
        Duration::from_secs(timeout + 30),
    );
    // A worker whose QEMU exited may be gone before its reply is read: that is a stop too.
    let reply = match reply {
        Ok(r) => r,
        Err(_) if vm::lock::Lock::is_free(&dir.join(RUN_DIR)) => json!({"how": "stopped"}),
        Err(e) => return Err(e.context(format!("cannot stop VM {name:?}"))),
    };
    // The worker closes the disks after QEMU exits, runs the merges that waited for the
    // VM to stop, then releases its lock.
    let t = Instant::now();
    while !vm::lock::Lock::is_free(&dir.join(RUN_DIR)) {
        if t.elapsed() > Duration::from_secs(3600) {
            bail!("the worker of VM {name:?} did not exit after QEMU stopped");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(reply["how"].as_str().unwrap_or("stopped").to_owned())
}

pub fn save(store: &Store, name: &str) -> Result<ExitCode> {
    let dir = vm_dir(store, name)?;
    require_running(&dir, name)?;
    let reply = worker::request(&dir, &json!({"cmd": "save"}), Duration::from_secs(330))
        .with_context(|| format!("cannot save VM {name:?}"))?;
    let t = Instant::now();
    while !vm::lock::Lock::is_free(&dir.join(RUN_DIR)) {
        if t.elapsed() > Duration::from_secs(60) {
            bail!("the worker of VM {name:?} did not exit after saving");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "saved VM {name:?} in {} ms; `snapvisor vm start {name}` resumes it",
        reply["ms"]
    );
    Ok(ExitCode::SUCCESS)
}

pub fn simple(store: &Store, name: &str, cmd: &str) -> Result<ExitCode> {
    let dir = vm_dir(store, name)?;
    require_running(&dir, name)?;
    worker::request(&dir, &json!({"cmd": cmd}), Duration::from_secs(30))
        .with_context(|| format!("cannot {cmd} VM {name:?}"))?;
    let done = if cmd == "pause" { "paused" } else { "resumed" };
    println!("{done} VM {name:?}");
    Ok(ExitCode::SUCCESS)
}

pub fn status(store: &Store, name: &str, as_json: bool) -> Result<ExitCode> {
    let dir = vm_dir(store, name)?;
    let (state, record) = worker::run_state(&dir);
    let live = if matches!(state.as_str(), "running" | "paused") {
        worker::request(&dir, &json!({"cmd": "status"}), Duration::from_secs(15)).ok()
    } else {
        None
    };
    let agent = live
        .as_ref()
        .and_then(|l| l["agent"].as_bool())
        .unwrap_or(false);
    if as_json {
        print_json(&json!({
            "name": name,
            "state": state,
            "worker_pid": record.as_ref().map(|r| r.pid),
            "qemu_pid": record.as_ref().and_then(|r| r.qemu_pid),
            "qemu_status": live.as_ref().map(|l| l["qemu_status"].clone()),
            "agent": agent,
            "generation_id": live.as_ref().map(|l| l["generation_id"].clone()),
            "error": record.as_ref().and_then(|r| r.error.clone()),
        }))?;
    } else {
        println!("{name}: {state}");
        if live.is_some() {
            println!(
                "  guest agent: {}",
                if agent { "answers" } else { "does not answer" }
            );
        }
        if let Some(e) = record.and_then(|r| r.error) {
            println!("  last error: {e}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
