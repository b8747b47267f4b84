//! Merging a differencing file with its parent, in either direction.
//!
//! Both directions keep the chain reading identical data at every instant and can be run
//! again after a crash at any point:
//!
//! **Into the parent** (the child's data moves down; the child file is then removed):
//! 1. A new GUID `G` is written into the child's `parent_linkage2` (one log entry), or the
//!    one already there is reused when resuming.
//! 2. The parent is opened writable with `G` as the DataWriteGuid its first write sets, so
//!    the child still finds its parent through `parent_linkage2` after a crash.
//! 3. Every range the child stores (or zeroes) is written into the parent. The child still
//!    shadows those ranges, so the chain reads the same throughout; rerunning rewrites
//!    the same bytes.
//! 4. After each flush of the parent, the child's blocks now durable in the parent are
//!    handed back to it ([`VhdxFile::release_to_parent`]: `NOT_PRESENT` committed, then
//!    the space punched), so the child shrinks as the copy goes and the file system frees
//!    its space while the copy runs instead of all at once when the child is removed. The
//!    chain reads the same before and after each such step. A merge whose child another
//!    reader has open (the live merge, [`merge_live`]) leaves the child's blocks alone.
//! 5. The parent is flushed and closed; only then is the child removed.
//!
//! **Into the child** (the parent's data moves up; the child then points at the
//! grandparent, or becomes a standalone dynamic file when the parent was the base):
//! 1. Every range the child leaves to the parent and the parent itself stores (or zeroes) is
//!    copied into the child. The copy equals what the child read through the parent, so the
//!    child's view and its DataWriteGuid stay unchanged (its own children stay linked).
//! 2. The child is flushed; then one log entry switches its parent locator to the
//!    grandparent (or drops it). Rerunning step 1 copies nothing new.
//!
//! The parent file of an into-child merge is left in place: other children may use it.

use crate::chain::{open_parent, open_parent_with};
use crate::create::{absolute, locator_for, sync_parent_dir};
use crate::error::{Error, Result};
use crate::file::{DiskKind, OpenOptions, Segment, VhdxFile};
use crate::format::{
    KEY_PARENT_LINKAGE2, PAYLOAD_BLOCK_FULLY_PRESENT, PAYLOAD_BLOCK_NOT_PRESENT,
    PAYLOAD_BLOCK_PARTIALLY_PRESENT, braced_guid, parse_braced_guid,
};
use crate::io::DIRECT_ALIGN;
use std::path::{Path, PathBuf};
use uuid::Uuid;

/// Which way a merge moves data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeDirection {
    /// Pick the direction that copies fewer bytes.
    Auto,
    /// The child's data goes into the parent; the child is removed.
    IntoParent,
    /// The parent's data goes into the child; the child skips the parent.
    IntoChild,
}

/// What a merge did.
#[derive(Clone, Debug)]
pub struct MergeOutcome {
    /// The direction used.
    pub direction: MergeDirection,
    /// The file that now holds the merged disk.
    pub result: PathBuf,
    /// The file no longer part of the chain (removed for into-parent, kept otherwise).
    pub merged_away: PathBuf,
    /// Whether `merged_away` was removed.
    pub removed: bool,
    /// Guest bytes copied.
    pub bytes_copied: u64,
}

/// Bytes each direction would copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MergeEstimate {
    /// Bytes the child stores (copied by an into-parent merge).
    pub into_parent: u64,
    /// Bytes the parent stores that the child does not shadow (copied into the child).
    pub into_child: u64,
}

/// Copy unit for the data movement.
const COPY_CHUNK: u64 = 4 << 20;
/// Threads that move data (reads and writes overlap across them).
const COPY_THREADS: usize = 2;
/// The destination is flushed after this many bytes, so that write-back overlaps copying
/// instead of piling up at the end, and a rerun after a crash finds more already durable.
/// A flush does not stall the copy threads; 32 MiB measured best against 64 and 128 MiB.
const FLUSH_EVERY: u64 = 32 << 20;

/// One piece of data movement: `len` bytes to `dest_offset` (virtual) from `source`
/// (a virtual or file offset, as the reader understands it).
struct CopyJob {
    dest_offset: u64,
    source: u64,
    len: u64,
}

fn push_jobs(jobs: &mut Vec<CopyJob>, dest_offset: u64, len: u64, source: u64) {
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(COPY_CHUNK);
        jobs.push(CopyJob {
            dest_offset: dest_offset + pos,
            source: source + pos,
            len: n,
        });
        pos += n;
    }
}

/// Runs the jobs on [`COPY_THREADS`] workers writing into `dest`; the calling thread
/// reports progress and flushes `dest` every `flush_every` bytes. Returns bytes copied.
///
/// `durable`, when given, hears after each flush the destination offset below which every
/// job is copied and flushed (the jobs come in ascending destination order).
fn copy_parallel(
    jobs: &[CopyJob],
    read: &(dyn Fn(u64, &mut [u8]) -> Result<()> + Sync),
    dest: &VhdxFile,
    flush_every: u64,
    progress: &mut dyn FnMut(u64, u64),
    mut durable: Option<&mut dyn FnMut(u64)>,
) -> Result<u64> {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
    let total: u64 = jobs.iter().map(|j| j.len).sum();
    let complete: Vec<AtomicBool> = jobs.iter().map(|_| AtomicBool::new(false)).collect();
    let mut frontier = 0usize;
    let next = AtomicUsize::new(0);
    let copied = AtomicU64::new(0);
    let running = AtomicUsize::new(COPY_THREADS);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|s| -> Result<()> {
        for _ in 0..COPY_THREADS {
            s.spawn(|| {
                // Aligned for writes past the page cache (`write_uncached_at`).
                let mut space = vec![0u8; COPY_CHUNK as usize + DIRECT_ALIGN];
                let skip = space.as_ptr().align_offset(DIRECT_ALIGN);
                let buf = &mut space[skip..skip + COPY_CHUNK as usize];
                while !failed.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else { break };
                    let buf = &mut buf[..job.len as usize];
                    let result = read(job.source, buf)
                        .and_then(|()| dest.write_uncached_at(buf, job.dest_offset));
                    match result {
                        Ok(()) => {
                            copied.fetch_add(job.len, Ordering::Relaxed);
                            complete[i].store(true, Ordering::Release);
                        }
                        Err(e) => {
                            failed.store(true, Ordering::Relaxed);
                            first_error.lock().unwrap().get_or_insert(e);
                        }
                    }
                }
                running.fetch_sub(1, Ordering::Release);
            });
        }
        let mut flushed = 0u64;
        while running.load(Ordering::Acquire) > 0 {
            std::thread::sleep(std::time::Duration::from_millis(10));
            let now = copied.load(Ordering::Relaxed);
            progress(now, total);
            if now - flushed >= flush_every && !failed.load(Ordering::Relaxed) {
                // What is complete before the flush is durable after it.
                while frontier < jobs.len() && complete[frontier].load(Ordering::Acquire) {
                    frontier += 1;
                }
                let end = jobs.last().map_or(0, |j| j.dest_offset + j.len);
                let below = jobs.get(frontier).map_or(end, |j| j.dest_offset);
                match dest.flush() {
                    Ok(()) => {
                        if let Some(d) = durable.as_mut() {
                            d(below);
                        }
                    }
                    Err(e) => {
                        failed.store(true, Ordering::Relaxed);
                        first_error.lock().unwrap().get_or_insert(e);
                    }
                }
                flushed = now;
            }
        }
        Ok(())
    })?;
    if let Some(e) = first_error.into_inner().unwrap() {
        return Err(e);
    }
    let done = copied.load(Ordering::Relaxed);
    progress(done, total);
    Ok(done)
}

/// Counts the bytes each direction would copy.
pub fn estimate(child: &Path) -> Result<MergeEstimate> {
    let child = VhdxFile::open(child, OpenOptions::default())?;
    let parent = open_parent(&child)?;
    estimate_open(&child, &parent)
}

/// [`estimate`] on files already open (a running VM's worker has its chain open). Costs
/// what the two files hold, not the disk's size.
pub fn estimate_open(child: &VhdxFile, parent: &VhdxFile) -> Result<MergeEstimate> {
    let mut into_parent = 0;
    for_each_child_range(child, |range| {
        let (ChildRange::Stored { len, .. } | ChildRange::Zero { len, .. }) = range;
        into_parent += len;
        Ok(())
    })?;
    let mut into_child = 0;
    let g = child.geometry();
    let bs = u64::from(g.block_size);
    for block in into_child_blocks(child, parent) {
        let start = block * bs;
        let mut at = start;
        let mut holes = Vec::new();
        child.resolve(start, g.block_len(block), &mut |seg| {
            if let Segment::Parent { len } = seg {
                holes.push((at, len));
            }
            at += seg.len();
            Ok(())
        })?;
        for (offset, len) in holes {
            parent.resolve(offset, len, &mut |seg| {
                if let Segment::Data { len, .. } = seg {
                    into_child += len;
                }
                Ok(())
            })?;
        }
    }
    Ok(MergeEstimate {
        into_parent,
        into_child,
    })
}

/// The child's blocks an into-child merge must visit, in order: those it stores partly
/// (their holes are filled from the parent, or with zeros when the parent is the base)
/// and those that overlap anything the parent's BAT records. Every other block is either
/// stored whole by the child or absent from both, and stays as it is.
fn into_child_blocks(child: &VhdxFile, parent: &VhdxFile) -> Vec<u64> {
    let cbs = u64::from(child.geometry().block_size);
    let pg = parent.geometry();
    let pbs = u64::from(pg.block_size);
    let mut blocks = std::collections::BTreeSet::new();
    child.for_each_block_entry(|block, e| {
        if e.state() == PAYLOAD_BLOCK_PARTIALLY_PRESENT {
            blocks.insert(block);
        }
    });
    parent.for_each_block_entry(|block, e| {
        if e.state() == PAYLOAD_BLOCK_NOT_PRESENT {
            return;
        }
        let start = block * pbs;
        let end = start + pg.block_len(block);
        blocks.extend(start / cbs..end.div_ceil(cbs));
    });
    blocks
        .into_iter()
        .filter(|&b| {
            let state = child.block_entry(b).state();
            state == PAYLOAD_BLOCK_NOT_PRESENT || state == PAYLOAD_BLOCK_PARTIALLY_PRESENT
        })
        .collect()
}

enum ChildRange {
    Stored { offset: u64, len: u64 },
    Zero { offset: u64, len: u64 },
}

/// Visits what the child stores or zeroes, block by block in order; ranges it leaves to
/// the parent are skipped. Costs what the child's BAT holds.
fn for_each_child_range(
    child: &VhdxFile,
    mut f: impl FnMut(ChildRange) -> Result<()>,
) -> Result<()> {
    let g = child.geometry();
    let bs = u64::from(g.block_size);
    let mut blocks = Vec::new();
    child.for_each_block_entry(|block, e| blocks.push((block, e.state())));
    for (block, state) in blocks {
        let start = block * bs;
        let len = g.block_len(block);
        match state {
            PAYLOAD_BLOCK_NOT_PRESENT => {}
            PAYLOAD_BLOCK_FULLY_PRESENT => f(ChildRange::Stored { offset: start, len })?,
            PAYLOAD_BLOCK_PARTIALLY_PRESENT => {
                let mut at = start;
                let mut ranges = Vec::new();
                child.resolve(start, len, &mut |seg| {
                    match seg {
                        Segment::Data { len, .. } => {
                            ranges.push(ChildRange::Stored { offset: at, len })
                        }
                        Segment::Zero { len } => ranges.push(ChildRange::Zero { offset: at, len }),
                        Segment::Parent { .. } => {}
                    }
                    at += seg.len();
                    Ok(())
                })?;
                for r in ranges {
                    f(r)?;
                }
            }
            _ => f(ChildRange::Zero { offset: start, len })?,
        }
    }
    Ok(())
}

/// Merges the differencing file `child` with its parent. `progress(done, total)` is
/// called as bytes are copied.
///
/// Refuses an into-parent merge (and makes `Auto` merge into the child) when other files
/// in the two files' folders depend on the parent or on the child; see [`dependants`].
pub fn merge(
    child: &Path,
    direction: MergeDirection,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<MergeOutcome> {
    merge_inner(child, direction, true, false, progress)
}

/// [`merge`] without looking for dependants: for callers that track every layer
/// themselves (the checkpoint tree) and relink dependants afterwards with [`relink`].
pub fn merge_unchecked(
    child: &Path,
    direction: MergeDirection,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<MergeOutcome> {
    merge_inner(child, direction, false, false, progress)
}

/// [`merge_unchecked`] of two files that a running VM's chain holds open read-only in the
/// caller's process (neither is the chain's writable top): the files are opened with
/// shared locks. Safe for that reader because a merge only writes what the reader already
/// reads the same way: into the parent, ranges the child shadows; into the child, the
/// parent's own data where the child has none; and the parent of an into-child merge and
/// the removed child of an into-parent merge stay readable through the reader's open
/// descriptors. The caller reopens its chain afterwards.
pub fn merge_live(
    child: &Path,
    direction: MergeDirection,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<MergeOutcome> {
    merge_inner(child, direction, false, true, progress)
}

fn merge_inner(
    child: &Path,
    direction: MergeDirection,
    check_dependants: bool,
    shared_lock: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<MergeOutcome> {
    let child_file = open_child(child, shared_lock)?;
    let direction = choose_direction(&child_file, direction, check_dependants)?.0;
    match direction {
        MergeDirection::IntoParent => {
            merge_into_parent(child_file, shared_lock, 0, progress, &mut |_| {})
        }
        _ => merge_into_child(child_file, progress),
    }
}

/// The direction a merge of `child_file` takes, and the files that depend on the pair: an
/// into-parent merge changes the parent's DataWriteGuid and removes the
/// child, so with `check_dependants` it is refused (and `Auto` merges into the child)
/// when other files in the two folders depend on the parent or on the child.
fn choose_direction(
    child_file: &VhdxFile,
    direction: MergeDirection,
    check_dependants: bool,
) -> Result<(MergeDirection, Vec<PathBuf>)> {
    let child = child_file.path();
    let blockers = if !check_dependants {
        Vec::new()
    } else {
        let parent = open_parent(child_file)?;
        let mut b = dependants(parent.path(), Some(child))?;
        b.extend(dependants(child, None)?);
        b
    };
    let direction = match direction {
        MergeDirection::Auto => {
            let parent = open_parent(child_file)?;
            let est = estimate_open(child_file, &parent)?;
            if est.into_child < est.into_parent || !blockers.is_empty() {
                MergeDirection::IntoChild
            } else {
                MergeDirection::IntoParent
            }
        }
        MergeDirection::IntoParent if !blockers.is_empty() => {
            return Err(Error::Unsupported {
                path: child.to_owned(),
                reason: format!(
                    "merging into the parent would break files that depend on these two: {} (merge into the child instead)",
                    blockers
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        d => d,
    };
    Ok((direction, blockers))
}

/// An into-parent merge of `child` (as [`merge_unchecked`]) that skips what it stores below
/// guest offset `start`: a previous run of the same merge, interrupted, reported through
/// `durable` that everything below `start` is in the parent and flushed. `durable` hears,
/// after each flush of the parent, the offset below which that holds now; a caller that
/// records it can resume there instead of copying everything again.
pub fn merge_into_parent_from(
    child: &Path,
    start: u64,
    progress: &mut dyn FnMut(u64, u64),
    durable: &mut dyn FnMut(u64),
) -> Result<MergeOutcome> {
    let child_file = open_child(child, false)?;
    merge_into_parent(child_file, false, start, progress, durable)
}

/// Opens the child of a merge: writable, its DataWriteGuid kept (what it reads does not
/// change), and differencing.
fn open_child(child: &Path, shared_lock: bool) -> Result<VhdxFile> {
    let file = VhdxFile::open(
        child,
        OpenOptions {
            writable: true,
            keep_data_write_guid: true,
            data_write_guid: None,
            shared_lock,
        },
    )?;
    if file.kind() != DiskKind::Differencing {
        return Err(Error::Unsupported {
            path: child.to_owned(),
            reason: "not a differencing file, so there is nothing to merge".into(),
        });
    }
    Ok(file)
}

fn merge_into_parent(
    child: VhdxFile,
    shared_lock: bool,
    start: u64,
    progress: &mut dyn FnMut(u64, u64),
    durable: &mut dyn FnMut(u64),
) -> Result<MergeOutcome> {
    let child_path = child.path().to_owned();
    let new_guid = announce_merge_guid(&child, Uuid::new_v4)?;
    let parent = open_parent_with(
        &child,
        OpenOptions {
            writable: true,
            keep_data_write_guid: false,
            data_write_guid: Some(new_guid),
            shared_lock,
        },
    )?;
    let parent_path = parent.path().to_owned();
    let done = copy_into_parent(
        &child,
        &parent,
        IntoParentCopy {
            start,
            release: !shared_lock,
            flush_every: FLUSH_EVERY,
        },
        progress,
        durable,
    )?;
    parent.flush()?;
    parent.close()?;
    drop(child);
    std::fs::remove_file(&child_path).map_err(|e| Error::io(&child_path, e))?;
    sync_parent_dir(&child_path).map_err(|e| Error::io(&child_path, e))?;
    Ok(MergeOutcome {
        direction: MergeDirection::IntoParent,
        result: parent_path,
        merged_away: child_path,
        removed: true,
        bytes_copied: done,
    })
}

/// Step 1 of an into-parent merge: the GUID the parent's first write will take, kept in
/// the child's `parent_linkage2` so that the child stays linked to the parent whatever
/// point the merge reaches. One already there (from a previous, interrupted run, or set by
/// the caller) is kept; otherwise `fresh` gives it, and it is written into the child's
/// locator (durable at the child's next flush). Errors if `child` is not differencing.
pub fn announce_merge_guid(child: &VhdxFile, fresh: impl FnOnce() -> Uuid) -> Result<Uuid> {
    let mut locator = child.parent_locator().ok_or_else(|| Error::Unsupported {
        path: child.path().to_owned(),
        reason: "not a differencing file".into(),
    })?;
    if let Some(g) = locator
        .get(KEY_PARENT_LINKAGE2)
        .and_then(parse_braced_guid)
        .filter(|g| !g.is_nil())
    {
        return Ok(g);
    }
    let g = fresh();
    locator.set(KEY_PARENT_LINKAGE2, braced_guid(g));
    child.set_parent_locator(&locator)?;
    Ok(g)
}

/// How [`copy_into_parent`] runs.
#[derive(Clone, Copy)]
struct IntoParentCopy {
    /// Guest offset below which a previous run made everything durable in the parent.
    start: u64,
    /// Whether the child's blocks are handed back to the parent once durable there (not
    /// when another reader has the child open).
    release: bool,
    /// Bytes copied between flushes of the parent.
    flush_every: u64,
}

/// Steps 3 and 4 of an into-parent merge, on files already open (the parent with the
/// child's `parent_linkage2` GUID as its DataWriteGuid). Returns guest bytes copied.
fn copy_into_parent(
    child: &VhdxFile,
    parent: &VhdxFile,
    how: IntoParentCopy,
    progress: &mut dyn FnMut(u64, u64),
    durable: &mut dyn FnMut(u64),
) -> Result<u64> {
    let start = how.start;
    let mut jobs = Vec::new();
    let mut zeroed = 0u64;
    for_each_child_range(child, |range| {
        match range {
            ChildRange::Stored { offset, len } if offset + len > start => {
                push_jobs(&mut jobs, offset, len, offset)
            }
            ChildRange::Zero { offset, len } if offset + len > start => {
                parent.write_zeroes(offset, len)?;
                zeroed += len;
            }
            _ => {}
        }
        Ok(())
    })?;
    // The parent blocks the copy will allocate, reserved at once: growing the file block by
    // block, under the allocation lock, queued behind the journal commits of the flushes
    // that run beside the copy.
    let pg = parent.geometry();
    let pbs = u64::from(pg.block_size);
    let mut new_blocks = std::collections::BTreeSet::new();
    for job in &jobs {
        for block in job.dest_offset / pbs..(job.dest_offset + job.len).div_ceil(pbs) {
            if !matches!(
                parent.block_entry(block).state(),
                PAYLOAD_BLOCK_FULLY_PRESENT | PAYLOAD_BLOCK_PARTIALLY_PRESENT
            ) {
                new_blocks.insert(block);
            }
        }
    }
    parent.reserve_blocks(new_blocks.len() as u64)?;
    // Every flush of the parent covers the zeroed ranges (written above) and the jobs
    // below the reported offset, so the child's whole blocks below it read the same from
    // the parent. A failure to hand them back costs only the early freeing of space.
    let cbs = u64::from(child.geometry().block_size);
    let mut released_below = 0u64;
    let mut releasing = how.release;
    let mut on_durable = |below: u64| {
        durable(below);
        let end = below / cbs;
        if releasing && end > released_below {
            match child.release_to_parent(released_below, end) {
                Ok(_) => released_below = end,
                Err(e) => {
                    tracing::warn!(
                        "handing merged blocks of {} back to its parent: {}",
                        child.path().display(),
                        crate::error_chain(&e)
                    );
                    releasing = false;
                }
            }
        }
    };
    let copied = copy_parallel(
        &jobs,
        &|source, buf| child.read_at(buf, source),
        parent,
        how.flush_every,
        progress,
        Some(&mut on_durable),
    )?;
    Ok(copied + zeroed)
}

fn merge_into_child(child: VhdxFile, progress: &mut dyn FnMut(u64, u64)) -> Result<MergeOutcome> {
    let parent = open_parent(&child)?;
    let parent_is_base = parent.kind() != DiskKind::Differencing;
    let g = child.geometry();
    let bs = u64::from(g.block_size);
    let mut jobs = Vec::new();
    for block in into_child_blocks(&child, &parent) {
        let start = block * bs;
        let len = g.block_len(block);
        let (pieces, fill_zeros) = into_child_pieces(&child, &parent, start, len)?;
        for (offset, seg) in pieces {
            match seg {
                Segment::Data { file_offset, len } => {
                    push_jobs(&mut jobs, offset, len, file_offset)
                }
                Segment::Zero { len } if fill_zeros => child.write_zeroes(offset, len)?,
                Segment::Zero { .. } | Segment::Parent { .. } => {}
            }
        }
    }
    let done = copy_parallel(
        &jobs,
        &|source, buf| parent.read_stored(buf, source),
        &child,
        FLUSH_EVERY,
        progress,
        None,
    )?;
    child.flush()?;
    let parent_path = parent.path().to_owned();
    let result = child.path().to_owned();
    if parent_is_base {
        child.detach_from_parent()?;
    } else {
        let grandparent = open_parent(&parent)?;
        let locator = locator_for(
            &absolute(child.path())?,
            grandparent.path(),
            grandparent.data_write_guid(),
        )?;
        child.set_parent_locator(&locator)?;
        child.close()?;
    }
    Ok(MergeOutcome {
        direction: MergeDirection::IntoChild,
        result,
        merged_away: parent_path,
        removed: false,
        bytes_copied: done,
    })
}

/// What an into-child merge fills in `[start, start+len)` of `child` (a block of it): the
/// parent's segments where the child stores nothing, each with its guest offset, and
/// whether the parent's zero segments must be written too. They must when the parent is a
/// differencing file (after the merge the child reads past it), and with a base parent
/// whenever the block stores anything, since once the parent is gone a block is wholly
/// stored or wholly absent.
pub fn into_child_pieces(
    child: &VhdxFile,
    parent: &VhdxFile,
    start: u64,
    len: u64,
) -> Result<(Vec<(u64, Segment)>, bool)> {
    let mut holes = Vec::new();
    let mut stores_any = false;
    let mut at = start;
    child.resolve(start, len, &mut |seg| {
        match seg {
            Segment::Parent { len } => holes.push((at, len)),
            _ => stores_any = true,
        }
        at += seg.len();
        Ok(())
    })?;
    let mut pieces = Vec::new();
    for (hole, hole_len) in holes {
        let mut at = hole;
        parent.resolve(hole, hole_len, &mut |seg| {
            pieces.push((at, seg));
            at += seg.len();
            Ok(())
        })?;
    }
    let any_data = pieces
        .iter()
        .any(|(_, s)| matches!(s, Segment::Data { .. }));
    let parent_is_base = parent.kind() != DiskKind::Differencing;
    Ok((pieces, !parent_is_base || any_data || stores_any))
}

/// Differencing files in the folder of `path` whose parent locator leads to `path`
/// (`except` excluded). A file another process holds open for writing cannot be read and
/// counts as a dependant, to be safe. Files in other folders are not found: the checkpoint
/// tree, which records every layer, is the authority for that.
pub fn dependants(path: &Path, except: Option<&Path>) -> Result<Vec<PathBuf>> {
    let target = absolute(path)?;
    let except = except.map(absolute).transpose()?;
    let dir = target.parent().unwrap_or(Path::new("/")).to_owned();
    let entries = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
    let mut found = Vec::new();
    for entry in entries {
        let candidate = entry.map_err(|e| Error::io(&dir, e))?.path();
        let ext = candidate
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        if !matches!(ext.as_deref(), Some("vhdx" | "avhdx"))
            || candidate == target
            || Some(&candidate) == except.as_ref()
        {
            continue;
        }
        match VhdxFile::open(&candidate, OpenOptions::default()) {
            Ok(f) => {
                if let Some(locator) = f.parent_locator()
                    && crate::chain::parent_candidates(&candidate, &locator).contains(&target)
                {
                    found.push(candidate);
                }
            }
            Err(Error::Locked { .. }) => found.push(candidate),
            Err(_) => {}
        }
    }
    Ok(found)
}

/// Points a differencing file at a new parent whose contents are the same as the old
/// parent's (for example after that parent was merged into its own parent). The new
/// parent's current DataWriteGuid becomes the linkage.
pub fn relink(child: &Path, new_parent: &Path) -> Result<()> {
    let child_file = VhdxFile::open(
        child,
        OpenOptions {
            writable: true,
            keep_data_write_guid: true,
            data_write_guid: None,
            shared_lock: false,
        },
    )?;
    let parent = VhdxFile::open(new_parent, OpenOptions::default())?;
    let locator = locator_for(child, new_parent, parent.data_write_guid())?;
    child_file.set_parent_locator(&locator)?;
    child_file.close()
}

/// What [`merge`] would do, found without changing anything (`disk merge --dry-run`).
#[derive(Clone, Debug)]
pub struct MergePlan {
    /// The direction it would take.
    pub direction: MergeDirection,
    /// The file that would hold the merged disk.
    pub result: PathBuf,
    /// The file that would leave the chain.
    pub merged_away: PathBuf,
    /// Whether `merged_away` would be removed (into-parent) or kept (into-child).
    pub removed: bool,
    /// Guest bytes it would copy.
    pub bytes: u64,
    /// Bytes each direction would copy.
    pub estimate: MergeEstimate,
    /// Files that depend on the pair (which rule out an into-parent merge).
    pub blockers: Vec<PathBuf>,
}

/// Plans [`merge`] of `child` in `direction` by the same rules, reading only.
pub fn merge_plan(child: &Path, direction: MergeDirection) -> Result<MergePlan> {
    let child_file = VhdxFile::open(child, OpenOptions::default())?;
    if child_file.kind() != DiskKind::Differencing {
        return Err(Error::Unsupported {
            path: child.to_owned(),
            reason: "not a differencing file, so there is nothing to merge".into(),
        });
    }
    let parent = open_parent(&child_file)?;
    let estimate = estimate_open(&child_file, &parent)?;
    let (direction, blockers) = choose_direction(&child_file, direction, true)?;
    let (result, merged_away, removed, bytes) = match direction {
        MergeDirection::IntoParent => (
            parent.path().to_owned(),
            child.to_owned(),
            true,
            estimate.into_parent,
        ),
        _ => (
            child.to_owned(),
            parent.path().to_owned(),
            false,
            estimate.into_child,
        ),
    };
    Ok(MergePlan {
        direction,
        result,
        merged_away,
        removed,
        bytes,
        estimate,
        blockers,
    })
}

#[cfg(test)]
#[path = "merge_power_loss.rs"]
mod power_loss;
