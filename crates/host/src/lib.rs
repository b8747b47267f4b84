//! # host: running VMs, and one operation API over a store
//!
//! This crate is everything about a VM that runs, and the one place front ends call to
//! act on VMs, running or not. The CLI (`snapvisor`) parses arguments, calls a
//! [`VmHandle`] operation and renders its typed result; backups and the service call the
//! same operations.
//!
//! ```text
//! snapvisor (CLI) ─┐
//! service ─────────┴─> host ──> vm (store, tree, journal) ──> disk ──> vhdx
//!                        ├────> nbd (disks served to QEMU) ──> disk
//!                        ├────> qemu (QMP, guest agent, command line)
//!                        └────> backup (the repository) ──> disk
//! ```
//!
//! ## The operation API
//!
//! [`Host::open`] over a [`vm::Store`] gives [`VmHandle`]s ([`Host::vm`]). Every
//! operation looks once at whether the VM runs (its worker's record and liveness lock,
//! [`record::RunStatus`]) and then either runs the offline [`vm::Vm`] operation (taking
//! the VM's lock) or sends a typed [`protocol::Request`] to the VM's worker, which runs the
//! same [`vm::Vm`] operation around what only it can do (pausing, switching the served
//! disks, keeping memory). Results are typed ([`Checkpointed`], [`Deleted`], [`Applied`],
//! [`info::VmInfo`], [`info::CheckpointTree`], ...); errors are [`Error`]s with a
//! [`kind`](Error::kind), whatever process the failure happened in.
//!
//! | operation | VM off | VM running or paused |
//! |---|---|---|
//! | [`VmHandle::start`] | spawns the worker ([`lifecycle`]), waits for `running` | refused (already running) |
//! | [`VmHandle::stop`], [`save`](VmHandle::save), [`pause`](VmHandle::pause), [`resume`](VmHandle::resume) | refused (a saved VM's state is discarded by `stop`) | request to the worker |
//! | [`VmHandle::status`] | the record | the record, and the worker's view of the guest |
//! | [`VmHandle::checkpoint`] | `vm::Vm::create_checkpoint` | worker: freeze, pause, switch, memory (`live.rs`) |
//! | [`VmHandle::delete_checkpoint`] | `vm::Vm::delete_checkpoint` (merges) | worker: tree change, merges under the guest (`live_merge.rs`) |
//! | [`VmHandle::rename_checkpoint`], [`export_checkpoint`](VmHandle::export_checkpoint) | `vm::Vm` | worker runs the same `vm::Vm` call |
//! | [`VmHandle::apply`] | `vm::Vm::apply` | stop (after a live checkpoint with `save_current`), apply offline, start again when the checkpoint has memory |
//! | [`VmHandle::set`] | `vm::Vm::set` (and the store's rename) | checkpoint settings through the worker; name and hardware refused |
//! | [`VmHandle::consolidate`], [`delete`](VmHandle::delete) | `vm` | refused: the worker holds the VM's lock (`vm::Error::Running`: "stop it first") |
//! | [`VmHandle::export`] | `vm::Store::export` | worker: recovery checkpoint (`live.rs`), the tree copied with it as Now (`vm::Store::export_running`), then deleted live |
//! | [`VmHandle::add_disk`], [`remove_disk`](VmHandle::remove_disk), [`disks`](VmHandle::disks) | `vm::Vm` (`vm::disks`) | add and remove refused (stop it first); the list is read without a lock |
//! | [`VmHandle::info`], [`checkpoints`](VmHandle::checkpoints), [`Host::list`] | read without a lock | the same |
//! | [`VmHandle::backup`] | Now's chains copied into the repository under the VM's lock (a saved VM with its saved state) | worker: recovery checkpoint (`live.rs`; with memory for `saved-state`), its layers (and memory) copied by the caller under a lease (`lease.rs`), then deleted live ([`backups`]) |
//! | [`VmHandle::restore_in_place`], [`Host::restore_as`] | a checkpoint then Now overwritten; a new VM filled from the point | in place refused (stop it first) |
//!
//! ## Layout
//!
//! | file | what |
//! |---|---|
//! | `host.rs` | [`Host`], [`VmHandle`] and its lifecycle operations |
//! | `checkpoints.rs` | the checkpoint operations of [`VmHandle`] |
//! | `vm_disks.rs` | adding, removing and listing a VM's disks |
//! | `backups.rs` | backups of VMs into a `backup` repository, restores out of it |
//! | `restore_marker.rs` | the marker of a restore in progress: a VM restored half way refuses to start |
//! | `info.rs` | what listings show ([`info::VmInfo`], [`info::CheckpointTree`]) |
//! | `lifecycle.rs` | the front end's side of a worker: spawning it, waiting for it |
//! | `control.rs` | the control socket: a client's call, the worker's side of a connection |
//! | `protocol.rs` | the typed, versioned control messages |
//! | `run_state.rs` | [`RunState`] and its transitions |
//! | `record.rs` | `run/worker.json`, and the state readers derive from it |
//! | `worker.rs` | the worker process's body: disks served, QEMU run, requests answered |
//! | `session.rs` | the running VM as the worker holds it |
//! | `live.rs` | checkpoints of the running guest |
//! | `lease.rs` | backup leases: the worker removes a dead backup's recovery checkpoint |
//! | `live_merge.rs` | merges under the running guest |
//! | `served.rs` | [`served::ServedDisk`], the disk QEMU is served |
//! | `machine.rs` | QEMU's program, accelerator, firmware, machine; serial console paths and log rotation |
//! | `console.rs` | [`VmHandle::console`]: one client on a running VM's serial console |
//! | `qemu_process.rs` | QEMU as the worker's child; its state streamed to files |
//!
//! Imports point one way. The front end's side: `backups`, `checkpoints`, `vm_disks`,
//! `console` → `host` → `lifecycle`, `info`, `control` → `record`, `machine` → `error` →
//! `protocol`, `run_state`; `backups` and `live` → `lease` → `error`. The
//! worker's side: `worker` → `live` → `live_merge` → `session` → `served`, and
//! `qemu_process` → `machine`.
//!
//! ## The worker
//!
//! One detached process per running VM ([`worker::run`], started by [`VmHandle::start`]
//! through a [`WorkerLauncher`]). It holds the VM's lock (`VM/.lock`) for as long as the
//! VM runs, so offline operations on it are refused (busy) meanwhile, and its liveness
//! lock (`VM/run/.lock`) for its whole life. It serves each disk's chain through `nbd` on
//! `run/diskN.sock`, runs QEMU (which gets SIGKILL if the worker dies), and answers one
//! [`protocol::Request`] per connection on `run/control.sock`. Requests that pause or
//! switch the guest (checkpoint take, delete, rename, export, settings, save) run one at
//! a time; status, pause, resume and stop do not wait for them.
//!
//! ## Run states
//!
//! [`RunState`] is recorded by the worker in `run/worker.json` (versioned, see
//! [`record`]) along its transitions ([`RunState::can_become`]); readers derive
//! `stopped-unexpectedly` (the record says up, the liveness lock is free) and `off` (the
//! record says saved, the saved state is gone).
//!
//! ## Crash model
//!
//! - A killed front end: the worker finishes the request it was answering; nothing
//!   depends on the reply being read.
//! - A killed worker: QEMU dies with it; the VM reads as `stopped-unexpectedly`; its
//!   files are consistent (a chain whose writer died replays its log at the next open) and
//!   an operation the worker journaled runs to its end at the VM's next open (see the `vm`
//!   crate). A checkpoint whose memory was still being written is removed then.
//! - A killed guest or QEMU: the worker records `failed` with QEMU's own words from its log,
//!   closes the disks and runs the merges that waited for the VM to stop.
//!
//! ## Errors
//!
//! [`Error::kind`] classifies every failure as a [`vhdx::ErrorKind`]; a failure in the
//! worker travels back with its kind and its whole message ([`Error::Worker`]), so a front
//! end maps kinds to its own terms in one place, whichever process failed.

#![deny(unsafe_code)]

pub mod backups;
mod checkpoints;
pub mod console;
pub mod control;
pub mod error;
mod host;
pub mod info;
mod lease;
pub mod lifecycle;
mod live;
mod live_merge;
pub mod machine;
pub mod protocol;
mod qemu_process;
pub mod record;
pub mod restore_marker;
pub mod run_state;
pub mod served;
mod session;
mod vm_disks;
pub mod worker;

pub use checkpoints::{Applied, ApplyOptions, Checkpointed, Deleted};
pub use console::Console;
pub use error::{Error, Result};
pub use host::{
    Exported, Host, Progress, StartOptions, StopOptions, Stopped, VmChanges, VmHandle, VmStatus,
    no_progress,
};
pub use lifecycle::WorkerLauncher;
pub use machine::{default_accel, ovmf_paths};
pub use record::{RunStatus, WorkerRecord};
pub use run_state::RunState;
