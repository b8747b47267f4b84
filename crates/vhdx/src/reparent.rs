//! Repairing a differencing file's link to its parent (Hyper-V's `Set-VHD -ParentPath`).
//!
//! A child records its parent twice: by paths (relative, absolute, volume) and by the
//! parent's DataWriteGuid at the time the child was made (`parent_linkage`, and
//! `parent_linkage2` during an into-parent merge). Moving or renaming the parent breaks
//! the paths; the GUID is what proves that the file found is the one the child's sectors
//! were written against. [`set_parent`] rewrites the paths and keeps the identity, and
//! refuses a parent whose GUID differs unless the caller vouches for its contents.

use crate::chain::{MAX_CHAIN_DEPTH, open_parent};
use crate::create::{absolute, locator_for};
use crate::error::{Error, Result};
use crate::file::{DiskKind, OpenOptions, VhdxFile};
use crate::format::{KEY_PARENT_LINKAGE, KEY_PARENT_LINKAGE2, parse_braced_guid};
use std::path::{Path, PathBuf};

/// What [`set_parent`] did.
#[derive(Clone, Debug)]
pub struct SetParentOutcome {
    /// The parent the child now names (absolute).
    pub parent: PathBuf,
    /// The parent the child named before, when its locator named one.
    pub previous: Option<PathBuf>,
    /// Whether the parent's DataWriteGuid matched the child's linkage. When it did not
    /// (only with `ignore_id_mismatch`), the linkage was rewritten to the new parent's.
    pub id_matched: bool,
}

/// Points the differencing file `child` at `parent`, keeping its linkage.
///
/// Refuses (without changing anything) a child that is not differencing, a parent whose
/// virtual size or logical sector size differs, a parent whose own chain leads back to the
/// child, and, unless `ignore_id_mismatch`, a parent whose DataWriteGuid is neither of the
/// child's linkages: such a parent was changed after the child was made (or is another
/// disk), and the child would read a mix of two disks. With `ignore_id_mismatch` the
/// linkage is set to the parent's current DataWriteGuid.
pub fn set_parent(
    child: &Path,
    parent: &Path,
    ignore_id_mismatch: bool,
) -> Result<SetParentOutcome> {
    let child_file = VhdxFile::open(child, OpenOptions::default())?;
    let locator = match (child_file.kind(), child_file.parent_locator()) {
        (DiskKind::Differencing, Some(l)) => l,
        _ => {
            return Err(Error::Unsupported {
                path: child.to_owned(),
                reason: "not a differencing file, so it has no parent to set".into(),
            });
        }
    };
    let child_abs = absolute(child)?;
    let parent_abs = absolute(parent)?;
    if child_abs == parent_abs {
        return Err(Error::InvalidParameters(format!(
            "{} cannot be its own parent",
            child.display()
        )));
    }
    let parent_file = VhdxFile::open(parent, OpenOptions::default())?;
    let (cg, pg) = (child_file.geometry(), parent_file.geometry());
    let what = if cg.virtual_size != pg.virtual_size {
        Some("virtual size")
    } else if cg.logical_sector_size != pg.logical_sector_size {
        Some("logical sector size")
    } else {
        None
    };
    if let Some(what) = what {
        return Err(Error::ParentMismatch {
            child: child.to_owned(),
            parent: parent.to_owned(),
            what,
        });
    }
    // A loop would make every read of the chain fail; the chain below the new parent must
    // also open, or the repair would only move the break.
    let mut below = VhdxFile::open(parent, OpenOptions::default())?;
    for _ in 0..MAX_CHAIN_DEPTH {
        if below.kind() != DiskKind::Differencing {
            break;
        }
        let next = open_parent(&below)?;
        if absolute(next.path())? == child_abs {
            return Err(Error::BadChain {
                path: parent.to_owned(),
                reason: format!("leads back to {}", child.display()),
            });
        }
        below = next;
    }
    drop(below);
    let linkage = locator.get(KEY_PARENT_LINKAGE).and_then(parse_braced_guid);
    let linkage2 = locator
        .get(KEY_PARENT_LINKAGE2)
        .and_then(parse_braced_guid)
        .filter(|g| !g.is_nil());
    let dwg = parent_file.data_write_guid();
    let id_matched = Some(dwg) == linkage || Some(dwg) == linkage2;
    if !id_matched && !ignore_id_mismatch {
        return Err(Error::ParentLinkageMismatch {
            child: child.to_owned(),
            parent: parent.to_owned(),
            expected: locator.get(KEY_PARENT_LINKAGE).unwrap_or("").to_owned(),
            actual: dwg,
        });
    }
    let previous = crate::chain::parent_candidates(child, &locator)
        .into_iter()
        .next();
    let mut new_locator = locator_for(child, parent, dwg)?;
    if id_matched {
        // Only the paths change: the linkages (an interrupted merge's second one too)
        // stay exactly as they were.
        for key in [KEY_PARENT_LINKAGE, KEY_PARENT_LINKAGE2] {
            if let Some(v) = locator.get(key) {
                new_locator.set(key, v.to_owned());
            }
        }
    }
    drop(parent_file);
    drop(child_file);
    let child_file = VhdxFile::open(
        child,
        OpenOptions {
            writable: true,
            keep_data_write_guid: true,
            data_write_guid: None,
            shared_lock: false,
        },
    )?;
    child_file.set_parent_locator(&new_locator)?;
    child_file.close()?;
    Ok(SetParentOutcome {
        parent: parent_abs,
        previous,
        id_matched,
    })
}
