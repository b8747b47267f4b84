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
//! ```
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
//! - Files are created before a commit refers to them and removed only after a commit
//!   stopped referring to them; no checkpoint's or Now's data changes until the commit that
//!   says so.
//! - Commands that change a VM hold its `flock` lock; commands on different VMs run in
//!   parallel. Commands that only look read `vm.json` without the lock.
//!
//! Checkpoints taken here directly are of a stopped VM (consistency `vm-off`); a running
//! VM's worker takes its checkpoints through [`Vm::create_checkpoint_taken`] (with what it
//! captured: quiesced, or memory kept) and merges the layers of its running chains through
//! [`Vm::plan_merge`], [`Vm::commit_merge`] and [`Vm::finish_merge`] while it moves the data
//! itself; [`Vm::set_live`] keeps reconciliation away from those chains meanwhile.

#![forbid(unsafe_code)]

pub mod config;
pub mod error;
pub mod fsutil;
pub mod journal;
pub mod lock;
pub mod state;
pub mod store;
pub mod vm;

pub use config::{CheckpointType, DirectBoot, DiskConfig, Firmware, Hardware, VmConfig};
pub use error::{Error, ErrorKind, Result};
pub use state::{Checkpoint, CheckpointKind, Consistency, Layer, Now, VmState};
pub use store::{NewVm, Store, VmEntry};
pub use vm::{ConsolidateReport, PlannedMerge, Reconciled, Settings, Taken, Vm};
