//! `vm.json`: the VM's committed state, written whole and atomically.
//!
//! It holds the VM's configuration (Now's), the checkpoint tree, and the graph of disk
//! layers. The checkpoint tree and the layer graph are separate on purpose: deleting a
//! checkpoint changes the tree at once (one atomic write), while the layers it leaves
//! behind are merged afterwards, each merge its own journaled step.

use crate::config::{Hardware, VmConfig};
use crate::error::{Error, Result};
use crate::fsutil;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use uuid::Uuid;

/// Version of the `vm.json` layout.
pub const STATE_FORMAT: u32 = 1;

/// The kind of checkpoint actually taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CheckpointKind {
    /// No memory; the guest quiesced, or the VM was off.
    Production,
    /// Memory and device state kept (when the VM ran).
    Standard,
    /// A backup's recovery checkpoint: no memory, taken and deleted by `backup create`,
    /// hidden from `checkpoint list` (unless `--all`), not counted in the limit, and
    /// removed at the VM's next open when the backup that took it died.
    Recovery,
}

impl CheckpointKind {
    /// The name used in listings and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckpointKind::Production => "production",
            CheckpointKind::Standard => "standard",
            CheckpointKind::Recovery => "recovery",
        }
    }
}

/// The consistency a checkpoint achieved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Consistency {
    /// The VM was off: every disk is as the guest left it at shutdown.
    VmOff,
    /// The guest agent flushed and froze the file systems.
    ApplicationConsistent,
    /// Memory and device state kept with crash-consistent disks.
    CrashConsistentWithMemory,
    /// Disks only, as after a power loss.
    CrashConsistent,
}

impl Consistency {
    /// The name used in listings and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::VmOff => "vm-off",
            Consistency::ApplicationConsistent => "application-consistent",
            Consistency::CrashConsistentWithMemory => "crash-consistent-with-memory",
            Consistency::CrashConsistent => "crash-consistent",
        }
    }
}

/// One node of the checkpoint tree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Stable identity (also the name of its folder under `checkpoints/`).
    pub id: Uuid,
    /// Display name, 1 to 100 characters; not unique.
    pub name: String,
    /// The checkpoint this one was taken under, `None` at the root.
    pub parent: Option<Uuid>,
    /// When it was taken, seconds since the Unix epoch.
    pub created: u64,
    /// What was taken.
    pub kind: CheckpointKind,
    /// What consistency was achieved.
    pub consistency: Consistency,
    /// Whether memory and device state are kept in the checkpoint's folder.
    pub has_memory: bool,
    /// The layer file (in `disks/`) of each disk, in the order of the checkpoint's config.
    pub disks: Vec<String>,
}

/// The current state: the VM as it runs next.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Now {
    /// The checkpoint Now was last taken or applied from.
    pub parent: Option<Uuid>,
    /// The writable layer of each disk, in the order of the VM's config.
    pub disks: Vec<String>,
    /// The UEFI variable store the VM runs with (a file in `firmware/`), for UEFI VMs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvram: Option<String>,
}

/// One VHDX file in `disks/`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// The disk (its name in the config) the layer belongs to.
    pub disk: String,
    /// The layer's parent file, `None` for a base disk.
    pub parent: Option<String>,
}

/// Everything `vm.json` holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    /// Layout version, [`STATE_FORMAT`].
    pub format: u32,
    /// Bumped by every commit.
    pub seq: u64,
    /// Now's configuration.
    pub config: VmConfig,
    /// The current state.
    pub now: Now,
    /// Every checkpoint, in the order they were taken.
    pub checkpoints: Vec<Checkpoint>,
    /// Every layer file, keyed by file name. A layer that no checkpoint and not Now uses
    /// is *hidden*: kept while two or more layers depend on it, merged away otherwise.
    pub layers: BTreeMap<String, Layer>,
}

impl VmState {
    /// The checkpoints the user has: all but a running backup's recovery checkpoint, which
    /// is not counted in the limit nor shown by default.
    pub fn user_checkpoint_count(&self) -> usize {
        self.checkpoints
            .iter()
            .filter(|c| c.kind != CheckpointKind::Recovery)
            .count()
    }

    /// Reads and validates `vm.json`.
    pub fn load(path: &Path) -> Result<VmState> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        VmState::from_slice(&bytes).map_err(|reason| Error::Corrupt {
            path: path.to_owned(),
            reason,
        })
    }

    /// Parses and validates the contents of a `vm.json`; `Err` says what is wrong.
    pub fn from_slice(bytes: &[u8]) -> std::result::Result<VmState, String> {
        let state: VmState = serde_json::from_slice(bytes)
            .map_err(|e| format!("not a valid VM state file ({e}); restore it from a backup"))?;
        if state.format != STATE_FORMAT {
            return Err(format!(
                "state format {} is not supported (this snapvisor reads format {STATE_FORMAT})",
                state.format
            ));
        }
        state
            .validate()
            .map_err(|reason| format!("inconsistent VM state: {reason}"))?;
        Ok(state)
    }

    /// Writes `vm.json` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("state serializes");
        bytes.push(b'\n');
        fsutil::atomic_write(path, &bytes)
    }

    /// Checks the invariants every committed state keeps.
    pub fn validate(&self) -> Result<(), String> {
        let disks = &self.config.hardware.disks;
        if self.now.disks.len() != disks.len() {
            return Err(format!(
                "Now has {} disk layers but the config has {} disks",
                self.now.disks.len(),
                disks.len()
            ));
        }
        if let Some(n) = &self.now.nvram
            && !is_plain_file_name(n)
        {
            return Err(format!(
                "UEFI variable store {n:?} is not a plain file name"
            ));
        }
        for d in disks {
            // Layer files are named after their disk.
            if !is_plain_file_name(&d.name) {
                return Err(format!("disk name {:?} is not a plain file name", d.name));
            }
        }
        let ids: BTreeSet<Uuid> = self.checkpoints.iter().map(|c| c.id).collect();
        if ids.len() != self.checkpoints.len() {
            return Err("two checkpoints share an id".into());
        }
        for (name, layer) in &self.layers {
            if !is_plain_file_name(name) {
                return Err(format!("layer name {name:?} is not a plain file name"));
            }
            if let Some(p) = &layer.parent
                && !self.layers.contains_key(p)
            {
                return Err(format!("layer {name} has an unknown parent {p}"));
            }
        }
        // Every parent is known now, so the walk up stays inside the map.
        for name in self.layers.keys() {
            let mut at = name;
            for _ in 0..=self.layers.len() {
                match &self.layers[at].parent {
                    Some(p) => at = p,
                    None => break,
                }
            }
            if self.layers[at].parent.is_some() {
                return Err(format!("the layers above {name} form a cycle"));
            }
        }
        let mut used = BTreeSet::new();
        let mut uses = |file: &String, whose: &str| -> Result<(), String> {
            if !self.layers.contains_key(file) {
                return Err(format!("{whose} uses the unknown layer {file}"));
            }
            if !used.insert(file.clone()) {
                return Err(format!("layer {file} is used twice"));
            }
            Ok(())
        };
        for (i, f) in self.now.disks.iter().enumerate() {
            uses(f, "Now")?;
            if self.layers[f].disk != disks[i].name {
                return Err(format!(
                    "Now's layer {f} belongs to disk {} but is used as {}",
                    self.layers[f].disk, disks[i].name
                ));
            }
        }
        for c in &self.checkpoints {
            for f in &c.disks {
                uses(f, &format!("checkpoint {}", c.id))?;
            }
            if let Some(p) = c.parent
                && !ids.contains(&p)
            {
                return Err(format!("checkpoint {} has an unknown parent {p}", c.id));
            }
            let mut at = c.parent;
            let mut steps = 0;
            while let Some(p) = at {
                steps += 1;
                if steps > self.checkpoints.len() {
                    return Err(format!("the checkpoints above {} form a cycle", c.id));
                }
                at = self.checkpoint(p).and_then(|c| c.parent);
            }
        }
        if let Some(p) = self.now.parent
            && !ids.contains(&p)
        {
            return Err(format!("Now's parent {p} is not a checkpoint"));
        }
        Ok(())
    }

    /// The checkpoint with this id.
    pub fn checkpoint(&self, id: Uuid) -> Option<&Checkpoint> {
        self.checkpoints.iter().find(|c| c.id == id)
    }

    /// Layers used by Now or by a checkpoint.
    pub fn referenced_layers(&self) -> BTreeSet<&str> {
        self.now
            .disks
            .iter()
            .chain(self.checkpoints.iter().flat_map(|c| c.disks.iter()))
            .map(String::as_str)
            .collect()
    }

    /// Layers whose parent is `file`, in name order.
    pub fn dependants(&self, file: &str) -> Vec<String> {
        self.layers
            .iter()
            .filter(|(_, l)| l.parent.as_deref() == Some(file))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Layers that no checkpoint and not Now uses, with how many layers depend on each.
    pub fn hidden_layers(&self) -> Vec<(String, usize)> {
        let referenced = self.referenced_layers();
        let mut deps: HashMap<&str, usize> = HashMap::new();
        for l in self.layers.values() {
            if let Some(p) = &l.parent {
                *deps.entry(p.as_str()).or_default() += 1;
            }
        }
        self.layers
            .keys()
            .filter(|n| !referenced.contains(n.as_str()))
            .map(|n| (n.clone(), deps.get(n.as_str()).copied().unwrap_or(0)))
            .collect()
    }

    /// Children of a checkpoint (or of the root for `None`), in the order taken.
    pub fn children(&self, parent: Option<Uuid>) -> Vec<&Checkpoint> {
        self.checkpoints
            .iter()
            .filter(|c| c.parent == parent)
            .collect()
    }

    /// The checkpoint and everything below it, the checkpoint first.
    pub fn subtree(&self, id: Uuid) -> Vec<Uuid> {
        let mut out = vec![id];
        let mut i = 0;
        while i < out.len() {
            let at = out[i];
            out.extend(self.children(Some(at)).iter().map(|c| c.id));
            i += 1;
        }
        out
    }

    /// Now's hardware.
    pub fn hardware(&self) -> &Hardware {
        &self.config.hardware
    }
}

/// A name without folders or specials, safe to join to a folder.
pub fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0')
        && !name.starts_with('.')
}
