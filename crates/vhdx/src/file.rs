//! One VHDX file: open and validate it, resolve reads to file ranges, write payload, and
//! commit metadata through the log.
//!
//! A [`VhdxFile`] knows nothing of its parent: a read of a range a differencing file does
//! not hold resolves to [`Segment::Parent`], and the [`crate::Chain`] continues there.

use crate::bat::{Bat, PAGE_ENTRIES};
use crate::error::{Corruption, Error, Result};
use crate::format::*;
use crate::io::FileIo;
use crate::log::{self, ActiveSequence, ReplayOverlay};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{File, OpenOptions as FsOpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use uuid::Uuid;

mod resize;
pub use resize::{ResizeOutcome, resize};

/// What kind of disk a file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskKind {
    /// Every block allocated at creation (LeaveBlockAllocated).
    Fixed,
    /// Blocks allocated on first write.
    Dynamic,
    /// A child that records only what differs from its parent.
    Differencing,
}

impl DiskKind {
    /// Lowercase name as the CLI prints it.
    pub fn name(self) -> &'static str {
        match self {
            DiskKind::Fixed => "fixed",
            DiskKind::Dynamic => "dynamic",
            DiskKind::Differencing => "differencing",
        }
    }
}

/// The sizes that define a disk's layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// Payload block size in bytes.
    pub block_size: u32,
    /// Logical sector size (512 or 4096).
    pub logical_sector_size: u32,
    /// Physical sector size (512 or 4096).
    pub physical_sector_size: u32,
}

impl Geometry {
    /// Payload blocks per sector-bitmap block.
    pub fn chunk_ratio(&self) -> u64 {
        SECTORS_PER_CHUNK * u64::from(self.logical_sector_size) / u64::from(self.block_size)
    }
    /// Number of payload blocks.
    pub fn payload_blocks(&self) -> u64 {
        self.virtual_size.div_ceil(u64::from(self.block_size))
    }
    /// Number of sector-bitmap blocks (chunks).
    pub fn sector_bitmap_blocks(&self) -> u64 {
        self.payload_blocks().div_ceil(self.chunk_ratio())
    }
    /// BAT entries a file of this geometry needs.
    pub fn bat_entries(&self, differencing: bool) -> u64 {
        if differencing {
            self.sector_bitmap_blocks() * (self.chunk_ratio() + 1)
        } else {
            let p = self.payload_blocks();
            p + (p.saturating_sub(1)) / self.chunk_ratio()
        }
    }
    /// BAT index of payload block `block`.
    pub fn payload_index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio()
    }
    /// BAT index of the sector-bitmap entry of chunk `chunk`.
    pub fn bitmap_index(&self, chunk: u64) -> u64 {
        chunk * (self.chunk_ratio() + 1) + self.chunk_ratio()
    }
    /// Logical sectors per payload block.
    pub fn sectors_per_block(&self) -> u64 {
        u64::from(self.block_size) / u64::from(self.logical_sector_size)
    }
    /// Bytes of sector bitmap that describe one payload block.
    pub fn bitmap_bytes_per_block(&self) -> u64 {
        self.sectors_per_block() / 8
    }
    /// Guest bytes of block `block` (the last block may be short).
    pub fn block_len(&self, block: u64) -> u64 {
        let start = block * u64::from(self.block_size);
        (self.virtual_size - start).min(u64::from(self.block_size))
    }
    /// Validates sizes as the format requires.
    pub fn validate(&self) -> Result<(), Corruption> {
        if !self.block_size.is_power_of_two()
            || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&self.block_size)
        {
            return Err(Corruption::InvalidBlockSize {
                block_size: self.block_size,
            });
        }
        for (which, size) in [
            ("logical", self.logical_sector_size),
            ("physical", self.physical_sector_size),
        ] {
            if size != 512 && size != 4096 {
                return Err(Corruption::InvalidSectorSize { which, size });
            }
        }
        if self.virtual_size == 0
            || self.virtual_size > MAX_VIRTUAL_SIZE
            || !self
                .virtual_size
                .is_multiple_of(u64::from(self.logical_sector_size))
        {
            return Err(Corruption::InvalidVirtualSize {
                size: self.virtual_size,
                logical_sector_size: self.logical_sector_size,
            });
        }
        Ok(())
    }
}

/// How a byte range of a file resolves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Segment {
    /// Stored in this file at `file_offset`.
    Data {
        /// File offset of the first byte.
        file_offset: u64,
        /// Bytes.
        len: u64,
    },
    /// Reads as zeros.
    Zero {
        /// Bytes.
        len: u64,
    },
    /// Not in this file: the parent has it.
    Parent {
        /// Bytes.
        len: u64,
    },
}

impl Segment {
    /// Length of the segment.
    pub fn len(&self) -> u64 {
        match *self {
            Segment::Data { len, .. } | Segment::Zero { len } | Segment::Parent { len } => len,
        }
    }
    /// Whether the segment is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How to open a file.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// Open for writing (exclusive lock); otherwise read-only (shared lock).
    pub writable: bool,
    /// Keep the DataWriteGuid even though data is written: for merges that add data a
    /// reader of this file's chain already sees, so children stay linked.
    pub keep_data_write_guid: bool,
    /// Use this value as the new DataWriteGuid at the first write (a merge into a parent
    /// announces it to the child beforehand through parent_linkage2).
    pub data_write_guid: Option<Uuid>,
    /// Take a shared lock even when writable: for a live merge, whose caller also serves
    /// the same chain read-only in its own process and guarantees there is no other
    /// writer. The merge only ever changes what that reader's view already reads the same
    /// way (see [`crate::merge`]).
    pub shared_lock: bool,
}

/// Summary of what a file holds, for `info`.
#[derive(Clone, Debug, Default)]
pub struct Allocation {
    /// Payload blocks fully stored here.
    pub full_blocks: u64,
    /// Payload blocks partly stored here (differencing).
    pub partial_blocks: u64,
    /// Payload blocks explicitly zero.
    pub zero_blocks: u64,
    /// Guest bytes stored in this file.
    pub stored_bytes: u64,
}

/// An open VHDX file.
pub struct VhdxFile {
    path: PathBuf,
    io: Arc<dyn FileIo>,
    writable: bool,
    geometry: Geometry,
    kind: DiskKind,
    creator: String,
    virtual_disk_id: Uuid,
    log_offset: u64,
    log_length: u64,
    bat_offset: u64,
    metadata_offset: u64,
    metadata_length: u64,
    regions: Vec<RegionEntry>,
    /// The BAT, holding only pages with a non-zero entry (see [`crate::bat`]).
    bat: Bat,
    /// Sector bitmaps of payload blocks that are (or were, this session) partially present.
    bitmaps: RwLock<HashMap<u64, Box<[u8]>>>,
    data_guid_done: AtomicBool,
    replayed_log: bool,
    /// Serialises commits: the log position and the header. Taken before `state`.
    journal: Mutex<Journal>,
    /// Allocation and what awaits commit; held only briefly, never across a sync.
    state: Mutex<State>,
}

struct Journal {
    header: Header,
    current_slot: usize,
    file_guid_done: bool,
    log_active: bool,
    log_next: u64,
    log_sequence: u64,
}

struct State {
    data_guid_done: bool,
    forced_data_write_guid: Option<Uuid>,
    file_end: u64,
    dirty_bat: BTreeSet<u64>,
    /// Dirty sector-bitmap sectors (file offset) and the chunk whose bitmap block holds each.
    dirty_bitmap: BTreeMap<u64, u64>,
    metadata: Vec<MetadataItem>,
    parent_locator: Option<ParentLocator>,
    params: FileParameters,
    poisoned: bool,
    closed: bool,
}

const SECTOR: u64 = LOG_SECTOR_SIZE as u64;

impl std::fmt::Debug for VhdxFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhdxFile")
            .field("path", &self.path)
            .field("kind", &self.kind)
            .field("geometry", &self.geometry)
            .finish_non_exhaustive()
    }
}

/// Opens a file on disk with the lock its access mode needs.
pub(crate) fn open_locked(path: &Path, writable: bool, shared: bool) -> Result<File> {
    let file = FsOpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let locked = if writable && !shared {
        file.try_lock()
    } else {
        file.try_lock_shared()
    };
    match locked {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(Error::Locked {
            path: path.to_owned(),
        }),
        Err(TryLockError::Error(e)) => Err(Error::io(path, e)),
    }
}

impl VhdxFile {
    /// Opens a file on disk.
    pub fn open(path: &Path, options: OpenOptions) -> Result<VhdxFile> {
        let file = open_locked(path, options.writable, options.shared_lock)?;
        VhdxFile::open_io(Arc::new(crate::io::DiskFile::new(file)), path, options)
    }

    /// Opens a file through any [`FileIo`]; `path` names it in errors and locates parents.
    pub fn open_io(io: Arc<dyn FileIo>, path: &Path, options: OpenOptions) -> Result<VhdxFile> {
        VhdxFile::open_inner(io, path, options, false).map(|(f, _)| f)
    }

    /// Opens a file whose blocks may lie (partly) past its end, as a truncated copy's do,
    /// for [`crate::check`]'s salvage: every such block, and every partially present
    /// block whose sector bitmap lies past the end, reads as zeros in the handle returned
    /// (its entry is `PAYLOAD_BLOCK_ZERO`; a sector-bitmap entry past the end is
    /// `SB_BLOCK_NOT_PRESENT`). Writable, those entries are dirty, so the next flush
    /// commits them through the log. Returns them, in block order.
    pub(crate) fn open_salvage(
        path: &Path,
        options: OpenOptions,
    ) -> Result<(VhdxFile, Vec<DroppedBlock>)> {
        let file = open_locked(path, options.writable, options.shared_lock)?;
        VhdxFile::open_inner(Arc::new(file), path, options, true)
    }

    /// [`VhdxFile::open_salvage`] through any [`FileIo`] (the crash tests' files).
    #[cfg(feature = "testing")]
    pub(crate) fn open_salvage_io(
        io: Arc<dyn FileIo>,
        path: &Path,
        options: OpenOptions,
    ) -> Result<(VhdxFile, Vec<DroppedBlock>)> {
        VhdxFile::open_inner(io, path, options, true)
    }

    fn open_inner(
        io: Arc<dyn FileIo>,
        path: &Path,
        options: OpenOptions,
        salvage: bool,
    ) -> Result<(VhdxFile, Vec<DroppedBlock>)> {
        let ioerr = |e| Error::io(path, e);
        let corrupt = |c| Error::corrupt(path, c);

        let mut ident = vec![0u8; FILE_IDENTIFIER_SIZE];
        io.read_at(&mut ident, 0).map_err(ioerr)?;
        let creator = parse_file_identifier(&ident).map_err(corrupt)?;

        let (header, current_slot) = read_current_header(io.as_ref()).map_err(|e| match e {
            HeaderReadError::Io(e) => ioerr(e),
            HeaderReadError::Corrupt(c) => corrupt(c),
        })?;
        header.validate_log_location().map_err(corrupt)?;

        let mut io = io;
        let mut header = header;
        let mut current_slot = current_slot;
        let mut replayed_log = false;
        let mut file_guid_done = false;
        if !header.log_guid.is_nil() && header.log_length != 0 {
            let seq = log::find_active_sequence(
                io.as_ref(),
                header.log_offset,
                u64::from(header.log_length),
                header.log_guid,
            )
            .map_err(ioerr)?;
            if u64::from(header.log_length) > log::MAX_LOG_LENGTH {
                return Err(corrupt(Corruption::LogTooLarge {
                    length: u64::from(header.log_length),
                }));
            }
            let seq = seq.ok_or_else(|| corrupt(log::no_sequence(header.log_guid)))?;
            validate_sequence(io.as_ref(), &seq).map_err(|e| match e {
                HeaderReadError::Io(e) => ioerr(e),
                HeaderReadError::Corrupt(c) => corrupt(c),
            })?;
            if options.writable {
                log::apply_in_place(io.as_ref(), &seq).map_err(ioerr)?;
                io.sync().map_err(ioerr)?;
                let mut h = header.clone();
                h.log_guid = Uuid::nil();
                h.file_write_guid = Uuid::new_v4();
                current_slot =
                    write_header_pair(io.as_ref(), &mut h, current_slot).map_err(ioerr)?;
                header = h;
                file_guid_done = true;
                tracing::info!(path = %path.display(), entries = seq.entries, sequence = seq.head_sequence, "replayed the vhdx log");
            } else {
                let overlay = ReplayOverlay::new(io, &seq).map_err(ioerr)?;
                io = Arc::new(overlay);
                tracing::debug!(path = %path.display(), "replayed the vhdx log in memory");
            }
            replayed_log = true;
        }

        let file_len = io.len().map_err(ioerr)?;
        let regions = read_region_table(io.as_ref()).map_err(|e| match e {
            HeaderReadError::Io(e) => ioerr(e),
            HeaderReadError::Corrupt(c) => corrupt(c),
        })?;
        for r in &regions.entries {
            if r.required && r.guid != BAT_REGION_GUID && r.guid != METADATA_REGION_GUID {
                return Err(corrupt(Corruption::UnknownRequiredRegion { guid: r.guid }));
            }
        }
        let bat_region = regions
            .find(BAT_REGION_GUID)
            .ok_or(corrupt(Corruption::MissingRegion { name: "bat" }))?
            .clone();
        let meta_region = regions
            .find(METADATA_REGION_GUID)
            .ok_or(corrupt(Corruption::MissingRegion { name: "metadata" }))?
            .clone();
        // Before anything is read from them: a file cut short reads zeros there, which
        // would be reported as a damaged structure rather than as the truncation it is.
        for (what, offset, length) in [
            ("the log", header.log_offset, u64::from(header.log_length)),
            (
                "the metadata region",
                meta_region.file_offset,
                u64::from(meta_region.length),
            ),
            (
                "the bat region",
                bat_region.file_offset,
                u64::from(bat_region.length),
            ),
        ] {
            if length > 0 && offset.checked_add(length).is_none_or(|e| e > file_len) {
                return Err(corrupt(Corruption::BeyondEndOfFile {
                    what,
                    offset,
                    length,
                    file_len,
                }));
            }
        }
        if u64::from(meta_region.length) < METADATA_TABLE_SIZE as u64
            || u64::from(meta_region.length) > 256 * MIB
        {
            return Err(corrupt(Corruption::BadMetadataTable {
                reason: "metadata region too small or too large",
            }));
        }

        // The table first, then only as far as its items reach.
        let region_len = u64::from(meta_region.length);
        let mut region_bytes = vec![0u8; METADATA_TABLE_SIZE];
        io.read_at(&mut region_bytes, meta_region.file_offset)
            .map_err(ioerr)?;
        let prefix = metadata_prefix_len(&region_bytes, region_len);
        if prefix > METADATA_TABLE_SIZE as u64 {
            region_bytes.resize(prefix as usize, 0);
            io.read_at(
                &mut region_bytes[METADATA_TABLE_SIZE..],
                meta_region.file_offset + METADATA_TABLE_SIZE as u64,
            )
            .map_err(ioerr)?;
        }
        let metadata = parse_metadata_prefix(&region_bytes, region_len).map_err(corrupt)?;
        let parsed = parse_known_metadata(&metadata).map_err(corrupt)?;
        let geometry = parsed.geometry;
        geometry.validate().map_err(corrupt)?;
        let kind = if parsed.params.has_parent {
            DiskKind::Differencing
        } else if parsed.params.leave_block_allocated {
            DiskKind::Fixed
        } else {
            DiskKind::Dynamic
        };
        let differencing = kind == DiskKind::Differencing;

        let entries = geometry.bat_entries(differencing);
        let need = entries * BAT_ENTRY_SIZE;
        if u64::from(bat_region.length) < need {
            return Err(corrupt(Corruption::BatTooSmall {
                have: u64::from(bat_region.length),
                need,
            }));
        }
        let bat = read_bat(io.as_ref(), bat_region.file_offset, entries).map_err(ioerr)?;
        let (dropped, changed) = if salvage {
            drop_blocks_beyond(&geometry, kind, &bat, file_len)
        } else {
            (Vec::new(), Vec::new())
        };
        let log_offset = header.log_offset;
        let log_length = u64::from(header.log_length);
        let structures_end = validate_layout(
            &geometry,
            kind,
            &bat,
            &regions.entries,
            log_offset,
            log_length,
            file_len,
        )
        .map_err(corrupt)?;

        let file = VhdxFile {
            path: path.to_owned(),
            io,
            writable: options.writable,
            geometry,
            kind,
            creator,
            virtual_disk_id: parsed.virtual_disk_id,
            log_offset,
            log_length,
            bat_offset: bat_region.file_offset,
            metadata_offset: meta_region.file_offset,
            metadata_length: u64::from(meta_region.length),
            regions: regions.entries,
            bat,
            bitmaps: RwLock::new(HashMap::new()),
            data_guid_done: AtomicBool::new(options.keep_data_write_guid),
            replayed_log,
            journal: Mutex::new(Journal {
                header,
                current_slot,
                file_guid_done,
                log_active: false,
                log_next: 0,
                log_sequence: 1,
            }),
            state: Mutex::new(State {
                data_guid_done: options.keep_data_write_guid,
                forced_data_write_guid: options.data_write_guid,
                // New space goes after everything: a last block may run past the end of
                // the file, and unknown regions may lie beyond it.
                file_end: file_len.max(structures_end).next_multiple_of(MIB),
                dirty_bat: BTreeSet::new(),
                dirty_bitmap: BTreeMap::new(),
                metadata,
                parent_locator: parsed.parent_locator,
                params: parsed.params,
                poisoned: false,
                closed: false,
            }),
        };
        file.load_bitmaps()?;
        if !changed.is_empty() {
            let mut st = file.lock();
            for index in changed {
                st.dirty_bat.insert(index * BAT_ENTRY_SIZE / SECTOR);
            }
        }
        Ok((file, dropped))
    }

    fn load_bitmaps(&self) -> Result<()> {
        if self.kind != DiskKind::Differencing {
            return Ok(());
        }
        let g = &self.geometry;
        let per_block = g.bitmap_bytes_per_block();
        let mut partial = Vec::new();
        self.for_each_block_entry(|block, e| {
            if e.state() == PAYLOAD_BLOCK_PARTIALLY_PRESENT {
                partial.push(block);
            }
        });
        let mut maps = self.bitmaps.write().unwrap();
        let mut chunk_buf: Option<(u64, Vec<u8>)> = None;
        for block in partial {
            let chunk = block / g.chunk_ratio();
            let sb = self.entry(g.bitmap_index(chunk));
            if sb.state() != SB_BLOCK_PRESENT {
                return Err(self.corrupt(Corruption::BadBatState {
                    index: g.payload_index(block),
                    state: PAYLOAD_BLOCK_PARTIALLY_PRESENT,
                }));
            }
            if chunk_buf.as_ref().is_none_or(|(c, _)| *c != chunk) {
                let mut buf = vec![0u8; SECTOR_BITMAP_BLOCK_SIZE as usize];
                self.io
                    .read_at(&mut buf, sb.file_offset())
                    .map_err(|e| self.ioerr(e))?;
                chunk_buf = Some((chunk, buf));
            }
            let (_, buf) = chunk_buf.as_ref().unwrap();
            let start = ((block % g.chunk_ratio()) * per_block) as usize;
            maps.insert(
                block,
                buf[start..start + per_block as usize]
                    .to_vec()
                    .into_boxed_slice(),
            );
        }
        Ok(())
    }

    /// Calls `f(block, entry)` for every payload block whose entry is not zero
    /// (`NOT_PRESENT` at offset 0), in block order. Costs what the BAT holds, not the
    /// number of blocks.
    pub fn for_each_block_entry(&self, mut f: impl FnMut(u64, BatEntry)) {
        let g = self.geometry;
        let ratio = g.chunk_ratio();
        let blocks = g.payload_blocks();
        self.bat.for_each_nonzero(|index, e| {
            if index % (ratio + 1) == ratio {
                return;
            }
            let block = index - index / (ratio + 1);
            if block < blocks {
                f(block, e);
            }
        });
    }

    /// Like [`VhdxFile::for_each_block_entry`], for blocks `[first, end)` only.
    pub fn for_each_block_entry_in(&self, first: u64, end: u64, mut f: impl FnMut(u64, BatEntry)) {
        let g = self.geometry;
        let ratio = g.chunk_ratio();
        let end = end.min(g.payload_blocks());
        if first >= end {
            return;
        }
        self.bat.for_each_nonzero_in(
            g.payload_index(first),
            g.payload_index(end - 1) + 1,
            |index, e| {
                if index % (ratio + 1) != ratio {
                    f(index - index / (ratio + 1), e);
                }
            },
        );
    }

    /// The first block after `block` whose BAT entry may be non-zero: the BAT keeps no
    /// leaf for long runs of `NOT_PRESENT` entries, and they are skipped whole.
    fn next_possible_block(&self, block: u64) -> u64 {
        let g = self.geometry;
        let next_index = self.bat.absent_until(g.payload_index(block));
        let ratio = g.chunk_ratio();
        // The first block whose payload index reaches `next_index`.
        let mut b = (next_index * ratio / (ratio + 1)).max(block + 1);
        while b > block + 1 && g.payload_index(b - 1) >= next_index {
            b -= 1;
        }
        while g.payload_index(b) < next_index {
            b += 1;
        }
        b
    }

    // ------------------------------------------------------------------------------------
    // Accessors
    // ------------------------------------------------------------------------------------

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The disk's sizes.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }
    /// Fixed, dynamic or differencing.
    pub fn kind(&self) -> DiskKind {
        self.kind
    }
    /// Whether the file was opened for writing.
    pub fn is_writable(&self) -> bool {
        self.writable
    }
    /// The creator string of the file type identifier.
    pub fn creator(&self) -> &str {
        &self.creator
    }
    /// The virtual disk id (shared by a chain).
    pub fn virtual_disk_id(&self) -> Uuid {
        self.virtual_disk_id
    }
    /// The current header.
    pub fn header(&self) -> Header {
        self.lock_journal().header.clone()
    }
    /// The DataWriteGuid children link to.
    pub fn data_write_guid(&self) -> Uuid {
        self.lock_journal().header.data_write_guid
    }
    /// Changes the DataWriteGuid of a writable file now, as its first guest-visible change
    /// would, and returns it: a child created from the open file afterwards keeps linking
    /// to it whatever is written before the file is closed (a live checkpoint prepares its
    /// new layers while the guest still writes).
    pub fn settle_data_write_guid(&self) -> Result<Uuid> {
        if self.writable {
            self.ensure_data_guid()?;
        }
        Ok(self.data_write_guid())
    }
    /// Whether opening replayed a log.
    pub fn replayed_log(&self) -> bool {
        self.replayed_log
    }
    /// The parent locator of a differencing file.
    pub fn parent_locator(&self) -> Option<ParentLocator> {
        self.lock().parent_locator.clone()
    }
    /// All metadata items.
    pub fn metadata_items(&self) -> Vec<MetadataItem> {
        self.lock().metadata.clone()
    }
    /// The region table entries.
    pub fn regions(&self) -> &[RegionEntry] {
        &self.regions
    }
    /// Log location (offset, length).
    pub fn log_location(&self) -> (u64, u64) {
        (self.log_offset, self.log_length)
    }
    /// BAT region offset.
    pub fn bat_offset(&self) -> u64 {
        self.bat_offset
    }
    /// Metadata region location (offset, length).
    pub fn metadata_location(&self) -> (u64, u64) {
        (self.metadata_offset, self.metadata_length)
    }
    /// Current length of the file in bytes.
    pub fn file_size(&self) -> Result<u64> {
        self.io.len().map_err(|e| self.ioerr(e))
    }
    /// The BAT entry at `index`.
    pub fn entry(&self, index: u64) -> BatEntry {
        self.bat.get(index)
    }
    /// Number of BAT entries in use.
    pub fn bat_len(&self) -> u64 {
        self.bat.len()
    }
    /// State and entry of payload block `block`.
    pub fn block_entry(&self, block: u64) -> BatEntry {
        self.entry(self.geometry.payload_index(block))
    }
    /// The sector bitmap of a partially present block.
    pub fn block_bitmap(&self, block: u64) -> Option<Box<[u8]>> {
        self.bitmaps.read().unwrap().get(&block).cloned()
    }
    /// Counts what the file stores.
    pub fn allocation(&self) -> Allocation {
        let g = &self.geometry;
        let mut a = Allocation::default();
        let sector = u64::from(g.logical_sector_size);
        let maps = self.bitmaps.read().unwrap();
        self.for_each_block_entry(|block, e| match e.state() {
            PAYLOAD_BLOCK_FULLY_PRESENT => {
                a.full_blocks += 1;
                a.stored_bytes += g.block_len(block);
            }
            PAYLOAD_BLOCK_PARTIALLY_PRESENT => {
                a.partial_blocks += 1;
                if let Some(bits) = maps.get(&block) {
                    let set: u64 = bits.iter().map(|b| u64::from(b.count_ones())).sum();
                    a.stored_bytes += (set * sector).min(g.block_len(block));
                }
            }
            PAYLOAD_BLOCK_ZERO
            | PAYLOAD_BLOCK_UNMAPPED
            | PAYLOAD_BLOCK_UNDEFINED
            | PAYLOAD_BLOCK_UNMAPPED_V095 => a.zero_blocks += 1,
            _ => {}
        });
        a
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn lock_journal(&self) -> MutexGuard<'_, Journal> {
        self.journal.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn poison(&self) {
        self.lock().poisoned = true;
    }
    fn ioerr(&self, e: std::io::Error) -> Error {
        Error::io(&self.path, e)
    }
    fn corrupt(&self, c: Corruption) -> Error {
        Error::corrupt(&self.path, c)
    }
    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.geometry.virtual_size;
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::OutOfRange { offset, len, size });
        }
        Ok(())
    }

    // ------------------------------------------------------------------------------------
    // Reads
    // ------------------------------------------------------------------------------------

    /// Resolves `[offset, offset + len)` of the virtual disk into segments, calling `visit`
    /// for each (adjacent segments of the same kind are merged).
    pub fn resolve(
        &self,
        offset: u64,
        len: u64,
        visit: &mut dyn FnMut(Segment) -> Result<()>,
    ) -> Result<()> {
        self.check_range(offset, len)?;
        let g = &self.geometry;
        let bs = u64::from(g.block_size);
        let sector = u64::from(g.logical_sector_size);
        let differencing = self.kind == DiskKind::Differencing;
        let mut pending: Option<Segment> = None;
        let mut emit = |seg: Segment, pending: &mut Option<Segment>| -> Result<()> {
            if let Some(p) = pending.as_mut() {
                match (p, seg) {
                    (
                        Segment::Data { file_offset, len },
                        Segment::Data {
                            file_offset: o,
                            len: l,
                        },
                    ) if *file_offset + *len == o => {
                        *len += l;
                        return Ok(());
                    }
                    (Segment::Zero { len }, Segment::Zero { len: l })
                    | (Segment::Parent { len }, Segment::Parent { len: l }) => {
                        *len += l;
                        return Ok(());
                    }
                    _ => {}
                }
            }
            if let Some(p) = pending.replace(seg) {
                visit(p)?;
            }
            Ok(())
        };
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let block = pos / bs;
            let in_block = pos % bs;
            let mut n = (end - pos).min(bs - in_block);
            let e = self.block_entry(block);
            if e.0 == 0 {
                // Blocks whose BAT page does not exist are all NOT_PRESENT: one segment.
                let next = self.next_possible_block(block);
                n = (end - pos).min(next * bs - pos);
            }
            match e.state() {
                PAYLOAD_BLOCK_FULLY_PRESENT => emit(
                    Segment::Data {
                        file_offset: e.file_offset() + in_block,
                        len: n,
                    },
                    &mut pending,
                )?,
                PAYLOAD_BLOCK_PARTIALLY_PRESENT if differencing => {
                    let maps = self.bitmaps.read().unwrap();
                    let bits = maps.get(&block);
                    let mut p = in_block;
                    let stop = in_block + n;
                    while p < stop {
                        let s = p / sector;
                        let present = bits.is_some_and(|b| bit(b, s));
                        // Extend over sectors with the same bit.
                        let mut q = (s + 1) * sector;
                        while q < stop && bits.is_some_and(|b| bit(b, q / sector)) == present {
                            q += sector;
                        }
                        let q = q.min(stop);
                        let seg = if present {
                            Segment::Data {
                                file_offset: e.file_offset() + p,
                                len: q - p,
                            }
                        } else {
                            Segment::Parent { len: q - p }
                        };
                        emit(seg, &mut pending)?;
                        p = q;
                    }
                }
                PAYLOAD_BLOCK_NOT_PRESENT if differencing => {
                    emit(Segment::Parent { len: n }, &mut pending)?
                }
                _ => emit(Segment::Zero { len: n }, &mut pending)?,
            }
            pos += n;
        }
        if let Some(p) = pending {
            visit(p)?;
        }
        Ok(())
    }

    /// Reads stored bytes at a file offset returned by [`VhdxFile::resolve`].
    pub fn read_stored(&self, buf: &mut [u8], file_offset: u64) -> Result<()> {
        self.io.read_at(buf, file_offset).map_err(|e| self.ioerr(e))
    }

    /// Reads the virtual disk as this file alone sees it; ranges it leaves to a parent read
    /// as zeros (use a [`crate::Chain`] to read through parents).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut at = 0usize;
        self.resolve(offset, buf.len() as u64, &mut |seg| {
            let n = seg.len() as usize;
            match seg {
                Segment::Data { file_offset, .. } => {
                    self.read_stored(&mut buf[at..at + n], file_offset)?
                }
                Segment::Zero { .. } | Segment::Parent { .. } => buf[at..at + n].fill(0),
            }
            at += n;
            Ok(())
        })
    }

    // ------------------------------------------------------------------------------------
    // Writes
    // ------------------------------------------------------------------------------------

    fn check_writable(&self) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly {
                path: self.path.clone(),
            });
        }
        Ok(())
    }

    fn check_sector_aligned(&self, offset: u64, len: u64) -> Result<()> {
        let sector = u64::from(self.geometry.logical_sector_size);
        if self.kind == DiskKind::Differencing
            && (!offset.is_multiple_of(sector) || !len.is_multiple_of(sector))
        {
            return Err(Error::Unaligned {
                offset,
                len,
                sector_size: self.geometry.logical_sector_size,
            });
        }
        Ok(())
    }

    /// Changes the DataWriteGuid (once per session) before the first guest-visible change.
    fn ensure_data_guid(&self) -> Result<()> {
        if self.data_guid_done.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut journal = self.lock_journal();
        let guid = {
            let st = self.lock();
            self.check_poisoned(&st)?;
            (!st.data_guid_done).then(|| st.forced_data_write_guid.unwrap_or_else(Uuid::new_v4))
        };
        if let Some(guid) = guid {
            self.update_header(&mut journal, |h| h.data_write_guid = guid)?;
            self.lock().data_guid_done = true;
        }
        self.data_guid_done.store(true, Ordering::Release);
        Ok(())
    }

    fn check_poisoned(&self, st: &State) -> Result<()> {
        if st.poisoned || st.closed {
            return Err(Error::Poisoned {
                path: self.path.clone(),
            });
        }
        Ok(())
    }

    /// Writes guest data. Newly allocated blocks are recorded in memory and committed
    /// through the log by the next [`VhdxFile::flush`]: as with any disk with a volatile
    /// write cache, only flushed writes survive a crash.
    ///
    /// In a differencing file writes must cover whole logical sectors: the sector bitmap
    /// marks whole sectors, and this file cannot read its parent to fill the rest
    /// ([`crate::Chain`] does that for unaligned writes).
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_with(buf, offset, false)
    }

    /// [`VhdxFile::write_at`] for data that will not be read back soon (a merge's copy):
    /// it may bypass the page cache ([`FileIo::write_uncached_at`]). Same durability:
    /// durable after the next [`VhdxFile::flush`].
    pub fn write_uncached_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_with(buf, offset, true)
    }

    fn write_with(&self, buf: &[u8], offset: u64, uncached: bool) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, buf.len() as u64)?;
        self.check_sector_aligned(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.ensure_data_guid()?;
        let bs = u64::from(self.geometry.block_size);
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let block = pos / bs;
            let in_block = pos % bs;
            let n = ((bs - in_block) as usize).min(buf.len() - done);
            self.write_in_block(block, in_block, &buf[done..done + n], uncached)?;
            done += n;
        }
        Ok(())
    }

    fn write_in_block(&self, block: u64, in_block: u64, data: &[u8], uncached: bool) -> Result<()> {
        let g = self.geometry;
        let index = g.payload_index(block);
        let write_data = |at: u64| {
            if uncached {
                self.io.write_uncached_at(data, at)
            } else {
                self.io.write_at(data, at)
            }
            .map_err(|e| self.ioerr(e))
        };
        loop {
            let e = self.entry(index);
            match e.state() {
                PAYLOAD_BLOCK_FULLY_PRESENT => {
                    return write_data(e.file_offset() + in_block);
                }
                PAYLOAD_BLOCK_PARTIALLY_PRESENT => {
                    write_data(e.file_offset() + in_block)?;
                    let mut st = self.lock();
                    self.check_poisoned(&st)?;
                    // A whole-block discard may have remapped the block meanwhile: then
                    // write again against the current mapping.
                    if self.entry(index) != e {
                        continue;
                    }
                    self.set_bits(&mut st, block, in_block, data.len() as u64);
                    return Ok(());
                }
                _ => {
                    let mut st = self.lock();
                    self.check_poisoned(&st)?;
                    if self.entry(index) != e {
                        continue;
                    }
                    return self.allocate_and_write(
                        &mut st,
                        block,
                        in_block,
                        data.len() as u64,
                        e,
                        write_data,
                    );
                }
            }
        }
    }

    fn allocate_and_write(
        &self,
        st: &mut State,
        block: u64,
        in_block: u64,
        data_len: u64,
        old: BatEntry,
        write_data: impl Fn(u64) -> Result<()>,
    ) -> Result<()> {
        let g = self.geometry;
        let whole = in_block == 0 && data_len == g.block_len(block);
        let partial_in_parent =
            self.kind == DiskKind::Differencing && old.state() == PAYLOAD_BLOCK_NOT_PRESENT;
        if partial_in_parent && !whole {
            self.ensure_bitmap_block(st, block / g.chunk_ratio())?;
        }
        let offset = self.allocate(st, u64::from(g.block_size))?;
        write_data(offset + in_block)?;
        if partial_in_parent && !whole {
            {
                let mut maps = self.bitmaps.write().unwrap();
                // Start from a clear bitmap: stale bits of an earlier life of the block must
                // not make parent sectors look present.
                maps.insert(
                    block,
                    vec![0u8; g.bitmap_bytes_per_block() as usize].into_boxed_slice(),
                );
            }
            self.mark_bitmap_dirty(st, block, 0, g.bitmap_bytes_per_block());
            self.set_entry(
                st,
                g.payload_index(block),
                BatEntry::new(PAYLOAD_BLOCK_PARTIALLY_PRESENT, offset),
            );
            self.set_bits(st, block, in_block, data_len);
        } else {
            // Fresh space reads as zeros, which is what the rest of a ZERO or NOT_PRESENT
            // block of a non-differencing file must read as.
            self.set_entry(
                st,
                g.payload_index(block),
                BatEntry::new(PAYLOAD_BLOCK_FULLY_PRESENT, offset),
            );
        }
        Ok(())
    }

    /// Grows the file once so that the next `blocks` block allocations need not each grow
    /// it (a merge knows how many it will make). What stays unused after a crash is a leak
    /// at the end of the file, as after any interrupted allocation; repair trims it.
    pub fn reserve_blocks(&self, blocks: u64) -> Result<()> {
        self.check_writable()?;
        let st = self.lock();
        self.check_poisoned(&st)?;
        let end = st.file_end + blocks * u64::from(self.geometry.block_size);
        let cur = self.io.len().map_err(|e| self.ioerr(e))?;
        if cur < end {
            self.io.set_len(end).map_err(|e| self.ioerr(e))?;
        }
        Ok(())
    }

    /// Reserves `len` bytes at the end of the file (1 MiB aligned) and extends the file.
    fn allocate(&self, st: &mut State, len: u64) -> Result<u64> {
        let offset = st.file_end;
        let end = offset + len;
        let cur = self.io.len().map_err(|e| self.ioerr(e))?;
        if cur < end {
            self.io.set_len(end).map_err(|e| self.ioerr(e))?;
        }
        st.file_end = end;
        Ok(offset)
    }

    fn ensure_bitmap_block(&self, st: &mut State, chunk: u64) -> Result<()> {
        let index = self.geometry.bitmap_index(chunk);
        if self.entry(index).state() == SB_BLOCK_PRESENT {
            return Ok(());
        }
        let offset = self.allocate(st, SECTOR_BITMAP_BLOCK_SIZE)?;
        self.set_entry(st, index, BatEntry::new(SB_BLOCK_PRESENT, offset));
        Ok(())
    }

    fn set_entry(&self, st: &mut State, index: u64, entry: BatEntry) {
        self.bat.set(index, entry);
        st.dirty_bat.insert(index * BAT_ENTRY_SIZE / SECTOR);
    }

    fn set_bits(&self, st: &mut State, block: u64, in_block: u64, len: u64) {
        let g = self.geometry;
        let sector = u64::from(g.logical_sector_size);
        let first = in_block / sector;
        let last = (in_block + len).div_ceil(sector);
        let full = {
            let mut maps = self.bitmaps.write().unwrap();
            let bits = maps
                .entry(block)
                .or_insert_with(|| vec![0u8; g.bitmap_bytes_per_block() as usize].into());
            for s in first..last {
                bits[(s / 8) as usize] |= 1 << (s % 8);
            }
            let valid = g.block_len(block).div_ceil(sector);
            (0..valid).all(|s| bit(bits, s))
        };
        self.mark_bitmap_dirty(st, block, first / 8, (last - 1) / 8 + 1);
        if full {
            let e = self.block_entry(block);
            self.set_entry(
                st,
                g.payload_index(block),
                BatEntry::new(PAYLOAD_BLOCK_FULLY_PRESENT, e.file_offset()),
            );
        }
    }

    /// Marks bytes `[from, to)` of a block's bitmap slice dirty.
    fn mark_bitmap_dirty(&self, st: &mut State, block: u64, from: u64, to: u64) {
        let g = self.geometry;
        let chunk = block / g.chunk_ratio();
        let sb = self.entry(g.bitmap_index(chunk));
        let base = sb.file_offset() + (block % g.chunk_ratio()) * g.bitmap_bytes_per_block();
        let first = (base + from) / SECTOR;
        let last = (base + to - 1) / SECTOR;
        for s in first..=last {
            st.dirty_bitmap.insert(s * SECTOR, chunk);
        }
    }

    /// Makes a range read as zeros (discard and write-zeroes). Whole blocks become ZERO
    /// blocks (their space is no longer used); partial ranges are written with zeros. In a
    /// differencing file a zeroed range never reads the parent's data.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        self.check_sector_aligned(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.ensure_data_guid()?;
        let g = self.geometry;
        let bs = u64::from(g.block_size);
        let differencing = self.kind == DiskKind::Differencing;
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let block = pos / bs;
            let in_block = pos % bs;
            let n = (end - pos).min(bs - in_block);
            let e = self.block_entry(block);
            let whole = in_block == 0 && n == g.block_len(block);
            let state = e.state();
            let reads_zero = matches!(
                state,
                PAYLOAD_BLOCK_ZERO
                    | PAYLOAD_BLOCK_UNMAPPED
                    | PAYLOAD_BLOCK_UNDEFINED
                    | PAYLOAD_BLOCK_UNMAPPED_V095
            ) || (state == PAYLOAD_BLOCK_NOT_PRESENT && !differencing);
            if reads_zero {
                // Already zero.
            } else if whole && self.kind != DiskKind::Fixed {
                let mut st = self.lock();
                self.check_poisoned(&st)?;
                self.set_entry(
                    &mut st,
                    g.payload_index(block),
                    BatEntry::new(PAYLOAD_BLOCK_ZERO, 0),
                );
            } else {
                let zeros = vec![0u8; n as usize];
                self.write_in_block(block, in_block, &zeros, false)?;
            }
            pos += n;
        }
        Ok(())
    }

    /// Hands the blocks `[first, end)` of a differencing file back to its parent, whose
    /// data for them the caller has made durable and equal to what this file reads there
    /// (an into-parent merge that has flushed those blocks into the parent). Each block
    /// the file stores becomes `NOT_PRESENT`, so reads go to the parent; the change is
    /// committed and made durable, and only then is the blocks' space punched out of the
    /// file. A crash before the commit leaves the blocks stored and intact; after it, they
    /// read the parent, which holds the same data. What the file reads through its chain
    /// is unchanged, so its DataWriteGuid is too. Returns the bytes given back.
    pub fn release_to_parent(&self, first: u64, end: u64) -> Result<u64> {
        self.check_writable()?;
        if self.kind != DiskKind::Differencing {
            return Err(Error::Unsupported {
                path: self.path.clone(),
                reason: "only a differencing file can hand blocks back to a parent".into(),
            });
        }
        let g = self.geometry;
        let bs = u64::from(g.block_size);
        let mut stored = Vec::new();
        self.for_each_block_entry_in(first, end, |block, e| {
            if matches!(
                e.state(),
                PAYLOAD_BLOCK_FULLY_PRESENT | PAYLOAD_BLOCK_PARTIALLY_PRESENT
            ) {
                stored.push((block, e.file_offset()));
            }
        });
        if stored.is_empty() {
            return Ok(0);
        }
        {
            let mut st = self.lock();
            self.check_poisoned(&st)?;
            let mut maps = self.bitmaps.write().unwrap();
            for &(block, _) in &stored {
                self.set_entry(
                    &mut st,
                    g.payload_index(block),
                    BatEntry::new(PAYLOAD_BLOCK_NOT_PRESENT, 0),
                );
                maps.remove(&block);
            }
        }
        self.flush()?;
        // Adjacent blocks in one call: fewer, larger discards.
        let mut offsets: Vec<u64> = stored.iter().map(|&(_, offset)| offset).collect();
        offsets.sort_unstable();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for offset in offsets {
            match runs.last_mut() {
                Some((start, len)) if *start + *len == offset => *len += bs,
                _ => runs.push((offset, bs)),
            }
        }
        for (offset, len) in runs {
            self.io.punch_hole(offset, len).map_err(|e| self.ioerr(e))?;
        }
        Ok(stored.len() as u64 * bs)
    }

    /// How many bytes of `[offset, offset + len)` of the file hold space on disk.
    pub(crate) fn stored_bytes(&self, offset: u64, len: u64) -> Result<u64> {
        self.io.stored_bytes(offset, len).map_err(|e| self.ioerr(e))
    }

    /// Makes every write so far durable, then commits pending metadata through the log.
    ///
    /// Writers are not held up: the dirty BAT and bitmap sectors are copied under the
    /// state lock, then the data is synced and the copies committed without it. Blocks
    /// allocated meanwhile stay dirty for the next flush.
    pub fn flush(&self) -> Result<()> {
        if !self.writable {
            return self.check_poisoned(&self.lock());
        }
        let mut journal = self.lock_journal();
        self.flush_with(&mut journal)
    }

    /// The flush itself; any failure poisons the handle, because the dirty sets were
    /// taken and a later flush must not report success.
    fn flush_with(&self, journal: &mut Journal) -> Result<()> {
        let result = self.flush_inner(journal);
        if result.is_err() {
            self.poison();
        }
        result
    }

    fn flush_inner(&self, journal: &mut Journal) -> Result<()> {
        let (sectors, durable_len) = {
            let mut st = self.lock();
            self.check_poisoned(&st)?;
            // Every block in the copies had its data written before this point, so the
            // sync below covers it; so does the file length read now.
            let len = self.io.len().map_err(|e| self.ioerr(e))?;
            (self.snapshot_dirty(&mut st)?, len)
        };
        self.io.sync().map_err(|e| self.ioerr(e))?;
        if sectors.is_empty() {
            return Ok(());
        }
        self.commit(journal, &sectors, durable_len)
    }

    /// Takes the dirty sets and builds the sectors to commit, ordered so that every
    /// prefix is a valid file: a large flush spans several log entries, and a crash
    /// between two of them leaves only the first ones applied. Bitmap sectors come first
    /// (nothing reads them until a PARTIALLY_PRESENT entry points there), then BAT sectors
    /// from the highest down, because a chunk's sector-bitmap entry has the highest index
    /// of its chunk and must be committed no later than the payload entries that need it.
    fn snapshot_dirty(&self, st: &mut State) -> Result<Vec<(u64, Vec<u8>)>> {
        let mut sectors: Vec<(u64, Vec<u8>)> = Vec::new();
        let bitmap_sectors = std::mem::take(&mut st.dirty_bitmap);
        for (s, chunk) in bitmap_sectors {
            sectors.push((s, self.bitmap_sector(s, chunk)?));
        }
        let bat_sectors = std::mem::take(&mut st.dirty_bat);
        for s in bat_sectors.into_iter().rev() {
            let mut buf = vec![0u8; LOG_SECTOR_SIZE];
            let first = s * SECTOR / BAT_ENTRY_SIZE;
            let n = (SECTOR / BAT_ENTRY_SIZE).min(self.bat_len() - first);
            for i in 0..n {
                put_u64(&mut buf, (i * 8) as usize, self.entry(first + i).0);
            }
            if n < SECTOR / BAT_ENTRY_SIZE {
                // Entries past the ones we use (a larger BAT region) keep their bytes.
                let mut disk = vec![0u8; LOG_SECTOR_SIZE];
                self.io
                    .read_at(&mut disk, self.bat_offset + s * SECTOR)
                    .map_err(|e| self.ioerr(e))?;
                buf[(n * 8) as usize..].copy_from_slice(&disk[(n * 8) as usize..]);
            }
            sectors.push((self.bat_offset + s * SECTOR, buf));
        }
        Ok(sectors)
    }

    /// Builds the current contents of the bitmap sector at file offset `s`, which lies in
    /// the sector-bitmap block of `chunk`.
    fn bitmap_sector(&self, s: u64, chunk: u64) -> Result<Vec<u8>> {
        let g = self.geometry;
        let mut buf = vec![0u8; LOG_SECTOR_SIZE];
        self.io.read_at(&mut buf, s).map_err(|e| self.ioerr(e))?;
        let per_block = g.bitmap_bytes_per_block();
        let maps = self.bitmaps.read().unwrap();
        let sb = self.entry(g.bitmap_index(chunk));
        debug_assert!(
            sb.state() == SB_BLOCK_PRESENT
                && s >= sb.file_offset()
                && s < sb.file_offset() + SECTOR_BITMAP_BLOCK_SIZE
        );
        let in_sb = s - sb.file_offset();
        let first_block = chunk * g.chunk_ratio() + in_sb / per_block;
        let last_block = chunk * g.chunk_ratio() + (in_sb + SECTOR - 1) / per_block;
        for block in first_block..=last_block {
            let Some(bits) = maps.get(&block) else {
                continue;
            };
            let slice_start = (block % g.chunk_ratio()) * per_block;
            let s0 = slice_start.max(in_sb);
            let s1 = (slice_start + per_block).min(in_sb + SECTOR);
            if s0 < s1 {
                buf[(s0 - in_sb) as usize..(s1 - in_sb) as usize].copy_from_slice(
                    &bits[(s0 - slice_start) as usize..(s1 - slice_start) as usize],
                );
            }
        }
        Ok(buf)
    }

    /// Writes `sectors` (4 KiB each, at their final file offsets) through the log: entry,
    /// sync, apply, sync, in entries of at most half the ring.
    /// `durable_len` is a file length known to be durable (read before the last sync).
    fn commit(
        &self,
        journal: &mut Journal,
        sectors: &[(u64, Vec<u8>)],
        durable_len: u64,
    ) -> Result<()> {
        let ioerr = |e| self.ioerr(e);
        if self.log_length == 0 {
            return Err(Error::Unsupported {
                path: self.path.clone(),
                reason: "the file has no log, so its metadata cannot be changed safely".into(),
            });
        }
        let per_entry = log::max_sectors_per_entry(self.log_length).max(1);
        let j = journal;
        let groups = sectors.len().div_ceil(per_entry);
        for (n, group) in sectors.chunks(per_entry).enumerate() {
            let first_entry = !j.log_active;
            let log_guid = if first_entry {
                Uuid::new_v4()
            } else {
                j.header.log_guid
            };
            if first_entry {
                j.log_next = 0;
            }
            let refs: Vec<(u64, &[u8])> = group.iter().map(|(o, d)| (*o, d.as_slice())).collect();
            let file_len = self.io.len().map_err(ioerr)?;
            let file_end = self.lock().file_end;
            let entry = log::build_entry(
                &refs,
                j.log_next,
                j.log_sequence,
                log_guid,
                durable_len / MIB * MIB,
                file_end.max(file_len).next_multiple_of(MIB),
            );
            self.write_ring(j.log_next, &entry)?;
            self.io.sync().map_err(ioerr)?;
            if first_entry {
                // The entry becomes replayable only once the header names its log GUID.
                self.update_header(j, |h| h.log_guid = log_guid)?;
                j.log_active = true;
            }
            for (offset, data) in group {
                self.io.write_at(data, *offset).map_err(ioerr)?;
            }
            // A replay applies only the newest entry, so an entry's writes must be durable
            // before the next entry is written. Between the entries of one commit that
            // takes a sync here; after the last one, the sync that starts every commit
            // (and precedes every header change) does it, so a commit costs one sync less.
            if n + 1 < groups {
                self.io.sync().map_err(ioerr)?;
            }
            j.log_next = (j.log_next + entry.len() as u64) % self.log_length;
            j.log_sequence += 1;
        }
        Ok(())
    }

    fn write_ring(&self, at: u64, entry: &[u8]) -> Result<()> {
        let first = (self.log_length - at).min(entry.len() as u64) as usize;
        self.io
            .write_at(&entry[..first], self.log_offset + at)
            .map_err(|e| self.ioerr(e))?;
        if first < entry.len() {
            self.io
                .write_at(&entry[first..], self.log_offset)
                .map_err(|e| self.ioerr(e))?;
        }
        Ok(())
    }

    /// Writes a new header into both slots (the non-current one first), changing the
    /// FileWriteGuid on the session's first update.
    fn update_header(&self, j: &mut Journal, change: impl FnOnce(&mut Header)) -> Result<()> {
        let mut h = j.header.clone();
        change(&mut h);
        if !j.file_guid_done {
            h.file_write_guid = Uuid::new_v4();
        }
        match write_header_pair(self.io.as_ref(), &mut h, j.current_slot) {
            Ok(slot) => {
                j.current_slot = slot;
                j.header = h;
                j.file_guid_done = true;
                Ok(())
            }
            Err(e) => {
                self.poison();
                Err(self.ioerr(e))
            }
        }
    }

    // ------------------------------------------------------------------------------------
    // Metadata changes (used by merge and convert)
    // ------------------------------------------------------------------------------------

    /// Rewrites the metadata region with `items` through the log (one entry).
    fn commit_metadata(&self, j: &mut Journal, items: Vec<MetadataItem>) -> Result<()> {
        let new = encode_metadata_region(&items, self.metadata_length as usize)
            .map_err(|c| self.corrupt(c))?;
        let mut old = vec![0u8; self.metadata_length as usize];
        self.io
            .read_at(&mut old, self.metadata_offset)
            .map_err(|e| self.ioerr(e))?;
        let sectors: Vec<(u64, Vec<u8>)> = new
            .chunks(LOG_SECTOR_SIZE)
            .zip(old.chunks(LOG_SECTOR_SIZE))
            .enumerate()
            .filter(|(_, (n, o))| n != o)
            .map(|(i, (n, _))| (self.metadata_offset + i as u64 * SECTOR, n.to_vec()))
            .collect();
        if sectors.len() > log::max_sectors_per_entry(self.log_length) {
            return Err(Error::Unsupported {
                path: self.path.clone(),
                reason: "metadata change too large for one log entry".into(),
            });
        }
        let result = self
            .io
            .len()
            .and_then(|len| self.io.sync().map(|()| len))
            .map_err(|e| self.ioerr(e))
            .and_then(|len| self.commit(j, &sectors, len));
        if result.is_err() {
            self.poison();
        }
        result?;
        self.lock().metadata = parse_metadata_region(&new).map_err(|c| self.corrupt(c))?;
        Ok(())
    }

    /// Replaces the parent locator (the file must be differencing). Atomic: one log entry.
    pub fn set_parent_locator(&self, locator: &ParentLocator) -> Result<()> {
        self.check_writable()?;
        let mut j = self.lock_journal();
        let items = {
            let st = self.lock();
            self.check_poisoned(&st)?;
            if !st.params.has_parent {
                return Err(Error::Unsupported {
                    path: self.path.clone(),
                    reason: "not a differencing file".into(),
                });
            }
            let data = locator.encode();
            let mut items = st.metadata.clone();
            match items
                .iter_mut()
                .find(|m| m.id == PARENT_LOCATOR_GUID && !m.is_user())
            {
                Some(item) => item.data = data,
                None => items.push(MetadataItem {
                    id: PARENT_LOCATOR_GUID,
                    flags: METADATA_FLAG_IS_REQUIRED,
                    offset: 0,
                    data,
                }),
            }
            items
        };
        // Pending BAT changes go first so that the locator never points past them.
        self.flush_with(&mut j)?;
        self.commit_metadata(&mut j, items)?;
        self.lock().parent_locator = Some(locator.clone());
        Ok(())
    }

    /// Turns a differencing file whose every sector is stored (no block reads its parent)
    /// into a dynamic file: sector-bitmap entries are cleared, then one log entry drops
    /// HasParent and the parent locator.
    ///
    /// Consumes and closes the handle: it was opened as a differencing file, and writes
    /// through it afterwards would use differencing states in a dynamic file.
    pub fn detach_from_parent(self) -> Result<()> {
        self.check_writable()?;
        let mut j = self.lock_journal();
        let g = self.geometry;
        {
            let mut st = self.lock();
            self.check_poisoned(&st)?;
            let mut partial = None;
            self.for_each_block_entry(|block, e| {
                if e.state() == PAYLOAD_BLOCK_PARTIALLY_PRESENT {
                    partial.get_or_insert(block);
                }
            });
            if let Some(block) = partial {
                return Err(Error::Unsupported {
                    path: self.path.clone(),
                    reason: format!("block {block} still reads from the parent"),
                });
            }
            let ratio = g.chunk_ratio();
            let mut present = Vec::new();
            self.bat.for_each_nonzero(|index, e| {
                if index % (ratio + 1) == ratio && e.state() != SB_BLOCK_NOT_PRESENT {
                    present.push(index);
                }
            });
            for index in present {
                self.set_entry(&mut st, index, BatEntry(0));
            }
        }
        self.flush_with(&mut j)?;
        let (params, items) = {
            let st = self.lock();
            let mut params = st.params;
            params.has_parent = false;
            params.leave_block_allocated = false;
            let mut items: Vec<MetadataItem> = st
                .metadata
                .iter()
                .filter(|m| m.id != PARENT_LOCATOR_GUID || m.is_user())
                .cloned()
                .collect();
            for item in items.iter_mut() {
                if item.id == FILE_PARAMETERS_GUID && !item.is_user() {
                    item.data = params.encode();
                }
            }
            (params, items)
        };
        self.commit_metadata(&mut j, items)?;
        {
            let mut st = self.lock();
            st.params = params;
            st.parent_locator = None;
        }
        drop(j);
        self.close()
    }

    /// Byte ranges of the file used by structures (header section, log, regions, allocated
    /// blocks), unsorted. Entries past the last payload block are ignored, as at open.
    pub fn used_spans(&self) -> Vec<(u64, u64)> {
        let g = self.geometry;
        let mut spans = vec![(0, HEADER_SECTION_SIZE)];
        let mut push = |start: u64, len: u64| {
            if let Some(end) = start.checked_add(len) {
                spans.push((start, end));
            }
        };
        if self.log_length > 0 {
            push(self.log_offset, self.log_length);
        }
        for r in &self.regions {
            push(r.file_offset, u64::from(r.length));
        }
        let ratio = g.chunk_ratio();
        self.bat.for_each_nonzero(|index, e| {
            if index % (ratio + 1) == ratio {
                if e.state() == SB_BLOCK_PRESENT {
                    push(e.file_offset(), SECTOR_BITMAP_BLOCK_SIZE);
                }
                return;
            }
            let block = index - index / (ratio + 1);
            if block < g.payload_blocks()
                && matches!(
                    e.state(),
                    PAYLOAD_BLOCK_FULLY_PRESENT | PAYLOAD_BLOCK_PARTIALLY_PRESENT
                )
            {
                push(e.file_offset(), u64::from(g.block_size));
            }
        });
        spans
    }

    /// Truncates unused space after the last structure (never below the header section,
    /// log, regions, or any block the in-memory BAT points at, including blocks allocated
    /// in this session). Returns bytes removed.
    pub fn trim_unused_tail(&self) -> Result<u64> {
        self.check_writable()?;
        let mut journal = self.lock_journal();
        let st = self.lock();
        self.check_poisoned(&st)?;
        let end = self
            .used_spans()
            .iter()
            .map(|s| s.1)
            .max()
            .unwrap_or(HEADER_SECTION_SIZE)
            .next_multiple_of(MIB);
        let len = self.io.len().map_err(|e| self.ioerr(e))?;
        if len <= end {
            return Ok(0);
        }
        // Log entries record the durable length; truncating below it while the header
        // still names the log would make the file unopenable after a crash.
        drop(st);
        self.flush_with(&mut journal)?;
        if journal.log_active {
            self.update_header(&mut journal, |h| h.log_guid = Uuid::nil())?;
            journal.log_active = false;
        }
        let mut st = self.lock();
        self.io.set_len(end).map_err(|e| self.ioerr(e))?;
        self.io.sync().map_err(|e| self.ioerr(e))?;
        st.file_end = end;
        Ok(len - end)
    }

    /// Writes both header copies again (after one was found damaged).
    pub fn rewrite_headers(&self) -> Result<()> {
        self.check_writable()?;
        let mut j = self.lock_journal();
        self.check_poisoned(&self.lock())?;
        self.update_header(&mut j, |_| {})
    }

    /// Rewrites both region table copies from `table`, through the log.
    pub fn rewrite_region_tables(&self, table: &RegionTable) -> Result<()> {
        self.check_writable()?;
        let bytes = table.encode();
        let mut j = self.lock_journal();
        self.check_poisoned(&self.lock())?;
        let sectors: Vec<(u64, Vec<u8>)> = REGION_TABLE_OFFSETS
            .iter()
            .flat_map(|&o| {
                bytes
                    .chunks(LOG_SECTOR_SIZE)
                    .enumerate()
                    .map(move |(i, c)| (o + i as u64 * SECTOR, c.to_vec()))
            })
            .collect();
        let result = self
            .io
            .len()
            .and_then(|len| self.io.sync().map(|()| len))
            .map_err(|e| self.ioerr(e))
            .and_then(|len| self.commit(&mut j, &sectors, len));
        if result.is_err() {
            self.poison();
        }
        result
    }

    /// Closes the file: flushes, and clears the LogGuid so other tools can open it.
    pub fn close(self) -> Result<()> {
        self.close_inner()
    }

    fn close_inner(&self) -> Result<()> {
        let mut j = self.lock_journal();
        {
            let mut st = self.lock();
            if st.closed || !self.writable {
                st.closed = true;
                return Ok(());
            }
            if st.poisoned {
                st.closed = true;
                return Err(Error::Poisoned {
                    path: self.path.clone(),
                });
            }
        }
        let result = self.flush_with(&mut j).and_then(|()| {
            if j.log_active {
                self.update_header(&mut j, |h| h.log_guid = Uuid::nil())?;
                j.log_active = false;
            }
            Ok(())
        });
        self.lock().closed = true;
        result
    }
}

impl Drop for VhdxFile {
    fn drop(&mut self) {
        if let Err(e) = self.close_inner() {
            tracing::warn!(path = %self.path.display(), error = &e as &dyn std::error::Error, "closing vhdx file failed");
        }
    }
}

fn bit(bits: &[u8], sector: u64) -> bool {
    bits.get((sector / 8) as usize)
        .is_some_and(|b| b & (1 << (sector % 8)) != 0)
}

enum HeaderReadError {
    Io(std::io::Error),
    Corrupt(Corruption),
}

impl From<std::io::Error> for HeaderReadError {
    fn from(e: std::io::Error) -> Self {
        HeaderReadError::Io(e)
    }
}
impl From<Corruption> for HeaderReadError {
    fn from(c: Corruption) -> Self {
        HeaderReadError::Corrupt(c)
    }
}

/// Reads both header slots and picks the current one (MS-VHDX 2.2.2.1).
fn read_current_header(io: &dyn FileIo) -> Result<(Header, usize), HeaderReadError> {
    let mut parsed = [None, None];
    for (i, off) in HEADER_OFFSETS.iter().enumerate() {
        let mut buf = vec![0u8; HEADER_SIZE];
        io.read_at(&mut buf, *off)?;
        parsed[i] = Header::parse(&buf).ok();
    }
    match parsed {
        [Some(a), Some(b)] => {
            if a.sequence_number > b.sequence_number {
                Ok((a, 0))
            } else if b.sequence_number > a.sequence_number {
                Ok((b, 1))
            } else if a == b {
                // Disk2VHD writes two identical headers; QEMU accepts them, so do we.
                Ok((a, 0))
            } else {
                Err(Corruption::HeaderSequenceConflict {
                    sequence_number: a.sequence_number,
                }
                .into())
            }
        }
        [Some(a), None] => Ok((a, 0)),
        [None, Some(b)] => Ok((b, 1)),
        [None, None] => Err(Corruption::NoValidHeader.into()),
    }
}

/// Writes `h` twice (sequence + 1 into the non-current slot, then + 2 into the other),
/// syncing after each. Returns the slot now current.
fn write_header_pair(io: &dyn FileIo, h: &mut Header, current: usize) -> std::io::Result<usize> {
    let mut slot = current;
    for _ in 0..2 {
        h.sequence_number = h
            .sequence_number
            .checked_add(1)
            .ok_or_else(|| std::io::Error::other("header sequence number exhausted"))?;
        slot = 1 - slot;
        io.write_at(&h.encode(), HEADER_OFFSETS[slot])?;
        io.sync()?;
    }
    Ok(slot)
}

fn read_region_table(io: &dyn FileIo) -> Result<RegionTable, HeaderReadError> {
    let mut first_error = None;
    for off in REGION_TABLE_OFFSETS {
        let mut buf = vec![0u8; REGION_TABLE_SIZE];
        io.read_at(&mut buf, off)?;
        match RegionTable::parse(&buf) {
            Ok(t) => return Ok(t),
            Err(c) => {
                first_error.get_or_insert(c);
            }
        }
    }
    Err(first_error.unwrap().into())
}

fn validate_sequence(io: &dyn FileIo, seq: &ActiveSequence) -> Result<(), HeaderReadError> {
    let len = io.len()?;
    if len < seq.flushed_file_offset {
        return Err(Corruption::LogTruncatedFile {
            len,
            flushed: seq.flushed_file_offset,
        }
        .into());
    }
    for w in &seq.writes {
        let offset = match w {
            log::LogWrite::Sector { file_offset, .. } | log::LogWrite::Zero { file_offset, .. } => {
                *file_offset
            }
        };
        // The log must never touch the file identifier or the headers (it is found
        // through them); region tables at 192 KiB and later are fair game.
        if offset < REGION_TABLE_OFFSETS[0] {
            return Err(Corruption::LogBadTarget { offset }.into());
        }
    }
    Ok(())
}

pub(crate) struct KnownMetadata {
    pub geometry: Geometry,
    pub params: FileParameters,
    pub virtual_disk_id: Uuid,
    pub parent_locator: Option<ParentLocator>,
}

pub(crate) fn parse_known_metadata(items: &[MetadataItem]) -> Result<KnownMetadata, Corruption> {
    let find = |id: Uuid, item: &'static str| {
        items
            .iter()
            .find(|m| m.id == id && !m.is_user())
            .ok_or(Corruption::MissingMetadataItem { item })
    };
    for m in items {
        let known = !m.is_user()
            && [
                FILE_PARAMETERS_GUID,
                VIRTUAL_DISK_SIZE_GUID,
                VIRTUAL_DISK_ID_GUID,
                LOGICAL_SECTOR_SIZE_GUID,
                PHYSICAL_SECTOR_SIZE_GUID,
                PARENT_LOCATOR_GUID,
            ]
            .contains(&m.id);
        if !known && m.is_required() {
            return Err(Corruption::UnknownRequiredMetadata { id: m.id });
        }
    }
    let params = FileParameters::parse(&find(FILE_PARAMETERS_GUID, "file parameters")?.data)?;
    let virtual_size = parse_u64_item(
        &find(VIRTUAL_DISK_SIZE_GUID, "virtual disk size")?.data,
        "virtual disk size",
    )?;
    let virtual_disk_id = parse_guid_item(
        &find(VIRTUAL_DISK_ID_GUID, "virtual disk id")?.data,
        "virtual disk id",
    )?;
    let logical = parse_u32_item(
        &find(LOGICAL_SECTOR_SIZE_GUID, "logical sector size")?.data,
        "logical sector size",
    )?;
    let physical = parse_u32_item(
        &find(PHYSICAL_SECTOR_SIZE_GUID, "physical sector size")?.data,
        "physical sector size",
    )?;
    let parent_locator = if params.has_parent {
        Some(ParentLocator::parse(
            &find(PARENT_LOCATOR_GUID, "parent locator")?.data,
        )?)
    } else {
        None
    };
    Ok(KnownMetadata {
        geometry: Geometry {
            virtual_size,
            block_size: params.block_size,
            logical_sector_size: logical,
            physical_sector_size: physical,
        },
        params,
        virtual_disk_id,
        parent_locator,
    })
}

/// Checks BAT states, and that no two objects of the file overlap and every block lies
/// inside the file. Returns the end of the last structure.
/// A payload block [`VhdxFile::open_salvage`] dropped: its data (or its sector bitmap)
/// lay past the end of the file, and it reads as zeros now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DroppedBlock {
    /// The payload block.
    pub block: u64,
    /// Its entry before (state and file offset).
    pub was: BatEntry,
    /// Whether its data lay inside the file and only its chunk's sector bitmap did not.
    pub bitmap_only: bool,
}

/// Changes, in `bat`, every entry whose data lies (partly) at or past `file_len` (see
/// [`VhdxFile::open_salvage`]); returns the payload blocks dropped and the indices of
/// every entry changed.
fn drop_blocks_beyond(
    g: &Geometry,
    kind: DiskKind,
    bat: &Bat,
    file_len: u64,
) -> (Vec<DroppedBlock>, Vec<u64>) {
    let differencing = kind == DiskKind::Differencing;
    let ratio = g.chunk_ratio();
    let payload_blocks = g.payload_blocks();
    let mut lost_bitmaps = BTreeSet::new();
    let mut payload = Vec::new();
    bat.for_each_nonzero(|index, e| {
        if index % (ratio + 1) == ratio {
            if differencing
                && e.state() == SB_BLOCK_PRESENT
                && e.file_offset() >= HEADER_SECTION_SIZE
                && e.file_offset().saturating_add(SECTOR_BITMAP_BLOCK_SIZE) > file_len
            {
                lost_bitmaps.insert(index / (ratio + 1));
            }
            return;
        }
        let block = index - index / (ratio + 1);
        if block < payload_blocks {
            payload.push((block, e));
        }
    });
    let mut dropped = Vec::new();
    for (block, e) in payload {
        let stored = matches!(
            e.state(),
            PAYLOAD_BLOCK_FULLY_PRESENT | PAYLOAD_BLOCK_PARTIALLY_PRESENT
        );
        if !stored || e.file_offset() < HEADER_SECTION_SIZE {
            // Not stored, or damage of another kind that validation reports as it is.
            continue;
        }
        let beyond = e.file_offset().saturating_add(g.block_len(block)) > file_len;
        let chunk = block / ratio;
        let bitmap_lost =
            e.state() == PAYLOAD_BLOCK_PARTIALLY_PRESENT && lost_bitmaps.contains(&chunk);
        if beyond || bitmap_lost {
            dropped.push(DroppedBlock {
                block,
                was: e,
                bitmap_only: !beyond,
            });
        }
    }
    // Dropped blocks read as zeros whatever the kind of file: in a differencing file,
    // falling back to the parent would mix an older point in time in silently.
    let mut changed = Vec::new();
    for chunk in &lost_bitmaps {
        let index = g.bitmap_index(*chunk);
        bat.set(index, BatEntry::new(SB_BLOCK_NOT_PRESENT, 0));
        changed.push(index);
    }
    for d in &dropped {
        let index = g.payload_index(d.block);
        bat.set(index, BatEntry::new(PAYLOAD_BLOCK_ZERO, 0));
        changed.push(index);
    }
    (dropped, changed)
}

fn validate_layout(
    g: &Geometry,
    kind: DiskKind,
    bat: &Bat,
    regions: &[RegionEntry],
    log_offset: u64,
    log_length: u64,
    file_len: u64,
) -> Result<u64, Corruption> {
    let differencing = kind == DiskKind::Differencing;
    let chunk_ratio = g.chunk_ratio();
    let bs = u64::from(g.block_size);
    // (start, end, what): what = u64::MAX - k for fixed structures, else BAT index.
    let mut spans: Vec<(u64, u64, u64)> = Vec::new();
    const HEADER_SECTION: u64 = u64::MAX;
    const LOG: u64 = u64::MAX - 1;
    spans.push((0, HEADER_SECTION_SIZE, HEADER_SECTION));
    // The log and the regions this engine reads and writes must lie inside the file, or
    // their commits would write at whatever offset a damaged header or table names.
    let inside =
        |offset: u64, length: u64| offset.checked_add(length).is_some_and(|e| e <= file_len);
    if log_length > 0 {
        if !inside(log_offset, log_length) {
            return Err(Corruption::BeyondEndOfFile {
                what: "the log",
                offset: log_offset,
                length: log_length,
                file_len,
            });
        }
        spans.push((log_offset, log_offset + log_length, LOG));
    }
    for (i, r) in regions.iter().enumerate() {
        let length = u64::from(r.length);
        if !inside(r.file_offset, length) {
            return Err(Corruption::BeyondEndOfFile {
                what: if r.guid == BAT_REGION_GUID {
                    "the bat region"
                } else if r.guid == METADATA_REGION_GUID {
                    "the metadata region"
                } else {
                    "a region"
                },
                offset: r.file_offset,
                length,
                file_len,
            });
        }
        spans.push((
            r.file_offset,
            r.file_offset.saturating_add(length),
            u64::MAX - 2 - i as u64,
        ));
    }
    let payload_blocks = g.payload_blocks();
    let mut bad: Option<Corruption> = None;
    bat.for_each_nonzero(|index, e| {
        if bad.is_some() {
            return;
        }
        let is_bitmap = index % (chunk_ratio + 1) == chunk_ratio;
        let state = e.state();
        if is_bitmap {
            match state {
                SB_BLOCK_NOT_PRESENT => return,
                SB_BLOCK_PRESENT if differencing => {}
                _ => {
                    bad = Some(Corruption::BadBatState { index, state });
                    return;
                }
            }
            // The whole bitmap block: a bitmap cut short would read its missing sectors
            // as not present, and the parent's older data would show through silently.
            if e.file_offset().saturating_add(SECTOR_BITMAP_BLOCK_SIZE) > file_len {
                bad = Some(Corruption::BlockBeyondEnd {
                    index,
                    offset: e.file_offset(),
                    file_len,
                });
                return;
            }
            if e.file_offset() < HEADER_SECTION_SIZE {
                bad = Some(Corruption::BlockOutOfBounds {
                    index,
                    offset: e.file_offset(),
                });
                return;
            }
            spans.push((
                e.file_offset(),
                e.file_offset() + SECTOR_BITMAP_BLOCK_SIZE,
                index,
            ));
            return;
        }
        let block = index - index / (chunk_ratio + 1);
        if block >= payload_blocks {
            return;
        }
        match state {
            PAYLOAD_BLOCK_NOT_PRESENT
            | PAYLOAD_BLOCK_UNDEFINED
            | PAYLOAD_BLOCK_ZERO
            | PAYLOAD_BLOCK_UNMAPPED
            | PAYLOAD_BLOCK_UNMAPPED_V095 => return,
            PAYLOAD_BLOCK_FULLY_PRESENT => {}
            PAYLOAD_BLOCK_PARTIALLY_PRESENT if differencing => {
                let sb = bat.get(block / chunk_ratio * (chunk_ratio + 1) + chunk_ratio);
                if sb.state() != SB_BLOCK_PRESENT {
                    bad = Some(Corruption::BadBatState { index, state });
                    return;
                }
            }
            _ => {
                bad = Some(Corruption::BadBatState { index, state });
                return;
            }
        }
        let start = e.file_offset();
        let last = block + 1 == payload_blocks;
        if start >= HEADER_SECTION_SIZE && (start >= file_len || (!last && start + bs > file_len)) {
            bad = Some(Corruption::BlockBeyondEnd {
                index,
                offset: start,
                file_len,
            });
            return;
        }
        if start < HEADER_SECTION_SIZE {
            bad = Some(Corruption::BlockOutOfBounds {
                index,
                offset: start,
            });
            return;
        }
        spans.push((start, start + bs, index));
    });
    if let Some(c) = bad {
        return Err(c);
    }
    spans.sort_unstable();
    let describe = |what: u64| -> String {
        match what {
            HEADER_SECTION => "the header section".into(),
            LOG => "the log".into(),
            w if w >= u64::MAX - 2 - regions.len() as u64 => {
                let r = &regions[(u64::MAX - 2 - w) as usize];
                format!("region {}", r.guid)
            }
            w => format!("the block of bat entry {w}"),
        }
    };
    for pair in spans.windows(2) {
        if pair[1].0 < pair[0].1 {
            return Err(Corruption::Overlap {
                first: describe(pair[0].2),
                second: describe(pair[1].2),
            });
        }
    }
    Ok(spans.iter().map(|s| s.1).max().unwrap_or(0))
}

/// Reads the BAT region's stored parts into a sparse [`Bat`] of `entries` entries: holes
/// of a sparse file are never read, and pages with no non-zero entry are not kept.
fn read_bat(io: &dyn FileIo, bat_offset: u64, entries: u64) -> std::io::Result<Bat> {
    const PAGE_BYTES: u64 = PAGE_ENTRIES * BAT_ENTRY_SIZE;
    const READ_BYTES: u64 = 4 * MIB;
    let bat = Bat::new(entries);
    let need = entries * BAT_ENTRY_SIZE;
    let mut buf = Vec::new();
    for (start, len) in io.data_extents(bat_offset, need)? {
        // Whole pages, relative to the region's start.
        let mut rel = (start - bat_offset) / PAGE_BYTES * PAGE_BYTES;
        let rel_end = (start + len - bat_offset).min(need);
        while rel < rel_end {
            let n = (rel_end - rel)
                .min(READ_BYTES)
                .next_multiple_of(PAGE_BYTES)
                .min(need - rel);
            buf.resize(n as usize, 0);
            io.read_at(&mut buf, bat_offset + rel)?;
            bat.load(rel / BAT_ENTRY_SIZE, &buf);
            rel += n;
        }
    }
    Ok(bat)
}
