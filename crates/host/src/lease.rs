//! Backup leases: how a running VM's worker tells a live backup's recovery checkpoint
//! from one whose `backup create` died.
//!
//! A recovery checkpoint lives while its backup copies the frozen layers. The VM's next
//! open removes one left behind, but a VM can run for months, and a recovery checkpoint
//! of a dead backup would keep an extra layer in the guest's chains all that time. So a
//! backup holds a *lease* while it lives: a file `run/backup-<uuid>.lease` in the VM
//! folder on which it holds an exclusive `flock` (which dies with its process, however it
//! dies). The worker writes the recovery checkpoint's id into the lease when it takes the
//! checkpoint, before answering. Before taking the next recovery checkpoint it *sweeps*:
//! every lease whose lock is free belongs to a dead backup, so the recovery checkpoint it
//! names (if any) is deleted live, then the lease file.
//!
//! Crash model: a lease is created under a temporary name, locked, then renamed into
//! place, so the worker never sees a lease that is not locked by a live backup or by none
//! (a dead one). A backup that dies before the worker recorded its id leaves an empty
//! lease; the worker records ids under its one-operation-at-a-time lock and sweeps under
//! it too, and a take whose lease is already gone or free when it records undoes its
//! checkpoint at once. A worker that dies leaves leases behind: the VM's next open
//! removes every recovery checkpoint anyway, and the next sweep the files.

use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use uuid::Uuid;

const PREFIX: &str = "backup-";
const SUFFIX: &str = ".lease";

/// A live backup's lease (the front end's side).
#[derive(Debug)]
pub(crate) struct Lease {
    path: PathBuf,
    name: String,
    /// Holds the `flock` for as long as the lease lives.
    _file: File,
}

impl Lease {
    /// Takes a new lease in the VM's run folder `run_dir`.
    pub(crate) fn take(run_dir: &Path) -> Result<Lease> {
        let name = format!("{PREFIX}{}{SUFFIX}", Uuid::new_v4().simple());
        let path = run_dir.join(&name);
        let tmp = vhdx::temp_name(&path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| Error::io(&tmp, e))?;
        let locked = file
            .try_lock()
            .map_err(|e| Error::io(&tmp, std::io::Error::other(e.to_string())))
            .and_then(|()| std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e)));
        if let Err(e) = locked {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(Lease {
            path,
            name,
            _file: file,
        })
    }

    /// The name the worker knows it by.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Ends the lease once its recovery checkpoint is gone. A lease dropped without this
    /// (its checkpoint could not be deleted) stays for the worker's next sweep.
    pub(crate) fn release(self) {
        if let Err(e) = vm::fsutil::remove_file(&self.path) {
            tracing::warn!(
                "cannot remove the backup lease {}: {e}",
                self.path.display()
            );
        }
    }
}

/// Whether `name` is a lease's file name (never a path elsewhere).
fn valid_name(name: &str) -> bool {
    name.strip_prefix(PREFIX)
        .and_then(|r| r.strip_suffix(SUFFIX))
        .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// The worker's side: records that lease `name` in `run_dir` owns checkpoint `id`.
/// `Ok(false)` when the backup that asked is already dead (its lease is gone or its lock
/// free): the caller removes the checkpoint at once.
pub(crate) fn record(run_dir: &Path, name: &str, id: Uuid) -> Result<bool> {
    if !valid_name(name) {
        return Err(Error::Refused {
            kind: vhdx::ErrorKind::Invalid,
            reason: format!("{name:?} is not a backup lease's name"),
        });
    }
    let path = run_dir.join(name);
    let mut file = match OpenOptions::new().write(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io(&path, e)),
    };
    if file.try_lock().is_ok() {
        // Nobody holds it: the backup died while its checkpoint was being taken.
        let _ = file.unlock();
        let _ = std::fs::remove_file(&path);
        return Ok(false);
    }
    // flock is advisory: the worker writes beside the backup's lock. No sync: a worker
    // that dies takes its recovery checkpoints with it at the VM's next open.
    file.write_all(id.to_string().as_bytes())
        .map_err(|e| Error::io(&path, e))?;
    Ok(true)
}

/// A lease whose backup is dead, locked by the sweeper until [`Stale::remove`].
pub(crate) struct Stale {
    path: PathBuf,
    /// The recovery checkpoint it names, if the worker recorded one.
    pub(crate) checkpoint: Option<Uuid>,
    _file: File,
}

impl Stale {
    /// Removes the lease file once its checkpoint is gone.
    pub(crate) fn remove(self) {
        if let Err(e) = vm::fsutil::remove_file(&self.path) {
            tracing::warn!(
                "cannot remove the backup lease {}: {e}",
                self.path.display()
            );
        }
    }
}

/// The leases in `run_dir` whose backups are dead (their locks free), each locked.
pub(crate) fn stale(run_dir: &Path) -> Vec<Stale> {
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str().filter(|n| valid_name(n)) else {
            continue;
        };
        let path = run_dir.join(name);
        let Ok(mut file) = File::open(&path) else {
            continue;
        };
        if file.try_lock().is_err() {
            continue; // a live backup
        }
        let mut text = String::new();
        let _ = file.read_to_string(&mut text);
        out.push(Stale {
            path,
            checkpoint: Uuid::parse_str(text.trim()).ok(),
            _file: file,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lease_is_live_and_a_dropped_one_stale_with_its_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let a = Lease::take(dir.path()).unwrap();
        let b = Lease::take(dir.path()).unwrap();
        let id = Uuid::new_v4();
        assert!(record(dir.path(), a.name(), id).unwrap());
        assert!(stale(dir.path()).is_empty(), "both leases are held");
        drop(a);
        let s = stale(dir.path());
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].checkpoint, Some(id));
        s.into_iter().for_each(Stale::remove);
        // A lease released normally leaves nothing; one dead before its record is refused.
        let name = b.name().to_owned();
        b.release();
        assert!(!record(dir.path(), &name, id).unwrap());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert!(record(dir.path(), "../vm.json", id).is_err());
    }
}
