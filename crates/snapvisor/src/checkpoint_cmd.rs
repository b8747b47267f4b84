//! `snapvisor checkpoint ...`: the checkpoint tree of a VM.

use crate::disk_cmd::print_json;
use crate::units::{human, progress_bar};
use crate::vm_cmd::StoreArgs;
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use uuid::Uuid;
use vm::{Reconciled, Store, Vm, VmState};

#[derive(Subcommand, Debug)]
pub enum CheckpointCommand {
    /// Take a checkpoint.
    Create(CreateArgs),
    /// Show the checkpoint tree with the Now marker.
    List(VmJson),
    /// Go back to a checkpoint (Now's changes are discarded unless --save-current).
    Apply(ApplyArgs),
    /// Delete a checkpoint (its layer is merged), or a whole subtree.
    Delete(DeleteArgs),
    /// Rename a checkpoint.
    Rename(RenameArgs),
    /// Write a standalone VM folder as of a checkpoint (disks flattened).
    Export(ExportArgs),
}

#[derive(Args, Debug)]
pub struct VmJson {
    /// The VM.
    vm: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// The VM.
    vm: String,
    /// The checkpoint's name [default: "VM (YYYY-MM-DD hh:mm:ss)", UTC].
    #[arg(long)]
    name: Option<String>,
    /// Print the new checkpoint as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct ApplyArgs {
    /// The VM.
    vm: String,
    /// The checkpoint: a name or an id (or an id's first 8+ characters).
    checkpoint: String,
    /// Checkpoint the current state first instead of discarding it.
    #[arg(long)]
    save_current: bool,
    /// Start the VM afterwards (a checkpoint without memory comes back off; one with
    /// memory comes back saved, or running if the VM was running).
    #[arg(long)]
    start: bool,
    /// Accelerator for the start [default: the one the VM last ran with, else as `vm
    /// start`].
    #[arg(long, value_enum)]
    accel: Option<crate::vm_cmd::AccelArg>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    /// The VM.
    vm: String,
    /// The checkpoint: a name or an id.
    checkpoint: String,
    /// Delete the checkpoint and every checkpoint below it.
    #[arg(long)]
    subtree: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct RenameArgs {
    /// The VM.
    vm: String,
    /// The checkpoint: a name or an id.
    checkpoint: String,
    /// The new name (1 to 100 characters).
    new_name: String,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The VM.
    vm: String,
    /// The checkpoint: a name or an id.
    checkpoint: String,
    /// The new VM folder (must not exist, or be empty).
    dir: PathBuf,
}

/// The VM's folder when its worker runs it (running or paused): then the worker does
/// the checkpoint operations.
fn running(store: &Store, name: &str) -> Option<PathBuf> {
    let (dir, _, _) = store.read_vm(name).ok()?;
    matches!(
        host::worker::run_state(&dir).0.as_str(),
        "running" | "paused"
    )
    .then_some(dir)
}

/// Sends a checkpoint operation to the worker of a running VM.
fn live_request(dir: &Path, vm: &str, mut req: Value) -> Result<Value> {
    req["cmd"] = json!("checkpoint");
    host::worker::request(dir, &req, std::time::Duration::from_secs(3600))
        .with_context(|| format!("the running VM {vm:?} refused"))
}

impl CheckpointCommand {
    fn vm(&self) -> &str {
        match self {
            CheckpointCommand::Create(a) => &a.vm,
            CheckpointCommand::List(a) => &a.vm,
            CheckpointCommand::Apply(a) => &a.vm,
            CheckpointCommand::Delete(a) => &a.vm,
            CheckpointCommand::Rename(a) => &a.vm,
            CheckpointCommand::Export(a) => &a.vm,
        }
    }
}

pub fn run(cmd: CheckpointCommand, store: &StoreArgs) -> Result<ExitCode> {
    let store = store.open()?;
    let live = running(&store, cmd.vm());
    match (cmd, live) {
        (CheckpointCommand::Create(a), Some(dir)) => {
            let reply = live_request(&dir, &a.vm, json!({"op": "create", "name": a.name}))
                .with_context(|| format!("cannot checkpoint VM {:?}", a.vm))?;
            let (dir, s, _) = store.read_vm(&a.vm)?;
            let id: Uuid = serde_json::from_value(reply["id"].clone())?;
            let c = s
                .checkpoint(id)
                .context("the worker's checkpoint is not in the tree")?;
            if a.json {
                let mut doc = checkpoint_json(&dir, &s, c);
                doc["capture"] = reply.clone();
                print_json(&doc)?;
            } else {
                println!(
                    "created checkpoint {:?} ({}) of the running VM: {}, {}; the guest was paused {:.1} ms{}",
                    c.name,
                    c.id,
                    c.kind.as_str(),
                    c.consistency.as_str(),
                    reply["paused_ms"].as_f64().unwrap_or(0.0),
                    reply["frozen_ms"]
                        .as_f64()
                        .map(|f| format!(", its file systems frozen {f:.1} ms"))
                        .unwrap_or_default()
                );
                if let Some(why) = reply["fallback"].as_str() {
                    println!("  fell back to a standard checkpoint: {why}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        (CheckpointCommand::Create(a), None) => {
            let mut vm = open(&store, &a.vm, "checkpoint create")?;
            let id = vm
                .create_checkpoint(a.name.as_deref())
                .with_context(|| format!("cannot checkpoint VM {:?}", a.vm))?;
            let s = vm.state();
            let c = s.checkpoint(id).expect("just taken");
            if a.json {
                print_json(&checkpoint_json(vm.dir(), s, c))?;
            } else {
                println!("created checkpoint {:?} ({})", c.name, c.id);
            }
            Ok(ExitCode::SUCCESS)
        }
        (CheckpointCommand::List(a), _) => list(&store, &a.vm, a.json),
        (CheckpointCommand::Apply(a), live) => apply(&store, a, live),
        (CheckpointCommand::Delete(a), Some(dir)) => {
            let reply = live_request(
                &dir,
                &a.vm,
                json!({"op": "delete", "checkpoint": a.checkpoint, "subtree": a.subtree}),
            )
            .with_context(|| format!("cannot delete {:?} of VM {:?}", a.checkpoint, a.vm))?;
            let r: Reconciled = serde_json::from_value(reply["reconciled"].clone())?;
            if a.json {
                print_json(&json!({
                    "deleted": reply["deleted"], "checkpoints_removed": reply["checkpoints_removed"],
                    "merged": merged_json(&r), "layers_removed": r.removed,
                    "live_merges": reply["live_merges"],
                    "live_merge_failed": reply["live_merge_failed"],
                    "merge_when_stopped": reply["merge_when_stopped"],
                }))?;
            } else {
                println!(
                    "deleted checkpoint {} ({})",
                    reply["name"],
                    reply["deleted"].as_str().unwrap_or_default()
                );
                for m in &r.merged {
                    println!("  merged layer {} into {}", m.removed, m.into);
                }
                for m in reply["live_merges"].as_array().into_iter().flatten() {
                    println!(
                        "  merged layer {} into {} under the running guest ({}, {} in {:.2} s; requests held {:.1} ms at the switch)",
                        m["removed"].as_str().unwrap_or_default(),
                        m["into"].as_str().unwrap_or_default(),
                        m["direction"].as_str().unwrap_or_default(),
                        human(m["bytes_copied"].as_u64().unwrap_or(0)),
                        m["copy_seconds"].as_f64().unwrap_or(0.0),
                        m["switch_ms"].as_f64().unwrap_or(0.0),
                    );
                }
                if let Some(e) = reply["live_merge_failed"].as_str() {
                    eprintln!("snapvisor: {e}");
                }
                for l in reply["merge_when_stopped"].as_array().into_iter().flatten() {
                    println!(
                        "  layer {} of the running disks merges when the VM stops",
                        l.as_str().unwrap_or_default()
                    );
                }
            }
            report_failed_merge(&a.vm, &r)
        }
        (CheckpointCommand::Rename(a), Some(dir)) => {
            let reply = live_request(
                &dir,
                &a.vm,
                json!({"op": "rename", "checkpoint": a.checkpoint, "new_name": a.new_name}),
            )
            .with_context(|| format!("cannot rename {:?} of VM {:?}", a.checkpoint, a.vm))?;
            println!(
                "renamed checkpoint {} to {:?}",
                reply["renamed"].as_str().unwrap_or_default(),
                a.new_name
            );
            Ok(ExitCode::SUCCESS)
        }
        (CheckpointCommand::Export(a), Some(dir)) => {
            let dest = std::path::absolute(&a.dir)?;
            let reply = live_request(
                &dir,
                &a.vm,
                json!({"op": "export", "checkpoint": a.checkpoint, "dir": dest}),
            )
            .with_context(|| format!("cannot export {:?} of VM {:?}", a.checkpoint, a.vm))?;
            println!(
                "exported checkpoint {} to {}",
                reply["exported"].as_str().unwrap_or_default(),
                a.dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        (CheckpointCommand::Delete(a), None) => {
            let mut vm = open(&store, &a.vm, "checkpoint delete")?;
            let id = vm.find_checkpoint(&a.checkpoint)?;
            let name = vm.state().checkpoint(id).expect("found").name.clone();
            let count = if a.subtree {
                vm.state().subtree(id).len()
            } else {
                1
            };
            let r =
                with_merge_progress(&mut vm, |vm| vm.delete_checkpoint(&a.checkpoint, a.subtree))
                    .with_context(|| format!("cannot delete {:?} of VM {:?}", a.checkpoint, a.vm))?;
            if a.json {
                print_json(&json!({
                    "deleted": id, "checkpoints_removed": count, "merged": merged_json(&r),
                    "layers_removed": r.removed,
                }))?;
            } else {
                if count > 1 {
                    println!(
                        "deleted checkpoint {name:?} ({id}) and the {} below it",
                        count - 1
                    );
                } else {
                    println!("deleted checkpoint {name:?} ({id})");
                }
                for m in &r.merged {
                    println!("  merged layer {} into {}", m.removed, m.into);
                }
            }
            report_failed_merge(&a.vm, &r)
        }
        (CheckpointCommand::Rename(a), None) => {
            let mut vm = open(&store, &a.vm, "checkpoint rename")?;
            let id = vm
                .rename_checkpoint(&a.checkpoint, &a.new_name)
                .with_context(|| format!("cannot rename {:?} of VM {:?}", a.checkpoint, a.vm))?;
            println!("renamed checkpoint {id} to {:?}", a.new_name);
            Ok(ExitCode::SUCCESS)
        }
        (CheckpointCommand::Export(a), None) => {
            let mut vm = open(&store, &a.vm, "checkpoint export")?;
            let bar = progress_bar("flattening");
            let b = bar.clone();
            vm.set_progress(Box::new(move |_, d, t| {
                b.set_length(t);
                b.set_position(d);
            }));
            let id = vm
                .export_checkpoint(&a.checkpoint, &a.dir)
                .with_context(|| format!("cannot export {:?} of VM {:?}", a.checkpoint, a.vm))?;
            bar.finish_and_clear();
            println!("exported checkpoint {id} to {}", a.dir.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn open(store: &Store, name: &str, what: &str) -> Result<Vm> {
    if let Ok(dir) = store.read_vm(name).map(|(d, _, _)| d)
        && host::worker::run_state(&dir).0 == "saved"
    {
        anyhow::bail!(
            "VM {name:?} is saved, and its saved memory belongs to its current disks; start it (`snapvisor vm start {name}`) or discard the saved state (`snapvisor vm stop {name}`) first"
        );
    }
    store
        .open_vm(name, what)
        .with_context(|| format!("cannot open VM {name:?}"))
}

fn with_merge_progress<T>(vm: &mut Vm, f: impl FnOnce(&mut Vm) -> T) -> T {
    let bar = progress_bar("merging");
    let b = bar.clone();
    vm.set_progress(Box::new(move |_, d, t| {
        b.set_length(t);
        b.set_position(d);
    }));
    let out = f(vm);
    bar.finish_and_clear();
    out
}

fn merged_json(r: &Reconciled) -> Value {
    json!(
        r.merged
            .iter()
            .map(|m| json!({"removed": m.removed, "into": m.into}))
            .collect::<Vec<_>>()
    )
}

/// The tree changed; a merge that failed afterwards is reported, and the command fails so
/// that scripts notice, though nothing is lost.
fn report_failed_merge(vm: &str, r: &Reconciled) -> Result<ExitCode> {
    if let Some(e) = &r.failed {
        eprintln!(
            "snapvisor: merging the layers left behind failed: {e}; they stay as hidden layers (nothing is lost): fix the cause and run `snapvisor vm consolidate {vm}`"
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn layer_size(dir: &Path, file: &str) -> u64 {
    std::fs::metadata(dir.join("disks").join(file))
        .map(|m| m.len())
        .unwrap_or(0)
}

fn disks_json(dir: &Path, s: &VmState, names: &[String], files: &[String]) -> Value {
    json!(
        files
            .iter()
            .enumerate()
            .map(|(i, f)| json!({
                "disk": names.get(i).cloned().unwrap_or_else(|| s.layers[f].disk.clone()),
                "file": dir.join("disks").join(f),
                "size": layer_size(dir, f),
            }))
            .collect::<Vec<_>>()
    )
}

fn checkpoint_json(dir: &Path, s: &VmState, c: &vm::Checkpoint) -> Value {
    let names: Vec<String> = c.disks.iter().map(|f| s.layers[f].disk.clone()).collect();
    json!({
        "id": c.id,
        "name": c.name,
        "parent": c.parent,
        "created": vm::fsutil::format_time(c.created),
        "created_unix": c.created,
        "type": c.kind.as_str(),
        "consistency": c.consistency.as_str(),
        "has_memory": c.has_memory,
        "size": c.disks.iter().map(|f| layer_size(dir, f)).sum::<u64>(),
        "disks": disks_json(dir, s, &names, &c.disks),
    })
}

/// `checkpoint list --json`'s document.
pub fn list_json(dir: &Path, s: &VmState, unfinished: Option<&str>) -> Value {
    let now_names: Vec<String> = s
        .config
        .hardware
        .disks
        .iter()
        .map(|d| d.name.clone())
        .collect();
    json!({
        "vm": s.config.name,
        "now": {
            "parent": s.now.parent,
            "size": s.now.disks.iter().map(|f| layer_size(dir, f)).sum::<u64>(),
            "disks": disks_json(dir, s, &now_names, &s.now.disks),
        },
        "checkpoints": s.checkpoints.iter().map(|c| checkpoint_json(dir, s, c)).collect::<Vec<_>>(),
        "hidden_layers": s.hidden_layers().into_iter().map(|(f, _)| json!({
            "disk": s.layers[&f].disk,
            "file": dir.join("disks").join(&f),
            "size": layer_size(dir, &f),
            "dependants": s.dependants(&f),
        })).collect::<Vec<_>>(),
        "unfinished_operation": unfinished,
    })
}

fn list(store: &Store, name: &str, as_json: bool) -> Result<ExitCode> {
    let (dir, s, unfinished) = store
        .read_vm(name)
        .with_context(|| format!("cannot read VM {name:?}"))?;
    if as_json {
        print_json(&list_json(&dir, &s, unfinished.as_deref()))?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut out = String::new();
    if s.checkpoints.is_empty() {
        out.push_str(&format!("{} has no checkpoints\n", s.config.name));
    }
    render(&dir, &s, None, "", &mut out);
    let hidden = s.hidden_layers();
    if !hidden.is_empty() {
        out.push_str("hidden layers (no checkpoint uses them; kept while two or more layers depend on them):\n");
        for (f, n) in hidden {
            out.push_str(&format!(
                "  {f}  {}  {n} dependants\n",
                human(layer_size(&dir, &f))
            ));
        }
    }
    if let Some(op) = unfinished {
        out.push_str(&format!("unfinished operation: {op}\n"));
    }
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

/// Draws the children of `parent` (and Now where it hangs) below `prefix`.
fn render(dir: &Path, s: &VmState, parent: Option<Uuid>, prefix: &str, out: &mut String) {
    let children = s.children(parent);
    let now_here = s.now.parent == parent;
    let count = children.len() + usize::from(now_here);
    let mut i = 0;
    for c in children {
        i += 1;
        let last = i == count;
        let (branch, next) = branch(parent, last, prefix);
        let size: u64 = c.disks.iter().map(|f| layer_size(dir, f)).sum();
        out.push_str(&format!(
            "{branch}{}  [{}, {}{}, {}, {}, {}]\n",
            c.name,
            c.kind.as_str(),
            c.consistency.as_str(),
            if c.has_memory { ", memory" } else { "" },
            vm::fsutil::format_time(c.created),
            human(size),
            &c.id.to_string()[..8]
        ));
        render(dir, s, Some(c.id), &next, out);
    }
    if now_here {
        let (branch, _) = branch(parent, true, prefix);
        let size: u64 = s.now.disks.iter().map(|f| layer_size(dir, f)).sum();
        out.push_str(&format!("{branch}▶ Now  [{}]\n", human(size)));
    }
}

fn branch(parent: Option<Uuid>, last: bool, prefix: &str) -> (String, String) {
    if parent.is_none() {
        return (String::new(), String::new());
    }
    if last {
        (format!("{prefix}└─ "), format!("{prefix}   "))
    } else {
        (format!("{prefix}├─ "), format!("{prefix}│  "))
    }
}

/// `checkpoint apply`. On a running VM the current state is discarded as Hyper-V does
/// (the VM is turned off; with `--save-current` it is checkpointed live first), then the
/// checkpoint is applied as for a stopped VM. A checkpoint with memory leaves the VM
/// saved as of the checkpoint; a VM that was running is started again, so it comes back
/// running from the checkpoint's instant. `--start` starts it in every case.
fn apply(store: &Store, a: ApplyArgs, live: Option<PathBuf>) -> Result<ExitCode> {
    let mut was_running = None;
    let mut saved_live = None;
    let last_accel = |dir: &Path| {
        host::worker::run_state(dir)
            .1
            .and_then(|r| r.accel)
            .and_then(|a| qemu::Accel::from_name(&a))
    };
    if let Some(dir) = live {
        // A typo must not turn the VM off.
        let (_, s, _) = store.read_vm(&a.vm)?;
        vm::vm::find_checkpoint(&s, &a.checkpoint)?;
        if a.save_current {
            let reply = live_request(&dir, &a.vm, json!({"op": "create"}))
                .with_context(|| format!("cannot save the current state of VM {:?}", a.vm))?;
            saved_live = Some(serde_json::from_value::<Uuid>(reply["id"].clone())?);
        }
        let accel = last_accel(&dir);
        crate::lifecycle::stop_worker(&dir, &a.vm, true, 10)
            .with_context(|| format!("cannot turn VM {:?} off to apply", a.vm))?;
        was_running = Some(accel);
    }
    let mut vm = open(store, &a.vm, "checkpoint apply")?;
    let target = vm.find_checkpoint(&a.checkpoint)?;
    let saved = vm
        .apply(&a.checkpoint, a.save_current && saved_live.is_none())
        .with_context(|| format!("cannot apply {:?} to VM {:?}", a.checkpoint, a.vm))?
        .or(saved_live);
    let r = with_merge_progress(&mut vm, Vm::reconcile);
    let s = vm.state().clone();
    let dir = vm.dir().to_owned();
    drop(vm);
    let name = &s.checkpoint(target).expect("applied").name;
    let has_saved_state = dir.join(host::worker::SAVED_STATE).exists();
    let start = a.start || (was_running.is_some() && has_saved_state);
    if start {
        let accel = a
            .accel
            .map(Into::into)
            .or(was_running.flatten())
            .or_else(|| last_accel(&dir));
        crate::lifecycle::start_quiet(store, &a.vm, accel, 120)
            .with_context(|| format!("applied {name:?}, but VM {:?} did not start", a.vm))?;
    }
    let state = host::worker::run_state(&dir).0;
    if a.json {
        print_json(&json!({
            "applied": target,
            "saved_current": saved,
            "generation_id": s.config.generation_id,
            "merged": merged_json(&r),
            "state": state,
        }))?;
    } else {
        if let Some(id) = saved {
            let c = s.checkpoint(id).expect("saved");
            println!("saved the current state as checkpoint {:?} ({id})", c.name);
        }
        println!("applied checkpoint {name:?} ({target}); the VM is {state}");
    }
    report_failed_merge(&a.vm, &r)
}
