//! Errors of the store and the checkpoint tree.

use std::path::PathBuf;
pub use vhdx::ErrorKind;

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong with a VM, its store or its checkpoint tree.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No VM of that name in the store.
    #[error("no VM named \"{name}\" in the store {store}")]
    NoSuchVm {
        /// The name asked for.
        name: String,
        /// The store folder.
        store: PathBuf,
    },
    /// The name is taken.
    #[error("a VM named \"{0}\" already exists")]
    VmExists(String),
    /// The name an import would register is taken.
    #[error("a VM named \"{0}\" already exists; import it under another name with --name NEW")]
    ImportNameTaken(String),
    /// Another registered VM has the same UUID.
    #[error(
        "the VM in {path} has the UUID {uuid} of the registered VM \"{existing}\"; import it with --copy to give it new identities"
    )]
    DuplicateUuid {
        /// The folder being imported.
        path: PathBuf,
        /// The shared UUID.
        uuid: uuid::Uuid,
        /// The registered VM that has it.
        existing: String,
    },
    /// A VM or checkpoint name breaks the naming rules.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName {
        /// The name given.
        name: String,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// An argument is out of range or contradicts another.
    #[error("{0}")]
    InvalidArgument(String),
    /// No checkpoint of that name or id.
    #[error("VM \"{vm}\" has no checkpoint named \"{query}\" or with that id")]
    NoSuchCheckpoint {
        /// The VM.
        vm: String,
        /// The name or id asked for.
        query: String,
    },
    /// Several checkpoints carry the name.
    #[error("VM \"{vm}\" has {} checkpoints named \"{query}\"; name one by its id: {}", ids.len(), ids.join(", "))]
    AmbiguousCheckpoint {
        /// The VM.
        vm: String,
        /// The name asked for.
        query: String,
        /// Ids of the checkpoints with that name.
        ids: Vec<String>,
    },
    /// The VM's checkpoint type is `disabled`.
    #[error(
        "checkpoints are disabled for VM \"{0}\"; enable them with `snapvisor vm set {quoted} --checkpoint-type production`",
        quoted = disk::shell_quote(std::path::Path::new(.0))
    )]
    CheckpointsDisabled(String),
    /// The checkpoint limit is reached.
    #[error(
        "VM \"{vm}\" already has {limit} checkpoints, its limit; delete one, or raise the limit with `snapvisor vm set {} --max-checkpoints N`",
        disk::shell_quote(std::path::Path::new(vm))
    )]
    LimitReached {
        /// The VM.
        vm: String,
        /// Its limit.
        limit: u32,
    },
    /// The VM's worker holds it: the VM runs, and the command needs it stopped.
    #[error(
        "VM \"{vm}\" is running; stop it first: `snapvisor vm stop {}`",
        disk::shell_quote(std::path::Path::new(vm))
    )]
    Running {
        /// The VM.
        vm: String,
    },
    /// Another command holds the VM.
    #[error("VM \"{vm}\" is busy: {holder}; wait for it to finish, or pass --wait SECONDS")]
    Busy {
        /// The VM (or `store` for the store itself).
        vm: String,
        /// Who holds it, as the holder recorded it.
        holder: String,
    },
    /// An export destination inside the store, where it would read as a second VM with
    /// the same UUID.
    #[error(
        "{} is inside the store {}, which would read the copy as a second VM with the same UUID; export to a folder outside the store (`snapvisor vm import --copy` makes a new VM of an export)",
        path.display(), store.display()
    )]
    ExportIntoStore {
        /// The destination asked for.
        path: PathBuf,
        /// The store folder (or the VM folder registered in it that holds the destination).
        store: PathBuf,
    },
    /// A file of the store is damaged or not what it should be.
    #[error("{path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A disk layer the tree records is missing.
    #[error("disk file {path} is missing; restore it from a backup (the VM's tree needs it)")]
    MissingLayer {
        /// The missing file.
        path: PathBuf,
    },
    /// A disk file belongs to another virtual disk than the tree records.
    #[error(
        "disk file {path} is not this VM's disk \"{disk}\" (virtual disk id {found}, expected {expected}); put the VM's own file back"
    )]
    ForeignDisk {
        /// The file.
        path: PathBuf,
        /// The VM's disk name.
        disk: String,
        /// The id the VM recorded.
        expected: uuid::Uuid,
        /// The id the file carries.
        found: uuid::Uuid,
    },
    /// An unfinished operation could not be completed.
    #[error(
        "VM \"{vm}\" has an unfinished operation ({op}) that could not be completed; fix the cause and run the command again, which finishes it first"
    )]
    Unfinished {
        /// The VM.
        vm: String,
        /// The operation the journal describes.
        op: String,
        /// Why it failed.
        #[source]
        source: Box<Error>,
    },
    /// A file system call failed.
    #[error("{path}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// The VHDX engine failed (its error names the file).
    #[error(transparent)]
    Vhdx(#[from] vhdx::Error),
    /// A disk conversion failed.
    #[error(transparent)]
    Disk(#[from] disk::Error),
}

impl Error {
    /// What kind of failure this is (see [`ErrorKind`]): what front ends map to exit codes
    /// and statuses.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NoSuchVm { .. } | Error::NoSuchCheckpoint { .. } => ErrorKind::NotFound,
            Error::VmExists(_)
            | Error::ImportNameTaken(_)
            | Error::DuplicateUuid { .. }
            | Error::InvalidName { .. }
            | Error::InvalidArgument(_)
            | Error::AmbiguousCheckpoint { .. }
            | Error::CheckpointsDisabled(_)
            | Error::LimitReached { .. }
            | Error::ExportIntoStore { .. } => ErrorKind::Invalid,
            Error::Busy { .. } | Error::Running { .. } => ErrorKind::Busy,
            // A layer the tree needs is gone or is another disk's: the VM folder is damaged.
            Error::Corrupt { .. } | Error::MissingLayer { .. } | Error::ForeignDisk { .. } => {
                ErrorKind::Corrupt
            }
            Error::Unfinished { source, .. } => source.kind(),
            Error::Io { source, .. } => ErrorKind::of_io(source),
            Error::Vhdx(e) => e.kind(),
            Error::Disk(e) => e.kind(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
