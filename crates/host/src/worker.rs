//! The VM worker: one detached process per running VM ([`run`] is its whole body).
//!
//! It holds the VM's lock for as long as the VM runs (so offline operations are refused
//! while it does), serves each disk's chain over NBD on a socket in `run/`, runs QEMU
//! (which gets SIGKILL if the worker dies: it never outlives its worker), talks to it
//! over QMP, and answers front ends on `run/control.sock` ([`crate::protocol`]).
//! `run/worker.json` records the run state ([`crate::run_state`]).
//!
//! Liveness comes from a lock, not a pid: the worker holds `run/.lock` exclusively, so a
//! `running` record whose lock is free means the worker died, and the VM is reported
//! stopped unexpectedly. Its files stay consistent: a VHDX chain whose writer died is
//! replayed from its log at the next open.
//!
//! Change tracking ([`vm::tracking`]): before anything changes the disks (the automatic
//! checkpoint included), each disk's tracking file is checked against its chain; a valid
//! one goes on, anything else starts over with no reference. The worker then records its
//! session, serves the disks with every change marked first, records each switch, and
//! when the VM has stopped (and the layers are reconciled) records the final chain with
//! no session, so that an offline backup can trust it.

use crate::error::{Context, Error, Result};
use crate::protocol::{LiveStatus, Reply, Request, StopHow};
use crate::qemu_process::{self, migration_setup, wait_migration};
use crate::record::WorkerRecord;
use crate::run_state::{LOG_DIR, RUN_DIR, RunState, SAVED_STATE};
use crate::served::ServedDisk;
use crate::session::{Session, lock};
use disk::Disk;
use serde_json::Value;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vm::tracking::{LiveTracker, Status, Tracking};

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// What the worker is started with.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// The accelerator.
    pub accel: qemu::Accel,
}

/// Runs the worker of VM `name` until QEMU exits (the hidden `vm worker` command).
pub fn run(store: &vm::Store, name: &str, opts: WorkerOptions) -> Result<()> {
    let mut vm_handle = store.open_vm(name, vm::lock::WORKER_COMMAND)?;
    let dir = vm_handle.dir().to_owned();
    let run_dir = dir.join(RUN_DIR);
    for d in [&run_dir, &dir.join(LOG_DIR)] {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    let _alive = vm::lock::Lock::acquire(&run_dir, name, "vm worker", Duration::ZERO)?;
    let mut record = WorkerRecord::starting(opts.accel);
    record.write(&dir)?;
    let prepared = prepare_tracking(&vm_handle);
    // Hyper-V's automatic checkpoints: one at start when there is none, taken before the
    // guest runs (so it is of the VM off); deleted again after a clean shutdown.
    let automatic = if vm_handle.state().config.automatic_checkpoints
        && vm_handle.state().checkpoints.is_empty()
        && !dir.join(SAVED_STATE).exists()
    {
        let name = format!(
            "Automatic checkpoint - {}",
            vm::vm::default_checkpoint_name(vm_handle.name())
        );
        match vm_handle.create_checkpoint(Some(&name)) {
            Ok(id) => Some(id),
            Err(e) => {
                tracing::warn!("no automatic checkpoint: {e}");
                None
            }
        }
    } else {
        None
    };
    let shared_vm = Arc::new(Mutex::new(vm_handle));
    let mut trackers = Vec::new();
    let result = serve_vm(
        &shared_vm,
        &dir,
        &opts,
        &mut record,
        prepared,
        &mut trackers,
    );
    // QEMU is gone and the disks are closed: merges that had to wait for the VM to stop
    // can run now, and a clean shutdown takes the automatic checkpoint away.
    {
        let mut vm = lock(&shared_vm);
        vm.set_live(false);
        let clean = result.as_ref().is_ok_and(|clean| *clean) && record.state != RunState::Saved;
        if let Some(id) = automatic.filter(|_| clean)
            && vm.state().checkpoint(id).is_some()
        {
            match vm.delete_checkpoint(&id.to_string(), false) {
                Ok(r) if r.failed.is_some() => {
                    tracing::warn!("merging after the automatic checkpoint: {:?}", r.failed)
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("deleting the automatic checkpoint: {e}"),
            }
        }
        let r = vm.reconcile();
        if let Some(e) = r.failed {
            tracing::warn!("merging layers after the VM stopped: {e}");
        }
        seal_tracking(&vm, &trackers);
    }
    let result = result.map(|_| ());
    let ended = match &result {
        Ok(()) if record.state == RunState::Saved => RunState::Saved,
        Ok(()) => RunState::Off,
        Err(e) => {
            record.error = Some(e.chain());
            RunState::Failed
        }
    };
    if let Err(e) = record.transition(ended) {
        // The machine has no such edge: record the end anyway, it is what happened.
        tracing::error!("{e}");
        record.state = ended;
    }
    record.qemu_pid = None;
    record.write(&dir)?;
    result
}

/// Each disk's tracking, if its file is valid for the chain as it is (the VM not served
/// yet); the reason it starts over is logged otherwise.
fn prepare_tracking(vm: &vm::Vm) -> Vec<Option<Tracking>> {
    let state = vm.state();
    state
        .config
        .hardware
        .disks
        .iter()
        .zip(&state.now.disks)
        .map(|(d, layer)| {
            match vm::tracking::check_disk(vm.dir(), &d.name, &vm.layer_path(layer)) {
                Ok(Status::Valid(t)) => Some(t),
                Ok(Status::Invalid(why)) => {
                    tracing::info!("change tracking of {} starts over: {why}", d.name);
                    None
                }
                Ok(Status::None) => None,
                Err(e) => {
                    tracing::warn!("change tracking of {} starts over: {e}", d.name);
                    None
                }
            }
        })
        .collect()
}

/// Records the chains as the stopped VM leaves them, with no session: what an offline
/// backup checks against.
fn seal_tracking(vm: &vm::Vm, trackers: &[(usize, Arc<LiveTracker>)]) {
    for (i, t) in trackers {
        let Some(layer) = vm.state().now.disks.get(*i) else {
            continue;
        };
        let sealed = vhdx::Chain::open(&vm.layer_path(layer), false)
            .map_err(vm::Error::from)
            .and_then(|c| {
                let seen = vm::tracking::chain_seen(&c);
                drop(c);
                t.update(|t| {
                    t.set_chain(seen);
                    t.set_session(None);
                })
            });
        if let Err(e) = sealed {
            tracing::warn!("change tracking: cannot record the stopped VM's chains: {e}");
        }
    }
}

/// Serves the VM until QEMU exits; `Ok(true)` when the guest shut down cleanly.
fn serve_vm(
    shared_vm: &Arc<Mutex<vm::Vm>>,
    dir: &Path,
    opts: &WorkerOptions,
    record: &mut WorkerRecord,
    mut prepared: Vec<Option<Tracking>>,
    trackers: &mut Vec<(usize, Arc<LiveTracker>)>,
) -> Result<bool> {
    let mut vm_guard = lock(shared_vm);
    vm_guard.set_live(true);
    let state = vm_guard.state().clone();
    let run_dir = dir.join(RUN_DIR);
    let mut servers = Vec::new();
    let mut disks = Vec::new();
    let mut served = Vec::new();
    let session_id = uuid::Uuid::new_v4();
    for (i, file) in state.now.disks.iter().enumerate() {
        let path = vm_guard.layer_path(file);
        let d = Arc::new(
            ServedDisk::open_in_session(&path, Some(session_id))
                .with_context(|| format!("cannot open disk {}", path.display()))?,
        );
        let disk_name = &state.config.hardware.disks[i].name;
        let seen = d.with_chain(vm::tracking::chain_seen)?;
        let mut t = prepared
            .get_mut(i)
            .and_then(Option::take)
            .unwrap_or_else(|| Tracking::new(d.size(), None, seen.clone()));
        // Recorded before the first write can give a file the session's DataWriteGuid.
        t.set_session(Some(session_id));
        t.set_chain(seen);
        match LiveTracker::start(&Tracking::path(dir, disk_name), t) {
            Ok(l) => {
                let l = Arc::new(l);
                d.track(l.clone());
                trackers.push((i, l));
            }
            Err(e) => {
                tracing::warn!("change tracking of {disk_name} is off: {e}");
                // A file claiming this session's writes while nobody marks them must not stay.
                let path = Tracking::path(dir, disk_name);
                vm::fsutil::remove_file(&path)
                    .context("cannot remove a change tracking file that would be wrong")?;
            }
        }
        served.push(d.clone());
        let export = Arc::new(nbd::Export::new(&format!("disk{i}"), d, false));
        let sock = run_dir.join(format!("disk{i}.sock"));
        let server = nbd::Server::bind(&sock, export)?;
        let stopper = server.stopper();
        let thread = std::thread::spawn(move || server.run());
        servers.push((stopper, thread));
        disks.push(qemu::NbdDisk {
            socket: sock,
            export: format!("disk{i}"),
        });
    }
    let spec = crate::machine::machine_spec(&state, dir, opts.accel, disks)?;
    let _ = std::fs::remove_file(&spec.qmp_socket);
    // A new serial log for this run, the last runs' kept (see `machine`).
    crate::machine::rotate_serial_logs(dir)?;
    if let Some(sock) = &spec.console_socket {
        let _ = std::fs::remove_file(sock);
    }
    let qemu_log = dir.join(LOG_DIR).join("qemu.log");
    let qemu_said = || {
        std::fs::read_to_string(&qemu_log)
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    let mut child = qemu_process::spawn(&spec, &qemu_log)?;
    record.qemu_pid = Some(child.id());
    let qmp = match qemu_process::connect_qmp(&spec.qmp_socket, &mut child) {
        Ok(q) => q,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::QemuFailed {
                message: format!("QEMU did not start: {}: {}", e.chain(), qemu_said()),
            });
        }
    };
    if spec.incoming {
        if let Err(e) = restore(&qmp, &dir.join(SAVED_STATE), &mut child) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::QemuFailed {
                message: format!(
                    "restoring the saved state failed: {}: {}",
                    e.chain(),
                    qemu_said()
                ),
            });
        }
        // The state is in QEMU now; like Hyper-V, a resumed VM has no saved state left.
        vm::fsutil::remove_file(&dir.join(SAVED_STATE))?;
    }
    record.transition(RunState::Running)?;
    record.write(dir)?;
    drop(vm_guard);
    let child = Arc::new(Mutex::new(child));
    let session = Arc::new(Session {
        qmp,
        child: child.clone(),
        agent: run_dir.join("qga.sock"),
        dir: dir.to_owned(),
        record: Mutex::new(record.clone()),
        vm: shared_vm.clone(),
        disks: served,
        op: Mutex::new(()),
        forced: AtomicBool::new(false),
    });
    let control = crate::control::socket_path(dir);
    let _ = std::fs::remove_file(&control);
    let listener = UnixListener::bind(&control).map_err(|e| Error::io(&control, e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io(&control, e))?;
    // Until QEMU exits: answer the front ends.
    let mut answering = Vec::new();
    let status = loop {
        if let Some(st) = lock(&child).try_wait().map_err(|e| Error::io(dir, e))? {
            break st;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                let session = session.clone();
                answering.retain(|t: &std::thread::JoinHandle<()>| !t.is_finished());
                answering.push(std::thread::spawn(move || {
                    let answered = crate::control::serve_one(stream, |r| handle(&session, r));
                    if let Err(e) = answered {
                        tracing::warn!("control connection: {e}");
                    }
                }));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(Error::io(&control, e)),
        }
    };
    let _ = std::fs::remove_file(&control);
    // Requests in progress (a stop waiting for this exit) get their replies.
    for t in answering {
        let _ = t.join();
    }
    for (stopper, thread) in servers {
        stopper.stop();
        match thread.join() {
            Ok(r) => r.context("closing a disk")?,
            Err(_) => {
                return Err(Error::Io {
                    path: run_dir.clone(),
                    source: std::io::Error::other("a disk server panicked"),
                });
            }
        }
    }
    // Close the chains, so that what runs after the VM (merges) can open them.
    session.detach_all()?;
    let forced = session.forced.load(Ordering::SeqCst);
    *record = lock(&session.record).clone();
    if !status.success() {
        return Err(Error::QemuFailed {
            message: format!("QEMU exited with {status}: {}", qemu_said()),
        });
    }
    Ok(!forced)
}

/// Answers one request.
fn handle(session: &Session, request: Request) -> Result<Reply> {
    match request {
        Request::Status => Ok(Reply::Status(status(session))),
        Request::Pause => {
            session.can_become(RunState::Paused)?;
            session
                .qmp
                .execute("stop", Value::Null, SECS(10))
                .context("cannot pause")?;
            session.set_state(RunState::Paused)?;
            Ok(Reply::Done)
        }
        Request::Resume => {
            session.can_become(RunState::Running)?;
            session
                .qmp
                .execute("cont", Value::Null, SECS(10))
                .context("cannot resume")?;
            session.set_state(RunState::Running)?;
            Ok(Reply::Done)
        }
        Request::Stop {
            force,
            timeout_secs,
        } => Ok(Reply::Stopped {
            how: stop(session, force, SECS(timeout_secs))?,
        }),
        Request::Save => match save(session) {
            Ok(ms) => Ok(Reply::Saved { ms }),
            Err(e) => {
                let _ = session.qmp.execute("cont", Value::Null, SECS(5));
                let _ = session.set_state(RunState::Running);
                Err(e).context("cannot save")
            }
        },
        Request::CheckpointCreate { name } => Ok(Reply::CheckpointTaken(crate::live::take(
            session,
            name.as_deref(),
        )?)),
        Request::RecoveryCheckpoint {
            name,
            quiesce,
            memory,
            lease,
        } => Ok(Reply::CheckpointTaken(crate::live::take_recovery(
            session,
            &name,
            quiesce,
            memory,
            lease.as_deref(),
        )?)),
        Request::CheckpointDelete {
            checkpoint,
            subtree,
        } => Ok(Reply::CheckpointDeleted(crate::live::delete(
            session,
            &checkpoint,
            subtree,
        )?)),
        Request::CheckpointRename {
            checkpoint,
            new_name,
        } => {
            let _op = session.exclusive();
            let id = session.vm().rename_checkpoint(&checkpoint, &new_name)?;
            Ok(Reply::CheckpointRenamed { id })
        }
        Request::CheckpointExport { checkpoint, dir } => {
            let _op = session.exclusive();
            let id = session.vm().export_checkpoint(&checkpoint, &dir)?;
            Ok(Reply::CheckpointExported { id })
        }
        Request::TrackingSettle { checkpoint, point } => {
            let longest = session
                .disks
                .iter()
                .map(|d| d.end_watch())
                .fold(0.0, f64::max);
            session.settle_tracking(checkpoint, point.as_deref())?;
            Ok(Reply::TrackingSettled {
                longest_write_ms: longest,
            })
        }
        Request::CheckpointSettings {
            checkpoint_type,
            max_checkpoints,
            automatic_checkpoints,
        } => {
            let _op = session.exclusive();
            session.vm().set(&vm::Settings {
                checkpoint_type,
                max_checkpoints,
                automatic_checkpoints,
                ..Default::default()
            })?;
            Ok(Reply::Done)
        }
    }
}

fn status(session: &Session) -> LiveStatus {
    let qemu_status = session
        .qmp
        .status(SECS(5))
        .unwrap_or_else(|_| "unknown".into());
    let agent = qemu::GuestAgent::connect(&session.agent, Duration::from_millis(1500))
        .and_then(|mut a| a.ping(SECS(1)))
        .is_ok();
    let generation_id = session
        .qmp
        .execute("query-vm-generation-id", Value::Null, SECS(5))
        .ok()
        .and_then(|v| v["guid"].as_str().map(str::to_owned));
    LiveStatus {
        qemu_status,
        agent,
        generation_id,
    }
}

/// Shuts the guest down (or turns it off) and waits for QEMU to exit.
fn stop(session: &Session, force: bool, timeout: Duration) -> Result<StopHow> {
    if !force {
        // A paused guest cannot react to its power button.
        let _ = session.qmp.execute("cont", Value::Null, SECS(5));
        session
            .qmp
            .execute("system_powerdown", Value::Null, SECS(5))?;
        if session.exited_within(timeout)? {
            return Ok(StopHow::ShutDown);
        }
    }
    session.forced.store(true, Ordering::SeqCst);
    if session.qmp.execute("quit", Value::Null, SECS(5)).is_err()
        || !session.exited_within(SECS(10))?
    {
        session.kill_qemu();
    }
    session.exited_within(SECS(10))?;
    Ok(StopHow::Forced)
}

/// Hyper-V's Save: pause, write memory and device state to `saved/state.vsv`, quit.
fn save(session: &Session) -> Result<u64> {
    let _op = session.exclusive();
    let t = Instant::now();
    let file = session.dir.join(SAVED_STATE);
    let folder = file.parent().expect("has a folder");
    std::fs::create_dir_all(folder).map_err(|e| Error::io(folder, e))?;
    let tmp = file.with_extension("vsv.partial");
    let _ = std::fs::remove_file(&tmp);
    migration_setup(&session.qmp)?;
    session.set_state(RunState::Saving)?;
    session.qmp.execute("stop", Value::Null, SECS(10))?;
    session.qmp.drain_events();
    qemu_process::migrate_to(&session.qmp, &tmp)?;
    wait_migration(&session.qmp, SECS(300))?;
    qemu_process::keep_file(&tmp, &file)?;
    // Recorded once QEMU is gone (the worker's last write).
    session.note_state(RunState::Saved)?;
    let _ = session.qmp.execute("quit", Value::Null, SECS(5));
    if !session.exited_within(SECS(10))? {
        session.kill_qemu();
    }
    Ok(t.elapsed().as_millis() as u64)
}

/// Loads `saved/state.vsv` into a QEMU started with `-incoming defer`, then runs it.
fn restore(qmp: &qemu::Qmp, file: &Path, child: &mut Child) -> Result<()> {
    migration_setup(qmp)?;
    qemu_process::migrate_from(qmp, file)?;
    if let Err(e) = wait_migration(qmp, SECS(300)) {
        if let Some(st) = child.try_wait().map_err(|e| Error::io(file, e))? {
            return Err(Error::QemuFailed {
                message: format!("QEMU exited with {st} while loading the saved state"),
            });
        }
        return Err(e);
    }
    // A state saved from a paused VM loads paused.
    qmp.execute("cont", Value::Null, SECS(10))?;
    Ok(())
}
