//! The marker of a restore in progress in a VM's folder (see [`RESTORE_MARKER`]).

use crate::error::{Error, Result};
use std::path::Path;
use vhdx::ErrorKind;

/// The file in a VM's folder that says a restore into its disks began and did not end.
///
/// Written (atomically, then the folder synced) before the first byte of a disk is
/// restored, or for a restore as a new VM, with the VM's folder (which appears with it),
/// and removed after the last, so that a restore killed half way is not mistaken
/// for a VM whose disks are whole: [`VmHandle::start`](crate::VmHandle::start) and `backup create` refuse such a
/// VM, saying how to finish or undo the restore.
pub const RESTORE_MARKER: &str = "restore-in-progress.json";
pub(crate) const RESTORE_MARKER_VERSION: u32 = 1;

#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct RestoreMarker {
    pub(crate) version: u32,
    /// The point's id.
    pub(crate) point: String,
    /// The checkpoint that holds what the VM had before (an in-place restore without
    /// `discard`).
    pub(crate) kept_checkpoint: Option<String>,
    /// Whether the VM was created by the restore (`--as NAME`).
    pub(crate) new_vm: bool,
}

pub(crate) fn marker_bytes(marker: &RestoreMarker) -> Vec<u8> {
    serde_json::to_vec_pretty(marker).expect("a restore marker serializes")
}

pub(crate) fn mark_restoring(dir: &Path, marker: &RestoreMarker) -> Result<()> {
    vm::fsutil::atomic_write(&dir.join(RESTORE_MARKER), &marker_bytes(marker))?;
    Ok(())
}

/// The marker of a restore that created the VM in `dir` and did not end.
pub(crate) fn unfinished_new_vm(dir: &Path) -> Option<RestoreMarker> {
    let bytes = std::fs::read(dir.join(RESTORE_MARKER)).ok()?;
    serde_json::from_slice::<RestoreMarker>(&bytes)
        .ok()
        .filter(|m| m.new_vm)
}

pub(crate) fn unmark_restoring(dir: &Path) -> Result<()> {
    let path = dir.join(RESTORE_MARKER);
    std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
    vm::fsutil::sync_dir(dir)?;
    Ok(())
}

/// Why the VM in `dir` must not run or be backed up: a restore into it was interrupted.
/// `None` when no restore is pending.
pub(crate) fn interrupted_restore(dir: &Path, name: &str) -> Option<Error> {
    let bytes = std::fs::read(dir.join(RESTORE_MARKER)).ok()?;
    let quoted = disk::shell_quote(Path::new(name));
    let reason = match serde_json::from_slice::<RestoreMarker>(&bytes) {
        Ok(m) if m.new_vm => format!(
            "VM {name:?} was being restored from point {p} when the restore stopped, and its disks are incomplete: restore it again (snapvisor backup restore {p} --as {quoted}), which replaces it, or delete it (snapvisor vm delete {quoted})",
            p = short(&m.point)
        ),
        Ok(m) => match m.kept_checkpoint {
            Some(c) => format!(
                "a restore of point {p} into VM {name:?} stopped half way, and its disks are partly restored: run it again (snapvisor backup restore {p} --in-place), or go back to what the VM had (snapvisor checkpoint apply {quoted} {c})",
                p = short(&m.point),
                c = short(&c)
            ),
            None => format!(
                "a restore of point {p} into VM {name:?} stopped half way, and its disks are partly restored: run it again (snapvisor backup restore {p} --in-place)",
                p = short(&m.point)
            ),
        },
        Err(_) => format!(
            "a restore into VM {name:?} stopped half way ({} is unreadable): restore it again",
            dir.join(RESTORE_MARKER).display()
        ),
    };
    Some(Error::Refused {
        kind: ErrorKind::Invalid,
        reason,
    })
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}
