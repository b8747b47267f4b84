//! The storage the engine reads and writes: positional I/O only, no seek cursor.
//!
//! The engine reaches its file exclusively through [`FileIo`], so the same code runs on a
//! real file, on memory, under fault injection ([`FaultyIo`]) and under simulated power loss
//! ([`CrashIo`]). All methods take `&self` and may be called from many threads at once.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Positional, thread-safe access to the bytes of one file.
pub trait FileIo: Send + Sync + std::fmt::Debug {
    /// Fills `buf` from `offset`; bytes beyond the end of the file read as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, extending the file if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write and resize durable.
    fn sync(&self) -> io::Result<()>;
    /// Current length of the file.
    fn len(&self) -> io::Result<u64>;
    /// Truncates or extends (with zeros) the file.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Whether the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// The parts of `[offset, offset + len)` the file stores, in order, as `(start, len)`;
    /// the rest are holes that read as zeros. Lets an open skip the unwritten parts of a
    /// large table. The default says everything is stored.
    fn data_extents(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
        Ok(if len == 0 {
            Vec::new()
        } else {
            vec![(offset, len)]
        })
    }
}

/// Merges sorted, possibly overlapping `(start, len)` ranges.
pub(crate) fn merge_extents(mut extents: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    extents.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(extents.len());
    for (s, l) in extents {
        match out.last_mut() {
            Some((ps, pl)) if s <= *ps + *pl => *pl = (*pl).max(s + l - *ps),
            _ => out.push((s, l)),
        }
    }
    out
}

impl FileIo for File {
    fn read_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match FileExt::read_at(self, buf, offset) {
                Ok(0) => {
                    buf.fill(0);
                    return Ok(());
                }
                Ok(n) => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_all_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }
    fn data_extents(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
        use rustix::fs::{SeekFrom, seek};
        let end = offset.saturating_add(len);
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let start = match seek(self, SeekFrom::Data(pos)) {
                Ok(s) => s,
                // No data at or after `pos`.
                Err(rustix::io::Errno::NXIO) => break,
                // A file system without SEEK_DATA: everything is data.
                Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) => {
                    return Ok(vec![(offset, len)]);
                }
                Err(e) => return Err(e.into()),
            };
            if start >= end {
                break;
            }
            let stop = match seek(self, SeekFrom::Hole(start)) {
                Ok(h) => h.min(end),
                Err(rustix::io::Errno::NXIO) => end,
                Err(e) => return Err(e.into()),
            };
            out.push((start, stop - start));
            pos = stop;
        }
        Ok(out)
    }
}

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
}

impl<T: FileIo + ?Sized> FileIo for std::sync::Arc<T> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        (**self).sync()
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
    fn data_extents(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
        (**self).data_extents(offset, len)
    }
}
