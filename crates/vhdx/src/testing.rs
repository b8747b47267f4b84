//! Files for tests, only with the `testing` feature (and in this crate's unit tests), so
//! that release builds carry none of them: [`MemFile`] in memory, [`FaultyIo`] that fails
//! after a budget of calls, and [`CrashIo`], a memory file with a volatile write cache whose
//! unsynced writes a simulated power loss drops in any subset.

use crate::io::FileIo;
use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// A file held in memory.
#[derive(Debug, Default)]
pub struct MemFile {
    data: Mutex<Vec<u8>>,
}

impl MemFile {
    /// A memory file with the given contents.
    pub fn new(data: Vec<u8>) -> MemFile {
        MemFile {
            data: Mutex::new(data),
        }
    }
    /// A copy of the contents.
    pub fn contents(&self) -> Vec<u8> {
        self.data.lock().unwrap().clone()
    }
}

impl FileIo for MemFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let data = self.data.lock().unwrap();
        buf.fill(0);
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(data.len());
        let end = start.saturating_add(buf.len()).min(data.len());
        buf[..end - start].copy_from_slice(&data[start..end]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut data = self.data.lock().unwrap();
        let start = usize::try_from(offset).map_err(|_| io::Error::other("offset too large"))?;
        let end = start + buf.len();
        if data.len() < end {
            data.resize(end, 0);
        }
        data[start..end].copy_from_slice(buf);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.data.lock().unwrap().len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::Error::other("length too large"))?;
        self.data.lock().unwrap().resize(len, 0);
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut data = self.data.lock().unwrap();
        let range = within(data.len(), offset, len);
        data[range].fill(0);
        Ok(())
    }
}

/// What a [`FaultyIo`] does once its budget of successful writes is spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Writes and extensions fail with ENOSPC (a full disk).
    NoSpace,
    /// The failing write stores only its first half, then reports EIO.
    ShortWrite,
    /// Syncs fail with EIO.
    SyncFailure,
}

/// Wraps a file and injects a fault after a number of successful mutating calls.
#[derive(Debug)]
pub struct FaultyIo<F> {
    inner: F,
    budget: AtomicU64,
    fault: Fault,
}

impl<F: FileIo> FaultyIo<F> {
    /// Allows `successes` writes/resizes (or syncs, for [`Fault::SyncFailure`]), then fails.
    pub fn new(inner: F, successes: u64, fault: Fault) -> FaultyIo<F> {
        FaultyIo {
            inner,
            budget: AtomicU64::new(successes),
            fault,
        }
    }
    /// The wrapped file.
    pub fn inner(&self) -> &F {
        &self.inner
    }
    fn spend(&self) -> bool {
        self.budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(1))
            .is_ok()
    }
}

impl<F: FileIo> FileIo for FaultyIo<F> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.fault == Fault::SyncFailure || self.spend() {
            return self.inner.write_at(buf, offset);
        }
        match self.fault {
            Fault::ShortWrite => {
                self.inner.write_at(&buf[..buf.len() / 2], offset)?;
                Err(io::Error::from_raw_os_error(5))
            }
            _ => Err(io::Error::from_raw_os_error(28)),
        }
    }
    fn sync(&self) -> io::Result<()> {
        if self.fault != Fault::SyncFailure || self.spend() {
            return self.inner.sync();
        }
        Err(io::Error::from_raw_os_error(5))
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn data_extents(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
        self.inner.data_extents(offset, len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.punch_hole(offset, len)
    }
    fn stored_bytes(&self, offset: u64, len: u64) -> io::Result<u64> {
        self.inner.stored_bytes(offset, len)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let grows = len > self.inner.len()?;
        if !grows || self.fault == Fault::SyncFailure || self.spend() {
            return self.inner.set_len(len);
        }
        Err(io::Error::from_raw_os_error(28))
    }
}

/// A memory file that models a volatile write cache: writes since the last sync may be
/// lost, in any subset, when [`CrashIo::crash`] simulates a power failure.
#[derive(Debug, Default)]
pub struct CrashIo {
    state: Mutex<CrashState>,
}

#[derive(Debug, Default)]
struct CrashState {
    durable: Vec<u8>,
    /// The contents as the running program sees them.
    visible: Vec<u8>,
    /// Operations since the last sync, in order.
    pending: Vec<PendingOp>,
}

#[derive(Debug, Clone)]
enum PendingOp {
    Write { offset: usize, data: Vec<u8> },
    SetLen(usize),
}

impl CrashIo {
    /// A crash-simulating file with the given durable contents.
    pub fn new(data: Vec<u8>) -> CrashIo {
        CrashIo {
            state: Mutex::new(CrashState {
                durable: data.clone(),
                visible: data,
                pending: Vec::new(),
            }),
        }
    }

    /// The bytes left after a power failure now: the durable contents plus the pending
    /// operations that `keep(i)` selects (in their original order; a write that is kept
    /// lands whole, as 4 KiB-aligned writes do on real disks).
    pub fn crash(&self, mut keep: impl FnMut(usize) -> bool) -> Vec<u8> {
        let st = self.state.lock().unwrap();
        let mut data = st.durable.clone();
        for (i, op) in st.pending.iter().enumerate() {
            if !keep(i) {
                continue;
            }
            match op {
                PendingOp::Write { offset, data: d } => {
                    if data.len() < offset + d.len() {
                        data.resize(offset + d.len(), 0);
                    }
                    data[*offset..offset + d.len()].copy_from_slice(d);
                }
                PendingOp::SetLen(len) => data.resize(*len, 0),
            }
        }
        data
    }

    /// Number of operations not yet made durable.
    pub fn pending(&self) -> usize {
        self.state.lock().unwrap().pending.len()
    }
}

impl FileIo for CrashIo {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let st = self.state.lock().unwrap();
        buf.fill(0);
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(st.visible.len());
        let end = start.saturating_add(buf.len()).min(st.visible.len());
        buf[..end - start].copy_from_slice(&st.visible[start..end]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut st = self.state.lock().unwrap();
        let offset = usize::try_from(offset).map_err(|_| io::Error::other("offset too large"))?;
        let end = offset + buf.len();
        if st.visible.len() < end {
            st.visible.resize(end, 0);
        }
        st.visible[offset..end].copy_from_slice(buf);
        st.pending.push(PendingOp::Write {
            offset,
            data: buf.to_vec(),
        });
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        let mut st = self.state.lock().unwrap();
        st.durable = st.visible.clone();
        st.pending.clear();
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.state.lock().unwrap().visible.len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut st = self.state.lock().unwrap();
        let len = usize::try_from(len).map_err(|_| io::Error::other("length too large"))?;
        st.visible.resize(len, 0);
        st.pending.push(PendingOp::SetLen(len));
        Ok(())
    }
    /// A punched range reads as zeros; until the next sync a crash may undo it, so it is
    /// pending like a write of zeros.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut st = self.state.lock().unwrap();
        let range = within(st.visible.len(), offset, len);
        st.visible[range.clone()].fill(0);
        st.pending.push(PendingOp::Write {
            offset: range.start,
            data: vec![0u8; range.len()],
        });
        Ok(())
    }
}

/// The part of `[offset, offset + len)` that lies within a file of `size` bytes: a punch
/// past the end, like one on a real file, changes nothing there.
fn within(size: usize, offset: u64, len: u64) -> std::ops::Range<usize> {
    let start = usize::try_from(offset).unwrap_or(usize::MAX).min(size);
    let end = usize::try_from(len)
        .map_or(usize::MAX, |l| start.saturating_add(l))
        .min(size);
    start..end
}
