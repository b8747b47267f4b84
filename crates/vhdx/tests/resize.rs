//! Resizing is crash-safe: power lost at any sync of a resize (and any subset of the
//! writes not yet synced lost with it) leaves a file that opens, has the old size or the
//! new one, reads every byte written before, and reads zeros past the old end.
//!
//! Fixed files are left to the CLI tests: their growth reserves space through the real
//! file (fallocate), which the simulated files here do not have.

use std::path::Path;
use std::sync::Arc;
use vhdx::{CrashIo, CreateParams, Fault, FaultyIo, MemFile, OpenOptions, VhdxFile};

const MIB: u64 = 1 << 20;

fn rw() -> OpenOptions {
    OpenOptions {
        writable: true,
        ..OpenOptions::default()
    }
}

/// A dynamic file of `size` bytes with 1 MiB blocks and a pattern at `marks`.
fn seed_file(dir: &Path, size: u64, marks: &[u64]) -> Vec<u8> {
    let path = dir.join("seed.vhdx");
    let _ = std::fs::remove_file(&path);
    vhdx::create(
        &path,
        &CreateParams {
            block_size: Some(MIB as u32),
            ..CreateParams::dynamic(size)
        },
    )
    .unwrap();
    let f = VhdxFile::open(&path, rw()).unwrap();
    for (k, &m) in marks.iter().enumerate() {
        f.write_at(&[k as u8 + 1; 4096], m).unwrap();
    }
    f.close().unwrap();
    std::fs::read(&path).unwrap()
}

fn trial(what: &str, seed: &[u8], old: u64, new: u64, marks: &[u64]) {
    let mut saw_old = false;
    let mut saw_new = false;
    for syncs in 0..40 {
        for keep in [0.0, 0.5, 1.0] {
            let io = Arc::new(FaultyIo::new(
                CrashIo::new(seed.to_vec()),
                syncs,
                Fault::SyncFailure,
            ));
            let f = VhdxFile::open_io(io.clone(), Path::new("t.vhdx"), rw()).unwrap();
            let done = f.resize(new).is_ok();
            let mut n = 0u64;
            let image = io.inner().crash(|_| {
                n += 1;
                keep == 1.0 || (keep > 0.0 && n.is_multiple_of(2))
            });
            let file = VhdxFile::open_io(
                Arc::new(MemFile::new(image)),
                Path::new("t.vhdx"),
                OpenOptions::default(),
            )
            .unwrap_or_else(|e| {
                panic!(
                    "{what}: after {syncs} syncs (keeping {keep}) the file does not open: {}",
                    vhdx::error_chain(&e)
                )
            });
            let size = file.geometry().virtual_size;
            assert!(
                size == old || size == new,
                "{what}: after {syncs} syncs the size is {size}"
            );
            if done {
                assert_eq!(size, new, "{what}: a finished resize is durable");
            }
            saw_old |= size == old;
            saw_new |= size == new;
            for (k, &m) in marks.iter().enumerate() {
                if m + 4096 <= size {
                    let mut buf = [0u8; 4096];
                    file.read_at(&mut buf, m).unwrap();
                    assert_eq!(
                        buf,
                        [k as u8 + 1; 4096],
                        "{what}: mark {k} after {syncs} syncs"
                    );
                }
            }
            if size > old {
                // Past the old end: zeros, read in a few places (the file is large).
                for at in [old, old + 4096, (old + size) / 2 / 4096 * 4096, size - 4096] {
                    let mut buf = [1u8; 4096];
                    file.read_at(&mut buf, at).unwrap();
                    assert!(
                        buf.iter().all(|&b| b == 0),
                        "{what}: data at {at} after growth"
                    );
                }
            }
            if done && keep == 0.0 {
                break;
            }
        }
    }
    assert!(
        saw_old && saw_new,
        "{what}: the trials never cut the resize"
    );
}

#[test]
fn a_grow_in_place_survives_power_loss_at_every_sync() {
    let dir = tempfile::tempdir().unwrap();
    let old = 64 * MIB + 512;
    let marks = [0, 30 * MIB, 64 * MIB - 3584];
    let seed = seed_file(dir.path(), old, &marks);
    trial("grow in place", &seed, old, 100 * MIB, &marks);
}

#[test]
fn a_grow_that_moves_the_bat_survives_power_loss_at_every_sync() {
    let dir = tempfile::tempdir().unwrap();
    let old = 64 * MIB;
    let marks = [0, 63 * MIB];
    let seed = seed_file(dir.path(), old, &marks);
    // 1 MiB of BAT holds 128 GiB of 1 MiB blocks (less the chunk entries): 200 GiB moves it.
    trial("grow moving the bat", &seed, old, 200 << 30, &marks);
}

#[test]
fn a_shrink_survives_power_loss_and_a_later_grow_reads_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let old = 64 * MIB;
    // Data at 40 MiB, then zeroed (the block stays allocated): the tail is free.
    let marks = [0, 20 * MIB];
    let path = dir.path().join("seed.vhdx");
    let mut seed = seed_file(dir.path(), old, &marks);
    {
        std::fs::write(&path, &seed).unwrap();
        let f = VhdxFile::open(&path, rw()).unwrap();
        f.write_at(&[7u8; 4096], 40 * MIB).unwrap();
        f.write_at(&[0u8; 4096], 40 * MIB).unwrap();
        f.close().unwrap();
        seed = std::fs::read(&path).unwrap();
    }
    trial("shrink", &seed, old, 32 * MIB, &marks);
    // Shrunk and grown again: the zeroed block past the cut does not come back as stored.
    vhdx::resize(&path, 32 * MIB).unwrap();
    vhdx::resize(&path, old).unwrap();
    let f = VhdxFile::open(&path, OpenOptions::default()).unwrap();
    assert_eq!(
        f.block_entry(40).state(),
        0,
        "the block past the cut is not present"
    );
    let mut buf = [1u8; 4096];
    f.read_at(&mut buf, 40 * MIB).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    drop(f);
    // A shrink over data is refused and changes nothing.
    let f = VhdxFile::open(&path, rw()).unwrap();
    f.write_at(&[9u8; 512], 50 * MIB).unwrap();
    f.close().unwrap();
    let before = std::fs::read(&path).unwrap();
    let e = vhdx::resize(&path, 32 * MIB).unwrap_err();
    assert!(e.to_string().contains("512 bytes of data lie past"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
}
