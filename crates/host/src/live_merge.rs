//! Merges under a running guest: what deleting a checkpoint of a running VM leaves to
//! merge in the chains the guest is using.
//!
//! A hidden layer `H` of Now's chain with one dependant `D` is merged while the guest
//! reads and writes, in the direction that copies fewer bytes, then the served chain is
//! switched in one short step during which requests wait (the guest's only stall
//! besides waiting, per block, for a copy of that block):
//!
//! - `D` below the top (a checkpoint's layer): the engine merges the two files as it does
//!   offline ([`vhdx::merge_live`]), the chain's own read-only view staying valid
//!   throughout; the switch closes the chain, runs the journal (relinks, commit) and opens
//!   the new chain.
//! - `D` is Now's writable layer, merged into `H` (what Hyper-V does): `D` announces the
//!   new DataWriteGuid of `H` in its `parent_linkage2` (so the chain stays linked if the
//!   worker dies), guest writes are mirrored into `H` while a copier moves what `D`
//!   stores into `H` block by block under the block's stripe lock; the switch closes both,
//!   removes `D`, runs the journal (Now's layer becomes `H`) and opens `H`.
//! - `H` merged into Now's `D`: the copier fills what `D` does not store from `H`, under
//!   the same locks, through the served chain; the switch runs the journal, whose engine
//!   merge finds nothing left to copy and points `D` past `H`.
//!
//! Every merge is journaled before any data moves ([`vm::Vm::plan_merge`]): a worker
//! killed at any instant leaves the chain reading what it read, and the next open of the
//! VM runs the journal (the engine's merge), which finds what was already copied (into the
//! child, nothing is copied twice; into the parent, the copy is redone).

use crate::error::{Context, Error, Result};
use crate::protocol::LiveMerge;
use crate::served::ServedDisk;
use crate::session::Session;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;
use vhdx::{Chain, OpenOptions, Segment};
use vm::journal::Direction;

/// Threads that copy (reads and writes overlap across them).
const COPIERS: u64 = 2;
/// The destination is flushed after about this many bytes, so write-back overlaps the copy.
const FLUSH_EVERY: u64 = 64 << 20;

/// Merges every hidden layer of Now's chains that one layer depends on; returns what each
/// merge did and measured.
pub(crate) fn merge_all(session: &Session) -> Result<Vec<LiveMerge>> {
    let mut out = Vec::new();
    loop {
        let next = {
            let vm = session.vm();
            vm.live_merge_candidate().map(|(layer, child)| {
                let disk = vm.state().layers[&layer].disk.clone();
                let index = vm
                    .state()
                    .config
                    .hardware
                    .disks
                    .iter()
                    .position(|d| d.name == disk);
                let top = index.map(|i| vm.state().now.disks[i] == child);
                (
                    layer.clone(),
                    child.clone(),
                    index,
                    top,
                    vm.layer_path(&layer),
                    vm.layer_path(&child),
                )
            })
        };
        let Some((layer, child, Some(index), Some(is_top), layer_path, child_path)) = next else {
            break;
        };
        out.push(merge_one(
            session,
            index,
            (&layer, &layer_path),
            (&child, &child_path),
            is_top,
        )?);
    }
    Ok(out)
}

fn merge_one(
    session: &Session,
    index: usize,
    (layer, layer_path): (&str, &Path),
    (child, child_path): (&str, &Path),
    is_top: bool,
) -> Result<LiveMerge> {
    let served = &session.disks[index];
    let estimate = if is_top {
        served.with_chain(|c| vhdx::estimate_open(c.top(), &c.layers()[1]))??
    } else {
        vhdx::estimate(child_path)?
    };
    let direction = if estimate.into_child < estimate.into_parent {
        Direction::IntoChild
    } else {
        Direction::IntoParent
    };
    let started = Instant::now();
    record_merge(served, (layer_path, child_path), direction);
    // Before the journal: a worker killed once the merge is planned leaves it to the
    // replay, which gives the parent the GUID found here.
    if direction == Direction::IntoParent {
        if is_top {
            served.with_chain(|c| announce_top_session_guid(served, c))??;
        } else {
            announce_session_guid(served, child_path, layer_path)?;
        }
    }
    let planned = session.vm().plan_merge(layer, direction)?;
    vm::fsutil::crashpoint("live merge: planned");
    let token = planned.token();
    if !is_top {
        // Still timed: the switch holds writes back.
        served.begin_merge(None);
    }
    let t = Instant::now();
    let moved = (|| -> Result<u64> {
        vm::fsutil::set_read_only(layer_path, false)?;
        vm::fsutil::set_read_only(child_path, false)?;
        match (is_top, direction) {
            (true, Direction::IntoParent) => copy_top_into_parent(served, &|durable| {
                // A merge run again after a crash resumes here.
                if let Err(e) =
                    vm::journal::record_merge_progress(&session.dir, &token, child, durable)
                {
                    tracing::warn!("recording the progress of merging {child}: {e}");
                }
            }),
            (true, Direction::IntoChild) => copy_parent_into_top(served),
            (false, d) => {
                let d = match d {
                    Direction::IntoParent => vhdx::MergeDirection::IntoParent,
                    Direction::IntoChild => vhdx::MergeDirection::IntoChild,
                };
                Ok(vhdx::merge_live(child_path, d, &mut |_, _| {})?.bytes_copied)
            }
        }
    })();
    let bytes = match moved {
        Ok(b) => b,
        Err(e) => {
            // Nothing was committed and what moved changed nothing the chain reads.
            served.end_merge(|_, mirror| drop(mirror));
            let _ = session.vm().abandon_merge(planned);
            return Err(e).context(format!(
                "merging layer {layer} with {child} under the running guest failed; it stays hidden and is merged when the VM stops"
            ));
        }
    };
    let copy_secs = t.elapsed().as_secs_f64();
    vm::fsutil::crashpoint("live merge: copied");
    // Link the files up while requests go on (what the merged chain needs that the
    // current one does not care about), then the switch: requests wait only while the
    // served chain is rebuilt from files already open. The commit and the removal of the
    // merged-away layer come after; until the commit, a replay of the journal after a
    // crash finds the merge done.
    link_up(served, (layer, layer_path), child_path, is_top, direction)?;
    let aside = child_path.with_file_name(format!(".{child}.tmp-{}", std::process::id()));
    let switch = Instant::now();
    let old = served.end_merge(|slot, mirror| -> Result<Option<disk::VhdxDisk>> {
        let current = slot.take().ok_or_else(|| Error::ServedChain {
            reason: "the disk is not open".into(),
        })?;
        let rebuilt = rebuild(
            current, mirror, layer_path, child_path, is_top, direction, &aside,
        );
        match rebuilt {
            Ok((new, old)) => {
                *slot = Some(new);
                Ok(old)
            }
            Err((e, current)) => {
                *slot = current;
                Err(e)
            }
        }
    });
    let switch_ms = switch.elapsed().as_secs_f64() * 1e3;
    let old = match old {
        Ok(old) => old,
        Err(e) => {
            let _ = session.vm().abandon_merge(planned);
            return Err(e).context("switching to the merged chain; the layer stays hidden and is merged when the VM stops");
        }
    };
    // The replaced chain's files close here (Now's old layer, when it merged away).
    drop(old);
    vm::fsutil::crashpoint("live merge: switched");
    session.vm().commit_merge(&planned, true)?;
    vm::fsutil::crashpoint("live merge: committed");
    let longest_write_ms = served.longest_write_ms();
    let _ = std::fs::remove_file(&aside);
    let done = session.vm().finish_merge(planned)?;
    Ok(LiveMerge {
        removed: done.removed,
        into: done.into,
        direction: done.direction,
        bytes_copied: bytes,
        copy_seconds: copy_secs,
        switch_ms,
        longest_write_ms,
        total_seconds: started.elapsed().as_secs_f64(),
    })
}

/// Tells the disk's tracker, before the journal, which layer the merge takes out of the
/// chain (as it is now), so that a worker killed meanwhile leaves a tracking that accepts
/// the chain the replay of the journal leaves. A failure is logged: the tracking then finds
/// the merged chain unknown (invalid, the next backup an express full), never wrong.
fn record_merge(
    served: &ServedDisk,
    (layer_path, child_path): (&Path, &Path),
    direction: Direction,
) {
    let Some(t) = served.tracker() else { return };
    let name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let (away, into) = match direction {
        Direction::IntoParent => (name(child_path), name(layer_path)),
        Direction::IntoChild => (name(layer_path), name(child_path)),
    };
    let recorded = served
        .with_chain(vm::tracking::chain_seen)
        .map_err(vm::Error::from)
        .and_then(|seen| {
            t.update(|t| {
                t.set_chain(seen);
                t.set_merging(vm::tracking::MergeSeen { away, into });
            })
        });
    if let Err(e) = recorded {
        tracing::warn!("change tracking: cannot record the merge: {e}");
    }
}

/// Before Now's layer merges into its parent: the GUID the parent takes at the merge's
/// first write, announced in Now's `parent_linkage2` and made durable. When none is there
/// yet it becomes the session's own, so that the tracker accepts the parent after a worker
/// kill (the parent is served by the session once Now's layer merged into it); one already
/// there is kept, because the parent may carry it from an earlier, abandoned merge.
fn announce_top_session_guid(served: &ServedDisk, c: &Chain) -> Result<uuid::Uuid> {
    let parent = c.layers().get(1).and_then(|p| p.path().file_name());
    let mut announced = false;
    let g = vhdx::announce_merge_guid(c.top(), || {
        announced = true;
        match (served.session(), parent) {
            (Some(s), Some(p)) => vm::tracking::session_guid(s, &p.to_string_lossy()),
            _ => uuid::Uuid::new_v4(),
        }
    })?;
    if announced {
        c.top().flush()?;
    }
    Ok(g)
}

/// Before an into-parent merge below the top: the DataWriteGuid the parent takes at the
/// merge's first write, announced in the child's `parent_linkage2` (as the engine does,
/// which reuses it, a replay after a crash included), is the session's rather than a
/// random one, so that the tracker recognises the parent after a worker kill.
fn announce_session_guid(served: &ServedDisk, child_path: &Path, layer_path: &Path) -> Result<()> {
    let (Some(s), Some(parent)) = (served.session(), layer_path.file_name()) else {
        return Ok(());
    };
    let f = open_beside_the_guest(child_path)?;
    // Not differencing: the merge refuses it.
    if f.kind() == vhdx::DiskKind::Differencing {
        vhdx::announce_merge_guid(&f, || {
            vm::tracking::session_guid(s, &parent.to_string_lossy())
        })?;
    }
    f.close()?;
    Ok(())
}

type Rebuilt = (disk::VhdxDisk, Option<disk::VhdxDisk>);

/// Before the switch: points the file that depended on the merged-away layer at the file
/// that now holds its data, through handles that share the served chain's locks. None of
/// it changes what the served chain reads.
fn link_up(
    served: &ServedDisk,
    (layer, layer_path): (&str, &Path),
    child_path: &Path,
    is_top: bool,
    direction: Direction,
) -> Result<()> {
    match (is_top, direction) {
        // Now's layer itself goes away.
        (true, Direction::IntoParent) => Ok(()),
        // Now's layer skips its parent: at the grandparent, or (when the parent was a base
        // disk) at nothing, which changes the file's kind and waits for the switch.
        (true, Direction::IntoChild) => served.with_chain(|c| -> Result<()> {
            let parent = &c.layers()[1];
            if parent.kind() != vhdx::DiskKind::Differencing {
                return Ok(());
            }
            let gp = &c.layers()[2];
            let locator =
                vhdx::locator_for(&absolute(child_path)?, gp.path(), gp.data_write_guid())?;
            c.top().set_parent_locator(&locator)?;
            Ok(())
        })?,
        // Below the top: an into-child merge relinked the child itself; after an
        // into-parent one, whatever depended on the removed child points at the parent.
        (false, Direction::IntoChild) => Ok(()),
        (false, Direction::IntoParent) => {
            let dependant = served.with_chain(|c| {
                let paths = c.paths();
                let at = paths.iter().position(|p| same_file(p, child_path));
                at.and_then(|i| i.checked_sub(1))
                    .map(|i| (i, paths[i].clone()))
            })?;
            let Some((index, path)) = dependant else {
                return Err(not_in_chain(child_path));
            };
            let parent = vhdx::VhdxFile::open(layer_path, OpenOptions::default())?;
            let locator =
                vhdx::locator_for(&absolute(&path)?, layer_path, parent.data_write_guid())
                    .with_context(|| format!("relinking to {layer}"))?;
            if index == 0 {
                served.with_chain(|c| c.top().set_parent_locator(&locator))??;
            } else {
                let f = open_beside_the_guest(&path)?;
                f.set_parent_locator(&locator)?;
                f.close()?;
            }
            Ok(())
        }
    }
}

/// Opens a layer of a served chain writable beside the worker's own read-only handle (a
/// shared lock), keeping its DataWriteGuid: only its metadata changes.
fn open_beside_the_guest(path: &Path) -> Result<vhdx::VhdxFile> {
    let options = OpenOptions {
        writable: true,
        keep_data_write_guid: true,
        shared_lock: true,
        ..OpenOptions::default()
    };
    Ok(vhdx::VhdxFile::open(path, options)?)
}

fn absolute(path: &Path) -> Result<std::path::PathBuf> {
    std::path::absolute(path).map_err(|e| Error::io(path, e))
}

fn not_in_chain(path: &Path) -> Error {
    Error::ServedChain {
        reason: format!("{} is not in the served chain", path.display()),
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    std::path::absolute(a).ok() == std::path::absolute(b).ok()
}

/// With requests held back: the served chain after the merge, and what it replaces (to be
/// dropped once requests flow again). On failure the current chain comes back.
// The failure hands the chain back with the error; it happens once per merge at most.
#[allow(clippy::type_complexity, clippy::result_large_err)]
fn rebuild(
    current: disk::VhdxDisk,
    mirror: Option<Chain>,
    layer_path: &Path,
    child_path: &Path,
    is_top: bool,
    direction: Direction,
    aside: &Path,
) -> std::result::Result<Rebuilt, (Error, Option<disk::VhdxDisk>)> {
    match (is_top, direction) {
        (true, Direction::IntoParent) => {
            // The parent, written through the mirror, holds all of Now's data: Now's
            // layer leaves before any write goes to the parent alone, so that a replay
            // of the journal after a crash finds the merge done instead of copying the
            // old layer over newer writes.
            let mirror = match mirror {
                Some(m) => m,
                None => {
                    let e = Error::ServedChain {
                        reason: "no mirror".into(),
                    };
                    return Err((e, Some(current)));
                }
            };
            let moved = std::fs::rename(child_path, aside)
                .map_err(|e| Error::io(child_path, e))
                .and_then(|()| Ok(vm::fsutil::sync_dir_of(child_path)?));
            if let Err(e) = moved {
                return Err((e, Some(current)));
            }
            Ok((disk::VhdxDisk::from_chain(mirror, true), Some(current)))
        }
        (true, Direction::IntoChild) => {
            let mut layers = current.into_chain().into_layers();
            let parent = layers.remove(1);
            if parent.kind() != vhdx::DiskKind::Differencing {
                // A standalone file now: change its kind, then open it again.
                drop(parent);
                let top = layers.remove(0);
                let path = top.path().to_owned();
                let reopen = || -> Result<disk::VhdxDisk> {
                    top.detach_from_parent()?;
                    Ok(disk::VhdxDisk::open(&path, true)?)
                };
                return match reopen() {
                    Ok(d) => Ok((d, None)),
                    Err(e) => Err((e, disk::VhdxDisk::open(&path, true).ok())),
                };
            }
            drop(parent);
            match Chain::from_layers(layers) {
                Ok(c) => Ok((disk::VhdxDisk::from_chain(c, true), None)),
                Err(e) => Err((e.into(), None)),
            }
        }
        (false, direction) => {
            // The merged file changed under the chain's read-only handle: open it afresh
            // in its place, without the merged-away one.
            let mut layers = current.into_chain().into_layers();
            let Some(at) = layers.iter().position(|l| same_file(l.path(), child_path)) else {
                let top = layers[0].path().to_owned();
                drop(layers);
                return Err((
                    not_in_chain(child_path),
                    disk::VhdxDisk::open(&top, true).ok(),
                ));
            };
            let holder = match direction {
                Direction::IntoChild => child_path,
                Direction::IntoParent => layer_path,
            };
            match vhdx::VhdxFile::open(holder, OpenOptions::default()) {
                Ok(fresh) => {
                    layers.splice(at..at + 2, [fresh]);
                    match Chain::from_layers(layers) {
                        Ok(c) => Ok((disk::VhdxDisk::from_chain(c, true), None)),
                        Err(e) => Err((e.into(), None)),
                    }
                }
                Err(e) => {
                    let top = layers[0].path().to_owned();
                    drop(layers);
                    Err((e.into(), disk::VhdxDisk::open(&top, true).ok()))
                }
            }
        }
    }
}

/// Now's layer into its parent, with the guest's writes mirrored there meanwhile.
fn copy_top_into_parent(served: &ServedDisk, durable: &(dyn Fn(u64) + Sync)) -> Result<u64> {
    let mirror = served.with_chain(|c| -> Result<Chain> {
        let guid = announce_top_session_guid(served, c)?;
        let parent = vhdx::open_parent_with(
            c.top(),
            OpenOptions {
                writable: true,
                keep_data_write_guid: false,
                data_write_guid: Some(guid),
                shared_lock: true,
            },
        )?;
        Ok(Chain::from_top(parent)?)
    })??;
    served.begin_merge(Some(mirror));
    copy_blocks(served, Some(durable), |c, m, start, len| {
        let m = m.expect("a mirror during a merge into the parent");
        let mut segs = Vec::new();
        let mut at = start;
        c.top().resolve(start, len, &mut |seg| {
            segs.push((at, seg));
            at += seg.len();
            Ok(())
        })?;
        let mut copied = 0;
        for (offset, seg) in segs {
            match seg {
                Segment::Data { len, .. } => {
                    let mut buf = vec![0u8; len as usize];
                    c.read_at(&mut buf, offset)?;
                    m.write_at(&buf, offset)?;
                    copied += len;
                }
                Segment::Zero { len } => m.write_zeroes(offset, len)?,
                Segment::Parent { .. } => {}
            }
        }
        Ok(copied)
    })
}

/// The parent's own data into Now's layer, where Now's layer stores nothing.
fn copy_parent_into_top(served: &ServedDisk) -> Result<u64> {
    served.begin_merge(None);
    copy_blocks(served, None, |c, _, start, len| {
        let layers = c.layers();
        let (pieces, fill_zeros) = vhdx::into_child_pieces(&layers[0], &layers[1], start, len)?;
        let mut copied = 0;
        for (offset, seg) in pieces {
            match seg {
                Segment::Data { len, .. } => {
                    let mut buf = vec![0u8; len as usize];
                    c.read_at(&mut buf, offset)?;
                    c.write_at(&buf, offset)?;
                    copied += len;
                }
                Segment::Zero { len } if fill_zeros => c.write_zeroes(offset, len)?,
                Segment::Zero { .. } | Segment::Parent { .. } => {}
            }
        }
        Ok(copied)
    })
}

/// Runs `copy` on every block of Now's layer, a block at a time under its stripe lock,
/// on [`COPIERS`] threads; flushes the destination as it goes and at the end. After each
/// flush, `durable` hears the offset below which every block is copied and flushed.
fn copy_blocks(
    served: &ServedDisk,
    durable: Option<&(dyn Fn(u64) + Sync)>,
    copy: impl Fn(&Chain, Option<&Chain>, u64, u64) -> vhdx::Result<u64> + Sync,
) -> Result<u64> {
    let (size, block) =
        served.with_chain(|c| (c.virtual_size(), u64::from(c.top().geometry().block_size)))?;
    let blocks = size.div_ceil(block);
    let next = AtomicU64::new(0);
    let copied = AtomicU64::new(0);
    let unflushed = AtomicU64::new(0);
    let complete: Vec<AtomicBool> = (0..blocks).map(|_| AtomicBool::new(false)).collect();
    let frontier = Mutex::new(0u64);
    let flush = || -> Result<()> {
        let mut f = frontier.lock().unwrap_or_else(|p| p.into_inner());
        // What is complete before the flush is durable after it.
        while *f < blocks && complete[*f as usize].load(Ordering::Acquire) {
            *f += 1;
        }
        let below = (*f * block).min(size);
        // The chain and, during a merge into the parent, the mirror.
        disk::Disk::flush(served)?;
        if let Some(d) = durable {
            d(below);
        }
        Ok(())
    };
    std::thread::scope(|s| -> Result<()> {
        let workers: Vec<_> = (0..COPIERS)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    loop {
                        let b = next.fetch_add(1, Ordering::SeqCst);
                        if b >= blocks {
                            return Ok(());
                        }
                        let start = b * block;
                        let len = block.min(size - start);
                        let n = served
                            .with_range_locked(start, len, |c, m| copy(c, m, start, len))??;
                        complete[b as usize].store(true, Ordering::Release);
                        copied.fetch_add(n, Ordering::SeqCst);
                        if unflushed.fetch_add(n, Ordering::SeqCst) + n >= FLUSH_EVERY {
                            unflushed.store(0, Ordering::SeqCst);
                            flush()?;
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().expect("copier panicked")?;
        }
        Ok(())
    })?;
    flush()?;
    Ok(copied.load(Ordering::SeqCst))
}
