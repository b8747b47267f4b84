//! Checkpoints of a running VM, done by its worker.
//!
//! The worker holds the VM's lock for as long as the VM runs, so every command that
//! changes the checkpoint tree of a running VM is a request to the worker, which runs the
//! same [`vm::Vm`] operations as for a stopped VM, around what only it can do: quiesce the
//! guest, pause it, switch the disks it is served onto new layers, keep its memory.
//!
//! # Taking a checkpoint
//!
//! 1. Production types: the guest agent freezes the guest's file systems (its hooks can
//!    flush applications first). If it does not answer within [`AGENT_BOUND`], a
//!    `production` checkpoint falls back to a standard one (and records that it did);
//!    `production-only` fails before anything is touched.
//! 2. While the guest still runs, the take is prepared ([`vm::Vm::prepare_checkpoint`]):
//!    its journal (tentative: undone, not finished, if the worker dies before step 4),
//!    the checkpoint's config, and each disk's new empty layer, created from the file the
//!    disk serves once that file's DataWriteGuid is settled (so the child keeps linking to
//!    it whatever the guest writes meanwhile); then every disk is flushed.
//! 3. `stop`: QEMU drains and flushes its requests to the NBD server.
//! 4. Every disk's chain is flushed (only the last instants' writes) and closed, the take
//!    commits (`vm.json`: the old layers become the checkpoint's, the new ones Now's), and
//!    the exports switch to the new layers; a backup's recovery checkpoint also freezes
//!    the change tracking here. The commit happens before the guest writes again, so no
//!    acknowledged write can land in a layer the tree does not know. This is all the
//!    guest is paused for.
//! 5. A standard checkpoint keeps memory and device state: QEMU's background snapshot
//!    writes the state as of this instant while the guest already runs again (it resumes
//!    the guest itself); where it is not available the guest stays paused while the state
//!    is written. The file is renamed into place once complete and synced; a checkpoint
//!    whose memory never arrived (the worker died meanwhile) is removed at the next open
//!    of the VM, leaving the tree as before it was taken.
//! 6. `cont`, then the thaw, whatever failed on the way: the freeze never outlives the
//!    request; the take's journal is removed after `cont`.

use crate::error::{Context, Error, Result};
use crate::protocol::{Capture, LiveDelete, MemoryKept, Quiesce};
use crate::qemu_process::{self, migration_setup, wait_migration};
use crate::session::Session;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use vhdx::ErrorKind;
use vm::{CheckpointKind, CheckpointType, Consistency};

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// How long the guest agent gets to connect and freeze before a production checkpoint falls
/// back to a standard one.
pub const AGENT_BOUND: Duration = Duration::from_secs(3);

/// Deletes a checkpoint (or its subtree) of the running VM: the tree changes at once, the
/// layers outside the running chains merge as for a stopped VM, and those of the running
/// chains merge under the guest ([`crate::live_merge`]).
pub(crate) fn delete(session: &Session, query: &str, subtree: bool) -> Result<LiveDelete> {
    let _op = session.exclusive();
    let mut vm = session.vm();
    let id = vm.find_checkpoint(query)?;
    let checkpoints_removed = if subtree {
        vm.state().subtree(id).len()
    } else {
        1
    };
    let name = vm.state().checkpoint(id).expect("found").name.clone();
    let reconciled = vm.delete_checkpoint(query, subtree)?;
    drop(vm);
    // The layers of the running chains merge under the guest.
    let (live_merges, live_merge_failed) = match crate::live_merge::merge_all(session) {
        Ok(m) => (m, None),
        Err(e) => {
            tracing::warn!("{}", e.chain());
            (Vec::new(), Some(e.chain()))
        }
    };
    // The merges changed the chains (not what they read): the tracker records them.
    session.track_chains(None);
    let vm = session.vm();
    // Whatever could not merge live merges once the VM stops.
    let merge_when_stopped: Vec<String> = vm
        .state()
        .hidden_layers()
        .into_iter()
        .filter(|(_, d)| *d < 2)
        .map(|(l, _)| l)
        .collect();
    Ok(LiveDelete {
        deleted: id,
        name,
        checkpoints_removed,
        reconciled,
        live_merges,
        live_merge_failed,
        merge_when_stopped,
    })
}

/// The guest agent, frozen: thawed on every path out.
struct Frozen {
    agent: Option<qemu::GuestAgent>,
    path: std::path::PathBuf,
    /// When the freeze was asked for: the guest's writers block from about then.
    asked: Instant,
}

impl Frozen {
    fn freeze(path: &std::path::Path) -> Result<Frozen> {
        let mut agent = qemu::GuestAgent::connect(path, AGENT_BOUND)
            .context("the guest agent does not answer")?;
        // A freeze left by a dead worker would make this one fail: thaw first.
        if agent.freeze_status(AGENT_BOUND).ok().as_deref() == Some("frozen") {
            let _ = agent.thaw(SECS(10));
        }
        let mut frozen = Frozen {
            agent: None,
            path: path.to_owned(),
            asked: Instant::now(),
        };
        match agent.freeze(SECS(10)) {
            Ok(_) => {
                frozen.agent = Some(agent);
                Ok(frozen)
            }
            Err(e) => {
                // It may have frozen some file systems before failing.
                frozen.agent = Some(agent);
                frozen.thaw();
                Err(e).context("the guest agent did not freeze the guest")
            }
        }
    }

    /// Thaws, reconnecting if the channel broke; logs (never hides) a failure.
    fn thaw(&mut self) {
        let Some(mut agent) = self.agent.take() else {
            return;
        };
        for attempt in 0..5 {
            match agent.thaw(SECS(10)) {
                Ok(_) => return,
                Err(e) => {
                    tracing::error!("thawing the guest (attempt {}): {e}", attempt + 1);
                    std::thread::sleep(Duration::from_millis(200));
                    match qemu::GuestAgent::connect(&self.path, SECS(5)) {
                        Ok(a) => agent = a,
                        Err(e) => tracing::error!("reconnecting to the guest agent: {e}"),
                    }
                }
            }
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.thaw();
    }
}

/// Takes a checkpoint of the running (or paused) VM.
pub(crate) fn take(session: &Session, name: Option<&str>) -> Result<Capture> {
    let _op = session.exclusive();
    let ctype = {
        let vm = session.vm();
        vm.check_can_take()?;
        if let Some(n) = name {
            vm::config::validate_checkpoint_name(n)?;
        }
        vm.state().config.checkpoint_type
    };
    let was_paused = guest_stopped(session)?;
    let mut fallback = None;
    let mut frozen: Option<Frozen> = None;
    if matches!(
        ctype,
        CheckpointType::Production | CheckpointType::ProductionOnly
    ) {
        (frozen, fallback) = try_freeze(session, was_paused);
        if ctype == CheckpointType::ProductionOnly
            && let Some(why) = &fallback
        {
            return Err(Error::Refused {
                kind: ErrorKind::Unsupported,
                reason: format!(
                    "no production checkpoint: {why}; the checkpoint type is production-only, so nothing was taken (set --checkpoint-type production to fall back to a standard checkpoint)"
                ),
            });
        }
    }
    let frozen_at = Instant::now();
    let taken = if frozen.is_some() {
        vm::Taken {
            kind: CheckpointKind::Production,
            consistency: Consistency::ApplicationConsistent,
            has_memory: false,
        }
    } else {
        vm::Taken {
            kind: CheckpointKind::Standard,
            consistency: Consistency::CrashConsistentWithMemory,
            has_memory: true,
        }
    };
    capture_thawed(
        session, name, taken, was_paused, frozen, frozen_at, fallback,
    )
}

/// Takes a backup's recovery checkpoint: frozen through the agent as `quiesce` asks;
/// with memory and device state only when `memory` (a `saved-state` backup, which copies
/// the state file too); otherwise the backup copies only its disk layers while the guest
/// runs on, then deletes it. First removes the recovery checkpoints of backups that died
/// ([`crate::lease`]); records the new one in the backup's `lease`.
pub(crate) fn take_recovery(
    session: &Session,
    name: &str,
    quiesce: Quiesce,
    memory: bool,
    lease: Option<&str>,
) -> Result<Capture> {
    sweep_dead_backups(session);
    let op = session.exclusive();
    vm::config::validate_checkpoint_name(name)?;
    let was_paused = guest_stopped(session)?;
    let mut fallback = None;
    let mut frozen: Option<Frozen> = None;
    if quiesce != Quiesce::Skip {
        (frozen, fallback) = try_freeze(session, was_paused);
        if quiesce == Quiesce::Required
            && let Some(why) = &fallback
        {
            return Err(Error::Refused {
                kind: ErrorKind::Unsupported,
                reason: format!(
                    "no application-consistent backup: {why}; nothing was taken (use --mode auto or crash for a crash-consistent backup)"
                ),
            });
        }
    }
    let frozen_at = Instant::now();
    let taken = vm::Taken {
        kind: CheckpointKind::Recovery,
        consistency: if frozen.is_some() {
            Consistency::ApplicationConsistent
        } else if memory {
            Consistency::CrashConsistentWithMemory
        } else {
            Consistency::CrashConsistent
        },
        has_memory: memory,
    };
    let capture = capture_thawed(
        session,
        Some(name),
        taken,
        was_paused,
        frozen,
        frozen_at,
        fallback,
    )?;
    let Some(lease) = lease else {
        return Ok(capture);
    };
    let run_dir = session.dir.join(crate::run_state::RUN_DIR);
    match crate::lease::record(&run_dir, lease, capture.id) {
        Ok(true) => Ok(capture),
        recorded => {
            drop(op);
            // Nobody will copy or delete it: the backup that asked is gone (or its lease
            // unusable, so it could not be swept later).
            if let Err(e) = delete(session, &capture.id.to_string(), false) {
                tracing::warn!(
                    "removing the recovery checkpoint {}: {}",
                    capture.id,
                    e.chain()
                );
            }
            match recorded {
                Err(e) => Err(e).context("the backup's lease"),
                _ => Err(Error::Refused {
                    kind: ErrorKind::Invalid,
                    reason: "the backup that asked for the recovery checkpoint is gone, so it was removed again".into(),
                }),
            }
        }
    }
}

/// Deletes (merging live) the recovery checkpoints whose backups died; logs, never
/// fails: a checkpoint that stays is removed by the next sweep or the VM's next open.
fn sweep_dead_backups(session: &Session) {
    let run_dir = session.dir.join(crate::run_state::RUN_DIR);
    // Under the operation lock, so that no take is between its capture and its record.
    let stale = {
        let _op = session.exclusive();
        crate::lease::stale(&run_dir)
    };
    for s in stale {
        let left = s.checkpoint.filter(|id| {
            session
                .vm()
                .state()
                .checkpoint(*id)
                .is_some_and(|c| c.kind == CheckpointKind::Recovery)
        });
        if let Some(id) = left {
            tracing::warn!("removing the recovery checkpoint {id}, left by a backup that died");
            if let Err(e) = delete(session, &id.to_string(), false) {
                tracing::warn!("removing the recovery checkpoint {id}: {}", e.chain());
                continue;
            }
        }
        s.remove();
    }
}

/// Whether the guest's processors are stopped, so that a take must leave them stopped.
/// Not only `paused`: once QEMU has written a paused guest's memory without the background
/// snapshot (a standard or saved-state take of a paused VM), its status is `postmigrate`;
/// a take that read only `paused` as paused then resumed a guest the user had paused.
fn guest_stopped(session: &Session) -> Result<bool> {
    Ok(session.qmp.status(SECS(5))? != "running")
}

/// Freezes the guest's file systems through its agent, or says why not.
fn try_freeze(session: &Session, was_paused: bool) -> (Option<Frozen>, Option<String>) {
    if was_paused {
        return (
            None,
            Some("the VM is paused, so its guest agent cannot quiesce it".to_owned()),
        );
    }
    match Frozen::freeze(&session.agent) {
        Ok(f) => (Some(f), None),
        Err(e) => (None, Some(e.chain())),
    }
}

/// [`capture`], then the thaw (dropping `frozen`), with the freeze timings recorded.
fn capture_thawed(
    session: &Session,
    name: Option<&str>,
    taken: vm::Taken,
    was_paused: bool,
    frozen: Option<Frozen>,
    frozen_at: Instant,
    fallback: Option<String>,
) -> Result<Capture> {
    let result = capture(session, name, taken, was_paused);
    let freeze_asked = frozen.as_ref().map(|f| f.asked);
    drop(frozen);
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
    let mut capture = result?;
    capture.fallback = fallback;
    // From the freeze call's return (every file system frozen) to the thaw's; and from
    // the freeze request, which includes the guest flushing its dirty data first.
    capture.frozen_ms = freeze_asked.map(|_| ms(frozen_at));
    capture.freeze_to_thaw_ms = freeze_asked.map(ms);
    Ok(capture)
}

/// Pauses the guest, switches its disks onto new layers (the journaled take), keeps its
/// memory for a standard checkpoint, and lets it run again.
fn capture(
    session: &Session,
    name: Option<&str>,
    taken: vm::Taken,
    was_paused: bool,
) -> Result<Capture> {
    let qmp = &session.qmp;
    // Everything but the commit is done while the guest runs: the journal, the
    // checkpoint's config, the new empty layers, and a flush, so that the switch's own
    // flush has only the last instants' writes. The guest is paused for the commit alone.
    let prepared = session.prepare_take(name, taken)?;
    if let Err(e) = session.flush_all() {
        abandon(session, prepared);
        return Err(e);
    }
    qmp.drain_events();
    let paused_at = Instant::now();
    if !was_paused && let Err(e) = qmp.execute("stop", Value::Null, SECS(10)) {
        abandon(session, prepared);
        return Err(e.into());
    }
    let resume = |session: &Session| {
        if !was_paused && let Err(e) = session.qmp.execute("cont", Value::Null, SECS(10)) {
            tracing::error!("resuming the guest: {e}");
        }
    };
    let switched = (|| -> Result<uuid::Uuid> {
        session.detach_all()?;
        let detached = paused_at.elapsed();
        let committed = session.vm().commit_prepared(&prepared);
        let took = paused_at.elapsed();
        // Whether or not the take committed, serve what Now is.
        let attached = session.attach_now();
        tracing::debug!(?detached, ?took, attached = ?paused_at.elapsed(), "switch steps");
        let id = committed?;
        attached?;
        Ok(id)
    })();
    let id = match switched {
        Ok(id) => id,
        Err(e) => {
            resume(session);
            abandon(session, prepared);
            return Err(e);
        }
    };
    // Still paused: a backup's changed set is frozen at exactly this switch, and the
    // guest's writes are timed from it for the backup's report.
    let recovery = taken.kind == CheckpointKind::Recovery;
    session.track_chains(recovery.then_some(id));
    if recovery {
        session.disks.iter().for_each(|d| d.watch_writes());
    }
    tracing::debug!(tracked = ?paused_at.elapsed(), "switch steps");
    let switch_ms = paused_at.elapsed().as_secs_f64() * 1e3;
    let mut memory = None;
    let paused_ms;
    if taken.has_memory {
        match keep_memory(session, id, was_paused) {
            Ok((m, p)) => {
                memory = Some(m);
                paused_ms = p.unwrap_or(switch_ms);
            }
            Err(e) => {
                resume(session);
                finish(session, prepared);
                // The checkpoint must not claim memory it does not have: take it back
                // (its layer merges with Now's once the VM stops).
                let undo = session.vm().delete_checkpoint(&id.to_string(), false);
                if let Err(u) = undo {
                    tracing::error!("removing checkpoint {id} after its memory failed: {u}");
                }
                return Err(e).context(
                    "the memory of the checkpoint could not be kept, so the checkpoint was removed",
                );
            }
        }
    } else {
        resume(session);
        paused_ms = event_gap(qmp).unwrap_or(paused_at.elapsed().as_secs_f64() * 1e3);
    }
    finish(session, prepared);
    let vm = session.vm();
    let c = vm.state().checkpoint(id).expect("just taken");
    Ok(Capture {
        id,
        name: c.name.clone(),
        kind: c.kind,
        consistency: c.consistency,
        has_memory: c.has_memory,
        paused_ms,
        switch_ms,
        memory,
        fallback: None,
        frozen_ms: None,
        freeze_to_thaw_ms: None,
    })
}

/// Removes a committed take's journal; one that stays is finished at the next open.
fn finish(session: &Session, prepared: vm::PreparedTake) {
    let id = prepared.id();
    if let Err(e) = session.vm().finish_prepared(prepared) {
        tracing::warn!("checkpoint {id} is taken, but its journal stays for the next open: {e}");
    }
}

/// Undoes a prepared take that will not be committed (one that did commit is kept).
fn abandon(session: &Session, prepared: vm::PreparedTake) {
    let id = prepared.id();
    if let Err(e) = session.vm().abandon_prepared(prepared) {
        tracing::warn!("cannot undo the prepared checkpoint {id} (the next open will): {e}");
    }
}

/// The pause the guest saw, from QEMU's own STOP and RESUME timestamps.
fn event_gap(qmp: &qemu::Qmp) -> Option<f64> {
    let stop = qmp.wait_event("STOP", SECS(1)).ok()?;
    let resume = qmp.wait_event("RESUME", SECS(5)).ok()?;
    (stop.micros > 0 && resume.micros >= stop.micros)
        .then(|| (resume.micros - stop.micros) as f64 / 1e3)
}

/// Writes the guest's memory and device state as of now into the checkpoint's folder.
/// Returns what was written and, with the background snapshot, the pause the guest saw.
fn keep_memory(
    session: &Session,
    id: uuid::Uuid,
    was_paused: bool,
) -> Result<(MemoryKept, Option<f64>)> {
    let qmp = &session.qmp;
    let file = session.vm().memory_path(id);
    let tmp = file.with_extension("vsv.partial");
    let _ = std::fs::remove_file(&tmp);
    migration_setup(qmp)?;
    // The background snapshot copies memory while the guest runs (write-protecting it);
    // it resumes a paused guest by itself, so a guest the user paused is saved paused.
    let background = !was_paused
        && qmp
            .execute(
                "migrate-set-capabilities",
                json!({"capabilities": [{"capability": "background-snapshot", "state": true}]}),
                SECS(5),
            )
            .is_ok();
    let t = Instant::now();
    let finished =
        qemu_process::migrate_to(qmp, &tmp).and_then(|()| wait_migration(qmp, SECS(300)));
    if background {
        let _ = qmp.execute(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "background-snapshot", "state": false}]}),
            SECS(5),
        );
    }
    if let Err(e) = finished {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let paused = if background {
        // STOP (ours), then RESUME once QEMU has the device state.
        event_gap(qmp)
    } else {
        if !was_paused {
            qmp.execute("cont", Value::Null, SECS(10))?;
        }
        None
    };
    qemu_process::keep_file(&tmp, &file)?;
    let bytes = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    Ok((
        MemoryKept {
            file,
            bytes,
            background,
            ms: t.elapsed().as_secs_f64() * 1e3,
        },
        paused,
    ))
}
