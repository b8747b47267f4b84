//! The operation API: a [`Host`] over a store gives [`VmHandle`]s, whose operations do
//! the right thing whether the VM runs (a request to its worker) or not (the offline
//! [`vm::Vm`] operation). The CLI, the backups and the service call these.

use crate::control;
use crate::error::{Context, Error, Result};
use crate::info::{VmInfo, VmListEntry};
use crate::lifecycle::{self, WorkerLauncher};
use crate::protocol::{LiveStatus, Reply, Request, StopHow};
use crate::record::RunStatus;
use crate::run_state::{RunState, SAVED_STATE};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a front end waits for a live checkpoint operation (a delete's merges move
/// whole layers under the guest).
pub(crate) const LIVE_OP_TIMEOUT: Duration = Duration::from_secs(3600);

/// Reports the progress of long offline steps (merges, flattening): `(what, done, total)`.
pub type Progress = vm::vm::ProgressFn;

/// A progress reporter that reports nothing.
pub fn no_progress() -> Progress {
    Box::new(|_, _, _| {})
}

/// The VMs of one store, and what starts their workers.
#[derive(Clone, Debug)]
pub struct Host {
    store: vm::Store,
    launcher: Option<WorkerLauncher>,
}

impl Host {
    /// A host over `store`; VM workers run this process's program (see
    /// [`Host::with_launcher`]).
    pub fn open(store: vm::Store) -> Host {
        Host {
            store,
            launcher: None,
        }
    }

    /// Workers of VMs this host starts run through `launcher`.
    pub fn with_launcher(mut self, launcher: WorkerLauncher) -> Host {
        self.launcher = Some(launcher);
        self
    }

    /// The store.
    pub fn store(&self) -> &vm::Store {
        &self.store
    }

    /// A handle on VM `name` (nothing is read until an operation runs).
    pub fn vm(&self, name: &str) -> VmHandle<'_> {
        VmHandle {
            host: self,
            name: name.to_owned(),
        }
    }

    /// Creates a VM; a UEFI VM without a variable store template gets OVMF's.
    pub fn create_vm(&self, spec: &vm::NewVm) -> Result<VmHandle<'_>> {
        let mut spec = spec.clone();
        crate::machine::check_memory(spec.memory)
            .with_context(|| format!("cannot create VM \"{}\"", spec.name))?;
        if spec.firmware == vm::Firmware::Uefi && spec.uefi_vars_template.is_none() {
            spec.uefi_vars_template = Some(crate::machine::ovmf_paths().1);
        }
        self.store
            .create(&spec)
            .with_context(|| format!("cannot create VM \"{}\"", spec.name))?;
        Ok(self.vm(&spec.name))
    }

    /// Every VM of the store, in name order, with its run state.
    pub fn list(&self) -> Result<Vec<VmListEntry>> {
        Ok(self
            .store
            .list()?
            .into_iter()
            .map(|e| VmListEntry {
                run: RunStatus::read(&e.dir).state,
                name: e.name,
                dir: e.dir,
                state: e.state,
                unfinished: e.unfinished,
            })
            .collect())
    }

    /// Registers a VM folder: in place, or with `copy` as a new VM (new UUID and generation
    /// ID); `name` renames it. Returns its name.
    pub fn import(&self, dir: &Path, copy: bool, name: Option<&str>) -> Result<String> {
        self.store
            .import(dir, copy, name)
            .with_context(|| format!("cannot import {}", dir.display()))
    }

    fn launcher(&self) -> Result<WorkerLauncher> {
        match &self.launcher {
            Some(l) => Ok(l.clone()),
            None => WorkerLauncher::current_exe(),
        }
    }
}

/// What `start` asks for.
#[derive(Clone, Copy, Debug)]
pub struct StartOptions {
    /// The accelerator (default: [`crate::machine::default_accel`]).
    pub accel: Option<qemu::Accel>,
    /// How long to wait for the guest to run.
    pub timeout: Duration,
}

/// What `stop` asks for.
#[derive(Clone, Copy, Debug)]
pub struct StopOptions {
    /// Turn it off at once (no power button).
    pub force: bool,
    /// How long the guest gets to shut down before it is turned off.
    pub timeout: Duration,
}

/// What `stop` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// The VM was saved: its saved state is discarded and it is off (Hyper-V's "delete
    /// saved state").
    DiscardedSavedState,
    /// The VM ran and stopped this way.
    Stopped(StopHow),
    /// No worker ran: the VM's `failed` or `stopped-unexpectedly` state is cleared, and it
    /// is off (`vm stop --force`).
    Cleared(RunState),
}

/// Rewrites the worker's record of a VM no worker runs as `off` (the front end's one
/// write of it, under the VM's lock: the state a user cleared); the last error goes with it.
fn clear_record(dir: &Path) -> Result<()> {
    let Some(mut record) = RunStatus::read(dir).record else {
        return Ok(());
    };
    if record.state != RunState::Off {
        record.state = RunState::Off;
        record.error = None;
        record.qemu_pid = None;
        record.write(dir)?;
    }
    Ok(())
}

/// `vm status`: the run state with the worker's record, and what the worker sees of a
/// running guest.
#[derive(Clone, Debug)]
pub struct VmStatus {
    /// The run state and the record.
    pub run: RunStatus,
    /// The guest, when it runs and the worker answered.
    pub live: Option<LiveStatus>,
}

/// Changes `set` makes: a new name, settings and hardware.
#[derive(Clone, Debug, Default)]
pub struct VmChanges {
    /// Rename the VM (and its folder).
    pub new_name: Option<String>,
    /// Settings and hardware.
    pub settings: vm::Settings,
}

impl VmChanges {
    /// Whether only the checkpoint settings change (what a running VM takes).
    pub fn only_checkpoint_settings(&self) -> bool {
        let s = &self.settings;
        self.new_name.is_none() && s.memory.is_none() && s.cpus.is_none() && s.boot.is_none()
    }
}

/// What `export` did.
#[derive(Clone, Debug)]
pub struct Exported {
    /// For a running VM: the checkpoint the export was taken from (since deleted), with
    /// its consistency and how long the guest was paused and frozen.
    pub live: Option<crate::protocol::Capture>,
}

/// One VM of a [`Host`].
#[derive(Clone, Debug)]
pub struct VmHandle<'h> {
    pub(crate) host: &'h Host,
    pub(crate) name: String,
}

impl VmHandle<'_> {
    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn store(&self) -> &vm::Store {
        &self.host.store
    }

    /// The VM's folder, read from the store (an unfinished operation is finished first
    /// when nobody runs it).
    pub(crate) fn dir(&self) -> Result<PathBuf> {
        let (dir, _, _) = self
            .store()
            .read_vm(&self.name)
            .with_context(|| format!("cannot read VM \"{}\"", self.name))?;
        Ok(dir)
    }

    /// The VM's folder when its worker runs it (running or paused): then the worker does
    /// the operations that change it.
    pub(crate) fn live_dir(&self) -> Option<PathBuf> {
        let (dir, _, _) = self.store().read_vm(&self.name).ok()?;
        RunStatus::read(&dir).state.is_live().then_some(dir)
    }

    /// A paused VM's worker holds its lock as a running one's does, and the store's refusal
    /// says "running": say "paused" instead, with the same way out.
    fn refuse_paused(&self) -> Result<()> {
        let paused = self
            .store()
            .read_vm(&self.name)
            .is_ok_and(|(dir, _, _)| RunStatus::read(&dir).state == RunState::Paused);
        if paused {
            return Err(Error::Refused {
                kind: vhdx::ErrorKind::Busy,
                reason: format!(
                    "VM \"{}\" is paused; stop it first: `snapvisor vm stop {}`",
                    self.name,
                    disk::shell_quote(Path::new(&self.name))
                ),
            });
        }
        Ok(())
    }

    /// Opens the stopped VM for an operation named `what`; a saved VM is refused, since
    /// its saved memory belongs to its current disks.
    pub(crate) fn open_offline(&self, what: &str) -> Result<vm::Vm> {
        self.refuse_paused()?;
        if let Ok((dir, _, _)) = self.store().read_vm(&self.name)
            && RunStatus::read(&dir).state == RunState::Saved
        {
            return Err(Error::Saved {
                vm: self.name.clone(),
            });
        }
        self.store()
            .open_vm(&self.name, what)
            .with_context(|| format!("cannot open VM \"{}\"", self.name))
    }

    /// Sends a request to the running VM's worker.
    pub(crate) fn call(&self, dir: &Path, request: &Request, timeout: Duration) -> Result<Reply> {
        control::call(dir, request, timeout)
    }

    /// Fails unless the VM runs (or is paused); returns its folder.
    fn require_live(&self) -> Result<PathBuf> {
        let dir = self.dir()?;
        let state = RunStatus::read(&dir).state;
        if !state.is_live() {
            return Err(Error::NotRunning {
                vm: self.name.clone(),
                state,
            });
        }
        Ok(dir)
    }

    /// The VM's run state and its worker's record.
    pub fn run_status(&self) -> Result<RunStatus> {
        Ok(RunStatus::read(&self.dir()?))
    }

    /// The VM's configuration, disks and tree summary, with its run state.
    pub fn info(&self) -> Result<VmInfo> {
        let (dir, state, unfinished) = self
            .store()
            .read_vm(&self.name)
            .with_context(|| format!("cannot read VM \"{}\"", self.name))?;
        Ok(VmInfo::build(dir, state, unfinished))
    }

    /// The run state, and what the worker sees of a running guest.
    pub fn status(&self) -> Result<VmStatus> {
        let dir = self.dir()?;
        let run = RunStatus::read(&dir);
        let live = if run.state.is_live() {
            match self.call(&dir, &Request::Status, Duration::from_secs(15)) {
                Ok(Reply::Status(s)) => Some(s),
                _ => None,
            }
        } else {
            None
        };
        Ok(VmStatus { run, live })
    }

    /// Starts the VM: a detached worker serves its disks and runs QEMU; returns once the
    /// guest runs, with the worker's pid.
    pub fn start(&self, opts: StartOptions) -> Result<u32> {
        let dir = self.dir()?;
        let run = RunStatus::read(&dir);
        if run.state.is_up() {
            return Err(Error::AlreadyRunning {
                vm: self.name.clone(),
                state: run.state,
                pid: run.worker_pid().unwrap_or(0),
            });
        }
        if let Some(e) = crate::restore_marker::interrupted_restore(&dir, &self.name) {
            return Err(e);
        }
        // Before the worker takes an automatic checkpoint for a start that cannot happen.
        let (_, state, _) = self.store().read_vm(&self.name)?;
        crate::machine::check_memory(state.config.hardware.memory)
            .with_context(|| format!("VM \"{}\" did not start", self.name))?;
        crate::machine::find_qemu()
            .with_context(|| format!("VM \"{}\" did not start", self.name))?;
        let accel = opts.accel.unwrap_or_else(crate::machine::default_accel);
        lifecycle::start_worker(
            &self.host.launcher()?,
            self.store().root(),
            &dir,
            &self.name,
            accel,
            opts.timeout,
        )
    }

    /// Stops the VM and waits until its worker has exited (its disks closed and merged
    /// where a merge waited for the stop); a saved VM's state is discarded instead.
    pub fn stop(&self, opts: StopOptions) -> Result<Stopped> {
        let dir = self.dir()?;
        match RunStatus::read(&dir).state {
            RunState::Saved => {
                // Hyper-V's "delete saved state": the VM is off, as after a power loss.
                let _held = self.hold_stopped("vm stop")?;
                vm::fsutil::remove_file(&dir.join(SAVED_STATE))?;
                clear_record(&dir)?;
                return Ok(Stopped::DiscardedSavedState);
            }
            state @ (RunState::Failed | RunState::StoppedUnexpectedly) => {
                if !opts.force {
                    return Err(Error::NotRunningFailed {
                        vm: self.name.clone(),
                        state,
                    });
                }
                let _held = self.hold_stopped("vm stop --force")?;
                // Under the lock no worker can have started since the state was read.
                let state = RunStatus::read(&dir).state;
                if matches!(state, RunState::Failed | RunState::StoppedUnexpectedly) {
                    clear_record(&dir)?;
                    return Ok(Stopped::Cleared(state));
                }
            }
            _ => {}
        }
        let dir = self.require_live()?;
        Ok(Stopped::Stopped(self.stop_worker(&dir, opts)?))
    }

    /// Holds the VM's lock, which a running worker holds, so that none starts meanwhile.
    fn hold_stopped(&self, what: &str) -> Result<vm::Vm> {
        self.store()
            .open_vm(&self.name, what)
            .with_context(|| format!("cannot stop VM \"{}\"", self.name))
    }

    /// Stops a running VM's worker and waits for it to be gone.
    pub(crate) fn stop_worker(&self, dir: &Path, opts: StopOptions) -> Result<StopHow> {
        let request = Request::Stop {
            force: opts.force,
            timeout_secs: opts.timeout.as_secs(),
        };
        let reply = self.call(dir, &request, opts.timeout + Duration::from_secs(30));
        let how = match reply {
            Ok(Reply::Stopped { how }) => how,
            Ok(other) => return Err(control::unexpected(&request, &other)),
            // A worker whose QEMU exited may be gone before its reply is read: a stop too.
            Err(_) if lifecycle::worker_gone(dir) => StopHow::Stopped,
            Err(e) => return Err(e).context(format!("cannot stop VM \"{}\"", self.name)),
        };
        lifecycle::wait_worker_gone(
            dir,
            Duration::from_secs(3600),
            format!(
                "the worker of VM \"{}\" did not exit after QEMU stopped",
                self.name
            ),
        )?;
        Ok(how)
    }

    /// Saves the VM (Hyper-V's Save): memory and device state into the VM folder, QEMU
    /// exits; the next start resumes it. Returns how long the save took, in ms.
    pub fn save(&self) -> Result<u64> {
        let dir = self.require_live()?;
        let request = Request::Save;
        let ms = match self
            .call(&dir, &request, Duration::from_secs(330))
            .with_context(|| format!("cannot save VM \"{}\"", self.name))?
        {
            Reply::Saved { ms } => ms,
            other => return Err(control::unexpected(&request, &other)),
        };
        lifecycle::wait_worker_gone(
            &dir,
            Duration::from_secs(60),
            format!(
                "the worker of VM \"{}\" did not exit after saving",
                self.name
            ),
        )?;
        Ok(ms)
    }

    /// Pauses the guest's processors.
    pub fn pause(&self) -> Result<()> {
        self.simple(Request::Pause, "pause")
    }

    /// Resumes a paused guest.
    pub fn resume(&self) -> Result<()> {
        self.simple(Request::Resume, "resume")
    }

    fn simple(&self, request: Request, verb: &str) -> Result<()> {
        let dir = self.require_live()?;
        match self
            .call(&dir, &request, Duration::from_secs(30))
            .with_context(|| format!("cannot {verb} VM \"{}\"", self.name))?
        {
            Reply::Done => Ok(()),
            other => Err(control::unexpected(&request, &other)),
        }
    }

    /// Changes settings and hardware; returns the VM's name afterwards. A running VM takes
    /// checkpoint settings only (through its worker); its name and hardware wait for it
    /// to stop.
    pub fn set(&self, changes: &VmChanges) -> Result<String> {
        if let Some(dir) = self.live_dir() {
            if !changes.only_checkpoint_settings() {
                return Err(Error::RunningHardware {
                    vm: self.name.clone(),
                });
            }
            let s = &changes.settings;
            let request = Request::CheckpointSettings {
                checkpoint_type: s.checkpoint_type,
                max_checkpoints: s.max_checkpoints,
                automatic_checkpoints: s.automatic_checkpoints,
            };
            return match self
                .call(&dir, &request, Duration::from_secs(60))
                .with_context(|| format!("cannot change VM \"{}\"", self.name))?
            {
                Reply::Done => Ok(self.name.clone()),
                other => Err(control::unexpected(&request, &other)),
            };
        }
        let s = &changes.settings;
        if s.memory.is_some() || s.cpus.is_some() || s.boot.is_some() {
            if let Some(memory) = s.memory {
                crate::machine::check_memory(memory)
                    .with_context(|| format!("cannot change VM \"{}\"", self.name))?;
            }
            // A saved VM resumes on the hardware its memory was saved with.
            let (dir, _, _) = self
                .store()
                .read_vm(&self.name)
                .with_context(|| format!("cannot read VM \"{}\"", self.name))?;
            if RunStatus::read(&dir).state == RunState::Saved {
                return Err(Error::Saved {
                    vm: self.name.clone(),
                });
            }
        }
        let mut name = self.name.clone();
        if let Some(new) = &changes.new_name {
            self.store()
                .rename(&name, new)
                .with_context(|| format!("cannot rename VM \"{name}\""))?;
            name = new.clone();
        }
        let what = || format!("cannot change VM \"{name}\"");
        let mut vm = self.store().open_vm(&name, "vm set").with_context(what)?;
        vm.set(&changes.settings).with_context(what)?;
        Ok(name)
    }

    /// Deletes the VM with its files and checkpoints.
    pub fn delete(&self) -> Result<()> {
        self.refuse_paused()
            .with_context(|| format!("cannot delete VM \"{}\"", self.name))?;
        self.store()
            .delete(&self.name)
            .with_context(|| format!("cannot delete VM \"{}\"", self.name))
    }

    /// Copies the whole VM (config, disks, checkpoint tree) into a new folder. A running
    /// VM is exported live, as Hyper-V's `Export-VM` does: its worker takes a recovery
    /// checkpoint (frozen through the guest agent when it answers, else crash-consistent;
    /// never with memory), the export is built with that checkpoint as its Now, and the
    /// checkpoint is deleted again (merged away under the guest), whether the copy worked
    /// or not. The guest runs throughout but for the pause of the switch. An export killed
    /// half way leaves no folder at `dest`, and its recovery checkpoint is removed at the
    /// VM's next open.
    pub fn export(&self, dest: &Path) -> Result<Exported> {
        let what = || format!("cannot export VM \"{}\"", self.name);
        if let Some(dir) = self.live_dir() {
            return self.export_live(&dir, dest).with_context(what);
        }
        self.store().export(&self.name, dest).with_context(what)?;
        Ok(Exported { live: None })
    }

    fn export_live(&self, dir: &Path, dest: &Path) -> Result<Exported> {
        // Refused before the guest is paused for nothing.
        self.store().check_export_destination(dest)?;
        if std::fs::read_dir(dest).is_ok_and(|mut d| d.next().is_some()) {
            return Err(vm::Error::InvalidArgument(format!(
                "{} exists and is not empty; name a new folder",
                dest.display()
            ))
            .into());
        }
        // As a backup's: if this process dies, the worker removes the checkpoint before the
        // next recovery checkpoint (`crate::lease`), or the next open does.
        let lease = crate::lease::Lease::take(&dir.join(crate::run_state::RUN_DIR))?;
        let request = Request::RecoveryCheckpoint {
            name: format!(
                "export ({})",
                vm::fsutil::format_time(vm::fsutil::now_unix())
            ),
            quiesce: crate::protocol::Quiesce::Try,
            memory: false,
            lease: Some(lease.name().to_owned()),
        };
        let capture = match self
            .call(dir, &request, LIVE_OP_TIMEOUT)
            .context("the running VM did not take a checkpoint to export from")?
        {
            Reply::CheckpointTaken(c) => c,
            other => return Err(control::unexpected(&request, &other)),
        };
        vm::fsutil::crashpoint("vm export: recovery checkpoint taken");
        let copied = self.store().export_running(&self.name, dest, capture.id);
        let deleted = self.delete_checkpoint(&capture.id.to_string(), false, crate::no_progress());
        if deleted.is_ok() {
            lease.release();
        }
        copied?;
        if let Err(e) = deleted {
            tracing::warn!(
                "VM \"{}\" is exported, but its checkpoint {} could not be deleted (delete it with `snapvisor checkpoint delete`): {}",
                self.name,
                capture.id,
                e.chain()
            );
        }
        Ok(Exported {
            live: Some(capture),
        })
    }

    /// Merges every layer that can be merged; lists files nothing refers to.
    pub fn consolidate(&self, progress: Progress) -> Result<vm::ConsolidateReport> {
        let what = || format!("cannot consolidate VM \"{}\"", self.name);
        self.refuse_paused().with_context(what)?;
        let mut vm = self
            .store()
            .open_vm(&self.name, "vm consolidate")
            .with_context(what)?;
        vm.set_progress(progress);
        vm.consolidate().with_context(what)
    }
}
