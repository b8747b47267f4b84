//! A running VM as its worker holds it: QEMU and its QMP channel, the served disks, the
//! open [`vm::Vm`] (whose lock the worker keeps), and the record of the run state.
//! Every request the worker answers works on this.

use crate::error::{Context, Error, Result};
use crate::record::WorkerRecord;
use crate::run_state::RunState;
use crate::served::ServedDisk;
use std::path::PathBuf;
use std::process::Child;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The running VM (see the module doc).
pub(crate) struct Session {
    /// QEMU's QMP channel.
    pub(crate) qmp: qemu::Qmp,
    /// QEMU.
    pub(crate) child: Arc<Mutex<Child>>,
    /// The guest agent's socket.
    pub(crate) agent: PathBuf,
    /// The VM folder.
    pub(crate) dir: PathBuf,
    /// The run state, as last recorded.
    pub(crate) record: Mutex<WorkerRecord>,
    /// The VM (its lock is held for as long as the worker runs).
    pub(crate) vm: Arc<Mutex<vm::Vm>>,
    /// What each disk's NBD export serves, in the guest's order.
    pub(crate) disks: Vec<Arc<ServedDisk>>,
    /// Operations that pause or switch the guest run one at a time.
    pub(crate) op: Mutex<()>,
    /// QEMU was turned off rather than shut down by its guest.
    pub(crate) forced: AtomicBool,
}

/// Locks a mutex, going on with the data of a holder that panicked (every holder leaves
/// the data consistent between its steps).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Session {
    /// The VM.
    pub(crate) fn vm(&self) -> MutexGuard<'_, vm::Vm> {
        lock(&self.vm)
    }

    /// One operation that pauses or switches the guest at a time.
    pub(crate) fn exclusive(&self) -> MutexGuard<'_, ()> {
        lock(&self.op)
    }

    /// Flushes and closes every disk's chain (waiting for requests in flight). Only while
    /// the guest is paused or gone.
    pub(crate) fn detach_all(&self) -> Result<()> {
        for d in &self.disks {
            d.close().context("closing a disk before switching it")?;
        }
        Ok(())
    }

    /// Prepares a checkpoint of Now while the guest runs ([`vm::Vm::prepare_checkpoint`]):
    /// each disk's new layer is created from the file it serves.
    pub(crate) fn prepare_take(
        &self,
        name: Option<&str>,
        taken: vm::Taken,
    ) -> Result<vm::PreparedTake> {
        let mut vm = self.vm();
        let parents: Vec<PathBuf> = vm
            .state()
            .now
            .disks
            .iter()
            .map(|f| vm.layer_path(f))
            .collect();
        let disks = &self.disks;
        Ok(vm.prepare_checkpoint(name, taken, &mut |i, path| {
            disks[i]
                .prepare_child(&parents[i], path)
                .map_err(vm::Error::from)
        })?)
    }

    /// Flushes every served disk (the guest runs on).
    pub(crate) fn flush_all(&self) -> Result<()> {
        for d in &self.disks {
            disk::Disk::flush(&**d).context("flushing a disk before switching it")?;
        }
        Ok(())
    }

    /// Opens Now's layers and serves them.
    pub(crate) fn attach_now(&self) -> Result<()> {
        let paths: Vec<PathBuf> = {
            let vm = self.vm();
            vm.state()
                .now
                .disks
                .iter()
                .map(|f| vm.layer_path(f))
                .collect()
        };
        for (d, path) in self.disks.iter().zip(paths) {
            d.reopen(&path)
                .with_context(|| format!("cannot open disk {}", path.display()))?;
        }
        Ok(())
    }

    /// Records each disk's chain as it is now in its tracking file (after a switch), and
    /// with `freeze` freezes the changed set for that recovery checkpoint's backup (the
    /// guest must be paused: no change in flight). A failure is logged: the file keeps the
    /// old chain, so the next check finds it invalid, never wrong.
    pub(crate) fn track_chains(&self, freeze: Option<uuid::Uuid>) {
        for d in &self.disks {
            let Some(t) = d.tracker() else { continue };
            let seen = match d.with_chain(vm::tracking::chain_seen) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("change tracking: cannot read a served chain: {e}");
                    continue;
                }
            };
            let updated = match freeze {
                // Marking stopped after a failure: a backup's switch (no change in
                // flight) starts it over, with no reference; the backup's point becomes
                // the reference when it commits.
                Some(c) if t.is_dropped() => {
                    let mut fresh = vm::tracking::Tracking::new(disk::Disk::size(&**d), None, seen);
                    fresh.set_session(t.snapshot().session());
                    fresh.freeze(c);
                    t.restart(fresh)
                }
                _ => t.update(|t| {
                    t.set_chain(seen);
                    if let Some(c) = freeze {
                        t.freeze(c);
                    }
                }),
            };
            if let Err(e) = updated {
                tracing::warn!("change tracking: cannot record the switch: {e}");
            }
        }
    }

    /// A backup's end: its frozen sets become relative to `point`, or (without) go back
    /// into the current sets.
    pub(crate) fn settle_tracking(
        &self,
        checkpoint: uuid::Uuid,
        point: Option<&str>,
    ) -> Result<()> {
        for d in &self.disks {
            if let Some(t) = d.tracker() {
                t.update(|t| t.settle(checkpoint, point))?;
            }
        }
        Ok(())
    }

    /// Records a new run state (checked against the state machine) in `run/worker.json`.
    pub(crate) fn set_state(&self, state: RunState) -> Result<()> {
        let mut r = lock(&self.record);
        r.transition(state)?;
        r.write(&self.dir)
    }

    /// Fails unless the run state can become `state` now.
    pub(crate) fn can_become(&self, state: RunState) -> Result<()> {
        let from = lock(&self.record).state;
        if from.can_become(state) {
            Ok(())
        } else {
            Err(Error::Transition { from, to: state })
        }
    }

    /// Changes the run state in memory only; the worker writes it when QEMU is gone.
    pub(crate) fn note_state(&self, state: RunState) -> Result<()> {
        lock(&self.record).transition(state)
    }

    /// Whether QEMU exits within `timeout`.
    pub(crate) fn exited_within(&self, timeout: Duration) -> Result<bool> {
        let t = Instant::now();
        loop {
            if lock(&self.child)
                .try_wait()
                .map_err(|e| Error::io(&self.dir, e))?
                .is_some()
            {
                return Ok(true);
            }
            if t.elapsed() >= timeout {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills QEMU (SIGKILL).
    pub(crate) fn kill_qemu(&self) {
        let _ = lock(&self.child).kill();
    }
}
