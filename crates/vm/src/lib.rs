//! VMs in a store folder, and the checkpoint tree with its journaled operations.
//!
//! # The store
//!
//! A store is a folder with one folder per VM, named after the VM (a VM registered in
//! place is a symlink to its folder). A VM folder holds everything about the VM, so it can
//! be copied, backed up or imported as a unit (`docs/store-layout.md` shows one):
//!
//! ```text
//! vm.json                      the committed state: config, checkpoint tree, disk layers
//! journal.json                 only while a multi-step operation is unfinished
//! disks/disk0.vhdx             a base disk
//! disks/disk0_<12 hex>.avhdx   differencing layers: checkpoints', Now's, hidden ones
//! checkpoints/<id>/config.json the VM's config as the checkpoint was taken
//! merge-progress.json          only while a merge into a parent runs: how far it is durable
//! tracking/<disk>.mrt          change tracking of each disk (see [`tracking`])
//! ```
//!
//! Every JSON file carries a format version (`"format": 1`); files written before versions
//! existed have none and the same layout, and are read as such; newer ones are refused by
//! name ([`state::STATE_FORMAT`], [`journal::JOURNAL_FORMAT`],
//! [`journal::MERGE_PROGRESS_FORMAT`], [`config::CHECKPOINT_CONFIG_FORMAT`]). Files read
//! back are treated as hostile: a `vm.json` or a journal that names a file outside its
//! folder, or breaks the tree's invariants, is refused before anything acts on it.
//!
//! # The model
//!
//! [`VmState`] separates the *checkpoint tree* (nodes with a parent, and Now under one of
//! them) from the *layer graph* (VHDX files with a parent file). Each checkpoint owns one
//! layer per disk, read-only; Now owns one writable layer per disk. A layer owned by
//! neither is hidden: it stays while two or more layers depend on it and is merged away
//! (in the direction that copies fewer bytes) or removed as soon as one or none does.
//! Operations change the tree; [`Vm::reconcile`] then brings the layers in line, one
//! journaled merge at a time.
//!
//! # Guarantees and crash model
//!
//! - `vm.json` is only ever replaced whole (temporary file, fsync, rename, fsync of the
//!   folder), so it always holds the last committed state.
//! - Every multi-step operation is planned in full and written to `journal.json` before it
//!   touches anything; each step is idempotent (see [`journal`]). The next command on the
//!   VM runs an unfinished journal again, so an operation killed at any instant ends in its
//!   planned state. If a step fails (full disk, permissions) before the operation's commit,
//!   what it created is removed: the command failed and nothing changed. Merges are
//!   resumed in the direction they started, and a failed merge is safe to leave: the
//!   engine keeps a chain reading the same data at every instant of a merge.
//!   A *tentative* journal (a running VM's checkpoint, prepared while the guest runs and
//!   committed with it paused: [`Vm::prepare_checkpoint`]) is undone instead when found
//!   before its commit: its instant never came.
//! - Files are created before a commit refers to them and removed only after a commit
//!   stopped referring to them; no checkpoint's or Now's data changes until the commit that
//!   says so.
//! - Commands that change a VM hold its `flock` lock; commands on different VMs run in
//!   parallel. Commands that only look read `vm.json` without the lock (see Locking).
//! - A VM's disks belong to Now; checkpoints keep the disk sets they were taken with, and
//!   a disk's files go only with the last layer anything uses ([`disks`], which has the
//!   crash model of adding and removing one).
//! - A `--dry-run` of a checkpoint delete or a consolidate ([`preview`]) runs the same tree
//!   edit and reconciliation rules on a copy of the committed state, reading `vm.json`
//!   and the layer files only.
//!
//! # Locking
//!
//! The locks, from the outside in:
//!
//! | lock | where | held by |
//! |---|---|---|
//! | **store** | `STORE/.lock` (`flock`, exclusive; [`lock`]) | `vm create`, `vm import`, `vm set --name`, `vm delete` while they change the store's names; [`Store::open`] tries it (never waits) to remove what a killed create, import or delete left |
//! | **VM** | `VM/.lock` (`flock`, exclusive; the holder's pid and command written in it) | every [`Vm`] handle ([`Store::open_vm`]): each offline operation that changes the VM, for its whole run; **the VM's worker for as long as the VM runs** |
//! | **worker liveness** | `VM/run/.lock` (`flock`, exclusive) | the VM's worker, for its whole life (the `host` crate); nobody else takes it, readers only test it |
//! | **files** | each VHDX file (`flock`, by the `vhdx` engine) | a writable open takes it exclusive, a read-only open (a chain's parents) shared; a live merge opens files writable with a *shared* lock beside the running chain's read-only handles |
//! | **in the worker** | mutexes of the running VM (the `host` crate) | one operation that pauses or switches the guest at a time; the served chain's read-write lock (requests share it, a switch takes it alone); 512 stripe locks of 1 MiB (guest writes and a live merge's copier) |
//!
//! What keeps each pair of operations safe (*offline op*: checkpoint create, apply, delete,
//! rename, export, `vm set`, `vm consolidate`, `vm export`, `vm disk add|remove`; *reader*: `vm list`, `vm show`,
//! `checkpoint list`, `vm status`):
//!
//! | operations | what keeps them apart |
//! |---|---|
//! | offline op and offline op, same VM | the VM lock: the second refuses at once naming the first (busy), or waits with `--wait` |
//! | offline ops on different VMs | nothing shared: VM locks are per folder; they run in parallel |
//! | offline op and reader | `vm.json` is only ever replaced whole (atomic rename), so a reader sees the state before or after a commit, never half of one; a reader finishes an unfinished journal only if it takes the VM lock at once (else it shows the last committed state and names the operation) |
//! | reader and reader | nothing to keep apart |
//! | offline op and a running VM | the worker holds the VM lock (its note is `lock::WORKER_COMMAND`): the op is refused with `Error::Running`, which says to stop the VM first; the checkpoint operations and the checkpoint settings go to the worker instead (the `host` crate's operation API), which runs the same [`Vm`] operation under its lock |
//! | `vm start` and `vm start` | the second worker cannot take the VM lock (nor the liveness lock) and fails before touching anything; the front end refuses first when the record says the VM is up |
//! | a worker's requests among themselves | take, delete (with its live merges), rename, export, settings and save run one at a time (the worker's operation mutex); status, pause, resume and stop do not wait for them |
//! | the guest's I/O and a checkpoint's switch | the guest is paused (QEMU drains its requests) and the served chain is closed and reopened under its write lock: requests wait, never fail |
//! | the guest's writes and a live merge's copier | each takes the stripe locks of its range: the copier never writes a block over a newer guest write; into the parent, every guest write also goes to the parent (the mirror), after Now's layer |
//! | a live merge and the served chain's read-only handles | the merge opens the files it changes writable with a shared lock; it only ever changes what the chain already reads the same way (the engine's guarantee), and only the worker (which holds the VM lock) does so |
//! | a live merge's switch and the guest's requests | the switch holds requests back (write lock on the served chain) only while it rebuilds the chain from files already open |
//! | `vm create`/`import`/`rename`/`delete` and each other | the store lock, for the names; `vm delete` and `vm set --name` also take the VM lock (so a running VM is refused: stop it first) |
//! | `disk` commands on a VM's files | the file locks: a running VM's Now layer is open writable in its worker, so another writer or reader of that file is refused (in use); files of checkpoints are read-only and shared |
//! | a killed holder of any lock | `flock` dies with its holder: no stale lock; what the holder left half done is the journal's to finish (the next holder of the VM lock runs it) |
//!
//! Checkpoints taken here directly are of a stopped VM (consistency `vm-off`); a running
//! VM's worker takes its checkpoints through [`Vm::create_checkpoint_taken`] (with what it
//! captured: quiesced, or memory kept) and merges the layers of its running chains through
//! [`Vm::plan_merge`], [`Vm::commit_merge`] and [`Vm::finish_merge`] while it moves the data
//! itself; [`Vm::set_live`] keeps reconciliation away from those chains meanwhile.

#![forbid(unsafe_code)]

pub mod config;
pub mod disks;
pub mod error;
pub mod fsutil;
pub mod journal;
pub mod lock;
pub mod preview;
pub mod state;
pub mod store;
pub mod tracking;
pub mod vm;

pub use config::{CheckpointType, DirectBoot, DiskConfig, Firmware, Hardware, VmConfig};
pub use disks::{DiskEntry, DiskRemoval, DiskSource};
pub use error::{Error, ErrorKind, Result};
pub use state::{Checkpoint, CheckpointKind, Consistency, Layer, Now, VmState};
pub use store::{NewVm, Store, VmEntry};
pub use vm::{ConsolidateReport, PlannedMerge, PreparedTake, Reconciled, Settings, Taken, Vm};
