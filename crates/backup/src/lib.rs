//! # backup: a deduplicating, encrypting repository of recovery points of disks
//!
//! The repository half of Snapvisor's backups. It knows disks ([`disk::Disk`]) and named
//! blobs, never VMs: a recovery point's VM-specific parts (VM config, firmware variables,
//! memory state, consistency, freeze and pause times, the change-tracking reference) are
//! blobs and fields the caller supplies. The byte-level format is in [`format`] and, for
//! people, in `docs/repository-format.md`.
//!
//! ## The model
//!
//! * **Objects.** A repository is a set of named immutable objects behind a [`Backend`]
//!   (put, put-if-absent, get, list, delete, and a durability barrier); [`FolderBackend`]
//!   keeps them in a local folder, and an S3 backend fits the same trait.
//! * **Chunks.** Every disk and blob is cut into fixed-size chunks aligned to its offsets
//!   (the repository's `chunk_size`, 4 MiB by default), so an unchanged region of a disk is
//!   the same chunk in every point. A chunk's id is the BLAKE3 hash of its plaintext, keyed
//!   in encrypted repositories; chunks of zeros are never stored. A stored chunk is zstd
//!   compressed (when that saves space) and sealed (AES-256-GCM with the id as associated
//!   data, or a BLAKE3 checksum in plaintext repositories).
//! * **Points.** A recovery point is one manifest: its group (the caller's key, e.g. a VM
//!   name), time, fields, and for each blob and disk its size and the ids of all its
//!   chunks. Every point is a full index: restoring one never reads another, and any point
//!   can be removed alone.
//! * **Encryption** (`repokey` or `keyfile`): a random master key, wrapped by a passphrase
//!   through argon2id, kept in the config or in a file outside the repository. Chunk ids
//!   are keyed, so equal data in two repositories gets unrelated ids; manifests are sealed
//!   like chunks, so a changed byte anywhere fails to open.
//!
//! ## Operations
//!
//! | operation | entry point |
//! |---|---|
//! | create, open | [`Repository::init`], [`Repository::open`] |
//! | back up | [`PointWriter::begin`], [`PointWriter::add_disk`] ([`Method::Full`], [`Method::Incremental`], [`Method::ExpressFull`]), [`PointWriter::add_blob`], [`PointWriter::commit`] |
//! | list, show, resolve | [`Repository::list_points`], [`Repository::load_point`], [`Repository::resolve`] |
//! | restore | [`restore_to_file`], [`restore_into`], [`read_blob`], [`restore_blob_to_file`] |
//! | serve read-only | [`PointDisk`] (a [`disk::Disk`] for the NBD server) |
//! | check | [`verify()`] |
//! | retention | [`prune()`] with a [`KeepPolicy`], then [`gc()`] |
//!
//! ## I/O and parallelism
//!
//! A backup reads the source with positional reads on one thread (skipping ranges the
//! source reports as holes), hashes, compresses and seals on one worker per core, and puts
//! objects from three writer threads, so reading, CPU work and the device's writes overlap
//! (see [`writer`]). Memory is bounded by a fixed pool of chunk buffers, whatever the
//! disk's size (about 100 MiB for 4 MiB chunks on two cores, measured). Chunk objects are
//! written with `O_DIRECT` where the file system takes it, each synced before its rename.
//! Restores and verifies fetch and open chunks on several threads at once (a restore writes
//! each chunk in place with a positional, direct write), so the reads run ahead of the
//! writes without a separate read-ahead queue.
//!
//! ## Crash model
//!
//! Every object appears whole or not at all (a put writes a temporary object, syncs it
//! and renames it). A point is committed by its manifest, written last, after every chunk
//! it names was made durable (each chunk synced before its rename, every chunk folder synced
//! before the manifest). So a process killed at any instant leaves every listed point whole;
//! what it leaves behind is unreferenced chunks (removed by the next gc), temporary files of
//! puts in flight (never listed; removed by the next gc once their owner is judged dead),
//! its lease (judged dead and removed by the next gc) and, for a killed gc, its marker (replaced by the next
//! gc, ignored by backups). Prune removes one manifest at a time; gc deletes only chunks
//! no manifest references.
//!
//! ## Concurrency model
//!
//! Readers (list, show, restore, verify, mount) take no lock: objects never change once
//! written, so a reader sees each one whole. A point removed by prune while it is being
//! restored makes that restore fail with "missing", never return wrong data. Any number of
//! backups (two VMs, or two hosts) write into one repository at once: chunks are named by
//! their contents, so two writers storing the same chunk store the same bytes under the
//! same name. Garbage collection runs alone (its marker is created only if absent) but
//! beside backups:
//!
//! | | backup | prune | gc | readers |
//! |---|---|---|---|---|
//! | **backup** | concurrent | concurrent | concurrent (leases) | concurrent |
//! | **prune** | | concurrent (idempotent deletes) | concurrent | concurrent (a pruned point vanishes) |
//! | **gc** | | | one at a time | concurrent |
//!
//! ## Why gc never deletes a chunk a backup relies on
//!
//! A backup relies on chunks that no manifest may name yet: chunks it found listed, chunks
//! of its base point (which prune may remove meanwhile), chunks it wrote. It takes a lease
//! (`leases/<id>`) before it lists anything. The collector (see [`gc()`]) creates its
//! marker, *then* lists the leases, publishes that list, waits for all of them to end,
//! and only then reads the manifests and deletes unreferenced chunks older than its start.
//! Take a backup B and a collector G:
//!
//! * If B's lease was in G's list, G deletes nothing before B has committed (its manifest
//!   then names every chunk it relies on) or ended without a point.
//! * Otherwise B's lease was written after G listed the leases, hence after G's marker
//!   existed, and B reads the marker right after writing its lease: B knows G runs. Before
//!   B commits a stream, it waits for G to end (G does not wait for B, so this cannot
//!   deadlock), lists the chunks, and stores again any chunk of the stream that is gone
//!   (reading it from the source, whose contents must still hash to the same id). Streams
//!   copied after G ended need nothing: any later collector lists B's lease.
//!
//! Owners of leases and markers that died are recognised (same host: their pid and start
//! time are gone; another host: not renewed for 30 minutes), so a SIGKILLed backup or gc
//! never blocks the repository. A backup whose lease was removed as dead anyway (a host
//! unreachable for 30 minutes) refuses to commit ([`Error::LeaseLost`]).

#![forbid(unsafe_code)]

pub mod backend;
pub mod crypto;
pub mod error;
pub mod format;
pub mod gc;
pub mod lease;
pub mod owner;
pub mod point;
pub mod prune;
pub mod repo;
pub mod restore;
pub mod verify;
pub mod writer;

pub use backend::{Backend, FolderBackend, ObjectInfo};
pub use error::{Error, Result};
pub use format::{ChunkId, EncryptionMode, KdfParams};
pub use gc::{GcOptions, GcReport, gc};
pub use point::{Point, Stream};
pub use prune::{Decision, KeepPolicy, PruneReport, prune};
pub use repo::{InitOptions, Listing, OpenOptions, Repository};
pub use restore::{
    FileFormat, PointDisk, RestoreStats, read_blob, restore_blob_to_file, restore_into,
    restore_to_file,
};
pub use verify::{DamagedPoint, DamagedStream, VerifyReport, verify};
pub use writer::{CopyStats, Method, PointWriter, Progress};
