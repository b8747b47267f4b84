//! `run/worker.json`: the worker's record of a VM's run state, and how readers derive
//! the state they report from it (see [`crate::run_state`] for the states).
//!
//! # Format
//!
//! `worker.json` carries `"format": 1`; a record without one (written before the field
//! existed) has the same layout and is read as such. A record that cannot be read at all
//! reads as no record: the VM is off, which is safe, because the worker of a VM that
//! really runs holds the VM's lock, and every command that would change the VM waits
//! for or refuses that lock.

use crate::error::{Error, Result};
use crate::run_state::{RUN_DIR, RunState, SAVED_STATE};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The worker's record, inside [`RUN_DIR`].
pub const RECORD_FILE: &str = "worker.json";
/// The layout version of [`RECORD_FILE`] this library writes.
pub const RECORD_FORMAT: u32 = 1;

/// What the worker records in `run/worker.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorkerRecord {
    /// Layout version ([`RECORD_FORMAT`]; 0 when absent: a record from before versions,
    /// same layout).
    #[serde(default)]
    pub format: u32,
    /// The recorded state (never [`RunState::StoppedUnexpectedly`]).
    pub state: RunState,
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

impl WorkerRecord {
    /// A new record of a worker starting now.
    pub fn starting(accel: qemu::Accel) -> WorkerRecord {
        WorkerRecord {
            format: RECORD_FORMAT,
            state: RunState::Starting,
            pid: std::process::id(),
            qemu_pid: None,
            error: None,
            started: vm::fsutil::now_unix(),
            accel: Some(accel.as_str().into()),
        }
    }

    /// Moves to `next`, refusing a transition the state machine does not have.
    pub fn transition(&mut self, next: RunState) -> Result<()> {
        if !self.state.can_become(next) {
            return Err(Error::Transition {
                from: self.state,
                to: next,
            });
        }
        self.state = next;
        Ok(())
    }

    /// Parses a record; `None` for anything that is not one this library reads.
    pub fn from_slice(bytes: &[u8]) -> Option<WorkerRecord> {
        let record: WorkerRecord = serde_json::from_slice(bytes).ok()?;
        (record.format <= RECORD_FORMAT && record.state != RunState::StoppedUnexpectedly)
            .then_some(record)
    }

    /// The accelerator the VM last ran with.
    pub fn accel(&self) -> Option<qemu::Accel> {
        self.accel.as_deref().and_then(qemu::Accel::from_name)
    }

    /// Writes the record atomically into the VM folder `vm_dir`.
    pub fn write(&self, vm_dir: &Path) -> Result<()> {
        let mut record = self.clone();
        record.format = RECORD_FORMAT;
        let bytes = serde_json::to_vec_pretty(&record).expect("the record serializes");
        vm::fsutil::atomic_write(&record_path(vm_dir), &bytes)?;
        Ok(())
    }
}

fn record_path(vm_dir: &Path) -> PathBuf {
    vm_dir.join(RUN_DIR).join(RECORD_FILE)
}

/// A VM's run state as reported, with the worker's record when there is one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunStatus {
    /// The state as reported (see the module doc for the derived states).
    pub state: RunState,
    /// The last record the worker wrote.
    pub record: Option<WorkerRecord>,
}

impl RunStatus {
    /// Reads the state of the VM in `vm_dir`.
    pub fn read(vm_dir: &Path) -> RunStatus {
        let path = record_path(vm_dir);
        let record = match std::fs::read(&path) {
            Ok(bytes) => {
                let r = WorkerRecord::from_slice(&bytes);
                if r.is_none() {
                    tracing::warn!(
                        "{} is not a worker record this snapvisor reads; the VM reads as off",
                        path.display()
                    );
                }
                r
            }
            Err(_) => None,
        };
        let saved = || vm_dir.join(SAVED_STATE).exists();
        let Some(record) = record else {
            return RunStatus {
                state: if saved() {
                    RunState::Saved
                } else {
                    RunState::Off
                },
                record: None,
            };
        };
        let worker_alive = || !vm::lock::Lock::is_free(&vm_dir.join(RUN_DIR));
        let state = match record.state {
            RunState::Starting | RunState::Running | RunState::Paused | RunState::Saving
                if !worker_alive() =>
            {
                RunState::StoppedUnexpectedly
            }
            // The saved state is the file, whoever made it: `vm save`, or the apply of a
            // checkpoint with memory (which no worker records). A start from it that
            // failed leaves it saved too, with the record's error.
            RunState::Off | RunState::Failed | RunState::Saved => {
                if saved() {
                    RunState::Saved
                } else if record.state == RunState::Saved {
                    RunState::Off
                } else {
                    record.state
                }
            }
            s => s,
        };
        RunStatus {
            state,
            record: Some(record),
        }
    }

    /// The worker's pid, when there is a record.
    pub fn worker_pid(&self) -> Option<u32> {
        self.record.as_ref().map(|r| r.pid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The saved state file makes a VM that no worker runs saved, whatever the last
    /// record says (an apply of a checkpoint with memory records nothing).
    #[test]
    fn a_saved_state_file_makes_a_stopped_vm_saved() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join(RUN_DIR)).unwrap();
        std::fs::create_dir_all(d.join(SAVED_STATE).parent().unwrap()).unwrap();
        let mut record = WorkerRecord::starting(qemu::Accel::Tcg);
        assert_eq!(RunStatus::read(d).state, RunState::Off);
        std::fs::write(d.join(SAVED_STATE), b"state").unwrap();
        assert_eq!(RunStatus::read(d).state, RunState::Saved, "no record");
        for (recorded, without_file) in [
            (RunState::Off, RunState::Off),
            (RunState::Failed, RunState::Failed),
            (RunState::Saved, RunState::Off),
        ] {
            record.state = recorded;
            record.write(d).unwrap();
            std::fs::write(d.join(SAVED_STATE), b"state").unwrap();
            assert_eq!(RunStatus::read(d).state, RunState::Saved, "{recorded}");
            std::fs::remove_file(d.join(SAVED_STATE)).unwrap();
            assert_eq!(RunStatus::read(d).state, without_file, "{recorded}");
        }
    }

    #[test]
    fn records_without_a_format_are_read() {
        let old = br#"{"state": "paused", "pid": 7, "qemu_pid": 8, "error": null, "started": 1}"#;
        let r = WorkerRecord::from_slice(old).unwrap();
        assert_eq!((r.format, r.state, r.accel), (0, RunState::Paused, None));
        let newer = br#"{"format": 2, "state": "paused", "pid": 7, "qemu_pid": 8, "error": null, "started": 1}"#;
        assert!(WorkerRecord::from_slice(newer).is_none());
        assert!(WorkerRecord::from_slice(b"{\"state\": \"dancing\"}").is_none());
    }
}
