//! Recovery points as values, and their manifest encoding (pure: no I/O).
//!
//! A manifest's payload (inside the envelope, zstd-compressed) is a little-endian `u32`
//! length, that many bytes of JSON ([`ManifestHeader`]), then one 32-byte id per chunk of
//! every stream: blobs first, then disks, each in order, `ceil(size / chunk_size)` ids per
//! stream. An all-zero id is a chunk that reads as zeros. Every length is checked against
//! caps before anything is allocated, so a hostile manifest is an error, never a panic or
//! a huge allocation.

use crate::error::{Error, Result};
use crate::format::{ChunkId, ID_LEN, MAX_MANIFEST, MAX_MANIFEST_HEADER, ManifestHeader};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

/// A disk or a blob of a point: its size and its chunks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stream {
    /// The name the caller gave it.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// How it was copied: `full`, `incremental`, `express-full` or `blob`.
    pub method: String,
    /// Caller-supplied fields (e.g. a change-tracking reference).
    pub fields: BTreeMap<String, String>,
    /// Bytes read from the source when it was backed up.
    pub bytes_read: u64,
    /// New bytes stored for it (compressed, encrypted).
    pub bytes_stored: u64,
    /// One id per chunk; [`ChunkId::ZERO`] for chunks of zeros.
    pub chunks: Vec<ChunkId>,
}

impl Stream {
    /// Number of chunks a stream of `size` bytes has.
    pub fn chunk_count(size: u64, chunk_size: u32) -> u64 {
        size.div_ceil(u64::from(chunk_size))
    }
}

/// A recovery point: a full index of everything it holds (restore never needs another
/// point).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Point {
    /// 32 hex digits.
    pub id: String,
    /// The caller's grouping key (e.g. a VM's name).
    pub group: String,
    /// When the backup started.
    pub time: SystemTime,
    /// When it was committed.
    pub committed: SystemTime,
    /// The repository's chunk size (every stream's chunks are this long, the last shorter).
    pub chunk_size: u32,
    /// Caller-supplied fields (consistency, freeze and pause times...).
    pub fields: BTreeMap<String, String>,
    /// Named blobs (VM config, firmware variables, memory state...).
    pub blobs: Vec<Stream>,
    /// Disks; `disks[N]` is disk N.
    pub disks: Vec<Stream>,
}

impl Point {
    /// The first 8 hex digits, for display.
    pub fn short_id(&self) -> &str {
        &self.id[..8.min(self.id.len())]
    }
    /// A blob by name.
    pub fn blob(&self, name: &str) -> Option<&Stream> {
        self.blobs.iter().find(|b| b.name == name)
    }
    /// Total size of the disks.
    pub fn disks_size(&self) -> u64 {
        self.disks.iter().map(|d| d.size).sum()
    }
    /// Every stream, blobs first.
    pub fn streams(&self) -> impl Iterator<Item = &Stream> {
        self.blobs.iter().chain(self.disks.iter())
    }
}

pub(crate) fn to_ns(t: SystemTime) -> i128 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    }
}

pub(crate) fn from_ns(ns: i128) -> SystemTime {
    if ns >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_nanos(ns.min(u64::MAX as i128) as u64)
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_nanos((-ns).min(u64::MAX as i128) as u64)
    }
}

fn stream_header(s: &Stream) -> crate::format::StreamHeader {
    crate::format::StreamHeader {
        name: s.name.clone(),
        size: s.size,
        method: s.method.clone(),
        fields: s.fields.clone(),
        bytes_read: s.bytes_read,
        bytes_stored: s.bytes_stored,
    }
}

/// Encodes a point's manifest payload (before compression).
pub fn encode(p: &Point) -> Vec<u8> {
    let header = ManifestHeader {
        version: crate::format::FORMAT_VERSION,
        id: p.id.clone(),
        group: p.group.clone(),
        time_ns: to_ns(p.time),
        committed_ns: to_ns(p.committed),
        chunk_size: p.chunk_size,
        fields: p.fields.clone(),
        blobs: p.blobs.iter().map(stream_header).collect(),
        disks: p.disks.iter().map(stream_header).collect(),
    };
    let json = serde_json::to_vec(&header).expect("manifest header serializes");
    let ids: usize = p.streams().map(|s| s.chunks.len()).sum();
    let mut out = Vec::with_capacity(4 + json.len() + ids * ID_LEN);
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    for s in p.streams() {
        for c in &s.chunks {
            out.extend_from_slice(&c.0);
        }
    }
    out
}

/// Decodes a manifest payload; `what` names it in errors, `id` is the name it was stored
/// under (which the header must repeat).
pub fn decode(what: &str, id: &str, payload: &[u8]) -> Result<Point> {
    let bad = |r: String| Error::corrupt(what, r);
    if payload.len() > MAX_MANIFEST || payload.len() < 4 {
        return Err(bad(format!("payload of {} bytes", payload.len())));
    }
    let hlen = u32::from_le_bytes(payload[..4].try_into().unwrap()) as usize;
    if hlen > MAX_MANIFEST_HEADER || 4 + hlen > payload.len() {
        return Err(bad(format!("header length {hlen} out of range")));
    }
    let header: ManifestHeader =
        serde_json::from_slice(&payload[4..4 + hlen]).map_err(|e| bad(e.to_string()))?;
    if header.version > crate::format::FORMAT_VERSION {
        return Err(Error::NewerFormat {
            found: header.version,
            supported: crate::format::FORMAT_VERSION,
        });
    }
    if header.id != id {
        return Err(bad(format!(
            "names point {} but is stored as {id}",
            header.id
        )));
    }
    let cs = header.chunk_size;
    if !cs.is_power_of_two()
        || !(crate::format::MIN_CHUNK_SIZE..=crate::format::MAX_CHUNK_SIZE).contains(&cs)
    {
        return Err(bad(format!("chunk size {cs} out of range")));
    }
    let mut table = &payload[4 + hlen..];
    let mut take = |h: crate::format::StreamHeader| -> Result<Stream> {
        let n = Stream::chunk_count(h.size, cs);
        let bytes = n
            .checked_mul(ID_LEN as u64)
            .filter(|b| *b <= table.len() as u64)
            .ok_or_else(|| bad(format!("chunk table of {} is short", h.name)))?
            as usize;
        let chunks = table[..bytes]
            .chunks_exact(ID_LEN)
            .map(|c| ChunkId(c.try_into().unwrap()))
            .collect();
        table = &table[bytes..];
        Ok(Stream {
            name: h.name,
            size: h.size,
            method: h.method,
            fields: h.fields,
            bytes_read: h.bytes_read,
            bytes_stored: h.bytes_stored,
            chunks,
        })
    };
    let blobs = header
        .blobs
        .into_iter()
        .map(&mut take)
        .collect::<Result<Vec<_>>>()?;
    let disks = header
        .disks
        .into_iter()
        .map(&mut take)
        .collect::<Result<Vec<_>>>()?;
    if !table.is_empty() {
        return Err(bad(format!("{} bytes after the chunk tables", table.len())));
    }
    Ok(Point {
        id: header.id,
        group: header.group,
        time: from_ns(header.time_ns),
        committed: from_ns(header.committed_ns),
        chunk_size: cs,
        fields: header.fields,
        blobs,
        disks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Point {
        Point {
            id: "00112233445566778899aabbccddeeff".into(),
            group: "vm-a".into(),
            time: from_ns(1_700_000_000_123_456_789),
            committed: from_ns(1_700_000_010_000_000_000),
            chunk_size: 1 << 20,
            fields: [("consistency".to_string(), "application".to_string())].into(),
            blobs: vec![Stream {
                name: "vm.json".into(),
                size: 10,
                method: "blob".into(),
                fields: BTreeMap::new(),
                bytes_read: 10,
                bytes_stored: 40,
                chunks: vec![ChunkId([7; 32])],
            }],
            disks: vec![Stream {
                name: "disk0".into(),
                size: (3 << 20) + 5,
                method: "full".into(),
                fields: BTreeMap::new(),
                bytes_read: 5,
                bytes_stored: 6,
                chunks: vec![
                    ChunkId([1; 32]),
                    ChunkId::ZERO,
                    ChunkId([2; 32]),
                    ChunkId([3; 32]),
                ],
            }],
        }
    }

    #[test]
    fn manifest_round_trips_and_rejects_damage() {
        let p = sample();
        let bytes = encode(&p);
        assert_eq!(decode("m", &p.id, &bytes).unwrap(), p);
        // Stored under another name.
        assert!(decode("m", "ffff", &bytes).is_err());
        // Truncated tables, extra bytes, a header length past the end.
        assert!(decode("m", &p.id, &bytes[..bytes.len() - 1]).is_err());
        assert!(decode("m", &p.id, &[&bytes[..], &[0]].concat()).is_err());
        let mut long = bytes.clone();
        long[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode("m", &p.id, &long).is_err());
        // Every truncation is an error, never a panic.
        for n in 0..bytes.len() {
            assert!(decode("m", &p.id, &bytes[..n]).is_err());
        }
    }
}
