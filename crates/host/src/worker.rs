//! The VM worker: one detached process per running VM.
//!
//! It holds the VM's lock for as long as the VM runs (so offline checkpoint commands are
//! refused while it does), serves each disk's chain over NBD on a socket in `run/`, runs
//! QEMU (which gets SIGKILL if the worker dies: it never outlives its worker), talks to
//! it over QMP, and answers the CLI on `run/control.sock` (one JSON request per
//! connection). `run/worker.json` records the state for `vm status` and `vm list`.
//!
//! Liveness comes from a lock, not a pid: the worker holds `run/worker.lock` exclusively,
//! so a `running` record whose lock is free means the worker died, and the VM is reported
//! stopped unexpectedly. Its files stay consistent: a VHDX chain whose writer died is
//! replayed from its log at the next open.

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Folder of sockets and the state record, inside the VM folder.
pub const RUN_DIR: &str = vm::journal::RUN_DIR;
/// Folder of the serial console and the worker's and QEMU's logs.
pub const LOG_DIR: &str = vm::journal::LOG_DIR;
/// The saved state (memory and devices) of a VM that `vm save` stopped.
pub const SAVED_STATE: &str = vm::journal::SAVED_STATE_FILE;

/// Quotes a path for `/bin/sh` (QEMU runs `exec:` migration URIs through it).
pub(crate) fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.to_string_lossy().replace('\'', "'\\''"))
}

/// The worker's record of the VM's state.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorkerState {
    /// `starting`, `running`, `paused`, `off`, `stopped-unexpectedly`, `failed`.
    pub state: String,
    /// The worker's pid.
    pub pid: u32,
    /// QEMU's pid, while it runs.
    pub qemu_pid: Option<u32>,
    /// Why it failed, when it did.
    pub error: Option<String>,
    /// When the VM was started, seconds since the Unix epoch.
    pub started: u64,
    /// The accelerator it runs with (`kvm` or `tcg`).
    #[serde(default)]
    pub accel: Option<String>,
}

fn state_path(vm_dir: &Path) -> PathBuf {
    vm_dir.join(RUN_DIR).join("worker.json")
}

fn write_state(vm_dir: &Path, s: &WorkerState) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(s)?;
    vm::fsutil::atomic_write(&state_path(vm_dir), &bytes)?;
    Ok(())
}

/// The VM's run state as the CLI reports it: `off`, `starting`, `running`, `paused`,
/// `stopped-unexpectedly` or `failed`, with the record when there is one.
pub fn run_state(vm_dir: &Path) -> (String, Option<WorkerState>) {
    let record: Option<WorkerState> = std::fs::read(state_path(vm_dir))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let alive = !vm::lock::Lock::is_free(&vm_dir.join(RUN_DIR));
    match record {
        None => ("off".into(), None),
        Some(r) => {
            let s = match r.state.as_str() {
                "starting" | "running" | "paused" | "saving" if !alive => {
                    "stopped-unexpectedly".into()
                }
                "saved" if !vm_dir.join(SAVED_STATE).exists() => "off".into(),
                other => other.to_owned(),
            };
            (s, Some(r))
        }
    }
}

/// Sends one request to a running worker and returns its reply.
pub fn request(vm_dir: &Path, req: &Value, timeout: Duration) -> Result<Value> {
    let sock = vm_dir.join(RUN_DIR).join("control.sock");
    let mut s = UnixStream::connect(&sock)
        .with_context(|| format!("the VM's worker does not answer on {}", sock.display()))?;
    s.set_read_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    s.write_all(&line)?;
    let mut reply = String::new();
    BufReader::new(s)
        .read_line(&mut reply)
        .context("no reply from the VM's worker")?;
    let v: Value = serde_json::from_str(&reply).context("a bad reply from the VM's worker")?;
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        bail!("{e}");
    }
    Ok(v)
}

/// What `vm start` asks of the worker.
#[derive(Clone, Debug)]
pub struct StartOptions {
    /// Accelerator.
    pub accel: qemu::Accel,
}

/// Runs the worker (the hidden `vm worker` command) until QEMU exits.
pub fn run(store: &vm::Store, name: &str, opts: StartOptions) -> Result<()> {
    let mut vm_handle = store.open_vm(name, "vm worker (the VM is running)")?;
    let dir = vm_handle.dir().to_owned();
    let run_dir = dir.join(RUN_DIR);
    std::fs::create_dir_all(&run_dir)?;
    std::fs::create_dir_all(dir.join(LOG_DIR))?;
    let _alive = vm::lock::Lock::acquire(&run_dir, name, "vm worker", Duration::ZERO)?;
    let started = vm::fsutil::now_unix();
    let mut record = WorkerState {
        state: "starting".into(),
        pid: std::process::id(),
        qemu_pid: None,
        error: None,
        started,
        accel: Some(opts.accel.as_str().into()),
    };
    write_state(&dir, &record)?;
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
    let result = serve_vm(&shared_vm, &dir, &opts, &mut record);
    // QEMU is gone and the disks are closed: merges that had to wait for the VM to stop
    // can run now, and a clean shutdown takes the automatic checkpoint away.
    {
        let mut vm = shared_vm.lock().unwrap_or_else(|p| p.into_inner());
        vm.set_live(false);
        let clean = result.as_ref().is_ok_and(|clean| *clean) && record.state != "saved";
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
    }
    let result = result.map(|_| ());
    match &result {
        Ok(()) if record.state == "saved" => {}
        Ok(()) => record.state = "off".into(),
        Err(e) => {
            record.state = "failed".into();
            record.error = Some(format!("{e:#}"));
        }
    }
    record.qemu_pid = None;
    write_state(&dir, &record)?;
    result
}

/// Serves the VM until QEMU exits; `Ok(true)` when the guest shut down cleanly.
fn serve_vm(
    shared_vm: &Arc<Mutex<vm::Vm>>,
    dir: &Path,
    opts: &StartOptions,
    record: &mut WorkerState,
) -> Result<bool> {
    let mut vm_guard = shared_vm.lock().unwrap_or_else(|p| p.into_inner());
    vm_guard.set_live(true);
    let state = vm_guard.state().clone();
    let run_dir = dir.join(RUN_DIR);
    let mut servers = Vec::new();
    let mut disks = Vec::new();
    let mut served = Vec::new();
    for (i, file) in state.now.disks.iter().enumerate() {
        let path = vm_guard.layer_path(file);
        let d = Arc::new(
            crate::served::ServedDisk::open(&path)
                .with_context(|| format!("cannot open disk {}", path.display()))?,
        );
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
    let hw = &state.config.hardware;
    let uefi = match (hw.firmware, &state.now.nvram) {
        (vm::Firmware::Bios, _) => None,
        (vm::Firmware::Uefi, Some(vars)) => {
            let code = crate::ovmf_paths().0;
            if !code.is_file() {
                bail!(
                    "the UEFI firmware {} is missing: install Debian's ovmf package or set SNAPVISOR_OVMF_CODE",
                    code.display()
                );
            }
            Some((code, dir.join(vm::journal::FIRMWARE_DIR).join(vars)))
        }
        (vm::Firmware::Uefi, None) => bail!("the VM has UEFI firmware but no variable store"),
    };
    let spec = qemu::MachineSpec {
        name: state.config.name.clone(),
        uuid: state.config.uuid.to_string(),
        generation_id: state.config.generation_id.to_string(),
        machine: "pc".into(),
        accel: opts.accel,
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
    };
    let _ = std::fs::remove_file(&spec.qmp_socket);
    let qemu_log = dir.join(LOG_DIR).join("qemu.log");
    let mut child = spawn_qemu(&spec, &qemu_log)?;
    record.qemu_pid = Some(child.id());
    let qmp = match connect_qmp(&spec.qmp_socket, &mut child) {
        Ok(q) => q,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            let reason = std::fs::read_to_string(&qemu_log).unwrap_or_default();
            bail!("QEMU did not start: {e:#}: {}", reason.trim());
        }
    };
    if spec.incoming {
        if let Err(e) = restore(&qmp, &dir.join(SAVED_STATE), &mut child) {
            let _ = child.kill();
            let _ = child.wait();
            let reason = std::fs::read_to_string(&qemu_log).unwrap_or_default();
            bail!("restoring the saved state failed: {e:#}: {}", reason.trim());
        }
        // The state is in QEMU now; like Hyper-V, a resumed VM has no saved state left.
        vm::fsutil::remove_file(&dir.join(SAVED_STATE))?;
    }
    record.state = "running".into();
    write_state(dir, record)?;
    drop(vm_guard);
    let child = Arc::new(Mutex::new(child));
    let shared = Arc::new(Shared {
        qmp,
        child: child.clone(),
        agent: run_dir.join("qga.sock"),
        dir: dir.to_owned(),
        record: Mutex::new(record.clone()),
        vm: shared_vm.clone(),
        disks: served,
        op: Mutex::new(()),
        forced: std::sync::atomic::AtomicBool::new(false),
    });
    let control = run_dir.join("control.sock");
    let _ = std::fs::remove_file(&control);
    let listener = UnixListener::bind(&control)?;
    listener.set_nonblocking(true)?;
    // Until QEMU exits: answer the CLI.
    let mut answering = Vec::new();
    let status = loop {
        if let Some(st) = child.lock().unwrap_or_else(|p| p.into_inner()).try_wait()? {
            break st;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                let shared = shared.clone();
                answering.retain(|t: &std::thread::JoinHandle<()>| !t.is_finished());
                answering.push(std::thread::spawn(move || {
                    if let Err(e) = answer(&shared, stream) {
                        tracing::warn!("control request: {e:#}");
                    }
                }));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e.into()),
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
            Err(_) => bail!("a disk server panicked"),
        }
    }
    // Close the chains, so that what runs after the VM (merges) can open them.
    shared.detach_all()?;
    let forced = shared.forced.load(std::sync::atomic::Ordering::SeqCst);
    *record = shared
        .record
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if !status.success() {
        let reason = std::fs::read_to_string(&qemu_log).unwrap_or_default();
        bail!("QEMU exited with {status}: {}", reason.trim());
    }
    Ok(!forced)
}

pub(crate) struct Shared {
    pub(crate) qmp: qemu::Qmp,
    pub(crate) child: Arc<Mutex<Child>>,
    pub(crate) agent: PathBuf,
    pub(crate) dir: PathBuf,
    pub(crate) record: Mutex<WorkerState>,
    /// The VM (its lock is held for as long as the worker runs).
    pub(crate) vm: Arc<Mutex<vm::Vm>>,
    /// What each disk's NBD export serves, in the guest's order.
    pub(crate) disks: Vec<Arc<crate::served::ServedDisk>>,
    /// Operations that pause or switch the guest run one at a time.
    pub(crate) op: Mutex<()>,
    /// QEMU was turned off rather than shut down by its guest.
    pub(crate) forced: std::sync::atomic::AtomicBool,
}

impl Shared {
    pub(crate) fn vm(&self) -> std::sync::MutexGuard<'_, vm::Vm> {
        self.vm.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Flushes and closes every disk's chain (waiting for requests in flight). Only while
    /// the guest is paused or gone.
    pub(crate) fn detach_all(&self) -> Result<()> {
        for d in &self.disks {
            d.close().context("closing a disk before switching it")?;
        }
        Ok(())
    }

    /// Opens Now's layers and serves them.
    pub(crate) fn attach_now(&self) -> Result<()> {
        let paths: Vec<PathBuf> = {
            let vm = self.vm();
            vm.state()
                .now
                .disks
                .iter()
                .map(|f| vm.layer_path(f))
                .collect()
        };
        for (d, path) in self.disks.iter().zip(paths) {
            d.reopen(&path)
                .with_context(|| format!("cannot open disk {}", path.display()))?;
        }
        Ok(())
    }

    fn set_state(&self, state: &str) -> Result<()> {
        let mut r = self.record.lock().unwrap_or_else(|p| p.into_inner());
        r.state = state.to_owned();
        write_state(&self.dir, &r)
    }
    fn exited_within(&self, timeout: Duration) -> Result<bool> {
        let t = Instant::now();
        loop {
            if self
                .child
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .try_wait()?
                .is_some()
            {
                return Ok(true);
            }
            if t.elapsed() >= timeout {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn answer(shared: &Shared, stream: UnixStream) -> Result<()> {
    let mut line = String::new();
    BufReader::new(stream.try_clone()?).read_line(&mut line)?;
    let req: Value = serde_json::from_str(&line)?;
    let secs = Duration::from_secs;
    let reply = match req["cmd"].as_str().unwrap_or("") {
        "status" => {
            let run = shared
                .qmp
                .status(secs(5))
                .unwrap_or_else(|_| "unknown".into());
            let agent = qemu::GuestAgent::connect(&shared.agent, Duration::from_millis(1500))
                .and_then(|mut a| a.ping(secs(1)))
                .is_ok();
            let generation_id = shared
                .qmp
                .execute("query-vm-generation-id", Value::Null, secs(5))
                .ok()
                .and_then(|v| v["guid"].as_str().map(str::to_owned));
            json!({"qemu_status": run, "agent": agent, "generation_id": generation_id})
        }
        "pause" => match shared.qmp.execute("stop", Value::Null, secs(10)) {
            Ok(_) => {
                shared.set_state("paused")?;
                json!({"ok": true})
            }
            Err(e) => json!({"error": format!("cannot pause: {e}")}),
        },
        "resume" => match shared.qmp.execute("cont", Value::Null, secs(10)) {
            Ok(_) => {
                shared.set_state("running")?;
                json!({"ok": true})
            }
            Err(e) => json!({"error": format!("cannot resume: {e}")}),
        },
        "stop" => {
            let force = req["force"].as_bool().unwrap_or(false);
            let timeout = secs(req["timeout"].as_u64().unwrap_or(60));
            let mut how = "forced";
            if !force {
                // A paused guest cannot react to its power button.
                let _ = shared.qmp.execute("cont", Value::Null, secs(5));
                shared
                    .qmp
                    .execute("system_powerdown", Value::Null, secs(5))?;
                if shared.exited_within(timeout)? {
                    how = "shut down";
                }
            }
            if how == "forced" {
                shared
                    .forced
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                if shared.qmp.execute("quit", Value::Null, secs(5)).is_err()
                    || !shared.exited_within(secs(10))?
                {
                    let _ = shared
                        .child
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .kill();
                }
                shared.exited_within(secs(10))?;
            }
            json!({"ok": true, "how": how})
        }
        "checkpoint" => match crate::live::checkpoint_request(shared, &req) {
            Ok(v) => v,
            Err(e) => json!({"error": format!("{e:#}")}),
        },
        "save" => match save(shared) {
            Ok(ms) => json!({"ok": true, "ms": ms}),
            Err(e) => {
                let _ = shared.qmp.execute("cont", Value::Null, secs(5));
                let _ = shared.set_state("running");
                json!({"error": format!("cannot save: {e:#}")})
            }
        },
        other => json!({"error": format!("unknown request {other:?}")}),
    };
    let mut out = serde_json::to_vec(&reply)?;
    out.push(b'\n');
    (&stream).write_all(&out)?;
    Ok(())
}

fn spawn_qemu(spec: &qemu::MachineSpec, log: &Path) -> Result<Child> {
    let program = qemu_program();
    let log_file = File::create(log)?;
    let mut cmd = Command::new(&program);
    cmd.args(spec.args())
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
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
    cmd.spawn()
        .with_context(|| format!("cannot run {}", program.display()))
}

/// `SNAPVISOR_QEMU`, else `qemu-system-x86_64` on the PATH.
pub fn qemu_program() -> PathBuf {
    std::env::var_os("SNAPVISOR_QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"))
}

fn connect_qmp(sock: &Path, child: &mut Child) -> Result<qemu::Qmp> {
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait()? {
            bail!("QEMU exited with {st}");
        }
        if sock.exists()
            && let Ok(q) = qemu::Qmp::connect(sock, Duration::from_secs(10))
        {
            return Ok(q);
        }
        if t.elapsed() > Duration::from_secs(30) {
            bail!("QEMU did not open its QMP socket within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for the migration stream to finish (`events` must be on).
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
                bail!(
                    "the migration stream {}: {}",
                    ev.data["status"].as_str().unwrap_or("failed"),
                    info["error-desc"].as_str().unwrap_or("no reason given")
                );
            }
            _ => {}
        }
    }
}

pub(crate) fn migration_setup(qmp: &qemu::Qmp) -> Result<()> {
    let secs = Duration::from_secs;
    qmp.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
        secs(5),
    )?;
    // The default of 128 MiB/s makes a local save several times slower.
    qmp.execute(
        "migrate-set-parameters",
        json!({"max-bandwidth": 10u64 << 30}),
        secs(5),
    )?;
    Ok(())
}

/// Hyper-V's Save: pause, write memory and device state to `saved/state.vsv`, quit.
fn save(shared: &Shared) -> Result<u128> {
    let _op = shared.op.lock().unwrap_or_else(|p| p.into_inner());
    let t = Instant::now();
    let secs = Duration::from_secs;
    let file = shared.dir.join(SAVED_STATE);
    std::fs::create_dir_all(file.parent().expect("has a folder"))?;
    let tmp = file.with_extension("vsv.partial");
    let _ = std::fs::remove_file(&tmp);
    migration_setup(&shared.qmp)?;
    shared.set_state("saving")?;
    shared.qmp.execute("stop", Value::Null, secs(10))?;
    shared.qmp.drain_events();
    shared.qmp.execute(
        "migrate",
        json!({"uri": format!("exec:cat > {}", shell_quote(&tmp))}),
        secs(10),
    )?;
    wait_migration(&shared.qmp, secs(300))?;
    // QEMU does not sync what it wrote.
    File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &file)?;
    vm::fsutil::sync_dir_of(&file)?;
    {
        let mut r = shared.record.lock().unwrap_or_else(|p| p.into_inner());
        r.state = "saved".into();
    }
    let _ = shared.qmp.execute("quit", Value::Null, secs(5));
    if !shared.exited_within(secs(10))? {
        let _ = shared
            .child
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .kill();
    }
    Ok(t.elapsed().as_millis())
}

/// Loads `saved/state.vsv` into a QEMU started with `-incoming defer`, then runs it.
fn restore(qmp: &qemu::Qmp, file: &Path, child: &mut Child) -> Result<()> {
    migration_setup(qmp)?;
    qmp.execute(
        "migrate-incoming",
        json!({"uri": format!("exec:cat {}", shell_quote(file))}),
        Duration::from_secs(10),
    )?;
    if let Err(e) = wait_migration(qmp, Duration::from_secs(300)) {
        if let Some(st) = child.try_wait()? {
            bail!("QEMU exited with {st} while loading the saved state");
        }
        return Err(e);
    }
    // A state saved from a paused VM loads paused.
    qmp.execute("cont", Value::Null, Duration::from_secs(10))?;
    Ok(())
}
