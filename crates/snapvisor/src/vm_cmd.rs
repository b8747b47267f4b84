//! `snapvisor vm ...`: VMs in the store.

use crate::render::print_json;
use crate::units::{human, parse_size, progress_bar};
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use host::info::VmInfo;
use host::{Host, StartOptions, StopOptions, Stopped, VmChanges};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use vm::{CheckpointType, DirectBoot, NewVm, Settings, Store};

/// Where the store is and how long to wait for a busy VM (global options).
#[derive(Args, Debug, Clone)]
pub struct StoreArgs {
    /// The store folder [default: $SNAPVISOR_STORE, else the config file's store, else
    /// ~/.local/share/snapvisor].
    // Read from the environment in `open`, not by clap: clap's `env` makes the usage line
    // of every error show `--store <DIR>` as if it had been required.
    #[arg(long, global = true, value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// Wait up to this many seconds for a VM another command is changing (default: refuse
    /// at once, naming the command that holds it).
    #[arg(long, global = true, value_name = "SECONDS", default_value_t = 0.0)]
    pub wait: f64,
}

impl StoreArgs {
    /// The host over the store; VM workers run this binary's hidden `vm worker`.
    pub fn open(&self) -> Result<Host> {
        let root = self
            .store
            .clone()
            .or_else(|| {
                std::env::var_os("SNAPVISOR_STORE")
                    .filter(|v| !v.is_empty())
                    .map(PathBuf::from)
            })
            .unwrap_or_else(Store::default_root);
        if !(0.0..=86_400.0).contains(&self.wait) {
            bail!("--wait takes 0 to 86400 seconds");
        }
        let store = Store::open(&root, Duration::from_secs_f64(self.wait))
            .with_context(|| format!("cannot open the store {}", root.display()))?;
        Ok(Host::open(store))
    }
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum CheckpointTypeArg {
    Production,
    ProductionOnly,
    Standard,
    Disabled,
}

impl From<CheckpointTypeArg> for CheckpointType {
    fn from(t: CheckpointTypeArg) -> CheckpointType {
        match t {
            CheckpointTypeArg::Production => CheckpointType::Production,
            CheckpointTypeArg::ProductionOnly => CheckpointType::ProductionOnly,
            CheckpointTypeArg::Standard => CheckpointType::Standard,
            CheckpointTypeArg::Disabled => CheckpointType::Disabled,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum FirmwareArg {
    Bios,
    Uefi,
}

#[derive(Subcommand, Debug)]
pub enum VmCommand {
    /// Create a VM with new or imported disks.
    Create(CreateArgs),
    /// List the VMs of the store.
    List(JsonArg),
    /// Show a VM's configuration, disks and checkpoint summary.
    Show(NameJson),
    /// Change a VM's settings or hardware.
    Set(SetArgs),
    /// Delete a VM with all its files and checkpoints (asks first on a terminal).
    Delete(crate::safety::DeleteVmArgs),
    /// Copy a whole VM (config, disks, checkpoint tree) into a new folder; a running VM
    /// is exported live, from a checkpoint taken for it and deleted afterwards.
    Export(ExportArgs),
    /// Register a VM folder: in place, or with --copy as a new VM.
    Import(ImportArgs),
    /// Merge every layer that can be merged; report files nothing refers to.
    Consolidate(crate::safety::ConsolidateArgs),
    /// Start the VM: a detached worker runs QEMU and serves its disks.
    Start(StartArgs),
    /// Stop the VM: ACPI power button, then forced off after --timeout.
    Stop(StopArgs),
    /// Pause the VM's processors.
    Pause(NameJson),
    /// Save the VM: memory and device state go to the VM folder and QEMU exits; the next
    /// `vm start` resumes from them.
    Save(NameJson),
    /// Resume a paused VM.
    Resume(NameJson),
    /// Show whether the VM runs and whether its guest agent answers.
    Status(NameJson),
    /// Add, remove and list a VM's disks.
    #[command(subcommand)]
    Disk(crate::vm_disk_cmd::DiskCommand),
    /// The worker process itself (started by `vm start`).
    #[command(hide = true)]
    Worker(WorkerArgs),
    /// Attach to the running VM's serial console (as `virsh console`): Ctrl-] detaches and
    /// the VM keeps running; with stdin not a terminal, copies stdin in and the console out.
    Console(crate::console_cmd::ConsoleArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum AccelArg {
    Kvm,
    Tcg,
}

impl From<AccelArg> for qemu::Accel {
    fn from(a: AccelArg) -> qemu::Accel {
        match a {
            AccelArg::Kvm => qemu::Accel::Kvm,
            AccelArg::Tcg => qemu::Accel::Tcg,
        }
    }
}

#[derive(Args, Debug)]
pub struct StartArgs {
    /// The VM.
    name: String,
    /// Accelerator [default: $SNAPVISOR_ACCEL, else the config file's accelerator, else kvm
    /// when /dev/kvm is usable, else tcg].
    #[arg(long, value_enum)]
    accel: Option<AccelArg>,
    /// Seconds to wait for the guest to be running.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
}

#[derive(Args, Debug)]
pub struct StopArgs {
    /// The VM.
    name: String,
    /// Turn it off at once (no power button).
    #[arg(long)]
    force: bool,
    /// Seconds the guest gets to shut down before it is turned off.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

#[derive(Args, Debug)]
pub struct WorkerArgs {
    name: String,
    #[arg(long, value_enum)]
    accel: AccelArg,
}

#[derive(Args, Debug)]
pub struct JsonArg {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct NameJson {
    /// The VM.
    name: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// The VM's name (also its folder's name).
    name: String,
    /// Memory (K, M, G are binary units).
    #[arg(long, value_parser = parse_size, default_value = "1G")]
    memory: u64,
    /// Virtual processors.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// A new empty dynamic disk of this size (repeat for more disks).
    #[arg(long = "disk", value_parser = parse_size, value_name = "SIZE")]
    disks: Vec<u64>,
    /// Copy this disk (VHDX chain or raw image) into the VM (repeat for more); these come
    /// after the --disk disks.
    #[arg(long = "import-disk", value_name = "PATH")]
    import_disks: Vec<PathBuf>,
    /// Boot this kernel directly.
    #[arg(long, requires = "append")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk for --kernel.
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Kernel command line for --kernel.
    #[arg(long, requires = "kernel")]
    append: Option<String>,
    /// Checkpoint type.
    #[arg(long, value_enum, default_value_t = CheckpointTypeArg::Production)]
    checkpoint_type: CheckpointTypeArg,
    /// Most checkpoints the VM may have.
    #[arg(long, default_value_t = vm::config::DEFAULT_MAX_CHECKPOINTS)]
    max_checkpoints: u32,
    /// Take a checkpoint at start and delete it after a clean shutdown.
    #[arg(long)]
    automatic_checkpoints: bool,
    /// Firmware, fixed for the VM's life: BIOS, or UEFI (OVMF, with a variable store
    /// of the VM's own that checkpoints keep).
    #[arg(long, value_enum, default_value_t = FirmwareArg::Bios)]
    firmware: FirmwareArg,
    /// Print the new VM as `vm show --json` does.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Args, Debug)]
pub struct SetArgs {
    /// The VM.
    name: String,
    /// Rename the VM (and its folder).
    #[arg(long = "name", value_name = "NEW")]
    new_name: Option<String>,
    /// Memory.
    #[arg(long, value_parser = parse_size)]
    memory: Option<u64>,
    /// Virtual processors.
    #[arg(long)]
    cpus: Option<u32>,
    /// Boot this kernel directly (with --append, and --initrd if it needs one).
    #[arg(long, requires = "append")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk for --kernel.
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Kernel command line for --kernel.
    #[arg(long, requires = "kernel")]
    append: Option<String>,
    /// Stop booting a kernel directly.
    #[arg(long, conflicts_with = "kernel")]
    no_kernel: bool,
    /// Checkpoint type.
    #[arg(long, value_enum)]
    checkpoint_type: Option<CheckpointTypeArg>,
    /// Most checkpoints the VM may have.
    #[arg(long)]
    max_checkpoints: Option<u32>,
    /// Automatic checkpoints.
    #[arg(long, value_enum)]
    automatic_checkpoints: Option<OnOff>,
    /// Print the VM as `vm show --json` does.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The VM.
    name: String,
    /// The new folder (must not exist, or be empty).
    dir: PathBuf,
    /// Print what was exported as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// A VM folder (made by `vm export` or `checkpoint export`).
    dir: PathBuf,
    /// Copy it into the store as a new VM with a new UUID and generation ID.
    #[arg(long)]
    copy: bool,
    /// Register it under this name.
    #[arg(long = "name", value_name = "NEW")]
    new_name: Option<String>,
    /// Print the VM as `vm show --json` does.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: VmCommand, store: &StoreArgs) -> Result<ExitCode> {
    let host = store.open()?;
    match cmd {
        VmCommand::Create(a) => create(&host, a),
        VmCommand::List(a) => list(&host, a.json),
        VmCommand::Show(a) => show(&host, &a.name, a.json),
        VmCommand::Set(a) => set(&host, a),
        VmCommand::Delete(a) => crate::safety::delete_vm(&host, a),
        VmCommand::Export(a) => export(&host, a),
        VmCommand::Disk(cmd) => crate::vm_disk_cmd::run(cmd, &host),
        VmCommand::Import(a) => {
            let name = host.import(&a.dir, a.copy, a.new_name.as_deref())?;
            if a.json {
                show(&host, &name, true)
            } else {
                let how = if a.copy {
                    "copied into the store with a new UUID and generation ID"
                } else {
                    "registered in place"
                };
                println!("imported VM \"{name}\" ({how})");
                Ok(ExitCode::SUCCESS)
            }
        }
        VmCommand::Consolidate(a) if a.dry_run => {
            crate::safety::tree_dry_run(&host, &a.name, None, a.json)
        }
        VmCommand::Consolidate(a) => consolidate(&host, &a.name, a.json),
        VmCommand::Start(a) => {
            let pid = host.vm(&a.name).start(StartOptions {
                accel: a.accel.map(Into::into),
                timeout: Duration::from_secs(a.timeout),
            })?;
            println!("started VM \"{}\" (worker pid {pid})", a.name);
            Ok(ExitCode::SUCCESS)
        }
        VmCommand::Stop(a) => {
            let stopped = host.vm(&a.name).stop(StopOptions {
                force: a.force,
                timeout: Duration::from_secs(a.timeout),
            })?;
            match stopped {
                Stopped::DiscardedSavedState => {
                    println!("discarded the saved state of VM \"{}\"; it is off", a.name)
                }
                Stopped::Stopped(how) => println!("stopped VM \"{}\" ({})", a.name, how.as_str()),
                Stopped::Cleared(state) => {
                    println!("VM \"{}\" was {state}; it is off now", a.name)
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        VmCommand::Pause(a) => {
            host.vm(&a.name).pause()?;
            println!("paused VM \"{}\"", a.name);
            Ok(ExitCode::SUCCESS)
        }
        VmCommand::Resume(a) => {
            host.vm(&a.name).resume()?;
            println!("resumed VM \"{}\"", a.name);
            Ok(ExitCode::SUCCESS)
        }
        VmCommand::Save(a) => {
            let ms = host.vm(&a.name).save()?;
            println!(
                "saved VM \"{}\" in {ms} ms; `snapvisor vm start {}` resumes it",
                a.name,
                disk::shell_quote(Path::new(&a.name))
            );
            Ok(ExitCode::SUCCESS)
        }
        VmCommand::Status(a) => status(&host, &a.name, a.json),
        VmCommand::Console(a) => crate::console_cmd::run(&host, a),
        VmCommand::Worker(a) => {
            host::worker::run(
                host.store(),
                &a.name,
                host::worker::WorkerOptions {
                    accel: a.accel.into(),
                },
            )?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn export(host: &Host, a: ExportArgs) -> Result<ExitCode> {
    let done = host.vm(&a.name).export(&a.dir)?;
    let live = done.live.as_ref();
    if a.json {
        print_json(&json!({
            "vm": a.name,
            "folder": std::path::absolute(&a.dir).unwrap_or_else(|_| a.dir.clone()),
            "live": live.is_some(),
            "consistency": live.map_or("vm-off", |c| c.consistency.as_str()),
            "paused_ms": live.map(|c| c.paused_ms),
            "frozen_ms": live.and_then(|c| c.frozen_ms),
            "fallback": live.and_then(|c| c.fallback.clone()),
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    match live {
        None => println!("exported VM \"{}\" to {}", a.name, a.dir.display()),
        Some(c) => {
            println!(
                "exported the running VM \"{}\" to {}: {}, the guest paused {:.1} ms; the checkpoint taken for it is deleted",
                a.name,
                a.dir.display(),
                c.consistency.as_str(),
                c.paused_ms
            );
            if let Some(why) = &c.fallback {
                println!("  not application-consistent: {why}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn create(host: &Host, a: CreateArgs) -> Result<ExitCode> {
    let boot = match a.kernel {
        Some(k) => Some(DirectBoot {
            kernel: absolute(&k)?,
            initrd: a.initrd.as_deref().map(absolute).transpose()?,
            append: a.append.unwrap_or_default(),
        }),
        None => None,
    };
    let spec = NewVm {
        name: a.name.clone(),
        memory: a.memory,
        cpus: a.cpus,
        new_disks: a.disks,
        import_disks: a.import_disks,
        boot,
        checkpoint_type: a.checkpoint_type.into(),
        max_checkpoints: a.max_checkpoints,
        automatic_checkpoints: a.automatic_checkpoints,
        firmware: match a.firmware {
            FirmwareArg::Bios => vm::Firmware::Bios,
            FirmwareArg::Uefi => vm::Firmware::Uefi,
        },
        uefi_vars_template: None,
        files: Vec::new(),
    };
    host.create_vm(&spec)?;
    if a.json {
        show(host, &a.name, true)
    } else {
        println!(
            "created VM \"{}\" in {}",
            a.name,
            host.store().vm_path(&a.name).display()
        );
        Ok(ExitCode::SUCCESS)
    }
}

fn set(host: &Host, a: SetArgs) -> Result<ExitCode> {
    let boot = if a.no_kernel {
        Some(None)
    } else if let Some(k) = &a.kernel {
        Some(Some(DirectBoot {
            kernel: absolute(k)?,
            initrd: a.initrd.as_deref().map(absolute).transpose()?,
            append: a.append.clone().unwrap_or_default(),
        }))
    } else {
        None
    };
    let changes = VmChanges {
        new_name: a.new_name.clone(),
        settings: Settings {
            memory: a.memory,
            cpus: a.cpus,
            boot,
            checkpoint_type: a.checkpoint_type.map(Into::into),
            max_checkpoints: a.max_checkpoints,
            automatic_checkpoints: a.automatic_checkpoints.map(|o| o == OnOff::On),
        },
    };
    let name = host.vm(&a.name).set(&changes)?;
    if a.json {
        show(host, &name, true)
    } else {
        println!("changed VM \"{name}\"");
        Ok(ExitCode::SUCCESS)
    }
}

fn list(host: &Host, as_json: bool) -> Result<ExitCode> {
    let entries = host.list()?;
    if as_json {
        let vms: Vec<Value> = entries
            .iter()
            .map(|e| match &e.state {
                Ok(s) => json!({
                    "name": e.name,
                    "uuid": s.config.uuid,
                    "state": e.run.as_str(),
                    "memory": s.config.hardware.memory,
                    "cpus": s.config.hardware.cpus,
                    "disks": s.config.hardware.disks.len(),
                    "checkpoint_count": s.user_checkpoint_count(),
                    "folder": e.dir,
                    "unfinished_operation": e.unfinished,
                    "error": null,
                }),
                Err(err) => json!({
                    "name": e.name, "folder": e.dir, "state": "broken",
                    "error": vhdx::error_chain(err),
                }),
            })
            .collect();
        print_json(&json!({ "store": host.store().root(), "vms": vms }))?;
        return Ok(ExitCode::SUCCESS);
    }
    if entries.is_empty() {
        println!("no VMs in {}", host.store().root().display());
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<24} {:<20} {:>9} {:>5} {:>6} {:>12}",
        "NAME", "STATE", "MEMORY", "CPUS", "DISKS", "CHECKPOINTS"
    );
    for e in &entries {
        match &e.state {
            Ok(s) => println!(
                "{:<24} {:<20} {:>9} {:>5} {:>6} {:>12}{}",
                e.name,
                e.run.as_str(),
                human(s.config.hardware.memory),
                s.config.hardware.cpus,
                s.config.hardware.disks.len(),
                s.user_checkpoint_count(),
                e.unfinished
                    .as_ref()
                    .map(|op| format!("  (unfinished: {op})"))
                    .unwrap_or_default()
            ),
            Err(err) => println!("{:<24} broken: {}", e.name, vhdx::error_chain(err)),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A disk's change tracking in words: `valid since <point>, 12 regions (48 MiB) changed`.
fn tracking_text(t: &host::info::TrackingState) -> String {
    match t {
        host::info::TrackingState::None => "none".into(),
        host::info::TrackingState::Invalid { reason } => format!("invalid ({reason})"),
        host::info::TrackingState::Valid {
            reference,
            regions,
            bytes,
            pending,
            live,
        } => {
            let since = match reference {
                Some(r) => format!("valid since {}", &r[..r.len().min(12)]),
                None => "valid, no backup yet".into(),
            };
            let mut s = format!(
                "{since}, {regions} region{} ({}) changed",
                if *regions == 1 { "" } else { "s" },
                human(*bytes)
            );
            if pending.is_some() {
                s.push_str(", a backup running");
            }
            if *live {
                s.push_str(", marked live");
            }
            s
        }
    }
}

/// `vm show --json`'s document.
pub fn show_json(info: &VmInfo) -> Value {
    let s = &info.state;
    let c = &s.config;
    let disks: Vec<Value> = info
        .disks
        .iter()
        .map(|d| {
            json!({
                "name": d.name, "disk_id": d.disk_id, "file": d.file,
                "virtual_size": d.virtual_size, "chain_depth": d.chain_depth,
                "tracking": d.tracking,
            })
        })
        .collect();
    let hidden: Vec<Value> = info
        .hidden_layers
        .iter()
        .map(|(f, n)| json!({"file": f, "dependants": n}))
        .collect();
    json!({
        "name": c.name,
        "uuid": c.uuid,
        "generation_id": c.generation_id,
        "folder": info.dir,
        "state": info.run.as_str(),
        "memory": c.hardware.memory,
        "cpus": c.hardware.cpus,
        "disks": disks,
        "boot": c.hardware.boot,
        "firmware": c.hardware.firmware.as_str(),
        "uefi_vars": info.uefi_vars,
        "checkpoint_type": c.checkpoint_type.as_str(),
        "max_checkpoints": c.max_checkpoints,
        "automatic_checkpoints": c.automatic_checkpoints,
        "checkpoint_count": s.user_checkpoint_count(),
        "now_parent": info.now_parent().map(|p| json!({"id": p.id, "name": p.name})),
        "hidden_layers": hidden,
        "unfinished_operation": info.unfinished,
        "serial_log": info.serial_log,
        "older_serial_logs": info.older_serial_logs,
    })
}

pub fn show(host: &Host, name: &str, as_json: bool) -> Result<ExitCode> {
    let info = host.vm(name).info()?;
    if as_json {
        print_json(&show_json(&info))?;
        return Ok(ExitCode::SUCCESS);
    }
    let s = &info.state;
    let c = &s.config;
    println!("{}", c.name);
    println!("  folder         {}", info.dir.display());
    println!("  uuid           {}", c.uuid);
    println!("  generation id  {}", c.generation_id);
    println!("  state          {}", info.run.as_str());
    println!("  memory         {}", human(c.hardware.memory));
    println!("  cpus           {}", c.hardware.cpus);
    println!("  firmware       {}", c.hardware.firmware.as_str());
    if let Some(b) = &c.hardware.boot {
        println!("  kernel         {}", b.kernel.display());
        if let Some(i) = &b.initrd {
            println!("  initrd         {}", i.display());
        }
        println!("  append         {}", b.append);
    }
    println!(
        "  checkpoints    {} of at most {} ({}{})",
        s.user_checkpoint_count(),
        c.max_checkpoints,
        c.checkpoint_type.as_str(),
        if c.automatic_checkpoints {
            ", automatic"
        } else {
            ""
        }
    );
    let in_use = info.run.is_live();
    for d in &info.disks {
        println!(
            "  {:<14} {} ({}, chain depth {})",
            d.name,
            d.file.display(),
            d.virtual_size.map(human).unwrap_or_else(|| if in_use {
                "open in the running VM".into()
            } else {
                "unreadable".into()
            }),
            d.chain_depth
        );
        println!("  {:<14} tracking: {}", "", tracking_text(&d.tracking));
    }
    for h in s.hidden_layers() {
        println!("  hidden layer   {} ({} layers depend on it)", h.0, h.1);
    }
    if let Some(op) = &info.unfinished {
        println!("  unfinished     {op}");
    }
    println!(
        "  serial log     {} ({} earlier kept)",
        info.serial_log.display(),
        info.older_serial_logs.len()
    );
    Ok(ExitCode::SUCCESS)
}

fn status(host: &Host, name: &str, as_json: bool) -> Result<ExitCode> {
    let status = host.vm(name).status()?;
    let record = status.run.record.as_ref();
    let live = status.live.as_ref();
    let agent = live.is_some_and(|l| l.agent);
    if as_json {
        print_json(&json!({
            "name": name,
            "state": status.run.state.as_str(),
            "worker_pid": record.map(|r| r.pid),
            "qemu_pid": record.and_then(|r| r.qemu_pid),
            "qemu_status": live.map(|l| &l.qemu_status),
            "agent": agent,
            "generation_id": live.map(|l| &l.generation_id),
            "error": record.and_then(|r| r.error.clone()),
            "serial_log": host.vm(name).serial_log()?,
        }))?;
    } else {
        println!("{name}: {}", status.run.state.as_str());
        if live.is_some() {
            println!(
                "  guest agent: {}",
                if agent { "answers" } else { "does not answer" }
            );
        }
        if let Some(e) = record.and_then(|r| r.error.as_ref()) {
            println!("  last error: {e}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn consolidate(host: &Host, name: &str, as_json: bool) -> Result<ExitCode> {
    let bar = progress_bar("merging");
    let report = host
        .vm(name)
        .consolidate(crate::units::bar_progress(&bar))?;
    bar.finish_and_clear();
    if as_json {
        print_json(&json!({
            "merged": report.reconciled.merged.iter().map(|m| json!({"removed": m.removed, "into": m.into})).collect::<Vec<_>>(),
            "removed": report.reconciled.removed,
            "hidden_layers": report.hidden.iter().map(|(f, n)| json!({"file": f, "dependants": n})).collect::<Vec<_>>(),
            "unreferenced_files": report.unreferenced,
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    for m in &report.reconciled.merged {
        println!("merged {} into {}", m.removed, m.into);
    }
    for r in &report.reconciled.removed {
        println!("removed unused layer {r}");
    }
    for (f, n) in &report.hidden {
        println!("hidden layer {f} stays: {n} layers depend on it");
    }
    if report.unreferenced.is_empty() {
        println!("no files outside the VM's tree");
    } else {
        println!(
            "files nothing in the VM refers to (left in place; remove them yourself if unneeded):"
        );
        for f in &report.unreferenced {
            println!("  {}", f.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("cannot resolve {}", p.display()))
}
