//! Raw image files.

use crate::{Disk, Error, Extent, Result, check_range};
use std::fs::{File, OpenOptions, TryLockError};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A raw image file: the disk's bytes, nothing else.
#[derive(Debug)]
pub struct RawDisk {
    file: File,
    path: PathBuf,
    size: u64,
    writable: bool,
}

impl RawDisk {
    /// Opens a raw file (exclusive lock when writable, shared otherwise).
    pub fn open(path: &Path, writable: bool) -> Result<RawDisk> {
        let io = |e| Error::Io {
            path: path.to_owned(),
            source: e,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(io)?;
        let locked = if writable {
            file.try_lock()
        } else {
            file.try_lock_shared()
        };
        match locked {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(Error::Vhdx(vhdx::Error::Locked {
                    path: path.to_owned(),
                }));
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        let size = file.metadata().map_err(io)?.len();
        Ok(RawDisk {
            file,
            path: path.to_owned(),
            size,
            writable,
        })
    }

    fn io(&self, e: std::io::Error) -> Error {
        Error::Io {
            path: self.path.clone(),
            source: e,
        }
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly {
                path: self.path.clone(),
            });
        }
        check_range(self.size, offset, len)
    }
}

impl Disk for RawDisk {
    fn size(&self) -> u64 {
        self.size
    }
    fn sector_size(&self) -> u32 {
        512
    }
    fn is_read_only(&self) -> bool {
        !self.writable
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        vhdx::FileIo::read_at(&self.file, buf, offset).map_err(|e| self.io(e))
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_write(offset, buf.len() as u64)?;
        self.file.write_all_at(buf, offset).map_err(|e| self.io(e))
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_write(offset, len)?;
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64);
            self.file
                .write_all_at(&zeros[..n as usize], offset + done)
                .map_err(|e| self.io(e))?;
            done += n;
        }
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| self.io(e))
    }
    /// Holes of a sparse file read as zeros without stored data: found with
    /// `SEEK_DATA`/`SEEK_HOLE`, so copies (conversion, backups, NBD clients) skip them
    /// without reading. A file system without those reports everything as data.
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        use rustix::fs::{SeekFrom, seek};
        check_range(self.size, offset, len)?;
        let end = offset + len;
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |e: Extent| match (out.last_mut(), e) {
            (Some(Extent::Data(l)), Extent::Data(n)) | (Some(Extent::Zero(l)), Extent::Zero(n)) => {
                *l += n
            }
            _ => out.push(e),
        };
        let mut pos = offset;
        while pos < end {
            // Only the returned offsets matter: every read and write is positional.
            let data = match seek(&self.file, SeekFrom::Data(pos)) {
                Ok(d) => d.clamp(pos, end),
                // A hole up to the end of the file.
                Err(rustix::io::Errno::NXIO) => end,
                Err(_) => {
                    push(Extent::Data(end - pos));
                    break;
                }
            };
            if data > pos {
                push(Extent::Zero(data - pos));
            }
            if data >= end {
                break;
            }
            let hole = seek(&self.file, SeekFrom::Hole(data)).map_or(end, |h| h.clamp(data, end));
            // A hole at `data` would contradict SEEK_DATA; take one byte as data to progress.
            let hole = hole.max(data + 1).min(end);
            push(Extent::Data(hole - data));
            pos = hole;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_of_a_sparse_file_are_zero_extents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse.raw");
        let f = File::create(&path).unwrap();
        let mib = 1u64 << 20;
        f.set_len(8 * mib).unwrap();
        f.write_all_at(&[1u8; 4096], 2 * mib).unwrap();
        f.write_all_at(&[2u8; 4096], 8 * mib - 4096).unwrap();
        f.sync_all().unwrap();
        let d = RawDisk::open(&path, false).unwrap();
        let extents = d.block_status(0, 8 * mib).unwrap();
        assert_eq!(extents.iter().map(|e| e.len()).sum::<u64>(), 8 * mib);
        // Whatever the file system's block size, the written pages are data and most of
        // the rest is hole.
        let mut pos = 0;
        let mut zero = 0;
        for e in &extents {
            if let Extent::Zero(n) = e {
                assert!(pos + n <= 2 * mib || pos >= 2 * mib + 4096);
                zero += n;
            }
            pos += e.len();
        }
        assert!(zero >= 6 * mib, "{extents:?}");
        // A sub-range inside a hole.
        assert_eq!(
            d.block_status(4 * mib, mib).unwrap(),
            vec![Extent::Zero(mib)]
        );
        // Reads agree.
        let mut buf = vec![9u8; 4096];
        d.read_at(&mut buf, 4 * mib).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }
}
