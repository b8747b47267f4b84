//! `snapvisor checkpoint ...`: the checkpoint tree of a VM.

use crate::render::print_json;
use crate::units::{bar_progress, human, progress_bar};
use crate::vm_cmd::StoreArgs;
use anyhow::Result;
use clap::{Args, Subcommand};
use host::info::{CheckpointInfo, CheckpointTree, LayerInfo};
use host::{ApplyOptions, Host};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::ExitCode;
use uuid::Uuid;
use vm::Reconciled;

#[derive(Subcommand, Debug)]
pub enum CheckpointCommand {
    /// Take a checkpoint.
    Create(CreateArgs),
    /// Show the checkpoint tree with the Now marker.
    List(ListArgs),
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
pub struct ListArgs {
    /// The VM.
    vm: String,
    /// Also show recovery checkpoints (a running backup's).
    #[arg(long)]
    all: bool,
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
    /// Do not ask for confirmation before discarding the current state (asked only when
    /// stdin is a terminal and --save-current is not given).
    #[arg(long, short = 'y')]
    yes: bool,
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
    /// Show the checkpoints it would remove and the merges (direction, bytes) that would
    /// follow, and change nothing.
    #[arg(long)]
    dry_run: bool,
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

pub fn run(cmd: CheckpointCommand, store: &StoreArgs) -> Result<ExitCode> {
    let host = store.open()?;
    match cmd {
        CheckpointCommand::Create(a) => create(&host, a),
        CheckpointCommand::List(a) => list(&host, &a.vm, a.all, a.json),
        CheckpointCommand::Apply(a) => apply(&host, a),
        CheckpointCommand::Delete(a) if a.dry_run => {
            crate::safety::tree_dry_run(&host, &a.vm, Some((&a.checkpoint, a.subtree)), a.json)
        }
        CheckpointCommand::Delete(a) => delete(&host, a),
        CheckpointCommand::Rename(a) => {
            let id = host
                .vm(&a.vm)
                .rename_checkpoint(&a.checkpoint, &a.new_name)?;
            println!("renamed checkpoint {id} to \"{}\"", a.new_name);
            Ok(ExitCode::SUCCESS)
        }
        CheckpointCommand::Export(a) => {
            let bar = progress_bar("flattening");
            let id = host
                .vm(&a.vm)
                .export_checkpoint(&a.checkpoint, &a.dir, bar_progress(&bar))?;
            bar.finish_and_clear();
            println!("exported checkpoint {id} to {}", a.dir.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn create(host: &Host, a: CreateArgs) -> Result<ExitCode> {
    let was = host.vm(&a.vm).run_status().map(|r| r.state).ok();
    let taken = host.vm(&a.vm).checkpoint(a.name.as_deref())?;
    let c = &taken.checkpoint;
    if a.json {
        let mut doc = checkpoint_json(c);
        if let Some(capture) = &taken.capture {
            doc["capture"] = serde_json::to_value(capture)?;
        }
        print_json(&doc)?;
        return Ok(ExitCode::SUCCESS);
    }
    match &taken.capture {
        None => println!("created checkpoint \"{}\" ({})", c.name, c.id),
        Some(capture) => {
            println!(
                "created checkpoint \"{}\" ({}) of the {} VM: {}, {}; the guest was paused {:.1} ms{}",
                c.name,
                c.id,
                if was == Some(host::RunState::Paused) {
                    "paused"
                } else {
                    "running"
                },
                c.kind.as_str(),
                c.consistency.as_str(),
                capture.paused_ms,
                capture
                    .frozen_ms
                    .map(|f| format!(", its file systems frozen {f:.1} ms"))
                    .unwrap_or_default()
            );
            if let Some(why) = &capture.fallback {
                println!("  fell back to a standard checkpoint: {why}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn delete(host: &Host, a: DeleteArgs) -> Result<ExitCode> {
    let bar = progress_bar("merging");
    let d = host
        .vm(&a.vm)
        .delete_checkpoint(&a.checkpoint, a.subtree, bar_progress(&bar))?;
    bar.finish_and_clear();
    let r = &d.reconciled;
    match &d.live {
        None if a.json => print_json(&json!({
            "deleted": d.id, "checkpoints_removed": d.checkpoints_removed,
            "merged": merged_json(r), "layers_removed": r.removed,
        }))?,
        Some(live) if a.json => print_json(&json!({
            "deleted": d.id, "checkpoints_removed": d.checkpoints_removed,
            "merged": merged_json(r), "layers_removed": r.removed,
            "live_merges": live.live_merges,
            "live_merge_failed": live.live_merge_failed,
            "merge_when_stopped": live.merge_when_stopped,
        }))?,
        None => {
            if d.checkpoints_removed > 1 {
                println!(
                    "deleted checkpoint \"{}\" ({}) and the {} below it",
                    d.name,
                    d.id,
                    d.checkpoints_removed - 1
                );
            } else {
                println!("deleted checkpoint \"{}\" ({})", d.name, d.id);
            }
            for m in &r.merged {
                println!("  merged layer {} into {}", m.removed, m.into);
            }
        }
        Some(live) => {
            // The name as JSON quotes it.
            println!("deleted checkpoint {} ({})", json!(d.name), d.id);
            for m in &r.merged {
                println!("  merged layer {} into {}", m.removed, m.into);
            }
            for m in &live.live_merges {
                println!(
                    "  merged layer {} into {} under the running guest ({}, {} in {:.2} s; requests held {:.1} ms at the switch)",
                    m.removed,
                    m.into,
                    direction_name(m.direction),
                    human(m.bytes_copied),
                    m.copy_seconds,
                    m.switch_ms,
                );
            }
            if let Some(e) = &live.live_merge_failed {
                eprintln!("snapvisor: {e}");
            }
            for l in &live.merge_when_stopped {
                println!("  layer {l} of the running disks merges when the VM stops");
            }
        }
    }
    report_failed_merge(&a.vm, r)
}

fn direction_name(d: vm::journal::Direction) -> &'static str {
    match d {
        vm::journal::Direction::IntoParent => "into-parent",
        vm::journal::Direction::IntoChild => "into-child",
    }
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
            "snapvisor: merging the layers left behind failed: {e}; they stay as hidden layers (nothing is lost): fix the cause and run `snapvisor vm consolidate {}`",
            disk::shell_quote(std::path::Path::new(vm))
        );
        return Ok(crate::exit::merge_left_behind());
    }
    Ok(ExitCode::SUCCESS)
}

fn disks_json(disks: &[LayerInfo]) -> Value {
    json!(
        disks
            .iter()
            .map(|d| json!({"disk": d.disk, "file": d.file, "size": d.size}))
            .collect::<Vec<_>>()
    )
}

fn checkpoint_json(c: &CheckpointInfo) -> Value {
    json!({
        "id": c.id,
        "name": c.name,
        "parent": c.parent,
        "created": vm::fsutil::format_time(c.created),
        "created_unix": c.created,
        "type": c.kind.as_str(),
        "consistency": c.consistency.as_str(),
        "has_memory": c.has_memory,
        "size": c.size(),
        "disks": disks_json(&c.disks),
    })
}

/// `checkpoint list --json`'s document.
pub fn list_json(t: &CheckpointTree) -> Value {
    json!({
        "vm": t.vm,
        "now": {
            "parent": t.now_parent,
            "size": t.now_size(),
            "disks": disks_json(&t.now),
        },
        "checkpoints": t.checkpoints.iter().map(checkpoint_json).collect::<Vec<_>>(),
        "hidden_layers": t.hidden_layers.iter().map(|h| json!({
            "disk": h.disk,
            "file": h.file,
            "size": h.size,
            "dependants": h.dependants,
        })).collect::<Vec<_>>(),
        "unfinished_operation": t.unfinished,
    })
}

fn list(host: &Host, name: &str, all: bool, as_json: bool) -> Result<ExitCode> {
    let mut tree = host.vm(name).checkpoints()?;
    if !all {
        tree = tree.without_recovery();
    }
    if as_json {
        print_json(&list_json(&tree))?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut out = String::new();
    if tree.checkpoints.is_empty() {
        out.push_str(&format!("{} has no checkpoints\n", tree.vm));
    }
    render(&tree, None, "", &mut out);
    if !tree.hidden_layers.is_empty() {
        out.push_str("hidden layers (no checkpoint uses them; kept while two or more layers depend on them):\n");
        for h in &tree.hidden_layers {
            out.push_str(&format!(
                "  {}  {}  {} dependants\n",
                h.name,
                human(h.size),
                h.dependants.len()
            ));
        }
    }
    if let Some(op) = &tree.unfinished {
        out.push_str(&format!("unfinished operation: {op}\n"));
    }
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

/// Draws the children of `parent` (and Now where it hangs) below `prefix`.
fn render(t: &CheckpointTree, parent: Option<Uuid>, prefix: &str, out: &mut String) {
    let children = t.children(parent);
    let now_here = t.now_parent == parent;
    let count = children.len() + usize::from(now_here);
    let mut i = 0;
    for c in children {
        i += 1;
        let last = i == count;
        let (branch, next) = branch(parent, last, prefix);
        out.push_str(&format!(
            "{branch}{}  [{}, {}{}, {}, {}, {}]\n",
            c.name,
            c.kind.as_str(),
            c.consistency.as_str(),
            if c.has_memory { ", memory" } else { "" },
            vm::fsutil::format_time(c.created),
            human(c.size()),
            &c.id.to_string()[..8]
        ));
        render(t, Some(c.id), &next, out);
    }
    if now_here {
        let (branch, _) = branch(parent, true, prefix);
        out.push_str(&format!("{branch}▶ Now  [{}]\n", human(t.now_size())));
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

/// `checkpoint apply`: see [`host::VmHandle::apply`].
fn apply(host: &Host, a: ApplyArgs) -> Result<ExitCode> {
    if !a.save_current && !a.yes && std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        // A name that does not resolve fails before the question, not after it.
        let (_, state, _) = host.store().read_vm(&a.vm)?;
        let id = vm::vm::find_checkpoint(&state, &a.checkpoint)?;
        let name = state.checkpoint(id).map_or("", |c| c.name.as_str());
        let question = format!(
            "apply checkpoint \"{name}\" to VM \"{}\"? its current state (everything since its \
             last checkpoint) is discarded; --save-current keeps it",
            a.vm
        );
        if !crate::safety::confirm(&question, a.yes)? {
            anyhow::bail!("not applied: the answer was not yes");
        }
    }
    let bar = progress_bar("merging");
    let applied = host.vm(&a.vm).apply(
        &a.checkpoint,
        &ApplyOptions {
            save_current: a.save_current,
            start: a.start,
            accel: a.accel.map(Into::into),
        },
        bar_progress(&bar),
    )?;
    bar.finish_and_clear();
    if a.json {
        print_json(&json!({
            "applied": applied.id,
            "saved_current": applied.saved_current.as_ref().map(|(id, _)| id),
            "generation_id": applied.generation_id,
            "merged": merged_json(&applied.reconciled),
            "state": applied.run.as_str(),
        }))?;
    } else {
        if let Some((id, name)) = &applied.saved_current {
            println!("saved the current state as checkpoint \"{name}\" ({id})");
        }
        println!(
            "applied checkpoint \"{}\" ({}); the VM is {}",
            applied.name,
            applied.id,
            applied.run.as_str()
        );
    }
    report_failed_merge(&a.vm, &applied.reconciled)
}
