//! The conformance suite every [`Disk`] backend must pass (the `testing` feature): this
//! crate's raw and VHDX backends run it in `tests/conformance.rs`, and the crates with
//! backends of their own (the served disk a running VM's guest uses, in `host`) run it on
//! theirs.
//!
//! Each case states what any disk must do: read back what was written at any byte offset,
//! refuse out-of-range requests without changing anything, make discarded and zeroed ranges
//! read as zeros (never a parent's data), keep data across flush and reopen, and survive
//! concurrent writers on disjoint ranges and flushes racing allocating writers. A case
//! panics with what broke, as a test does.

use crate::{Disk, RawDisk, VhdxDisk};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use std::path::{Path, PathBuf};
use vhdx::{CreateParams, DiskKind};

/// Every disk of the suite has this virtual size.
pub const SIZE: u64 = 64 << 20;

/// A backend under test: how to make a disk and open it.
pub trait Backend {
    /// Its name, for messages.
    fn name(&self) -> String;
    /// Makes a disk of [`SIZE`] bytes in `dir` whose contents equal `oracle` (random data
    /// in lower layers of a chain, so that a read falling through to a parent shows);
    /// returns the path [`Backend::open`] takes.
    fn create(&self, dir: &Path, oracle: &mut [u8]) -> PathBuf;
    /// Opens the disk at `path`; read-only disks must refuse writes.
    fn open(&self, path: &Path, writable: bool) -> Box<dyn Disk>;
    /// Checks the structure of the files after the disk was flushed and closed.
    fn check(&self, path: &Path) {
        let _ = path;
    }
}

/// This crate's backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileBackend {
    /// A raw file.
    Raw,
    /// A dynamic VHDX with 1 MiB blocks.
    Dynamic,
    /// A fixed VHDX.
    Fixed,
    /// A dynamic VHDX with 4096-byte logical sectors.
    Dynamic4k,
    /// A differencing chain three files deep, random data in the lower two.
    Chain,
}

impl FileBackend {
    /// Every one of them.
    pub const ALL: [FileBackend; 5] = [
        FileBackend::Raw,
        FileBackend::Dynamic,
        FileBackend::Fixed,
        FileBackend::Dynamic4k,
        FileBackend::Chain,
    ];
}

impl Backend for FileBackend {
    fn name(&self) -> String {
        format!("{self:?}")
    }

    fn create(&self, dir: &Path, oracle: &mut [u8]) -> PathBuf {
        let vhdx = |name: &str, kind: DiskKind, logical: u32| {
            let p = dir.join(name);
            vhdx::create(
                &p,
                &CreateParams {
                    virtual_size: SIZE,
                    kind,
                    block_size: Some(1 << 20),
                    logical_sector_size: logical,
                    physical_sector_size: 4096,
                },
            )
            .unwrap();
            p
        };
        match self {
            FileBackend::Raw => {
                let p = dir.join("disk.raw");
                std::fs::File::create(&p).unwrap().set_len(SIZE).unwrap();
                p
            }
            FileBackend::Dynamic => vhdx("disk.vhdx", DiskKind::Dynamic, 512),
            FileBackend::Fixed => vhdx("disk.vhdx", DiskKind::Fixed, 512),
            FileBackend::Dynamic4k => vhdx("disk.vhdx", DiskKind::Dynamic, 4096),
            FileBackend::Chain => {
                let base = vhdx("base.vhdx", DiskKind::Dynamic, 512);
                let mut rng = StdRng::seed_from_u64(7);
                let mut fill = |path: &Path, oracle: &mut [u8]| {
                    let d = VhdxDisk::open(path, true).unwrap();
                    for _ in 0..40 {
                        let len = rng.random_range(1..300_000u64);
                        let off = rng.random_range(0..SIZE - len);
                        let mut data = vec![0u8; len as usize];
                        rng.fill_bytes(&mut data);
                        d.write_at(&data, off).unwrap();
                        oracle[off as usize..(off + len) as usize].copy_from_slice(&data);
                    }
                    d.close().unwrap();
                };
                fill(&base, oracle);
                let mid = dir.join("mid.avhdx");
                vhdx::create_differencing(&mid, &base, Some(1 << 20)).unwrap();
                fill(&mid, oracle);
                let top = dir.join("top.avhdx");
                vhdx::create_differencing(&top, &mid, None).unwrap();
                top
            }
        }
    }

    fn open(&self, path: &Path, writable: bool) -> Box<dyn Disk> {
        match self {
            FileBackend::Raw => Box::new(RawDisk::open(path, writable).unwrap()),
            _ => Box::new(VhdxDisk::open(path, writable).unwrap()),
        }
    }

    fn check(&self, path: &Path) {
        if *self != FileBackend::Raw {
            let report = vhdx::check(path, false).unwrap();
            assert!(report.is_clean(), "{self:?}: {:?}", report.errors);
        }
    }
}

/// Runs every case on `backend`.
pub fn run_all(backend: &dyn Backend) {
    reads_back_writes_at_any_offset_and_length(backend);
    end_of_disk_and_out_of_range_requests(backend);
    zeroed_and_discarded_ranges_read_as_zeros(backend);
    flushed_data_survives_reopen(backend);
    concurrent_writers_on_disjoint_ranges(backend);
    flushes_while_writers_allocate_lose_nothing(backend);
}

fn assert_reads(d: &dyn Disk, oracle: &[u8], what: &str) {
    let mut buf = vec![0u8; SIZE as usize];
    d.read_at(&mut buf, 0).unwrap();
    if buf != oracle {
        let first = buf.iter().zip(oracle).position(|(a, b)| a != b).unwrap();
        panic!("{what}: first difference at byte {first}");
    }
}

/// Makes a fresh disk of `backend` in a new temporary folder and runs `case` on it.
fn with_disk(backend: &dyn Backend, case: impl FnOnce(&Path, &mut Vec<u8>)) {
    let dir = tempfile::tempdir().unwrap();
    let mut oracle = vec![0u8; SIZE as usize];
    let path = backend.create(dir.path(), &mut oracle);
    eprintln!("backend {}", backend.name());
    case(&path, &mut oracle);
}

/// A case of the suite (see the module doc).
pub fn reads_back_writes_at_any_offset_and_length(backend: &dyn Backend) {
    with_disk(backend, |path, oracle| {
        let d = backend.open(path, true);
        assert_eq!(d.size(), SIZE);
        assert_reads(d.as_ref(), oracle, "initial contents");
        let mut rng = StdRng::seed_from_u64(1);
        let sector = u64::from(d.sector_size());
        for i in 0..300 {
            let (off, len) = match i % 4 {
                // Sector-aligned, unaligned, single bytes, and multi-block spans.
                0 => (
                    rng.random_range(0..SIZE / sector) * sector,
                    sector * rng.random_range(1..16),
                ),
                1 => (rng.random_range(0..SIZE - 5000), rng.random_range(1..5000)),
                2 => (rng.random_range(0..SIZE), 1),
                _ => (
                    rng.random_range(0..SIZE - (3 << 20)),
                    rng.random_range(1..3 << 20),
                ),
            };
            let len = len.min(SIZE - off);
            let mut data = vec![0u8; len as usize];
            rng.fill_bytes(&mut data);
            d.write_at(&data, off).unwrap();
            oracle[off as usize..(off + len) as usize].copy_from_slice(&data);
            let mut back = vec![0u8; len as usize];
            d.read_at(&mut back, off).unwrap();
            assert_eq!(
                back,
                data,
                "{}: read after write at {off}+{len}",
                backend.name()
            );
        }
        assert_reads(d.as_ref(), oracle, "after writes");
    });
}

/// A case of the suite (see the module doc).
pub fn end_of_disk_and_out_of_range_requests(backend: &dyn Backend) {
    with_disk(backend, |path, oracle| {
        let d = backend.open(path, true);
        // The very last byte, and a zero-length request at the end.
        d.write_at(&[0xEE], SIZE - 1).unwrap();
        oracle[SIZE as usize - 1] = 0xEE;
        d.write_at(&[], SIZE).unwrap();
        let mut one = [0u8];
        d.read_at(&mut one, SIZE - 1).unwrap();
        assert_eq!(one[0], 0xEE);
        d.read_at(&mut [], SIZE).unwrap();
        // Beyond the end: refused, nothing changed.
        assert!(d.read_at(&mut [0u8; 2], SIZE - 1).is_err());
        assert!(d.write_at(&[1, 2], SIZE - 1).is_err());
        assert!(d.write_at(&[1], SIZE).is_err());
        assert!(d.write_zeroes(SIZE - 512, 1024).is_err());
        assert!(d.write_at(&[1], u64::MAX).is_err());
        assert_reads(d.as_ref(), oracle, "after refused requests");
    });
}

/// A case of the suite (see the module doc).
pub fn zeroed_and_discarded_ranges_read_as_zeros(backend: &dyn Backend) {
    with_disk(backend, |path, oracle| {
        let d = backend.open(path, true);
        let mut rng = StdRng::seed_from_u64(2);
        for i in 0..60 {
            let len = match i % 3 {
                0 => 1 << 20,
                1 => rng.random_range(1..200_000),
                _ => rng.random_range(1..4 << 20),
            };
            let off = if i % 3 == 0 {
                rng.random_range(0..SIZE >> 20) << 20
            } else {
                rng.random_range(0..SIZE - len)
            };
            let len = len.min(SIZE - off);
            if i % 2 == 0 {
                d.discard(off, len).unwrap();
            } else {
                d.write_zeroes(off, len).unwrap();
            }
            oracle[off as usize..(off + len) as usize].fill(0);
            let mut back = vec![0xFFu8; len as usize];
            d.read_at(&mut back, off).unwrap();
            assert!(
                back.iter().all(|&b| b == 0),
                "{}: zeroed range {off}+{len} reads data",
                backend.name()
            );
        }
        assert_reads(d.as_ref(), oracle, "after discards");
    });
}

/// A case of the suite (see the module doc).
pub fn flushed_data_survives_reopen(backend: &dyn Backend) {
    with_disk(backend, |path, oracle| {
        let mut rng = StdRng::seed_from_u64(3);
        {
            let d = backend.open(path, true);
            for _ in 0..50 {
                let len = rng.random_range(1..1_000_000u64);
                let off = rng.random_range(0..SIZE - len);
                let mut data = vec![0u8; len as usize];
                rng.fill_bytes(&mut data);
                d.write_at(&data, off).unwrap();
                oracle[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            d.flush().unwrap();
        }
        let d = backend.open(path, false);
        assert!(d.is_read_only());
        assert!(
            d.write_at(&[1], 0).is_err(),
            "read-only disk accepted a write"
        );
        assert_reads(d.as_ref(), oracle, "after reopen");
        drop(d);
        backend.check(path);
    });
}

/// A case of the suite (see the module doc).
pub fn concurrent_writers_on_disjoint_ranges(backend: &dyn Backend) {
    with_disk(backend, |path, oracle| {
        let d = backend.open(path, true);
        let threads = 8u64;
        let stripe = SIZE / threads;
        std::thread::scope(|s| {
            for t in 0..threads {
                let d = &d;
                s.spawn(move || {
                    let mut rng = StdRng::seed_from_u64(100 + t);
                    // Unaligned pieces inside this thread's own stripe.
                    let mut pos = t * stripe;
                    while pos < (t + 1) * stripe {
                        let len = rng.random_range(1..70_000u64).min((t + 1) * stripe - pos);
                        let data = vec![(t as u8) ^ (pos as u8) | 1; len as usize];
                        d.write_at(&data, pos).unwrap();
                        pos += len;
                    }
                });
            }
        });
        // Rebuild the oracle the same way.
        for t in 0..threads {
            let mut rng = StdRng::seed_from_u64(100 + t);
            let mut pos = t * stripe;
            while pos < (t + 1) * stripe {
                let len = rng.random_range(1..70_000u64).min((t + 1) * stripe - pos);
                oracle[pos as usize..(pos + len) as usize].fill((t as u8) ^ (pos as u8) | 1);
                pos += len;
            }
        }
        d.flush().unwrap();
        assert_reads(d.as_ref(), oracle, "after concurrent writes");
    });
}

/// A case of the suite (see the module doc).
pub fn flushes_while_writers_allocate_lose_nothing(backend: &dyn Backend) {
    with_disk(backend, |path, oracle| {
        let d = backend.open(path, true);
        let threads = 4u64;
        let stripe = SIZE / threads;
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let flusher = s.spawn(|| {
                let mut flushes = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    d.flush().unwrap();
                    flushes += 1;
                }
                flushes
            });
            let writers: Vec<_> = (0..threads)
                .map(|t| {
                    let d = &d;
                    s.spawn(move || {
                        let mut rng = StdRng::seed_from_u64(200 + t);
                        for _ in 0..150 {
                            let len = rng.random_range(1..100_000u64);
                            let off = t * stripe + rng.random_range(0..stripe - len);
                            d.write_at(&vec![t as u8 + 1; len as usize], off).unwrap();
                        }
                    })
                })
                .collect();
            for w in writers {
                w.join().unwrap();
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            assert!(flusher.join().unwrap() > 0);
        });
        for t in 0..threads {
            let mut rng = StdRng::seed_from_u64(200 + t);
            for _ in 0..150 {
                let len = rng.random_range(1..100_000u64);
                let off = t * stripe + rng.random_range(0..stripe - len);
                oracle[off as usize..(off + len) as usize].fill(t as u8 + 1);
            }
        }
        d.flush().unwrap();
        drop(d);
        let d = backend.open(path, false);
        assert_reads(d.as_ref(), oracle, "after writes racing flushes");
    });
}
