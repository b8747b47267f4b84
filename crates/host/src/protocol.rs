//! The control protocol between a front end and a VM's worker, on `run/control.sock`.
//!
//! One request per connection: the client writes one line of JSON, the worker answers
//! with one line and closes. Both carry the protocol version, which the receiver checks
//! before anything else, so a worker started by another snapvisor build is refused
//! clearly instead of misread:
//!
//! ```text
//! -> {"version":2,"request":{"op":"checkpoint-delete","checkpoint":"before upgrade","subtree":false}}
//! <- {"version":2,"result":{"ok":{"reply":"checkpoint-deleted","deleted":"…",…}}}
//! <- {"version":2,"result":{"error":{"kind":"not-found","message":"VM \"web\" has no checkpoint named …"}}}
//! ```
//!
//! A request is a [`Request`]; the worker answers with a [`Reply`] or an error carrying
//! its [`ErrorKind`] and its whole message, so the client's error has the same kind and
//! text as if the operation had run in its own process. Unknown fields and missing ones
//! are errors, never defaults. Lines longer than [`MAX_MESSAGE`] bytes are refused.
//!
//! # Compatibility
//!
//! [`PROTOCOL_VERSION`] changes whenever a message changes meaning or shape; there is no
//! negotiation: a running VM is stopped with the build that started it. A message
//! without a version comes from a build older than versions (which spoke
//! `{"cmd": ...}`), and is refused as such.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use uuid::Uuid;
use vhdx::ErrorKind;
use vm::journal::Direction;
use vm::{CheckpointKind, CheckpointType, Consistency, Reconciled};

/// The version of the protocol this library speaks.
pub const PROTOCOL_VERSION: u32 = 3;
/// The longest line either side reads.
pub const MAX_MESSAGE: usize = 1 << 20;

/// What a front end asks of a running VM's worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// QEMU's run state, whether the guest agent answers, the generation ID.
    Status,
    /// Stop the guest's processors.
    Pause,
    /// Run them again.
    Resume,
    /// Shut the guest down (power button, then turned off after `timeout_secs`), or turn
    /// it off at once with `force`; answered once QEMU has exited.
    Stop {
        /// Turn it off at once.
        force: bool,
        /// Seconds the guest gets to shut down.
        timeout_secs: u64,
    },
    /// Write the guest's state to `saved/state.vsv` and exit.
    Save,
    /// Take a checkpoint of the running guest.
    CheckpointCreate {
        /// Its name (default: `VM (YYYY-MM-DD hh:mm:ss)`).
        name: Option<String>,
    },
    /// Take a recovery checkpoint for a backup, quiesced as `quiesce` says, whatever the
    /// VM's checkpoint type; with the guest's memory and device state only when `memory`
    /// (a `saved-state` backup). Recovery checkpoints whose backups died are removed first.
    RecoveryCheckpoint {
        /// Its name.
        name: String,
        /// Whether to freeze the guest through its agent first.
        quiesce: Quiesce,
        /// Keep the guest's memory and device state in the checkpoint's folder.
        memory: bool,
        /// The backup's lease: a file name in the VM's `run/` folder that the backup holds
        /// an exclusive `flock` on while it lives. The worker writes the checkpoint's id
        /// into it; a lease whose lock is free names a recovery checkpoint to remove.
        lease: Option<String>,
    },
    /// Delete a checkpoint (or its subtree); its layers merge under the guest.
    CheckpointDelete {
        /// A checkpoint name or id.
        checkpoint: String,
        /// Everything below it too.
        subtree: bool,
    },
    /// Rename a checkpoint.
    CheckpointRename {
        /// A checkpoint name or id.
        checkpoint: String,
        /// The new name.
        new_name: String,
    },
    /// Write a standalone VM folder as of a checkpoint.
    CheckpointExport {
        /// A checkpoint name or id.
        checkpoint: String,
        /// The new folder (absolute: the worker's working folder is not the client's).
        dir: PathBuf,
    },
    /// A backup's end, for change tracking: the sets frozen at recovery checkpoint
    /// `checkpoint`'s switch become relative to the committed `point`, or without one
    /// (the backup failed) go back into the changed sets.
    TrackingSettle {
        /// The backup's recovery checkpoint.
        checkpoint: uuid::Uuid,
        /// The committed point's id.
        point: Option<String>,
    },
    /// Change the checkpoint settings (`None` keeps a value).
    CheckpointSettings {
        /// The checkpoint type.
        checkpoint_type: Option<CheckpointType>,
        /// The checkpoint limit.
        max_checkpoints: Option<u32>,
        /// Automatic checkpoints.
        automatic_checkpoints: Option<bool>,
    },
}

/// Whether a recovery checkpoint freezes the guest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Quiesce {
    /// Freeze through the guest agent, or take nothing.
    Required,
    /// Freeze if the agent answers; otherwise take the disks as they are (crash-consistent).
    Try,
    /// Take the disks as they are.
    Skip,
}

impl Request {
    /// The request's name on the wire (`checkpoint-create`), for messages.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Pause => "pause",
            Request::Resume => "resume",
            Request::Stop { .. } => "stop",
            Request::Save => "save",
            Request::CheckpointCreate { .. } => "checkpoint-create",
            Request::RecoveryCheckpoint { .. } => "recovery-checkpoint",
            Request::CheckpointDelete { .. } => "checkpoint-delete",
            Request::CheckpointRename { .. } => "checkpoint-rename",
            Request::CheckpointExport { .. } => "checkpoint-export",
            Request::CheckpointSettings { .. } => "checkpoint-settings",
            Request::TrackingSettle { .. } => "tracking-settle",
        }
    }
}

/// What the worker answers when a request succeeded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Reply {
    /// To [`Request::Status`].
    Status(LiveStatus),
    /// To requests with nothing to report (pause, resume, settings).
    Done,
    /// To [`Request::Stop`]: QEMU has exited.
    Stopped {
        /// How it stopped.
        how: StopHow,
    },
    /// To [`Request::Save`]: the state is saved and QEMU exits.
    Saved {
        /// How long the save took, in milliseconds.
        ms: u64,
    },
    /// To [`Request::CheckpointCreate`].
    CheckpointTaken(Capture),
    /// To [`Request::CheckpointDelete`].
    CheckpointDeleted(LiveDelete),
    /// To [`Request::CheckpointRename`].
    CheckpointRenamed {
        /// The checkpoint.
        id: Uuid,
    },
    /// To [`Request::CheckpointExport`].
    CheckpointExported {
        /// The checkpoint.
        id: Uuid,
    },
    /// To [`Request::TrackingSettle`].
    TrackingSettled {
        /// The longest a guest write took from the recovery checkpoint's switch to now
        /// (the backup's copy), waits included, in milliseconds.
        longest_write_ms: f64,
    },
}

impl Reply {
    /// The reply's name on the wire, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Reply::Status(_) => "status",
            Reply::Done => "done",
            Reply::Stopped { .. } => "stopped",
            Reply::Saved { .. } => "saved",
            Reply::CheckpointTaken(_) => "checkpoint-taken",
            Reply::CheckpointDeleted(_) => "checkpoint-deleted",
            Reply::CheckpointRenamed { .. } => "checkpoint-renamed",
            Reply::CheckpointExported { .. } => "checkpoint-exported",
            Reply::TrackingSettled { .. } => "tracking-settled",
        }
    }
}

/// What the worker sees of the running guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiveStatus {
    /// QEMU's run state (`running`, `paused`, ...; `unknown` when QMP did not answer).
    pub qemu_status: String,
    /// Whether the guest agent answered a ping.
    pub agent: bool,
    /// The VM generation ID QEMU gives the guest.
    pub generation_id: Option<String>,
}

/// How a running VM stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopHow {
    /// The guest shut down after its power button was pressed.
    ShutDown,
    /// QEMU was turned off.
    Forced,
    /// The worker was gone before it answered (QEMU had exited).
    Stopped,
}

impl StopHow {
    /// The words the CLI prints.
    pub fn as_str(self) -> &'static str {
        match self {
            StopHow::ShutDown => "shut down",
            StopHow::Forced => "forced",
            StopHow::Stopped => "stopped",
        }
    }
}

/// What taking a checkpoint of a running guest captured and measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capture {
    /// The new checkpoint.
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// What was taken.
    pub kind: CheckpointKind,
    /// The consistency achieved.
    pub consistency: Consistency,
    /// Whether memory and device state are kept.
    pub has_memory: bool,
    /// How long the guest's processors were stopped, in milliseconds (QEMU's own event
    /// times when it sent them).
    pub paused_ms: f64,
    /// From the pause to the disks served from the new layers, in milliseconds.
    pub switch_ms: f64,
    /// The memory kept, for a standard checkpoint.
    pub memory: Option<MemoryKept>,
    /// Why a production checkpoint fell back to a standard one.
    pub fallback: Option<String>,
    /// From every file system frozen to the thaw, in milliseconds.
    pub frozen_ms: Option<f64>,
    /// From the freeze request (the guest flushes first) to the thaw, in milliseconds.
    pub freeze_to_thaw_ms: Option<f64>,
}

/// A standard checkpoint's memory file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryKept {
    /// The file.
    pub file: PathBuf,
    /// Its size.
    pub bytes: u64,
    /// Whether QEMU's background snapshot wrote it while the guest ran.
    pub background: bool,
    /// How long writing it took, in milliseconds.
    pub ms: f64,
}

/// What deleting a checkpoint of a running VM did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiveDelete {
    /// The checkpoint deleted.
    pub deleted: Uuid,
    /// Its name.
    pub name: String,
    /// How many checkpoints went (more than one with a subtree).
    pub checkpoints_removed: usize,
    /// Layers merged or removed outside the running chains.
    pub reconciled: Reconciled,
    /// Merges under the running guest.
    pub live_merges: Vec<LiveMerge>,
    /// Why the live merges stopped, when one failed.
    pub live_merge_failed: Option<String>,
    /// Layers of the running chains that merge once the VM stops.
    pub merge_when_stopped: Vec<String>,
}

/// One merge under the running guest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiveMerge {
    /// The layer merged away.
    pub removed: String,
    /// The layer that holds its data now.
    pub into: String,
    /// Which way the data moved.
    pub direction: Direction,
    /// Bytes copied.
    pub bytes_copied: u64,
    /// How long the copy took.
    pub copy_seconds: f64,
    /// How long requests were held back at the switch, in milliseconds.
    pub switch_ms: f64,
    /// The longest a guest write took during the merge, in milliseconds.
    pub longest_write_ms: f64,
    /// The whole merge, planning to cleanup.
    pub total_seconds: f64,
}

/// Why a control message could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// Not JSON, or not one of the messages.
    #[error("a malformed control message: {reason}")]
    Malformed {
        /// What is wrong with it.
        reason: String,
    },
    /// A message from a build that spoke the protocol before it had versions.
    #[error(
        "the control message has no protocol version: it comes from an older snapvisor; stop the VM with the snapvisor that started it, then start it with this one"
    )]
    Unversioned,
    /// Another version of the protocol.
    #[error(
        "the control message uses protocol version {found}, this snapvisor speaks version {PROTOCOL_VERSION}; stop the VM with the snapvisor that started it, then start it with this one"
    )]
    Version {
        /// The version the message carries.
        found: u32,
    },
    /// A message longer than [`MAX_MESSAGE`].
    #[error("a control message longer than {MAX_MESSAGE} bytes")]
    TooLong,
    /// A reply that does not answer the request.
    #[error("the VM's worker answered {request} with {reply}")]
    Unexpected {
        /// The request's name.
        request: &'static str,
        /// The reply's name.
        reply: &'static str,
    },
}

impl ProtocolError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ProtocolError::Malformed { .. }
            | ProtocolError::TooLong
            | ProtocolError::Unexpected { .. } => ErrorKind::Invalid,
            ProtocolError::Unversioned | ProtocolError::Version { .. } => ErrorKind::Unsupported,
        }
    }
}

/// An error as the worker sends it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireError {
    /// Its kind.
    pub kind: WireKind,
    /// Its whole message (every cause).
    pub message: String,
}

/// [`ErrorKind`] on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[allow(missing_docs)]
pub enum WireKind {
    NotFound,
    Busy,
    Invalid,
    Corrupt,
    NoSpace,
    ReadOnly,
    Unsupported,
    PermissionDenied,
    Io,
}

impl From<ErrorKind> for WireKind {
    fn from(k: ErrorKind) -> WireKind {
        match k {
            ErrorKind::NotFound => WireKind::NotFound,
            ErrorKind::Busy => WireKind::Busy,
            ErrorKind::Invalid => WireKind::Invalid,
            ErrorKind::Corrupt => WireKind::Corrupt,
            ErrorKind::NoSpace => WireKind::NoSpace,
            ErrorKind::ReadOnly => WireKind::ReadOnly,
            ErrorKind::Unsupported => WireKind::Unsupported,
            ErrorKind::PermissionDenied => WireKind::PermissionDenied,
            // Kinds added after this protocol version travel as the catch-all.
            _ => WireKind::Io,
        }
    }
}

impl From<WireKind> for ErrorKind {
    fn from(k: WireKind) -> ErrorKind {
        match k {
            WireKind::NotFound => ErrorKind::NotFound,
            WireKind::Busy => ErrorKind::Busy,
            WireKind::Invalid => ErrorKind::Invalid,
            WireKind::Corrupt => ErrorKind::Corrupt,
            WireKind::NoSpace => ErrorKind::NoSpace,
            WireKind::ReadOnly => ErrorKind::ReadOnly,
            WireKind::Unsupported => ErrorKind::Unsupported,
            WireKind::PermissionDenied => ErrorKind::PermissionDenied,
            WireKind::Io => ErrorKind::Io,
        }
    }
}

/// A reply line's outcome.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The request succeeded.
    Ok(Reply),
    /// It failed.
    Error(WireError),
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestLine {
    version: u32,
    request: Request,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplyLine {
    version: u32,
    result: Outcome,
}

/// Just the version, read before the rest so that another version is named as such.
#[derive(Deserialize)]
struct VersionOnly {
    version: Option<u32>,
}

fn check_version(line: &[u8]) -> Result<(), ProtocolError> {
    if line.len() > MAX_MESSAGE {
        return Err(ProtocolError::TooLong);
    }
    let v: VersionOnly = serde_json::from_slice(line).map_err(malformed)?;
    match v.version {
        None => Err(ProtocolError::Unversioned),
        Some(PROTOCOL_VERSION) => Ok(()),
        Some(found) => Err(ProtocolError::Version { found }),
    }
}

fn malformed(e: serde_json::Error) -> ProtocolError {
    ProtocolError::Malformed {
        reason: e.to_string(),
    }
}

/// A request line (without its newline).
pub fn encode_request(request: &Request) -> Vec<u8> {
    serde_json::to_vec(&RequestLine {
        version: PROTOCOL_VERSION,
        request: request.clone(),
    })
    .expect("requests serialize")
}

/// Reads a request line: its version first, then the request.
pub fn decode_request(line: &[u8]) -> Result<Request, ProtocolError> {
    check_version(line)?;
    let raw: serde_json::Value = serde_json::from_slice(line).map_err(malformed)?;
    let r: RequestLine = serde_json::from_value(raw.clone()).map_err(malformed)?;
    no_unknown_fields(&raw["request"], &r.request)?;
    Ok(r.request)
}

/// Refuses fields the message's type does not have (serde lets a unit variant of a
/// tagged enum, like `{"op": "status"}`, carry any).
fn no_unknown_fields(raw: &serde_json::Value, typed: &impl Serialize) -> Result<(), ProtocolError> {
    let known = serde_json::to_value(typed).expect("messages serialize");
    if let (Some(raw), Some(known)) = (raw.as_object(), known.as_object())
        && let Some(unknown) = raw.keys().find(|k| !known.contains_key(*k))
    {
        return Err(ProtocolError::Malformed {
            reason: format!("unknown field `{unknown}`"),
        });
    }
    Ok(())
}

/// A reply line (without its newline).
pub fn encode_reply(outcome: &Outcome) -> Vec<u8> {
    serde_json::to_vec(&ReplyLine {
        version: PROTOCOL_VERSION,
        result: outcome.clone(),
    })
    .expect("replies serialize")
}

/// Reads a reply line: its version first, then the outcome.
pub fn decode_reply(line: &[u8]) -> Result<Outcome, ProtocolError> {
    check_version(line)?;
    let raw: serde_json::Value = serde_json::from_slice(line).map_err(malformed)?;
    let r: ReplyLine = serde_json::from_value(raw.clone()).map_err(malformed)?;
    if let Outcome::Ok(reply) = &r.result {
        no_unknown_fields(&raw["result"]["ok"], reply)?;
    }
    Ok(r.result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_carry_the_version() {
        let requests = [
            Request::Status,
            Request::Stop {
                force: true,
                timeout_secs: 10,
            },
            Request::CheckpointCreate { name: None },
            Request::RecoveryCheckpoint {
                name: "r".into(),
                quiesce: Quiesce::Try,
                memory: true,
                lease: Some("backup-1.lease".into()),
            },
            Request::CheckpointExport {
                checkpoint: "a b".into(),
                dir: "/x/y".into(),
            },
            Request::TrackingSettle {
                checkpoint: uuid::Uuid::new_v4(),
                point: None,
            },
            Request::CheckpointSettings {
                checkpoint_type: Some(CheckpointType::ProductionOnly),
                max_checkpoints: None,
                automatic_checkpoints: Some(true),
            },
        ];
        for r in requests {
            let line = encode_request(&r);
            let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
            assert_eq!(v["version"], PROTOCOL_VERSION);
            assert_eq!(v["request"]["op"], r.op());
            assert_eq!(decode_request(&line).unwrap(), r);
        }
    }

    #[test]
    fn other_versions_and_strangers_are_refused_by_name() {
        assert!(matches!(
            decode_request(br#"{"cmd": "status"}"#),
            Err(ProtocolError::Unversioned)
        ));
        assert!(matches!(
            decode_request(br#"{"version": 2, "request": {"op": "status"}}"#),
            Err(ProtocolError::Version { found: 2 })
        ));
        for bad in [
            &br#"{"version": 3, "request": {"op": "reboot"}}"#[..],
            br#"{"version": 3, "request": {"op": "stop", "force": true}}"#,
            br#"{"version": 3, "request": {"op": "status", "extra": 1}}"#,
            br#"{"version": 3, "request": {"op": "recovery-checkpoint", "name": "r", "quiesce": "try"}}"#,
            br#"{"version": 3}"#,
            b"not json",
        ] {
            assert!(
                matches!(decode_request(bad), Err(ProtocolError::Malformed { .. })),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn errors_keep_their_kind() {
        let line = encode_reply(&Outcome::Error(WireError {
            kind: ErrorKind::NoSpace.into(),
            message: "full".into(),
        }));
        let Outcome::Error(e) = decode_reply(&line).unwrap() else {
            panic!("not an error");
        };
        assert_eq!(ErrorKind::from(e.kind), ErrorKind::NoSpace);
        assert_eq!(e.message, "full");
    }
}
