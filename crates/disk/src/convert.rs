//! Copying a disk into a new raw or VHDX file.
//!
//! Ranges the source reports as zero are not read; ranges that read as zeros are not
//! written, so they stay holes in a raw file and unallocated blocks in a VHDX file. A reader
//! thread and a writer overlap their I/O. The destination is built under a temporary name
//! and renamed into place once complete and synced.

use crate::{Disk, Error, Extent, Result};
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc::sync_channel;
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
    let tmp = vhdx::create::temp_name(dst);
    let _ = std::fs::remove_file(&tmp);
    let result = convert_to(src, &tmp, options, progress);
    match result {
        Ok(stats) => {
            std::fs::rename(&tmp, dst).map_err(|e| Error::Io {
                path: dst.to_owned(),
                source: e,
            })?;
            vhdx::create::sync_parent_dir(dst).map_err(|e| Error::Io {
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
    file: std::fs::File,
    path: std::path::PathBuf,
    size: u64,
}

impl Sink for RawSink {
    fn write(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.file.write_all_at(buf, offset).map_err(|e| Error::Io {
            path: self.path.clone(),
            source: e,
        })
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

struct VhdxSink {
    file: vhdx::VhdxFile,
}

impl Sink for VhdxSink {
    fn write(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        Ok(self.file.write_at(buf, offset)?)
    }
    fn finish(self: Box<Self>) -> Result<()> {
        self.file.flush()?;
        Ok(self.file.close()?)
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
            Box::new(RawSink {
                file,
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
            Box::new(VhdxSink { file })
        }
    };

    let mut stats = ConvertStats::default();
    let (data_tx, data_rx) = sync_channel::<(u64, Vec<u8>, Vec<(usize, usize)>)>(4);
    let (pool_tx, pool_rx) = sync_channel::<Vec<u8>>(8);
    for _ in 0..6 {
        let _ = pool_tx.send(vec![0u8; CHUNK as usize]);
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
                        buf.resize(n as usize, 0);
                        src.read_at(&mut buf, at)?;
                        read += n;
                        // Non-zero runs at a 64 KiB grain.
                        let mut runs: Vec<(usize, usize)> = Vec::new();
                        for (i, grain) in buf.chunks(ZERO_GRAIN).enumerate() {
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
                    if let Err(e) = sink.write(&buf[*s0..*s1], at + *s0 as u64) {
                        write_error = Some(e);
                        break;
                    }
                    stats.bytes_written += (s1 - s0) as u64;
                }
                progress(at + buf.len() as u64, size);
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
