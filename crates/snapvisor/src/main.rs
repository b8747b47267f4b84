//! `snapvisor`: the command line.
//!
//! Argument parsing, rendering (text or `--json`) and the demo. Disk commands call the
//! `disk` and `vhdx` crates; VM and checkpoint commands call the `host` crate's operation
//! API ([`host::Host`]), which runs them offline or asks a running VM's worker; the hidden
//! `vm worker` command is that worker ([`host::worker::run`]).
//! Errors print as one line on stderr (`snapvisor: <what failed>: <why>`); exit codes come
//! from one place, `exit.rs`.

mod checkpoint_cmd;
mod demo;
mod disk_cmd;
mod exit;
mod extra_cmd;
mod units;
mod vm_cmd;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Checkpoints and backups for QEMU/KVM virtual machines, on VHDX disks.
#[derive(Parser, Debug)]
#[command(name = "snapvisor", version, about, long_about = None)]
struct Cli {
    /// Log more (repeat for debug and trace); also honours RUST_LOG.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(flatten)]
    store: vm_cmd::StoreArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Work with virtual disk files (VHDX and raw).
    #[command(subcommand)]
    Disk(disk_cmd::DiskCommand),
    /// Create, list, change, export and import VMs in the store.
    #[command(subcommand)]
    Vm(vm_cmd::VmCommand),
    /// Take, list, apply, delete, rename and export checkpoints.
    #[command(subcommand)]
    Checkpoint(checkpoint_cmd::CheckpointCommand),
    /// Show the disk engine at work on embedded defaults: base disk, writes, differencing
    /// child, more writes, the chain, a merge, verification.
    Demo(demo::DemoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let result = match cli.command {
        Command::Disk(cmd) => disk_cmd::run(cmd),
        Command::Vm(cmd) => vm_cmd::run(cmd, &cli.store),
        Command::Checkpoint(cmd) => checkpoint_cmd::run(cmd, &cli.store),
        Command::Demo(args) => demo::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("snapvisor: {e:#}");
            exit::for_error(&e)
        }
    }
}

fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
