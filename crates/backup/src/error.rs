//! Errors of the repository and of the copies into and out of it.
//!
//! One enum, [`Error`], for every public operation; [`Error::kind`] classifies it as the
//! rest of the project does ([`ErrorKind`], from the `disk` crate), so front ends map it to
//! exit codes and HTTP statuses in one place. Messages are lowercase, say what is wrong and,
//! where the user can act, what to do; a cause is carried as `source`, never repeated in the
//! text.

use disk::ErrorKind;
use std::path::PathBuf;

/// Result of repository operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error of the `backup` crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system error on an object of the repository.
    #[error("i/o error on {what}")]
    Io {
        /// The object or file (a backend key or a path).
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The storage that holds the repository is full.
    #[error(
        "the repository's storage is full ({location}): free space there, or prune and gc, then run the operation again"
    )]
    NoSpace {
        /// The repository.
        location: String,
    },
    /// An object the operation needs is absent.
    #[error("{what} is missing from the repository")]
    Missing {
        /// The object.
        what: String,
    },
    /// No repository at the path.
    #[error("no repository at {}: create one with `backup init`", path.display())]
    NoRepository {
        /// The path.
        path: PathBuf,
    },
    /// `init` on a folder that already holds something.
    #[error("{} is not empty: a repository is created in a new or empty folder", path.display())]
    NotEmpty {
        /// The path.
        path: PathBuf,
    },
    /// The repository was written by a newer version of the format.
    #[error("repository format version {found} is newer than this build supports ({supported})")]
    NewerFormat {
        /// Version found.
        found: u32,
        /// Highest version this build reads.
        supported: u32,
    },
    /// A stored object is damaged or not what its name says.
    #[error("{what} is damaged: {reason}")]
    Corrupt {
        /// The object.
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// An encrypted repository was opened without a passphrase.
    #[error("the repository is encrypted: a passphrase is needed to open it")]
    PassphraseRequired,
    /// The passphrase does not unlock the key.
    #[error("wrong passphrase: it does not unlock the repository key")]
    WrongPassphrase,
    /// A `keyfile` repository was opened without its key file.
    #[error(
        "the repository's key is kept in a key file outside it: give the key file of repository {repository}"
    )]
    KeyFileRequired {
        /// The repository's id.
        repository: String,
    },
    /// The key file given belongs to another repository.
    #[error("{} is the key of repository {found}, not of this one ({expected})", path.display())]
    ForeignKey {
        /// The key file.
        path: PathBuf,
        /// Its repository.
        found: String,
        /// This repository.
        expected: String,
    },
    /// A recovery point named by id or prefix does not exist.
    #[error("no recovery point matches {query}")]
    PointNotFound {
        /// What was asked for.
        query: String,
    },
    /// A prefix matches more than one recovery point.
    #[error("{query} matches {count} recovery points: give more of the id")]
    AmbiguousPoint {
        /// The prefix.
        query: String,
        /// How many match.
        count: usize,
    },
    /// A disk or blob index/name that the point does not have.
    #[error("recovery point {point} has no {what}")]
    NoSuchItem {
        /// The point.
        point: String,
        /// The disk or blob asked for.
        what: String,
    },
    /// The request itself is wrong.
    #[error("{0}")]
    Invalid(String),
    /// Another garbage collection holds the repository.
    #[error("a garbage collection is already running (pid {pid} on {host}); wait for it to finish")]
    GcRunning {
        /// Its process.
        pid: u32,
        /// Its host.
        host: String,
    },
    /// A garbage collection declared this backup dead and removed its lease.
    #[error(
        "this backup's lease was removed as stale by a garbage collection; run the backup again"
    )]
    LeaseLost,
    /// The source disk changed while it was being backed up.
    #[error("the source disk changed while it was being backed up (chunk at offset {offset})")]
    SourceChanged {
        /// The chunk's offset.
        offset: u64,
    },
    /// An error of a source or destination disk.
    #[error("disk error")]
    Disk(#[from] disk::Error),
    /// An error of a VHDX destination.
    #[error("vhdx error")]
    Vhdx(#[from] vhdx::Error),
}

impl Error {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { source, .. } => ErrorKind::of_io(source),
            Error::NoSpace { .. } => ErrorKind::NoSpace,
            Error::Missing { .. } | Error::Corrupt { .. } => ErrorKind::Corrupt,
            Error::NoRepository { .. } | Error::PointNotFound { .. } => ErrorKind::NotFound,
            Error::NoSuchItem { .. } => ErrorKind::NotFound,
            Error::NotEmpty { .. } | Error::AmbiguousPoint { .. } | Error::Invalid(_) => {
                ErrorKind::Invalid
            }
            Error::NewerFormat { .. } => ErrorKind::Unsupported,
            Error::PassphraseRequired
            | Error::WrongPassphrase
            | Error::KeyFileRequired { .. }
            | Error::ForeignKey { .. } => ErrorKind::PermissionDenied,
            Error::GcRunning { .. } | Error::LeaseLost => ErrorKind::Busy,
            Error::SourceChanged { .. } => ErrorKind::Invalid,
            Error::Disk(e) => e.kind(),
            Error::Vhdx(e) => e.kind(),
        }
    }

    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    pub(crate) fn corrupt(what: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::Corrupt {
            what: what.into(),
            reason: reason.into(),
        }
    }

    /// Whether this error says an object is absent (as opposed to damaged or unreadable).
    pub fn is_missing(&self) -> bool {
        matches!(self, Error::Missing { .. })
    }
}
