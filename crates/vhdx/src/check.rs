//! Structure check and repair.
//!
//! `check` reads a file without changing it and reports: whether each header and region
//! table copy is valid, whether a log waits to be replayed, every structural error that
//! makes the file unusable (bad checksums, states, overlaps, blocks outside the file, a
//! parent that cannot be found or does not match), and space no structure uses (leaks,
//! left by crashed allocations or zeroed blocks). Holes are not leaks: an interrupted
//! into-parent merge leaves the blocks it handed back punched out of the child.
//!
//! `repair` fixes only what can be fixed without guessing: replays the log, rewrites a
//! damaged header or region table copy from the good one, and truncates unused space at the
//! end of the file. It never touches payload data or BAT entries it cannot trust.
//!
//! ## Truncated files
//!
//! A file cut short (an incomplete copy or download) has BAT entries pointing at blocks
//! that lie, wholly or partly, past its end. `check` says the file was probably truncated
//! and which virtual byte ranges those blocks hold; `repair` salvages the rest: blocks
//! whose data lies inside the file are kept as they are, and each block past the end (and
//! each partially present block whose sector bitmap lies past the end) becomes
//! `PAYLOAD_BLOCK_ZERO`, so that it reads as zeros: in a differencing file too, where
//! falling back to the parent would mix an older point in time in without a word. The
//! report names every range dropped ([`CheckReport::lost_ranges`]). The header section,
//! the log, the BAT and the metadata region must lie inside the file; if they do not,
//! nothing is salvaged.
//!
//! ## Crash model
//!
//! Every change `repair` makes to BAT entries, headers and region tables goes through the
//! log, as the engine's own writes do: a crash during a repair leaves the file as it was
//! or repaired, and `repair` can simply run again (a salvage that did not commit drops the
//! same blocks again). Payload data is never written.

use crate::chain::open_parent;
use crate::error::{Error, Result};
use crate::file::{DiskKind, DroppedBlock, OpenOptions, VhdxFile};
use crate::format::*;
use std::io::Read;
use std::path::{Path, PathBuf};

/// What a check found.
#[derive(Clone, Debug, Default)]
pub struct CheckReport {
    /// The file checked.
    pub path: PathBuf,
    /// Problems that make the file unusable or wrong.
    pub errors: Vec<String>,
    /// Problems that do not affect the disk's contents.
    pub warnings: Vec<String>,
    /// What `repair` changed.
    pub repaired: Vec<String>,
    /// The header names a log that must be replayed.
    pub needs_log_replay: bool,
    /// File length in bytes.
    pub file_size: u64,
    /// Bytes of the file used by headers, log, regions and blocks.
    pub used_bytes: u64,
    /// Bytes of the file no structure uses that take space on disk (holes do not count).
    pub leaked_bytes: u64,
    /// Unused bytes after the last structure (what repair can truncate).
    pub trailing_leaked_bytes: u64,
    /// Payload blocks fully stored.
    pub full_blocks: u64,
    /// Payload blocks partly stored.
    pub partial_blocks: u64,
    /// Payload blocks explicitly zero.
    pub zero_blocks: u64,
    /// A truncated file: the virtual byte ranges (offset, length; merged, ascending) of
    /// the blocks whose data lies past the end of the file, which `repair` drops (they
    /// read as zeros after it). After a repair, the ranges it dropped.
    pub lost_ranges: Vec<(u64, u64)>,
    /// Payload blocks in [`CheckReport::lost_ranges`].
    pub lost_blocks: u64,
    /// Virtual bytes in [`CheckReport::lost_ranges`].
    pub lost_bytes: u64,
}

impl CheckReport {
    /// Whether no error was found.
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty()
    }
}

/// Checks a file; with `repair`, fixes what can be fixed first.
pub fn check(path: &Path, repair: bool) -> Result<CheckReport> {
    let mut repaired = Vec::new();
    let mut lost = Lost::default();
    if repair {
        (repaired, lost) = repair_file(path)?;
    }
    let mut report = inspect(path)?;
    report.repaired = repaired;
    if repair && report.lost_blocks == 0 {
        (report.lost_ranges, report.lost_blocks, report.lost_bytes) =
            (lost.ranges, lost.blocks, lost.bytes);
    }
    Ok(report)
}

/// What a salvage drops: virtual ranges (merged), blocks, bytes.
#[derive(Default)]
struct Lost {
    ranges: Vec<(u64, u64)>,
    blocks: u64,
    bytes: u64,
    /// Blocks whose own data was inside the file but whose sector bitmap was not.
    bitmap_only: u64,
}

impl Lost {
    fn of(file: &VhdxFile, dropped: &[DroppedBlock]) -> Lost {
        let g = file.geometry();
        let bs = u64::from(g.block_size);
        let mut lost = Lost::default();
        for d in dropped {
            let (start, len) = (d.block * bs, g.block_len(d.block));
            lost.blocks += 1;
            lost.bytes += len;
            lost.bitmap_only += u64::from(d.bitmap_only);
            match lost.ranges.last_mut() {
                Some(last) if last.0 + last.1 == start => last.1 += len,
                _ => lost.ranges.push((start, len)),
            }
        }
        lost
    }

    /// `0x100000-0x2fffff (2 MiB), ...`, the first few ranges and how many more.
    fn describe_ranges(&self) -> String {
        const SHOWN: usize = 8;
        let mut parts: Vec<String> = self
            .ranges
            .iter()
            .take(SHOWN)
            .map(|&(o, l)| format!("{:#x}-{:#x} ({})", o, o + l - 1, bytes(l)))
            .collect();
        if self.ranges.len() > SHOWN {
            parts.push(format!("and {} more ranges", self.ranges.len() - SHOWN));
        }
        parts.join(", ")
    }

    fn what(&self) -> String {
        let mut s = format!(
            "{} block{} ({} of the virtual disk: {})",
            self.blocks,
            if self.blocks == 1 { "" } else { "s" },
            bytes(self.bytes),
            self.describe_ranges()
        );
        if self.bitmap_only > 0 {
            s.push_str(&format!(
                "; {} of them lie inside the file but their sector bitmap does not",
                self.bitmap_only
            ));
        }
        s
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut unit = 0;
    while unit + 1 < UNITS.len() && n >= 1u64 << (10 * (unit + 1)) {
        unit += 1;
    }
    if unit == 0 {
        return format!("{n} bytes");
    }
    let v = n as f64 / (1u64 << (10 * unit)) as f64;
    if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[unit])
    } else {
        format!("{v:.1} {} ({n} bytes)", UNITS[unit])
    }
}

fn raw_copies(path: &Path) -> Result<(Vec<u8>, u64)> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut head = vec![0u8; HEADER_SECTION_SIZE as usize];
    let mut read = 0;
    while read < head.len() {
        match f.read(&mut head[read..]) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) => return Err(Error::io(path, e)),
        }
    }
    Ok((head, len))
}

fn inspect(path: &Path) -> Result<CheckReport> {
    let mut report = CheckReport {
        path: path.to_owned(),
        ..CheckReport::default()
    };
    let (head, len) = raw_copies(path)?;
    report.file_size = len;
    let headers: Vec<Option<Header>> = HEADER_OFFSETS
        .iter()
        .map(|&o| Header::parse(&head[o as usize..o as usize + HEADER_SIZE]).ok())
        .collect();
    for (i, h) in headers.iter().enumerate() {
        if h.is_none() {
            report.warnings.push(format!(
                "header {} is invalid (the other copy is in use; repair rewrites it)",
                i + 1
            ));
        }
    }
    let tables: Vec<Option<RegionTable>> = REGION_TABLE_OFFSETS
        .iter()
        .map(|&o| RegionTable::parse(&head[o as usize..o as usize + REGION_TABLE_SIZE]).ok())
        .collect();
    match (&tables[0], &tables[1]) {
        (Some(a), Some(b)) if a != b => report
            .errors
            .push("the two region table copies differ".into()),
        (Some(_), None) | (None, Some(_)) => report.warnings.push(
            "one region table copy is invalid (the other is in use; repair rewrites it)".into(),
        ),
        _ => {}
    }
    let current = headers
        .iter()
        .flatten()
        .max_by_key(|h| h.sequence_number)
        .cloned();
    if let Some(h) = &current
        && !h.log_guid.is_nil()
    {
        report.needs_log_replay = true;
        report
            .warnings
            .push("the log holds changes not yet applied (repair replays them)".into());
    }

    let file = match VhdxFile::open(path, OpenOptions::default()) {
        Ok(f) => f,
        Err(e) => {
            // A truncated file: say what a repair would keep and drop.
            if let Ok((salvaged, dropped)) = VhdxFile::open_salvage(path, OpenOptions::default())
                && !dropped.is_empty()
            {
                let lost = Lost::of(&salvaged, &dropped);
                report.errors.push(match e {
                    Error::Corrupt { source, .. } => source.to_string(),
                    e => crate::error_chain(&e),
                });
                let alloc = salvaged.allocation();
                report.errors.push(format!(
                    "the file was probably truncated: {} lie past its end; repair keeps the {} intact blocks and drops these, which then read as zeros",
                    lost.what(),
                    (alloc.full_blocks + alloc.partial_blocks),
                ));
                (report.lost_ranges, report.lost_blocks, report.lost_bytes) =
                    (lost.ranges, lost.blocks, lost.bytes);
                return Ok(report);
            }
            match e {
                Error::Corrupt { source, .. } => {
                    report.errors.push(source.to_string());
                    return Ok(report);
                }
                e => return Err(e),
            }
        }
    };
    let alloc = file.allocation();
    report.full_blocks = alloc.full_blocks;
    report.partial_blocks = alloc.partial_blocks;
    report.zero_blocks = alloc.zero_blocks;

    let spans = file.used_spans();
    let mut used = 0u64;
    let mut end = 0u64;
    // Space between structures counts as leaked only where the file system stores it: an
    // into-parent merge punches out the blocks it has handed back to the parent.
    let mut leaked = 0u64;
    for (s, e) in merge_spans(spans) {
        let e = e.min(len);
        if s > end {
            leaked += file.stored_bytes(end, s.min(len) - end)?;
        }
        if s < e {
            used += e - s;
        }
        end = end.max(e);
    }
    if len > end {
        leaked += file.stored_bytes(end, len - end)?;
    }
    report.used_bytes = used;
    report.leaked_bytes = leaked;
    report.trailing_leaked_bytes = len.saturating_sub(end.next_multiple_of(MIB).max(end));
    if report.leaked_bytes > 0 {
        report.warnings.push(format!(
            "{} bytes of the file are not used by any structure",
            report.leaked_bytes
        ));
    }
    if file.kind() == DiskKind::Differencing
        && let Err(e) = open_parent(&file)
    {
        report.errors.push(crate::error_chain(&e));
    }
    Ok(report)
}

fn merge_spans(mut spans: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    spans.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in spans {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// The salvage `check` with repair runs on a truncated file, through any [`FileIo`]: the
/// entries past the end dropped and committed through the log, the file closed. Returns
/// the number of blocks dropped. For the crash tests, which cut its power midway.
#[cfg(feature = "testing")]
pub fn salvage_io(io: std::sync::Arc<dyn crate::FileIo>, path: &Path) -> Result<u64> {
    let (file, dropped) = VhdxFile::open_salvage_io(
        io,
        path,
        OpenOptions {
            writable: true,
            keep_data_write_guid: true,
            ..OpenOptions::default()
        },
    )?;
    file.flush()?;
    file.close()?;
    Ok(dropped.len() as u64)
}

fn repair_file(path: &Path) -> Result<(Vec<String>, Lost)> {
    let mut repaired = Vec::new();
    let (head, _) = raw_copies(path)?;
    let header_ok: Vec<bool> = HEADER_OFFSETS
        .iter()
        .map(|&o| Header::parse(&head[o as usize..o as usize + HEADER_SIZE]).is_ok())
        .collect();
    let tables: Vec<Option<RegionTable>> = REGION_TABLE_OFFSETS
        .iter()
        .map(|&o| RegionTable::parse(&head[o as usize..o as usize + REGION_TABLE_SIZE]).ok())
        .collect();
    let had_log = HEADER_OFFSETS
        .iter()
        .filter_map(|&o| Header::parse(&head[o as usize..o as usize + HEADER_SIZE]).ok())
        .max_by_key(|h| h.sequence_number)
        .is_some_and(|h| !h.log_guid.is_nil());

    // Opening writable replays the log in place.
    let options = OpenOptions {
        writable: true,
        keep_data_write_guid: true,
        ..OpenOptions::default()
    };
    let mut lost = Lost::default();
    let file = match VhdxFile::open(path, options.clone()) {
        Ok(f) => f,
        Err(e) => match VhdxFile::open_salvage(path, options) {
            Ok((file, dropped)) if !dropped.is_empty() => {
                // The dropped entries are dirty: this flush commits them through the log.
                file.flush()?;
                lost = Lost::of(&file, &dropped);
                repaired.push(format!(
                    "salvaged the truncated file: dropped {}, which read as zeros now; every block inside the file is kept",
                    lost.what()
                ));
                file
            }
            _ => return Err(e),
        },
    };
    if had_log {
        repaired.insert(0, "replayed the log".into());
    }
    if header_ok.iter().any(|ok| !ok) {
        file.rewrite_headers()?;
        repaired.push("rewrote the invalid header copy".into());
    }
    if let (Some(good), None) | (None, Some(good)) = (&tables[0], &tables[1]) {
        file.rewrite_region_tables(good)?;
        repaired.push("rewrote the invalid region table copy".into());
    }
    let trimmed = file.trim_unused_tail()?;
    if trimmed > 0 {
        repaired.push(format!("truncated {trimmed} unused bytes at the end"));
    }
    file.close()?;
    Ok((repaired, lost))
}
