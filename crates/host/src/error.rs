//! Errors of the host library, each with a [`kind`](Error::kind) that front ends map to
//! their own terms (the CLI's exit codes, later the service's HTTP statuses).

use crate::protocol::ProtocolError;
use crate::run_state::RunState;
use std::path::PathBuf;
use vhdx::ErrorKind;

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong with a VM's lifecycle, its worker or a live operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The store, the VM's state or an offline operation failed.
    #[error(transparent)]
    Vm(#[from] vm::Error),
    /// A disk failed.
    #[error(transparent)]
    Disk(#[from] disk::Error),
    /// The backup repository failed.
    #[error(transparent)]
    Backup(#[from] backup::Error),
    /// The VHDX engine failed (its error names the file).
    #[error(transparent)]
    Vhdx(#[from] vhdx::Error),
    /// QEMU's QMP or guest-agent channel failed.
    #[error(transparent)]
    Qemu(#[from] qemu::Error),
    /// A disk's NBD server failed.
    #[error(transparent)]
    Nbd(#[from] nbd::Error),
    /// A file system or process call failed.
    #[error("{}", path.display())]
    Io {
        /// The file, folder or socket.
        path: PathBuf,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// A step failed; `what` says which, the source why.
    #[error("{what}")]
    Step {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: Box<Error>,
    },
    /// The operation needs a running (or paused) VM.
    #[error("VM \"{vm}\" is not running (it is {state})")]
    NotRunning {
        /// The VM.
        vm: String,
        /// Its run state.
        state: RunState,
    },
    /// `vm stop` of a VM whose last run failed or whose worker died: nothing runs.
    #[error(
        "VM \"{vm}\" is not running (it is {state}); `snapvisor vm stop {} --force` clears that and leaves it off",
        disk::shell_quote(std::path::Path::new(vm))
    )]
    NotRunningFailed {
        /// The VM.
        vm: String,
        /// Its run state.
        state: RunState,
    },
    /// `vm console` of a VM that does not run.
    #[error(
        "VM \"{vm}\" is not running: start it with snapvisor vm start {}",
        disk::shell_quote(std::path::Path::new(vm))
    )]
    ConsoleNotRunning {
        /// The VM.
        vm: String,
        /// Its run state.
        state: RunState,
    },
    /// Another client is attached to the VM's serial console.
    #[error(
        "the serial console of VM \"{vm}\" is in use by another snapvisor vm console{}: one client at a time; detach that one first (^] on its terminal)",
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    ConsoleBusy {
        /// The VM.
        vm: String,
        /// The attached client's pid, when it could be read.
        pid: Option<u32>,
    },
    /// The VM runs without a console socket (started by a snapvisor before `vm console`).
    #[error(
        "VM \"{vm}\" was started without a console socket (by an earlier snapvisor); its output is in {}; restart it to attach",
        log.display()
    )]
    NoConsoleSocket {
        /// The VM.
        vm: String,
        /// Its serial log.
        log: PathBuf,
    },
    /// The VM's memory is more than the host has.
    #[error(
        "{} of memory is more than this host has ({}); give the VM at most that with --memory (or set SNAPVISOR_HOST_MEMORY to check against another host's memory)",
        binary_size(*memory), binary_size(*host)
    )]
    MemoryExceedsHost {
        /// The VM's memory.
        memory: u64,
        /// The host's memory.
        host: u64,
    },
    /// The VM runs already.
    #[error("VM \"{vm}\" is already {state} (worker pid {pid})")]
    AlreadyRunning {
        /// The VM.
        vm: String,
        /// Its run state.
        state: RunState,
        /// Its worker's pid.
        pid: u32,
    },
    /// The VM is saved: its memory belongs to its current disks, so they must not change.
    #[error(
        "VM \"{vm}\" is saved, and its saved memory belongs to its current disks and hardware; start it (`snapvisor vm start {0}`) or discard the saved state (`snapvisor vm stop {0}`) first",
        disk::shell_quote(std::path::Path::new(vm))
    )]
    Saved {
        /// The VM.
        vm: String,
    },
    /// A change only a stopped VM takes.
    #[error(
        "VM \"{vm}\" is running; stop it first to change its name or hardware: `snapvisor vm stop {}` (checkpoint settings can change while it runs)",
        disk::shell_quote(std::path::Path::new(vm))
    )]
    RunningHardware {
        /// The VM.
        vm: String,
    },
    /// The VM's worker failed to bring the guest up.
    #[error("VM \"{vm}\" did not start: {reason}")]
    DidNotStart {
        /// The VM.
        vm: String,
        /// What the worker recorded, or how it exited.
        reason: String,
    },
    /// A timed wait ran out.
    #[error("{what}")]
    TimedOut {
        /// What did not happen in time.
        what: String,
    },
    /// The VM's worker reported a failure (its message carries the whole cause).
    #[error("{message}")]
    Worker {
        /// The failure's kind, as the worker classified it.
        kind: ErrorKind,
        /// The worker's message.
        message: String,
    },
    /// Nothing answers on the VM's control socket.
    #[error("the VM's worker does not answer on {}", socket.display())]
    Unreachable {
        /// The control socket.
        socket: PathBuf,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// The worker took the request but sent no reply.
    #[error("no reply from the VM's worker")]
    NoReply {
        /// The system's error (a timeout, or the connection closed).
        #[source]
        source: std::io::Error,
    },
    /// A control message broke the protocol.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// `qemu-system-x86_64` is not there.
    #[error("{}", qemu_missing(program, *set_by_env))]
    QemuMissing {
        /// The program looked for.
        program: PathBuf,
        /// Whether `SNAPVISOR_QEMU` named it.
        set_by_env: bool,
    },
    /// A program could not be started.
    #[error("cannot run {}", program.display())]
    Spawn {
        /// The program.
        program: PathBuf,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// OVMF's firmware code is not there.
    #[error(
        "the UEFI firmware {} is missing: install Debian's ovmf package or set SNAPVISOR_OVMF_CODE",
        path.display()
    )]
    FirmwareMissing {
        /// The file looked for.
        path: PathBuf,
    },
    /// QEMU failed; the message carries QEMU's own words from its log.
    #[error("{message}")]
    QemuFailed {
        /// What failed, with QEMU's reason.
        message: String,
    },
    /// The guest or the VM refused what was asked, for the reason given.
    #[error("{reason}")]
    Refused {
        /// The failure's kind.
        kind: ErrorKind,
        /// What was refused and what to do.
        reason: String,
    },
    /// A served chain is not what a live merge planned for.
    #[error("{reason}")]
    ServedChain {
        /// What is wrong.
        reason: String,
    },
    /// The worker's run state cannot go where it was asked to (a bug, reported rather
    /// than recorded).
    #[error("the VM cannot go from {from} to {to}")]
    Transition {
        /// The current state.
        from: RunState,
        /// The state asked for.
        to: RunState,
    },
}

impl Error {
    /// What kind of failure this is (see [`ErrorKind`]).
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Vm(e) => e.kind(),
            Error::Disk(e) => e.kind(),
            Error::Backup(e) => e.kind(),
            Error::Vhdx(e) => e.kind(),
            Error::Qemu(e) => qemu_kind(e),
            Error::Nbd(e) => nbd_kind(e),
            Error::Io { source, .. } | Error::Spawn { source, .. } => ErrorKind::of_io(source),
            Error::Step { source, .. } => source.kind(),
            Error::NotRunning { .. }
            | Error::ConsoleNotRunning { .. }
            | Error::NotRunningFailed { .. }
            | Error::MemoryExceedsHost { .. }
            | Error::Saved { .. }
            | Error::Transition { .. } => ErrorKind::Invalid,
            Error::AlreadyRunning { .. }
            | Error::RunningHardware { .. }
            | Error::ConsoleBusy { .. } => ErrorKind::Busy,
            Error::NoConsoleSocket { .. } => ErrorKind::Unsupported,
            Error::DidNotStart { .. } | Error::QemuFailed { .. } => ErrorKind::Io,
            Error::TimedOut { .. } => ErrorKind::Busy,
            Error::Worker { kind, .. } | Error::Refused { kind, .. } => *kind,
            Error::Unreachable { source, .. } | Error::NoReply { source } => {
                ErrorKind::of_io(source)
            }
            Error::Protocol(e) => e.kind(),
            Error::ServedChain { .. } => ErrorKind::Corrupt,
            Error::QemuMissing { .. } | Error::FirmwareMissing { .. } => ErrorKind::NotFound,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// The message with every cause, one after the other (`what: why: why`).
    pub fn chain(&self) -> String {
        vhdx::error_chain(self)
    }
}

fn qemu_missing(program: &std::path::Path, set_by_env: bool) -> String {
    if set_by_env {
        format!(
            "cannot run {} (named by SNAPVISOR_QEMU): no such program; set SNAPVISOR_QEMU to a qemu-system-x86_64 binary, or unset it to use qemu-system-x86_64 from the PATH (Debian: `apt install qemu-system-x86`)",
            program.display()
        )
    } else {
        format!(
            "cannot run {}: it is not installed (not on the PATH); install QEMU (Debian: `apt install qemu-system-x86`) or set SNAPVISOR_QEMU to a qemu-system-x86_64 binary",
            program.display()
        )
    }
}

fn qemu_kind(e: &qemu::Error) -> ErrorKind {
    match e {
        qemu::Error::Connect { source, .. } | qemu::Error::Io { source, .. } => {
            ErrorKind::of_io(source)
        }
        qemu::Error::Timeout { .. } => ErrorKind::Busy,
        qemu::Error::Protocol { .. } | qemu::Error::Command { .. } | qemu::Error::Closed(_) => {
            ErrorKind::Io
        }
    }
}

fn nbd_kind(e: &nbd::Error) -> ErrorKind {
    e.kind()
}

/// Names the step that failed, keeping the failure as its cause (what `anyhow`'s
/// `context` does, for typed errors).
///
/// A step that names a VM (`cannot delete VM "web"`) is left out when the failure's own
/// sentence already names that VM: refusals say which VM and what to do ("VM "web" is
/// running; stop it first: ..."), and wrapping them would say the VM twice.
pub trait Context<T> {
    /// Wraps the error with `what`.
    fn context(self, what: impl Into<String>) -> Result<T>;
    /// Wraps the error with what `what` returns.
    fn with_context<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl Into<String>) -> Result<T> {
        self.map_err(|e| step(what.into(), e.into()))
    }
    fn with_context<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|e| step(what().into(), e.into()))
    }
}

/// `source` wrapped in the step `what`, unless both name the same VM (see [`Context`]).
fn step(what: String, source: Error) -> Error {
    if let Some(vm) = named_vm(&what)
        && names_vm(&source.to_string(), vm)
    {
        return source;
    }
    Error::Step {
        what,
        source: Box::new(source),
    }
}

/// The VM a step names as `VM "NAME"`, if any: from its first `VM "` to its last quote,
/// so that a name with quotes in it is whole (a step names one VM, with nothing quoted
/// after it).
fn named_vm(message: &str) -> Option<&str> {
    let start = message.find("VM \"")? + 4;
    let end = message.rfind('"')?;
    (end > start).then(|| &message[start..end])
}

/// Whether a message names VM `vm` (`VM "vm"`, or `no VM named "vm"`).
pub fn names_vm(message: &str, vm: &str) -> bool {
    message.contains(&format!("VM \"{vm}\"")) || message.contains(&format!("VM named \"{vm}\""))
}

/// A size in the largest binary unit that keeps it at least 1, with one decimal.
fn binary_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut unit = 0;
    while unit + 1 < UNITS.len() && bytes >= 1u64 << (10 * (unit + 1)) {
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes} B");
    }
    format!(
        "{:.1} {}",
        bytes as f64 / (1u64 << (10 * unit)) as f64,
        UNITS[unit]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_naming_the_vm_its_failure_names_is_left_out() {
        let running: Result<()> = Err(vm::Error::Running { vm: "web".into() }.into());
        let e = running.context("cannot delete VM \"web\"").unwrap_err();
        assert_eq!(
            e.chain(),
            "VM \"web\" is running; stop it first: `snapvisor vm stop web`"
        );
        let missing: Result<()> = Err(vm::Error::NoSuchVm {
            name: "x".into(),
            store: "/s".into(),
        }
        .into());
        let e = missing.context("cannot delete VM \"x\"").unwrap_err();
        assert_eq!(e.chain(), "no VM named \"x\" in the store /s");
        // Another VM's name, or a cause that names none, keeps the step.
        let other: Result<()> = Err(vm::Error::Running { vm: "db".into() }.into());
        let e = other.context("cannot delete VM \"web\"").unwrap_err();
        assert!(e.chain().starts_with("cannot delete VM \"web\": VM \"db\""));
        let quoted: Result<()> = Err(vm::Error::CheckpointsDisabled(r#"a "b" c"#.into()).into());
        let e = quoted
            .context(r#"cannot checkpoint VM "a "b" c""#)
            .unwrap_err();
        assert!(
            e.chain()
                .starts_with(r#"checkpoints are disabled for VM "a "b" c""#)
        );
        let io: Result<()> = Err(Error::TimedOut {
            what: "no answer".into(),
        });
        let e = io.context("cannot stop VM \"web\"").unwrap_err();
        assert_eq!(e.chain(), "cannot stop VM \"web\": no answer");
    }
}
