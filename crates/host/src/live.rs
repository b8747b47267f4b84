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
//! 2. `stop`: QEMU drains and flushes its requests to the NBD server.
//! 3. Every disk's chain is flushed and closed, the journaled take of [`vm::Vm`] runs (the
//!    old layers become the checkpoint's, new children become Now's), and the exports
//!    switch to the new layers. The commit happens before the guest writes again, so no
//!    acknowledged write can land in a layer the tree does not know.
//! 4. A standard checkpoint keeps memory and device state: QEMU's background snapshot
//!    writes the state as of this instant while the guest already runs again (it resumes
//!    the guest itself); where it is not available the guest stays paused while the state
//!    is written. The file is renamed into place once complete and synced; a checkpoint
//!    whose memory never arrived (the worker died meanwhile) is removed at the next open
//!    of the VM, leaving the tree as before it was taken.
//! 5. `cont`, then the thaw, whatever failed on the way: the freeze never outlives the
//!    request.

use crate::worker::{Shared, migration_setup, shell_quote, wait_migration};
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use vm::{CheckpointKind, CheckpointType, Consistency};

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// How long the guest agent gets to connect and freeze before a production checkpoint falls
/// back to a standard one.
pub const AGENT_BOUND: Duration = Duration::from_secs(3);

/// Answers `{"cmd": "checkpoint", "op": ...}` from the CLI.
pub fn checkpoint_request(shared: &Shared, req: &Value) -> Result<Value> {
    let _op = shared.op.lock().unwrap_or_else(|p| p.into_inner());
    let query = req["checkpoint"].as_str().unwrap_or_default();
    match req["op"].as_str().unwrap_or_default() {
        "create" => take(shared, req["name"].as_str()),
        "delete" => {
            let subtree = req["subtree"].as_bool().unwrap_or(false);
            let mut vm = shared.vm();
            let id = vm.find_checkpoint(query)?;
            let count = if subtree {
                vm.state().subtree(id).len()
            } else {
                1
            };
            let name = vm.state().checkpoint(id).expect("found").name.clone();
            let r = vm.delete_checkpoint(query, subtree)?;
            drop(vm);
            // The layers of the running chains merge under the guest.
            let (live, failed) = match crate::live_merge::merge_all(shared) {
                Ok(m) => (m, None),
                Err(e) => {
                    tracing::warn!("{e:#}");
                    (Vec::new(), Some(format!("{e:#}")))
                }
            };
            let vm = shared.vm();
            // Whatever could not merge live merges once the VM stops.
            let waiting: Vec<String> = vm
                .state()
                .hidden_layers()
                .into_iter()
                .filter(|(_, d)| *d < 2)
                .map(|(l, _)| l)
                .collect();
            Ok(json!({
                "deleted": id, "name": name, "checkpoints_removed": count,
                "reconciled": r, "live_merges": live, "live_merge_failed": failed,
                "merge_when_stopped": waiting,
            }))
        }
        "rename" => {
            let new = req["new_name"].as_str().unwrap_or_default();
            let id = shared.vm().rename_checkpoint(query, new)?;
            Ok(json!({"renamed": id}))
        }
        "export" => {
            let dest = std::path::PathBuf::from(req["dir"].as_str().unwrap_or_default());
            let id = shared.vm().export_checkpoint(query, &dest)?;
            Ok(json!({"exported": id}))
        }
        "settings" => {
            let checkpoint_type = match req["checkpoint_type"].as_str() {
                None => None,
                Some(t) => Some(
                    serde_json::from_value::<CheckpointType>(json!(t))
                        .with_context(|| format!("unknown checkpoint type {t:?}"))?,
                ),
            };
            shared.vm().set(&vm::Settings {
                checkpoint_type,
                max_checkpoints: req["max_checkpoints"].as_u64().map(|n| n as u32),
                automatic_checkpoints: req["automatic_checkpoints"].as_bool(),
                ..Default::default()
            })?;
            Ok(json!({"ok": true}))
        }
        other => bail!("unknown checkpoint operation {other:?}"),
    }
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
                Err(anyhow::Error::new(e).context("the guest agent did not freeze the guest"))
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
fn take(shared: &Shared, name: Option<&str>) -> Result<Value> {
    let ctype = {
        let vm = shared.vm();
        vm.check_can_take()?;
        if let Some(n) = name {
            vm::config::validate_checkpoint_name(n)?;
        }
        vm.state().config.checkpoint_type
    };
    let was_paused = shared.qmp.status(SECS(5))? == "paused";
    let mut fallback = None;
    let mut frozen: Option<Frozen> = None;
    if matches!(
        ctype,
        CheckpointType::Production | CheckpointType::ProductionOnly
    ) {
        if was_paused {
            fallback = Some("the VM is paused, so its guest agent cannot quiesce it".to_owned());
        } else {
            match Frozen::freeze(&shared.agent) {
                Ok(f) => frozen = Some(f),
                Err(e) => fallback = Some(format!("{e:#}")),
            }
        }
        if ctype == CheckpointType::ProductionOnly
            && let Some(why) = &fallback
        {
            bail!(
                "no production checkpoint: {why}; the checkpoint type is production-only, so nothing was taken (set --checkpoint-type production to fall back to a standard checkpoint)"
            );
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
    let result = capture(shared, name, taken, was_paused);
    let freeze_asked = frozen.as_ref().map(|f| f.asked);
    drop(frozen);
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
    let mut out = result?;
    out["fallback"] = json!(fallback);
    // From the freeze call's return (every file system frozen) to the thaw's; and from
    // the freeze request, which includes the guest flushing its dirty data first.
    out["frozen_ms"] = json!(freeze_asked.map(|_| ms(frozen_at)));
    out["freeze_to_thaw_ms"] = json!(freeze_asked.map(ms));
    Ok(out)
}

/// Pauses the guest, switches its disks onto new layers (the journaled take), keeps its
/// memory for a standard checkpoint, and lets it run again.
fn capture(
    shared: &Shared,
    name: Option<&str>,
    taken: vm::Taken,
    was_paused: bool,
) -> Result<Value> {
    let qmp = &shared.qmp;
    qmp.drain_events();
    let paused_at = Instant::now();
    if !was_paused {
        qmp.execute("stop", Value::Null, SECS(10))?;
    }
    let resume = |shared: &Shared| {
        if !was_paused && let Err(e) = shared.qmp.execute("cont", Value::Null, SECS(10)) {
            tracing::error!("resuming the guest: {e}");
        }
    };
    let switched = (|| -> Result<uuid::Uuid> {
        shared.detach_all()?;
        let taken_id = shared.vm().create_checkpoint_taken(name, Some(taken));
        // Whether or not the take committed, serve what Now is.
        let attached = shared.attach_now();
        let id = taken_id?;
        attached?;
        Ok(id)
    })();
    let id = match switched {
        Ok(id) => id,
        Err(e) => {
            resume(shared);
            return Err(e);
        }
    };
    let switch_ms = paused_at.elapsed().as_secs_f64() * 1e3;
    let mut memory = Value::Null;
    let paused_ms;
    if taken.has_memory {
        match keep_memory(shared, id, was_paused) {
            Ok((m, p)) => {
                memory = m;
                paused_ms = p.unwrap_or(switch_ms);
            }
            Err(e) => {
                resume(shared);
                // The checkpoint must not claim memory it does not have: take it back
                // (its layer merges with Now's once the VM stops).
                let undo = shared.vm().delete_checkpoint(&id.to_string(), false);
                if let Err(u) = undo {
                    tracing::error!("removing checkpoint {id} after its memory failed: {u}");
                }
                return Err(e.context(
                    "the memory of the checkpoint could not be kept, so the checkpoint was removed",
                ));
            }
        }
    } else {
        resume(shared);
        paused_ms = event_gap(qmp).unwrap_or(paused_at.elapsed().as_secs_f64() * 1e3);
    }
    let vm = shared.vm();
    let c = vm.state().checkpoint(id).expect("just taken");
    Ok(json!({
        "id": id,
        "name": c.name,
        "kind": c.kind.as_str(),
        "consistency": c.consistency.as_str(),
        "has_memory": c.has_memory,
        "paused_ms": paused_ms,
        "switch_ms": switch_ms,
        "memory": memory,
    }))
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
fn keep_memory(shared: &Shared, id: uuid::Uuid, was_paused: bool) -> Result<(Value, Option<f64>)> {
    let qmp = &shared.qmp;
    let file = shared.vm().memory_path(id);
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
    let started = qmp.execute(
        "migrate",
        json!({"uri": format!("exec:cat > {}", shell_quote(&tmp))}),
        SECS(10),
    );
    let finished = started
        .map_err(anyhow::Error::new)
        .and_then(|_| wait_migration(qmp, SECS(300)));
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
    // QEMU does not sync what it wrote.
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &file)?;
    vm::fsutil::sync_dir_of(&file)?;
    let size = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    Ok((
        json!({
            "file": file, "bytes": size, "background": background,
            "ms": t.elapsed().as_secs_f64() * 1e3,
        }),
        paused,
    ))
}
