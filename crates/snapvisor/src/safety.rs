//! What keeps a user from losing work by accident: `--dry-run` on commands that delete or
//! merge, and a confirmation on a terminal for `vm delete` and for `checkpoint apply`
//! without `--save-current` (`--yes` skips it; without a terminal on stdin nothing is
//! asked, so scripts behave as before).

use crate::render::print_json;
use crate::units::human;
use anyhow::{Context, Result, bail};
use clap::Args;
use host::Host;
use serde_json::json;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct DeleteVmArgs {
    /// The VM.
    name: String,
    /// Show what would be removed (the VM folder's files and checkpoints) and change
    /// nothing.
    #[arg(long)]
    dry_run: bool,
    /// Do not ask for confirmation (asked only when stdin is a terminal).
    #[arg(long, short = 'y')]
    yes: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Asks `question` on the terminal and returns whether the answer was yes. Without a
/// terminal on stdin, or with `yes`, nothing is asked and the answer is yes.
pub fn confirm(question: &str, yes: bool) -> Result<bool> {
    if yes || !std::io::stdin().is_terminal() {
        return Ok(true);
    }
    let mut err = std::io::stderr().lock();
    write!(err, "{question} [y/N] ").context("cannot write to the terminal")?;
    err.flush().ok();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .context("cannot read the answer")?;
    let answer = answer.trim().to_ascii_lowercase();
    Ok(answer == "y" || answer == "yes")
}

/// `vm delete`: with `--dry-run`, what it would remove; else (after confirming on a
/// terminal) the deletion.
pub fn delete_vm(host: &Host, a: DeleteVmArgs) -> Result<ExitCode> {
    if a.dry_run {
        let info = host.vm(&a.name).info()?;
        let files = files_under(&info.dir)?;
        let bytes: u64 = files.iter().map(|(_, n)| n).sum();
        let checkpoints = info.state.checkpoints.len();
        if a.json {
            print_json(&json!({
                "dry_run": true,
                "vm": a.name,
                "folder": info.dir,
                "checkpoints": checkpoints,
                "files": files.iter().map(|(p, n)| json!({"path": p, "bytes": n})).collect::<Vec<_>>(),
                "bytes": bytes,
            }))?;
        } else {
            println!(
                "would delete VM \"{}\": its folder {} with {} checkpoint(s), {} file(s), {}:",
                a.name,
                info.dir.display(),
                checkpoints,
                files.len(),
                human(bytes)
            );
            for (p, n) in &files {
                println!("  {}  {}", p.display(), human(*n));
            }
            println!("nothing was changed (--dry-run)");
        }
        return Ok(ExitCode::SUCCESS);
    }
    // Only a question reads the VM first: a delete a crash interrupted may have left a
    // folder the delete itself finishes removing but that no longer reads as a VM.
    if !a.yes && std::io::stdin().is_terminal() {
        let info = host.vm(&a.name).info()?;
        let question = format!(
            "delete VM \"{}\" with its {} checkpoint(s) and every file in {}?",
            a.name,
            info.state.checkpoints.len(),
            info.dir.display()
        );
        if !confirm(&question, a.yes)? {
            bail!("not deleted: the answer was not yes");
        }
    }
    host.vm(&a.name).delete()?;
    if a.json {
        print_json(&json!({"deleted": a.name}))?;
    } else {
        println!("deleted VM \"{}\"", a.name);
    }
    Ok(ExitCode::SUCCESS)
}

/// Regular files under `dir` with their sizes, sorted (symbolic links are not followed).
fn files_under(dir: &Path) -> Result<Vec<(PathBuf, u64)>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let entries =
            std::fs::read_dir(&d).with_context(|| format!("cannot read {}", d.display()))?;
        for e in entries {
            let e = e.with_context(|| format!("cannot read {}", d.display()))?;
            let meta = e.metadata()?;
            if meta.is_dir() {
                stack.push(e.path());
            } else if meta.is_file() {
                out.push((e.path(), meta.len()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// `disk merge --dry-run`: the direction, the files and the bytes the merge would copy.
pub fn merge_dry_run(
    child: &Path,
    direction: vhdx::MergeDirection,
    as_json: bool,
) -> Result<ExitCode> {
    let plan = vhdx::merge_plan(child, direction)
        .with_context(|| format!("cannot merge {}", child.display()))?;
    let direction = match plan.direction {
        vhdx::MergeDirection::IntoChild => "into-child",
        _ => "into-parent",
    };
    if as_json {
        print_json(&json!({
            "dry_run": true,
            "direction": direction,
            "result": plan.result,
            "merged_away": plan.merged_away,
            "removed": plan.removed,
            "bytes_to_copy": plan.bytes,
            "bytes_into_parent": plan.estimate.into_parent,
            "bytes_into_child": plan.estimate.into_child,
            "dependants": plan.blockers,
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "would merge {direction}: {} would hold the merged disk, {} of data copied \
         (into the parent: {}, into the child: {})",
        plan.result.display(),
        human(plan.bytes),
        human(plan.estimate.into_parent),
        human(plan.estimate.into_child)
    );
    if plan.removed {
        println!("would remove {}", plan.merged_away.display());
    } else {
        println!(
            "would keep {} (no longer part of this chain)",
            plan.merged_away.display()
        );
    }
    if !plan.blockers.is_empty() {
        let names: Vec<String> = plan
            .blockers
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        println!(
            "files that depend on these two (so not into the parent): {}",
            names.join(", ")
        );
    }
    println!("nothing was changed (--dry-run)");
    Ok(ExitCode::SUCCESS)
}

#[derive(Args, Debug)]
pub struct ConsolidateArgs {
    /// The VM.
    pub name: String,
    /// Show the merges (direction, bytes) and removals it would run, and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `checkpoint delete --dry-run` (`query`, `subtree`) or, without a query,
/// `vm consolidate --dry-run`.
pub fn tree_dry_run(
    host: &Host,
    vm: &str,
    delete: Option<(&str, bool)>,
    as_json: bool,
) -> Result<ExitCode> {
    // Its errors name the VM (or the file that is damaged) already.
    let (dir, state, unfinished) = host.store().read_vm(vm)?;
    let preview = match delete {
        Some((query, subtree)) => {
            vm::preview::preview_delete_checkpoint(&dir, &state, query, subtree)
        }
        None => vm::preview::preview_consolidate(&dir, &state),
    }?;
    let direction = |d: vm::journal::Direction| match d {
        vm::journal::Direction::IntoParent => "into-parent",
        vm::journal::Direction::IntoChild => "into-child",
    };
    if as_json {
        print_json(&json!({
            "dry_run": true,
            "checkpoints_removed": preview.checkpoints_removed.iter().map(|(id, name)| json!({"id": id, "name": name})).collect::<Vec<_>>(),
            "merged": preview.merges.iter().map(|m| json!({
                "removed": m.removed, "into": m.into, "direction": direction(m.direction),
                "bytes": m.bytes, "estimated": m.estimated,
            })).collect::<Vec<_>>(),
            "layers_removed": preview.layers_removed,
            "hidden_layers": preview.hidden_layers_kept.iter().map(|(f, n)| json!({"file": f, "dependants": n})).collect::<Vec<_>>(),
            "unfinished": unfinished,
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(op) = &unfinished {
        println!("an unfinished operation ({op}) would be completed first; it is not shown");
    }
    for (i, (id, name)) in preview.checkpoints_removed.iter().enumerate() {
        let what = if i == 0 { "" } else { " (below it)" };
        println!("would delete checkpoint {} ({id}){what}", json!(name));
    }
    for m in &preview.merges {
        println!(
            "would merge layer {} {} ({}{} copied): {} would hold the data",
            m.removed,
            direction(m.direction),
            if m.estimated { "about " } else { "" },
            human(m.bytes),
            m.into
        );
    }
    for l in &preview.layers_removed {
        println!("would remove unused layer {l}");
    }
    for (f, n) in &preview.hidden_layers_kept {
        println!("hidden layer {f} would stay: {n} layers depend on it");
    }
    if delete.is_none() && preview.merges.is_empty() && preview.layers_removed.is_empty() {
        println!("nothing to merge or remove");
    }
    println!("nothing was changed (--dry-run)");
    Ok(ExitCode::SUCCESS)
}
