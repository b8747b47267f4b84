//! `snapvisor disk ...`: create, inspect, check, convert, merge, read, write and discard.

use crate::render::print_json;
use crate::units::{human, parse_size, progress_bar};
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use disk::{ConvertOptions, Disk, OutputFormat};
use serde::Serialize;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use vhdx::MergeDirection;
use vhdx::{Chain, DiskKind, OpenOptions, VhdxFile};

#[derive(Subcommand, Debug)]
pub enum DiskCommand {
    /// Create a fixed or dynamic VHDX file, or a differencing child with --parent.
    Create(CreateArgs),
    /// Show a disk's format, sizes, identity and chain.
    Info(InfoArgs),
    /// Check a VHDX file's structure; --repair fixes what can be fixed safely.
    Check(CheckArgs),
    /// Copy a disk (a whole chain) into a new raw or standalone VHDX file.
    Convert(ConvertArgs),
    /// Merge a differencing file with its parent.
    Merge(MergeArgs),
    /// Read bytes of the virtual disk to stdout.
    Read(RangeArgs),
    /// Write bytes from stdin into the virtual disk.
    Write(WriteArgs),
    /// Discard a range: it reads as zeros afterwards.
    Discard(DiscardArgs),
    /// Serve a disk over NBD on a unix socket until SIGINT or SIGTERM.
    Serve(ServeArgs),
    #[command(flatten)]
    Extra(crate::extra_cmd::ExtraDiskCommand),
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The disk (a VHDX chain or a raw file).
    path: PathBuf,
    /// The unix socket to listen on.
    #[arg(long)]
    socket: PathBuf,
    /// Refuse writes.
    #[arg(long)]
    read_only: bool,
    /// Serve writable even though differencing files in the same folder depend on this
    /// file (a client's writes would change what they read).
    #[arg(long)]
    force: bool,
    /// The export's name (clients may also ask for the default, empty name).
    #[arg(long, default_value = "disk")]
    name: String,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum TypeArg {
    Dynamic,
    Fixed,
}

impl From<TypeArg> for DiskKind {
    fn from(t: TypeArg) -> DiskKind {
        match t {
            TypeArg::Dynamic => DiskKind::Dynamic,
            TypeArg::Fixed => DiskKind::Fixed,
        }
    }
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// The new file.
    path: PathBuf,
    /// Virtual size (K, M, G, T are binary units).
    #[arg(long, value_parser = parse_size, required_unless_present = "parent")]
    size: Option<u64>,
    /// Create a differencing child of this file.
    #[arg(long, conflicts_with_all = ["size", "disk_type", "logical_sector", "physical_sector"])]
    parent: Option<PathBuf>,
    /// Allocation type.
    #[arg(long = "type", value_enum, default_value_t = TypeArg::Dynamic)]
    disk_type: TypeArg,
    /// Block size, 1M to 256M, a power of two (default 32M; 2M for a child).
    #[arg(long, value_parser = parse_size)]
    block_size: Option<u64>,
    /// Logical sector size: 512 or 4096.
    #[arg(long, default_value_t = 512)]
    logical_sector: u32,
    /// Physical sector size: 512 or 4096.
    #[arg(long, default_value_t = 4096)]
    physical_sector: u32,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// The disk (a VHDX file, its chain is followed, or a raw file).
    path: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The VHDX file to check.
    path: PathBuf,
    /// Replay the log, rewrite a damaged header or region table copy, trim unused space
    /// at the end.
    #[arg(long)]
    repair: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum FormatArg {
    Raw,
    Vhdx,
}

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// Source: a raw file, or a VHDX file (with its parents).
    src: PathBuf,
    /// Destination (must not exist).
    dst: PathBuf,
    /// Destination format (default: vhdx when DST ends in .vhdx, else raw).
    #[arg(long, value_enum)]
    format: Option<FormatArg>,
    /// Allocation type of a VHDX destination.
    #[arg(long = "type", value_enum, default_value_t = TypeArg::Dynamic)]
    disk_type: TypeArg,
    /// Block size of a VHDX destination.
    #[arg(long, value_parser = parse_size)]
    block_size: Option<u64>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum DirectionArg {
    Auto,
    IntoParent,
    IntoChild,
}

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// The differencing file.
    child: PathBuf,
    /// auto picks the direction that copies fewer bytes.
    #[arg(long, value_enum, default_value_t = DirectionArg::Auto)]
    direction: DirectionArg,
    /// Show the direction, the files and the bytes the merge would copy, and change
    /// nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct RangeArgs {
    /// The disk (a VHDX file with its parents, or a raw file).
    path: PathBuf,
    /// Byte offset in the virtual disk.
    #[arg(long, value_parser = parse_size)]
    offset: u64,
    /// Number of bytes.
    #[arg(long, value_parser = parse_size)]
    length: u64,
}

#[derive(Args, Debug)]
pub struct WriteArgs {
    /// The disk to write into (a VHDX file, or a raw file); parents are only read.
    path: PathBuf,
    /// Byte offset in the virtual disk.
    #[arg(long, value_parser = parse_size)]
    offset: u64,
    /// Write even though differencing files in the same folder depend on this file
    /// (their contents change underneath them).
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug)]
pub struct DiscardArgs {
    #[command(flatten)]
    range: RangeArgs,
    /// Discard even though differencing files in the same folder depend on this file.
    #[arg(long)]
    force: bool,
}

pub fn run(cmd: DiskCommand) -> Result<ExitCode> {
    match cmd {
        DiskCommand::Create(a) => create(a),
        DiskCommand::Info(a) => info(a),
        DiskCommand::Check(a) => check(a),
        DiskCommand::Convert(a) => convert(a),
        DiskCommand::Merge(a) => merge(a),
        DiskCommand::Read(a) => read(a),
        DiskCommand::Write(a) => write(a),
        DiskCommand::Discard(a) => discard(a),
        DiskCommand::Serve(a) => serve(a),
        DiskCommand::Extra(c) => crate::extra_cmd::run(c),
    }
}

fn block_size_arg(v: Option<u64>) -> Result<Option<u32>> {
    v.map(|b| u32::try_from(b).context("block size must be at most 256M"))
        .transpose()
}

fn create(a: CreateArgs) -> Result<ExitCode> {
    let block_size = block_size_arg(a.block_size)?;
    if let Some(parent) = &a.parent {
        vhdx::create_differencing(&a.path, parent, block_size)
            .with_context(|| format!("cannot create {}", a.path.display()))?;
    } else {
        let size = a.size.expect("clap requires --size without --parent");
        vhdx::create(
            &a.path,
            &vhdx::CreateParams {
                virtual_size: size,
                kind: a.disk_type.into(),
                block_size,
                logical_sector_size: a.logical_sector,
                physical_sector_size: a.physical_sector,
            },
        )
        .with_context(|| format!("cannot create {}", a.path.display()))?;
    }
    let info = gather_info(&a.path)?;
    if a.json {
        print_json(&info)?;
    } else {
        println!(
            "created {} ({} {}, {})",
            a.path.display(),
            info.disk_type,
            info.format,
            human(info.virtual_size)
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize, Debug)]
pub struct DiskInfo {
    path: PathBuf,
    format: &'static str,
    #[serde(rename = "type")]
    disk_type: &'static str,
    virtual_size: u64,
    block_size: Option<u32>,
    logical_sector_size: u32,
    physical_sector_size: u32,
    file_size: u64,
    allocated_bytes: u64,
    full_blocks: u64,
    partial_blocks: u64,
    zero_blocks: u64,
    parent: Option<PathBuf>,
    pub chain: Vec<PathBuf>,
    chain_error: Option<String>,
    data_write_guid: Option<String>,
    file_write_guid: Option<String>,
    virtual_disk_id: Option<String>,
    log_pending: bool,
    creator: Option<String>,
}

impl DiskInfo {
    /// `fixed`, `dynamic`, `differencing` or `raw`.
    pub fn disk_type_name(&self) -> &'static str {
        self.disk_type
    }
    /// Guest bytes stored in this file.
    pub fn allocated_bytes(&self) -> u64 {
        self.allocated_bytes
    }
}

pub fn gather_info(path: &Path) -> Result<DiskInfo> {
    if disk::probe(path)? == disk::Format::Raw {
        let meta =
            std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
        use std::os::unix::fs::MetadataExt;
        return Ok(DiskInfo {
            path: path.to_owned(),
            format: "raw",
            disk_type: "raw",
            virtual_size: meta.len(),
            block_size: None,
            logical_sector_size: 512,
            physical_sector_size: 512,
            file_size: meta.len(),
            allocated_bytes: meta.blocks() * 512,
            full_blocks: 0,
            partial_blocks: 0,
            zero_blocks: 0,
            parent: None,
            chain: vec![path.to_owned()],
            chain_error: None,
            data_write_guid: None,
            file_write_guid: None,
            virtual_disk_id: None,
            log_pending: false,
            creator: None,
        });
    }
    let file = VhdxFile::open(path, OpenOptions::default())
        .with_context(|| format!("cannot open {}", path.display()))?;
    let g = file.geometry();
    let header = file.header();
    let alloc = file.allocation();
    let mut chain = vec![std::path::absolute(path).unwrap_or_else(|_| path.to_owned())];
    let mut parent = None;
    let mut chain_error = None;
    if file.kind() == DiskKind::Differencing {
        match vhdx::open_parent(&file) {
            Ok(p) => {
                parent = Some(p.path().to_owned());
                drop(p);
                match Chain::open(path, false) {
                    Ok(c) => {
                        chain.truncate(1);
                        chain.extend(c.paths().into_iter().skip(1));
                    }
                    Err(e) => chain_error = Some(vhdx::error_chain(&e)),
                }
            }
            Err(e) => chain_error = Some(vhdx::error_chain(&e)),
        }
    }
    Ok(DiskInfo {
        path: path.to_owned(),
        format: "vhdx",
        disk_type: file.kind().name(),
        virtual_size: g.virtual_size,
        block_size: Some(g.block_size),
        logical_sector_size: g.logical_sector_size,
        physical_sector_size: g.physical_sector_size,
        file_size: file.file_size()?,
        allocated_bytes: alloc.stored_bytes,
        full_blocks: alloc.full_blocks,
        partial_blocks: alloc.partial_blocks,
        zero_blocks: alloc.zero_blocks,
        parent,
        chain,
        chain_error,
        data_write_guid: Some(header.data_write_guid.to_string()),
        file_write_guid: Some(header.file_write_guid.to_string()),
        virtual_disk_id: Some(file.virtual_disk_id().to_string()),
        log_pending: file.replayed_log(),
        creator: Some(file.creator().to_owned()),
    })
}

fn info(a: InfoArgs) -> Result<ExitCode> {
    let info = gather_info(&a.path)?;
    if a.json {
        print_json(&info)?;
        return Ok(info_exit(&info));
    }
    println!("file:                {}", info.path.display());
    println!("format:              {} ({})", info.format, info.disk_type);
    println!(
        "virtual size:        {} ({} bytes)",
        human(info.virtual_size),
        info.virtual_size
    );
    if let Some(bs) = info.block_size {
        println!("block size:          {}", human(u64::from(bs)));
    }
    println!(
        "sector size:         {} logical, {} physical",
        info.logical_sector_size, info.physical_sector_size
    );
    println!("file size:           {}", human(info.file_size));
    println!("data in this file:   {}", human(info.allocated_bytes));
    if let Some(g) = &info.data_write_guid {
        println!("data write guid:     {g}");
    }
    if let Some(id) = &info.virtual_disk_id {
        println!("virtual disk id:     {id}");
    }
    if info.log_pending {
        println!("log:                 holds changes to replay (replayed in memory to read)");
    }
    if info.chain.len() > 1 || info.parent.is_some() {
        println!("chain:");
        for (i, p) in info.chain.iter().enumerate() {
            println!("  {}{}", "  ".repeat(i), p.display());
        }
    }
    if let Some(e) = &info.chain_error {
        println!("chain error:         {e}");
    }
    Ok(info_exit(&info))
}

/// A broken chain fails `disk info` (after it printed what it could read), so that scripts
/// notice; the one stderr line says why.
fn info_exit(info: &DiskInfo) -> ExitCode {
    match &info.chain_error {
        Some(e) => {
            eprintln!(
                "snapvisor: the chain of {} is broken: {e}",
                info.path.display()
            );
            crate::exit::chain_broken()
        }
        None => ExitCode::SUCCESS,
    }
}

#[derive(Serialize)]
struct CheckJson<'a> {
    path: &'a Path,
    clean: bool,
    errors: &'a [String],
    warnings: &'a [String],
    repaired: &'a [String],
    needs_log_replay: bool,
    file_size: u64,
    used_bytes: u64,
    leaked_bytes: u64,
    full_blocks: u64,
    partial_blocks: u64,
    zero_blocks: u64,
}

fn check(a: CheckArgs) -> Result<ExitCode> {
    refuse_non_vhdx(&a.path)?;
    let report = vhdx::check(&a.path, a.repair)
        .with_context(|| format!("cannot check {}", a.path.display()))?;
    if a.json {
        print_json(&CheckJson {
            path: &report.path,
            clean: report.is_clean(),
            errors: &report.errors,
            warnings: &report.warnings,
            repaired: &report.repaired,
            needs_log_replay: report.needs_log_replay,
            file_size: report.file_size,
            used_bytes: report.used_bytes,
            leaked_bytes: report.leaked_bytes,
            full_blocks: report.full_blocks,
            partial_blocks: report.partial_blocks,
            zero_blocks: report.zero_blocks,
        })?;
    } else {
        for r in &report.repaired {
            println!("repaired: {r}");
        }
        for e in &report.errors {
            println!("error: {e}");
        }
        for w in &report.warnings {
            println!("warning: {w}");
        }
        if report.is_clean() {
            println!(
                "{}: no errors ({} full, {} partial, {} zero blocks; {} unused)",
                a.path.display(),
                report.full_blocks,
                report.partial_blocks,
                report.zero_blocks,
                human(report.leaked_bytes)
            );
        } else {
            println!(
                "{}: {} error(s); the file is not usable as it is",
                a.path.display(),
                report.errors.len()
            );
        }
    }
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        crate::exit::check_found_errors()
    })
}

/// Refuses to check a file that is no VHDX at all (empty, raw, another tool's image), with
/// one line saying so, instead of every VHDX structure reported missing. A file with the
/// file identifier or either header's signature is a VHDX, however damaged.
fn refuse_non_vhdx(path: &Path) -> Result<()> {
    let mut head = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| {
            f.take(vhdx::format::HEADER_OFFSETS[1] + 4)
                .read_to_end(&mut head)
        })
        .with_context(|| format!("cannot check {}", path.display()))?;
    let has = |at: u64, sig: &[u8]| head.get(at as usize..at as usize + sig.len()) == Some(sig);
    if has(0, b"vhdxfile")
        || vhdx::format::HEADER_OFFSETS
            .iter()
            .any(|&o| has(o, b"head"))
    {
        return Ok(());
    }
    if head.is_empty() {
        bail!(
            "{} is empty (0 bytes), not a VHDX file; check applies to VHDX files",
            path.display()
        );
    }
    match disk::probe_content(path) {
        Ok(disk::Format::Foreign(f)) => bail!(
            "{} is a {} image, not a VHDX file; check applies to VHDX files (`qemu-img check -f {} {}` checks it)",
            path.display(),
            f.name(),
            f.qemu_name(),
            disk::shell_quote(path)
        ),
        _ => bail!(
            "{} is not a VHDX file (no VHDX signature: a raw image, or not a disk); check applies to VHDX files",
            path.display()
        ),
    }
}

fn convert(a: ConvertArgs) -> Result<ExitCode> {
    let ext = a
        .dst
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    let format = match a.format {
        Some(f) => f,
        None if matches!(ext.as_deref(), Some("vhdx" | "avhdx")) => FormatArg::Vhdx,
        None => {
            if let Some(foreign) = ext.as_deref().and_then(foreign_extension) {
                bail!("{}", foreign_destination(&a.src, &a.dst, foreign));
            }
            FormatArg::Raw
        }
    };
    let src = disk::open(&a.src, false).map_err(|e| open_error(&a.src, e))?;
    let options = ConvertOptions {
        format: match format {
            FormatArg::Raw => OutputFormat::Raw,
            FormatArg::Vhdx => OutputFormat::Vhdx {
                kind: a.disk_type.into(),
                block_size: block_size_arg(a.block_size)?,
            },
        },
        physical_sector_size: 4096,
    };
    let bar = progress_bar("converting");
    let stats = disk::convert(src.as_ref(), &a.dst, &options, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })
    .with_context(|| format!("cannot convert {} to {}", a.src.display(), a.dst.display()))?;
    bar.finish_and_clear();
    if a.json {
        print_json(&serde_json::json!({
            "source": a.src, "destination": a.dst,
            "bytes_read": stats.bytes_read, "bytes_written": stats.bytes_written,
        }))?;
    } else {
        println!(
            "converted {} to {} ({} of data written)",
            a.src.display(),
            a.dst.display(),
            human(stats.bytes_written)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The format of another tool a file name's extension announces (`.img`, `.raw` and
/// unknown extensions announce nothing: raw is written under them).
fn foreign_extension(ext: &str) -> Option<disk::ForeignFormat> {
    use disk::ForeignFormat::*;
    Some(match ext {
        "qcow2" => Qcow2,
        "qcow" => Qcow,
        "qed" => Qed,
        "vhd" | "vpc" => Vhd,
        "vmdk" => Vmdk,
        "vdi" => Vdi,
        "luks" => Luks,
        _ => return None,
    })
}

/// Why `disk convert SRC DST` does not write a raw image under DST's name, and the commands
/// that make the image the name announces. qemu-img does not read differencing VHDX files,
/// so a chain is flattened by snapvisor first.
fn foreign_destination(src: &Path, dst: &Path, foreign: disk::ForeignFormat) -> String {
    let q = disk::shell_quote;
    let standalone_vhdx = disk::probe(src).ok() == Some(disk::Format::Vhdx)
        && VhdxFile::open(src, OpenOptions::default())
            .is_ok_and(|f| f.kind() != DiskKind::Differencing);
    let make = if standalone_vhdx || disk::probe(src).ok() == Some(disk::Format::Raw) {
        let from = if standalone_vhdx { "vhdx" } else { "raw" };
        format!(
            "qemu-img convert -f {from} -O {} {} {}",
            foreign.qemu_name(),
            q(src),
            q(dst)
        )
    } else {
        let flat = dst.with_extension("flat.vhdx");
        format!(
            "snapvisor disk convert {} {} && qemu-img convert -f vhdx -O {} {} {}",
            q(src),
            q(&flat),
            foreign.qemu_name(),
            q(&flat),
            q(dst)
        )
    };
    format!(
        "{} names a {} image, but snapvisor writes only vhdx and raw images; make it with `{make}`, or pass --format raw or --format vhdx to write that format under this name",
        dst.display(),
        foreign.name()
    )
}

fn merge(a: MergeArgs) -> Result<ExitCode> {
    let direction = match a.direction {
        DirectionArg::Auto => MergeDirection::Auto,
        DirectionArg::IntoParent => MergeDirection::IntoParent,
        DirectionArg::IntoChild => MergeDirection::IntoChild,
    };
    if a.dry_run {
        return crate::safety::merge_dry_run(&a.child, direction, a.json);
    }
    let bar = progress_bar("merging");
    let outcome = vhdx::merge(&a.child, direction, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })
    .with_context(|| format!("cannot merge {}", a.child.display()))?;
    bar.finish_and_clear();
    let direction = match outcome.direction {
        MergeDirection::IntoChild => "into-child",
        _ => "into-parent",
    };
    if a.json {
        print_json(&serde_json::json!({
            "direction": direction,
            "result": outcome.result,
            "merged_away": outcome.merged_away,
            "removed": outcome.removed,
            "bytes_copied": outcome.bytes_copied,
        }))?;
    } else {
        println!(
            "merged {direction}: {} now holds the merged disk ({} copied)",
            outcome.result.display(),
            human(outcome.bytes_copied)
        );
        if outcome.removed {
            println!("removed {}", outcome.merged_away.display());
        } else {
            println!(
                "{} is no longer part of this chain; it was kept because other files may depend on it",
                outcome.merged_away.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn open_for(path: &Path, writable: bool) -> Result<Box<dyn Disk>> {
    disk::open(path, writable).map_err(|e| open_error(path, e))
}

/// "cannot open PATH: why", naming the path once (the disk error names it too).
fn open_error(path: &Path, e: disk::Error) -> anyhow::Error {
    let what = format!("cannot open {}", path.display());
    match e {
        disk::Error::Io { path: p, source }
        | disk::Error::Vhdx(vhdx::Error::Io { path: p, source })
            if p == path =>
        {
            anyhow::Error::new(source).context(what)
        }
        e => anyhow::Error::new(e).context(what),
    }
}

fn read(a: RangeArgs) -> Result<ExitCode> {
    let d = open_for(&a.path, false)?;
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; a.length.min(4 << 20) as usize];
    let mut done = 0u64;
    while done < a.length {
        let n = (a.length - done).min(buf.len() as u64) as usize;
        d.read_at(&mut buf[..n], a.offset + done)
            .with_context(|| format!("cannot read {}", a.path.display()))?;
        out.write_all(&buf[..n]).context("cannot write to stdout")?;
        done += n as u64;
    }
    out.flush().context("cannot write to stdout")?;
    Ok(ExitCode::SUCCESS)
}

fn write(a: WriteArgs) -> Result<ExitCode> {
    crate::extra_cmd::refuse_if_depended_on(&a.path, a.force, "writing into it")?;
    let d = open_for(&a.path, true)?;
    let mut input = std::io::stdin().lock();
    let mut buf = vec![0u8; 4 << 20];
    let mut offset = a.offset;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            match input.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("cannot read stdin"),
            }
        }
        if filled == 0 {
            break;
        }
        d.write_at(&buf[..filled], offset)
            .with_context(|| format!("cannot write {}", a.path.display()))?;
        offset += filled as u64;
        if filled < buf.len() {
            break;
        }
    }
    d.flush()
        .with_context(|| format!("cannot flush {}", a.path.display()))?;
    Ok(ExitCode::SUCCESS)
}

fn discard(a: DiscardArgs) -> Result<ExitCode> {
    crate::extra_cmd::refuse_if_depended_on(&a.range.path, a.force, "discarding in it")?;
    let a = a.range;
    let d = open_for(&a.path, true)?;
    if a.offset.checked_add(a.length).is_none_or(|e| e > d.size()) {
        bail!(
            "range {}+{} is beyond the end of {} ({} bytes)",
            a.offset,
            a.length,
            a.path.display(),
            d.size()
        );
    }
    d.discard(a.offset, a.length)
        .with_context(|| format!("cannot discard in {}", a.path.display()))?;
    d.flush()
        .with_context(|| format!("cannot flush {}", a.path.display()))?;
    Ok(ExitCode::SUCCESS)
}

fn serve(a: ServeArgs) -> Result<ExitCode> {
    if !a.read_only {
        crate::extra_cmd::refuse_if_depended_on(&a.path, a.force, "serving it writable")?;
    }
    let d: std::sync::Arc<dyn Disk> = open_for(&a.path, !a.read_only)?.into();
    let export = std::sync::Arc::new(nbd::Export::new(&a.name, d, a.read_only));
    let server = nbd::Server::bind(&a.socket, export)
        .with_context(|| format!("cannot serve {}", a.path.display()))?;
    let banner = format!(
        "serving {} as nbd+unix:///{}?socket={}{}",
        a.path.display(),
        a.name,
        a.socket.display(),
        if a.read_only { " (read-only)" } else { "" }
    );
    crate::serving::until_signal(server, &banner, &a.path.display().to_string())?;
    Ok(ExitCode::SUCCESS)
}
