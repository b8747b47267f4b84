//! `snapvisor completions SHELL` and `snapvisor man --dir DIR`: both generated from the
//! clap definition at run time, so they can never disagree with the binary that prints
//! them (no build script, nothing to keep in step by hand).

use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell to print a completion script for. Install it where your shell looks,
    /// e.g. `snapvisor completions bash > ~/.local/share/bash-completion/completions/snapvisor`,
    /// `snapvisor completions zsh > ~/.zfunc/_snapvisor` (with `~/.zfunc` in `fpath`),
    /// `snapvisor completions fish > ~/.config/fish/completions/snapvisor.fish`.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

#[derive(Args, Debug)]
pub struct ManArgs {
    /// The folder to write the pages into (created if missing): `snapvisor.1` and one page
    /// per command, e.g. `snapvisor-disk-resize.1`. Read one with `man -l DIR/snapvisor.1`,
    /// or put DIR/.. on MANPATH.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
}

/// Prints the completion script for `a.shell` to stdout.
pub fn completions(a: CompletionsArgs, mut cli: clap::Command) -> Result<ExitCode> {
    use std::io::Write;
    let name = cli.get_name().to_owned();
    // Into memory first: clap_complete panics on a failed write (a closed pipe).
    let mut script = Vec::new();
    clap_complete::generate(a.shell, &mut cli, name, &mut script);
    let mut out = std::io::stdout().lock();
    out.write_all(&script)
        .and_then(|()| out.flush())
        .context("cannot write to stdout")?;
    Ok(ExitCode::SUCCESS)
}

/// Writes a man page for the program and for every visible subcommand into `a.dir`.
pub fn man(a: ManArgs, cli: clap::Command) -> Result<ExitCode> {
    std::fs::create_dir_all(&a.dir)
        .with_context(|| format!("cannot create {}", a.dir.display()))?;
    clap_mangen::generate_to(cli, &a.dir)
        .with_context(|| format!("cannot write man pages into {}", a.dir.display()))?;
    let count = std::fs::read_dir(&a.dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".1"))
                .count()
        })
        .unwrap_or(0);
    println!("wrote {count} man pages into {}", a.dir.display());
    Ok(ExitCode::SUCCESS)
}
