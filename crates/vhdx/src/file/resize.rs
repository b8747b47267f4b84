//! Changing a file's virtual size (Hyper-V's `Resize-VHD`), crash-safe through the log.
//!
//! Growing: the BAT entries the new blocks use are made zero (or, in a fixed file, point
//! at newly reserved space), the old last block's tail past the old end is zeroed when it
//! was short, and one commit writes those BAT sectors and the new virtual size. When the
//! BAT region is too small for the new size, a larger copy of the BAT is written at the
//! end of the file first, and the same commit switches both region tables to it: a crash
//! before the commit leaves the old file (plus unused space), after it the new one.
//!
//! Shrinking: refused while any byte past the new end is non-zero. Blocks wholly past the
//! new end are cleared first (they read zeros either way), then the size is committed, so
//! a later grow can never bring old data back.
//!
//! Differencing files are refused: a child must have its parent's size (a chain opens
//! only when they agree), so the chain is resized by merging it first and resizing the
//! result. The DataWriteGuid changes, as for any change the guest would see.

use super::*;

/// What [`VhdxFile::resize`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResizeOutcome {
    /// The virtual size before.
    pub old_size: u64,
    /// The virtual size now.
    pub new_size: u64,
    /// Whether the BAT region was too small and moved to a larger place at the end.
    pub bat_moved: bool,
}

/// Resizes the VHDX file at `path` to `new_size` bytes; see [`VhdxFile::resize`].
pub fn resize(path: &Path, new_size: u64) -> Result<ResizeOutcome> {
    let file = VhdxFile::open(
        path,
        OpenOptions {
            writable: true,
            ..OpenOptions::default()
        },
    )?;
    let outcome = file.resize(new_size)?;
    if outcome.old_size > outcome.new_size {
        // Blocks past the new end of a fixed file are free now; give them back where they
        // end the file.
        let file = VhdxFile::open(
            path,
            OpenOptions {
                writable: true,
                keep_data_write_guid: true,
                ..OpenOptions::default()
            },
        )?;
        file.trim_unused_tail()?;
        file.close()?;
    }
    Ok(outcome)
}

impl VhdxFile {
    /// Changes the virtual size to `new_size` and closes the file (its layout changes,
    /// so the handle cannot go on).
    pub fn resize(self, new_size: u64) -> Result<ResizeOutcome> {
        self.check_writable()?;
        let old = self.geometry;
        if self.kind == DiskKind::Differencing {
            return Err(Error::Unsupported {
                path: self.path.clone(),
                reason: "a differencing file always has its parent's size; merge it first, \
                         or resize the base file while it has no children"
                    .into(),
            });
        }
        let new = Geometry {
            virtual_size: new_size,
            ..old
        };
        if new.validate().is_err() {
            return Err(Error::InvalidParameters(format!(
                "the size must be a multiple of the {}-byte logical sector, from {} bytes to \
                 64 TiB ({new_size} bytes was asked)",
                old.logical_sector_size, old.logical_sector_size
            )));
        }
        let outcome = ResizeOutcome {
            old_size: old.virtual_size,
            new_size,
            bat_moved: false,
        };
        if new_size == old.virtual_size {
            self.close()?;
            return Ok(outcome);
        }
        if new_size < old.virtual_size {
            self.refuse_data_beyond(new_size)?;
        }
        self.ensure_data_guid()?;
        let mut j = self.lock_journal();
        self.flush_with(&mut j)?;
        let result = self.resize_locked(&mut j, old, new);
        if result.is_err() {
            // Nothing half-done may be committed by a close; the next open replays or
            // discards the log.
            let mut st = self.lock();
            st.poisoned = true;
            st.closed = true;
        }
        let bat_moved = result?;
        drop(j);
        self.close()?;
        Ok(ResizeOutcome {
            bat_moved,
            ..outcome
        })
    }

    /// Fails when any byte in `[new_size, virtual size)` is not zero, saying how many.
    fn refuse_data_beyond(&self, new_size: u64) -> Result<()> {
        let g = self.geometry;
        let bs = u64::from(g.block_size);
        let sector = u64::from(g.logical_sector_size);
        let mut present = Vec::new();
        self.for_each_block_entry_in(new_size / bs, g.payload_blocks(), |block, e| {
            if e.state() == PAYLOAD_BLOCK_FULLY_PRESENT {
                present.push(block);
            }
        });
        let (mut bytes, mut first) = (0u64, None);
        let mut buf = vec![0u8; MIB as usize];
        for block in present {
            let start = (block * bs).max(new_size);
            let end = block * bs + g.block_len(block);
            let mut at = start;
            while at < end {
                let n = (end - at).min(MIB) as usize;
                self.read_at(&mut buf[..n], at)?;
                for (i, s) in buf[..n].chunks(sector as usize).enumerate() {
                    if s.iter().any(|&b| b != 0) {
                        bytes += sector;
                        first.get_or_insert(at + i as u64 * sector);
                    }
                }
                at += n as u64;
            }
        }
        match first {
            None => Ok(()),
            Some(first) => Err(Error::DataBeyondEnd {
                path: self.path.clone(),
                bytes,
                first,
                size: new_size,
            }),
        }
    }

    /// The resize under the journal lock, pending changes already committed. Returns
    /// whether the BAT moved.
    fn resize_locked(&self, j: &mut Journal, old: Geometry, new: Geometry) -> Result<bool> {
        let ioerr = |e| self.ioerr(e);
        let bs = u64::from(old.block_size);
        let old_entries = old.bat_entries(false);
        let new_entries = new.bat_entries(false);
        let bat_region = self
            .regions
            .iter()
            .find(|r| r.guid == BAT_REGION_GUID)
            .cloned()
            .expect("validated at open");
        let mut sectors: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut bat_moved = false;
        if new.virtual_size < old.virtual_size {
            // Entries past the new end go, so that a later grow finds them zero.
            let mut st = self.lock();
            let mut clear = Vec::new();
            self.bat.for_each_nonzero(|index, _| {
                if index >= new_entries {
                    clear.push(index);
                }
            });
            for index in clear {
                self.set_entry(&mut st, index, BatEntry(0));
            }
            sectors = self.snapshot_dirty(&mut st)?;
        } else {
            // The entries the new blocks use, from their bytes on disk (a larger BAT region
            // keeps bytes past the entries in use, which must not be trusted to be zero).
            let mut table = vec![0u8; (new_entries * BAT_ENTRY_SIZE) as usize];
            let on_disk = (u64::from(bat_region.length) / BAT_ENTRY_SIZE).min(new_entries);
            self.io
                .read_at(
                    &mut table[..(on_disk * BAT_ENTRY_SIZE) as usize],
                    bat_region.file_offset,
                )
                .map_err(ioerr)?;
            for index in old_entries..new_entries {
                put_u64(&mut table, (index * BAT_ENTRY_SIZE) as usize, 0);
            }
            for index in 0..old_entries.min(new_entries) {
                put_u64(
                    &mut table,
                    (index * BAT_ENTRY_SIZE) as usize,
                    self.entry(index).0,
                );
            }
            // A short last block gets its whole length now: what lies past the old end
            // in its space was never written by a guest and need not be zero.
            let last = old.payload_blocks() - 1;
            let tail = old.virtual_size % bs;
            let e = self.block_entry(last);
            if tail != 0 && e.state() == PAYLOAD_BLOCK_FULLY_PRESENT {
                let end = (new.virtual_size - last * bs).min(bs);
                let zeros = vec![0u8; (end - tail) as usize];
                self.io
                    .write_at(&zeros, e.file_offset() + tail)
                    .map_err(ioerr)?;
            }
            if self.kind == DiskKind::Fixed {
                let first_new = old.payload_blocks();
                let count = new.payload_blocks() - first_new;
                let offset = {
                    let mut st = self.lock();
                    self.allocate(&mut st, count * bs)?
                };
                preallocate_file(&self.path, offset, count * bs)?;
                for i in 0..count {
                    let e = BatEntry::new(PAYLOAD_BLOCK_FULLY_PRESENT, offset + i * bs);
                    put_u64(
                        &mut table,
                        (new.payload_index(first_new + i) * BAT_ENTRY_SIZE) as usize,
                        e.0,
                    );
                }
            }
            if new_entries * BAT_ENTRY_SIZE <= u64::from(bat_region.length) {
                let first_sector = old_entries.min(new_entries) * BAT_ENTRY_SIZE / SECTOR;
                let last_sector = (new_entries * BAT_ENTRY_SIZE).div_ceil(SECTOR);
                for s in first_sector..last_sector {
                    let at = bat_region.file_offset + s * SECTOR;
                    let mut disk = vec![0u8; LOG_SECTOR_SIZE];
                    self.io.read_at(&mut disk, at).map_err(ioerr)?;
                    let lo = (s * SECTOR) as usize;
                    let hi = (lo + LOG_SECTOR_SIZE).min(table.len());
                    let mut sector = disk.clone();
                    sector[..hi - lo].copy_from_slice(&table[lo..hi]);
                    if sector != disk {
                        sectors.push((at, sector));
                    }
                }
            } else {
                // The BAT moves to the end of the file; it is not in use until the
                // region tables name it, so it is written directly.
                let length = (new_entries * BAT_ENTRY_SIZE).next_multiple_of(MIB);
                let length32 = u32::try_from(length).map_err(|_| {
                    Error::InvalidParameters(format!(
                        "{} bytes is too large for this file's {} MiB blocks",
                        new.virtual_size,
                        bs / MIB
                    ))
                })?;
                let offset = {
                    let mut st = self.lock();
                    self.allocate(&mut st, length)?
                };
                table.resize(length as usize, 0);
                self.io.write_at(&table, offset).map_err(ioerr)?;
                let regions: Vec<RegionEntry> = self
                    .regions
                    .iter()
                    .map(|r| {
                        let mut r = r.clone();
                        if r.guid == BAT_REGION_GUID {
                            r.file_offset = offset;
                            r.length = length32;
                        }
                        r
                    })
                    .collect();
                let bytes = RegionTable { entries: regions }.encode();
                for o in REGION_TABLE_OFFSETS {
                    for (i, c) in bytes.chunks(LOG_SECTOR_SIZE).enumerate() {
                        sectors.push((o + i as u64 * SECTOR, c.to_vec()));
                    }
                }
                bat_moved = true;
            }
        }
        // The size goes last: every prefix of a commit that spans several log entries is
        // then a valid file of the old size.
        let items: Vec<MetadataItem> = self
            .lock()
            .metadata
            .iter()
            .cloned()
            .map(|mut m| {
                if m.id == VIRTUAL_DISK_SIZE_GUID && !m.is_user() {
                    m.data = new.virtual_size.to_le_bytes().to_vec();
                }
                m
            })
            .collect();
        let encoded = encode_metadata_region(&items, self.metadata_length as usize)
            .map_err(|c| self.corrupt(c))?;
        let mut current = vec![0u8; self.metadata_length as usize];
        self.io
            .read_at(&mut current, self.metadata_offset)
            .map_err(ioerr)?;
        for (i, (n, o)) in encoded
            .chunks(LOG_SECTOR_SIZE)
            .zip(current.chunks(LOG_SECTOR_SIZE))
            .enumerate()
        {
            if n != o {
                sectors.push((self.metadata_offset + i as u64 * SECTOR, n.to_vec()));
            }
        }
        let len = self.io.len().map_err(ioerr)?;
        self.io.sync().map_err(ioerr)?;
        self.commit(j, &sectors, len)?;
        Ok(bat_moved)
    }
}

/// Reserves `[offset, offset + len)` on the file system, as a fixed file's creation does.
fn preallocate_file(path: &Path, offset: u64, len: u64) -> Result<()> {
    let f = FsOpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    crate::create::preallocate(&f, offset, len).map_err(|e| Error::io(path, e))
}
