//! Whether a VM runs: the run states the worker records in `run/worker.json` and their
//! valid transitions ([`RunState::can_become`]).
//!
//! | from | to | when |
//! |---|---|---|
//! | off, saved, failed, stopped-unexpectedly | starting | a worker starts |
//! | starting | running | QEMU runs (with a saved state loaded, if there was one) |
//! | running | paused, and back | pause, resume |
//! | running, paused | saving | `vm save` begins |
//! | saving | saved | the state is written and synced, QEMU exits |
//! | saving | running | the save failed; the guest runs on |
//! | starting, running, paused, saving | off, failed | QEMU exited: shut down or turned off; crashed or never started |
//! | saved | off | the saved state is discarded (or found gone) |
//! | saved | failed | QEMU did not exit after saving and was killed |
//! | failed (and a dead worker's record) | off | `vm stop --force` clears it (the front end rewrites the record, under the VM's lock) |
//!
//! The worker is the only writer (see [`crate::record`]). Readers add two states of their
//! own, never recorded: a record that says the guest is up while the worker's liveness
//! lock (`run/.lock`) is free reads as `stopped-unexpectedly` (the worker died). Whether a
//! VM no worker runs is saved is the saved state file, not the record: with the file it
//! reads as `saved` whatever the record says (`off`, `failed`, or no record: the apply of
//! a checkpoint with memory makes the file, and no worker records that), and `saved`
//! without the file reads as `off`.

use serde::{Deserialize, Serialize};

/// Folder of sockets and the state record, inside the VM folder.
pub const RUN_DIR: &str = vm::journal::RUN_DIR;
/// Folder of the serial console and the worker's and QEMU's logs.
pub const LOG_DIR: &str = vm::journal::LOG_DIR;
/// The saved state (memory and devices) of a VM that `vm save` stopped.
pub const SAVED_STATE: &str = vm::journal::SAVED_STATE_FILE;

/// A VM's run state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// Not running, nothing saved.
    Off,
    /// The worker is setting up (disks, QEMU, a saved state loading).
    Starting,
    /// The guest runs.
    Running,
    /// The guest's processors are stopped.
    Paused,
    /// The guest's state is being written for `vm save`.
    Saving,
    /// Not running; the next start resumes the saved state.
    Saved,
    /// The worker died while the guest was up (derived, never recorded).
    StoppedUnexpectedly,
    /// The last start or run failed; the record says why.
    Failed,
}

impl RunState {
    /// The name used in listings and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Off => "off",
            RunState::Starting => "starting",
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Saving => "saving",
            RunState::Saved => "saved",
            RunState::StoppedUnexpectedly => "stopped-unexpectedly",
            RunState::Failed => "failed",
        }
    }

    /// The guest is up and its worker answers requests that act on it (running or
    /// paused): checkpoint operations go to the worker.
    pub fn is_live(self) -> bool {
        matches!(self, RunState::Running | RunState::Paused)
    }

    /// A worker is bringing the guest up or runs it: another start is refused.
    pub fn is_up(self) -> bool {
        matches!(
            self,
            RunState::Starting | RunState::Running | RunState::Paused
        )
    }

    /// Whether the worker may record `next` after `self` (staying put is always valid).
    pub fn can_become(self, next: RunState) -> bool {
        use RunState::*;
        self == next
            || match (self, next) {
                // A start, from any state in which no worker runs.
                (Off | Saved | Failed | StoppedUnexpectedly, Starting) => true,
                (Starting, Running) => true,
                (Running, Paused) | (Paused, Running) => true,
                (Running | Paused, Saving) => true,
                (Saving, Saved) => true,
                // A save that failed resumes the guest.
                (Saving, Running) => true,
                // QEMU exited (shut down, turned off, or crashed).
                (Starting | Running | Paused | Saving, Off | Failed) => true,
                // A saved state discarded, or found missing.
                (Saved, Off) => true,
                // QEMU failed to exit after writing the saved state (it was killed).
                (Saved, Failed) => true,
                _ => false,
            }
    }
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [RunState; 8] = [
        RunState::Off,
        RunState::Starting,
        RunState::Running,
        RunState::Paused,
        RunState::Saving,
        RunState::Saved,
        RunState::StoppedUnexpectedly,
        RunState::Failed,
    ];

    #[test]
    fn names_are_the_serialized_names() {
        for s in ALL {
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::Value::String(s.as_str().into())
            );
        }
    }

    #[test]
    fn the_paths_the_worker_takes_are_transitions() {
        use RunState::*;
        for path in [
            &[Off, Starting, Running, Paused, Running, Off][..],
            &[
                Off, Starting, Failed, Starting, Running, Saving, Saved, Starting, Running,
            ],
            &[Saved, Off],
            &[
                StoppedUnexpectedly,
                Starting,
                Running,
                Saving,
                Running,
                Failed,
            ],
        ] {
            for w in path.windows(2) {
                assert!(w[0].can_become(w[1]), "{} -> {}", w[0], w[1]);
            }
        }
        // Nothing comes back from the dead, and a saved VM only starts or is discarded.
        for s in ALL {
            assert!(!s.can_become(StoppedUnexpectedly) || s == StoppedUnexpectedly);
        }
        assert!(!Saved.can_become(Running));
        assert!(!Off.can_become(Running));
        assert!(!Saving.can_become(Paused));
    }
}
