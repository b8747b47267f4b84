//! Garbage collection: deleting chunks that no point references, safely while backups run.
//!
//! The protocol (the argument is in the crate doc and `docs/repository-format.md`):
//!
//! 1. Take the marker `gc/run` (create-if-absent; a dead collector's marker is replaced).
//! 2. List the leases; remove those whose owner is dead; the live ones are the backups
//!    that may rely on chunks no manifest names yet. Publish them in the marker
//!    (`sweeping`, `waits_for`).
//! 3. Wait until each of them is gone (committed, abandoned, or dead).
//! 4. Read every manifest; list the chunks; delete those that no manifest references and
//!    that were written before step 1.
//! 5. Remove the temporary objects of writers that died ([`crate::Backend::remove_abandoned`]:
//!    a put killed half way leaves one, which no listing shows).
//!
//! A backup whose lease appeared after step 2 saw the marker when it began and, before it
//! relies on its chunks, waits for this collection to end and stores again what it deleted.

use crate::error::{Error, Result};
use crate::format::{ChunkId, LEASES_PREFIX};
use crate::lease::{Held, lease_alive, list_leases};
use crate::point::from_ns;
use crate::repo::Repository;
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// How a collection runs.
#[derive(Clone, Copy, Debug)]
pub struct GcOptions {
    /// How long to wait for backups that were running when it started; past that, it
    /// deletes nothing and reports `deferred`.
    pub wait_timeout: Duration,
    /// Only count what would be deleted.
    pub dry_run: bool,
}

impl Default for GcOptions {
    fn default() -> GcOptions {
        GcOptions {
            wait_timeout: Duration::from_secs(3600),
            dry_run: false,
        }
    }
}

/// What a collection did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Chunk objects found.
    pub chunks_total: u64,
    /// Chunks some point references.
    pub chunks_referenced: u64,
    /// Chunks deleted (or that would be, on a dry run).
    pub chunks_deleted: u64,
    /// Their stored size.
    pub bytes_freed: u64,
    /// Unreferenced chunks kept because they are newer than the collection (a backup in
    /// progress is writing them).
    pub chunks_kept_recent: u64,
    /// Leases of backups that died, removed.
    pub stale_leases_removed: u64,
    /// Temporary objects that writers which died left half written, removed.
    pub temporaries_removed: u64,
    /// Backups it waited for.
    pub backups_waited_for: u64,
    /// Whether it gave up waiting and deleted nothing.
    pub deferred: bool,
}

/// Runs one garbage collection.
pub fn gc(repo: &Repository, options: &GcOptions) -> Result<GcReport> {
    let backend = repo.backend();
    let mut report = GcReport::default();
    let (marker, m) = Held::gc_marker(backend)?;
    let started = from_ns(m.started_ns);

    let mut live = Vec::new();
    for l in list_leases(backend.as_ref())? {
        if lease_alive(&l) {
            live.push(l.id);
        } else {
            tracing::info!(lease = %l.id, pid = l.pid, host = %l.host, "removing the lease of a backup that died");
            backend.delete(&format!("{LEASES_PREFIX}/{}", l.id))?;
            report.stale_leases_removed += 1;
        }
    }
    backend.sync(&[])?;
    let waits = live.clone();
    marker.update(|v| {
        v["phase"] = "sweeping".into();
        v["waits_for"] = serde_json::json!(waits);
    })?;
    report.backups_waited_for = live.len() as u64;

    let t0 = Instant::now();
    while !live.is_empty() {
        let now: Vec<_> = list_leases(backend.as_ref())?;
        live.retain(|id| now.iter().any(|l| &l.id == id && lease_alive(l)));
        if live.is_empty() {
            break;
        }
        if t0.elapsed() > options.wait_timeout {
            tracing::warn!(waiting_for = ?live, "gc deferred: backups still running");
            report.deferred = true;
            marker.release()?;
            return Ok(report);
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    let listing = repo.list_points()?;
    if let Some((id, e)) = listing.damaged.first() {
        return Err(Error::Invalid(format!(
            "the manifest of point {id} does not open ({e}): gc deletes nothing while it cannot know every reference; remove that point first"
        )));
    }
    let referenced: HashSet<ChunkId> = listing
        .points
        .iter()
        .flat_map(|p| p.streams().flat_map(|s| s.chunks.iter().copied()))
        .collect();
    let chunks = repo.list_chunks()?;
    report.chunks_total = chunks.len() as u64;
    for (id, info) in &chunks {
        if referenced.contains(id) {
            report.chunks_referenced += 1;
        } else if info.modified >= started {
            report.chunks_kept_recent += 1;
        } else {
            if !options.dry_run {
                backend.delete(&info.key)?;
            }
            report.chunks_deleted += 1;
            report.bytes_freed += info.size;
        }
    }
    if !options.dry_run {
        report.temporaries_removed = backend.remove_abandoned()?;
    }
    backend.sync(&[])?;
    marker.release()?;
    tracing::info!(
        deleted = report.chunks_deleted,
        bytes_freed = report.bytes_freed,
        dry_run = options.dry_run,
        "gc finished"
    );
    Ok(report)
}
