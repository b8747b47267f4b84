//! Change tracking: which regions of a virtual disk changed since a tracking reference
//! (the last recovery point taken of it), kept beside the disks so that it survives VM
//! restarts, worker kills and host crashes. Hyper-V's resilient change tracking (RCT),
//! whose `.mrt` file this one is named after.
//!
//! # The file
//!
//! One file per virtual disk, `tracking/<disk name>.mrt` in the VM folder
//! ([`TRACKING_DIR`], [`Tracking::path`]):
//!
//! ```text
//! header   "SVMRT\r\n\x1a", format u32 LE, JSON length u32 LE, crc32c of the JSON u32 LE,
//!          the JSON (MrtHeader: disk size, region size, reference, pending backup,
//!          worker session, the chain as last seen), zero padding to a 4 KiB boundary
//! current  bitmap pages: changes since the reference (one bit per 4 MiB region)
//! frozen   bitmap pages: changes since the reference up to a running backup's switch
//! ```
//!
//! A bitmap page is 4 KiB: 4092 bytes of bits (bit `i % 8` of byte `i / 8` is region
//! `i`, region `i` being disk bytes `[i * 4 MiB, (i + 1) * 4 MiB)`) and the crc32c of
//! those bytes and the page's index, so that a torn or misplaced page is detected. The
//! region size equals the repository's default chunk size, so one bit is one chunk.
//!
//! # What makes it valid
//!
//! The header records, for each layer of the disk's chain, its file name and its
//! DataWriteGuid as last seen by the tracker. Any writer of a VHDX file changes its
//! DataWriteGuid at its first write, so an offline `disk write` or `discard`, a restore in
//! place, a foreign tool, a checkpoint apply (a new layer), a resize (a new size) or a
//! merge all show up at the next open as a difference, and the tracking is reported
//! invalid with the reason ([`Status::Invalid`]); the next backup is then an express full,
//! which starts the tracking again. A file that is missing is [`Status::None`]; one that is
//! truncated, of another format, or whose checksums fail is invalid, never a panic.
//!
//! A running VM's worker opens Now's layer with a DataWriteGuid it chose in advance
//! ([`session_guid`]: derived from its session id, recorded in the header first), so that
//! after a worker kill the layer carries either the recorded value or that one, and
//! anybody else's write (which picks a random value) is still detected.
//!
//! A merge under the running guest (deleting a checkpoint, a backup's recovery checkpoint
//! included) is recorded in the header before its journal is written ([`MergeSeen`]), and
//! the file receiving the data takes the session's DataWriteGuid too: a worker killed
//! during it leaves the pair as recorded, and the replay of the journal at the next open
//! leaves the chain without the merged-away layer, both accepted (the disk reads the
//! same); any other writer is still detected.
//!
//! # Crash model
//!
//! - The header and both bitmaps change together only by rewriting the whole file
//!   atomically (temporary file, fsync, rename, fsync of the folder): reference changes,
//!   freezes at a backup's switch, chain records. A crash leaves the old or the new file.
//! - A guest write's region is marked before the write goes to the disk: the bit is set
//!   in the page, the page written in place and `fdatasync`ed ([`LiveTracker::mark`]); a
//!   region already marked costs one atomic load. So after any crash the marked set is a
//!   superset of what changed, never a subset. A torn page fails its checksum: the
//!   tracking is invalid (an express full follows), never silently short.
//! - First touches that meet share their `fdatasync` (a group commit): each writes its
//!   page under the lock, then waits for a sync that started after its write (one waiter
//!   runs it for all), so concurrent first touches cost about one sync, not one each. A
//!   write to a region whose bit another writer set but whose sync is still running waits
//!   for that sync too: no change goes to the disk before its mark is durable.
//! - A backup of a running VM freezes the current set at its recovery checkpoint's switch
//!   (`frozen |= current`, `current = 0`, `pending = checkpoint`), with the guest paused.
//!   When its point commits, the reference becomes the point and the frozen set is
//!   dropped; when it fails, the frozen set is OR-ed back into the current one
//!   ([`Tracking::settle`]). A backup killed before either leaves the frozen set in the
//!   file: the next freeze ORs it in again, and every reader uses `current | frozen`, so
//!   nothing is lost.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use uuid::Uuid;

/// The folder of a VM holding the tracking files.
pub const TRACKING_DIR: &str = "tracking";
/// Bytes of the disk one bit covers (the repository's default chunk size).
pub const REGION_BYTES: u64 = 4 << 20;
/// The format this module writes and reads.
pub const MRT_FORMAT: u32 = 1;
const MAGIC: [u8; 8] = *b"SVMRT\r\n\x1a";
const PAGE: usize = 4096;
const PAGE_BITS_BYTES: usize = PAGE - 4;
const PAGE_REGIONS: u64 = PAGE_BITS_BYTES as u64 * 8;
const PREFIX: usize = 20;
/// Regions past a sequential writer's first touch marked with it by default
/// ([`LiveTracker::set_mark_ahead`]): a third of the syncs for a writer that goes on,
/// for at most 8 MiB more read by the next incremental where it stops (4 regions cut the
/// syncs to a fifth but made the incremental of the 64 MiB test disk read up to 48 MiB
/// instead of 28).
pub const MARK_AHEAD: u64 = 2;

/// One layer of a chain as the tracker saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerSeen {
    /// Its file name in `disks/`.
    pub file: String,
    /// Its DataWriteGuid.
    pub data_write_guid: Uuid,
}

/// The header's JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MrtHeader {
    disk_size: u64,
    region_bytes: u64,
    /// The recovery point the sets are relative to (its id in the repository).
    reference: Option<String>,
    /// The recovery checkpoint of a backup whose set is frozen and not settled.
    pending: Option<Uuid>,
    /// The worker session that serves the disk, if one does (or died doing so).
    session: Option<Uuid>,
    /// The chain, top first, as last seen.
    chain: Vec<LayerSeen>,
    /// A journaled merge of two layers of `chain` under way, which a replay may have
    /// finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    merging: Option<MergeSeen>,
}

/// A merge of two adjacent layers of the recorded chain that the worker started: the chain
/// may have lost `away`, the disk it reads staying the same.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeSeen {
    /// The layer that leaves the chain.
    pub away: String,
    /// Its neighbour, which then holds the merged data.
    pub into: String,
}

/// A tracking file's state as read.
#[derive(Debug)]
pub enum Status {
    /// No tracking file.
    None,
    /// A file that cannot be trusted, and why.
    Invalid(String),
    /// A file whose chain record matched (or was not checked).
    Valid(Tracking),
}

/// The contents of one tracking file (see the module doc).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tracking {
    header: MrtHeader,
    current: Vec<u8>,
    frozen: Vec<u8>,
}

/// The DataWriteGuid the worker of session `session` gives the layer file `file` at its
/// first write: derived, so that the tracker recognises it after a worker kill.
pub fn session_guid(session: Uuid, file: &str) -> Uuid {
    // FNV-1a over the name, mixed into the session id: distinct per file.
    let mut h: u128 = 0x6c62272e07bb014262b821756295c58d;
    for b in file.as_bytes() {
        h ^= u128::from(*b);
        h = h.wrapping_mul(0x0000000001000000000000000000013B);
    }
    let v = session.as_u128() ^ h;
    // A valid random (version 4) UUID, as DataWriteGuids are.
    uuid::Builder::from_random_bytes(v.to_be_bytes()).into_uuid()
}

fn regions_of(size: u64) -> u64 {
    size.div_ceil(REGION_BYTES)
}

fn pages_of(size: u64) -> usize {
    regions_of(size).div_ceil(PAGE_REGIONS).max(1) as usize
}

fn page_crc(bits: &[u8], index: usize) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(bits), &(index as u64).to_le_bytes())
}

fn get(bits: &[u8], i: u64) -> bool {
    bits[(i / 8) as usize] & (1 << (i % 8)) != 0
}

fn set(bits: &mut [u8], i: u64) {
    bits[(i / 8) as usize] |= 1 << (i % 8);
}

impl Tracking {
    /// The tracking file of disk `disk` of the VM in `vm_dir`.
    pub fn path(vm_dir: &Path, disk: &str) -> PathBuf {
        vm_dir.join(TRACKING_DIR).join(format!("{disk}.mrt"))
    }

    /// Empty sets relative to `reference`, for a disk of `disk_size` bytes whose chain is
    /// `chain`.
    pub fn new(disk_size: u64, reference: Option<String>, chain: Vec<LayerSeen>) -> Tracking {
        let bytes = pages_of(disk_size) * PAGE_BITS_BYTES;
        Tracking {
            header: MrtHeader {
                disk_size,
                region_bytes: REGION_BYTES,
                reference,
                pending: None,
                session: None,
                chain,
                merging: None,
            },
            current: vec![0; bytes],
            frozen: vec![0; bytes],
        }
    }

    /// Reads `path`. A missing file is [`Status::None`]; anything malformed is
    /// [`Status::Invalid`] with the reason; only an I/O error (other than absence) fails.
    /// The chain is not checked here: see [`Tracking::check_chain`].
    pub fn load(path: &Path) -> Result<Status> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Status::None),
            Err(e) => return Err(Error::io(path, e)),
        };
        Ok(match Tracking::decode(&bytes) {
            Ok(t) => Status::Valid(t),
            Err(reason) => Status::Invalid(reason),
        })
    }

    fn decode(bytes: &[u8]) -> std::result::Result<Tracking, String> {
        if bytes.len() < PREFIX || bytes[..8] != MAGIC {
            return Err("the tracking file is not one (bad magic or truncated)".into());
        }
        let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        let format = word(8);
        if format != MRT_FORMAT {
            return Err(format!(
                "the tracking file has format {format}, this version reads {MRT_FORMAT}"
            ));
        }
        let json_len = word(12) as usize;
        let json = bytes
            .get(PREFIX..PREFIX + json_len)
            .ok_or("the tracking file is truncated in its header")?;
        if crc32c::crc32c(json) != word(16) {
            return Err("the tracking file's header fails its checksum".into());
        }
        let header: MrtHeader = serde_json::from_slice(json)
            .map_err(|e| format!("the tracking file's header is malformed: {e}"))?;
        if header.region_bytes != REGION_BYTES {
            return Err(format!(
                "the tracking file has regions of {} bytes, this version uses {REGION_BYTES}",
                header.region_bytes
            ));
        }
        let header_end = (PREFIX + json_len).div_ceil(PAGE) * PAGE;
        let pages = pages_of(header.disk_size);
        if bytes.len() != header_end + 2 * pages * PAGE {
            return Err(format!(
                "the tracking file is {} bytes, its header says {}",
                bytes.len(),
                header_end + 2 * pages * PAGE
            ));
        }
        let mut sets = [Vec::new(), Vec::new()];
        for (s, set) in sets.iter_mut().enumerate() {
            for p in 0..pages {
                let at = header_end + (s * pages + p) * PAGE;
                let page = &bytes[at..at + PAGE];
                let crc = u32::from_le_bytes(page[PAGE_BITS_BYTES..].try_into().unwrap());
                if page_crc(&page[..PAGE_BITS_BYTES], p) != crc {
                    return Err(format!(
                        "page {p} of the tracking file's {} set fails its checksum",
                        ["current", "frozen"][s]
                    ));
                }
                set.extend_from_slice(&page[..PAGE_BITS_BYTES]);
            }
        }
        let [current, frozen] = sets;
        Ok(Tracking {
            header,
            current,
            frozen,
        })
    }

    fn header_bytes(&self) -> Vec<u8> {
        let json = serde_json::to_vec(&self.header).expect("serializable");
        let mut out = Vec::with_capacity(PREFIX + json.len() + PAGE);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&MRT_FORMAT.to_le_bytes());
        out.extend_from_slice(&(json.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(&json).to_le_bytes());
        out.extend_from_slice(&json);
        out.resize(out.len().div_ceil(PAGE) * PAGE, 0);
        out
    }

    fn page_bytes(bits: &[u8], p: usize) -> Vec<u8> {
        let chunk = &bits[p * PAGE_BITS_BYTES..(p + 1) * PAGE_BITS_BYTES];
        let mut page = Vec::with_capacity(PAGE);
        page.extend_from_slice(chunk);
        page.extend_from_slice(&page_crc(chunk, p).to_le_bytes());
        page
    }

    /// The whole file.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.header_bytes();
        let pages = pages_of(self.header.disk_size);
        for bits in [&self.current, &self.frozen] {
            for p in 0..pages {
                out.extend_from_slice(&Tracking::page_bytes(bits, p));
            }
        }
        out
    }

    /// Writes the file at `path` atomically (creating `tracking/` if needed).
    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent()
            && !dir.is_dir()
        {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            crate::fsutil::sync_dir_of(dir)?;
        }
        crate::fsutil::atomic_write(path, &self.encode())
    }

    /// The virtual size of the disk tracked.
    pub fn disk_size(&self) -> u64 {
        self.header.disk_size
    }

    /// The recovery point the sets are relative to.
    pub fn reference(&self) -> Option<&str> {
        self.header.reference.as_deref()
    }

    /// The recovery checkpoint whose backup froze a set and did not settle it.
    pub fn pending(&self) -> Option<Uuid> {
        self.header.pending
    }

    /// The worker session that serves (or served, until it died) the disk.
    pub fn session(&self) -> Option<Uuid> {
        self.header.session
    }

    /// The chain as last seen.
    pub fn chain(&self) -> &[LayerSeen] {
        &self.header.chain
    }

    /// Records a worker session (or its end).
    pub fn set_session(&mut self, session: Option<Uuid>) {
        self.header.session = session;
    }

    /// Records the chain as it is now (a merge recorded before is over or not started).
    pub fn set_chain(&mut self, chain: Vec<LayerSeen>) {
        self.header.chain = chain;
        self.header.merging = None;
    }

    /// Records that a journaled merge of two adjacent layers of the chain starts: until
    /// the chain is recorded again, the chain without `away` is accepted too.
    pub fn set_merging(&mut self, merge: MergeSeen) {
        self.header.merging = Some(merge);
    }

    /// The merge recorded as under way.
    pub fn merging(&self) -> Option<&MergeSeen> {
        self.header.merging.as_ref()
    }

    /// Why the tracking cannot be trusted for a disk of `size` bytes whose chain is now
    /// `seen` (top first), or `Ok` when it can. A layer may carry its recorded
    /// DataWriteGuid or, while a worker session is recorded, the one that session gives it
    /// ([`session_guid`]).
    ///
    /// While a merge is recorded ([`Tracking::set_merging`]), the chain without the layer
    /// it merges away is accepted as well: the merge is journaled, so a worker killed
    /// during it leaves the pair (the file receiving the data carrying the session's
    /// DataWriteGuid) and the next open of the VM finishes it; neither changes what the
    /// disk reads. Only those two shapes are accepted, each file still checked.
    pub fn check_chain(&self, size: u64, seen: &[LayerSeen]) -> std::result::Result<(), String> {
        if size != self.header.disk_size {
            return Err(format!(
                "the disk's size changed from {} to {size} bytes",
                self.header.disk_size
            ));
        }
        let direct = self.check_against(seen, &self.header.chain);
        if direct.is_err()
            && let Some(m) = &self.header.merging
            && let Some(at) = self.header.chain.iter().position(|l| l.file == m.away)
            && [at.checked_sub(1), Some(at + 1)]
                .into_iter()
                .flatten()
                .any(|n| self.header.chain.get(n).is_some_and(|l| l.file == m.into))
        {
            let mut merged = self.header.chain.clone();
            merged.remove(at);
            if self.check_against(seen, &merged).is_ok() {
                return Ok(());
            }
        }
        direct
    }

    fn check_against(
        &self,
        seen: &[LayerSeen],
        chain: &[LayerSeen],
    ) -> std::result::Result<(), String> {
        if seen.len() != chain.len() {
            return Err(format!(
                "the disk's chain has {} files, the tracker last saw {}",
                seen.len(),
                chain.len()
            ));
        }
        for (now, was) in seen.iter().zip(chain) {
            if now.file != was.file {
                return Err(format!(
                    "the disk's chain holds {} where the tracker last saw {}",
                    now.file, was.file
                ));
            }
            let by_session = self
                .header
                .session
                .is_some_and(|s| session_guid(s, &now.file) == now.data_write_guid);
            if now.data_write_guid != was.data_write_guid && !by_session {
                return Err(format!(
                    "{} was written outside change tracking since it last saw it: its DataWriteGuid changed",
                    now.file
                ));
            }
        }
        Ok(())
    }

    fn ranges_of(&self, bits: impl Fn(u64) -> bool) -> Vec<Range<u64>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        for i in 0..regions_of(self.header.disk_size) {
            if !bits(i) {
                continue;
            }
            let r = i * REGION_BYTES..((i + 1) * REGION_BYTES).min(self.header.disk_size);
            match out.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => out.push(r),
            }
        }
        out
    }

    /// Every byte range that may have changed since the reference: the current set and a
    /// frozen one not settled.
    pub fn changed(&self) -> Vec<Range<u64>> {
        self.ranges_of(|i| get(&self.current, i) || get(&self.frozen, i))
    }

    /// The frozen set (what a running backup copies), as byte ranges.
    pub fn frozen(&self) -> Vec<Range<u64>> {
        self.ranges_of(|i| get(&self.frozen, i))
    }

    /// Regions in `changed`.
    pub fn changed_regions(&self) -> u64 {
        (0..regions_of(self.header.disk_size))
            .filter(|&i| get(&self.current, i) || get(&self.frozen, i))
            .count() as u64
    }

    /// Marks `[offset, offset + len)` in the current set (in memory).
    pub fn mark(&mut self, offset: u64, len: u64) {
        for i in region_span(offset, len, self.header.disk_size) {
            set(&mut self.current, i);
        }
    }

    /// A backup's switch: the current set joins the frozen one (an unsettled earlier one
    /// included), and a new empty set starts.
    pub fn freeze(&mut self, checkpoint: Uuid) {
        for (f, c) in self.frozen.iter_mut().zip(self.current.iter_mut()) {
            *f |= *c;
            *c = 0;
        }
        self.header.pending = Some(checkpoint);
    }

    /// A backup's end: with its committed `point`, the sets become relative to it (the
    /// frozen set was in it); without, the frozen set goes back into the current one.
    /// Does nothing when `checkpoint` is not the pending one.
    pub fn settle(&mut self, checkpoint: Uuid, point: Option<&str>) {
        if self.header.pending != Some(checkpoint) {
            return;
        }
        match point {
            Some(p) => self.header.reference = Some(p.to_owned()),
            None => {
                for (c, f) in self.current.iter_mut().zip(&self.frozen) {
                    *c |= *f;
                }
            }
        }
        self.frozen.iter_mut().for_each(|f| *f = 0);
        self.header.pending = None;
    }

    /// Starts over relative to `reference`: both sets empty.
    pub fn reset(&mut self, reference: Option<String>) {
        self.current.iter_mut().for_each(|b| *b = 0);
        self.frozen.iter_mut().for_each(|b| *b = 0);
        self.header.reference = reference;
        self.header.pending = None;
    }
}

/// The layers of an open chain as the tracker records them, top first.
pub fn chain_seen(chain: &vhdx::Chain) -> Vec<LayerSeen> {
    chain
        .layers()
        .iter()
        .map(|l| LayerSeen {
            file: l
                .path()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            data_write_guid: l.data_write_guid(),
        })
        .collect()
}

/// The tracking of disk `disk` of the VM in `vm_dir`, checked against the chain of its
/// Now layer `top` (opened read-only: the VM must not be running). A chain that cannot
/// be opened makes it invalid.
pub fn check_disk(vm_dir: &Path, disk: &str, top: &Path) -> Result<Status> {
    let status = Tracking::load(&Tracking::path(vm_dir, disk))?;
    let Status::Valid(t) = status else {
        return Ok(status);
    };
    let chain = match vhdx::Chain::open(top, false) {
        Ok(c) => c,
        Err(e) => {
            return Ok(Status::Invalid(format!(
                "cannot read the disk's chain: {e}"
            )));
        }
    };
    Ok(
        match t.check_chain(chain.virtual_size(), &chain_seen(&chain)) {
            Ok(()) => Status::Valid(t),
            Err(reason) => Status::Invalid(reason),
        },
    )
}

/// Records that the disks of the VM in `vm_dir` (name and Now layer of each) are backed
/// up as `point`: each file starts over relative to it, with the chain as it is now. For
/// a stopped VM whose lock the caller holds.
pub fn establish(vm_dir: &Path, disks: &[(String, PathBuf)], point: &str) -> Result<()> {
    for (name, top) in disks {
        let chain = vhdx::Chain::open(top, false)?;
        let t = Tracking::new(
            chain.virtual_size(),
            Some(point.to_owned()),
            chain_seen(&chain),
        );
        t.save(&Tracking::path(vm_dir, name))?;
    }
    Ok(())
}

/// The regions `[offset, offset + len)` touches, clamped to the disk.
fn region_span(offset: u64, len: u64, size: u64) -> Range<u64> {
    let end = offset.saturating_add(len).min(size);
    if len == 0 || offset >= end {
        return 0..0;
    }
    offset / REGION_BYTES..end.div_ceil(REGION_BYTES)
}

/// A tracking file a running VM's worker keeps open and marks (see the module doc).
#[derive(Debug)]
pub struct LiveTracker {
    path: PathBuf,
    /// The disk's size (ranges beyond it are the disk's to refuse, not to mark).
    size: u64,
    inner: Mutex<Inner>,
    /// The group commit: which page writes are durable, and who syncs.
    syncs: Mutex<Syncs>,
    /// Signalled when a sync ends.
    synced: Condvar,
    /// Each successful sync: the page writes it covered, and when it ended.
    #[cfg(test)]
    sync_log: Mutex<Vec<(u64, std::time::Instant)>>,
    /// The page write that first carried each region's bit.
    #[cfg(test)]
    set_by: Mutex<std::collections::HashMap<u64, u64>>,
    /// The current set as 64-region words, durable ones only, for the lock-free test of
    /// the hot path.
    marked: Vec<AtomicU64>,
    /// Regions marked past a sequential writer's first touch.
    ahead: AtomicU64,
    /// Marking failed and the file is gone: nothing more to mark.
    dropped: AtomicBool,
    /// Marking failed and the file could not be removed either: it may claim less than
    /// what changed, so no change may be made.
    failed: AtomicBool,
}

#[derive(Debug)]
struct Inner {
    /// Shared with a sync running outside the lock.
    file: Arc<File>,
    tracking: Tracking,
    /// Where the current set's first page starts in the file.
    current_at: u64,
    /// Page writes made so far, counted (across files): a sync that starts after the n-th
    /// makes it durable.
    written: u64,
}

#[derive(Debug, Default)]
struct Syncs {
    /// The page writes up to this one are durable.
    durable: u64,
    /// A waiter is running a sync: the others wait for it.
    running: bool,
    /// A sync failed: nothing written since is durable (the file is being dropped).
    failed: bool,
}

impl LiveTracker {
    /// Writes `tracking` to `path` and keeps the file open for marking.
    pub fn start(path: &Path, tracking: Tracking) -> Result<LiveTracker> {
        let regions = regions_of(tracking.disk_size());
        let t = LiveTracker {
            path: path.to_owned(),
            size: tracking.disk_size(),
            inner: Mutex::new(LiveTracker::write_open(path, tracking, 0)?),
            syncs: Mutex::new(Syncs::default()),
            synced: Condvar::new(),
            #[cfg(test)]
            sync_log: Mutex::new(Vec::new()),
            #[cfg(test)]
            set_by: Mutex::new(std::collections::HashMap::new()),
            marked: (0..regions.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            ahead: AtomicU64::new(MARK_AHEAD),
            dropped: AtomicBool::new(false),
            failed: AtomicBool::new(false),
        };
        t.sync_marked(&t.lock().tracking);
        Ok(t)
    }

    /// Writes `tracking` whole (synced) and opens it; `written` page writes were made
    /// before, all of them covered by the new file.
    fn write_open(path: &Path, tracking: Tracking, written: u64) -> Result<Inner> {
        tracking.save(path)?;
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
        {
            Ok(f) => f,
            Err(e) => {
                crate::fsutil::remove_file(path)?;
                return Err(Error::io(path, e));
            }
        };
        let current_at = tracking.header_bytes().len() as u64;
        Ok(Inner {
            file: Arc::new(file),
            tracking,
            current_at,
            written,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_syncs(&self) -> std::sync::MutexGuard<'_, Syncs> {
        self.syncs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new file holds every page write made so far (it was synced whole): they are
    /// durable, and a failed sync of the old one no longer matters.
    fn rewritten(&self, inner: &Inner) {
        let mut s = self.lock_syncs();
        s.durable = s.durable.max(inner.written);
        s.failed = false;
        self.synced.notify_all();
    }

    /// Returns once page write `need` is durable: a sync that started after it ended
    /// well. One waiter runs the sync for everybody; those who arrive meanwhile wait for
    /// the next one, which covers them.
    fn wait_durable(&self, need: u64) -> std::io::Result<()> {
        let mut s = self.lock_syncs();
        loop {
            if s.durable >= need {
                return Ok(());
            }
            if s.failed {
                return Err(std::io::Error::other("a sync of the tracking file failed"));
            }
            if s.running {
                s = self.synced.wait(s).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            s.running = true;
            drop(s);
            // Every write counted by now was made: the sync covers them all.
            let (file, through) = {
                let inner = self.lock();
                (inner.file.clone(), inner.written)
            };
            let result = file.sync_data();
            s = self.lock_syncs();
            s.running = false;
            match &result {
                Ok(()) => {
                    s.durable = s.durable.max(through);
                    #[cfg(test)]
                    self.sync_log
                        .lock()
                        .unwrap()
                        .push((through, std::time::Instant::now()));
                }
                Err(_) => s.failed = true,
            }
            self.synced.notify_all();
            result?;
        }
    }

    fn sync_marked(&self, t: &Tracking) {
        for (w, slot) in self.marked.iter().enumerate() {
            let mut v = 0u64;
            for b in 0..64 {
                let i = w as u64 * 64 + b;
                if i < regions_of(t.disk_size()) && get(&t.current, i) {
                    v |= 1 << b;
                }
            }
            slot.store(v, Ordering::SeqCst);
        }
    }

    fn is_marked(&self, i: u64) -> bool {
        self.marked[(i / 64) as usize].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }

    /// Makes sure `[offset, offset + len)` is durably marked before the caller changes
    /// it. Regions already marked cost an atomic load each; a first touch writes the page
    /// and waits for a sync that started after that write (shared with the first touches
    /// that meet it; see the module doc), marking [`MARK_AHEAD`] regions more when it
    /// follows a marked one. If the mark cannot be made durable, the file is removed (tracking
    /// none: the next backup is an express full) and marking stops; only when even that
    /// fails is the error returned, and the change must not be made.
    pub fn mark(&self, offset: u64, len: u64) -> Result<()> {
        if self.dropped.load(Ordering::Relaxed) {
            return self.refuse_if_failed();
        }
        let span = region_span(offset, len, self.size);
        if span.clone().all(|i| self.is_marked(i)) {
            return Ok(());
        }
        let (need, marking) = {
            let mut inner = self.lock();
            let mut pages = Vec::new();
            #[cfg(test)]
            let mut first = Vec::new();
            // A first touch right after a marked region looks like a sequential writer:
            // the regions it will reach next are marked with it, in the same sync (the
            // set only grows: still a superset).
            let sequential = span.start > 0
                && get(&inner.tracking.current, span.start - 1)
                && span.clone().any(|i| !get(&inner.tracking.current, i));
            let ahead = if sequential {
                self.ahead.load(Ordering::Relaxed)
            } else {
                0
            };
            let marking = span.start..(span.end + ahead).min(regions_of(self.size));
            for i in marking.clone() {
                if !get(&inner.tracking.current, i) {
                    set(&mut inner.tracking.current, i);
                    #[cfg(test)]
                    first.push(i);
                    let p = (i / PAGE_REGIONS) as usize;
                    if pages.last() != Some(&p) {
                        pages.push(p);
                    }
                }
            }
            let written = pages.iter().try_for_each(|&p| {
                let page = Tracking::page_bytes(&inner.tracking.current, p);
                inner
                    .file
                    .write_all_at(&page, inner.current_at + (p * PAGE) as u64)
            });
            if let Err(e) = written {
                drop(inner);
                return self.mark_failed(e);
            }
            if !pages.is_empty() {
                inner.written += 1;
            }
            #[cfg(test)]
            {
                let mut by = self.set_by.lock().unwrap();
                for i in first {
                    by.insert(i, inner.written);
                }
            }
            // A bit another writer set may still wait for its sync: it was written by
            // now, so waiting for every write so far covers it.
            (inner.written, marking)
        };
        if let Err(e) = self.wait_durable(need) {
            return self.mark_failed(e);
        }
        for i in marking {
            self.marked[(i / 64) as usize].fetch_or(1 << (i % 64), Ordering::Release);
        }
        Ok(())
    }

    fn mark_failed(&self, e: std::io::Error) -> Result<()> {
        tracing::error!(
            "cannot mark a changed region in {}: {e}; change tracking is dropped, the next backup will be an express full",
            self.path.display()
        );
        self.drop_file()
    }

    /// How many regions past a sequential writer's first touch are marked with it (0:
    /// none; [`MARK_AHEAD`] by default): fewer syncs for a writer that goes on, up to that
    /// many regions read needlessly by the next backup where it stops.
    pub fn set_mark_ahead(&self, regions: u64) {
        self.ahead.store(regions, Ordering::Relaxed);
    }

    /// Stops tracking: the file is removed (tracking none), or if even that fails, every
    /// later change is refused until it can be.
    fn drop_file(&self) -> Result<()> {
        self.dropped.store(true, Ordering::SeqCst);
        if let Err(e) = crate::fsutil::remove_file(&self.path) {
            self.failed.store(true, Ordering::SeqCst);
            return Err(e);
        }
        Ok(())
    }

    fn refuse_if_failed(&self) -> Result<()> {
        if !self.failed.load(Ordering::SeqCst) {
            return Ok(());
        }
        crate::fsutil::remove_file(&self.path)?;
        self.failed.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Changes the file whole (atomically) with `f`, and keeps marking into the new one.
    /// No change may be in flight meanwhile (the caller holds the guest back); a tracker
    /// that was dropped stays dropped.
    pub fn update(&self, f: impl FnOnce(&mut Tracking)) -> Result<()> {
        if self.dropped.load(Ordering::SeqCst) {
            return self.refuse_if_failed();
        }
        let mut inner = self.lock();
        let mut t = inner.tracking.clone();
        f(&mut t);
        match LiveTracker::write_open(&self.path, t, inner.written) {
            Ok(new) => *inner = new,
            Err(e) => {
                use std::os::unix::fs::MetadataExt;
                let ino = |m: std::io::Result<std::fs::Metadata>| m.ok().map(|m| m.ino());
                let on_disk = ino(std::fs::metadata(&self.path));
                if on_disk.is_some() && on_disk == ino(inner.file.metadata()) {
                    // The old file stands (the rename did not happen): marks go on into it.
                    return Err(e);
                }
                // Replaced by a file nobody marks, or gone: stop, refusing changes while
                // a file that may lie stays.
                drop(inner);
                let _ = self.drop_file();
                return Err(e);
            }
        }
        self.rewritten(&inner);
        self.sync_marked(&inner.tracking);
        Ok(())
    }

    /// Starts over with `tracking` (a tracker that was dropped after a failure included),
    /// when no change is in flight: a backup's switch, which then re-establishes tracking
    /// from its point.
    pub fn restart(&self, tracking: Tracking) -> Result<()> {
        let mut inner = self.lock();
        *inner = LiveTracker::write_open(&self.path, tracking, inner.written)?;
        self.rewritten(&inner);
        self.sync_marked(&inner.tracking);
        self.failed.store(false, Ordering::SeqCst);
        self.dropped.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// A copy of what the file holds.
    pub fn snapshot(&self) -> Tracking {
        self.lock().tracking.clone()
    }

    /// Whether marking stopped (the file was removed after a failure).
    pub fn is_dropped(&self) -> bool {
        self.dropped.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain() -> Vec<LayerSeen> {
        vec![
            LayerSeen {
                file: "disk0_aaa.avhdx".into(),
                data_write_guid: Uuid::new_v4(),
            },
            LayerSeen {
                file: "disk0.vhdx".into(),
                data_write_guid: Uuid::new_v4(),
            },
        ]
    }

    #[test]
    fn round_trips_and_merges_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let path = Tracking::path(dir.path(), "disk0");
        let size = 10 * REGION_BYTES + 5;
        let mut t = Tracking::new(size, Some("ab".into()), chain());
        t.mark(1, 1);
        t.mark(REGION_BYTES * 2 - 1, 2);
        t.mark(size - 1, 1);
        t.save(&path).unwrap();
        let Status::Valid(back) = Tracking::load(&path).unwrap() else {
            panic!("not valid")
        };
        assert_eq!(back, t);
        assert_eq!(
            back.changed(),
            vec![0..3 * REGION_BYTES, 10 * REGION_BYTES..size]
        );
        assert_eq!(back.changed_regions(), 4);
    }

    #[test]
    fn freeze_and_settle_keep_a_superset() {
        let mut t = Tracking::new(8 * REGION_BYTES, None, chain());
        t.mark(0, 1);
        let c1 = Uuid::new_v4();
        t.freeze(c1);
        t.mark(3 * REGION_BYTES, 1);
        assert_eq!(t.frozen(), vec![0..REGION_BYTES]);
        assert_eq!(t.changed().len(), 2);
        // A killed backup: the next freeze takes both.
        let c2 = Uuid::new_v4();
        t.freeze(c2);
        assert_eq!(
            t.frozen(),
            vec![0..REGION_BYTES, 3 * REGION_BYTES..4 * REGION_BYTES]
        );
        // A failed one gives them back.
        t.settle(c2, None);
        assert_eq!(t.changed().len(), 2);
        assert!(t.frozen().is_empty());
        let c3 = Uuid::new_v4();
        t.freeze(c3);
        t.mark(5 * REGION_BYTES, 1);
        let p = "00ff";
        t.settle(c1, Some("11")); // not the pending one: ignored
        assert_eq!(t.pending(), Some(c3));
        t.settle(c3, Some(p));
        assert_eq!(t.reference(), Some(p));
        assert_eq!(t.changed(), vec![5 * REGION_BYTES..6 * REGION_BYTES]);
    }

    #[test]
    fn damaged_files_are_invalid_with_a_reason_never_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = Tracking::path(dir.path(), "disk0");
        assert!(matches!(Tracking::load(&path).unwrap(), Status::None));
        let mut t = Tracking::new(40 * REGION_BYTES, Some("ab".into()), chain());
        t.mark(7 * REGION_BYTES, 1);
        let good = t.encode();
        let mut cases: Vec<(Vec<u8>, &str)> = vec![
            (Vec::new(), "bad magic"),
            (good[..10].to_vec(), "bad magic"),
            (good[..30].to_vec(), "truncated"),
            (good[..good.len() - 1].to_vec(), "bytes"),
        ];
        let mut flipped_header = good.clone();
        flipped_header[PREFIX + 3] ^= 1;
        cases.push((flipped_header, "header fails its checksum"));
        let mut flipped_bits = good.clone();
        flipped_bits[PAGE + 100] ^= 4;
        cases.push((flipped_bits, "page 0 of the tracking file's current set"));
        let mut version = good.clone();
        version[8] = 9;
        cases.push((version, "format 9"));
        for len in (0..good.len()).step_by(997) {
            cases.push((good[..len].to_vec(), ""));
        }
        for (bytes, want) in cases {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &bytes).unwrap();
            match Tracking::load(&path).unwrap() {
                Status::Invalid(why) => assert!(why.contains(want), "{why:?} lacks {want:?}"),
                other => panic!("{} bytes gave {other:?}", bytes.len()),
            }
        }
    }

    #[test]
    fn the_chain_check_names_what_changed() {
        let c = chain();
        let mut t = Tracking::new(REGION_BYTES, None, c.clone());
        assert_eq!(t.check_chain(REGION_BYTES, &c), Ok(()));
        assert!(
            t.check_chain(2 * REGION_BYTES, &c)
                .unwrap_err()
                .contains("size changed")
        );
        let mut other = c.clone();
        other[0].data_write_guid = Uuid::new_v4();
        let why = t.check_chain(REGION_BYTES, &other).unwrap_err();
        assert!(why.contains("disk0_aaa.avhdx was written outside"), "{why}");
        // The worker's own guid is accepted while its session is recorded.
        let s = Uuid::new_v4();
        other[0].data_write_guid = session_guid(s, "disk0_aaa.avhdx");
        assert!(t.check_chain(REGION_BYTES, &other).is_err());
        t.set_session(Some(s));
        assert_eq!(t.check_chain(REGION_BYTES, &other), Ok(()));
        let mut applied = c.clone();
        applied[0].file = "disk0_bbb.avhdx".into();
        assert!(
            t.check_chain(REGION_BYTES, &applied)
                .unwrap_err()
                .contains("holds disk0_bbb.avhdx")
        );
        assert!(t.check_chain(REGION_BYTES, &c[1..]).is_err());
    }

    #[test]
    fn a_recorded_merge_accepts_the_chains_it_can_leave_and_no_other() {
        let c = chain();
        let s = Uuid::new_v4();
        let mut t = Tracking::new(REGION_BYTES, None, c.clone());
        t.set_session(Some(s));
        // Now's layer merged into its parent, which took the session's DataWriteGuid.
        let into_parent = vec![LayerSeen {
            file: c[1].file.clone(),
            data_write_guid: session_guid(s, &c[1].file),
        }];
        let why = t.check_chain(REGION_BYTES, &into_parent).unwrap_err();
        assert!(why.contains("chain has 1 files"), "{why}");
        t.set_merging(MergeSeen {
            away: c[0].file.clone(),
            into: c[1].file.clone(),
        });
        assert_eq!(t.check_chain(REGION_BYTES, &into_parent), Ok(()));
        // Killed half way: the pair, the parent already written by the session.
        let mut half = c.clone();
        half[1].data_write_guid = session_guid(s, &c[1].file);
        assert_eq!(t.check_chain(REGION_BYTES, &half), Ok(()));
        // Anybody else's write to the merged file is still caught.
        let mut foreign = into_parent.clone();
        foreign[0].data_write_guid = Uuid::new_v4();
        assert!(
            t.check_chain(REGION_BYTES, &foreign)
                .unwrap_err()
                .contains("chain has 1 files")
        );
        // Only the recorded layer may go: the other one gone is a different disk.
        let wrong = vec![c[0].clone()];
        assert!(t.check_chain(REGION_BYTES, &wrong).is_err());
        // Into the child: Now's layer keeps its DataWriteGuid and skips its parent.
        t.set_merging(MergeSeen {
            away: c[1].file.clone(),
            into: c[0].file.clone(),
        });
        assert_eq!(t.check_chain(REGION_BYTES, &wrong), Ok(()));
        // Recording the chain again ends the merge.
        t.set_chain(c.clone());
        assert!(t.merging().is_none());
        assert!(t.check_chain(REGION_BYTES, &wrong).is_err());
        // Saved and read back, the merge is kept.
        t.set_merging(MergeSeen {
            away: c[0].file.clone(),
            into: c[1].file.clone(),
        });
        let dir = tempfile::tempdir().unwrap();
        let path = Tracking::path(dir.path(), "disk0");
        t.save(&path).unwrap();
        let Status::Valid(back) = Tracking::load(&path).unwrap() else {
            panic!("not valid")
        };
        assert_eq!(back.check_chain(REGION_BYTES, &into_parent), Ok(()));
    }

    #[test]
    fn concurrent_first_touches_return_only_once_a_later_sync_ended() {
        let dir = tempfile::tempdir().unwrap();
        let path = Tracking::path(dir.path(), "disk0");
        let size = 40_000 * REGION_BYTES; // two bitmap pages
        let live = LiveTracker::start(&path, Tracking::new(size, None, chain())).unwrap();
        let (threads, per) = (16u64, 24u64);
        let marks: Vec<(u64, std::time::Instant)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let live = &live;
                    s.spawn(move || {
                        let mut out = Vec::new();
                        for k in 0..per {
                            // Its own regions, on both pages, and one every thread
                            // touches (set by one, perhaps not durable yet for the others).
                            for r in [1000 + t + k * threads, 39_000 - t - k * threads, k] {
                                live.mark(r * REGION_BYTES + 7, 512).unwrap();
                                out.push((r, std::time::Instant::now()));
                            }
                        }
                        out
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        let syncs = live.sync_log.lock().unwrap().clone();
        let set_by = live.set_by.lock().unwrap().clone();
        for (r, returned) in &marks {
            let write = set_by[r];
            assert!(
                syncs
                    .iter()
                    .any(|(through, ended)| *through >= write && ended <= returned),
                "a mark of region {r} returned before a sync covering its page write {write} ended"
            );
        }
        let Status::Valid(on_disk) = Tracking::load(&path).unwrap() else {
            panic!("not valid")
        };
        assert_eq!(on_disk.changed_regions(), set_by.len() as u64);
        assert_eq!(on_disk, live.snapshot());
        eprintln!(
            "{} marks of {} regions by {threads} threads, {} syncs",
            marks.len(),
            set_by.len(),
            syncs.len()
        );
    }

    #[test]
    fn live_marks_are_durable_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = Tracking::path(dir.path(), "disk0");
        let size = 100_000 * REGION_BYTES; // more than one bitmap page
        let live = LiveTracker::start(&path, Tracking::new(size, None, chain())).unwrap();
        live.mark(5, 10).unwrap();
        live.mark(40_000 * REGION_BYTES - 1, 2).unwrap();
        live.mark(5, 10).unwrap();
        // Beyond the end: the disk refuses it, nothing to mark (and no panic).
        live.mark(size - 1, 10 * REGION_BYTES).unwrap();
        live.mark(size + 5, 1).unwrap();
        let read = |p: &Path| match Tracking::load(p).unwrap() {
            Status::Valid(t) => t,
            other => panic!("{other:?}"),
        };
        let on_disk = read(&path);
        assert_eq!(on_disk.changed_regions(), 4);
        assert_eq!(on_disk, live.snapshot());
        let c = Uuid::new_v4();
        live.update(|t| t.freeze(c)).unwrap();
        live.mark(REGION_BYTES * 7, 1).unwrap();
        let on_disk = read(&path);
        assert_eq!(on_disk.frozen().len(), 3);
        assert_eq!(on_disk.changed_regions(), 5);
        assert_eq!(on_disk.pending(), Some(c));
        // Starting over: nothing marked, and marking goes on into the new file.
        live.restart(Tracking::new(size, None, chain())).unwrap();
        assert_eq!(read(&path).changed_regions(), 0);
        live.mark(REGION_BYTES * 7, 1).unwrap();
        assert_eq!(read(&path).changed_regions(), 1);
    }
}
