//! QEMU's command line for a VM whose disks are served over NBD ([`MachineSpec`]), and
//! QEMU's control protocols, spoken over unix sockets.
//!
//! - [`Qmp`]: the QEMU Machine Protocol. Commands carry an `id` and replies are matched
//!   by it; events are queued as they arrive (QEMU sends some, like `STOP`, before the
//!   reply to the command that caused them), so a caller can wait for one after the fact.
//! - [`GuestAgent`]: qemu-ga's protocol: line-oriented JSON with no greeting. Every
//!   session starts with `guest-sync-delimited` after a `0xFF` byte, and input up to the
//!   agent's own `0xFF` is discarded, so a reply left over from an earlier client (or the
//!   parse error our `0xFF` provokes) is never taken for ours.
//!
//! Every call has a timeout: a guest that stops answering never blocks the caller.

#![forbid(unsafe_code)]

mod agent;
pub mod cmdline;
mod qmp;

pub use agent::GuestAgent;
pub use cmdline::{Accel, MachineSpec, NbdDisk};
pub use qmp::{Event, Qmp};

use std::path::PathBuf;

/// Errors of the QEMU clients.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Connecting to the socket failed.
    #[error("cannot connect to {}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("{what} socket i/o failed")]
    Io {
        /// `QMP` or `guest agent`.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The peer sent something that is not the protocol.
    #[error("{what} sent an unexpected message: {message}")]
    Protocol {
        /// `QMP` or `guest agent`.
        what: &'static str,
        /// What it sent.
        message: String,
    },
    /// The command failed; the peer's class and description.
    #[error("{command} failed: {desc} ({class})")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// No answer within the time allowed.
    #[error("{what} did not answer {command} within {seconds:.1} s")]
    Timeout {
        /// `QMP` or `guest agent`.
        what: &'static str,
        /// The command (or event) waited for.
        command: String,
        /// The time allowed.
        seconds: f64,
    },
    /// The connection closed (QEMU exited, for example).
    #[error("the {0} connection closed")]
    Closed(&'static str),
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn command_error(command: &str, v: &serde_json::Value) -> Error {
    Error::Command {
        command: command.to_owned(),
        class: v["class"].as_str().unwrap_or("unknown").to_owned(),
        desc: v["desc"].as_str().unwrap_or("no description").to_owned(),
    }
}
