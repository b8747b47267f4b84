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
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(self.size, offset, len)?;
        Ok(vec![Extent::Data(len)])
    }
}
