//! Structure check and repair.
//!
//! `check` reads a file without changing it and reports: whether each header and region
//! table copy is valid, whether a log waits to be replayed, every structural error that
//! makes the file unusable (bad checksums, states, overlaps, blocks outside the file, a
//! parent that cannot be found or does not match), and space no structure uses (leaks,
//! left by crashed allocations or zeroed blocks).
//!
//! `repair` fixes only what can be fixed without guessing: replays the log, rewrites a
//! damaged header or region table copy from the good one, and truncates unused space at the
//! end of the file. It never touches payload data or BAT entries it cannot trust.

use crate::chain::open_parent;
use crate::error::{Error, Result};
use crate::file::{DiskKind, OpenOptions, VhdxFile};
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
    /// Bytes of the file no structure uses.
    pub leaked_bytes: u64,
    /// Unused bytes after the last structure (what repair can truncate).
    pub trailing_leaked_bytes: u64,
    /// Payload blocks fully stored.
    pub full_blocks: u64,
    /// Payload blocks partly stored.
    pub partial_blocks: u64,
    /// Payload blocks explicitly zero.
    pub zero_blocks: u64,
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
    if repair {
        repaired = repair_file(path)?;
    }
    let mut report = inspect(path)?;
    report.repaired = repaired;
    Ok(report)
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
        Err(Error::Corrupt { source, .. }) => {
            report.errors.push(source.to_string());
            return Ok(report);
        }
        Err(e) => return Err(e),
    };
    let alloc = file.allocation();
    report.full_blocks = alloc.full_blocks;
    report.partial_blocks = alloc.partial_blocks;
    report.zero_blocks = alloc.zero_blocks;

    let spans = file.used_spans();
    let mut used = 0u64;
    let mut end = 0u64;
    for (s, e) in merge_spans(spans) {
        let e = e.min(len);
        if s < e {
            used += e - s;
        }
        end = end.max(e);
    }
    report.used_bytes = used;
    report.leaked_bytes = len.saturating_sub(used);
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

fn repair_file(path: &Path) -> Result<Vec<String>> {
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
    let file = VhdxFile::open(
        path,
        OpenOptions {
            writable: true,
            keep_data_write_guid: true,
            ..OpenOptions::default()
        },
    )?;
    if had_log {
        repaired.push("replayed the log".into());
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
    Ok(repaired)
}
