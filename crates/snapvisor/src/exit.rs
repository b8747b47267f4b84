//! Exit codes: the one place where failures become them.
//!
//! The contract (README's table): 0 success; 1 a command that failed (one line on stderr),
//! whatever kind of failure it was; 2 a usage error (clap's own code: an unknown command
//! or flag, a missing or malformed argument); 3 `disk check` found errors in the file it
//! checked (the command itself worked). A command whose change was made but whose merges
//! afterwards failed also exits 1 (nothing is lost; the layers stay hidden), and so does
//! `disk info` of a file whose chain is broken (after printing what it could read).
//! Errors are classified by [`ErrorKind`] in every library crate; this is where a kind
//! would get a code of its own.

use std::process::ExitCode;
use vhdx::ErrorKind;

/// `disk check` found errors in the file (distinct from clap's usage errors, which exit 2).
pub const CHECK_FOUND_ERRORS: u8 = 3;

/// The exit code of a command that failed with `e`.
pub fn for_error(e: &anyhow::Error) -> ExitCode {
    ExitCode::from(code(kind(e)))
}

/// The table: every kind exits 1 today (the contract above).
fn code(kind: Option<ErrorKind>) -> u8 {
    match kind {
        Some(ErrorKind::NotFound) => 1,
        Some(ErrorKind::Busy) => 1,
        Some(ErrorKind::Invalid) => 1,
        Some(ErrorKind::Corrupt) => 1,
        Some(ErrorKind::NoSpace) => 1,
        Some(ErrorKind::ReadOnly) => 1,
        Some(ErrorKind::Unsupported) => 1,
        Some(ErrorKind::PermissionDenied) => 1,
        Some(ErrorKind::Io) => 1,
        // Kinds added later, and the CLI's own argument checks.
        Some(_) | None => 1,
    }
}

/// The exit code of a change whose merges afterwards failed.
pub fn merge_left_behind() -> ExitCode {
    ExitCode::FAILURE
}

/// `disk info` read the file but not its whole chain.
pub fn chain_broken() -> ExitCode {
    ExitCode::FAILURE
}

/// `disk check` found errors.
pub fn check_found_errors() -> ExitCode {
    ExitCode::from(CHECK_FOUND_ERRORS)
}

/// The kind of the outermost typed error in `e`'s chain (the CLI's own argument checks
/// have none).
fn kind(e: &anyhow::Error) -> Option<ErrorKind> {
    e.chain().find_map(|c| {
        c.downcast_ref::<host::Error>()
            .map(host::Error::kind)
            .or_else(|| c.downcast_ref::<vm::Error>().map(vm::Error::kind))
            .or_else(|| c.downcast_ref::<disk::Error>().map(disk::Error::kind))
            .or_else(|| c.downcast_ref::<vhdx::Error>().map(vhdx::Error::kind))
    })
}
