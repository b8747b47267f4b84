//! What `checkpoint delete` and `vm consolidate` would change, for `--dry-run`: the same
//! tree edit and the same reconciliation rules as [`crate::Vm`], run on a copy of the
//! committed state. Nothing is locked or written; the layer files are only read, for the
//! bytes each merge would copy.
//!
//! The first merge's bytes and direction are exact (measured on the files as they are).
//! A later merge in the same run involves a file an earlier one changes, so its figures
//! are measured on the files as they are now and marked `estimated`.

use crate::error::Result;
use crate::journal::Direction;
use crate::state::VmState;
use crate::vm::find_checkpoint;
use std::collections::BTreeSet;
use std::path::Path;
use uuid::Uuid;

/// A merge a command would run.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PreviewMerge {
    /// The layer that would be merged away.
    pub removed: String,
    /// The layer that would hold the data.
    pub into: String,
    /// Which way the data would move.
    pub direction: Direction,
    /// Bytes it would copy.
    pub bytes: u64,
    /// Whether `bytes` and `direction` are measured on files an earlier merge of the same
    /// run changes first.
    pub estimated: bool,
}

/// What a command would change.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Preview {
    /// Checkpoints that would be removed (id, name), the one named first.
    pub checkpoints_removed: Vec<(Uuid, String)>,
    /// Merges, in order.
    pub merges: Vec<PreviewMerge>,
    /// Layers that would be removed because nothing depends on them.
    pub layers_removed: Vec<String>,
    /// Hidden layers that would stay (two or more layers depend on each).
    pub hidden_layers_kept: Vec<(String, usize)>,
}

/// What `checkpoint delete` of `query` (with `subtree`) would do to the VM in `dir`.
pub fn preview_delete_checkpoint(
    dir: &Path,
    state: &VmState,
    query: &str,
    subtree: bool,
) -> Result<Preview> {
    let id = find_checkpoint(state, query)?;
    let node = state.checkpoint(id).expect("found").clone();
    let removed: Vec<Uuid> = if subtree { state.subtree(id) } else { vec![id] };
    let removed_set: BTreeSet<Uuid> = removed.iter().copied().collect();
    let mut next = state.clone();
    next.checkpoints.retain(|c| !removed_set.contains(&c.id));
    for c in &mut next.checkpoints {
        if c.parent.is_some_and(|p| removed_set.contains(&p)) {
            c.parent = node.parent;
        }
    }
    if next.now.parent.is_some_and(|p| removed_set.contains(&p)) {
        next.now.parent = node.parent;
    }
    let mut preview = Preview {
        checkpoints_removed: removed
            .iter()
            .map(|r| {
                let name = state
                    .checkpoint(*r)
                    .map(|c| c.name.clone())
                    .unwrap_or_default();
                (*r, name)
            })
            .collect(),
        ..Preview::default()
    };
    reconcile(dir, &mut next, &mut preview)?;
    Ok(preview)
}

/// What `vm consolidate` would merge and remove in the VM in `dir`.
pub fn preview_consolidate(dir: &Path, state: &VmState) -> Result<Preview> {
    let mut next = state.clone();
    let mut preview = Preview::default();
    reconcile(dir, &mut next, &mut preview)?;
    Ok(preview)
}

/// What reconciliation would do to `state` (edited in place to its end state): for
/// changes whose tree edit is made elsewhere (`vm disk remove`).
pub fn preview_reconcile(dir: &Path, state: &mut VmState) -> Result<Preview> {
    let mut preview = Preview::default();
    reconcile(dir, state, &mut preview)?;
    Ok(preview)
}

/// [`crate::Vm::reconcile`]'s loop on `state`: remove hidden layers nothing depends on,
/// merge those one layer depends on, until neither is left.
fn reconcile(dir: &Path, state: &mut VmState, out: &mut Preview) -> Result<()> {
    let mut touched: BTreeSet<String> = BTreeSet::new();
    loop {
        let hidden = state.hidden_layers();
        let pick = hidden
            .iter()
            .find(|(_, d)| *d == 0)
            .or_else(|| hidden.iter().find(|(_, d)| *d == 1));
        let Some((layer, deps)) = pick.cloned() else {
            out.hidden_layers_kept = hidden;
            return Ok(());
        };
        if deps == 0 {
            state.layers.remove(&layer);
            out.layers_removed.push(layer);
            continue;
        }
        let child = state.dependants(&layer).remove(0);
        let estimate = vhdx::estimate(&dir.join(crate::journal::DISKS_DIR).join(&child))?;
        let estimated = touched.contains(&layer) || touched.contains(&child);
        let (direction, bytes) = if estimate.into_child < estimate.into_parent {
            (Direction::IntoChild, estimate.into_child)
        } else {
            (Direction::IntoParent, estimate.into_parent)
        };
        // The state edit of the merge's journal (see `Vm::merge_plan`).
        let (removed, into) = match direction {
            Direction::IntoParent => {
                for r in state.dependants(&child) {
                    state.layers.get_mut(&r).expect("dependant").parent = Some(layer.clone());
                }
                state.layers.remove(&child);
                let rename = |f: &mut String| {
                    if *f == child {
                        *f = layer.clone();
                    }
                };
                state.now.disks.iter_mut().for_each(rename);
                for c in &mut state.checkpoints {
                    c.disks.iter_mut().for_each(rename);
                }
                (child, layer)
            }
            Direction::IntoChild => {
                let grandparent = state.layers[&layer].parent.clone();
                state.layers.get_mut(&child).expect("child").parent = grandparent;
                state.layers.remove(&layer);
                (layer, child)
            }
        };
        touched.insert(removed.clone());
        touched.insert(into.clone());
        out.merges.push(PreviewMerge {
            removed,
            into,
            direction,
            bytes,
            estimated,
        });
    }
}
