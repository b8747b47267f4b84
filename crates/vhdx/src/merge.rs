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
//! 4. The parent is flushed and closed; only then is the child removed.
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

/// Counts the bytes each direction would copy.
pub fn estimate(child: &Path) -> Result<MergeEstimate> {
    let child = VhdxFile::open(child, OpenOptions::default())?;
    let parent = open_parent(&child)?;
    estimate_open(&child, &parent)
}

fn estimate_open(child: &VhdxFile, parent: &VhdxFile) -> Result<MergeEstimate> {
    let mut into_parent = 0;
    let mut into_child = 0;
    for_each_child_range(child, |range| {
        match range {
            ChildRange::Stored { len, .. } | ChildRange::Zero { len, .. } => into_parent += len,
            ChildRange::FromParent { offset, len } => {
                parent.resolve(offset, len, &mut |seg| {
                    if let Segment::Data { len, .. } = seg {
                        into_child += len;
                    }
                    Ok(())
                })?;
            }
        }
        Ok(())
    })?;
    Ok(MergeEstimate {
        into_parent,
        into_child,
    })
}

enum ChildRange {
    Stored { offset: u64, len: u64 },
    Zero { offset: u64, len: u64 },
    FromParent { offset: u64, len: u64 },
}

/// Visits the child's ranges block by block, skipping blocks it leaves wholly to the parent
/// only when asked (they matter to an into-child merge).
fn for_each_child_range(
    child: &VhdxFile,
    mut f: impl FnMut(ChildRange) -> Result<()>,
) -> Result<()> {
    let g = child.geometry();
    let bs = u64::from(g.block_size);
    for block in 0..g.payload_blocks() {
        let start = block * bs;
        let len = g.block_len(block);
        match child.block_entry(block).state() {
            PAYLOAD_BLOCK_NOT_PRESENT => f(ChildRange::FromParent { offset: start, len })?,
            PAYLOAD_BLOCK_FULLY_PRESENT => f(ChildRange::Stored { offset: start, len })?,
            PAYLOAD_BLOCK_PARTIALLY_PRESENT => {
                let mut at = start;
                let mut ranges = Vec::new();
                child.resolve(start, len, &mut |seg| {
                    ranges.push(match seg {
                        Segment::Data { len, .. } => ChildRange::Stored { offset: at, len },
                        Segment::Zero { len } => ChildRange::Zero { offset: at, len },
                        Segment::Parent { len } => ChildRange::FromParent { offset: at, len },
                    });
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
pub fn merge(
    child: &Path,
    direction: MergeDirection,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<MergeOutcome> {
    let child_file = VhdxFile::open(
        child,
        OpenOptions {
            writable: true,
            keep_data_write_guid: true,
            data_write_guid: None,
        },
    )?;
    if child_file.kind() != DiskKind::Differencing {
        return Err(Error::Unsupported {
            path: child.to_owned(),
            reason: "not a differencing file, so there is nothing to merge".into(),
        });
    }
    let direction = match direction {
        MergeDirection::Auto => {
            let parent = open_parent(&child_file)?;
            let est = estimate_open(&child_file, &parent)?;
            if est.into_child < est.into_parent {
                MergeDirection::IntoChild
            } else {
                MergeDirection::IntoParent
            }
        }
        d => d,
    };
    match direction {
        MergeDirection::IntoParent => merge_into_parent(child_file, progress),
        _ => merge_into_child(child_file, progress),
    }
}

fn merge_into_parent(child: VhdxFile, progress: &mut dyn FnMut(u64, u64)) -> Result<MergeOutcome> {
    let child_path = child.path().to_owned();
    let mut locator = child
        .parent_locator()
        .expect("differencing file has a locator");
    let new_guid = match locator
        .get(KEY_PARENT_LINKAGE2)
        .and_then(parse_braced_guid)
        .filter(|g| !g.is_nil())
    {
        Some(g) => g,
        None => {
            let g = Uuid::new_v4();
            locator.set(KEY_PARENT_LINKAGE2, braced_guid(g));
            child.set_parent_locator(&locator)?;
            g
        }
    };
    let parent = open_parent_with(
        &child,
        OpenOptions {
            writable: true,
            keep_data_write_guid: false,
            data_write_guid: Some(new_guid),
        },
    )?;
    let parent_path = parent.path().to_owned();
    let total = estimate_total_into_parent(&child)?;
    let mut done = 0u64;
    let mut buf = Vec::new();
    for_each_child_range(&child, |range| {
        match range {
            ChildRange::Stored { offset, len } => {
                let mut pos = offset;
                while pos < offset + len {
                    let n = (offset + len - pos).min(COPY_CHUNK);
                    buf.resize(n as usize, 0);
                    child.read_at(&mut buf, pos)?;
                    parent.write_at(&buf, pos)?;
                    pos += n;
                    done += n;
                    progress(done, total);
                }
            }
            ChildRange::Zero { offset, len } => {
                parent.write_zeroes(offset, len)?;
                done += len;
                progress(done, total);
            }
            ChildRange::FromParent { .. } => {}
        }
        Ok(())
    })?;
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

fn estimate_total_into_parent(child: &VhdxFile) -> Result<u64> {
    let mut total = 0;
    for_each_child_range(child, |r| {
        if let ChildRange::Stored { len, .. } | ChildRange::Zero { len, .. } = r {
            total += len;
        }
        Ok(())
    })?;
    Ok(total)
}

fn merge_into_child(child: VhdxFile, progress: &mut dyn FnMut(u64, u64)) -> Result<MergeOutcome> {
    let parent = open_parent(&child)?;
    let parent_is_base = parent.kind() != DiskKind::Differencing;
    let total = estimate_open(&child, &parent)?.into_child;
    let g = child.geometry();
    let bs = u64::from(g.block_size);
    let mut done = 0u64;
    let mut buf = Vec::new();
    for block in 0..g.payload_blocks() {
        let start = block * bs;
        let len = g.block_len(block);
        let state = child.block_entry(block).state();
        if state != PAYLOAD_BLOCK_NOT_PRESENT && state != PAYLOAD_BLOCK_PARTIALLY_PRESENT {
            continue;
        }
        // The child's holes in this block, then what the parent has there.
        let mut holes = Vec::new();
        let mut at = start;
        child.resolve(start, len, &mut |seg| {
            if let Segment::Parent { len } = seg {
                holes.push((at, len));
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
        // Once the parent is gone a block must be wholly stored or wholly absent, so with a
        // base parent its zeros are written too whenever the block stores anything.
        let fill_zeros = !parent_is_base || any_data || state == PAYLOAD_BLOCK_PARTIALLY_PRESENT;
        for (offset, seg) in pieces {
            match seg {
                Segment::Data { file_offset, len } => {
                    let mut pos = 0;
                    while pos < len {
                        let n = (len - pos).min(COPY_CHUNK);
                        buf.resize(n as usize, 0);
                        parent.read_stored(&mut buf, file_offset + pos)?;
                        child.write_at(&buf, offset + pos)?;
                        pos += n;
                        done += n;
                        progress(done, total.max(done));
                    }
                }
                Segment::Zero { len } if fill_zeros => child.write_zeroes(offset, len)?,
                Segment::Zero { .. } | Segment::Parent { .. } => {}
            }
        }
    }
    child.flush()?;
    let parent_path = parent.path().to_owned();
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
    }
    let result = child.path().to_owned();
    child.close()?;
    Ok(MergeOutcome {
        direction: MergeDirection::IntoChild,
        result,
        merged_away: parent_path,
        removed: false,
        bytes_copied: done,
    })
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
        },
    )?;
    let parent = VhdxFile::open(new_parent, OpenOptions::default())?;
    let locator = locator_for(child, new_parent, parent.data_write_guid())?;
    child_file.set_parent_locator(&locator)?;
    child_file.close()
}
