//! `snapvisor backup ...`: recovery points of VMs in a repository (the `backup` crate),
//! made and restored through the `host` crate's operations.

use crate::render::print_json;
use crate::units::{human, progress_bar};
use crate::vm_cmd::StoreArgs;
use anyhow::{Context, Result, bail};
use backup::{EncryptionMode, KeepPolicy, Point, Repository};
use clap::{Args, Subcommand, ValueEnum};
use host::Host;
use host::backups::{BackedUp, BackupMode, BackupOptions};
use serde_json::{Value, json};
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Subcommand, Debug)]
pub enum BackupCommand {
    /// Create a repository.
    Init(InitArgs),
    /// Back a VM up as a new recovery point.
    Create(CreateArgs),
    /// List recovery points (of one VM, or all).
    List(ListArgs),
    /// Show one recovery point.
    Show(PointJson),
    /// Restore a point: as a new VM, in place, or one disk to a file.
    Restore(RestoreArgs),
    /// Serve a point's disk read-only over NBD until interrupted (file-level recovery).
    Mount(MountArgs),
    /// Read every chunk of the points (one, or all) and name the damaged ones.
    Verify(VerifyArgs),
    /// Remove points that no keep rule keeps (run `backup gc` afterwards to free space).
    Prune(PruneArgs),
    /// Delete chunks no point references, and temporary files that killed writers left.
    Gc(GcArgs),
}

/// Where the repository is and how to unlock it.
#[derive(Args, Debug, Clone)]
pub struct RepoArgs {
    /// The repository folder.
    #[arg(long, env = "SNAPVISOR_REPO", value_name = "DIR")]
    repo: PathBuf,
    /// A file holding the passphrase [default: SNAPVISOR_PASSPHRASE, else asked on the
    /// terminal].
    #[arg(long, value_name = "FILE")]
    passphrase_file: Option<PathBuf>,
    /// The key file of a `keyfile` repository [default: REPO.key beside the repository].
    #[arg(long, env = "SNAPVISOR_KEY_FILE", value_name = "FILE")]
    key_file: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum EncryptionArg {
    None,
    Repokey,
    Keyfile,
}

#[derive(Args, Debug)]
pub struct InitArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// How contents are protected.
    #[arg(long, value_enum, default_value = "none")]
    encryption: EncryptionArg,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum ModeArg {
    /// Application-consistent if the guest agent answers, else crash-consistent.
    Auto,
    /// Application-consistent (frozen through the guest agent), or refuse.
    Online,
    /// Crash-consistent, without asking the agent.
    Crash,
    /// With the guest's memory and device state: a restore comes back saved and resumes.
    SavedState,
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// The VM.
    vm: String,
    #[command(flatten)]
    repo: RepoArgs,
    /// How a running VM is captured (a stopped VM is copied as it is).
    #[arg(long, value_enum, default_value = "auto")]
    mode: ModeArg,
    /// Store every chunk read, without comparing with the VM's last point.
    #[arg(long)]
    full: bool,
    /// Print the point as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Only this VM's points.
    vm: Option<String>,
    #[command(flatten)]
    repo: RepoArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct PointJson {
    /// The point: its id, a unique prefix of it, or VM@latest.
    point: String,
    #[command(flatten)]
    repo: RepoArgs,
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
pub struct RestoreArgs {
    /// The point: its id, a unique prefix of it, or VM@latest.
    point: String,
    #[command(flatten)]
    repo: RepoArgs,
    /// Restore as a new VM with this name (new VM id, generation ID and disk ids).
    #[arg(long = "as", value_name = "NAME", conflicts_with_all = ["in_place", "to"])]
    as_name: Option<String>,
    /// Restore over the VM's disks (the VM must be off); what it had is kept as a
    /// checkpoint unless --no-checkpoint.
    #[arg(long, conflicts_with = "to")]
    in_place: bool,
    /// With --in-place: do not keep what the VM had.
    #[arg(long, requires = "in_place")]
    no_checkpoint: bool,
    /// The disk to restore with --to (counting from 0, as the store's diskN files do).
    #[arg(long, value_name = "N", requires = "to")]
    disk: Option<usize>,
    /// Write the disk into this new file (sparse).
    #[arg(long, value_name = "FILE", requires = "disk")]
    to: Option<PathBuf>,
    /// The file's format with --to.
    #[arg(long, value_enum, default_value = "raw", requires = "to")]
    format: FormatArg,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct MountArgs {
    /// The point: its id, a unique prefix of it, or VM@latest.
    point: String,
    #[command(flatten)]
    repo: RepoArgs,
    /// The disk (counting from 0).
    #[arg(long, value_name = "N", default_value_t = 0)]
    disk: usize,
    /// The Unix socket to serve on (must not exist).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Only this point [default: every point].
    point: Option<String>,
    #[command(flatten)]
    repo: RepoArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct PruneArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// Only this VM's points [default: every VM's, each VM on its own].
    #[arg(long)]
    vm: Option<String>,
    /// Keep the newest N points.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_last: u32,
    /// Keep the newest point of each of the last N hours.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_hourly: u32,
    /// Keep the newest point of each of the last N days.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_daily: u32,
    /// Keep the newest point of each of the last N weeks.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_weekly: u32,
    /// Keep the newest point of each of the last N months.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_monthly: u32,
    /// Keep the newest point of each of the last N years.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_yearly: u32,
    /// Only say what would be removed.
    #[arg(long)]
    dry_run: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct GcArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// Only count what would be deleted.
    #[arg(long)]
    dry_run: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: BackupCommand, store: &StoreArgs) -> Result<ExitCode> {
    match cmd {
        BackupCommand::Init(a) => init(a, store),
        BackupCommand::Create(a) => create(a, store),
        BackupCommand::List(a) => list(a),
        BackupCommand::Show(a) => show(a),
        BackupCommand::Restore(a) => restore(a, store),
        BackupCommand::Mount(a) => mount(a),
        BackupCommand::Verify(a) => verify(a),
        BackupCommand::Prune(a) => prune(a),
        BackupCommand::Gc(a) => gc(a),
    }
}

impl RepoArgs {
    fn default_key_file(&self) -> PathBuf {
        let mut name = self
            .repo
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_else(|| "repository".into());
        name.push(".key");
        self.repo.with_file_name(name)
    }

    fn key_file(&self) -> PathBuf {
        self.key_file
            .clone()
            .unwrap_or_else(|| self.default_key_file())
    }

    /// The passphrase: from `--passphrase-file`, `SNAPVISOR_PASSPHRASE`, or the terminal.
    fn passphrase(&self, confirm: bool) -> Result<Vec<u8>> {
        if let Some(path) = &self.passphrase_file {
            let mut bytes = std::fs::read(path)
                .with_context(|| format!("cannot read the passphrase file {}", path.display()))?;
            while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                bytes.pop();
            }
            if bytes.is_empty() {
                bail!("the passphrase file {} is empty", path.display());
            }
            return Ok(bytes);
        }
        if let Some(p) = std::env::var_os("SNAPVISOR_PASSPHRASE") {
            use std::os::unix::ffi::OsStringExt;
            let bytes = p.into_vec();
            if bytes.is_empty() {
                bail!("SNAPVISOR_PASSPHRASE is empty");
            }
            return Ok(bytes);
        }
        let first = ask_passphrase("passphrase: ")?;
        if confirm && ask_passphrase("passphrase again: ")? != first {
            bail!("the two passphrases differ; nothing was created");
        }
        Ok(first)
    }

    fn open(&self) -> Result<Repository> {
        let what = || format!("cannot open the repository {}", self.repo.display());
        let mut options = backup::OpenOptions::default();
        let key_file = self.key_file();
        if self.key_file.is_some() || key_file.exists() {
            options.key_file = Some(key_file);
        }
        match Repository::open(&self.repo, &options) {
            Err(backup::Error::PassphraseRequired) => {
                options.passphrase = Some(self.passphrase(false).with_context(what)?);
                Repository::open(&self.repo, &options).with_context(what)
            }
            other => other.with_context(what),
        }
    }
}

/// Reads a passphrase from the terminal without echoing it.
fn ask_passphrase(prompt: &str) -> Result<Vec<u8>> {
    let no_terminal = || {
        anyhow::anyhow!(
            "the repository needs a passphrase: give --passphrase-file FILE or set SNAPVISOR_PASSPHRASE (there is no terminal to ask on)"
        )
    };
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .map_err(|_| no_terminal())?;
    if !tty.is_terminal() {
        return Err(no_terminal());
    }
    let stty = |arg: &str| {
        std::process::Command::new("stty")
            .arg(arg)
            .stdin(tty.try_clone().expect("clone /dev/tty"))
            .status()
    };
    (&tty).write_all(prompt.as_bytes()).ok();
    let _ = stty("-echo");
    let mut line = String::new();
    let read = std::io::BufReader::new(&tty).read_line(&mut line);
    let _ = stty("echo");
    (&tty).write_all(b"\n").ok();
    read.context("cannot read the passphrase from the terminal")?;
    let line = line.trim_end_matches(['\n', '\r']);
    if line.is_empty() {
        bail!("the passphrase is empty");
    }
    Ok(line.as_bytes().to_vec())
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn when(t: SystemTime) -> String {
    vm::fsutil::format_time(unix(t))
}

/// Warns when the repository sits on the store's file system.
fn warn_same_file_system(store: &StoreArgs, repo: &Path) {
    if let Ok(host) = store.open()
        && host.shares_file_system(repo)
    {
        eprintln!(
            "warning: the repository {} is on the same file system as the store {}: a backup on the VMs' own storage dies with it; keep it on another disk or host",
            repo.display(),
            host.store().root().display()
        );
    }
}

fn init(a: InitArgs, store: &StoreArgs) -> Result<ExitCode> {
    let encryption = match a.encryption {
        EncryptionArg::None => EncryptionMode::None,
        EncryptionArg::Repokey => EncryptionMode::Repokey,
        EncryptionArg::Keyfile => EncryptionMode::Keyfile,
    };
    let mut options = backup::InitOptions {
        encryption,
        ..Default::default()
    };
    if encryption != EncryptionMode::None {
        options.passphrase = Some(a.repo.passphrase(true)?);
    }
    if encryption == EncryptionMode::Keyfile {
        options.key_file = Some(a.repo.key_file());
    }
    let repo = Repository::init(&a.repo.repo, &options)
        .with_context(|| format!("cannot create a repository at {}", a.repo.repo.display()))?;
    println!(
        "created repository {} (encryption {}, chunks of {})",
        a.repo.repo.display(),
        repo.encryption(),
        human(u64::from(repo.chunk_size()))
    );
    if let Some(k) = &options.key_file {
        println!(
            "its key is in {}: keep a copy of it elsewhere, the repository cannot be opened without it",
            k.display()
        );
    }
    warn_same_file_system(store, &a.repo.repo);
    Ok(ExitCode::SUCCESS)
}

fn mode(m: ModeArg) -> BackupMode {
    match m {
        ModeArg::Auto => BackupMode::Auto,
        ModeArg::Online => BackupMode::Online,
        ModeArg::Crash => BackupMode::Crash,
        ModeArg::SavedState => BackupMode::SavedState,
    }
}

fn create(a: CreateArgs, store: &StoreArgs) -> Result<ExitCode> {
    let host = store.open()?;
    let repo = a.repo.open()?;
    let bar = progress_bar("backing up");
    let progress = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
    };
    let done = host.vm(&a.vm).backup(
        &repo,
        &BackupOptions {
            mode: mode(a.mode),
            full: a.full,
        },
        &progress,
    )?;
    bar.finish_and_clear();
    warn_same_file_system(store, &a.repo.repo);
    if a.mode == ModeArg::SavedState && done.consistency == "offline" {
        eprintln!(
            "note: VM \"{}\" is off, so it has no memory to save: it was copied offline",
            a.vm
        );
    }
    if a.json {
        print_json(&created_json(&done))?;
    } else {
        println!(
            "created recovery point {} of VM \"{}\": {}, {}; read {}, stored {} in {:.1} s; frozen {:.1} ms, paused {:.1} ms",
            done.point.id,
            done.point.group,
            done.consistency,
            done.method,
            human(done.bytes_read),
            human(done.bytes_stored),
            done.duration.as_secs_f64(),
            done.freeze_ms,
            done.pause_ms
        );
        if let Some(w) = done.longest_write_ms {
            println!("longest guest write during the copy: {w:.1} ms");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn created_json(d: &BackedUp) -> Value {
    let mut v = point_json(&d.point);
    v["bytes_read"] = json!(d.bytes_read);
    v["bytes_stored"] = json!(d.bytes_stored);
    v["duration_ms"] = json!(d.duration.as_millis() as u64);
    v["freeze_ms"] = json!(d.freeze_ms);
    v["pause_ms"] = json!(d.pause_ms);
    if let Some(w) = d.longest_write_ms {
        v["longest_write_ms"] = json!(w);
    }
    v
}

fn field<'p>(p: &'p Point, key: &str) -> &'p str {
    p.fields.get(key).map(String::as_str).unwrap_or("")
}

fn field_f64(p: &Point, key: &str) -> f64 {
    field(p, key).parse().unwrap_or(0.0)
}

fn point_json(p: &Point) -> Value {
    let streams = |list: &[backup::Stream]| -> Vec<Value> {
        list.iter()
            .enumerate()
            .map(|(i, s)| {
                json!({
                    "index": i, "name": s.name, "size": s.size, "method": s.method,
                    "bytes_read": s.bytes_read, "bytes_stored": s.bytes_stored,
                    "chunks": s.chunks.len(), "fields": s.fields,
                })
            })
            .collect()
    };
    json!({
        "id": p.id,
        "vm": p.group,
        "time": unix(p.time),
        "time_utc": when(p.time),
        "consistency": field(p, "consistency"),
        "method": field(p, "method"),
        "bytes_read": p.streams().map(|s| s.bytes_read).sum::<u64>(),
        "bytes_stored": p.streams().map(|s| s.bytes_stored).sum::<u64>(),
        "duration_ms": field(p, "duration_ms").parse::<u64>().unwrap_or(0),
        "freeze_ms": field_f64(p, "freeze_ms"),
        "pause_ms": field_f64(p, "pause_ms"),
        "size": p.disks_size(),
        "disks": streams(&p.disks),
        "blobs": streams(&p.blobs),
        "fields": p.fields,
    })
}

fn list(a: ListArgs) -> Result<ExitCode> {
    let repo = a.repo.open()?;
    let listing = repo.list_points().context("cannot list the points")?;
    let points: Vec<&Point> = listing
        .points
        .iter()
        .filter(|p| a.vm.as_deref().is_none_or(|v| p.group == v))
        .collect();
    if a.json {
        print_json(&json!({
            "points": points.iter().map(|p| point_json(p)).collect::<Vec<_>>(),
            "damaged": listing.damaged.iter().map(|(id, e)| json!({"id": id, "error": e.to_string()})).collect::<Vec<_>>(),
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    if points.is_empty() {
        println!("no recovery points");
    } else {
        println!(
            "{:<10} {:<20} {:<20} {:<12} {:<13} {:>10}",
            "ID", "VM", "TIME (UTC)", "CONSISTENCY", "METHOD", "SIZE"
        );
    }
    for p in &points {
        println!(
            "{:<10} {:<20} {:<20} {:<12} {:<13} {:>10}",
            p.short_id(),
            p.group,
            when(p.time),
            field(p, "consistency"),
            field(p, "method"),
            human(p.disks_size())
        );
    }
    for (id, e) in &listing.damaged {
        println!("{id}: damaged: {e}");
    }
    Ok(ExitCode::SUCCESS)
}

fn load(repo: &Repository, query: &str) -> Result<Point> {
    let id = repo.resolve(query)?;
    Ok(repo.load_point(&id)?)
}

fn show(a: PointJson) -> Result<ExitCode> {
    let repo = a.repo.open()?;
    let p = load(&repo, &a.point)?;
    if a.json {
        print_json(&point_json(&p))?;
        return Ok(ExitCode::SUCCESS);
    }
    println!("point        {}", p.id);
    println!("vm           {}", p.group);
    println!("time         {} UTC", when(p.time));
    println!("consistency  {}", field(&p, "consistency"));
    println!("method       {}", field(&p, "method"));
    println!(
        "frozen       {} ms, paused {} ms",
        field(&p, "freeze_ms"),
        field(&p, "pause_ms")
    );
    for (i, d) in p.disks.iter().enumerate() {
        println!(
            "disk {i}       {} {} ({}), read {}, stored {}",
            d.name,
            human(d.size),
            d.method,
            human(d.bytes_read),
            human(d.bytes_stored)
        );
    }
    for b in &p.blobs {
        println!("blob         {} ({} bytes)", b.name, b.size);
    }
    Ok(ExitCode::SUCCESS)
}

fn restore(a: RestoreArgs, store: &StoreArgs) -> Result<ExitCode> {
    if a.as_name.is_none() && !a.in_place && a.to.is_none() {
        bail!("say where to restore: --as NAME (a new VM), --in-place, or --disk N --to FILE");
    }
    let repo = a.repo.open()?;
    let point = load(&repo, &a.point)?;
    let bar = progress_bar("restoring");
    let progress = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
    };
    if let (Some(index), Some(to)) = (a.disk, &a.to) {
        let format = match a.format {
            FormatArg::Raw => backup::FileFormat::Raw,
            FormatArg::Vhdx => backup::FileFormat::Vhdx,
        };
        let stats = backup::restore_to_file(&repo, &point, index, to, format, &progress)
            .with_context(|| {
                format!(
                    "cannot restore disk {index} of point {} to {}",
                    point.short_id(),
                    to.display()
                )
            })?;
        bar.finish_and_clear();
        if a.json {
            print_json(&json!({
                "point": point.id, "disk": index, "file": to, "size": stats.size,
                "bytes_written": stats.bytes_written,
            }))?;
        } else {
            println!(
                "restored disk {index} of point {} ({}) to {}",
                point.short_id(),
                human(stats.size),
                to.display()
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let host: Host = store.open()?;
    if let Some(name) = &a.as_name {
        let r = host.restore_as(&repo, &point, name, &progress)?;
        bar.finish_and_clear();
        if a.json {
            print_json(&json!({
                "point": point.id, "vm": r.name, "uuid": r.uuid,
                "generation_id": r.generation_id, "disk_ids": r.disk_ids,
                "bytes_written": r.bytes_written,
            }))?;
        } else {
            println!(
                "restored point {} of VM \"{}\" as the new VM \"{}\" (id {}, generation ID {})",
                point.short_id(),
                point.group,
                r.name,
                r.uuid,
                r.generation_id
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let r = host
        .vm(&point.group)
        .restore_in_place(&repo, &point, a.no_checkpoint, &progress)?;
    bar.finish_and_clear();
    if a.json {
        print_json(&json!({
            "point": point.id, "vm": point.group,
            "kept_as": r.kept_as.as_ref().map(|(id, name)| json!({"id": id, "name": name})),
            "bytes_written": r.bytes_written,
            "generation_id": r.generation_id,
        }))?;
    } else {
        println!(
            "restored point {} over VM \"{}\" (new generation ID {})",
            point.short_id(),
            point.group,
            r.generation_id
        );
        if let Some((id, name)) = &r.kept_as {
            println!("  what it had is kept as checkpoint {name:?} ({id})");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn mount(a: MountArgs) -> Result<ExitCode> {
    let repo = a.repo.open()?;
    let point = load(&repo, &a.point)?;
    let disk = backup::PointDisk::new(&repo, &point, a.disk)
        .with_context(|| format!("cannot mount point {}", point.short_id()))?;
    let name = format!("{}-disk{}", point.short_id(), a.disk);
    let export = std::sync::Arc::new(nbd::Export::new(&name, std::sync::Arc::new(disk), true));
    let server = nbd::Server::bind(&a.socket, export)
        .with_context(|| format!("cannot serve on {}", a.socket.display()))?;
    let banner = format!(
        "serving disk {} of point {} read-only as nbd+unix:///{name}?socket={} (Ctrl-C to stop)",
        a.disk,
        point.short_id(),
        a.socket.display()
    );
    crate::serving::until_signal(server, &banner, "the point")?;
    Ok(ExitCode::SUCCESS)
}

fn verify(a: VerifyArgs) -> Result<ExitCode> {
    let repo = a.repo.open()?;
    let ids = match &a.point {
        Some(q) => Some(vec![repo.resolve(q)?]),
        None => None,
    };
    let bar = progress_bar("verifying");
    let report = backup::verify(&repo, ids.as_deref(), &|done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })
    .context("cannot verify the repository")?;
    bar.finish_and_clear();
    if a.json {
        let damaged: Vec<Value> = report
            .damaged
            .iter()
            .map(|d| {
                let streams = |l: &[backup::DamagedStream]| -> Vec<Value> {
                    l.iter()
                        .map(|s| {
                            json!({
                                "index": s.index, "name": s.name, "bad_chunks": s.bad_chunks,
                                "first_offset": s.first_offset, "problem": s.problem,
                            })
                        })
                        .collect()
                };
                json!({
                    "id": d.id, "manifest": d.manifest,
                    "disks": streams(&d.disks), "blobs": streams(&d.blobs),
                })
            })
            .collect();
        print_json(&json!({
            "clean": report.is_clean(),
            "points_checked": report.points_checked,
            "chunks_checked": report.chunks_checked,
            "bytes_checked": report.bytes_checked,
            "damaged": damaged,
        }))?;
    } else {
        println!(
            "checked {} points, {} chunks ({})",
            report.points_checked,
            report.chunks_checked,
            human(report.bytes_checked)
        );
        for d in &report.damaged {
            if let Some(m) = &d.manifest {
                println!("point {}: damaged manifest: {m}", d.id);
            }
            for s in &d.disks {
                println!(
                    "point {}: disk {} ({}): {} damaged chunks from offset {}: {}",
                    d.id, s.index, s.name, s.bad_chunks, s.first_offset, s.problem
                );
            }
            for s in &d.blobs {
                println!(
                    "point {}: blob {}: {} damaged chunks: {}",
                    d.id, s.name, s.bad_chunks, s.problem
                );
            }
        }
        if report.is_clean() {
            println!("no damage found");
        }
    }
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        crate::exit::check_found_errors()
    })
}

fn prune(a: PruneArgs) -> Result<ExitCode> {
    let repo = a.repo.open()?;
    let policy = KeepPolicy {
        last: a.keep_last,
        hourly: a.keep_hourly,
        daily: a.keep_daily,
        weekly: a.keep_weekly,
        monthly: a.keep_monthly,
        yearly: a.keep_yearly,
    };
    let groups = a.vm.clone().map(|v| vec![v]);
    let report = backup::prune(&repo, &policy, groups.as_deref(), a.dry_run)
        .context("cannot prune the repository")?;
    if a.json {
        print_json(&json!({
            "dry_run": a.dry_run,
            "points": report.decisions.iter().map(|d| json!({
                "id": d.id, "vm": d.group, "time": unix(d.time), "keep": d.keep,
                "reasons": d.reasons,
            })).collect::<Vec<_>>(),
            "removed": report.removed,
            "damaged": report.damaged,
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    for d in &report.decisions {
        println!(
            "{} {:<16} {:<20} {}{}",
            if d.keep {
                "keep  "
            } else if a.dry_run {
                "would remove"
            } else {
                "remove"
            },
            &d.id[..d.id.len().min(16)],
            d.group,
            when(d.time),
            if d.reasons.is_empty() {
                String::new()
            } else {
                format!(" ({})", d.reasons.join(", "))
            }
        );
    }
    if !a.dry_run && !report.removed.is_empty() {
        println!(
            "removed {} points; run `snapvisor backup gc` to free their space",
            report.removed.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn gc(a: GcArgs) -> Result<ExitCode> {
    let repo = a.repo.open()?;
    let report = backup::gc(
        &repo,
        &backup::GcOptions {
            dry_run: a.dry_run,
            ..Default::default()
        },
    )
    .context("cannot collect the repository's garbage")?;
    if a.json {
        print_json(&json!({
            "dry_run": a.dry_run,
            "chunks_total": report.chunks_total,
            "chunks_referenced": report.chunks_referenced,
            "chunks_deleted": report.chunks_deleted,
            "bytes_freed": report.bytes_freed,
            "chunks_kept_recent": report.chunks_kept_recent,
            "stale_leases_removed": report.stale_leases_removed,
            "temporaries_removed": report.temporaries_removed,
            "deferred": report.deferred,
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} {} unreferenced chunks ({}) of {}; {} referenced",
        if a.dry_run { "would delete" } else { "deleted" },
        report.chunks_deleted,
        human(report.bytes_freed),
        report.chunks_total,
        report.chunks_referenced
    );
    if report.deferred {
        println!("deferred: backups still running when it gave up waiting; nothing deleted");
    }
    Ok(ExitCode::SUCCESS)
}
