//! # vhdx: Microsoft's VHDX virtual disk format
//!
//! A pure format crate: it knows files, not virtual machines. It creates, opens, reads and
//! writes fixed, dynamic and differencing (`.avhdx`) files as specified by MS-VHDX v8.0,
//! composes differencing chains, merges a child with its parent in either direction, and
//! checks and repairs a file's structure. It stays interoperable: qemu-img opens our fixed
//! and dynamic files, and files made by Hyper-V, Disk2VHD and qemu-img open here.
//!
//! ## Layers
//!
//! | module | role |
//! |---|---|
//! | [`format`](mod@format) | every on-disk structure, parsed and encoded with explicit little-endian code |
//! | `io` | [`FileIo`]: positional reads and writes, and which parts of a file hold data |
//! | `testing` | memory, fault-injecting and crash-simulating files (feature `testing`) |
//! | `log` | the metadata log: active-sequence search, replay in place or in memory, entry building |
//! | `file` | [`VhdxFile`]: one file: validation at open, read resolution, write paths, commits; resizing (`file/resize.rs`) |
//! | `chain` | [`Chain`]: a file and its parents read as one disk; reads start at the layer that answers them |
//! | `create` | new fixed, dynamic and differencing files |
//! | `merge` | child into parent, parent into child, restartable |
//! | `reparent` | repairing a child's link to a moved or renamed parent, identity checked |
//! | `check` | structure report and repair |
//!
//! ## Guarantees and invariants
//!
//! * **Validation at open.** Signatures and checksums of headers and region tables, the
//!   current header by sequence number, required regions and metadata items, sizes, every
//!   BAT state for the kind of file, every block inside the file, no two structures
//!   overlapping. Damage is reported as a precise [`Corruption`], never a panic.
//! * **Cost follows what a file holds.** The BAT is read only where the file system
//!   stores it (`SEEK_DATA`) and kept only where an entry is non-zero (`bat`, a radix tree
//!   of 64-entry leaves); every walk over it visits only what exists. A 64 TiB disk opens
//!   in milliseconds and a few megabytes whatever the depth of its chain.
//! * **Logs are replayed.** A file whose header names a log is replayed in place when opened
//!   writable, and in memory when opened read-only (the file is then not written).
//! * **Positional, concurrent I/O.** All methods take `&self`; there is no seek cursor.
//!   Writes into allocated blocks go straight to the file without a lock; allocation and
//!   bitmap changes take a short lock (`state`). Commits take a second lock (`journal`,
//!   always before `state`) that serialises the log and the header; a flush copies the
//!   dirty sectors under `state`, then syncs and commits holding only `journal`, so
//!   writers never wait for the disk because someone flushed.
//! * **Fixed disks own their space.** Their payload is preallocated on the file system at
//!   creation (not a sparse file), so a full disk is reported then, not to the guest.
//! * **Parents are read-only.** A chain opens every parent read-only (with a shared lock);
//!   only a merge opens a parent for writing. A writable file holds an exclusive lock.
//! * **Identity.** The DataWriteGuid changes once per session, before the first
//!   guest-visible change; the FileWriteGuid at the first modification; the LogGuid is set
//!   when the session's first log entry is written and cleared on a clean close, so
//!   `qemu-img` can open the file read-only afterwards.
//!
//! ## Crash model
//!
//! The file behaves like a disk with a volatile write cache: a write that returned is
//! durable after the next [`VhdxFile::flush`] (or [`Chain::flush`]); a crash loses at
//! most the writes since the last flush, never a flushed one, and never leaves a file
//! that fails to open.
//!
//! * Payload data is written in place or into space appended at the end of the file;
//!   allocations only extend the file, so new space reads as zeros and never overlaps
//!   anything a committed BAT entry points at.
//! * A flush copies the changed BAT and sector-bitmap sectors, syncs the data (every block
//!   in the copies had its data written before the copy), then commits the copies through
//!   the log: entry written and synced, header names the log (first entry only), sectors
//!   written to their places and synced. Replaying an applied entry again is harmless; a
//!   torn entry is ignored and the previous complete one stays the head.
//! * A flush too large for one log entry (over ~126 sectors with the 1 MiB log) spans
//!   several, each applied before the next. Sectors are ordered so that every prefix is a
//!   valid file: bitmap sectors first, then BAT sectors from the highest down (a chunk's
//!   sector-bitmap entry has the highest index of its chunk).
//! * Metadata-region changes (parent locator, detaching a child from its parent) go
//!   through the log the same way, one entry per change, so they are atomic. A resize
//!   commits its BAT sectors and the new virtual size together, the size last; a BAT
//!   that must grow is written whole at the end of the file first and the region tables
//!   switch to it in the same commit.
//! * Space left by a crash between allocation and commit, or by zeroed blocks, is a leak:
//!   harmless, reported by [`check::check`], and trimmed at the end of the file by repair.
//! * After an I/O error during a commit the handle refuses further changes ("poisoned");
//!   reopening the file replays or discards the log.

#![forbid(unsafe_code)]

// Offsets are u64 and buffers are indexed with usize; the casts between them are lossless
// only on 64-bit hosts, which is all Snapvisor supports.
const _: () = assert!(usize::BITS == 64, "snapvisor needs a 64-bit host");

mod bat;
mod chain;
mod check;
mod create;
mod error;
mod file;
/// Every on-disk structure of MS-VHDX, with its offsets and meaning, parsed and encoded
/// with explicit little-endian code. Public as the crate's reference to the format: tools,
/// the corruption tests and the fuzzers build and damage files with it.
pub mod format;
mod io;
mod log;
mod merge;
mod reparent;
#[cfg(any(test, feature = "testing"))]
mod testing;

pub use chain::{Chain, Extent, MAX_CHAIN_DEPTH, open_parent, open_parent_with, parent_candidates};
/// Files for tests: in memory, with injected faults, with simulated power loss. Only with
/// the `testing` feature, so release builds carry none of them.
#[cfg(feature = "testing")]
pub use check::salvage_io;
pub use check::{CheckReport, check};
pub use create::{
    CreateParams, create, create_differencing, create_differencing_of, locator_for,
    sync_parent_dir, temp_name,
};
pub use error::{Corruption, Error, ErrorKind, Result};
pub use file::{
    Allocation, DiskKind, Geometry, OpenOptions, ResizeOutcome, Segment, VhdxFile, resize,
};
pub use io::FileIo;
pub use merge::{
    MergeDirection, MergeEstimate, MergeOutcome, MergePlan, announce_merge_guid, dependants,
    estimate, estimate_open, into_child_pieces, merge, merge_into_parent_from, merge_live,
    merge_plan, merge_unchecked, relink,
};
pub use reparent::{SetParentOutcome, set_parent};
#[cfg(feature = "testing")]
pub use testing::{CrashIo, Fault, FaultyIo, MemFile};

/// Formats an error with its sources, `outer: inner: ...`, on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
