//! What front ends show of VMs and their checkpoint trees: the committed state read from
//! the VM folder, with what only the files and the worker's record know (sizes, chain
//! depths, the run state). Built without the VM's lock, so it shows while a command or
//! the VM's worker holds the VM.

use crate::run_state::RunState;
use serde::Serialize;
use std::path::{Path, PathBuf};
use uuid::Uuid;
use vm::{CheckpointKind, Consistency, VmState};

/// One VM of the store, as `vm list` shows it.
#[derive(Debug)]
pub struct VmListEntry {
    /// The VM's name.
    pub name: String,
    /// Its folder.
    pub dir: PathBuf,
    /// Its committed state, or why it cannot be read.
    pub state: vm::Result<VmState>,
    /// An unfinished operation, by name.
    pub unfinished: Option<String>,
    /// Whether it runs.
    pub run: RunState,
}

/// One VM, as `vm show` shows it.
#[derive(Clone, Debug)]
pub struct VmInfo {
    /// The VM folder.
    pub dir: PathBuf,
    /// The committed state (config, tree, layers).
    pub state: VmState,
    /// An unfinished operation, by name.
    pub unfinished: Option<String>,
    /// Whether it runs.
    pub run: RunState,
    /// Now's disks, in the guest's order.
    pub disks: Vec<VmDisk>,
    /// Now's UEFI variable store, for a UEFI VM.
    pub uefi_vars: Option<PathBuf>,
    /// Hidden layers (files, with how many layers depend on each).
    pub hidden_layers: Vec<(PathBuf, usize)>,
    /// The serial log of the current run (or of the last one when the VM is off).
    pub serial_log: PathBuf,
    /// The earlier runs' serial logs that are kept, newest first.
    pub older_serial_logs: Vec<PathBuf>,
}

/// One of Now's disks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VmDisk {
    /// Its name (`disk0`, ...).
    pub name: String,
    /// The virtual disk id every layer of it carries.
    pub disk_id: Uuid,
    /// Now's layer.
    pub file: PathBuf,
    /// The virtual size, when a file of its chain could be read (a running VM's worker
    /// has Now's layer open and locked; its parents are shared).
    pub virtual_size: Option<u64>,
    /// Files in its chain, from the layer graph.
    pub chain_depth: usize,
    /// Its change tracking.
    pub tracking: TrackingState,
}

/// A disk's change tracking, as `vm show` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum TrackingState {
    /// No tracking file: the next backup is a full or an express full.
    None,
    /// A file that cannot be trusted: the next backup is an express full.
    Invalid {
        /// Why.
        reason: String,
    },
    /// Changes since `reference` are tracked.
    Valid {
        /// The recovery point the changes are relative to (none yet: the next backup
        /// establishes one).
        reference: Option<String>,
        /// Regions possibly changed since.
        regions: u64,
        /// Their bytes.
        bytes: u64,
        /// A running backup's recovery checkpoint whose set is frozen.
        pending: Option<Uuid>,
        /// Whether the VM's worker is marking it now (its chain is checked when the VM
        /// stops; a stopped VM's is checked here).
        live: bool,
    },
}

impl TrackingState {
    /// The state of disk `disk` of the VM in `dir` whose Now layer is `top`.
    pub fn read(dir: &std::path::Path, disk: &str, top: &std::path::Path, live: bool) -> Self {
        let status = if live {
            // The worker writes pages in place: one caught half written fails its
            // checksum, so read again before calling it invalid.
            let path = vm::tracking::Tracking::path(dir, disk);
            let mut status = vm::tracking::Tracking::load(&path);
            for _ in 0..4 {
                if !matches!(status, Ok(vm::tracking::Status::Invalid(_))) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
                status = vm::tracking::Tracking::load(&path);
            }
            status
        } else {
            vm::tracking::check_disk(dir, disk, top)
        };
        match status {
            Ok(vm::tracking::Status::None) => TrackingState::None,
            Ok(vm::tracking::Status::Invalid(reason)) => TrackingState::Invalid { reason },
            Err(e) => TrackingState::Invalid {
                reason: e.to_string(),
            },
            Ok(vm::tracking::Status::Valid(t)) => {
                let regions = t.changed_regions();
                TrackingState::Valid {
                    reference: t.reference().map(str::to_owned),
                    regions,
                    bytes: t.changed().iter().map(|r| r.end - r.start).sum(),
                    pending: t.pending(),
                    live,
                }
            }
        }
    }
}

impl VmInfo {
    pub(crate) fn build(dir: PathBuf, state: VmState, unfinished: Option<String>) -> VmInfo {
        let run = crate::record::RunStatus::read(&dir).state;
        let disks = state
            .config
            .hardware
            .disks
            .iter()
            .zip(&state.now.disks)
            .map(|(d, file)| {
                let path = layer_path(&dir, file);
                // From the layer graph, so that it shows while a worker holds the files.
                let mut chain_depth = 0;
                let mut at = Some(file.clone());
                while let Some(l) = at {
                    chain_depth += 1;
                    at = state.layers.get(&l).and_then(|x| x.parent.clone());
                }
                // A running VM's worker holds Now's layer alone, but its parents only
                // shared, and every layer of a chain has the same virtual size.
                let mut virtual_size = None;
                let mut at = Some(file.clone());
                while let (None, Some(l)) = (virtual_size, at) {
                    virtual_size =
                        vhdx::VhdxFile::open(&layer_path(&dir, &l), vhdx::OpenOptions::default())
                            .ok()
                            .map(|f| f.geometry().virtual_size);
                    at = state.layers.get(&l).and_then(|x| x.parent.clone());
                }
                let tracking = TrackingState::read(&dir, &d.name, &path, run.is_live());
                VmDisk {
                    name: d.name.clone(),
                    disk_id: d.disk_id,
                    file: path,
                    virtual_size,
                    chain_depth,
                    tracking,
                }
            })
            .collect();
        let uefi_vars = state
            .now
            .nvram
            .as_ref()
            .map(|f| dir.join(vm::journal::FIRMWARE_DIR).join(f));
        let hidden_layers = state
            .hidden_layers()
            .into_iter()
            .map(|(f, n)| (layer_path(&dir, &f), n))
            .collect();
        let serial_log = crate::machine::serial_log(&dir);
        let older_serial_logs = crate::machine::older_serial_logs(&dir);
        VmInfo {
            serial_log,
            older_serial_logs,
            dir,
            state,
            unfinished,
            run,
            disks,
            uefi_vars,
            hidden_layers,
        }
    }

    /// The checkpoint Now was last taken or applied from.
    pub fn now_parent(&self) -> Option<&vm::Checkpoint> {
        self.state.now.parent.and_then(|p| self.state.checkpoint(p))
    }
}

/// One layer file of a checkpoint or of Now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LayerInfo {
    /// The disk it belongs to.
    pub disk: String,
    /// The file.
    pub file: PathBuf,
    /// The file's size in bytes.
    pub size: u64,
}

/// One checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CheckpointInfo {
    /// Its id.
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// The checkpoint it was taken under.
    pub parent: Option<Uuid>,
    /// When it was taken, seconds since the Unix epoch.
    pub created: u64,
    /// What was taken.
    pub kind: CheckpointKind,
    /// The consistency achieved.
    pub consistency: Consistency,
    /// Whether memory and device state are kept.
    pub has_memory: bool,
    /// Its layer of each disk.
    pub disks: Vec<LayerInfo>,
}

impl CheckpointInfo {
    pub(crate) fn build(dir: &Path, state: &VmState, c: &vm::Checkpoint) -> CheckpointInfo {
        CheckpointInfo {
            id: c.id,
            name: c.name.clone(),
            parent: c.parent,
            created: c.created,
            kind: c.kind,
            consistency: c.consistency,
            has_memory: c.has_memory,
            disks: c
                .disks
                .iter()
                .map(|f| layer_info(dir, state, None, f))
                .collect(),
        }
    }

    /// The bytes its layer files take.
    pub fn size(&self) -> u64 {
        self.disks.iter().map(|d| d.size).sum()
    }
}

/// A layer no checkpoint and not Now uses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HiddenLayer {
    /// The layer's file name in `disks/`.
    pub name: String,
    /// The disk it belongs to.
    pub disk: String,
    /// The file.
    pub file: PathBuf,
    /// The file's size in bytes.
    pub size: u64,
    /// The layers that depend on it.
    pub dependants: Vec<String>,
}

/// A VM's checkpoint tree, as `checkpoint list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CheckpointTree {
    /// The VM's name.
    pub vm: String,
    /// The checkpoint Now hangs under.
    pub now_parent: Option<Uuid>,
    /// Now's layer of each disk.
    pub now: Vec<LayerInfo>,
    /// Every checkpoint, in the order they were taken.
    pub checkpoints: Vec<CheckpointInfo>,
    /// Hidden layers.
    pub hidden_layers: Vec<HiddenLayer>,
    /// An unfinished operation, by name.
    pub unfinished: Option<String>,
}

impl CheckpointTree {
    pub(crate) fn build(dir: &Path, state: &VmState, unfinished: Option<String>) -> CheckpointTree {
        let names: Vec<&str> = state
            .config
            .hardware
            .disks
            .iter()
            .map(|d| d.name.as_str())
            .collect();
        CheckpointTree {
            vm: state.config.name.clone(),
            now_parent: state.now.parent,
            now: state
                .now
                .disks
                .iter()
                .enumerate()
                .map(|(i, f)| layer_info(dir, state, names.get(i).copied(), f))
                .collect(),
            checkpoints: state
                .checkpoints
                .iter()
                .map(|c| CheckpointInfo::build(dir, state, c))
                .collect(),
            hidden_layers: state
                .hidden_layers()
                .into_iter()
                .map(|(f, _)| HiddenLayer {
                    disk: state.layers[&f].disk.clone(),
                    file: layer_path(dir, &f),
                    size: layer_size(dir, &f),
                    dependants: state.dependants(&f),
                    name: f,
                })
                .collect(),
            unfinished,
        }
    }

    /// The tree without recovery checkpoints (a backup's, while it copies): their
    /// children and Now hang under their parents instead.
    pub fn without_recovery(mut self) -> CheckpointTree {
        let parent_of: std::collections::HashMap<Uuid, Option<Uuid>> =
            self.checkpoints.iter().map(|c| (c.id, c.parent)).collect();
        let recovery: std::collections::HashSet<Uuid> = self
            .checkpoints
            .iter()
            .filter(|c| c.kind == CheckpointKind::Recovery)
            .map(|c| c.id)
            .collect();
        let visible = |mut at: Option<Uuid>| {
            while let Some(id) = at
                && recovery.contains(&id)
            {
                at = parent_of.get(&id).copied().flatten();
            }
            at
        };
        self.now_parent = visible(self.now_parent);
        self.checkpoints.retain(|c| !recovery.contains(&c.id));
        for c in &mut self.checkpoints {
            c.parent = visible(c.parent);
        }
        self
    }

    /// The checkpoints taken directly under `parent` (the root for `None`), in order.
    pub fn children(&self, parent: Option<Uuid>) -> Vec<&CheckpointInfo> {
        self.checkpoints
            .iter()
            .filter(|c| c.parent == parent)
            .collect()
    }

    /// The bytes Now's layer files take.
    pub fn now_size(&self) -> u64 {
        self.now.iter().map(|d| d.size).sum()
    }
}

fn layer_path(dir: &Path, file: &str) -> PathBuf {
    dir.join(vm::journal::DISKS_DIR).join(file)
}

fn layer_size(dir: &Path, file: &str) -> u64 {
    std::fs::metadata(layer_path(dir, file))
        .map(|m| m.len())
        .unwrap_or(0)
}

/// A layer's info; `disk` names its disk where the caller knows it (Now's layers take the
/// config's names), else the layer graph does.
fn layer_info(dir: &Path, state: &VmState, disk: Option<&str>, file: &str) -> LayerInfo {
    LayerInfo {
        disk: disk
            .map(str::to_owned)
            .unwrap_or_else(|| state.layers[file].disk.clone()),
        file: layer_path(dir, file),
        size: layer_size(dir, file),
    }
}
