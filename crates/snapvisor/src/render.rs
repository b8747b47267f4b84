//! Output shared by every command: what `--json` prints.

use anyhow::{Context, Result};
use serde::Serialize;
use std::io::Write;

/// Prints `v` as pretty JSON and a newline on stdout.
pub fn print_json<T: Serialize>(v: &T) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v).context("cannot write to stdout")?;
    writeln!(out).context("cannot write to stdout")?;
    Ok(())
}
