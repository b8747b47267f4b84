//! Checkpoint operations of a [`VmHandle`]: each written once, running the offline
//! [`vm::Vm`] operation for a stopped VM and asking the worker of a running one.

use crate::control;
use crate::error::{Context, Result};
use crate::host::{LIVE_OP_TIMEOUT, Progress, StartOptions, StopOptions, VmHandle};
use crate::info::{CheckpointInfo, CheckpointTree};
use crate::protocol::{Capture, LiveDelete, Reply, Request};
use crate::record::RunStatus;
use crate::run_state::{RunState, SAVED_STATE};
use std::path::Path;
use std::time::Duration;
use uuid::Uuid;
use vm::Reconciled;

/// A checkpoint taken.
#[derive(Clone, Debug)]
pub struct Checkpointed {
    /// The checkpoint, as the tree now records it.
    pub checkpoint: CheckpointInfo,
    /// For a running VM: what the worker captured and measured.
    pub capture: Option<Capture>,
}

/// A checkpoint (or subtree) deleted.
#[derive(Clone, Debug)]
pub struct Deleted {
    /// The checkpoint.
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// How many checkpoints went.
    pub checkpoints_removed: usize,
    /// Layers merged or removed; `failed` names a merge that failed and stays to do.
    pub reconciled: Reconciled,
    /// For a running VM: the merges under the guest.
    pub live: Option<LiveDelete>,
}

/// What `apply` asks for.
#[derive(Clone, Debug)]
pub struct ApplyOptions {
    /// Checkpoint the current state first instead of discarding it.
    pub save_current: bool,
    /// Start the VM afterwards (a VM that was running and comes back saved starts again
    /// in any case).
    pub start: bool,
    /// The accelerator for that start (default: the one it last ran with).
    pub accel: Option<qemu::Accel>,
}

/// A checkpoint applied.
#[derive(Clone, Debug)]
pub struct Applied {
    /// The checkpoint.
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// The checkpoint of the current state taken first (`save_current`), with its name.
    pub saved_current: Option<(Uuid, String)>,
    /// The VM's new generation ID.
    pub generation_id: Uuid,
    /// Layers merged or removed afterwards.
    pub reconciled: Reconciled,
    /// The run state afterwards.
    pub run: RunState,
}

impl VmHandle<'_> {
    /// The checkpoint tree.
    pub fn checkpoints(&self) -> Result<CheckpointTree> {
        let (dir, state, unfinished) = self
            .store()
            .read_vm(&self.name)
            .with_context(|| format!("cannot read VM \"{}\"", self.name))?;
        Ok(CheckpointTree::build(&dir, &state, unfinished))
    }

    /// Takes a checkpoint named `name` (default: `VM (YYYY-MM-DD hh:mm:ss)`): of the VM
    /// off, or through the worker of the running VM (by its checkpoint type).
    pub fn checkpoint(&self, name: Option<&str>) -> Result<Checkpointed> {
        let what = || format!("cannot checkpoint VM \"{}\"", self.name);
        if let Some(dir) = self.live_dir() {
            let capture = self.take_live(&dir, name).with_context(what)?;
            let (dir, state, _) = self.store().read_vm(&self.name)?;
            let c = state
                .checkpoint(capture.id)
                .ok_or_else(|| vm::Error::Corrupt {
                    path: dir.join(vm::journal::STATE_FILE),
                    reason: "the worker's checkpoint is not in the tree".into(),
                })?;
            return Ok(Checkpointed {
                checkpoint: CheckpointInfo::build(&dir, &state, c),
                capture: Some(capture),
            });
        }
        let mut vm = self.open_offline("checkpoint create")?;
        let id = vm.create_checkpoint(name).with_context(what)?;
        let state = vm.state();
        let c = state.checkpoint(id).expect("just taken");
        Ok(Checkpointed {
            checkpoint: CheckpointInfo::build(vm.dir(), state, c),
            capture: None,
        })
    }

    fn take_live(&self, dir: &Path, name: Option<&str>) -> Result<Capture> {
        let request = Request::CheckpointCreate {
            name: name.map(str::to_owned),
        };
        match self.live_call(dir, &request)? {
            Reply::CheckpointTaken(c) => Ok(c),
            other => Err(control::unexpected(&request, &other)),
        }
    }

    /// A checkpoint request to the running VM's worker.
    fn live_call(&self, dir: &Path, request: &Request) -> Result<Reply> {
        // The worker's refusals that name the VM say it all; the caller's step names the
        // VM for the others.
        self.call(dir, request, LIVE_OP_TIMEOUT).map_err(|e| {
            if crate::error::names_vm(&e.to_string(), &self.name) {
                e
            } else {
                crate::Error::Step {
                    what: "the running VM refused".into(),
                    source: Box::new(e),
                }
            }
        })
    }

    /// Deletes a checkpoint (or, with `subtree`, it and everything below it); the layers
    /// it leaves merge (under the guest, for a running VM).
    pub fn delete_checkpoint(
        &self,
        query: &str,
        subtree: bool,
        progress: Progress,
    ) -> Result<Deleted> {
        let what = || format!("cannot delete \"{query}\" of VM \"{}\"", self.name);
        if let Some(dir) = self.live_dir() {
            let request = Request::CheckpointDelete {
                checkpoint: query.to_owned(),
                subtree,
            };
            return match self.live_call(&dir, &request).with_context(what)? {
                Reply::CheckpointDeleted(d) => Ok(Deleted {
                    id: d.deleted,
                    name: d.name.clone(),
                    checkpoints_removed: d.checkpoints_removed,
                    reconciled: d.reconciled.clone(),
                    live: Some(d),
                }),
                other => Err(control::unexpected(&request, &other)),
            };
        }
        let mut vm = self.open_offline("checkpoint delete")?;
        let id = vm.find_checkpoint(query)?;
        let name = vm.state().checkpoint(id).expect("found").name.clone();
        let checkpoints_removed = if subtree {
            vm.state().subtree(id).len()
        } else {
            1
        };
        vm.set_progress(progress);
        let reconciled = vm.delete_checkpoint(query, subtree).with_context(what)?;
        Ok(Deleted {
            id,
            name,
            checkpoints_removed,
            reconciled,
            live: None,
        })
    }

    /// Renames a checkpoint; returns its id.
    pub fn rename_checkpoint(&self, query: &str, new_name: &str) -> Result<Uuid> {
        let what = || format!("cannot rename \"{query}\" of VM \"{}\"", self.name);
        if let Some(dir) = self.live_dir() {
            let request = Request::CheckpointRename {
                checkpoint: query.to_owned(),
                new_name: new_name.to_owned(),
            };
            return match self.live_call(&dir, &request).with_context(what)? {
                Reply::CheckpointRenamed { id } => Ok(id),
                other => Err(control::unexpected(&request, &other)),
            };
        }
        let mut vm = self.open_offline("checkpoint rename")?;
        vm.rename_checkpoint(query, new_name).with_context(what)
    }

    /// Writes a standalone VM folder at `dest` as of a checkpoint (disks flattened);
    /// returns the checkpoint's id.
    pub fn export_checkpoint(&self, query: &str, dest: &Path, progress: Progress) -> Result<Uuid> {
        let what = || format!("cannot export \"{query}\" of VM \"{}\"", self.name);
        self.store()
            .check_export_destination(dest)
            .with_context(what)?;
        if let Some(dir) = self.live_dir() {
            let request = Request::CheckpointExport {
                checkpoint: query.to_owned(),
                dir: std::path::absolute(dest).map_err(|e| crate::Error::io(dest, e))?,
            };
            return match self.live_call(&dir, &request).with_context(what)? {
                Reply::CheckpointExported { id } => Ok(id),
                other => Err(control::unexpected(&request, &other)),
            };
        }
        let mut vm = self.open_offline("checkpoint export")?;
        vm.set_progress(progress);
        vm.export_checkpoint(query, dest).with_context(what)
    }

    /// Applies a checkpoint. A running VM's current state is discarded as Hyper-V does
    /// (the VM is turned off; with `save_current` it is checkpointed live first), then the
    /// checkpoint is applied as for a stopped VM. A checkpoint with memory leaves the VM
    /// saved as of the checkpoint; a VM that was running is started again, so it comes
    /// back running from the checkpoint's instant. `start` starts it in every case.
    pub fn apply(&self, query: &str, opts: &ApplyOptions, progress: Progress) -> Result<Applied> {
        let mut was_running = None;
        let mut saved_live = None;
        let last_accel = |dir: &Path| RunStatus::read(dir).record.and_then(|r| r.accel());
        if let Some(dir) = self.live_dir() {
            // A typo must not turn the VM off.
            let (_, s, _) = self.store().read_vm(&self.name)?;
            vm::vm::find_checkpoint(&s, query)?;
            if opts.save_current {
                let capture = self.take_live(&dir, None).with_context(|| {
                    format!("cannot save the current state of VM \"{}\"", self.name)
                })?;
                saved_live = Some(capture.id);
            }
            let accel = last_accel(&dir);
            self.stop_worker(
                &dir,
                StopOptions {
                    force: true,
                    timeout: Duration::from_secs(10),
                },
            )
            .with_context(|| format!("cannot turn VM \"{}\" off to apply", self.name))?;
            was_running = Some(accel);
        }
        let mut vm = self.open_offline("checkpoint apply")?;
        let target = vm.find_checkpoint(query)?;
        let saved = vm
            .apply(query, opts.save_current && saved_live.is_none())
            .with_context(|| format!("cannot apply \"{query}\" to VM \"{}\"", self.name))?
            .or(saved_live);
        vm.set_progress(progress);
        let reconciled = vm.reconcile();
        let state = vm.state().clone();
        let dir = vm.dir().to_owned();
        drop(vm);
        let name = state.checkpoint(target).expect("applied").name.clone();
        let start = opts.start || (was_running.is_some() && dir.join(SAVED_STATE).exists());
        if start {
            let accel = opts
                .accel
                .or(was_running.flatten())
                .or_else(|| last_accel(&dir));
            self.start(StartOptions {
                accel,
                timeout: Duration::from_secs(120),
            })
            .with_context(|| {
                format!("applied \"{name}\", but VM \"{}\" did not start", self.name)
            })?;
        }
        Ok(Applied {
            id: target,
            name,
            saved_current: saved.map(|id| {
                let name = state.checkpoint(id).map(|c| c.name.clone());
                (id, name.unwrap_or_default())
            }),
            generation_id: state.config.generation_id,
            reconciled,
            run: RunStatus::read(&dir).state,
        })
    }
}
