//! Errors of the VHDX engine.
//!
//! [`Error`] is what every public operation returns. Structural damage found while parsing
//! a file is a [`Corruption`], carried as the source of [`Error::Corrupt`] so the top-level
//! message names the file and the detail names the structure.

use std::io;
use std::path::PathBuf;
use uuid::Uuid;

/// Structural damage or an unsupported feature found in a file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Corruption {
    /// The first 8 bytes are not `vhdxfile`.
    #[error("no vhdx file type identifier at offset 0")]
    BadFileIdentifier,
    /// One header slot is invalid.
    #[error("invalid header: {reason}")]
    BadHeader {
        /// What is wrong.
        reason: &'static str,
    },
    /// Neither header slot is valid.
    #[error("neither header is valid")]
    NoValidHeader,
    /// Both headers are valid, carry the same sequence number, but differ.
    #[error("both headers have sequence number {sequence_number} but different contents")]
    HeaderSequenceConflict {
        /// The shared sequence number.
        sequence_number: u64,
    },
    /// Header version other than 1.
    #[error("unsupported header version {version}")]
    UnsupportedVersion {
        /// Version found.
        version: u16,
    },
    /// Log version other than 0 with a log to replay.
    #[error("unsupported log version {version}")]
    UnsupportedLogVersion {
        /// Version found.
        version: u16,
    },
    /// The log is not 1 MiB aligned or inside the header section.
    #[error("log location offset {offset} length {length} is not aligned to 1 MiB")]
    BadLogLocation {
        /// Log offset.
        offset: u64,
        /// Log length.
        length: u64,
    },
    /// A region table copy is invalid.
    #[error("invalid region table: {reason}")]
    BadRegionTable {
        /// What is wrong.
        reason: &'static str,
    },
    /// A region is not aligned to 1 MiB or lies in the header section.
    #[error("region {guid} at offset {offset} length {length} is misaligned")]
    RegionMisaligned {
        /// Region GUID.
        guid: Uuid,
        /// Offset.
        offset: u64,
        /// Length.
        length: u64,
    },
    /// A region appears twice.
    #[error("region {guid} appears twice")]
    DuplicateRegion {
        /// Region GUID.
        guid: Uuid,
    },
    /// A region the format requires is missing.
    #[error("the {name} region is missing")]
    MissingRegion {
        /// `bat` or `metadata`.
        name: &'static str,
    },
    /// A region is marked required but unknown to this implementation.
    #[error("unknown required region {guid}")]
    UnknownRequiredRegion {
        /// Region GUID.
        guid: Uuid,
    },
    /// Two objects of the file overlap.
    #[error("{first} overlaps {second}")]
    Overlap {
        /// One object.
        first: String,
        /// The other.
        second: String,
    },
    /// The metadata table is invalid.
    #[error("invalid metadata table: {reason}")]
    BadMetadataTable {
        /// What is wrong.
        reason: &'static str,
    },
    /// A metadata item lies outside its region or the table area.
    #[error("metadata item {id} lies outside the metadata region")]
    MetadataItemOutOfBounds {
        /// Item id.
        id: Uuid,
    },
    /// Two metadata items overlap.
    #[error("metadata item {id} overlaps another item")]
    MetadataItemOverlap {
        /// Item id.
        id: Uuid,
    },
    /// A metadata item appears twice.
    #[error("metadata item {id} appears twice")]
    DuplicateMetadataItem {
        /// Item id.
        id: Uuid,
    },
    /// A required system metadata item is missing.
    #[error("required metadata item {item} is missing")]
    MissingMetadataItem {
        /// Item name.
        item: &'static str,
    },
    /// A metadata item has the wrong size or content.
    #[error("metadata item {item} is malformed")]
    BadMetadataItem {
        /// Item name.
        item: &'static str,
    },
    /// A metadata item is required but unknown.
    #[error("unknown required metadata item {id}")]
    UnknownRequiredMetadata {
        /// Item id.
        id: Uuid,
    },
    /// Block size out of range or not a power of two.
    #[error("invalid block size {block_size}")]
    InvalidBlockSize {
        /// Block size found.
        block_size: u32,
    },
    /// Sector size other than 512 or 4096.
    #[error("invalid {which} sector size {size}")]
    InvalidSectorSize {
        /// `logical` or `physical`.
        which: &'static str,
        /// Size found.
        size: u32,
    },
    /// Virtual size zero, above 64 TiB, or not a multiple of the logical sector size.
    #[error(
        "invalid virtual disk size {size} bytes: it must be a multiple of the {logical_sector_size}-byte logical sector, from {logical_sector_size} B to 64 TiB"
    )]
    InvalidVirtualSize {
        /// Size found.
        size: u64,
        /// The logical sector size it must be a multiple of.
        logical_sector_size: u32,
    },
    /// The parent locator is malformed.
    #[error("invalid parent locator: {reason}")]
    BadParentLocator {
        /// What is wrong.
        reason: &'static str,
    },
    /// The BAT region is smaller than the entries the disk needs.
    #[error("bat region holds {have} bytes, the disk needs {need}")]
    BatTooSmall {
        /// Region length.
        have: u64,
        /// Bytes needed.
        need: u64,
    },
    /// A BAT entry has a state that is invalid for this kind of file.
    #[error("bat entry {index} has invalid state {state}")]
    BadBatState {
        /// Entry index.
        index: u64,
        /// State found.
        state: u8,
    },
    /// A BAT entry points inside the header section or beyond the end of the file.
    #[error("bat entry {index} points at offset {offset}, outside the file's data area")]
    BlockOutOfBounds {
        /// Entry index.
        index: u64,
        /// File offset.
        offset: u64,
    },
    /// A BAT entry points at a block that lies past the end of the file: data the file
    /// should hold is missing, most often because it was cut short.
    #[error(
        "bat entry {index} points at offset {offset}, at a block that runs past the end of the file ({file_len} bytes): the file was probably truncated (an incomplete copy or download)"
    )]
    BlockBeyondEnd {
        /// Entry index.
        index: u64,
        /// File offset.
        offset: u64,
        /// The file's length.
        file_len: u64,
    },
    /// The log, the BAT region or the metadata region extends past the end of the file.
    #[error(
        "{what} at offset {offset} length {length} extends past the end of the file ({file_len} bytes): the file was probably truncated, before its data area (nothing in it can be salvaged without that structure)"
    )]
    BeyondEndOfFile {
        /// Which structure.
        what: &'static str,
        /// Its file offset.
        offset: u64,
        /// Its length.
        length: u64,
        /// The file's length.
        file_len: u64,
    },
    /// The log holds no valid sequence although the header says it must be replayed.
    #[error("the log has no valid sequence for log guid {log_guid}")]
    LogNoValidSequence {
        /// The header's log GUID.
        log_guid: Uuid,
    },
    /// The file is shorter than a log entry says it was when the entry was written.
    #[error("file is {len} bytes but the log says {flushed} bytes were durable: truncated")]
    LogTruncatedFile {
        /// Actual length.
        len: u64,
        /// Flushed file offset from the log.
        flushed: u64,
    },
    /// A log descriptor targets an offset the replay cannot write.
    #[error("log descriptor targets invalid offset {offset}")]
    LogBadTarget {
        /// Target offset.
        offset: u64,
    },
    /// The log is too large to replay.
    #[error("log of {length} bytes is larger than supported")]
    LogTooLarge {
        /// Log length.
        length: u64,
    },
}

/// An error from the VHDX engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The operating system refused a read, write, flush or resize.
    #[error("i/o error on {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file is damaged or uses an unsupported feature.
    #[error("{} is not a usable vhdx file", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: Corruption,
    },
    /// Another process has the file open in a conflicting mode.
    #[error("{} is in use by another process", path.display())]
    Locked {
        /// The file.
        path: PathBuf,
    },
    /// No candidate path of the parent locator leads to the parent.
    #[error("parent of {} not found (tried: {tried})", child.display())]
    ParentNotFound {
        /// The child.
        child: PathBuf,
        /// The paths tried.
        tried: String,
    },
    /// The parent's DataWriteGuid differs from the child's parent_linkage.
    #[error(
        "{} does not match its parent {}: the parent's data write guid is {actual}, the child expects {expected} (the parent was modified after the child was created)",
        child.display(), parent.display()
    )]
    ParentLinkageMismatch {
        /// The child.
        child: PathBuf,
        /// The parent found.
        parent: PathBuf,
        /// The linkage the child records.
        expected: String,
        /// The parent's DataWriteGuid.
        actual: Uuid,
    },
    /// The parent's virtual size or logical sector size differs from the child's.
    #[error("{} and its parent {} differ in {what}", child.display(), parent.display())]
    ParentMismatch {
        /// The child.
        child: PathBuf,
        /// The parent.
        parent: PathBuf,
        /// Which property.
        what: &'static str,
    },
    /// The chain is deeper than supported or loops back on itself.
    #[error("the chain of {} {reason}", path.display())]
    BadChain {
        /// The top file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The operation needs a writable disk.
    #[error("{} is open read-only", path.display())]
    ReadOnly {
        /// The file.
        path: PathBuf,
    },
    /// An I/O request lies beyond the end of the virtual disk.
    #[error("range {offset}+{len} is beyond the end of the disk ({size} bytes)")]
    OutOfRange {
        /// Offset requested.
        offset: u64,
        /// Length requested.
        len: u64,
        /// Virtual size.
        size: u64,
    },
    /// A write into a differencing file that does not cover whole logical sectors.
    #[error(
        "range {offset}+{len} does not cover whole {sector_size}-byte sectors of a differencing file"
    )]
    Unaligned {
        /// Offset requested.
        offset: u64,
        /// Length requested.
        len: u64,
        /// Logical sector size.
        sector_size: u32,
    },
    /// Invalid parameters for creating a file.
    #[error("invalid parameters: {0}")]
    InvalidParameters(String),
    /// The operation does not apply to this file.
    #[error("{}: {reason}", path.display())]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A shrink would cut off data.
    #[error(
        "{bytes} bytes of data lie past the new end at {size} bytes (the first at offset {first}); shrink the file system and partitions inside the guest first, or choose a larger size"
    )]
    DataBeyondEnd {
        /// The file (the message leaves it to the caller, which names the resize).
        path: PathBuf,
        /// Bytes in non-zero logical sectors past the new end.
        bytes: u64,
        /// Offset of the first of them.
        first: u64,
        /// The size asked for.
        size: u64,
    },
    /// An earlier metadata write failed; the open handle refuses further changes so that
    /// nothing half-done is made durable. Reopening the file replays or discards the log.
    #[error("{} stopped accepting writes after an earlier i/o error; close and reopen it", path.display())]
    Poisoned {
        /// The file.
        path: PathBuf,
    },
}

/// What kind of failure an error is, for the layers that must answer it in their own terms:
/// the CLI's exit codes, the NBD server's errno, the service's HTTP statuses. Each upper
/// crate's error has a `kind()` returning this, and each front end maps it in one place.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Something named does not exist (a file, a VM, a checkpoint, a recovery point).
    NotFound,
    /// Something is in use: locked by another process or another operation.
    Busy,
    /// The request itself is wrong (bad arguments, out of range, misaligned, a conflict
    /// with what exists); retrying it unchanged fails again.
    Invalid,
    /// Stored data is damaged or not in the expected format.
    Corrupt,
    /// The storage is full.
    NoSpace,
    /// A write was asked of something read-only.
    ReadOnly,
    /// The request is understood but not supported for this object.
    Unsupported,
    /// Access was denied by the operating system.
    PermissionDenied,
    /// Any other failure of the operating system or a device.
    Io,
}

impl ErrorKind {
    /// The kind of an operating-system error, from its own kind (never from parsing text).
    pub fn of_io(e: &io::Error) -> ErrorKind {
        match e.kind() {
            io::ErrorKind::NotFound => ErrorKind::NotFound,
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => ErrorKind::NoSpace,
            io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
            io::ErrorKind::ReadOnlyFilesystem => ErrorKind::ReadOnly,
            io::ErrorKind::AlreadyExists | io::ErrorKind::InvalidInput => ErrorKind::Invalid,
            io::ErrorKind::ResourceBusy | io::ErrorKind::WouldBlock => ErrorKind::Busy,
            io::ErrorKind::Unsupported => ErrorKind::Unsupported,
            _ => ErrorKind::Io,
        }
    }
}

impl Error {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { source, .. } => ErrorKind::of_io(source),
            Error::Corrupt { .. } | Error::Poisoned { .. } => ErrorKind::Corrupt,
            Error::Locked { .. } => ErrorKind::Busy,
            Error::ParentNotFound { .. } => ErrorKind::NotFound,
            Error::ParentLinkageMismatch { .. }
            | Error::ParentMismatch { .. }
            | Error::BadChain { .. } => ErrorKind::Corrupt,
            Error::ReadOnly { .. } => ErrorKind::ReadOnly,
            Error::OutOfRange { .. }
            | Error::Unaligned { .. }
            | Error::InvalidParameters(_)
            | Error::DataBeyondEnd { .. } => ErrorKind::Invalid,
            Error::Unsupported { .. } => ErrorKind::Unsupported,
        }
    }

    pub(crate) fn io(path: &std::path::Path, source: io::Error) -> Error {
        Error::Io {
            path: path.to_owned(),
            source,
        }
    }
    pub(crate) fn corrupt(path: &std::path::Path, source: Corruption) -> Error {
        Error::Corrupt {
            path: path.to_owned(),
            source,
        }
    }
    /// The corruption detail, if this is a corruption error.
    pub fn corruption(&self) -> Option<&Corruption> {
        match self {
            Error::Corrupt { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Result of engine operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;
