//! Exclusive locks on a VM folder (and on the store's name space).
//!
//! A lock is an `flock` on a hidden `.lock` file, so it dies with its holder: a killed
//! command never leaves a stale lock. The holder writes who it is (pid and command) into
//! the file, and a command that finds the lock taken reports that, or waits for it.

use crate::error::{Error, Result};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::Path;
use std::time::{Duration, Instant};

/// Name of the lock file inside a VM folder or the store.
pub const LOCK_FILE: &str = ".lock";

/// A held lock; released when dropped.
#[derive(Debug)]
pub struct Lock {
    file: File,
}

/// What a VM's worker records in the VM's lock: a command refused by it is refused
/// because the VM runs, and is told to stop it rather than to wait.
pub const WORKER_COMMAND: &str = "vm worker (the VM is running)";

impl Lock {
    /// Takes the exclusive lock of `dir`, waiting at most `wait` for the holder to finish.
    /// `who` names the VM (or the store) in errors, `what` is recorded for other commands.
    pub fn acquire(dir: &Path, who: &str, what: &str, wait: Duration) -> Result<Lock> {
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let deadline = Instant::now() + wait;
        let mut told = false;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) => {
                    let holder = read_holder(&mut file);
                    if Instant::now() >= deadline {
                        if holder.contains(WORKER_COMMAND) {
                            return Err(Error::Running { vm: who.to_owned() });
                        }
                        return Err(Error::Busy {
                            vm: who.to_owned(),
                            holder,
                        });
                    }
                    if !told {
                        tracing::warn!("waiting for VM {who:?}: {holder}");
                        told = true;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(TryLockError::Error(e)) => return Err(Error::io(&path, e)),
            }
        }
        let note = format!(
            "pid {} is running `{what}` since {}",
            std::process::id(),
            crate::fsutil::format_time(crate::fsutil::now_unix())
        );
        // Best effort: the note only serves messages.
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = file.write_all(note.as_bytes());
        Ok(Lock { file })
    }

    /// Whether `dir`'s lock is free right now (without keeping it).
    pub fn is_free(dir: &Path) -> bool {
        let Ok(file) = File::open(dir.join(LOCK_FILE)) else {
            return true;
        };
        match file.try_lock() {
            Ok(()) => {
                let _ = file.unlock();
                true
            }
            Err(_) => false,
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = self.file.set_len(0);
        let _ = self.file.unlock();
    }
}

fn read_holder(file: &mut File) -> String {
    let mut s = String::new();
    let _ = file.rewind();
    let _ = file.read_to_string(&mut s);
    if s.trim().is_empty() {
        "another snapvisor command holds it".into()
    } else {
        s.trim().to_owned()
    }
}
