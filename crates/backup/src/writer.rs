//! Writing a recovery point: disks and blobs copied into chunks, then the manifest.
//!
//! [`PointWriter::begin`] takes a lease, looks for a running garbage collection and lists
//! the chunks already stored. Each [`PointWriter::add_disk`] runs a pipeline:
//!
//! ```text
//!  reader thread ──(chunk buffers)──> hash/compress/seal workers (one per core) ──(objects)──> writer threads ──> backend
//!        ^                                      │ zero, or already stored: nothing to write
//!        └──────────── buffer pool <────────────┘
//! ```
//!
//! The reader reads the chunks that need reading (all of them for a full or express-full
//! copy; for an incremental one, only those that intersect a changed range or that the
//! base does not have), in order, into a fixed pool of buffers, so memory stays bounded
//! whatever the disk's size. Workers drop chunks of zeros, hash the rest, and claim each
//! new id in the shared set of known chunks (so two workers never store the same chunk
//! twice); only the claimer compresses and seals it. Writer threads put the objects (each
//! put waits for its own sync; several in flight keep the device busy while the CPUs
//! compress). [`PointWriter::commit`] makes every chunk durable, then stores the manifest:
//! the point exists from that instant, whole, or not at all.

use crate::error::{Error, Result};
use crate::format::ChunkId;
use crate::lease::{Held, read_gc};
use crate::point::{Point, Stream};
use crate::repo::Repository;
use disk::{Disk, Extent};
use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// How a disk is copied.
#[derive(Clone, Copy, Debug)]
pub enum Method<'a> {
    /// Read and hash every chunk; store those the repository lacks.
    Full,
    /// Read only the chunks that intersect `changed` (byte ranges of the disk, in any order,
    /// possibly overlapping); every other chunk is the base's. The caller guarantees that
    /// nothing outside `changed` differs from `base` (change tracking).
    Incremental {
        /// The same disk in the previous point.
        base: &'a Stream,
        /// What changed since.
        changed: &'a [Range<u64>],
    },
    /// Read and hash every chunk, compare with `base`, store only what differs (DPM's
    /// express full, for when change tracking cannot be trusted).
    ExpressFull {
        /// The same disk in the previous point.
        base: &'a Stream,
    },
}

impl Method<'_> {
    fn name(&self) -> &'static str {
        match self {
            Method::Full => "full",
            Method::Incremental { .. } => "incremental",
            Method::ExpressFull { .. } => "express-full",
        }
    }
}

/// What copying one disk or blob did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Bytes the repository stored for new chunks (compressed, sealed).
    pub bytes_stored: u64,
    /// Chunks stored.
    pub chunks_new: u64,
    /// Chunks the repository already had (or the base point had).
    pub chunks_reused: u64,
    /// Chunks of zeros (never stored).
    pub chunks_zero: u64,
    /// Wall time.
    pub duration: Duration,
}

impl CopyStats {
    fn add(&mut self, o: &CopyStats) {
        self.bytes_read += o.bytes_read;
        self.bytes_stored += o.bytes_stored;
        self.chunks_new += o.chunks_new;
        self.chunks_reused += o.chunks_reused;
        self.chunks_zero += o.chunks_zero;
        self.duration += o.duration;
    }
}

/// Progress of a copy: `(bytes done, bytes in all)`.
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

/// A recovery point being written. Dropping it without [`PointWriter::commit`] abandons
/// it: nothing is listed, and the chunks it stored go at the next garbage collection.
#[derive(Debug)]
pub struct PointWriter {
    repo: Repository,
    lease: Option<Held>,
    id: String,
    group: String,
    started: SystemTime,
    fields: BTreeMap<String, String>,
    blobs: Vec<Stream>,
    disks: Vec<Stream>,
    /// Chunks stored in the repository (listed at the start, plus those written since).
    known: Arc<Mutex<HashSet<ChunkId>>>,
    /// Chunk folders holding chunks this point reuses from the listing (not from its base):
    /// another writer may have renamed them there without syncing the folder yet.
    reused_folders: HashSet<String>,
    /// A garbage collection that ran when this backup began and may not wait for it
    /// (see the crate doc): until it is over, every stream is checked after its copy.
    unsettled_gc: Option<String>,
    stats: CopyStats,
}

impl PointWriter {
    /// Starts a point of `group` (the caller's key for retention, e.g. a VM's name).
    pub fn begin(repo: &Repository, group: &str) -> Result<PointWriter> {
        if group.is_empty() || group.contains('@') || group.chars().any(char::is_control) {
            return Err(Error::Invalid(format!(
                "group name {group:?} must be non-empty, without '@' or control characters"
            )));
        }
        let backend = repo.backend();
        // The lease first: any collection that starts after this instant waits for us.
        let lease = Held::lease(backend)?;
        let unsettled_gc = read_gc(backend.as_ref())?.map(|m| m.id);
        let known: HashSet<ChunkId> = repo.list_chunks()?.into_keys().collect();
        tracing::debug!(chunks = known.len(), gc = ?unsettled_gc, "backup started");
        Ok(PointWriter {
            repo: repo.clone(),
            lease: Some(lease),
            id: crate::format::hex(&crate::crypto::random::<16>()),
            group: group.to_owned(),
            started: SystemTime::now(),
            fields: BTreeMap::new(),
            blobs: Vec::new(),
            disks: Vec::new(),
            known: Arc::new(Mutex::new(known)),
            reused_folders: HashSet::new(),
            unsettled_gc,
            stats: CopyStats::default(),
        })
    }

    /// The id the point will have.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Sets a field of the point (consistency, freeze time, ...).
    pub fn set_field(&mut self, key: &str, value: &str) {
        self.fields.insert(key.to_owned(), value.to_owned());
    }

    /// Totals of every copy so far.
    pub fn stats(&self) -> CopyStats {
        self.stats
    }

    fn check_name(&self, name: &str) -> Result<()> {
        if name.is_empty() || self.blobs.iter().chain(&self.disks).any(|s| s.name == name) {
            return Err(Error::Invalid(format!(
                "stream name {name:?} is empty or already used in this point"
            )));
        }
        Ok(())
    }

    /// Adds a named blob from memory.
    pub fn add_blob(&mut self, name: &str, data: &[u8]) -> Result<CopyStats> {
        self.check_name(name)?;
        let src = SliceDisk(data);
        let stream = self.copy(
            name,
            "blob",
            &src,
            Method::Full,
            BTreeMap::new(),
            &|_, _| {},
        )?;
        let stats = self.finish(stream, true)?;
        Ok(stats)
    }

    /// Adds a named blob from a file (e.g. a saved memory state).
    pub fn add_blob_file(
        &mut self,
        name: &str,
        path: &Path,
        progress: Progress,
    ) -> Result<CopyStats> {
        self.check_name(name)?;
        let src = disk::RawDisk::open(path, false)?;
        let stream = self.copy(name, "blob", &src, Method::Full, BTreeMap::new(), progress)?;
        self.finish(stream, true)
    }

    /// Copies a disk into the point as its next disk (disk N for the N-th call).
    pub fn add_disk(
        &mut self,
        name: &str,
        source: &dyn Disk,
        method: Method,
        fields: BTreeMap<String, String>,
        progress: Progress,
    ) -> Result<CopyStats> {
        self.check_name(name)?;
        let stream = self.copy(name, method.name(), source, method, fields, progress)?;
        self.finish(stream, false)
    }

    fn finish(&mut self, (stream, stats): (Stream, CopyStats), blob: bool) -> Result<CopyStats> {
        self.stats.add(&stats);
        if blob {
            self.blobs.push(stream);
        } else {
            self.disks.push(stream);
        }
        Ok(stats)
    }

    fn copy(
        &mut self,
        name: &str,
        method_name: &str,
        source: &dyn Disk,
        method: Method,
        fields: BTreeMap<String, String>,
        progress: Progress,
    ) -> Result<(Stream, CopyStats)> {
        let t0 = Instant::now();
        let cs = u64::from(self.repo.chunk_size());
        let size = source.size();
        let n = Stream::chunk_count(size, self.repo.chunk_size());
        let len_of = |i: u64| (size - i * cs).min(cs) as usize;
        let mut table = vec![ChunkId::ZERO; n as usize];
        let mut need = vec![true; n as usize];
        let base = match method {
            Method::Full => None,
            Method::Incremental { base, .. } | Method::ExpressFull { base } => Some(base),
        };
        let mut stats = CopyStats::default();
        if let Method::Incremental { base, changed } = method {
            // Unchanged chunks are the base's, provided the base has the chunk at the same
            // length (a grown or shrunk disk changes its last chunk) and the repository
            // still has it (the base may have been pruned and collected since the caller
            // read it): otherwise it is read again.
            let known = self.known.lock().unwrap();
            for (i, slot) in need.iter_mut().enumerate() {
                let i = i as u64;
                let same_len = i < base.chunks.len() as u64
                    && (base.size - i * cs).min(cs) as usize == len_of(i);
                let stored = same_len && {
                    let id = &base.chunks[i as usize];
                    id.is_zero() || known.contains(id)
                };
                *slot = !stored;
            }
            drop(known);
            for r in changed {
                if r.start >= r.end || r.start >= size {
                    continue;
                }
                let end = r.end.min(size);
                for i in r.start / cs..end.div_ceil(cs) {
                    need[i as usize] = true;
                }
            }
            for (i, slot) in need.iter().enumerate() {
                if !slot {
                    table[i] = base.chunks[i];
                    if base.chunks[i].is_zero() {
                        stats.chunks_zero += 1;
                    } else {
                        stats.chunks_reused += 1;
                    }
                }
            }
        }
        // Ranges the source says read as zeros need no read.
        let zero_ranges: Vec<Range<u64>> = {
            let mut pos = 0;
            let mut v = Vec::new();
            if size > 0 {
                for e in source.block_status(0, size)? {
                    if let Extent::Zero(len) = e {
                        v.push(pos..pos + len);
                    }
                    pos += e.len();
                }
            }
            v
        };
        let all_zero = |i: u64| {
            let (s, e) = (i * cs, i * cs + len_of(i) as u64);
            zero_ranges.iter().any(|z| z.start <= s && e <= z.end)
        };
        let mut to_read = Vec::new();
        for i in 0..n {
            if !need[i as usize] {
                continue;
            }
            if all_zero(i) {
                stats.chunks_zero += 1;
            } else {
                to_read.push(i);
            }
        }
        let total: u64 = to_read.iter().map(|&i| len_of(i) as u64).sum();
        progress(0, total);
        let out = run_pipeline(
            &self.repo,
            source,
            &to_read,
            &len_of,
            &self.known,
            total,
            progress,
        )?;
        for (i, id, outcome) in out.results {
            table[i as usize] = id;
            match outcome {
                Outcome::Zero => stats.chunks_zero += 1,
                Outcome::Reused => {
                    stats.chunks_reused += 1;
                    // Chunks of the base were made durable by the base's commit.
                    if base.is_none_or(|b| b.chunks.get(i as usize) != Some(&id)) {
                        let key = id.key();
                        self.reused_folders.insert(
                            key[..key.rfind('/').expect("chunk keys have folders")].to_owned(),
                        );
                    }
                }
                Outcome::New => stats.chunks_new += 1,
            }
        }
        stats.bytes_read = out.bytes_read;
        stats.bytes_stored = out.bytes_stored;
        let stream = Stream {
            name: name.to_owned(),
            size,
            method: method_name.to_owned(),
            fields,
            bytes_read: stats.bytes_read,
            bytes_stored: stats.bytes_stored,
            chunks: table,
        };
        stats.bytes_stored += self.settle_gc(&stream, source, &len_of)?;
        stats.duration = t0.elapsed();
        tracing::debug!(name, ?stats, "stream copied");
        Ok((stream, stats))
    }

    /// If a garbage collection that may not wait for this backup ran when it began: waits
    /// until that collection is over (or waits for us), then stores again any chunk of
    /// `stream` that it deleted. Returns the bytes stored.
    fn settle_gc(
        &mut self,
        stream: &Stream,
        source: &dyn Disk,
        len_of: &dyn Fn(u64) -> usize,
    ) -> Result<u64> {
        let Some(gc_id) = self.unsettled_gc.clone() else {
            return Ok(0);
        };
        let lease_id = self
            .lease
            .as_ref()
            .map(|l| l.id().to_owned())
            .unwrap_or_default();
        loop {
            match read_gc(self.repo.backend().as_ref())? {
                Some(m) if m.id == gc_id && m.phase == "marking" => {}
                Some(m) if m.id == gc_id && m.waits_for.contains(&lease_id) => {
                    // It waits for this backup and reads its manifest before deleting.
                    self.unsettled_gc = None;
                    return Ok(0);
                }
                Some(m) if m.id == gc_id => {}
                _ => break,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let present: HashSet<ChunkId> = self.repo.list_chunks()?.into_keys().collect();
        let mut stored = 0;
        let mut encoder = self.repo.encoder();
        for (i, id) in stream.chunks.iter().enumerate() {
            if id.is_zero() || present.contains(id) {
                continue;
            }
            let mut buf = vec![0u8; len_of(i as u64)];
            let offset = i as u64 * u64::from(self.repo.chunk_size());
            source.read_at(&mut buf, offset)?;
            if self.repo.chunk_id(&buf) != *id {
                return Err(Error::SourceChanged { offset });
            }
            let obj = self.repo.encode_chunk(id, &buf, &mut encoder);
            self.repo.backend().put(&id.key(), &obj)?;
            stored += obj.len() as u64;
        }
        *self.known.lock().unwrap() = present;
        self.unsettled_gc = None;
        Ok(stored)
    }

    /// Commits the point: every chunk it names made durable, then the manifest stored.
    pub fn commit(mut self) -> Result<Point> {
        if self.disks.is_empty() && self.blobs.is_empty() {
            return Err(Error::Invalid(
                "a recovery point needs at least one disk or blob".into(),
            ));
        }
        let backend = Arc::clone(self.repo.backend());
        // Chunks this backup wrote, and those it reuses that another writer may have
        // renamed into place without syncing the folder yet, must be durable before the
        // manifest names them.
        let mut also: Vec<String> = self.reused_folders.drain().collect();
        also.sort();
        backend.sync(&also)?;
        let lease = self.lease.take().expect("lease held until commit");
        if !lease.still_held()? {
            return Err(Error::LeaseLost);
        }
        let point = Point {
            id: self.id.clone(),
            group: self.group.clone(),
            time: self.started,
            committed: SystemTime::now(),
            chunk_size: self.repo.chunk_size(),
            fields: std::mem::take(&mut self.fields),
            blobs: std::mem::take(&mut self.blobs),
            disks: std::mem::take(&mut self.disks),
        };
        self.repo.store_point(&point)?;
        lease.release()?;
        tracing::info!(
            point = %point.id, group = %point.group,
            bytes_read = self.stats.bytes_read, bytes_stored = self.stats.bytes_stored,
            "recovery point committed"
        );
        Ok(point)
    }
}

#[derive(Clone, Copy, Debug)]
enum Outcome {
    Zero,
    Reused,
    New,
}

struct PipelineOut {
    results: Vec<(u64, ChunkId, Outcome)>,
    bytes_read: u64,
    bytes_stored: u64,
}

fn is_zero(b: &[u8]) -> bool {
    // A fold without early exit per 4 KiB compiles to wide OR instructions.
    b.chunks(4096)
        .all(|c| c.iter().fold(0u8, |acc, &x| acc | x) == 0)
}

/// Workers per core count: one hashing/compressing worker per core.
fn workers() -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 16)
}

/// Objects being written at once: enough to keep a device's queue busy while each put
/// waits for its sync.
const WRITERS: usize = 3;

#[allow(clippy::too_many_arguments)]
fn run_pipeline(
    repo: &Repository,
    source: &dyn Disk,
    to_read: &[u64],
    len_of: &(dyn Fn(u64) -> usize + Sync),
    known: &Mutex<HashSet<ChunkId>>,
    total: u64,
    progress: Progress,
) -> Result<PipelineOut> {
    let cs = repo.chunk_size() as u64;
    let nworkers = workers();
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let fail = |e: Error| {
        failed.store(true, Ordering::SeqCst);
        let mut slot = first_error.lock().unwrap();
        if slot.is_none() {
            *slot = Some(e);
        }
    };
    let bytes_read = AtomicU64::new(0);
    let bytes_stored = AtomicU64::new(0);
    let (pool_tx, pool_rx) = sync_channel::<Vec<u8>>(nworkers * 2 + 2);
    for _ in 0..nworkers * 2 + 2 {
        pool_tx.send(Vec::with_capacity(cs as usize)).unwrap();
    }
    let (read_tx, read_rx) = sync_channel::<(u64, Vec<u8>)>(nworkers * 2);
    let read_rx = Mutex::new(read_rx);
    let (obj_tx, obj_rx) = sync_channel::<(ChunkId, Vec<u8>)>(WRITERS);
    let obj_rx = Mutex::new(obj_rx);
    let (res_tx, res_rx) = sync_channel::<(u64, ChunkId, Outcome, usize)>(64);
    let mut results = Vec::with_capacity(to_read.len());

    std::thread::scope(|s| {
        // Reader.
        {
            let pool_rx = pool_rx;
            let (failed, fail, bytes_read) = (&failed, &fail, &bytes_read);
            s.spawn(move || {
                for &i in to_read {
                    if failed.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(mut buf) = pool_rx.recv() else { return };
                    let len = len_of(i);
                    buf.resize(len, 0);
                    if let Err(e) = source.read_at(&mut buf, i * cs) {
                        fail(e.into());
                        return;
                    }
                    bytes_read.fetch_add(len as u64, Ordering::Relaxed);
                    if read_tx.send((i, buf)).is_err() {
                        return;
                    }
                }
            });
        }
        // Hash, compress, seal.
        for _ in 0..nworkers {
            let (read_rx, obj_tx, res_tx, pool_tx) =
                (&read_rx, obj_tx.clone(), res_tx.clone(), pool_tx.clone());
            let (failed, known) = (&failed, known);
            s.spawn(move || {
                let mut encoder = repo.encoder();
                loop {
                    let next = read_rx.lock().unwrap().recv();
                    let Ok((i, buf)) = next else { return };
                    if failed.load(Ordering::SeqCst) {
                        return;
                    }
                    let len = buf.len();
                    let (id, outcome) = if is_zero(&buf) {
                        (ChunkId::ZERO, Outcome::Zero)
                    } else {
                        let id = repo.chunk_id(&buf);
                        // Stored already (listed when the backup began, or written since):
                        // the base's chunks are found here too.
                        if !known.lock().unwrap().insert(id) {
                            (id, Outcome::Reused)
                        } else {
                            let obj = repo.encode_chunk(&id, &buf, &mut encoder);
                            if obj_tx.send((id, obj)).is_err() {
                                return;
                            }
                            (id, Outcome::New)
                        }
                    };
                    let _ = pool_tx.send(buf);
                    if res_tx.send((i, id, outcome, len)).is_err() {
                        return;
                    }
                }
            });
        }
        drop(obj_tx);
        drop(res_tx);
        drop(pool_tx);
        // Writers.
        for _ in 0..WRITERS {
            let (obj_rx, failed, fail, bytes_stored) = (&obj_rx, &failed, &fail, &bytes_stored);
            s.spawn(move || {
                loop {
                    let next = obj_rx.lock().unwrap().recv();
                    let Ok((id, obj)) = next else { return };
                    if failed.load(Ordering::SeqCst) {
                        continue; // drain, so workers never block on a full channel
                    }
                    match repo.backend().put(&id.key(), &obj) {
                        Ok(()) => {
                            bytes_stored.fetch_add(obj.len() as u64, Ordering::Relaxed);
                        }
                        Err(e) => fail(e),
                    }
                }
            });
        }
        // Collect on this thread, reporting progress.
        let mut done = 0u64;
        for (i, id, outcome, len) in res_rx.iter() {
            results.push((i, id, outcome));
            done += len as u64;
            progress(done.min(total), total);
        }
    });
    if let Some(e) = first_error.into_inner().unwrap() {
        return Err(e);
    }
    Ok(PipelineOut {
        results,
        bytes_read: bytes_read.into_inner(),
        bytes_stored: bytes_stored.into_inner(),
    })
}

/// Bytes in memory as a read-only [`Disk`], so blobs go through the same pipeline.
struct SliceDisk<'a>(&'a [u8]);

impl Disk for SliceDisk<'_> {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn sector_size(&self) -> u32 {
        1
    }
    fn is_read_only(&self) -> bool {
        true
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> disk::Result<()> {
        let s = offset as usize;
        buf.copy_from_slice(&self.0[s..s + buf.len()]);
        Ok(())
    }
    fn write_at(&self, _: &[u8], _: u64) -> disk::Result<()> {
        Err(disk::Error::ReadOnly {
            path: "blob".into(),
        })
    }
    fn write_zeroes(&self, _: u64, _: u64) -> disk::Result<()> {
        Err(disk::Error::ReadOnly {
            path: "blob".into(),
        })
    }
    fn flush(&self) -> disk::Result<()> {
        Ok(())
    }
}
