//! Verification: read every chunk of the points checked, open it (tag or checksum), check
//! its length and id, and name each damaged point and the disks and blobs in it that are
//! affected. A chunk shared by many points is read once.

use crate::error::{Error, Result};
use crate::format::ChunkId;
use crate::point::Point;
use crate::repo::Repository;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// One damaged point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DamagedPoint {
    /// The point's id.
    pub id: String,
    /// Why its manifest does not open (then nothing else of it could be checked).
    pub manifest: Option<String>,
    /// Damaged disks: index, name, chunks affected, offset of the first.
    pub disks: Vec<DamagedStream>,
    /// Damaged blobs.
    pub blobs: Vec<DamagedStream>,
}

/// One damaged disk or blob of a point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DamagedStream {
    /// Index among the point's disks (or blobs).
    pub index: usize,
    /// Its name.
    pub name: String,
    /// Chunks missing or damaged.
    pub bad_chunks: u64,
    /// Byte offset of the first.
    pub first_offset: u64,
    /// What is wrong with the first.
    pub problem: String,
}

/// What a verification found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Points checked.
    pub points_checked: usize,
    /// Distinct chunks read.
    pub chunks_checked: u64,
    /// Bytes of plaintext checked.
    pub bytes_checked: u64,
    /// Points with damage, by id.
    pub damaged: Vec<DamagedPoint>,
}

impl VerifyReport {
    /// Whether nothing was damaged.
    pub fn is_clean(&self) -> bool {
        self.damaged.is_empty()
    }
}

/// Verifies the points named by `ids` (every point when `None`). Progress counts chunks.
pub fn verify(
    repo: &Repository,
    ids: Option<&[String]>,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<VerifyReport> {
    let ids = match ids {
        Some(ids) => ids.to_vec(),
        None => repo.point_ids()?,
    };
    let mut report = VerifyReport::default();
    let mut points: Vec<Point> = Vec::new();
    for id in &ids {
        match repo.load_point(id) {
            Ok(p) => points.push(p),
            Err(e @ Error::PointNotFound { .. }) if ids.len() == 1 => return Err(e),
            Err(Error::PointNotFound { .. }) => {}
            Err(e) => report.damaged.push(DamagedPoint {
                id: id.clone(),
                manifest: Some(e.to_string()),
                disks: Vec::new(),
                blobs: Vec::new(),
            }),
        }
    }
    report.points_checked = points.len() + report.damaged.len();
    // Each distinct chunk once, with its length.
    let cs = u64::from(repo.chunk_size());
    let mut unique: HashMap<ChunkId, usize> = HashMap::new();
    for p in &points {
        for s in p.streams() {
            for (i, id) in s.chunks.iter().enumerate() {
                if !id.is_zero() {
                    let len = (s.size - i as u64 * cs).min(cs) as usize;
                    unique.entry(*id).or_insert(len);
                }
            }
        }
    }
    let work: Vec<(ChunkId, usize)> = unique.into_iter().collect();
    let total = work.len() as u64;
    let next = AtomicUsize::new(0);
    let done = AtomicU64::new(0);
    let bytes = AtomicU64::new(0);
    let bad: Mutex<HashMap<ChunkId, String>> = Mutex::new(HashMap::new());
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) + 1;
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(id, len)) = work.get(k) else {
                        return;
                    };
                    match repo.read_chunk(&id, len) {
                        Ok(_) => {
                            bytes.fetch_add(len as u64, Ordering::Relaxed);
                        }
                        Err(e) => {
                            tracing::warn!(chunk = %id.hex(), error = %e, "damaged chunk");
                            bad.lock().unwrap().insert(id, e.to_string());
                        }
                    }
                    progress(done.fetch_add(1, Ordering::Relaxed) + 1, total);
                }
            });
        }
    });
    let bad = bad.into_inner().unwrap();
    report.chunks_checked = total;
    report.bytes_checked = bytes.into_inner();
    for p in &points {
        let damage = |streams: &[crate::point::Stream]| -> Vec<DamagedStream> {
            let mut out = Vec::new();
            for (index, s) in streams.iter().enumerate() {
                let hits: Vec<(usize, &String)> = s
                    .chunks
                    .iter()
                    .enumerate()
                    .filter_map(|(i, id)| bad.get(id).map(|why| (i, why)))
                    .collect();
                if let Some(&(first, why)) = hits.first() {
                    out.push(DamagedStream {
                        index,
                        name: s.name.clone(),
                        bad_chunks: hits.len() as u64,
                        first_offset: first as u64 * cs,
                        problem: why.clone(),
                    });
                }
            }
            out
        };
        let (disks, blobs) = (damage(&p.disks), damage(&p.blobs));
        if !disks.is_empty() || !blobs.is_empty() {
            report.damaged.push(DamagedPoint {
                id: p.id.clone(),
                manifest: None,
                disks,
                blobs,
            });
        }
    }
    report.damaged.sort_by(|a, b| a.id.cmp(&b.id));
    let summary: BTreeMap<&str, usize> = report
        .damaged
        .iter()
        .map(|d| (d.id.as_str(), d.disks.len() + d.blobs.len()))
        .collect();
    tracing::info!(points = report.points_checked, chunks = total, damaged = ?summary, "verify finished");
    Ok(report)
}
