//! `snapvisor vm disk add|remove|list`: a VM's disks, as Hyper-V's `Add-VMHardDiskDrive`,
//! `Remove-VMHardDiskDrive` and `Get-VMHardDiskDrive`. The semantics (stable numbers,
//! disks belonging to Now, files kept while checkpoints use them) are the `vm` crate's
//! (`vm::disks`); the VM must be off.

use crate::render::print_json;
use crate::safety::confirm;
use crate::units::{human, parse_size};
use anyhow::{Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use host::Host;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use vm::{DiskEntry, DiskSource};

#[derive(Subcommand, Debug)]
pub enum DiskCommand {
    /// Add a disk to a stopped VM: a new empty one (--size) or a copy of a file
    /// (--import). It gets the lowest free number N (diskN) and comes last in the guest's
    /// order; checkpoints keep the disks they were taken with.
    Add(AddArgs),
    /// Remove disk N (the N of diskN, as `vm disk list` shows) from a stopped VM. Its
    /// files are deleted unless checkpoints still use them (then they stay, and applying
    /// such a checkpoint brings the disk back). The other disks keep their numbers.
    Remove(RemoveArgs),
    /// List a VM's disks: number, place in the guest's order, size, file, checkpoints
    /// that have it.
    List(ListArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum ImportFormat {
    Vhdx,
    Raw,
}

#[derive(Args, Debug)]
pub struct AddArgs {
    /// The VM.
    name: String,
    /// A new empty dynamic disk of this size (K, M, G, T are binary units).
    #[arg(long, value_parser = parse_size, required_unless_present = "import", conflicts_with = "import")]
    size: Option<u64>,
    /// Copy this disk (a VHDX file with its parents, or a raw image) into the VM as a new
    /// dynamic VHDX; the file itself is only read.
    #[arg(long, value_name = "FILE")]
    import: Option<PathBuf>,
    /// The format of the --import file (default: recognised by its signature; another
    /// tool's image is refused with the command that converts it).
    #[arg(long, value_enum, requires = "import")]
    format: Option<ImportFormat>,
    /// Print the new disk as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct RemoveArgs {
    /// The VM.
    name: String,
    /// The disk's number: N of diskN (`vm disk list` shows them).
    number: u32,
    /// Do not ask before deleting files (asked only when stdin is a terminal).
    #[arg(long, short = 'y')]
    yes: bool,
    /// Show what would be deleted and kept, and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// The VM.
    name: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: DiskCommand, host: &Host) -> Result<ExitCode> {
    match cmd {
        DiskCommand::Add(a) => add(host, a),
        DiskCommand::Remove(a) => remove(host, a),
        DiskCommand::List(a) => list(host, &a.name, a.json),
    }
}

/// One disk as `vm disk list --json` and `vm disk add --json` print it.
fn disk_json(d: &DiskEntry, virtual_size: Option<u64>) -> Value {
    json!({
        "number": d.number,
        "name": d.name,
        "position": d.position,
        "disk_id": d.disk_id,
        "file": d.file,
        "virtual_size": virtual_size,
        "chain_depth": d.chain_depth,
        "checkpoints": d.checkpoints.iter().map(|(id, name)| json!({"id": id, "name": name})).collect::<Vec<_>>(),
    })
}

/// The virtual size of each of Now's disks by name, where the file can be read (a running
/// VM's worker holds its files).
fn sizes(host: &Host, name: &str) -> Result<Vec<(String, Option<u64>)>> {
    let info = host.vm(name).info()?;
    Ok(info
        .disks
        .into_iter()
        .map(|d| (d.name, d.virtual_size))
        .collect())
}

fn size_of(sizes: &[(String, Option<u64>)], disk: &str) -> Option<u64> {
    sizes.iter().find(|(n, _)| n == disk).and_then(|(_, s)| *s)
}

fn add(host: &Host, a: AddArgs) -> Result<ExitCode> {
    let source = match (a.size, &a.import) {
        (Some(size), None) => DiskSource::Empty { size },
        (None, Some(path)) => DiskSource::Import {
            path: path.clone(),
            format: a.format.map(|f| match f {
                ImportFormat::Vhdx => disk::Format::Vhdx,
                ImportFormat::Raw => disk::Format::Raw,
            }),
        },
        _ => bail!("give --size SIZE for a new disk or --import FILE to copy one"),
    };
    let d = host.vm(&a.name).add_disk(&source)?;
    let sizes = sizes(host, &a.name)?;
    let size = size_of(&sizes, &d.name);
    if a.json {
        print_json(&disk_json(&d, size))?;
    } else {
        println!(
            "added disk {} ({}, {}) to VM \"{}\": the guest sees it as its disk number {} (/dev/vd{}); checkpoints keep the disks they had",
            d.number,
            d.name,
            size.map(human).unwrap_or_else(|| "size unknown".into()),
            a.name,
            d.position,
            guest_letter(d.position)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The letter of the guest's virtio disk at `position` (`a` for the first).
fn guest_letter(position: usize) -> String {
    // vda..vdz, then vdaa..: the kernel's naming.
    let mut n = position;
    let mut out = Vec::new();
    loop {
        out.push(b'a' + (n % 26) as u8);
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    out.reverse();
    String::from_utf8(out).expect("ascii")
}

fn remove(host: &Host, a: RemoveArgs) -> Result<ExitCode> {
    let vm = host.vm(&a.name);
    let preview = vm.preview_remove_disk(a.number)?;
    let bytes: u64 = preview.deleted.iter().map(|(_, n)| n).sum();
    if a.dry_run {
        if a.json {
            print_json(&removal_json(&preview, true))?;
        } else {
            describe(&a.name, &preview, "would");
            println!("nothing was changed (--dry-run)");
        }
        return Ok(ExitCode::SUCCESS);
    }
    if !preview.deleted.is_empty() {
        let question = format!(
            "remove disk {} of VM \"{}\" and delete {} file(s), {}?",
            a.number,
            a.name,
            preview.deleted.len(),
            human(bytes)
        );
        if !confirm(&question, a.yes)? {
            bail!("not removed: the answer was not yes");
        }
    }
    let (done, reconciled) = vm.remove_disk(a.number)?;
    if a.json {
        let mut v = removal_json(&done, false);
        v["merge_failed"] = json!(reconciled.failed);
        print_json(&v)?;
    } else {
        describe(&a.name, &done, "did");
        if let Some(e) = &reconciled.failed {
            println!(
                "a merge of the layers left behind failed (nothing is lost; `snapvisor vm consolidate {}` runs it again): {e}",
                disk::shell_quote(Path::new(&a.name))
            );
        }
    }
    if reconciled.failed.is_some() {
        return Ok(crate::exit::merge_left_behind());
    }
    Ok(ExitCode::SUCCESS)
}

fn removal_json(r: &vm::DiskRemoval, dry_run: bool) -> Value {
    json!({
        "dry_run": dry_run,
        "disk": r.name,
        "number": vm::disks::disk_number(&r.name),
        "position": r.position,
        "deleted": r.deleted.iter().map(|(f, n)| json!({"file": f, "bytes": n})).collect::<Vec<_>>(),
        "bytes_deleted": r.deleted.iter().map(|(_, n)| n).sum::<u64>(),
        "kept": r.kept.iter().map(|(f, cps)| json!({"file": f, "checkpoints": cps})).collect::<Vec<_>>(),
        "merged": r.preview.merges.iter().map(|m| json!({"removed": m.removed, "into": m.into})).collect::<Vec<_>>(),
    })
}

/// `mode` is "would" (a dry run) or "did".
fn describe(vm: &str, r: &vm::DiskRemoval, mode: &str) {
    let dry = mode == "would";
    println!(
        "{} disk {} ({}) of VM \"{vm}\"",
        if dry { "would remove" } else { "removed" },
        vm::disks::disk_number(&r.name).unwrap_or_default(),
        r.name
    );
    for (f, n) in &r.deleted {
        println!(
            "  {} {f} ({})",
            if dry { "would delete" } else { "deleted" },
            human(*n)
        );
    }
    for (f, cps) in &r.kept {
        println!(
            "  {} {f}: checkpoint(s) {} use it",
            if dry { "would keep" } else { "kept" },
            cps.iter()
                .map(|c| json!(c).to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for m in &r.preview.merges {
        println!(
            "  {} layer {} with {}",
            if dry { "would merge" } else { "merged" },
            m.removed,
            m.into
        );
    }
    if r.deleted.is_empty() && r.kept.is_empty() {
        println!("  no file of it to delete");
    }
}

fn list(host: &Host, name: &str, as_json: bool) -> Result<ExitCode> {
    let disks = host.vm(name).disks()?;
    let sizes = sizes(host, name)?;
    if as_json {
        let v: Vec<Value> = disks
            .iter()
            .map(|d| disk_json(d, size_of(&sizes, &d.name)))
            .collect();
        print_json(&json!({"vm": name, "disks": v}))?;
        return Ok(ExitCode::SUCCESS);
    }
    if disks.is_empty() {
        println!(
            "VM \"{name}\" has no disks; add one with `snapvisor vm disk add {} --size SIZE`",
            disk::shell_quote(Path::new(name))
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:>3}  {:<7} {:<6} {:>10} {:>6} {:>12}  FILE",
        "N", "NAME", "GUEST", "SIZE", "DEPTH", "CHECKPOINTS"
    );
    for d in &disks {
        println!(
            "{:>3}  {:<7} {:<6} {:>10} {:>6} {:>12}  {}",
            d.number,
            d.name,
            format!("vd{}", guest_letter(d.position)),
            size_of(&sizes, &d.name)
                .map(human)
                .unwrap_or_else(|| "in use".into()),
            d.chain_depth,
            d.checkpoints.len(),
            d.file.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn guest_letters() {
        let l = super::guest_letter;
        assert_eq!(
            (l(0), l(1), l(25), l(26), l(27)),
            ("a".into(), "b".into(), "z".into(), "aa".into(), "ab".into())
        );
    }
}
