//! Copying a disk into a new raw or VHDX file.
//!
//! Ranges the source reports as zero are not read; ranges that read as zeros are not
//! written, so they stay holes in a raw file and unallocated blocks in a VHDX file. A reader
//! thread and a writer overlap their I/O. The destination is built under a temporary name
//! and renamed into place once complete and synced.
//!
//! A raw destination is written with `O_DIRECT` where the file system accepts it: the data
//! goes from the copy buffers to the disk as it is copied, instead of piling up in the page
//! cache for the final sync to write back while nothing else happens. That sync then has
//! only metadata left, and the kernel saves a copy and the page-cache allocation per byte.
//! A VHDX destination (written through the page cache by the vhdx crate) is flushed every
//! 32 MiB from another thread instead, so that its write-back also overlaps the copy.

use crate::{Disk, Error, Extent, Result};
use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::{SyncSender, sync_channel};
use std::thread::JoinHandle;
use vhdx::{CreateParams, DiskKind};

/// Destination format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    /// A raw image (sparse where the source reads as zeros).
    Raw,
    /// A standalone VHDX file.
    Vhdx {
        /// Fixed or dynamic.
        kind: DiskKind,
        /// Block size (default 32 MiB).
        block_size: Option<u32>,
    },
}

/// How to convert.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// Destination format.
    pub format: OutputFormat,
    /// Physical sector size for a VHDX destination.
    pub physical_sector_size: u32,
}

/// What a conversion did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConvertStats {
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Bytes written to the destination.
    pub bytes_written: u64,
}

const CHUNK: u64 = 4 << 20;
const ZERO_GRAIN: usize = 64 << 10;

/// Alignment of memory, file offsets and lengths for `O_DIRECT` writes: the largest logical
/// block size of common devices. A file system that wants more fails the write with
/// `EINVAL`, and the copy carries on through the page cache.
const DIRECT_ALIGN: usize = 4096;

/// Opens `path` for writing with `O_DIRECT` (as rustix knows the flag for this target), or
/// `None` where the file system refuses it.
fn open_direct(path: &Path) -> Option<std::fs::File> {
    OpenOptions::new()
        .write(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(path)
        .ok()
}

/// A copy buffer of up to [`CHUNK`] bytes that starts at a [`DIRECT_ALIGN`] boundary. The
/// allocation never grows, so the boundary holds wherever the buffer is sent.
struct Buf {
    mem: Vec<u8>,
    start: usize,
    len: usize,
}

impl Buf {
    fn new() -> Buf {
        let mem = vec![0u8; CHUNK as usize + DIRECT_ALIGN];
        let misalign = mem.as_ptr() as usize % DIRECT_ALIGN;
        let start = (DIRECT_ALIGN - misalign) % DIRECT_ALIGN;
        Buf { mem, start, len: 0 }
    }
    /// The first `len` bytes, as they were left (no re-zeroing: the read fills them).
    fn fill(&mut self, len: usize) -> &mut [u8] {
        self.len = len;
        &mut self.mem[self.start..self.start + len]
    }
    fn data(&self) -> &[u8] {
        &self.mem[self.start..self.start + self.len]
    }
}

fn is_zero(b: &[u8]) -> bool {
    // A fold without early exit compiles to wide OR instructions.
    b.chunks(4096)
        .all(|c| c.iter().fold(0u8, |acc, &x| acc | x) == 0)
}

/// Copies `src` into a new file at `dst` (which must not exist).
pub fn convert(
    src: &dyn Disk,
    dst: &Path,
    options: &ConvertOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ConvertStats> {
    if dst.exists() {
        return Err(Error::Exists {
            path: dst.to_owned(),
        });
    }
    let tmp = vhdx::temp_name(dst);
    let _ = std::fs::remove_file(&tmp);
    let result = convert_to(src, &tmp, options, progress);
    match result {
        Ok(stats) => {
            std::fs::rename(&tmp, dst).map_err(|e| Error::Io {
                path: dst.to_owned(),
                source: e,
            })?;
            vhdx::sync_parent_dir(dst).map_err(|e| Error::Io {
                path: dst.to_owned(),
                source: e,
            })?;
            Ok(stats)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Where the writer puts data.
trait Sink {
    fn write(&mut self, buf: &[u8], offset: u64) -> Result<()>;
    fn finish(self: Box<Self>) -> Result<()>;
}

struct RawSink {
    /// Buffered descriptor: unaligned writes, the final length and the sync.
    file: std::fs::File,
    /// The same file opened with `O_DIRECT`, for aligned writes, while the file system
    /// accepts them.
    direct: Option<std::fs::File>,
    path: std::path::PathBuf,
    size: u64,
}

impl Sink for RawSink {
    fn write(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        let io = |e| Error::Io {
            path: self.path.clone(),
            source: e,
        };
        let aligned = (buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
            && buf.len().is_multiple_of(DIRECT_ALIGN)
            && offset.is_multiple_of(DIRECT_ALIGN as u64);
        if aligned && let Some(direct) = &self.direct {
            match direct.write_all_at(buf, offset) {
                Ok(()) => return Ok(()),
                // Alignment the file system does not take: rewrite the whole range (a
                // partial direct write left nothing the buffered one does not cover) and
                // stay buffered from here on.
                Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => self.direct = None,
                Err(e) => return Err(io(e)),
            }
        }
        self.file.write_all_at(buf, offset).map_err(io)
    }
    fn finish(self: Box<Self>) -> Result<()> {
        let io = |e| Error::Io {
            path: self.path.clone(),
            source: e,
        };
        self.file.set_len(self.size).map_err(io)?;
        self.file.sync_all().map_err(io)
    }
}

/// VHDX output. A flusher thread flushes the file after every [`FLUSH_EVERY`] bytes
/// written, without stalling the writer, so that write-back overlaps the copy instead of
/// all waiting for the final flush (the merge does the same).
struct VhdxSink {
    file: Arc<vhdx::VhdxFile>,
    unflushed: u64,
    /// Asks for a flush; a request while one is pending is dropped.
    kick: Option<SyncSender<()>>,
    flusher: Option<JoinHandle<Result<()>>>,
}

/// See [`VhdxSink`]; 32 MiB, as in the merge, measured better than 64 and 128 MiB here too.
const FLUSH_EVERY: u64 = 32 << 20;

impl VhdxSink {
    fn new(file: vhdx::VhdxFile) -> VhdxSink {
        let file = Arc::new(file);
        let (kick, requests) = sync_channel::<()>(1);
        let flushed = Arc::clone(&file);
        let flusher = std::thread::spawn(move || -> Result<()> {
            for () in requests {
                flushed.flush()?;
            }
            Ok(())
        });
        VhdxSink {
            file,
            unflushed: 0,
            kick: Some(kick),
            flusher: Some(flusher),
        }
    }
}

impl Sink for VhdxSink {
    fn write(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.file.write_at(buf, offset)?;
        self.unflushed += buf.len() as u64;
        if self.unflushed >= FLUSH_EVERY {
            self.unflushed = 0;
            if let Some(kick) = &self.kick {
                // Full: a flush is already pending. Gone: the flusher failed, which
                // `finish` reports (and the failed flush poisoned the file for writes).
                let _ = kick.try_send(());
            }
        }
        Ok(())
    }
    fn finish(mut self: Box<Self>) -> Result<()> {
        drop(self.kick.take());
        if let Some(flusher) = self.flusher.take() {
            flusher.join().expect("flusher thread panicked")?;
        }
        let file = Arc::into_inner(self.file).expect("the flusher has exited");
        file.flush()?;
        Ok(file.close()?)
    }
}

fn convert_to(
    src: &dyn Disk,
    tmp: &Path,
    options: &ConvertOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ConvertStats> {
    let size = src.size();
    let mut sink: Box<dyn Sink> = match options.format {
        OutputFormat::Raw => {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(tmp)
                .map_err(|e| Error::Io {
                    path: tmp.to_owned(),
                    source: e,
                })?;
            // Not every file system takes O_DIRECT (tmpfs on older kernels refuses it at
            // open); without it everything goes through `file`. Direct and buffered writes
            // never overlap, come in order from the one writer thread, and the kernel keeps
            // the page cache coherent with direct writes; the final sync of `file` (one
            // inode) covers both.
            let direct = open_direct(tmp);
            Box::new(RawSink {
                file,
                direct,
                path: tmp.to_owned(),
                size,
            })
        }
        OutputFormat::Vhdx { kind, block_size } => {
            let logical = src.sector_size();
            let virtual_size = size.next_multiple_of(u64::from(logical));
            vhdx::create(
                tmp,
                &CreateParams {
                    virtual_size,
                    kind,
                    block_size,
                    logical_sector_size: logical,
                    physical_sector_size: options.physical_sector_size.max(logical),
                },
            )?;
            let file = vhdx::VhdxFile::open(
                tmp,
                vhdx::OpenOptions {
                    writable: true,
                    ..Default::default()
                },
            )?;
            Box::new(VhdxSink::new(file))
        }
    };

    let mut stats = ConvertStats::default();
    let (data_tx, data_rx) = sync_channel::<(u64, Buf, Vec<(usize, usize)>)>(4);
    let (pool_tx, pool_rx) = sync_channel::<Buf>(8);
    for _ in 0..6 {
        let _ = pool_tx.send(Buf::new());
    }
    let read_result = std::thread::scope(|s| -> Result<()> {
        let reader = s.spawn(move || -> Result<u64> {
            let mut read = 0u64;
            let extents = src.block_status(0, size)?;
            let mut pos = 0u64;
            for extent in extents {
                let end = pos + extent.len();
                if let Extent::Data(_) = extent {
                    let mut at = pos;
                    while at < end {
                        let n = (end - at).min(CHUNK);
                        let Ok(mut buf) = pool_rx.recv() else {
                            return Ok(read);
                        };
                        src.read_at(buf.fill(n as usize), at)?;
                        read += n;
                        // Non-zero runs at a 64 KiB grain.
                        let mut runs: Vec<(usize, usize)> = Vec::new();
                        for (i, grain) in buf.data().chunks(ZERO_GRAIN).enumerate() {
                            if is_zero(grain) {
                                continue;
                            }
                            let s0 = i * ZERO_GRAIN;
                            let s1 = s0 + grain.len();
                            match runs.last_mut() {
                                Some(r) if r.1 == s0 => r.1 = s1,
                                _ => runs.push((s0, s1)),
                            }
                        }
                        if data_tx.send((at, buf, runs)).is_err() {
                            return Ok(read);
                        }
                        at += n;
                    }
                }
                pos = end;
            }
            Ok(read)
        });
        let mut write_error = None;
        for (at, buf, runs) in data_rx {
            if write_error.is_none() {
                for (s0, s1) in &runs {
                    if let Err(e) = sink.write(&buf.data()[*s0..*s1], at + *s0 as u64) {
                        write_error = Some(e);
                        break;
                    }
                    stats.bytes_written += (s1 - s0) as u64;
                }
                progress(at + buf.len as u64, size);
            }
            if write_error.is_some() {
                break;
            }
            let _ = pool_tx.send(buf);
        }
        drop(pool_tx);
        let read = reader.join().expect("reader thread panicked");
        if let Some(e) = write_error {
            return Err(e);
        }
        stats.bytes_read = read?;
        Ok(())
    });
    read_result?;
    sink.finish()?;
    progress(size, size);
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{RawDisk, VhdxDisk};
    use rand::rngs::StdRng;
    use rand::{Rng, RngCore, SeedableRng};
    use std::os::unix::fs::MetadataExt;

    const RAW: ConvertOptions = ConvertOptions {
        format: OutputFormat::Raw,
        physical_sector_size: 4096,
    };

    /// An odd-sized image (the tail is neither a whole chunk nor a whole page) of data
    /// grains, zero grains and a few short non-zero runs, some of them unaligned.
    fn image(rng: &mut StdRng) -> Vec<u8> {
        let size = 3 * CHUNK as usize + 5 * ZERO_GRAIN + 777;
        let mut v = vec![0u8; size];
        for grain in v.chunks_mut(ZERO_GRAIN) {
            match rng.random_range(0..4) {
                0 => rng.fill_bytes(grain),
                1 => {
                    let at = rng.random_range(0..grain.len());
                    grain[at] = 1;
                }
                _ => {}
            }
        }
        let tail = size - 100;
        v[tail] = 7;
        v
    }

    fn allocated(path: &Path) -> u64 {
        std::fs::metadata(path).unwrap().blocks() * 512
    }

    fn nonzero_grains(v: &[u8]) -> u64 {
        v.chunks(ZERO_GRAIN)
            .filter(|g| !is_zero(g))
            .map(|g| g.len() as u64)
            .sum()
    }

    #[test]
    fn raw_to_raw_is_exact_and_keeps_zero_grains_as_holes() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = StdRng::seed_from_u64(1);
        let data = image(&mut rng);
        let src = dir.path().join("src.raw");
        std::fs::write(&src, &data).unwrap();
        let dst = dir.path().join("dst.raw");
        let d = RawDisk::open(&src, false).unwrap();
        let stats = convert(&d, &dst, &RAW, &mut |_, _| {}).unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), data);
        assert_eq!(stats.bytes_written, nonzero_grains(&data));
        // Holes where the grains are zero (blocks are at most 4 KiB on the test file systems).
        assert!(allocated(&dst) <= stats.bytes_written + 64 * 4096);
        assert!(matches!(
            convert(&d, &dst, &RAW, &mut |_, _| {}),
            Err(Error::Exists { .. })
        ));
    }

    /// Converts the raw file `src` into a new dynamic VHDX `dst`.
    fn raw_to_vhdx(src: &Path, dst: &Path, block_size: Option<u32>) {
        let options = ConvertOptions {
            format: OutputFormat::Vhdx {
                kind: DiskKind::Dynamic,
                block_size,
            },
            physical_sector_size: 4096,
        };
        let source = RawDisk::open(src, false).unwrap();
        convert(&source, dst, &options, &mut |_, _| {}).unwrap();
    }

    #[test]
    fn vhdx_round_trip_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = StdRng::seed_from_u64(2);
        let data = image(&mut rng);
        let src = dir.path().join("src.raw");
        std::fs::write(&src, &data).unwrap();
        let vhdx = dir.path().join("mid.vhdx");
        raw_to_vhdx(&src, &vhdx, Some(1 << 20));
        let back = dir.path().join("back.raw");
        let v = VhdxDisk::open(&vhdx, false).unwrap();
        let stats = convert(&v, &back, &RAW, &mut |_, _| {}).unwrap();
        let out = std::fs::read(&back).unwrap();
        // The VHDX rounds the size up to a whole sector, which reads as zeros.
        assert_eq!(out.len() as u64, v.size());
        assert_eq!(&out[..data.len()], &data[..]);
        assert!(is_zero(&out[data.len()..]));
        assert_eq!(stats.bytes_written, nonzero_grains(&out));
        assert!(allocated(&back) <= stats.bytes_written + 64 * 4096);
    }

    #[test]
    fn vhdx_output_flushed_along_the_way_is_exact() {
        // More than two flush intervals, so the flusher runs while the writer writes.
        let dir = tempfile::tempdir().unwrap();
        let mut rng = StdRng::seed_from_u64(4);
        let mut data = vec![0u8; (2 * FLUSH_EVERY + 3 * CHUNK) as usize];
        rng.fill_bytes(&mut data);
        data[(5 * CHUNK) as usize..(7 * CHUNK) as usize].fill(0);
        let src = dir.path().join("src.raw");
        std::fs::write(&src, &data).unwrap();
        let vhdx = dir.path().join("out.vhdx");
        raw_to_vhdx(&src, &vhdx, None);
        let v = VhdxDisk::open(&vhdx, false).unwrap();
        let mut out = vec![0u8; data.len()];
        v.read_at(&mut out, 0).unwrap();
        assert!(out == data);
    }

    #[test]
    fn buffered_and_direct_writes_mix_exactly() {
        // Aligned, unaligned (memory, offset, length) and overlapping-page writes, with
        // and without the direct descriptor.
        let dir = tempfile::tempdir().unwrap();
        for direct in [true, false] {
            let path = dir.path().join(format!("out-{direct}.raw"));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .unwrap();
            let direct = if direct { open_direct(&path) } else { None };
            let size = 1 << 20;
            let mut sink: Box<dyn Sink> = Box::new(RawSink {
                file,
                direct,
                path: path.clone(),
                size,
            });
            let mut oracle = vec![0u8; size as usize];
            let mut rng = StdRng::seed_from_u64(3);
            let mut buf = Buf::new();
            for (offset, len, skew) in [
                (0u64, 64 << 10, 0usize),
                (64 << 10, 4096, 0),
                (70 << 10, 512, 0),
                (72 << 10, 4096, 1),
                (100_000, 3000, 0),
                (128 << 10, 8192, 0),
                (129 << 10, 100, 0),
                (1_000_000, 48_576, 0),
            ] {
                let b = &mut buf.fill(len + skew)[skew..];
                rng.fill_bytes(b);
                oracle[offset as usize..offset as usize + len].copy_from_slice(b);
                sink.write(&buf.data()[skew..], offset).unwrap();
            }
            sink.finish().unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), oracle);
        }
    }
}
