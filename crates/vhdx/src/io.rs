//! The storage the engine reads and writes: positional I/O only, no seek cursor.
//!
//! The engine reaches its file exclusively through [`FileIo`], so the same code runs on a
//! real file and, with the `testing` feature, on memory, under fault injection and under
//! simulated power loss (`crate::testing`). All methods take `&self` and may be called
//! from many threads at once.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

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
    /// Ranges of `[offset, offset + len)` that cover every part the file stores, in order,
    /// as `(start, len)` (they may reach into holes); the rest are holes that read as zeros. Lets an open skip the unwritten parts of a
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
    /// Asks the file system where data lies with `SEEK_DATA` only: each extent it returns
    /// is a step from where data starts, without the `SEEK_HOLE` that would find its end.
    /// Steps start at one page and double while data follows without a gap (up to 4 MiB),
    /// so a large table scattered over pages (the BAT of a huge, sparsely written disk)
    /// costs two system calls per page, its seek and its read, instead of three, and a
    /// dense table a few steps per 4 MiB. A step may reach into a hole: it reads as zeros.
    fn data_extents(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
        use rustix::fs::{SeekFrom, seek};
        const FIRST_STEP: u64 = 4 << 10;
        const LAST_STEP: u64 = 4 << 20;
        let end = offset.saturating_add(len);
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut pos = offset;
        let mut step = FIRST_STEP;
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
            let stop = (start + step).min(end);
            match out.last_mut() {
                Some((s, l)) if *s + *l == start => {
                    *l = stop - *s;
                    step = (step * 2).min(LAST_STEP);
                }
                _ => {
                    out.push((start, stop - start));
                    step = FIRST_STEP;
                }
            }
            pos = stop;
        }
        Ok(out)
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
