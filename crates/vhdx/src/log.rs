//! The VHDX metadata log: finding the active sequence, replaying it, and writing entries.
//!
//! Every change to the BAT, the sector bitmaps and the metadata region goes through the
//! log (payload data never does). Writing follows the simple, idempotent scheme: each entry
//! is its own sequence (its tail is its own offset), is written and made durable, then its
//! sectors are written to their final places and made durable, before the next entry. A crash
//! can therefore only leave the newest entry unapplied, and replaying any already-applied
//! entry again is harmless.
//!
//! Entries are at most half the ring long and are placed right after the previous one, so a
//! new entry never overwrites the newest complete one: after a torn write of entry `n + 1`
//! the active sequence is still entry `n`.

use crate::error::Corruption;
use crate::format::{
    LOG_DESCRIPTOR_SIZE, LOG_ENTRY_HEADER_SIZE, LOG_SECTOR_SIZE, LogDescriptor, LogEntryHeader,
    checksum_with_zeroed_field, encode_log_data_sector, le_u32, log_descriptor_sectors, put_u32,
};
use crate::io::FileIo;
use std::collections::BTreeMap;
use std::io;
use uuid::Uuid;

const SECTOR: u64 = LOG_SECTOR_SIZE as u64;
/// Logs larger than this are refused rather than read into memory.
pub const MAX_LOG_LENGTH: u64 = 256 << 20;
/// No descriptor may target beyond this offset: no valid file is larger than its largest
/// virtual size plus its metadata. Bounds what a hostile log can make a replay write.
const MAX_TARGET: u64 = 2 * crate::format::MAX_VIRTUAL_SIZE;
/// A zero descriptor clears at most one largest block.
const MAX_ZERO_LENGTH: u64 = crate::format::MAX_BLOCK_SIZE as u64;

/// One change a replay makes to the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogWrite {
    /// Write one 4 KiB sector.
    Sector {
        /// Target offset (4 KiB aligned).
        file_offset: u64,
        /// The sector's new bytes.
        data: Box<[u8; LOG_SECTOR_SIZE]>,
    },
    /// Zero a range.
    Zero {
        /// Target offset (4 KiB aligned).
        file_offset: u64,
        /// Bytes to zero (4 KiB multiple).
        length: u64,
    },
}

/// The active sequence of a log: what a replay must write, in order.
#[derive(Debug, Clone)]
pub struct ActiveSequence {
    /// Writes of every entry from the tail to the head, in order.
    pub writes: Vec<LogWrite>,
    /// The head entry's flushed file offset.
    pub flushed_file_offset: u64,
    /// The head entry's last file offset.
    pub last_file_offset: u64,
    /// The head entry's sequence number.
    pub head_sequence: u64,
    /// Number of entries in the sequence.
    pub entries: usize,
}

struct ParsedEntry {
    header: LogEntryHeader,
    writes: Vec<LogWrite>,
}

/// Reads the log ring and finds its active sequence for `log_guid` (MS-VHDX 2.3.3).
/// Returns `Ok(None)` when the log has nothing for that GUID.
pub fn find_active_sequence(
    io: &dyn FileIo,
    log_offset: u64,
    log_length: u64,
    log_guid: Uuid,
) -> Result<Option<ActiveSequence>, io::Error> {
    if log_length == 0 || log_length > MAX_LOG_LENGTH {
        return Ok(None);
    }
    let mut ring = vec![0u8; log_length as usize];
    io.read_at(&mut ring, log_offset)?;
    Ok(scan_ring(&ring, log_guid))
}

fn scan_ring(ring: &[u8], log_guid: Uuid) -> Option<ActiveSequence> {
    let len = ring.len() as u64;
    let mut candidate: Option<(Vec<ParsedEntry>, u64)> = None;
    let mut cur_tail = 0u64;
    let mut old_tail = 0u64;
    loop {
        let mut run: Vec<(u64, ParsedEntry)> = Vec::new();
        let mut at = cur_tail;
        while let Some(entry) = parse_entry(ring, at, log_guid) {
            if let Some((_, last)) = run.last()
                && entry.header.sequence_number != last.header.sequence_number + 1
            {
                break;
            }
            let next = (at + u64::from(entry.header.entry_length)) % len;
            run.push((at, entry));
            at = next;
            if run.len() as u64 > len / SECTOR {
                break;
            }
        }
        let valid = run.last().is_some_and(|(_, head)| {
            run.iter()
                .any(|(offset, _)| *offset == u64::from(head.header.tail))
        });
        if valid {
            let (_, head) = run.last().unwrap();
            let head_seq = head.header.sequence_number;
            if candidate.as_ref().is_none_or(|(_, seq)| head_seq > *seq) {
                let tail = u64::from(head.header.tail);
                let start = run.iter().position(|(o, _)| *o == tail).unwrap();
                let entries: Vec<ParsedEntry> =
                    run.into_iter().skip(start).map(|(_, e)| e).collect();
                candidate = Some((entries, head_seq));
            }
            cur_tail = at;
        } else {
            cur_tail = (cur_tail + SECTOR) % len;
        }
        if cur_tail <= old_tail {
            break;
        }
        old_tail = cur_tail;
    }
    let (entries, head_sequence) = candidate?;
    let head = &entries.last()?.header;
    Some(ActiveSequence {
        flushed_file_offset: head.flushed_file_offset,
        last_file_offset: head.last_file_offset,
        head_sequence,
        entries: entries.len(),
        writes: entries.into_iter().flat_map(|e| e.writes).collect(),
    })
}

/// Reads `len` bytes of the ring from `at`, wrapping at the end.
fn ring_bytes(ring: &[u8], at: u64, len: u64) -> Vec<u8> {
    let ring_len = ring.len() as u64;
    let mut out = Vec::with_capacity(len as usize);
    let mut pos = at % ring_len;
    let mut left = len;
    while left > 0 {
        let take = left.min(ring_len - pos);
        out.extend_from_slice(&ring[pos as usize..(pos + take) as usize]);
        left -= take;
        pos = (pos + take) % ring_len;
    }
    out
}

fn parse_entry(ring: &[u8], at: u64, log_guid: Uuid) -> Option<ParsedEntry> {
    let ring_len = ring.len() as u64;
    let first = ring_bytes(ring, at, SECTOR);
    let header = LogEntryHeader::parse(&first)?;
    let entry_len = u64::from(header.entry_length);
    if entry_len == 0
        || entry_len % SECTOR != 0
        || entry_len > ring_len
        || header.sequence_number == 0
        || header.log_guid != log_guid
        || u64::from(header.tail) % SECTOR != 0
        || u64::from(header.tail) >= ring_len
    {
        return None;
    }
    // Descriptors must fit in the entry; this also bounds the count before any arithmetic.
    if u64::from(header.descriptor_count) * LOG_DESCRIPTOR_SIZE as u64
        > entry_len - LOG_ENTRY_HEADER_SIZE as u64
    {
        return None;
    }
    let desc_sectors = u64::from(log_descriptor_sectors(header.descriptor_count));
    let entry = ring_bytes(ring, at, entry_len);
    if checksum_with_zeroed_field(&entry, 4) != le_u32(&entry, 4) {
        return None;
    }
    let descriptors: Vec<LogDescriptor> = (0..header.descriptor_count as usize)
        .map(|i| {
            let off = LOG_ENTRY_HEADER_SIZE + i * LOG_DESCRIPTOR_SIZE;
            entry
                .get(off..off + LOG_DESCRIPTOR_SIZE)
                .and_then(LogDescriptor::parse)
        })
        .collect::<Option<_>>()?;
    let data_count = descriptors
        .iter()
        .filter(|d| matches!(d, LogDescriptor::Data { .. }))
        .count() as u64;
    if entry_len != (desc_sectors + data_count) * SECTOR {
        return None;
    }
    let mut writes = Vec::with_capacity(descriptors.len());
    let mut data_index = 0u64;
    for d in descriptors {
        match d {
            LogDescriptor::Data {
                trailing,
                leading,
                file_offset,
                sequence_number,
            } => {
                if sequence_number != header.sequence_number
                    || file_offset % SECTOR != 0
                    || file_offset > MAX_TARGET
                {
                    return None;
                }
                let start = ((desc_sectors + data_index) * SECTOR) as usize;
                let sector = &entry[start..start + LOG_SECTOR_SIZE];
                let seq_high = le_u32(sector, 4);
                let seq_low = le_u32(sector, 4092);
                if &sector[..4] != crate::format::LOG_DATA_SECTOR_SIGNATURE
                    || u64::from(seq_high) << 32 | u64::from(seq_low) != header.sequence_number
                {
                    return None;
                }
                let mut data = Box::new([0u8; LOG_SECTOR_SIZE]);
                data[..8].copy_from_slice(&leading);
                data[8..4092].copy_from_slice(&sector[8..4092]);
                data[4092..].copy_from_slice(&trailing);
                writes.push(LogWrite::Sector { file_offset, data });
                data_index += 1;
            }
            LogDescriptor::Zero {
                zero_length,
                file_offset,
                sequence_number,
            } => {
                if sequence_number != header.sequence_number
                    || file_offset % SECTOR != 0
                    || zero_length % SECTOR != 0
                    || zero_length > MAX_ZERO_LENGTH
                    || file_offset > MAX_TARGET
                {
                    return None;
                }
                writes.push(LogWrite::Zero {
                    file_offset,
                    length: zero_length,
                });
            }
        }
    }
    Some(ParsedEntry { header, writes })
}

/// Applies a sequence's writes to a file in place (without syncing).
pub fn apply_in_place(io: &dyn FileIo, seq: &ActiveSequence) -> io::Result<()> {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    for w in &seq.writes {
        match w {
            LogWrite::Sector { file_offset, data } => io.write_at(&data[..], *file_offset)?,
            LogWrite::Zero {
                file_offset,
                length,
            } => {
                let mut done = 0;
                while done < *length {
                    let n = (*length - done).min(ZEROS.len() as u64);
                    io.write_at(&ZEROS[..n as usize], file_offset + done)?;
                    done += n;
                }
            }
        }
    }
    if io.len()? < seq.last_file_offset {
        io.set_len(seq.last_file_offset)?;
    }
    Ok(())
}

/// A read-only view of a file with a log replayed in memory (the file is never written).
#[derive(Debug)]
pub struct ReplayOverlay<F> {
    inner: F,
    sectors: BTreeMap<u64, Box<[u8; LOG_SECTOR_SIZE]>>,
    zeros: Vec<(u64, u64)>,
    len: u64,
}

impl<F: FileIo> ReplayOverlay<F> {
    /// Builds the overlay for a sequence.
    pub fn new(inner: F, seq: &ActiveSequence) -> io::Result<ReplayOverlay<F>> {
        let mut sectors = BTreeMap::new();
        let mut zeros: Vec<(u64, u64)> = Vec::new();
        let mut len = inner.len()?.max(seq.last_file_offset);
        for w in &seq.writes {
            match w {
                LogWrite::Sector { file_offset, data } => {
                    sectors.insert(*file_offset, data.clone());
                    len = len.max(file_offset + SECTOR);
                }
                LogWrite::Zero {
                    file_offset,
                    length,
                } => {
                    // A later zero range hides earlier sectors it covers.
                    let end = file_offset + length;
                    let hidden: Vec<u64> =
                        sectors.range(*file_offset..end).map(|(k, _)| *k).collect();
                    for k in hidden {
                        sectors.remove(&k);
                    }
                    zeros.push((*file_offset, end));
                    len = len.max(end);
                }
            }
        }
        Ok(ReplayOverlay {
            inner,
            sectors,
            zeros,
            len,
        })
    }
}

impl<F: FileIo> FileIo for ReplayOverlay<F> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)?;
        let end = offset + buf.len() as u64;
        // Zero ranges first, then sectors written after them (sectors hidden by a later zero
        // range were removed when the overlay was built).
        for &(zs, ze) in &self.zeros {
            let s = zs.max(offset);
            let e = ze.min(end);
            if s < e {
                buf[(s - offset) as usize..(e - offset) as usize].fill(0);
            }
        }
        let first = offset - offset % SECTOR;
        for (&so, data) in self.sectors.range(first..end) {
            let s = so.max(offset);
            let e = (so + SECTOR).min(end);
            if s < e {
                buf[(s - offset) as usize..(e - offset) as usize]
                    .copy_from_slice(&data[(s - so) as usize..(e - so) as usize]);
            }
        }
        Ok(())
    }
    fn write_at(&self, _: &[u8], _: u64) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "read-only log overlay",
        ))
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.len)
    }
    fn set_len(&self, _: u64) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "read-only log overlay",
        ))
    }
    fn data_extents(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
        let end = offset.saturating_add(len);
        let mut extents = self.inner.data_extents(offset, len)?;
        let first = offset - offset % SECTOR;
        extents.extend(self.sectors.range(first..end).map(|(&so, _)| {
            let s = so.max(offset);
            (s, (so + SECTOR).min(end) - s)
        }));
        Ok(crate::io::merge_extents(extents))
    }
}

/// Most data sectors one entry of a ring of `log_length` bytes may carry (entries are at
/// most half the ring, see the module doc).
pub fn max_sectors_per_entry(log_length: u64) -> usize {
    let half = (log_length / 2 / SECTOR) as u32;
    // Find the largest n with descriptor_sectors(n) + n <= half.
    let mut n = half.saturating_sub(1);
    while n > 0 && log_descriptor_sectors(n) + n > half {
        n -= 1;
    }
    n as usize
}

/// Builds one log entry carrying `sectors` (target offset, 4 KiB of new contents).
pub fn build_entry(
    sectors: &[(u64, &[u8])],
    ring_offset: u64,
    sequence_number: u64,
    log_guid: Uuid,
    flushed_file_offset: u64,
    last_file_offset: u64,
) -> Vec<u8> {
    let count = u32::try_from(sectors.len()).expect("entry descriptor count fits in u32");
    let desc_sectors = log_descriptor_sectors(count) as usize;
    let entry_len = (desc_sectors + sectors.len()) * LOG_SECTOR_SIZE;
    let mut entry = vec![0u8; entry_len];
    LogEntryHeader {
        entry_length: u32::try_from(entry_len).expect("entry length fits in u32"),
        tail: u32::try_from(ring_offset).expect("ring offset fits in u32"),
        sequence_number,
        descriptor_count: count,
        log_guid,
        flushed_file_offset,
        last_file_offset,
    }
    .encode_into(&mut entry);
    for (i, (file_offset, data)) in sectors.iter().enumerate() {
        let d = LOG_ENTRY_HEADER_SIZE + i * LOG_DESCRIPTOR_SIZE;
        LogDescriptor::encode_data(
            &mut entry[d..d + LOG_DESCRIPTOR_SIZE],
            data,
            *file_offset,
            sequence_number,
        );
        let s = (desc_sectors + i) * LOG_SECTOR_SIZE;
        encode_log_data_sector(&mut entry[s..s + LOG_SECTOR_SIZE], data, sequence_number);
    }
    let crc = checksum_with_zeroed_field(&entry, 4);
    put_u32(&mut entry, 4, crc);
    entry
}

/// Why a sequence could not be used.
pub fn no_sequence(log_guid: Uuid) -> Corruption {
    Corruption::LogNoValidSequence { log_guid }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sector(fill: u8) -> Vec<u8> {
        let mut s = vec![fill; LOG_SECTOR_SIZE];
        s[0] = 0xAA;
        s[4095] = 0xBB;
        s
    }

    #[test]
    fn finds_the_newest_self_tailed_entry() {
        let guid = Uuid::new_v4();
        let mut ring = vec![0u8; 1 << 20];
        let a = sector(1);
        let b = sector(2);
        let e1 = build_entry(&[(3 << 20, &a)], 0, 1, guid, 4 << 20, 4 << 20);
        ring[..e1.len()].copy_from_slice(&e1);
        let at = e1.len() as u64;
        let e2 = build_entry(&[(3 << 20, &b)], at, 2, guid, 4 << 20, 5 << 20);
        ring[at as usize..at as usize + e2.len()].copy_from_slice(&e2);
        let seq = scan_ring(&ring, guid).unwrap();
        assert_eq!(seq.head_sequence, 2);
        assert_eq!(seq.entries, 1);
        assert_eq!(seq.last_file_offset, 5 << 20);
        match &seq.writes[0] {
            LogWrite::Sector { file_offset, data } => {
                assert_eq!(*file_offset, 3 << 20);
                assert_eq!(&data[..], &b[..]);
            }
            other => panic!("unexpected {other:?}"),
        }
        // A different log GUID sees nothing; a torn newest entry falls back to the older one.
        assert!(scan_ring(&ring, Uuid::new_v4()).is_none());
        ring[at as usize + 5000] ^= 0xff;
        assert_eq!(scan_ring(&ring, guid).unwrap().head_sequence, 1);
    }

    #[test]
    fn entry_wrapping_around_the_ring_end_is_found() {
        let guid = Uuid::new_v4();
        let ring_len = 64 * 1024;
        let mut ring = vec![0u8; ring_len];
        let data = sector(7);
        let at = (ring_len - LOG_SECTOR_SIZE) as u64;
        let e = build_entry(&[(2 << 20, &data)], at, 9, guid, 0, 0);
        ring[at as usize..].copy_from_slice(&e[..LOG_SECTOR_SIZE]);
        ring[..LOG_SECTOR_SIZE].copy_from_slice(&e[LOG_SECTOR_SIZE..]);
        let seq = scan_ring(&ring, guid).unwrap();
        assert_eq!(seq.head_sequence, 9);
    }

    #[test]
    fn entry_size_limit_keeps_entries_within_half_the_ring() {
        let n = max_sectors_per_entry(1 << 20);
        assert_eq!(n, 126);
        let count = u32::try_from(n).unwrap();
        assert!(u64::from(log_descriptor_sectors(count) + count) * SECTOR <= 1 << 19);
    }
}
