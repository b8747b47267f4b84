//! The disk a running VM's worker serves to QEMU for each virtual disk: the VHDX chain of
//! Now's layer, which the worker can change under the running guest.
//!
//! - **Switching.** [`ServedDisk::switch`] holds every request back (it waits for those
//!   in flight, and new ones wait for it), so the chain can be closed, its files changed
//!   and a new chain opened in between: the guest sees a slower request, never an error.
//! - **Live merges.** While a merge moves data under the guest, writes take a lock on the
//!   stripes of the range they touch, and the merge's copier takes the same lock for the
//!   block it copies, so the copier never writes stale data over a newer guest write.
//!   For a merge of Now's layer into its parent, every guest write (and discard, and
//!   flush) also goes to the parent's chain (the *mirror*), after Now's layer: whatever
//!   the copier has copied stays equal to Now's layer, and Now's layer always holds every
//!   acknowledged write, so a crash leaves the chain reading exactly what it did.
//! - Reads take no lock beyond the chain's own: neither a copy nor the mirror changes
//!   what the chain reads.
//! - **Change tracking.** With a tracker ([`ServedDisk::track`]), every write,
//!   write-zeroes and discard first makes sure its regions are durably marked
//!   ([`vm::tracking::LiveTracker::mark`]: an atomic test per region once marked), so the
//!   marked set is a superset of the changes whatever crashes. Files opened writable by
//!   a worker session take the session's DataWriteGuid ([`vm::tracking::session_guid`])
//!   at their first write, so the tracker recognises them after a worker kill.

use disk::{Disk, Extent, VhdxDisk};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::Instant;

/// Bytes of the disk one stripe lock covers (a copier works a block at a time: the
/// differencing default of 2 MiB or a divisor of larger blocks).
const STRIPE_BYTES: u64 = 1 << 20;
const STRIPES: usize = 512;

/// One served disk (see the module doc).
pub struct ServedDisk {
    size: u64,
    sector: u32,
    chain: RwLock<Option<VhdxDisk>>,
    mirror: RwLock<Option<vhdx::Chain>>,
    merging: AtomicBool,
    stripes: Vec<Mutex<()>>,
    /// The longest a guest write took (waits included) since the last merge began, in µs.
    longest_write_us: AtomicU64,
    /// Whether writes are timed for a backup ([`ServedDisk::watch_writes`]).
    watching: AtomicBool,
    /// The longest a guest write took since [`ServedDisk::watch_writes`], in µs.
    longest_watched_us: AtomicU64,
    /// The worker session whose DataWriteGuid writable opens give their top file.
    session: Option<uuid::Uuid>,
    /// The change tracker, once the worker started it.
    tracker: OnceLock<Arc<vm::tracking::LiveTracker>>,
}

impl std::fmt::Debug for ServedDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedDisk")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

fn detached() -> disk::Error {
    disk::Error::Io {
        path: "(disk being switched)".into(),
        source: std::io::Error::other("the disk is closed while the VM's worker switches it"),
    }
}

impl ServedDisk {
    /// Opens the chain of `path` for the guest (writable).
    pub fn open(path: &Path) -> disk::Result<ServedDisk> {
        ServedDisk::open_in_session(path, None)
    }

    /// Opens the chain of `path` for the guest (writable); with `session`, the top file
    /// (and every top file [`ServedDisk::reopen`] opens) takes the session's
    /// DataWriteGuid at its first write.
    pub fn open_in_session(path: &Path, session: Option<uuid::Uuid>) -> disk::Result<ServedDisk> {
        let d = open_top(path, session)?;
        Ok(ServedDisk {
            size: d.size(),
            sector: d.sector_size(),
            chain: RwLock::new(Some(d)),
            mirror: RwLock::new(None),
            merging: AtomicBool::new(false),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            longest_write_us: AtomicU64::new(0),
            watching: AtomicBool::new(false),
            longest_watched_us: AtomicU64::new(0),
            session,
            tracker: OnceLock::new(),
        })
    }

    /// Marks every later change in `tracker` before making it (once per disk).
    pub fn track(&self, tracker: Arc<vm::tracking::LiveTracker>) {
        let _ = self.tracker.set(tracker);
    }

    /// The worker session whose DataWriteGuid the files it writes take.
    pub fn session(&self) -> Option<uuid::Uuid> {
        self.session
    }

    /// The change tracker, if started.
    pub fn tracker(&self) -> Option<&Arc<vm::tracking::LiveTracker>> {
        self.tracker.get()
    }

    /// Runs `f` on the chain slot with every request held back.
    pub fn switch<T>(&self, f: impl FnOnce(&mut Option<VhdxDisk>) -> T) -> T {
        let mut slot = self.chain.write().unwrap_or_else(|p| p.into_inner());
        f(&mut slot)
    }

    /// Flushes and closes the chain (requests fail until [`ServedDisk::reopen`]; the
    /// guest must be paused).
    pub fn close(&self) -> disk::Result<()> {
        self.switch(|slot| match slot.take() {
            Some(d) => {
                d.flush()?;
                d.close()
            }
            None => Ok(()),
        })
    }

    /// Opens the chain of `path` in place of the closed one.
    pub fn reopen(&self, path: &Path) -> disk::Result<()> {
        let d = open_top(path, self.session)?;
        self.switch(|slot| *slot = Some(d));
        Ok(())
    }

    /// Creates `path` as an empty differencing child of the open top layer `parent`, for
    /// a switch to come, while requests go on: the top's DataWriteGuid is settled first,
    /// so the child stays linked to it whatever the guest writes until the switch.
    pub fn prepare_child(&self, parent: &Path, path: &Path) -> disk::Result<()> {
        self.with_chain(|c| -> disk::Result<()> {
            let top = c.top();
            if top.path() != parent {
                return Err(disk::Error::Io {
                    path: parent.to_owned(),
                    source: std::io::Error::other(format!(
                        "the disk serves {}, not the layer a new checkpoint would build on",
                        top.path().display()
                    )),
                });
            }
            top.settle_data_write_guid()?;
            vhdx::create_differencing_of(path, top, None)?;
            Ok(())
        })?
    }

    /// Runs `f` on the open chain (requests go on meanwhile).
    pub fn with_chain<T>(&self, f: impl FnOnce(&vhdx::Chain) -> T) -> disk::Result<T> {
        let slot = self.chain.read().unwrap_or_else(|p| p.into_inner());
        let d = slot.as_ref().ok_or_else(detached)?;
        Ok(f(d.chain()))
    }

    /// Starts a live merge: from now on writes take stripe locks, and with `mirror` they
    /// also go to that chain. Waits for the writes in flight.
    pub fn begin_merge(&self, mirror: Option<vhdx::Chain>) {
        self.longest_write_us.store(0, Ordering::SeqCst);
        self.switch(|_| {
            *self.mirror.write().unwrap_or_else(|p| p.into_inner()) = mirror;
            self.merging.store(true, Ordering::SeqCst);
        });
    }

    /// Ends a live merge with every request held back: `f` gets the chain slot and the
    /// mirror (no write reaches either meanwhile), to close, change and reopen them.
    pub fn end_merge<T>(
        &self,
        f: impl FnOnce(&mut Option<VhdxDisk>, Option<vhdx::Chain>) -> T,
    ) -> T {
        self.switch(|slot| {
            self.merging.store(false, Ordering::SeqCst);
            let m = self
                .mirror
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            f(slot, m)
        })
    }

    /// Runs `f` on the chain and the mirror with the stripes of `[offset, offset+len)`
    /// locked against guest writes: what a live merge's copier does, a block at a time.
    pub fn with_range_locked<T>(
        &self,
        offset: u64,
        len: u64,
        f: impl FnOnce(&vhdx::Chain, Option<&vhdx::Chain>) -> T,
    ) -> disk::Result<T> {
        let slot = self.chain.read().unwrap_or_else(|p| p.into_inner());
        let d = slot.as_ref().ok_or_else(detached)?;
        let _held = self.lock_stripes(offset, len)?;
        let mirror = self.mirror.read().unwrap_or_else(|p| p.into_inner());
        Ok(f(d.chain(), mirror.as_ref()))
    }

    /// The longest a guest write (or discard) took, waits included, since the last
    /// [`ServedDisk::begin_merge`], in milliseconds.
    pub fn longest_write_ms(&self) -> f64 {
        self.longest_write_us.load(Ordering::SeqCst) as f64 / 1e3
    }

    /// Times every guest write from now on (a backup's copy runs beside them), until
    /// [`ServedDisk::end_watch`].
    pub fn watch_writes(&self) {
        self.longest_watched_us.store(0, Ordering::SeqCst);
        self.watching.store(true, Ordering::SeqCst);
    }

    /// Stops timing writes for a backup; returns the longest a guest write (or discard)
    /// took since [`ServedDisk::watch_writes`], waits included, in milliseconds.
    pub fn end_watch(&self) -> f64 {
        self.watching.store(false, Ordering::SeqCst);
        self.longest_watched_us.swap(0, Ordering::SeqCst) as f64 / 1e3
    }

    /// Locks the stripes of `[offset, offset+len)`; a range beyond the disk is refused
    /// first (the chain would refuse it too, but its end must not wrap around here).
    fn lock_stripes(&self, offset: u64, len: u64) -> disk::Result<Vec<MutexGuard<'_, ()>>> {
        let end =
            offset
                .checked_add(len)
                .filter(|&e| e <= self.size)
                .ok_or(disk::Error::OutOfRange {
                    offset,
                    len,
                    size: self.size,
                })?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let first = offset / STRIPE_BYTES;
        let last = (end - 1) / STRIPE_BYTES;
        let mut idx: Vec<usize> = (first..=last.min(first + STRIPES as u64 - 1))
            .map(|s| (s % STRIPES as u64) as usize)
            .collect();
        idx.sort_unstable();
        idx.dedup();
        Ok(idx
            .into_iter()
            .map(|i| self.stripes[i].lock().unwrap_or_else(|p| p.into_inner()))
            .collect())
    }

    /// A change: to the chain, then (during a merge into the parent) to the mirror, under
    /// the range's stripes while a merge runs. Only writes that meet a merge or a backup's
    /// copy are timed (waits for the switch included), so the hot path pays two atomic
    /// loads.
    fn change(
        &self,
        offset: u64,
        len: u64,
        op: &dyn Fn(&vhdx::Chain) -> vhdx::Result<()>,
    ) -> disk::Result<()> {
        let merging = self.merging.load(Ordering::SeqCst);
        let watching = self.watching.load(Ordering::Relaxed);
        let started = (merging || watching).then(Instant::now);
        let slot = self.chain.read().unwrap_or_else(|p| p.into_inner());
        let d = slot.as_ref().ok_or_else(detached)?;
        if let Some(t) = self.tracker.get() {
            // Durably marked before the change can be acknowledged.
            t.mark(offset, len).map_err(|e| disk::Error::Io {
                path: "(change tracking)".into(),
                source: std::io::Error::other(e.to_string()),
            })?;
        }
        if !self.merging.load(Ordering::SeqCst) {
            op(d.chain())?;
        } else {
            let _held = self.lock_stripes(offset, len)?;
            op(d.chain())?;
            if let Some(m) = self
                .mirror
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
            {
                op(m)?;
            }
        }
        if let Some(t) = started {
            let us = t.elapsed().as_micros() as u64;
            if merging {
                self.longest_write_us.fetch_max(us, Ordering::SeqCst);
            }
            if watching {
                self.longest_watched_us.fetch_max(us, Ordering::SeqCst);
            }
        }
        Ok(())
    }
}

/// Opens `path` writable with its parents; with `session`, the top file takes the
/// session's DataWriteGuid at its first write.
fn open_top(path: &Path, session: Option<uuid::Uuid>) -> disk::Result<VhdxDisk> {
    let Some(s) = session else {
        return VhdxDisk::open(path, true);
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let top = vhdx::VhdxFile::open(
        path,
        vhdx::OpenOptions {
            writable: true,
            data_write_guid: Some(vm::tracking::session_guid(s, &name)),
            ..Default::default()
        },
    )?;
    Ok(VhdxDisk::from_chain(vhdx::Chain::from_top(top)?, true))
}

impl Disk for ServedDisk {
    fn size(&self) -> u64 {
        self.size
    }
    fn sector_size(&self) -> u32 {
        self.sector
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> disk::Result<()> {
        let slot = self.chain.read().unwrap_or_else(|p| p.into_inner());
        slot.as_ref().ok_or_else(detached)?.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> disk::Result<()> {
        let op = |c: &vhdx::Chain| c.write_at(buf, offset);
        self.change(offset, buf.len() as u64, &op)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> disk::Result<()> {
        let op = |c: &vhdx::Chain| c.write_zeroes(offset, len);
        self.change(offset, len, &op)
    }
    fn flush(&self) -> disk::Result<()> {
        let slot = self.chain.read().unwrap_or_else(|p| p.into_inner());
        slot.as_ref().ok_or_else(detached)?.flush()?;
        if let Some(m) = self
            .mirror
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            m.flush()?;
        }
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> disk::Result<Vec<Extent>> {
        let slot = self.chain.read().unwrap_or_else(|p| p.into_inner());
        slot.as_ref()
            .ok_or_else(detached)?
            .block_status(offset, len)
    }
    fn read_sparse(&self, buf: &mut [u8], offset: u64) -> disk::Result<Vec<Extent>> {
        let slot = self.chain.read().unwrap_or_else(|p| p.into_inner());
        slot.as_ref().ok_or_else(detached)?.read_sparse(buf, offset)
    }
}
