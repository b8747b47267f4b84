//! Getting data out: a point's disk into a new raw or VHDX file or into any [`Disk`], a
//! blob into memory or a file, and a point's disk as a read-only [`Disk`] ([`PointDisk`])
//! for the NBD server.
//!
//! Restores fetch, open, decompress and check chunks on several threads at once (each
//! takes the next chunk in disk order, so the threads together read ahead of the slowest)
//! and write each chunk where it belongs with a positional write; chunks of zeros are not
//! written into a new file, which stays sparse. A new file is built under a temporary
//! name, synced (a flusher thread syncs every [`FLUSH_EVERY`] bytes so write-back overlaps
//! the copy) and renamed into place: it appears whole or not at all.

use crate::error::{Error, Result};
use crate::format::ChunkId;
use crate::point::{Point, Stream};
use crate::repo::Repository;
use disk::{Disk, Extent};
use std::collections::VecDeque;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Format of a restored file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileFormat {
    /// A raw image, sparse where the disk reads as zeros.
    Raw,
    /// A standalone dynamic VHDX file.
    Vhdx,
}

/// What a restore did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestoreStats {
    /// Bytes of the disk or blob.
    pub size: u64,
    /// Bytes written (chunks that are not zeros).
    pub bytes_written: u64,
    /// Chunks fetched from the repository.
    pub chunks_fetched: u64,
    /// Wall time.
    pub duration: Duration,
}

/// Sync a new file after this many bytes were written to it, from a second thread.
pub const FLUSH_EVERY: u64 = 64 << 20;

fn threads() -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 16)
        + 2
}

/// A destination of chunks.
trait Sink: Sync {
    fn write(&self, buf: &[u8], offset: u64) -> Result<()>;
}

struct DiskSink<'a>(&'a dyn Disk);
impl Sink for DiskSink<'_> {
    fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        Ok(self.0.write_at(buf, offset)?)
    }
}

/// A new raw file. Whole aligned chunks go through a second descriptor opened with
/// `O_DIRECT`, so the data goes from our buffer to the device instead of through the page
/// cache (a profile of buffered restores showed most of the CPU time in the kernel's copy
/// into the page cache, and the final sync writing everything back while nothing else ran).
/// A file system that refuses direct I/O gets buffered writes from then on.
struct FileSink<'a> {
    file: &'a std::fs::File,
    direct: Option<std::fs::File>,
    direct_ok: AtomicBool,
    path: &'a Path,
}

/// Alignment of memory, offsets and lengths of direct writes.
const DIRECT_ALIGN: usize = 4096;

thread_local! {
    /// Each restore thread's aligned staging buffer for direct writes.
    static STAGING: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl FileSink<'_> {
    fn new<'a>(file: &'a std::fs::File, path: &'a Path) -> FileSink<'a> {
        use std::os::unix::fs::OpenOptionsExt;
        let direct = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(path)
            .ok();
        FileSink {
            file,
            direct_ok: AtomicBool::new(direct.is_some()),
            direct,
            path,
        }
    }

    fn try_direct(&self, buf: &[u8], offset: u64) -> Option<std::io::Result<()>> {
        let direct = self.direct.as_ref()?;
        if !self.direct_ok.load(Ordering::Relaxed)
            || !buf.len().is_multiple_of(DIRECT_ALIGN)
            || !offset.is_multiple_of(DIRECT_ALIGN as u64)
        {
            return None;
        }
        let r = STAGING.with(|staging| {
            let mut staging = staging.borrow_mut();
            if staging.len() < buf.len() + DIRECT_ALIGN {
                *staging = vec![0u8; buf.len() + DIRECT_ALIGN];
            }
            let start = (DIRECT_ALIGN - staging.as_ptr() as usize % DIRECT_ALIGN) % DIRECT_ALIGN;
            let aligned = &mut staging[start..start + buf.len()];
            aligned.copy_from_slice(buf);
            direct.write_all_at(aligned, offset)
        });
        match r {
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
                self.direct_ok.store(false, Ordering::Relaxed);
                None
            }
            r => Some(r),
        }
    }

    /// Whether direct writes are still in use.
    fn direct(&self) -> bool {
        self.direct_ok.load(Ordering::Relaxed)
    }
}

impl Sink for FileSink<'_> {
    fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        let r = match self.try_direct(buf, offset) {
            Some(r) => r,
            None => self.file.write_all_at(buf, offset),
        };
        r.map_err(|e| Error::io(self.path.display().to_string(), e))
    }
}

/// Copies every chunk of `stream` into `sink`; chunks of zeros are skipped when the sink
/// is known to read zeros there already (`fresh`), else written as zeros through `zero`.
fn copy_stream(
    repo: &Repository,
    stream: &Stream,
    sink: &dyn Sink,
    zero: &(dyn Fn(u64, u64) -> Result<()> + Sync),
    fresh: bool,
    written: &(dyn Fn(u64) + Sync),
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<RestoreStats> {
    let t0 = Instant::now();
    let cs = u64::from(stream_chunk_size(repo, stream));
    let size = stream.size;
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let done = AtomicU64::new(0);
    let bytes_written = AtomicU64::new(0);
    let fetched = AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads().min(stream.chunks.len().max(1)) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= stream.chunks.len() || failed.load(Ordering::Relaxed) {
                        return;
                    }
                    let offset = i as u64 * cs;
                    let len = (size - offset).min(cs);
                    let id = stream.chunks[i];
                    let r = if id.is_zero() {
                        if fresh { Ok(()) } else { zero(offset, len) }
                    } else {
                        repo.fetch_chunk(&id, len as usize, false).and_then(|data| {
                            fetched.fetch_add(1, Ordering::Relaxed);
                            sink.write(&data, offset)?;
                            bytes_written.fetch_add(len, Ordering::Relaxed);
                            written(len);
                            Ok(())
                        })
                    };
                    if let Err(e) = r {
                        failed.store(true, Ordering::SeqCst);
                        first_error.lock().unwrap().get_or_insert(e);
                        return;
                    }
                    let d = done.fetch_add(len, Ordering::Relaxed) + len;
                    progress(d, size);
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap() {
        return Err(e);
    }
    Ok(RestoreStats {
        size,
        bytes_written: bytes_written.into_inner(),
        chunks_fetched: fetched.into_inner(),
        duration: t0.elapsed(),
    })
}

fn stream_chunk_size(repo: &Repository, _stream: &Stream) -> u32 {
    repo.chunk_size()
}

fn check_point(repo: &Repository, point: &Point) -> Result<()> {
    if point.chunk_size != repo.chunk_size() {
        return Err(Error::corrupt(
            format!("manifest of point {}", point.id),
            "its chunk size differs from the repository's",
        ));
    }
    Ok(())
}

/// Disk `index` of a point.
pub fn disk_of(point: &Point, index: usize) -> Result<&Stream> {
    point.disks.get(index).ok_or_else(|| Error::NoSuchItem {
        point: point.short_id().to_owned(),
        what: format!("disk {index} (it has {})", point.disks.len()),
    })
}

/// Blob `name` of a point.
pub fn blob_of<'p>(point: &'p Point, name: &str) -> Result<&'p Stream> {
    point.blob(name).ok_or_else(|| Error::NoSuchItem {
        point: point.short_id().to_owned(),
        what: format!("blob {name:?}"),
    })
}

/// Writes disk `index` of `point` into `target` (of at least the disk's size). With
/// `fresh`, the target is known to read zeros everywhere (a new file), and chunks of zeros
/// are not written; otherwise they are written as zeros. The target is flushed.
pub fn restore_into(
    repo: &Repository,
    point: &Point,
    index: usize,
    target: &dyn Disk,
    fresh: bool,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<RestoreStats> {
    check_point(repo, point)?;
    let stream = disk_of(point, index)?;
    if target.size() < stream.size {
        return Err(Error::Invalid(format!(
            "the target disk holds {} bytes, fewer than the {} of the point's disk",
            target.size(),
            stream.size
        )));
    }
    let zero = |o: u64, l: u64| -> Result<()> { Ok(target.write_zeroes(o, l)?) };
    let stats = copy_stream(
        repo,
        stream,
        &DiskSink(target),
        &zero,
        fresh,
        &|_| {},
        progress,
    )?;
    target.flush()?;
    Ok(stats)
}

/// Writes disk `index` of `point` into a new file at `path` (which must not exist).
pub fn restore_to_file(
    repo: &Repository,
    point: &Point,
    index: usize,
    path: &Path,
    format: FileFormat,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<RestoreStats> {
    check_point(repo, point)?;
    let stream = disk_of(point, index)?;
    write_new_file(repo, stream, path, format, progress)
}

/// Writes a blob of `point` into a new file at `path` (which must not exist).
pub fn restore_blob_to_file(
    repo: &Repository,
    point: &Point,
    name: &str,
    path: &Path,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<RestoreStats> {
    check_point(repo, point)?;
    write_new_file(repo, blob_of(point, name)?, path, FileFormat::Raw, progress)
}

/// A blob of `point`, in memory.
pub fn read_blob(repo: &Repository, point: &Point, name: &str) -> Result<Vec<u8>> {
    check_point(repo, point)?;
    let stream = blob_of(point, name)?;
    let len = usize::try_from(stream.size)
        .map_err(|_| Error::Invalid(format!("blob {name:?} is too large for memory")))?;
    let buf = Mutex::new(vec![0u8; len]);
    struct VecSink<'a>(&'a Mutex<Vec<u8>>);
    impl Sink for VecSink<'_> {
        fn write(&self, data: &[u8], offset: u64) -> Result<()> {
            let o = offset as usize;
            self.0.lock().unwrap()[o..o + data.len()].copy_from_slice(data);
            Ok(())
        }
    }
    copy_stream(
        repo,
        stream,
        &VecSink(&buf),
        &|_, _| Ok(()),
        true,
        &|_| {},
        &|_, _| {},
    )?;
    Ok(buf.into_inner().unwrap())
}

fn write_new_file(
    repo: &Repository,
    stream: &Stream,
    path: &Path,
    format: FileFormat,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<RestoreStats> {
    let what = path.display().to_string();
    if path.exists() {
        return Err(Error::Invalid(format!(
            "{what} already exists: restore into a new file"
        )));
    }
    let tmp = vhdx::temp_name(path);
    let _ = std::fs::remove_file(&tmp);
    let result = match format {
        FileFormat::Raw => write_raw(repo, stream, &tmp, progress),
        FileFormat::Vhdx => write_vhdx(repo, stream, &tmp, progress),
    };
    let finish = || -> std::io::Result<()> {
        // link, not rename: never replace a file that appeared meanwhile.
        std::fs::hard_link(&tmp, path)?;
        std::fs::remove_file(&tmp)?;
        vhdx::sync_parent_dir(path)
    };
    match result.and_then(|s| finish().map(|()| s).map_err(|e| Error::io(&what, e))) {
        Ok(s) => Ok(s),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn write_raw(
    repo: &Repository,
    stream: &Stream,
    tmp: &Path,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<RestoreStats> {
    let what = tmp.display().to_string();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(tmp)
        .map_err(|e| Error::io(&what, e))?;
    file.set_len(stream.size).map_err(|e| Error::io(&what, e))?;
    let file = Arc::new(file);
    // A flusher syncs the file every FLUSH_EVERY bytes, so that write-back overlaps the
    // copy instead of all waiting for the final sync.
    let (kick, kicks) = sync_channel::<()>(1);
    let flusher = {
        let file = Arc::clone(&file);
        std::thread::spawn(move || -> std::io::Result<()> {
            for () in kicks {
                file.sync_data()?;
            }
            Ok(())
        })
    };
    let sink = FileSink::new(&file, tmp);
    let unflushed = AtomicU64::new(0);
    let written = |n: u64| {
        // Direct writes are on the device already; buffered ones are synced along the way.
        if !sink.direct() && unflushed.fetch_add(n, Ordering::Relaxed) + n >= FLUSH_EVERY {
            unflushed.store(0, Ordering::Relaxed);
            let _ = kick.try_send(());
        }
    };
    let stats = copy_stream(
        repo,
        stream,
        &sink,
        &|_, _| Ok(()),
        true,
        &written,
        progress,
    );
    drop(kick);
    let flushed = flusher.join().expect("flusher thread panicked");
    let stats = stats?;
    flushed.map_err(|e| Error::io(&what, e))?;
    file.sync_all().map_err(|e| Error::io(&what, e))?;
    Ok(stats)
}

fn write_vhdx(
    repo: &Repository,
    stream: &Stream,
    tmp: &Path,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<RestoreStats> {
    let virtual_size = stream.size.next_multiple_of(512);
    vhdx::create(tmp, &vhdx::CreateParams::dynamic(virtual_size))?;
    let target = disk::VhdxDisk::open(tmp, true)?;
    let zero = |o: u64, l: u64| -> Result<()> { Ok(target.write_zeroes(o, l)?) };
    let stats = copy_stream(
        repo,
        stream,
        &DiskSink(&target),
        &zero,
        true,
        &|_| {},
        progress,
    )?;
    target.flush()?;
    target.close()?;
    Ok(stats)
}

/// How many decoded chunks a [`PointDisk`] keeps.
pub const POINT_DISK_CACHE: usize = 8;

/// A point's disk as a read-only [`Disk`]: reads fetch, open, decompress and check the
/// chunks they touch, keeping the last [`POINT_DISK_CACHE`] in memory. For file-level
/// recovery through the NBD server.
#[derive(Debug)]
pub struct PointDisk {
    repo: Repository,
    stream: Stream,
    label: PathBuf,
    cache: Mutex<VecDeque<(u64, Arc<Vec<u8>>)>>,
}

impl PointDisk {
    /// Disk `index` of `point`.
    pub fn new(repo: &Repository, point: &Point, index: usize) -> Result<PointDisk> {
        check_point(repo, point)?;
        Ok(PointDisk {
            repo: repo.clone(),
            stream: disk_of(point, index)?.clone(),
            label: PathBuf::from(format!("point {} disk {index}", point.short_id())),
            cache: Mutex::new(VecDeque::new()),
        })
    }

    fn chunk(&self, i: u64) -> Result<Arc<Vec<u8>>> {
        if let Some((_, c)) = self.cache.lock().unwrap().iter().find(|(k, _)| *k == i) {
            return Ok(Arc::clone(c));
        }
        let cs = u64::from(self.repo.chunk_size());
        let len = (self.stream.size - i * cs).min(cs) as usize;
        let id: ChunkId = self.stream.chunks[i as usize];
        let data = Arc::new(self.repo.read_chunk(&id, len)?);
        let mut cache = self.cache.lock().unwrap();
        if cache.len() >= POINT_DISK_CACHE {
            cache.pop_front();
        }
        cache.push_back((i, Arc::clone(&data)));
        Ok(data)
    }

    fn io_error(&self, e: Error) -> disk::Error {
        disk::Error::Io {
            path: self.label.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        }
    }
}

impl Disk for PointDisk {
    fn size(&self) -> u64 {
        self.stream.size
    }
    fn sector_size(&self) -> u32 {
        512
    }
    fn is_read_only(&self) -> bool {
        true
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> disk::Result<()> {
        let size = self.stream.size;
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > size)
        {
            return Err(disk::Error::OutOfRange {
                offset,
                len: buf.len() as u64,
                size,
            });
        }
        let cs = u64::from(self.repo.chunk_size());
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let i = pos / cs;
            let within = (pos - i * cs) as usize;
            let n = (buf.len() - done).min(cs as usize - within);
            let out = &mut buf[done..done + n];
            if self.stream.chunks[i as usize].is_zero() {
                out.fill(0);
            } else {
                let c = self.chunk(i).map_err(|e| self.io_error(e))?;
                out.copy_from_slice(&c[within..within + n]);
            }
            done += n;
        }
        Ok(())
    }
    fn write_at(&self, _: &[u8], _: u64) -> disk::Result<()> {
        Err(disk::Error::ReadOnly {
            path: self.label.clone(),
        })
    }
    fn write_zeroes(&self, _: u64, _: u64) -> disk::Result<()> {
        Err(disk::Error::ReadOnly {
            path: self.label.clone(),
        })
    }
    fn flush(&self) -> disk::Result<()> {
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> disk::Result<Vec<Extent>> {
        let size = self.stream.size;
        if offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(disk::Error::OutOfRange { offset, len, size });
        }
        let cs = u64::from(self.repo.chunk_size());
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let i = pos / cs;
            let n = ((i + 1) * cs).min(end) - pos;
            let zero = self.stream.chunks[i as usize].is_zero();
            match (out.last_mut(), zero) {
                (Some(Extent::Zero(l)), true) | (Some(Extent::Data(l)), false) => *l += n,
                (_, true) => out.push(Extent::Zero(n)),
                (_, false) => out.push(Extent::Data(n)),
            }
            pos += n;
        }
        Ok(out)
    }
}
