//! `snapvisor`: the command line.
//!
//! Argument parsing, rendering (text or `--json`) and the demo. Disk commands call the
//! `disk` and `vhdx` crates; VM and checkpoint commands call the `host` crate's operation
//! API ([`host::Host`]), which runs them offline or asks a running VM's worker; the hidden
//! `vm worker` command is that worker ([`host::worker::run`]).
//! Errors print as one line on stderr (`snapvisor: <what failed>: <why>`); exit codes come
//! from one place, `exit.rs`.

mod backup_cmd;
mod checkpoint_cmd;
mod completions;
mod config;
mod demo;
mod disk_cmd;
mod exit;
mod extra_cmd;
mod render;
mod safety;
mod serving;
mod units;
mod vm_cmd;

use clap::{CommandFactory, Parser, Subcommand};
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
    /// Back VMs up into a repository, and restore them.
    #[command(subcommand)]
    Backup(backup_cmd::BackupCommand),
    /// Show the disk engine and the checkpoint tree at work, verifying every step.
    ///
    /// On embedded defaults, in a new folder (or --dir): a dynamic VHDX, writes, a
    /// differencing child (what a checkpoint does), more writes, the chain, a merge in the
    /// direction that copies fewer bytes, then data, `disk check` and (when installed)
    /// `qemu-img check` verified. Then a VM in a store on that disk: checkpoints on two
    /// branches, applied with and without --save-current, deleted so that their layers
    /// merge away, the data verified after each step. No QEMU is needed; the running-VM
    /// story (start, production and standard checkpoints, apply and merges under a running
    /// guest) is `./scripts/demo.sh`, which runs this first.
    Demo(demo::DemoArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    Completions(completions::CompletionsArgs),
    /// Write man pages for every command into a folder.
    Man(completions::ManArgs),
}

fn main() -> ExitCode {
    // Before anything else, while this is the only thread: the file's values become the
    // environment variables not already set, under which clap and the host read them.
    match config::load() {
        Ok(values) => config::apply(&values),
        Err(e) => {
            eprintln!("snapvisor: {e:#}");
            return ExitCode::FAILURE;
        }
    }
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let result = match cli.command {
        Command::Disk(cmd) => disk_cmd::run(cmd),
        Command::Vm(cmd) => vm_cmd::run(cmd, &cli.store),
        Command::Checkpoint(cmd) => checkpoint_cmd::run(cmd, &cli.store),
        Command::Backup(cmd) => backup_cmd::run(cmd, &cli.store),
        Command::Demo(args) => demo::run(args),
        Command::Completions(args) => completions::completions(args, Cli::command()),
        Command::Man(args) => completions::man(args, Cli::command()),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `--help` describes every positional argument of every visible command (a bare
    /// `<PATH>` tells a user nothing).
    #[test]
    fn every_positional_argument_has_a_description() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_positionals() {
                if arg.get_help().is_none() && !arg.is_hide_set() {
                    missing.push(format!("{path} <{}>", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "snapvisor", &mut missing);
        assert!(missing.is_empty(), "no description: {missing:#?}");
    }
}
