//! `snapvisor disk set-parent` and `snapvisor disk resize`: what Hyper-V's `Set-VHD
//! -ParentPath` and `Resize-VHD` do, and the guard that keeps writes out of files other
//! files depend on.

use crate::render::print_json;
use crate::units::{human, parse_size};
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Subcommand, Debug)]
pub enum ExtraDiskCommand {
    /// Point a differencing file at its parent again after the parent moved or was
    /// renamed (Hyper-V's Set-VHD -ParentPath).
    SetParent(SetParentArgs),
    /// Change a disk's virtual size: grow, or shrink when nothing is stored beyond the new
    /// end (Hyper-V's Resize-VHD).
    Resize(ResizeArgs),
}

#[derive(Args, Debug)]
pub struct SetParentArgs {
    /// The differencing file (.avhdx or .vhdx) whose parent link to repair.
    child: PathBuf,
    /// The file to use as its parent.
    parent: PathBuf,
    /// Accept a parent whose data write GUID is not the one the child was made from (only
    /// if you know it holds the same data, e.g. a copy restored from a backup); the child's
    /// link is then tied to this parent as it is now.
    #[arg(long)]
    ignore_id_mismatch: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct ResizeArgs {
    /// The disk: a fixed or dynamic VHDX file, or a raw file.
    path: PathBuf,
    /// The new virtual size (K, M, G, T are binary units).
    #[arg(value_parser = parse_size)]
    size: u64,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: ExtraDiskCommand) -> Result<ExitCode> {
    match cmd {
        ExtraDiskCommand::SetParent(a) => set_parent(a),
        ExtraDiskCommand::Resize(a) => resize(a),
    }
}

fn set_parent(a: SetParentArgs) -> Result<ExitCode> {
    let outcome = match vhdx::set_parent(&a.child, &a.parent, a.ignore_id_mismatch) {
        Ok(o) => o,
        Err(vhdx::Error::ParentLinkageMismatch {
            expected, actual, ..
        }) => {
            bail!(
                "{} is not the parent {} was made from (its data write guid is {actual}, the \
                 child expects {expected}): it was changed since, or is another disk; if you \
                 know it holds the same data, pass --ignore-id-mismatch",
                a.parent.display(),
                a.child.display()
            );
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "cannot make {} the parent of {}",
                    a.parent.display(),
                    a.child.display()
                )
            });
        }
    };
    if a.json {
        print_json(&serde_json::json!({
            "child": a.child,
            "parent": outcome.parent,
            "previous_parent": outcome.previous,
            "id_matched": outcome.id_matched,
        }))?;
    } else {
        println!(
            "{} now has the parent {}{}",
            a.child.display(),
            outcome.parent.display(),
            if outcome.id_matched {
                ""
            } else {
                " (its link was tied to this parent's data write guid: --ignore-id-mismatch)"
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn resize(a: ResizeArgs) -> Result<ExitCode> {
    let context = || format!("cannot resize {} to {}", a.path.display(), human(a.size));
    let (old, new) = if disk::probe(&a.path).with_context(context)? == disk::Format::Raw {
        resize_raw(&a.path, a.size).with_context(context)?
    } else {
        let children = children_of(&a.path)?;
        if !children.is_empty() {
            bail!(
                "{} is the parent of {}, which must keep its size; merge or delete the \
                 children first",
                a.path.display(),
                list(&children)
            );
        }
        let o = vhdx::resize(&a.path, a.size).with_context(context)?;
        (o.old_size, o.new_size)
    };
    if a.json {
        print_json(&serde_json::json!({
            "path": a.path, "old_size": old, "new_size": new,
        }))?;
    } else if old == new {
        println!("{} is already {}", a.path.display(), human(new));
    } else {
        println!(
            "resized {} from {} to {}",
            a.path.display(),
            human(old),
            human(new)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A raw file grows by extending it (the new space reads as zeros) and shrinks only when
/// every byte past the new end is zero.
fn resize_raw(path: &Path, size: u64) -> Result<(u64, u64)> {
    use std::os::unix::fs::FileExt;
    if size == 0 || !size.is_multiple_of(512) {
        bail!("the size must be a multiple of 512 bytes and not zero ({size} bytes was asked)");
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let old = file.metadata()?.len();
    if size < old {
        let mut buf = vec![0u8; 1 << 20];
        let mut at = size;
        let (mut data, mut first) = (0u64, None);
        while at < old {
            let n = (old - at).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], at)?;
            for (i, sector) in buf[..n].chunks(512).enumerate() {
                if sector.iter().any(|&b| b != 0) {
                    data += sector.len() as u64;
                    first.get_or_insert(at + i as u64 * 512);
                }
            }
            at += n as u64;
        }
        if let Some(first) = first {
            bail!(
                "{} of data lies beyond the new end (the first at offset {first}); shrink the \
                 file system and partitions inside the guest first, or choose a larger size",
                human(data)
            );
        }
    }
    file.set_len(size)?;
    file.sync_all()?;
    Ok((old, size))
}

/// Refuses, unless `force`, a change to `path` that differencing files in its folder
/// depend on: their sectors were written against its current contents, and `what` would
/// change what they read underneath them.
pub fn refuse_if_depended_on(path: &Path, force: bool, what: &str) -> Result<()> {
    if force {
        return Ok(());
    }
    let children = children_of(path)?;
    if children.is_empty() {
        return Ok(());
    }
    bail!(
        "{} is the parent of {}; {what} would corrupt {}: use the child instead, or pass \
         --force if you mean to",
        path.display(),
        list(&children),
        if children.len() == 1 { "it" } else { "them" }
    )
}

/// Differencing files in the folder of `path` that read through it (none for a file that
/// is not VHDX).
fn children_of(path: &Path) -> Result<Vec<PathBuf>> {
    if disk::probe(path).ok() != Some(disk::Format::Vhdx) {
        return Ok(Vec::new());
    }
    vhdx::dependants(path, None)
        .with_context(|| format!("cannot look for files that depend on {}", path.display()))
}

fn list(paths: &[PathBuf]) -> String {
    let names: Vec<String> = paths.iter().map(|c| c.display().to_string()).collect();
    names.join(", ")
}
