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
    /// Writes like [`FileIo::write_at`] data that will not be read back soon (a merge's
    /// copy). A file on disk may send it past the page cache; it is durable after the next
    /// [`FileIo::sync`] like any write. The default is `write_at`.
    fn write_uncached_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_at(buf, offset)
    }
    /// Gives `[offset, offset + len)` back to the file system: the range reads as zeros
    /// afterwards and the file keeps its length. Like a write, it may be lost by a crash
    /// before the next [`FileIo::sync`]. A file that cannot free space keeps it (the
    /// default does nothing), which callers must accept: only unused space is punched.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
    /// How many bytes of `[offset, offset + len)` the file system stores (the rest are
    /// holes). The default says all of them.
    fn stored_bytes(&self, offset: u64, len: u64) -> io::Result<u64> {
        let _ = offset;
        Ok(len)
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
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        use rustix::fs::{FallocateFlags, fallocate};
        if len == 0 {
            return Ok(());
        }
        match fallocate(
            self,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        ) {
            // A file system that cannot punch keeps the space; nothing reads it.
            Ok(()) | Err(rustix::io::Errno::OPNOTSUPP) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
    /// `SEEK_DATA` and `SEEK_HOLE` in turn, exact where [`FileIo::data_extents`] is coarse.
    fn stored_bytes(&self, offset: u64, len: u64) -> io::Result<u64> {
        use rustix::fs::{SeekFrom, seek};
        let end = offset.saturating_add(len);
        let mut pos = offset;
        let mut stored = 0;
        while pos < end {
            let start = match seek(self, SeekFrom::Data(pos)) {
                Ok(s) => s,
                Err(rustix::io::Errno::NXIO) => break,
                Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) => {
                    return Ok(stored + (end - pos));
                }
                Err(e) => return Err(e.into()),
            };
            if start >= end {
                break;
            }
            let stop = match seek(self, SeekFrom::Hole(start)) {
                Ok(h) => h.min(end),
                Err(e) => return Err(e.into()),
            };
            stored += stop - start;
            pos = stop.max(start + 1);
        }
        Ok(stored)
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
    fn write_uncached_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_uncached_at(buf, offset)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).punch_hole(offset, len)
    }
    fn stored_bytes(&self, offset: u64, len: u64) -> io::Result<u64> {
        (**self).stored_bytes(offset, len)
    }
}

/// The alignment of buffer, length and offset that [`DiskFile`] needs to write past the
/// page cache (the largest logical sector size of common devices).
pub const DIRECT_ALIGN: usize = 4096;

/// A file on disk, as [`VhdxFile::open`](crate::VhdxFile::open) opens it: a plain [`File`]
/// for everything, and for [`FileIo::write_uncached_at`] a second descriptor of the same
/// file opened with `O_DIRECT` on first use.
///
/// Why: a merge writes every byte it copies once and never reads it back, and growing the
/// page cache by that much costs more than the write itself where the host backs guest
/// memory lazily (this machine: 5x `qemu-img commit`'s time through the cache, see
/// `docs/benchmarks.md`). Direct writes skip that copy. They are no more durable than
/// cached ones until the next [`FileIo::sync`] (the device may still cache them), so
/// callers flush exactly as before. The second descriptor is reopened through
/// `/proc/self/fd`, so it reaches the same inode even if the file was renamed, and it
/// takes no lock of its own (locks are `flock`s on the first descriptor; closing the
/// second does not release them). Where `O_DIRECT` is refused (tmpfs, a misaligned
/// request) the write goes through the cache as usual.
#[derive(Debug)]
pub struct DiskFile {
    file: File,
    direct: std::sync::OnceLock<Option<File>>,
}

impl DiskFile {
    /// Wraps an open file.
    pub fn new(file: File) -> DiskFile {
        DiskFile {
            file,
            direct: std::sync::OnceLock::new(),
        }
    }

    fn direct(&self) -> Option<&File> {
        self.direct
            .get_or_init(|| {
                use rustix::fs::{Mode, OFlags};
                use std::os::fd::AsRawFd;
                let path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
                rustix::fs::open(
                    path.as_str(),
                    OFlags::WRONLY | OFlags::DIRECT | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .ok()
                .map(File::from)
            })
            .as_ref()
    }
}

fn aligned(buf: &[u8], offset: u64) -> bool {
    let a = DIRECT_ALIGN as u64;
    buf.as_ptr().align_offset(DIRECT_ALIGN) == 0
        && (buf.len() as u64).is_multiple_of(a)
        && offset.is_multiple_of(a)
}

impl FileIo for DiskFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileIo::read_at(&self.file, buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileIo::write_at(&self.file, buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        FileIo::sync(&self.file)
    }
    fn len(&self) -> io::Result<u64> {
        FileIo::len(&self.file)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        FileIo::set_len(&self.file, len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        FileIo::punch_hole(&self.file, offset, len)
    }
    fn stored_bytes(&self, offset: u64, len: u64) -> io::Result<u64> {
        FileIo::stored_bytes(&self.file, offset, len)
    }
    fn data_extents(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
        FileIo::data_extents(&self.file, offset, len)
    }
    fn write_uncached_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() || !aligned(buf, offset) {
            return self.write_at(buf, offset);
        }
        let Some(direct) = self.direct() else {
            return self.write_at(buf, offset);
        };
        match direct.write_all_at(buf, offset) {
            // Some file systems accept O_DIRECT at open and refuse the write.
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                self.write_at(buf, offset)
            }
            r => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uncached_writes_read_back_through_the_cache_and_misaligned_ones_fall_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let f = DiskFile::new(file);
        // Cached bytes first, so that the direct write must supersede cached pages.
        f.write_at(&vec![7u8; 3 * DIRECT_ALIGN], 0).unwrap();
        let mut before = vec![0u8; 3 * DIRECT_ALIGN];
        f.read_at(&mut before, 0).unwrap();
        let mut space = vec![0u8; 3 * DIRECT_ALIGN];
        let skip = space.as_ptr().align_offset(DIRECT_ALIGN);
        let buf = &mut space[skip..skip + 2 * DIRECT_ALIGN];
        buf.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
        f.write_uncached_at(buf, DIRECT_ALIGN as u64).unwrap();
        // Misaligned in offset and length: through the cache.
        f.write_uncached_at(&[9u8; 100], 10).unwrap();
        f.sync().unwrap();
        let mut got = vec![0u8; 3 * DIRECT_ALIGN];
        f.read_at(&mut got, 0).unwrap();
        assert_eq!(&got[10..110], &[9u8; 100][..]);
        assert_eq!(&got[DIRECT_ALIGN..3 * DIRECT_ALIGN], &buf[..]);
        assert_eq!(std::fs::read(&path).unwrap(), got);
    }
}
