//! Adding and removing a stopped VM's disks (`vm disk add|remove|list`, as Hyper-V's
//! `Add-VMHardDiskDrive`, `Remove-VMHardDiskDrive` and `Get-VMHardDiskDrive`).
//!
//! # What a user can count on
//!
//! - **Numbers are stable.** A disk is `diskN`, the stem of every layer file it has; N
//!   never changes while the disk exists, so removing `disk0` leaves `disk1` as `disk1`
//!   (the guest, which sees the disks in the config's order, then finds it first:
//!   `/dev/vda`). A new disk takes the lowest number no layer of the VM (Now's or a
//!   checkpoint's) still carries, and is appended: the guest sees it last.
//! - **Disks belong to Now.** Checkpoints keep the disk set they were taken with (their
//!   `config.json` and their layers): adding or removing a disk changes neither, and
//!   applying a checkpoint brings its disk set back (Now's added disk is then discarded
//!   with the rest of Now, as its other disks are, unless `--save-current` keeps it).
//! - **Data goes only when nothing needs it.** Removing a disk takes it out of Now's
//!   config and drops Now's layer; the disk's layers that checkpoints still use stay (the
//!   disk comes back when such a checkpoint is applied) and are removed with the last
//!   checkpoint that uses them. [`preview_remove_disk`] says beforehand which files go and
//!   which stay.
//! - **The VM must be off.** These change the hardware; the `host` crate refuses them for
//!   a running or saved VM (a saved VM's memory belongs to its disks).
//!
//! # Crash model
//!
//! An added disk is built whole under a temporary name in `disks/` (removed at the next
//! open if the command dies meanwhile); then one journal links it to its name and commits
//! the config that names it. A kill before the journal leaves the VM as before; after
//! it, the next open finishes the link and the commit (the temporary file the journal
//! names is kept for it). A removal is one atomic commit of `vm.json`, after which the
//! layers nothing uses are removed by the usual reconciliation (journaled, resumed at the
//! next open): the VM is as before or as after, and a layer left for the next open is
//! hidden, never named by the config.

use crate::config::DiskConfig;
use crate::error::{Error, Result};
use crate::fsutil;
use crate::journal::{DISKS_DIR, Journal, Step};
use crate::preview::Preview;
use crate::state::{Layer, VmState};
use crate::vm::{Reconciled, Vm};
use std::path::{Path, PathBuf};
use uuid::Uuid;

/// Where a new disk's data comes from.
#[derive(Clone, Debug)]
pub enum DiskSource {
    /// A new empty dynamic VHDX of this virtual size.
    Empty {
        /// Virtual size in bytes.
        size: u64,
    },
    /// A copy of an existing disk (a VHDX chain, or a raw image), flattened into a new
    /// dynamic VHDX; the original is only read.
    Import {
        /// The file to copy.
        path: PathBuf,
        /// The format the user named (`None`: recognised by its signature; another
        /// tool's image is refused with the command that converts it).
        format: Option<disk::Format>,
    },
}

/// A disk of a VM's Now, as `vm disk list` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskEntry {
    /// Its stable number (`N` of `diskN`).
    pub number: u32,
    /// Its name (`diskN`).
    pub name: String,
    /// Its place in the guest's order (0 is the first disk the guest sees, `/dev/vda`).
    pub position: usize,
    /// The VHDX virtual disk id every layer of it carries.
    pub disk_id: Uuid,
    /// Now's layer file (the top of its chain).
    pub file: PathBuf,
    /// Layers in its chain (1: no checkpoint has it).
    pub chain_depth: usize,
    /// The checkpoints that have this disk (id, name).
    pub checkpoints: Vec<(Uuid, String)>,
}

/// What removing a disk does (or did).
#[derive(Clone, Debug, Default)]
pub struct DiskRemoval {
    /// The disk's name (`diskN`).
    pub name: String,
    /// Its place in the guest's order before the removal.
    pub position: usize,
    /// Layer files deleted, with their sizes in bytes (measured before).
    pub deleted: Vec<(String, u64)>,
    /// Layer files of the disk that stay because checkpoints use them, with those
    /// checkpoints' names.
    pub kept: Vec<(String, Vec<String>)>,
    /// Merges of hidden layers the removal leads to (other layers of the same chain).
    pub preview: Preview,
}

/// The number of a disk name `diskN`.
pub fn disk_number(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("disk")?;
    if digits.is_empty() || (digits.len() > 1 && digits.starts_with('0')) {
        return None;
    }
    digits.parse().ok()
}

/// Now's disks with their checkpoints, in the guest's order.
pub fn list_disks(dir: &Path, state: &VmState) -> Vec<DiskEntry> {
    state
        .config
        .hardware
        .disks
        .iter()
        .zip(&state.now.disks)
        .enumerate()
        .map(|(position, (d, top))| {
            let mut depth = 0;
            let mut at = Some(top.clone());
            while let Some(l) = at {
                depth += 1;
                at = state.layers.get(&l).and_then(|x| x.parent.clone());
            }
            DiskEntry {
                number: disk_number(&d.name).unwrap_or(u32::MAX),
                name: d.name.clone(),
                position,
                disk_id: d.disk_id,
                file: dir.join(DISKS_DIR).join(top),
                chain_depth: depth,
                checkpoints: checkpoints_with_disk(state, &d.name),
            }
        })
        .collect()
}

/// The checkpoints that have disk `name` (one of their layers is that disk's).
fn checkpoints_with_disk(state: &VmState, name: &str) -> Vec<(Uuid, String)> {
    state
        .checkpoints
        .iter()
        .filter(|c| {
            c.disks
                .iter()
                .any(|f| state.layers.get(f).is_some_and(|l| l.disk == name))
        })
        .map(|c| (c.id, c.name.clone()))
        .collect()
}

/// The position in Now's config of the disk numbered `number`, or an error that lists
/// the disks there are.
fn find_disk(state: &VmState, number: u32) -> Result<usize> {
    let name = format!("disk{number}");
    if let Some(i) = state
        .config
        .hardware
        .disks
        .iter()
        .position(|d| d.name == name)
    {
        return Ok(i);
    }
    let have: Vec<String> = state
        .config
        .hardware
        .disks
        .iter()
        .map(|d| d.name.trim_start_matches("disk").to_owned())
        .collect();
    let vm = &state.config.name;
    let in_checkpoints = !checkpoints_with_disk(state, &name).is_empty();
    Err(Error::InvalidArgument(format!(
        "VM \"{vm}\" has no disk {number}{}; {}",
        if in_checkpoints {
            " now (only checkpoints have it: applying one of them brings it back)"
        } else {
            ""
        },
        if have.is_empty() {
            "it has no disks".to_owned()
        } else {
            format!(
                "its disks are {} (`snapvisor vm disk list {}`)",
                have.join(", "),
                disk::shell_quote(Path::new(vm))
            )
        }
    )))
}

/// The state after disk `number` leaves Now (the layers are reconciled afterwards).
fn without_disk(state: &VmState, number: u32) -> Result<(VmState, usize)> {
    let position = find_disk(state, number)?;
    let mut next = state.clone();
    next.seq += 1;
    next.config.hardware.disks.remove(position);
    next.now.disks.remove(position);
    Ok((next, position))
}

/// What removing disk `number` from the VM in `dir` would do: the files deleted and kept,
/// and the merges of hidden layers it leads to. Reads only.
pub fn preview_remove_disk(dir: &Path, state: &VmState, number: u32) -> Result<DiskRemoval> {
    let (mut next, position) = without_disk(state, number)?;
    let name = format!("disk{number}");
    let preview = crate::preview::preview_reconcile(dir, &mut next)?;
    let size = |f: &str| {
        std::fs::metadata(dir.join(DISKS_DIR).join(f))
            .map(|m| m.len())
            .unwrap_or(0)
    };
    let mut deleted: Vec<(String, u64)> = preview
        .layers_removed
        .iter()
        .map(|f| (f.clone(), size(f)))
        .collect();
    // A merge removes a file too, but its data lives on in the layer it merged with.
    deleted.retain(|(f, _)| state.layers.get(f).is_some_and(|l| l.disk == name));
    let kept = next
        .layers
        .iter()
        .filter(|(_, l)| l.disk == name)
        .map(|(f, _)| {
            // A checkpoint uses its own layers and what they read through (a hidden
            // layer two checkpoints share).
            let users = next
                .checkpoints
                .iter()
                .filter(|c| {
                    c.disks.iter().any(|top| {
                        let mut at = Some(top);
                        while let Some(l) = at {
                            if l == f {
                                return true;
                            }
                            at = next.layers.get(l).and_then(|x| x.parent.as_ref());
                        }
                        false
                    })
                })
                .map(|c| c.name.clone())
                .collect();
            (f.clone(), users)
        })
        .collect();
    Ok(DiskRemoval {
        name,
        position,
        deleted,
        kept,
        preview,
    })
}

impl Vm {
    /// Now's disks, in the guest's order.
    pub fn disks(&self) -> Vec<DiskEntry> {
        list_disks(self.dir(), self.state())
    }

    /// Adds a disk to Now (the VM must be off): a new empty one or a copy of a file. The
    /// checkpoints keep their disk sets. Returns the new disk.
    pub fn add_disk(&mut self, source: &DiskSource) -> Result<DiskEntry> {
        let number = self.free_disk_number();
        let name = format!("disk{number}");
        let file = format!("{name}.vhdx");
        let disks_dir = self.dir().join(DISKS_DIR);
        std::fs::create_dir_all(&disks_dir).map_err(|e| Error::io(&disks_dir, e))?;
        let tmp = vhdx::temp_name(&disks_dir.join(&file));
        let _ = std::fs::remove_file(&tmp);
        let built = build_disk(source, &tmp).and_then(|()| {
            let id = vhdx::VhdxFile::open(&tmp, vhdx::OpenOptions::default())?.virtual_disk_id();
            fsutil::sync_dir(&disks_dir)?;
            Ok(id)
        });
        let disk_id = match built {
            Ok(id) => id,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        fsutil::crashpoint("vm disk add: disk built");
        let mut next = self.next_state();
        next.config.hardware.disks.push(DiskConfig {
            name: name.clone(),
            disk_id,
        });
        next.now.disks.push(file.clone());
        next.layers.insert(
            file.clone(),
            Layer {
                disk: name.clone(),
                parent: None,
            },
        );
        let tmp_rel = format!(
            "{DISKS_DIR}/{}",
            tmp.file_name().expect("a file name").to_string_lossy()
        );
        let mut journal = Journal::new(format!("vm disk add ({name})"));
        journal.steps.push(Step::LinkFile {
            from: tmp_rel.clone(),
            to: format!("{DISKS_DIR}/{file}"),
        });
        journal.steps.push(Step::Commit {
            state: Box::new(next),
        });
        journal.steps.push(Step::RemoveFile { path: tmp_rel });
        let result = self.run(journal);
        if result.is_err() && !self.state().layers.contains_key(&file) {
            let _ = std::fs::remove_file(&tmp);
        }
        result?;
        Ok(self
            .disks()
            .into_iter()
            .find(|d| d.name == name)
            .expect("just added"))
    }

    /// Removes disk `number` from Now (the VM must be off). Its layers that checkpoints
    /// use stay; the others are deleted. Returns what was deleted and kept, and what the
    /// reconciliation did.
    pub fn remove_disk(&mut self, number: u32) -> Result<(DiskRemoval, Reconciled)> {
        let removal = preview_remove_disk(self.dir(), self.state(), number)?;
        let (next, _) = without_disk(self.state(), number)?;
        self.commit(next)?;
        fsutil::crashpoint("vm disk remove: committed");
        let reconciled = self.reconcile();
        Ok((removal, reconciled))
    }

    /// The lowest N that no layer of the VM and no file in `disks/` carries as `diskN`.
    fn free_disk_number(&self) -> u32 {
        let state = self.state();
        let files: Vec<String> = std::fs::read_dir(self.dir().join(DISKS_DIR))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        (0..)
            .find(|n| {
                let name = format!("disk{n}");
                let stem = |f: &str| {
                    f.trim_start_matches('.')
                        .split(['.', '_'])
                        .next()
                        .is_some_and(|s| s == name)
                };
                !state.config.hardware.disks.iter().any(|d| d.name == name)
                    && !state.layers.values().any(|l| l.disk == name)
                    && !files.iter().any(|f| stem(f))
            })
            .expect("a free number")
    }
}

/// Copies an imported disk into a new dynamic VHDX at `path`, as every VM disk is stored.
pub(crate) fn import_as_dynamic_vhdx(source: &dyn disk::Disk, path: &Path) -> Result<()> {
    disk::convert(
        source,
        path,
        &disk::ConvertOptions {
            format: disk::OutputFormat::Vhdx {
                kind: vhdx::DiskKind::Dynamic,
                block_size: None,
            },
            physical_sector_size: 4096,
        },
        &mut |_, _| {},
    )?;
    Ok(())
}

/// Builds a new dynamic VHDX at `path` from `source`.
fn build_disk(source: &DiskSource, path: &Path) -> Result<()> {
    match source {
        DiskSource::Empty { size } => {
            vhdx::create(path, &vhdx::CreateParams::dynamic(*size))?;
        }
        DiskSource::Import { path: src, format } => {
            if !src.exists() {
                return Err(Error::InvalidArgument(format!(
                    "the disk to import {} does not exist",
                    src.display()
                )));
            }
            import_as_dynamic_vhdx(&*disk::open_as(src, false, *format)?, path)?;
        }
    }
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_numbers() {
        assert_eq!(disk_number("disk0"), Some(0));
        assert_eq!(disk_number("disk12"), Some(12));
        assert_eq!(disk_number("disk"), None);
        assert_eq!(disk_number("disk01"), None);
        assert_eq!(disk_number("data"), None);
    }
}
