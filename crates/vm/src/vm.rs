//! An open VM: its folder locked, its state recovered, and the checkpoint operations.

use crate::config::{
    CheckpointType, DirectBoot, VmConfig, validate_checkpoint_name, validate_settings,
};
use crate::error::{Error, Result};
use crate::fsutil::{self, crashpoint};
use crate::journal::{
    CHECKPOINT_CONFIG_FILE, CHECKPOINT_MEMORY_FILE, CHECKPOINT_NVRAM_FILE, CHECKPOINTS_DIR,
    DISKS_DIR, Direction, FIRMWARE_DIR, JOURNAL_FILE, Journal, SAVED_STATE_FILE, STATE_FILE, Step,
};
use crate::lock::Lock;
use crate::state::{Checkpoint, CheckpointKind, Consistency, Layer, VmState};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use uuid::Uuid;

/// Reports progress of long steps: `(what, done, total)`.
pub type ProgressFn = Box<dyn FnMut(&str, u64, u64) + Send>;

/// A VM opened for changes: its lock is held until the handle is dropped.
pub struct Vm {
    dir: PathBuf,
    state: VmState,
    progress: ProgressFn,
    /// What the reconciliation at open did (reported by `consolidate`).
    pub(crate) reconciled_at_open: Reconciled,
    /// The VM runs: the layers of Now's chains are open in its worker, so reconciliation
    /// leaves them alone until it stops.
    live: bool,
    _lock: Lock,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm").field("dir", &self.dir).finish()
    }
}

/// A layer merge that reconciliation performed.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MergeDone {
    /// The layer that was merged away.
    pub removed: String,
    /// The layer that now holds the data.
    pub into: String,
    /// Which way the data moved.
    pub direction: Direction,
}

/// What reconciliation did after an operation.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reconciled {
    /// Merges done.
    pub merged: Vec<MergeDone>,
    /// Layers removed because nothing depended on them.
    pub removed: Vec<String>,
    /// A merge that failed (and stays to do), with the reason.
    pub failed: Option<String>,
}

/// A merge planned and journaled but not yet run ([`Vm::plan_merge`]).
#[derive(Debug)]
pub struct PlannedMerge {
    journal: Journal,
    /// What the merge does.
    pub done: MergeDone,
}

impl PlannedMerge {
    /// What names its journal in progress records ([`crate::journal::record_merge_progress`]).
    pub fn token(&self) -> String {
        self.journal.token()
    }
}

/// What a running VM's worker captured for a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Taken {
    /// Production (no memory) or standard.
    pub kind: CheckpointKind,
    /// What was achieved.
    pub consistency: Consistency,
    /// Whether the memory and device state will be kept.
    pub has_memory: bool,
}

/// A live checkpoint prepared by [`Vm::prepare_checkpoint`] and not yet committed.
#[derive(Debug)]
#[must_use = "a prepared take is committed or abandoned"]
pub struct PreparedTake {
    id: Uuid,
    journal: Journal,
}

impl PreparedTake {
    /// The checkpoint's id.
    pub fn id(&self) -> Uuid {
        self.id
    }
}

/// What `vm consolidate` found.
#[derive(Clone, Debug, Default)]
pub struct ConsolidateReport {
    /// What was merged or removed.
    pub reconciled: Reconciled,
    /// Files in the VM folder that nothing refers to (never deleted).
    pub unreferenced: Vec<PathBuf>,
    /// Hidden layers that stay because two or more layers depend on them.
    pub hidden: Vec<(String, usize)>,
}

/// Changes `vm set` makes; `None` leaves a value as it is.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    /// Memory in bytes.
    pub memory: Option<u64>,
    /// Virtual processors.
    pub cpus: Option<u32>,
    /// Direct kernel boot (`Some(None)` removes it).
    pub boot: Option<Option<DirectBoot>>,
    /// Checkpoint type.
    pub checkpoint_type: Option<CheckpointType>,
    /// Checkpoint limit.
    pub max_checkpoints: Option<u32>,
    /// Automatic checkpoints.
    pub automatic_checkpoints: Option<bool>,
}

impl Vm {
    /// Locks the VM folder `dir`, finishes any unfinished operation, and reconciles layers.
    pub(crate) fn open(dir: &Path, what: &str, wait: std::time::Duration) -> Result<Vm> {
        let name = fsutil::folder_name(dir);
        if !dir.join(STATE_FILE).exists() {
            return Err(Error::Corrupt {
                path: dir.join(STATE_FILE),
                reason: "missing: this folder is not a VM (or its state file was lost)".into(),
            });
        }
        let lock = Lock::acquire(dir, &name, what, wait)?;
        let mut progress: ProgressFn = Box::new(|_, _, _| {});
        recover(dir, &name, &mut progress)?;
        let state = VmState::load(&dir.join(STATE_FILE))?;
        let mut vm = Vm {
            dir: dir.to_owned(),
            state,
            progress,
            reconciled_at_open: Reconciled::default(),
            live: false,
            _lock: lock,
        };
        vm.drop_interrupted_memory_checkpoints()?;
        vm.drop_stale_recovery_checkpoints()?;
        if vm.state.config.name != name {
            // A rename stopped between renaming the folder and recording the new name.
            let mut next = vm.next_state();
            next.config.name = name;
            vm.commit(next)?;
        }
        Ok(vm)
    }

    /// Marks the VM as running (its worker has Now's chains open) or stopped.
    pub fn set_live(&mut self, live: bool) {
        self.live = live;
    }

    /// The layers of Now's chains: Now's layer of each disk and all their ancestors.
    pub fn now_chain_layers(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for top in &self.state.now.disks {
            let mut at = Some(top.clone());
            while let Some(l) = at {
                at = self.state.layers.get(&l).and_then(|x| x.parent.clone());
                out.insert(l);
            }
        }
        out
    }

    /// Where a checkpoint keeps its memory and device state.
    pub fn memory_path(&self, id: Uuid) -> PathBuf {
        self.dir
            .join(CHECKPOINTS_DIR)
            .join(id.to_string())
            .join(CHECKPOINT_MEMORY_FILE)
    }

    /// A checkpoint whose memory was still being written when its worker died claims
    /// memory it does not have: it is removed, so the tree is as before it was taken
    /// (Now's data is untouched; its layer merges with the one the checkpoint left).
    fn drop_interrupted_memory_checkpoints(&mut self) -> Result<()> {
        let broken: Vec<Uuid> = self
            .state
            .checkpoints
            .iter()
            .filter(|c| c.has_memory && !self.memory_path(c.id).exists())
            .map(|c| c.id)
            .collect();
        for id in broken {
            tracing::warn!(
                "checkpoint {id} of {} lost its memory while it was being written; removing it",
                self.name()
            );
            self.remove_node(id, false, "checkpoint create (interrupted)")?;
        }
        Ok(())
    }

    /// A recovery checkpoint lives only while the backup that took it copies from the
    /// running VM's worker, which holds the VM's lock meanwhile: one found at an open was
    /// left by a backup or a worker that died, and is removed (its layer merges away).
    fn drop_stale_recovery_checkpoints(&mut self) -> Result<()> {
        let stale: Vec<Uuid> = self
            .state
            .checkpoints
            .iter()
            .filter(|c| c.kind == CheckpointKind::Recovery)
            .map(|c| c.id)
            .collect();
        for id in stale {
            tracing::warn!(
                "removing the recovery checkpoint {id} of {}, left by a backup that did not finish",
                self.name()
            );
            self.remove_node(id, false, "backup create (interrupted)")?;
        }
        Ok(())
    }

    /// Gives the VM a new generation ID, for when its disks went back in time outside an
    /// apply (a backup restored in place); returns it.
    pub fn renew_generation_id(&mut self) -> Result<Uuid> {
        let mut next = self.next_state();
        next.config.generation_id = Uuid::new_v4();
        let id = next.config.generation_id;
        self.commit(next)?;
        Ok(id)
    }

    /// Sets the progress reporter for merges.
    pub fn set_progress(&mut self, progress: ProgressFn) {
        self.progress = progress;
    }

    /// The VM folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.state.config.name
    }

    /// The committed state.
    pub fn state(&self) -> &VmState {
        &self.state
    }

    /// Path of a layer file.
    pub fn layer_path(&self, file: &str) -> PathBuf {
        self.dir.join(DISKS_DIR).join(file)
    }

    /// Finds a checkpoint by exact name, then by id or unique id prefix (8+ characters).
    pub fn find_checkpoint(&self, query: &str) -> Result<Uuid> {
        find_checkpoint(&self.state, query)
    }

    /// The config saved with a checkpoint.
    pub fn checkpoint_config(&self, id: Uuid) -> Result<VmConfig> {
        read_checkpoint_config(&self.dir, id)
    }

    /// Takes a checkpoint of the (stopped) VM: every disk's current layer becomes the
    /// checkpoint's, read-only, and a new differencing child becomes current.
    pub fn create_checkpoint(&mut self, name: Option<&str>) -> Result<Uuid> {
        self.create_checkpoint_taken(name, None)
    }

    /// Fails the way [`Vm::create_checkpoint`] would before anything is captured: the
    /// type is `disabled` or the limit is reached.
    pub fn check_can_take(&self) -> Result<()> {
        let config = &self.state.config;
        if config.checkpoint_type == CheckpointType::Disabled {
            return Err(Error::CheckpointsDisabled(config.name.clone()));
        }
        self.check_limit(1)
    }

    /// Takes a checkpoint of what a running VM's worker captured: `taken` says what kind
    /// it is and the consistency it achieved (`None`: the VM is off). The worker pauses
    /// the guest and closes Now's layers around this call; a checkpoint with memory gets
    /// its memory file afterwards ([`Vm::memory_path`]).
    pub fn create_checkpoint_taken(
        &mut self,
        name: Option<&str>,
        taken: Option<Taken>,
    ) -> Result<Uuid> {
        self.verify_layers(&self.state.now.disks.clone())?;
        let (id, journal) = self.plan_take(name, taken)?;
        self.run(journal)?;
        Ok(id)
    }

    /// Checks that a checkpoint may be taken and plans it: its id and its journal, ending
    /// with the commit.
    fn plan_take(&self, name: Option<&str>, taken: Option<Taken>) -> Result<(Uuid, Journal)> {
        let config = &self.state.config;
        if taken.is_none_or(|t| t.kind != CheckpointKind::Recovery) {
            if config.checkpoint_type == CheckpointType::Disabled {
                return Err(Error::CheckpointsDisabled(config.name.clone()));
            }
            self.check_limit(1)?;
        }
        let name = match name {
            Some(n) => n.to_owned(),
            None => default_checkpoint_name(&config.name),
        };
        validate_checkpoint_name(&name)?;
        let mut next = self.next_state();
        let mut journal = Journal::new(format!("checkpoint create {name:?}"));
        let id = self.take_into(&mut next, &mut journal, name, taken)?;
        journal.steps.push(Step::Commit {
            state: Box::new(next),
        });
        Ok((id, journal))
    }

    /// Prepares a checkpoint of Now while a running VM's guest goes on writing (the caller,
    /// its worker, serves Now's layers): writes the take's journal as tentative, the
    /// checkpoint's config and firmware copy, and has `create_child(i, path)` create disk
    /// `i`'s new layer at `path` as a child of Now's (from the open file, whose
    /// DataWriteGuid it must settle first). Only [`Vm::commit_prepared`], with the guest
    /// paused and the layers closed, is the checkpoint's instant; until then it can be
    /// abandoned ([`Vm::abandon_prepared`]), and a worker that dies before it leaves
    /// nothing taken (the next open undoes the journal).
    pub fn prepare_checkpoint(
        &mut self,
        name: Option<&str>,
        taken: Taken,
        create_child: &mut dyn FnMut(usize, &Path) -> Result<()>,
    ) -> Result<PreparedTake> {
        let (id, mut journal) = self.plan_take(name, Some(taken))?;
        journal.tentative = true;
        journal.write(&self.dir)?;
        let mut disk = 0;
        for step in &journal.steps {
            let done = match step {
                Step::Commit { .. } => break,
                Step::CreateChild { file, .. } => {
                    let path = self.layer_path(file);
                    disk += 1;
                    create_child(disk - 1, &path)
                }
                _ => journal.run_one(&self.dir, step, &mut *self.progress),
            };
            if let Err(e) = done {
                return Err(fail_uncommitted(&self.dir, &journal, e));
            }
        }
        crashpoint("checkpoint prepared");
        Ok(PreparedTake { id, journal })
    }

    /// Commits a prepared take (the guest paused, its disks closed): from here on the
    /// checkpoint exists. A failure before `vm.json` is written undoes the take.
    pub fn commit_prepared(&mut self, take: &PreparedTake) -> Result<Uuid> {
        let Some(step @ Step::Commit { state }) = take.journal.steps.last() else {
            unreachable!("a prepared take ends with its commit");
        };
        if state.seq != self.state.seq + 1 {
            // Its plan was made from a state another operation has since replaced: the
            // caller must keep such operations out between prepare and commit.
            let e = Error::Busy {
                vm: self.state.config.name.clone(),
                holder: "another operation changed the VM while the checkpoint was prepared".into(),
            };
            if let Err(u) = undo_steps(&self.dir, &take.journal) {
                tracing::warn!("undoing {}: {u}", take.journal.op);
            }
            if Journal::load(&self.dir).ok().flatten().as_ref() == Some(&take.journal) {
                fsutil::remove_file(&self.dir.join(JOURNAL_FILE))?;
            }
            return Err(e);
        }
        if let Err(e) = take.journal.run_one(&self.dir, step, &mut *self.progress) {
            let e = fail_uncommitted(&self.dir, &take.journal, e);
            if Journal::load(&self.dir).ok().flatten().is_some() {
                if reached_commit(&self.dir, &take.journal) {
                    // Now is the new layers, whatever failed after `vm.json`.
                    self.state = (**state).clone();
                }
                return Err(Error::Unfinished {
                    vm: self.state.config.name.clone(),
                    op: take.journal.op.clone(),
                    source: Box::new(e),
                });
            }
            return Err(e);
        }
        self.state = (**state).clone();
        Ok(take.id)
    }

    /// Removes a committed take's journal (once the guest runs again).
    pub fn finish_prepared(&mut self, take: PreparedTake) -> Result<()> {
        take.journal
            .replay_after_commit(&self.dir, &mut *self.progress)
    }

    /// Undoes a prepared take that will not be committed; one whose commit reached
    /// `vm.json` is finished instead (the checkpoint exists).
    pub fn abandon_prepared(&mut self, take: PreparedTake) -> Result<()> {
        if Journal::load(&self.dir)?.as_ref() != Some(&take.journal) {
            // Undone already (by a commit that failed or was refused), or finished.
            return Ok(());
        }
        if reached_commit(&self.dir, &take.journal) {
            return self.finish_prepared(take);
        }
        undo_uncommitted(&self.dir, &take.journal)
    }

    /// Plans a checkpoint of Now into `next`: Now's layers go to a new checkpoint node and
    /// new children of them become Now's.
    fn take_into(
        &self,
        next: &mut VmState,
        journal: &mut Journal,
        name: String,
        taken: Option<Taken>,
    ) -> Result<Uuid> {
        let id = Uuid::new_v4();
        let taken = taken.unwrap_or(Taken {
            kind: match next.config.checkpoint_type {
                CheckpointType::Standard => CheckpointKind::Standard,
                _ => CheckpointKind::Production,
            },
            consistency: Consistency::VmOff,
            has_memory: false,
        });
        journal.steps.push(Step::WriteCheckpointConfig {
            id,
            config: Box::new(next.config.clone()),
        });
        push_nvram_copy(journal, next, id);
        next.checkpoints.push(Checkpoint {
            id,
            name,
            parent: next.now.parent,
            created: fsutil::now_unix(),
            kind: taken.kind,
            consistency: taken.consistency,
            has_memory: taken.has_memory,
            disks: next.now.disks.clone(),
        });
        let mut new_disks = Vec::new();
        for (i, parent) in next.now.disks.iter().enumerate() {
            let disk = next.config.hardware.disks[i].name.clone();
            let file = self.new_layer_name(&disk, next);
            journal.steps.push(Step::CreateChild {
                file: file.clone(),
                parent: parent.clone(),
            });
            next.layers.insert(
                file.clone(),
                Layer {
                    disk,
                    parent: Some(parent.clone()),
                },
            );
            new_disks.push(file);
        }
        next.now.disks = new_disks;
        next.now.parent = Some(id);
        Ok(id)
    }

    /// Applies a checkpoint: Now's layers are discarded (or kept as a new checkpoint with
    /// `save_current`), new children of the checkpoint's layers become Now's, its hardware
    /// config comes back, and the generation ID changes. Returns the saved checkpoint's id.
    pub fn apply(&mut self, query: &str, save_current: bool) -> Result<Option<Uuid>> {
        let target_id = self.find_checkpoint(query)?;
        let target = self.state.checkpoint(target_id).expect("found").clone();
        let target_config = self.checkpoint_config(target_id)?;
        if target_config.hardware.disks.len() != target.disks.len() {
            return Err(Error::Corrupt {
                path: self.checkpoint_config_path(target_id),
                reason: format!(
                    "the config names {} disks but the checkpoint holds {} layers",
                    target_config.hardware.disks.len(),
                    target.disks.len()
                ),
            });
        }
        self.verify_layers(&target.disks)?;
        let mut next = self.next_state();
        let mut journal = Journal::new(format!("checkpoint apply {:?}", target.name));
        let saved = if save_current {
            if next.config.checkpoint_type == CheckpointType::Disabled {
                return Err(Error::CheckpointsDisabled(next.config.name.clone()));
            }
            self.check_limit(1)?;
            let name = default_checkpoint_name(&next.config.name);
            let id = Uuid::new_v4();
            journal.steps.push(Step::WriteCheckpointConfig {
                id,
                config: Box::new(next.config.clone()),
            });
            push_nvram_copy(&mut journal, &next, id);
            next.checkpoints.push(Checkpoint {
                id,
                name,
                parent: next.now.parent,
                created: fsutil::now_unix(),
                kind: match next.config.checkpoint_type {
                    CheckpointType::Standard => CheckpointKind::Standard,
                    _ => CheckpointKind::Production,
                },
                consistency: Consistency::VmOff,
                has_memory: false,
                disks: next.now.disks.clone(),
            });
            Some(id)
        } else {
            None
        };
        let mut new_disks = Vec::new();
        for (i, parent) in target.disks.iter().enumerate() {
            let disk = target_config.hardware.disks[i].name.clone();
            let file = self.new_layer_name(&disk, &next);
            journal.steps.push(Step::CreateChild {
                file: file.clone(),
                parent: parent.clone(),
            });
            next.layers.insert(
                file.clone(),
                Layer {
                    disk,
                    parent: Some(parent.clone()),
                },
            );
            new_disks.push(file);
        }
        // The checkpoint's UEFI variables come back as a new file, so that Now's old one
        // stays intact until the commit.
        let old_nvram = next.now.nvram.clone();
        let new_nvram = match target_config.hardware.firmware {
            crate::config::Firmware::Uefi => {
                let file = format!("vars_{}.fd", &Uuid::new_v4().simple().to_string()[..12]);
                journal.steps.push(Step::CopyFile {
                    from: format!("{CHECKPOINTS_DIR}/{target_id}/{CHECKPOINT_NVRAM_FILE}"),
                    to: format!("{FIRMWARE_DIR}/{file}"),
                });
                Some(file)
            }
            crate::config::Firmware::Bios => None,
        };
        next.now = crate::state::Now {
            parent: Some(target_id),
            disks: new_disks,
            nvram: new_nvram,
        };
        if target.has_memory {
            // The VM comes back saved, as of the checkpoint: its next start resumes there.
            journal.steps.push(Step::LinkFile {
                from: format!("{CHECKPOINTS_DIR}/{target_id}/{CHECKPOINT_MEMORY_FILE}"),
                to: SAVED_STATE_FILE.to_owned(),
            });
        }
        next.config.hardware = target_config.hardware;
        next.config.generation_id = Uuid::new_v4();
        journal.steps.push(Step::Commit {
            state: Box::new(next),
        });
        if let Some(old) = old_nvram {
            journal.steps.push(Step::RemoveFile {
                path: format!("{FIRMWARE_DIR}/{old}"),
            });
        }
        self.run(journal)?;
        Ok(saved)
    }

    /// Deletes a checkpoint (or, with `subtree`, it and everything below it). The tree
    /// changes at once; the layers left without a user are merged or removed afterwards.
    pub fn delete_checkpoint(&mut self, query: &str, subtree: bool) -> Result<Reconciled> {
        let id = self.find_checkpoint(query)?;
        let what = if subtree {
            "checkpoint delete --subtree"
        } else {
            "checkpoint delete"
        };
        self.remove_node(id, subtree, what)?;
        Ok(self.reconcile())
    }

    /// Takes a checkpoint (or its subtree) out of the tree; its children move to its parent.
    fn remove_node(&mut self, id: Uuid, subtree: bool, what: &str) -> Result<()> {
        let node = self.state.checkpoint(id).expect("found").clone();
        let removed: BTreeSet<Uuid> = if subtree {
            self.state.subtree(id).into_iter().collect()
        } else {
            [id].into()
        };
        let mut next = self.next_state();
        next.checkpoints.retain(|c| !removed.contains(&c.id));
        for c in &mut next.checkpoints {
            if c.parent.is_some_and(|p| removed.contains(&p)) {
                c.parent = node.parent;
            }
        }
        if next.now.parent.is_some_and(|p| removed.contains(&p)) {
            next.now.parent = node.parent;
        }
        let mut journal = Journal::new(format!("{what} {:?}", node.name));
        journal.steps.push(Step::Commit {
            state: Box::new(next),
        });
        for r in &removed {
            journal.steps.push(Step::RemoveCheckpointDir { id: *r });
        }
        self.run(journal)
    }

    /// Renames a checkpoint.
    pub fn rename_checkpoint(&mut self, query: &str, new_name: &str) -> Result<Uuid> {
        validate_checkpoint_name(new_name)?;
        let id = self.find_checkpoint(query)?;
        let mut next = self.next_state();
        for c in &mut next.checkpoints {
            if c.id == id {
                c.name = new_name.to_owned();
            }
        }
        self.commit(next)?;
        Ok(id)
    }

    /// Changes settings and hardware that `vm set` covers.
    pub fn set(&mut self, settings: &Settings) -> Result<()> {
        let mut next = self.next_state();
        let c = &mut next.config;
        if let Some(m) = settings.memory {
            c.hardware.memory = m;
        }
        if let Some(n) = settings.cpus {
            c.hardware.cpus = n;
        }
        if let Some(b) = &settings.boot {
            c.hardware.boot = b.clone();
        }
        if let Some(t) = settings.checkpoint_type {
            c.checkpoint_type = t;
        }
        if let Some(n) = settings.max_checkpoints {
            let count = self.state.checkpoints.len();
            if count > n as usize {
                return Err(Error::InvalidArgument(format!(
                    "VM {} has {count} checkpoints, more than a limit of {n}; delete {} of them first, or set a limit of at least {count}",
                    c.name,
                    count - n as usize
                )));
            }
            c.max_checkpoints = n;
        }
        if let Some(a) = settings.automatic_checkpoints {
            c.automatic_checkpoints = a;
        }
        validate_settings(c)?;
        self.commit(next)
    }

    /// Merges every layer that can be merged and lists files nothing refers to.
    pub fn consolidate(&mut self) -> Result<ConsolidateReport> {
        let mut reconciled = std::mem::take(&mut self.reconciled_at_open);
        let more = self.reconcile();
        reconciled.merged.extend(more.merged);
        reconciled.removed.extend(more.removed);
        reconciled.failed = more.failed;
        if let Some(e) = &reconciled.failed {
            return Err(Error::InvalidArgument(format!(
                "merging hidden layers failed: {e}; nothing is lost, fix the cause and run consolidate again"
            )));
        }
        let unreferenced = self.unreferenced_files()?;
        Ok(ConsolidateReport {
            reconciled,
            unreferenced,
            hidden: self
                .state
                .hidden_layers()
                .into_iter()
                .filter(|(_, d)| *d >= 2)
                .collect(),
        })
    }

    /// Writes a standalone VM folder at `dest` as of a checkpoint: its config and each
    /// disk flattened into one dynamic VHDX.
    pub fn export_checkpoint(&mut self, query: &str, dest: &Path) -> Result<Uuid> {
        let id = self.find_checkpoint(query)?;
        let cp = self.state.checkpoint(id).expect("found").clone();
        let mut config = self.checkpoint_config(id)?;
        config.name = self.state.config.name.clone();
        config.uuid = self.state.config.uuid;
        config.generation_id = self.state.config.generation_id;
        self.verify_layers(&cp.disks)?;
        let layers: Vec<PathBuf> = cp.disks.iter().map(|f| self.layer_path(f)).collect();
        let disks = config.hardware.disks.clone();
        let nvram_src = (config.hardware.firmware == crate::config::Firmware::Uefi).then(|| {
            self.dir
                .join(CHECKPOINTS_DIR)
                .join(id.to_string())
                .join(CHECKPOINT_NVRAM_FILE)
        });
        let nvram = nvram_src.as_ref().map(|_| "vars.fd".to_owned());
        let config = &mut config;
        let progress = &mut self.progress;
        fsutil::write_folder_atomically(dest, |tmp| {
            if let (Some(src), Some(file)) = (&nvram_src, &nvram) {
                let fw = tmp.join(FIRMWARE_DIR);
                std::fs::create_dir_all(&fw).map_err(|e| Error::io(&fw, e))?;
                let bytes = std::fs::read(src).map_err(|e| Error::io(src, e))?;
                fsutil::atomic_write(&fw.join(file), &bytes)?;
            }
            let disks_dir = tmp.join(DISKS_DIR);
            std::fs::create_dir_all(&disks_dir).map_err(|e| Error::io(&disks_dir, e))?;
            let mut state_layers = std::collections::BTreeMap::new();
            let mut now_disks = Vec::new();
            for (disk, layer) in disks.iter().zip(&layers) {
                let file = format!("{}.vhdx", disk.name);
                let src = disk::VhdxDisk::open(layer, false)?;
                let what = format!("flattening {}", disk.name);
                disk::convert(
                    &src,
                    &disks_dir.join(&file),
                    &disk::ConvertOptions {
                        format: disk::OutputFormat::Vhdx {
                            kind: vhdx::DiskKind::Dynamic,
                            block_size: None,
                        },
                        physical_sector_size: 4096,
                    },
                    &mut |d, t| progress(&what, d, t),
                )?;
                src.close()?;
                // The flattened file is a new virtual disk with an id of its own.
                let id =
                    vhdx::VhdxFile::open(&disks_dir.join(&file), vhdx::OpenOptions::default())?
                        .virtual_disk_id();
                if let Some(d) = config
                    .hardware
                    .disks
                    .iter_mut()
                    .find(|d| d.name == disk.name)
                {
                    d.disk_id = id;
                }
                state_layers.insert(
                    file.clone(),
                    Layer {
                        disk: disk.name.clone(),
                        parent: None,
                    },
                );
                now_disks.push(file);
            }
            let state = VmState {
                format: crate::state::STATE_FORMAT,
                seq: 1,
                config: config.clone(),
                now: crate::state::Now {
                    parent: None,
                    disks: now_disks,
                    nvram: nvram.clone(),
                },
                checkpoints: Vec::new(),
                layers: state_layers,
            };
            state.save(&tmp.join(STATE_FILE))
        })?;
        Ok(id)
    }

    /// Merges or removes layers nobody uses, until every hidden layer left has two or
    /// more dependants. A failed merge is abandoned (a partly done merge leaves the chain
    /// reading the same data, and the next reconciliation starts it again); the reason is
    /// returned.
    pub fn reconcile(&mut self) -> Reconciled {
        // Merges keep what every disk reads: change tracking that is valid before them
        // stays valid, recorded with the chains as they end up. (A crash in between
        // leaves the old record, which the changed chain then makes invalid: never wrong.)
        let tracked = self.valid_tracking();
        let out = self.reconcile_layers();
        self.carry_tracking(tracked);
        out
    }

    /// Each disk's change tracking that is valid for its chain now (none while a worker
    /// serves the chains: it records them itself, or when there is nothing to merge).
    fn valid_tracking(&self) -> Vec<(usize, crate::tracking::Tracking)> {
        if self.live || self.state.hidden_layers().is_empty() {
            return Vec::new();
        }
        let mut out = Vec::new();
        for (i, (d, layer)) in self
            .state
            .config
            .hardware
            .disks
            .iter()
            .zip(&self.state.now.disks)
            .enumerate()
        {
            if let Ok(crate::tracking::Status::Valid(t)) =
                crate::tracking::check_disk(&self.dir, &d.name, &self.layer_path(layer))
            {
                out.push((i, t));
            }
        }
        out
    }

    /// Records the chains as they are now in the tracking files [`Vm::valid_tracking`]
    /// found valid before a merge.
    fn carry_tracking(&self, tracked: Vec<(usize, crate::tracking::Tracking)>) {
        for (i, mut t) in tracked {
            let (Some(d), Some(layer)) = (
                self.state.config.hardware.disks.get(i),
                self.state.now.disks.get(i),
            ) else {
                continue;
            };
            let carried = vhdx::Chain::open(&self.layer_path(layer), false)
                .map_err(Error::from)
                .and_then(|c| {
                    let seen = crate::tracking::chain_seen(&c);
                    drop(c);
                    if seen == t.chain() {
                        return Ok(());
                    }
                    t.set_chain(seen);
                    t.save(&crate::tracking::Tracking::path(&self.dir, &d.name))
                });
            if let Err(e) = carried {
                tracing::warn!("change tracking of {} stays as it was: {e}", d.name);
            }
        }
    }

    fn reconcile_layers(&mut self) -> Reconciled {
        let mut out = Reconciled::default();
        loop {
            let busy = if self.live {
                self.now_chain_layers()
            } else {
                BTreeSet::new()
            };
            let hidden: Vec<(String, usize)> = self
                .state
                .hidden_layers()
                .into_iter()
                .filter(|(l, _)| !busy.contains(l))
                .collect();
            let pick = hidden
                .iter()
                .find(|(_, d)| *d == 0)
                .or_else(|| hidden.iter().find(|(_, d)| *d == 1));
            let Some((layer, deps)) = pick.cloned() else {
                break;
            };
            let result = if deps == 0 {
                self.remove_layer(&layer).map(|()| out.removed.push(layer))
            } else {
                self.merge_layer(&layer).map(|m| out.merged.push(m))
            };
            if let Err(e) = result {
                tracing::warn!("reconciling layers of {}: {e}", self.name());
                out.failed = Some(vhdx::error_chain(&e));
                break;
            }
        }
        out
    }

    fn remove_layer(&mut self, layer: &str) -> Result<()> {
        let mut next = self.next_state();
        next.layers.remove(layer);
        let mut journal = Journal::new(format!("remove unused layer {layer}"));
        journal.steps.push(Step::Commit {
            state: Box::new(next),
        });
        journal.steps.push(Step::RemoveLayer {
            file: layer.to_owned(),
        });
        self.run(journal)
    }

    fn merge_layer(&mut self, layer: &str) -> Result<MergeDone> {
        let child = self.state.dependants(layer).remove(0);
        let estimate = vhdx::estimate(&self.layer_path(&child))?;
        let direction = if estimate.into_child < estimate.into_parent {
            Direction::IntoChild
        } else {
            Direction::IntoParent
        };
        let (journal, done) = self.merge_plan(layer, direction);
        self.run(journal)?;
        Ok(done)
    }

    /// A hidden layer of Now's chains that one layer depends on, with that layer: what a
    /// running VM's worker merges live.
    pub fn live_merge_candidate(&self) -> Option<(String, String)> {
        let busy = self.now_chain_layers();
        self.state
            .hidden_layers()
            .into_iter()
            .find(|(l, d)| *d == 1 && busy.contains(l))
            .map(|(l, _)| {
                let child = self.state.dependants(&l).remove(0);
                (l, child)
            })
    }

    /// Plans the merge of hidden `layer` with its one dependant and writes its journal,
    /// without running it: a running VM's worker moves the data itself while the guest
    /// runs, then [`Vm::finish_merge`] runs the journal, whose merge step then finds its
    /// data moved. If the worker dies in between, the next open runs the whole journal.
    pub fn plan_merge(&mut self, layer: &str, direction: Direction) -> Result<PlannedMerge> {
        if let Some(j) = Journal::load(&self.dir)? {
            return Err(Error::InvalidArgument(format!(
                "another operation is unfinished: {}",
                j.op
            )));
        }
        let (journal, done) = self.merge_plan(layer, direction);
        journal.write(&self.dir)?;
        Ok(PlannedMerge { journal, done })
    }

    /// Runs a planned merge's journal through its commit (the tree then names the merged
    /// layers); what follows only cleans up and is left to [`Vm::finish_merge`].
    /// `data_moved`: the caller moved the data and linked the files up itself (a running
    /// VM's worker, whose open chain the merge step's checks could not open), so the merge
    /// step is skipped; a replay after a crash runs it in full.
    pub fn commit_merge(&mut self, planned: &PlannedMerge, data_moved: bool) -> Result<()> {
        let mut steps = planned.journal.clone();
        if data_moved {
            steps.steps.retain(|s| !matches!(s, Step::Merge { .. }));
        }
        steps.replay_through_commit(&self.dir, &mut *self.progress)?;
        if let Some(s) = planned.journal.steps.iter().find_map(|s| match s {
            Step::Commit { state } => Some((**state).clone()),
            _ => None,
        }) {
            self.state = s;
        }
        Ok(())
    }

    /// Runs the rest of a planned merge's journal once [`Vm::commit_merge`] has run: the
    /// cleanup after the commit (removing the merged-away layer).
    pub fn finish_merge(&mut self, planned: PlannedMerge) -> Result<MergeDone> {
        fsutil::remove_file(&self.dir.join(crate::journal::MERGE_PROGRESS_FILE))?;
        planned
            .journal
            .replay_after_commit(&self.dir, &mut *self.progress)
            .map_err(|e| Error::Unfinished {
                vm: self.state.config.name.clone(),
                op: planned.journal.op.clone(),
                source: Box::new(e),
            })?;
        Ok(planned.done)
    }

    /// Gives up a planned merge whose live data movement failed: nothing was committed, and
    /// the moved data changed nothing anyone reads; the layer stays hidden and is merged
    /// later (at the latest when the VM stops).
    pub fn abandon_merge(&mut self, planned: PlannedMerge) -> Result<()> {
        let _ = planned;
        // Its progress record would be wrong once the child is written again.
        fsutil::remove_file(&self.dir.join(crate::journal::MERGE_PROGRESS_FILE))?;
        fsutil::remove_file(&self.dir.join(JOURNAL_FILE))
    }

    fn merge_plan(&self, layer: &str, direction: Direction) -> (Journal, MergeDone) {
        let child = self.state.dependants(layer).remove(0);
        let mut next = self.next_state();
        let mut journal = Journal::new(format!("merge layer {layer} with {child}"));
        let done = match direction {
            Direction::IntoParent => {
                // The parent file takes the child's place everywhere.
                let relink = next.dependants(&child);
                next.layers.remove(&child);
                for r in &relink {
                    next.layers.get_mut(r).expect("dependant").parent = Some(layer.to_owned());
                }
                let rename = |f: &mut String| {
                    if *f == child {
                        *f = layer.to_owned();
                    }
                };
                next.now.disks.iter_mut().for_each(rename);
                for c in &mut next.checkpoints {
                    c.disks.iter_mut().for_each(rename);
                }
                journal.steps.push(Step::Merge {
                    parent: layer.to_owned(),
                    child: child.clone(),
                    direction,
                    relink,
                });
                journal.steps.push(Step::Commit {
                    state: Box::new(next),
                });
                MergeDone {
                    removed: child,
                    into: layer.to_owned(),
                    direction,
                }
            }
            Direction::IntoChild => {
                let grandparent = next.layers[layer].parent.clone();
                next.layers.get_mut(&child).expect("child").parent = grandparent;
                next.layers.remove(layer);
                journal.steps.push(Step::Merge {
                    parent: layer.to_owned(),
                    child: child.clone(),
                    direction,
                    relink: Vec::new(),
                });
                journal.steps.push(Step::Commit {
                    state: Box::new(next),
                });
                journal.steps.push(Step::RemoveLayer {
                    file: layer.to_owned(),
                });
                MergeDone {
                    removed: layer.to_owned(),
                    into: child,
                    direction,
                }
            }
        };
        (journal, done)
    }

    /// Files and folders in the VM folder that the state does not refer to.
    pub fn unreferenced_files(&self) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        let known_top = [
            STATE_FILE,
            DISKS_DIR,
            CHECKPOINTS_DIR,
            FIRMWARE_DIR,
            crate::journal::RUN_DIR,
            crate::journal::LOG_DIR,
            crate::journal::SAVED_DIR,
            crate::journal::MERGE_PROGRESS_FILE,
            crate::lock::LOCK_FILE,
            crate::tracking::TRACKING_DIR,
        ];
        for e in read_dir(&self.dir)? {
            let name = e.file_name().to_string_lossy().into_owned();
            if !known_top.contains(&name.as_str()) {
                out.push(e.path());
            }
        }
        let disks = self.dir.join(DISKS_DIR);
        for e in read_dir(&disks)? {
            let name = e.file_name().to_string_lossy().into_owned();
            if !self.state.layers.contains_key(&name) {
                out.push(e.path());
            }
        }
        for e in read_dir(&self.dir.join(FIRMWARE_DIR))? {
            let name = e.file_name().to_string_lossy().into_owned();
            if self.state.now.nvram.as_deref() != Some(name.as_str()) {
                out.push(e.path());
            }
        }
        let ids: BTreeSet<String> = self
            .state
            .checkpoints
            .iter()
            .map(|c| c.id.to_string())
            .collect();
        let cps = self.dir.join(CHECKPOINTS_DIR);
        for e in read_dir(&cps)? {
            let name = e.file_name().to_string_lossy().into_owned();
            if !ids.contains(&name) {
                out.push(e.path());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Renames the VM (its folder too); `store_dir` is the store.
    pub(crate) fn rename_vm(&mut self, new_dir: &Path) -> Result<()> {
        std::fs::rename(&self.dir, new_dir).map_err(|e| Error::io(&self.dir, e))?;
        fsutil::sync_dir_of(new_dir)?;
        crashpoint("vm folder renamed");
        self.dir = new_dir.to_owned();
        let mut next = self.next_state();
        next.config.name = fsutil::folder_name(new_dir);
        self.commit(next)
    }

    /// Writes a new state in one atomic step.
    pub(crate) fn commit(&mut self, next: VmState) -> Result<()> {
        // One atomic write needs no journal.
        next.save(&self.dir.join(STATE_FILE))?;
        self.state = next;
        Ok(())
    }

    pub(crate) fn run(&mut self, journal: Journal) -> Result<()> {
        let last = journal.steps.iter().rev().find_map(|s| match s {
            Step::Commit { state } => Some((**state).clone()),
            _ => None,
        });
        execute(&self.dir, &journal, &mut self.progress, true).map_err(|e| {
            if Journal::load(&self.dir).ok().flatten().is_some() {
                Error::Unfinished {
                    vm: self.state.config.name.clone(),
                    op: journal.op.clone(),
                    source: Box::new(e),
                }
            } else {
                e
            }
        })?;
        if let Some(s) = last {
            self.state = s;
        }
        Ok(())
    }

    pub(crate) fn next_state(&self) -> VmState {
        let mut s = self.state.clone();
        s.seq += 1;
        s
    }

    fn check_limit(&self, adding: usize) -> Result<()> {
        let limit = self.state.config.max_checkpoints;
        // Recovery checkpoints are a backup's, for the time of its copy.
        let counted = self.state.user_checkpoint_count();
        if counted + adding > limit as usize {
            return Err(Error::LimitReached {
                vm: self.state.config.name.clone(),
                limit,
            });
        }
        Ok(())
    }

    fn new_layer_name(&self, disk: &str, next: &VmState) -> String {
        loop {
            let id = Uuid::new_v4().simple().to_string();
            let name = format!("{disk}_{}.avhdx", &id[..12]);
            if !next.layers.contains_key(&name) && !self.layer_path(&name).exists() {
                return name;
            }
        }
    }

    fn checkpoint_config_path(&self, id: Uuid) -> PathBuf {
        self.dir
            .join(CHECKPOINTS_DIR)
            .join(id.to_string())
            .join(CHECKPOINT_CONFIG_FILE)
    }

    /// Fails with [`Error::MissingLayer`] naming the first layer file that is gone.
    pub(crate) fn check_layers_present(&self) -> Result<()> {
        for name in self.state.layers.keys() {
            let path = self.layer_path(name);
            if !path.exists() {
                return Err(Error::MissingLayer { path });
            }
        }
        Ok(())
    }

    /// Opens each layer's chain read-only: the files exist, link up, and are this VM's disks.
    fn verify_layers(&self, files: &[String]) -> Result<()> {
        for file in files {
            let layer = &self.state.layers[file];
            let find = |disks: &[crate::config::DiskConfig]| {
                disks.iter().find(|d| d.name == layer.disk).cloned()
            };
            let Some(disk) = find(&self.state.config.hardware.disks)
                .or_else(|| find(&self.all_checkpoint_disks()))
            else {
                continue;
            };
            let path = self.layer_path(file);
            if !path.exists() {
                return Err(Error::MissingLayer { path });
            }
            let f = vhdx::VhdxFile::open(&path, vhdx::OpenOptions::default())?;
            if f.virtual_disk_id() != disk.disk_id {
                return Err(Error::ForeignDisk {
                    path,
                    disk: disk.name,
                    expected: disk.disk_id,
                    found: f.virtual_disk_id(),
                });
            }
        }
        Ok(())
    }

    fn all_checkpoint_disks(&self) -> Vec<crate::config::DiskConfig> {
        let mut out = Vec::new();
        for c in &self.state.checkpoints {
            if let Ok(cfg) = self.checkpoint_config(c.id) {
                out.extend(cfg.hardware.disks);
            }
        }
        out
    }
}

/// Plans the copy of Now's UEFI variable store (if the VM has one) into checkpoint `id`.
fn push_nvram_copy(journal: &mut Journal, next: &VmState, id: Uuid) {
    if let Some(file) = &next.now.nvram {
        journal.steps.push(Step::CopyFile {
            from: format!("{FIRMWARE_DIR}/{file}"),
            to: format!("{CHECKPOINTS_DIR}/{id}/{CHECKPOINT_NVRAM_FILE}"),
        });
    }
}

/// Finishes or undoes an unfinished operation in `dir` (its lock must be held).
pub(crate) fn recover(dir: &Path, name: &str, progress: &mut ProgressFn) -> Result<()> {
    remove_temp_files(dir)?;
    let Some(journal) = Journal::load(dir)? else {
        return Ok(());
    };
    tracing::info!(
        "finishing the unfinished operation on {name}: {}",
        journal.op
    );
    execute(dir, &journal, progress, false).map_err(|e| Error::Unfinished {
        vm: name.to_owned(),
        op: journal.op.clone(),
        source: Box::new(e),
    })
}

/// Runs a journal (writing it first when `fresh`). If a step fails before the journal's
/// first commit, the steps done are undone and the journal removed: the operation failed
/// and changed nothing. A failure after the commit leaves the journal for the next
/// command to finish.
fn execute(dir: &Path, journal: &Journal, progress: &mut ProgressFn, fresh: bool) -> Result<()> {
    if !fresh && journal.tentative && !reached_commit(dir, journal) {
        tracing::info!(
            "{} stopped before its commit, so it did not happen: undoing what it prepared",
            journal.op
        );
        return undo_uncommitted(dir, journal);
    }
    let result = if fresh {
        journal.run(dir, &mut **progress)
    } else {
        journal.replay(dir, &mut **progress)
    };
    let Err(e) = result else { return Ok(()) };
    Err(fail_uncommitted(dir, journal, e))
}

/// Whether `vm.json` holds the journal's first commit (or the journal commits nothing).
fn reached_commit(dir: &Path, journal: &Journal) -> bool {
    let first_commit = journal.steps.iter().find_map(|s| match s {
        Step::Commit { state } => Some(state.seq),
        _ => None,
    });
    let committed_seq = VmState::load(&dir.join(STATE_FILE))
        .map(|s| s.seq)
        .unwrap_or(u64::MAX);
    first_commit.is_none_or(|seq| committed_seq >= seq)
}

/// A step of `journal` failed with `e`: before the commit, undoes the steps done and
/// removes the journal (the operation changed nothing); after it, leaves the journal for
/// the next command to finish. Returns `e` either way.
fn fail_uncommitted(dir: &Path, journal: &Journal, e: Error) -> Error {
    if !reached_commit(dir, journal)
        && let Err(u) = undo_uncommitted(dir, journal)
    {
        tracing::warn!("undoing {}: {u}", journal.op);
    }
    e
}

/// Undoes the steps of a journal that did not reach its commit, then removes it.
fn undo_uncommitted(dir: &Path, journal: &Journal) -> Result<()> {
    let _ = fsutil::remove_file(&dir.join(crate::journal::MERGE_PROGRESS_FILE));
    undo_steps(dir, journal)?;
    fsutil::remove_file(&dir.join(JOURNAL_FILE))
}

/// Removes what the steps of an uncommitted journal created.
fn undo_steps(dir: &Path, journal: &Journal) -> Result<()> {
    for step in &journal.steps {
        match step {
            Step::CreateChild { file, .. } => {
                fsutil::remove_file(&dir.join(DISKS_DIR).join(file))?;
            }
            Step::WriteCheckpointConfig { id, .. } => {
                fsutil::remove_dir_all(&dir.join(CHECKPOINTS_DIR).join(id.to_string()))?;
            }
            Step::CopyFile { to, .. } | Step::LinkFile { to, .. } => {
                fsutil::remove_file(&dir.join(to))?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// Removes half-written temporary files (`.NAME.tmp-PID`) a killed command left, but
/// those an unfinished journal still links into place (`vm disk add`'s new disk).
fn remove_temp_files(dir: &Path) -> Result<()> {
    let needed: BTreeSet<PathBuf> = match Journal::load(dir) {
        Ok(Some(j)) => j
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::LinkFile { from, .. } | Step::CopyFile { from, .. } => Some(dir.join(from)),
                _ => None,
            })
            .collect(),
        _ => BTreeSet::new(),
    };
    let mut dirs = vec![
        dir.to_owned(),
        dir.join(DISKS_DIR),
        dir.join(FIRMWARE_DIR),
        dir.join(crate::tracking::TRACKING_DIR),
    ];
    for e in read_dir(&dir.join(CHECKPOINTS_DIR))? {
        dirs.push(e.path());
    }
    for d in dirs {
        for e in read_dir(&d)? {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.contains(".tmp-") && !needed.contains(&e.path()) {
                fsutil::remove_file(&e.path())?;
            }
        }
    }
    Ok(())
}

fn read_dir(dir: &Path) -> Result<Vec<std::fs::DirEntry>> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| Error::io(dir, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(Error::io(dir, e)),
    }
}

/// The fewest characters of a checkpoint's id that name it.
pub const MIN_ID_PREFIX: usize = 8;

/// Finds a checkpoint by exact name, then by id or unique id prefix (8+ characters).
pub fn find_checkpoint(state: &VmState, query: &str) -> Result<Uuid> {
    let by_name: Vec<&Checkpoint> = state
        .checkpoints
        .iter()
        .filter(|c| c.name == query)
        .collect();
    match by_name.len() {
        1 => return Ok(by_name[0].id),
        n if n > 1 => {
            return Err(Error::AmbiguousCheckpoint {
                vm: state.config.name.clone(),
                query: query.to_owned(),
                ids: by_name.iter().map(|c| c.id.to_string()).collect(),
            });
        }
        _ => {}
    }
    let q = query.to_ascii_lowercase();
    let id_prefix_of = |c: &Checkpoint| {
        c.id.to_string().starts_with(&q) || c.id.simple().to_string().starts_with(&q)
    };
    if q.len() < MIN_ID_PREFIX
        && q.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
        && state.checkpoints.iter().any(id_prefix_of)
    {
        return Err(Error::InvalidArgument(format!(
            "VM \"{}\" has no checkpoint named \"{query}\", and an id prefix must have at least {MIN_ID_PREFIX} characters (\"{query}\" has {})",
            state.config.name,
            query.chars().count()
        )));
    }
    if q.len() >= MIN_ID_PREFIX {
        let by_id: Vec<&Checkpoint> = state
            .checkpoints
            .iter()
            .filter(|c| id_prefix_of(c))
            .collect();
        if by_id.len() == 1 {
            return Ok(by_id[0].id);
        }
    }
    Err(Error::NoSuchCheckpoint {
        vm: state.config.name.clone(),
        query: query.to_owned(),
    })
}

/// Reads `checkpoints/<id>/config.json`.
pub fn read_checkpoint_config(vm_dir: &Path, id: Uuid) -> Result<VmConfig> {
    let path = vm_dir
        .join(CHECKPOINTS_DIR)
        .join(id.to_string())
        .join(CHECKPOINT_CONFIG_FILE);
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    crate::config::parse_checkpoint_config(&bytes).map_err(|reason| Error::Corrupt {
        path: path.clone(),
        reason,
    })
}

/// The default checkpoint name, `VM (YYYY-MM-DD hh:mm:ss)` (UTC).
pub fn default_checkpoint_name(vm: &str) -> String {
    let mut name = format!("{vm} ({})", fsutil::format_time(fsutil::now_unix()));
    if name.chars().count() > crate::config::MAX_NAME_CHARS {
        let tail = format!(" ({})", fsutil::format_time(fsutil::now_unix()));
        let keep = crate::config::MAX_NAME_CHARS - tail.chars().count();
        name = vm.chars().take(keep).collect::<String>() + &tail;
    }
    name
}
