//! Power loss at every step of an into-parent merge that hands the child's blocks back to
//! the parent as it goes.
//!
//! The merge runs on two memory files whose mutating calls (writes, resizes, punches,
//! syncs) go into one log, in the order they happened across both files. A power loss
//! after call `k` leaves each file as its last sync before `k` made it, plus any subset of
//! the calls it made since then. For instants around every sync and punch (and others
//! picked at random), both files are rebuilt that way and written to disk, and then:
//! - the chain reads exactly what it read before the merge;
//! - `check` finds no error in either file;
//! - running the merge again completes, and the parent alone reads that data.
//!
//! The test fails if a block is given back before the parent's copy of it is durable,
//! or if its punch is not made after the commit that unmaps it.

use super::{IntoParentCopy, announce_merge_guid, copy_into_parent};
use crate::testing::MemFile;
use crate::{Chain, CreateParams, FileIo, MergeDirection, OpenOptions, VhdxFile};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const MIB: u64 = 1 << 20;
const DISK: u64 = 32 * MIB;

#[derive(Debug, Clone)]
enum Call {
    Write(u64, Vec<u8>),
    SetLen(u64),
    Punch(u64, u64),
    Sync,
}

type Log = Arc<Mutex<Vec<(usize, Call)>>>;

/// A memory file whose mutating calls go into a log shared with the other file. Reads of
/// the child are slowed, so that the copy spans several flushes of the parent.
#[derive(Debug)]
struct Recorded {
    file: MemFile,
    id: usize,
    log: Log,
    slow_reads: bool,
}

impl FileIo for Recorded {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.slow_reads && buf.len() as u64 >= MIB / 2 {
            std::thread::sleep(Duration::from_millis(8));
        }
        self.file.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut log = self.log.lock().unwrap();
        self.file.write_at(buf, offset)?;
        log.push((self.id, Call::Write(offset, buf.to_vec())));
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        self.log.lock().unwrap().push((self.id, Call::Sync));
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        self.file.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut log = self.log.lock().unwrap();
        self.file.set_len(len)?;
        log.push((self.id, Call::SetLen(len)));
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut log = self.log.lock().unwrap();
        self.file.punch_hole(offset, len)?;
        log.push((self.id, Call::Punch(offset, len)));
        Ok(())
    }
}

fn apply(image: &mut Vec<u8>, call: &Call) {
    match call {
        Call::Write(offset, data) => {
            let (s, e) = (*offset as usize, *offset as usize + data.len());
            if image.len() < e {
                image.resize(e, 0);
            }
            image[s..e].copy_from_slice(data);
        }
        Call::SetLen(len) => image.resize(*len as usize, 0),
        Call::Punch(offset, len) => {
            let s = (*offset as usize).min(image.len());
            let e = (*offset as usize + *len as usize).min(image.len());
            image[s..e].fill(0);
        }
        Call::Sync => {}
    }
}

/// File `id` as a power loss right after the first `k` calls leaves it: every call up to
/// its last sync among them, then those after it that `keep` selects.
fn image_after(
    initial: &[u8],
    log: &[(usize, Call)],
    id: usize,
    k: usize,
    keep: &mut dyn FnMut() -> bool,
) -> Vec<u8> {
    let calls: Vec<&Call> = log[..k]
        .iter()
        .filter(|(f, _)| *f == id)
        .map(|(_, c)| c)
        .collect();
    let synced = calls
        .iter()
        .rposition(|c| matches!(c, Call::Sync))
        .map_or(0, |i| i + 1);
    let mut image = initial.to_vec();
    for c in &calls[..synced] {
        apply(&mut image, c);
    }
    for c in &calls[synced..] {
        if keep() {
            apply(&mut image, c);
        }
    }
    image
}

/// Writes `image` leaving its zero pages as holes.
fn write_sparse(path: &Path, image: &[u8]) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::create(path).unwrap();
    for (i, page) in image.chunks(4096).enumerate() {
        if page.iter().any(|&b| b != 0) {
            file.write_all_at(page, i as u64 * 4096).unwrap();
        }
    }
    file.set_len(image.len() as u64).unwrap();
}

fn pattern(tag: u8, len: u64) -> Vec<u8> {
    (0..len as usize)
        .map(|i| tag ^ (i / 512) as u8 ^ (i >> 16) as u8)
        .collect()
}

fn read_chain(top: &Path) -> Vec<u8> {
    let chain = Chain::open(top, false).unwrap();
    let mut buf = vec![0u8; DISK as usize];
    chain.read_at(&mut buf, 0).unwrap();
    buf
}

/// A base with 1 MiB blocks written over [0, 24 MiB), and a child storing 12 whole
/// blocks, part of another (a partially present block) and one zeroed block.
fn build(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let base = dir.join("base.vhdx");
    let child = dir.join("child.avhdx");
    let params = CreateParams {
        block_size: Some(MIB as u32),
        ..CreateParams::dynamic(DISK)
    };
    crate::create(&base, &params).unwrap();
    let c = Chain::open(&base, true).unwrap();
    c.write_at(&pattern(0x11, 24 * MIB), 0).unwrap();
    c.close().unwrap();
    crate::create_differencing(&child, &base, None).unwrap();
    let c = Chain::open(&child, true).unwrap();
    for (i, block) in [1u64, 2, 3, 6, 9, 10, 11, 15, 20, 21, 26, 30]
        .iter()
        .enumerate()
    {
        c.write_at(&pattern(0x40 + i as u8, MIB), block * MIB)
            .unwrap();
    }
    c.write_at(&pattern(0x77, 64 << 10), 13 * MIB + (128 << 10))
        .unwrap();
    c.write_zeroes(17 * MIB, MIB).unwrap();
    c.close().unwrap();
    (base, child)
}

#[test]
fn power_loss_at_any_instant_of_an_into_parent_merge_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (base, child) = build(dir.path());
    let expected = read_chain(&child);
    let initial = [
        std::fs::read(&child).unwrap(),
        std::fs::read(&base).unwrap(),
    ];
    let log: Log = Arc::default();
    let recorded = |id: usize| {
        Arc::new(Recorded {
            file: MemFile::new(initial[id].clone()),
            id,
            log: log.clone(),
            slow_reads: id == 0,
        })
    };

    // The merge's steps 1 to 4, as `merge_into_parent` runs them, on the recorded files.
    let child_file = VhdxFile::open_io(
        recorded(0),
        &child,
        OpenOptions {
            writable: true,
            keep_data_write_guid: true,
            ..Default::default()
        },
    )
    .unwrap();
    let guid = announce_merge_guid(&child_file, uuid::Uuid::new_v4).unwrap();
    let parent_file = VhdxFile::open_io(
        recorded(1),
        &base,
        OpenOptions {
            writable: true,
            data_write_guid: Some(guid),
            ..Default::default()
        },
    )
    .unwrap();
    let how = IntoParentCopy {
        start: 0,
        release: true,
        flush_every: 2 * MIB,
    };
    copy_into_parent(&child_file, &parent_file, how, &mut |_, _| {}, &mut |_| {}).unwrap();
    parent_file.flush().unwrap();
    parent_file.close().unwrap();
    child_file.close().unwrap();
    let log = std::mem::take(&mut *log.lock().unwrap());

    let punches: Vec<usize> = (0..log.len())
        .filter(|&i| matches!(log[i].1, Call::Punch(..)))
        .collect();
    let released_in_rounds = punches.windows(2).filter(|w| w[1] > w[0] + 1).count() + 1;
    assert!(
        !punches.is_empty() && released_in_rounds >= 2,
        "the merge handed blocks back in {} rounds ({} punches); the test needs at least 2",
        if punches.is_empty() {
            0
        } else {
            released_in_rounds
        },
        punches.len()
    );

    // Everything the merge did, on a file system that stores no zero pages: the child has
    // given its copied blocks' space back, and `check` sees holes, not leaks.
    {
        let crashed = dir.path().join("end");
        std::fs::create_dir(&crashed).unwrap();
        let c = crashed.join("child.avhdx");
        let image = image_after(&initial[0], &log, 0, log.len(), &mut || true);
        write_sparse(&c, &image);
        write_sparse(&crashed.join("base.vhdx"), &initial[1]);
        write_sparse(&dir.path().join("initial.avhdx"), &initial[0]);
        let stored =
            |p: &Path| std::os::unix::fs::MetadataExt::blocks(&p.metadata().unwrap()) * 512;
        let (before, after) = (stored(&dir.path().join("initial.avhdx")), stored(&c));
        assert!(
            after + 8 * MIB <= before,
            "the child stored {before} bytes before the merge and {after} after"
        );
        let report = crate::check(&c, false).unwrap();
        assert_eq!(report.leaked_bytes, 0, "{:?}", report.warnings);
    }

    let mut rng = StdRng::seed_from_u64(7);
    let mut instants = std::collections::BTreeSet::from([0, log.len()]);
    for (i, (_, call)) in log.iter().enumerate() {
        if matches!(call, Call::Sync | Call::Punch(..)) {
            instants.extend([i, i + 1]);
        }
    }
    for _ in 0..10 {
        instants.insert(rng.random_range(0..=log.len()));
    }
    let crashed = dir.path().join("crashed");
    for k in instants {
        // Lose every unsynced call, keep them all, or keep a random subset.
        let policy = rng.random_range(0..3u32);
        let mut keep = || match policy {
            0 => false,
            1 => true,
            _ => rng.random_bool(0.5),
        };
        let images = [
            image_after(&initial[0], &log, 0, k, &mut keep),
            image_after(&initial[1], &log, 1, k, &mut keep),
        ];
        let _ = std::fs::remove_dir_all(&crashed);
        std::fs::create_dir(&crashed).unwrap();
        let (c, b) = (crashed.join("child.avhdx"), crashed.join("base.vhdx"));
        std::fs::write(&c, &images[0]).unwrap();
        std::fs::write(&b, &images[1]).unwrap();
        let ctx = format!(
            "power lost after call {k} of {} (policy {policy})",
            log.len()
        );
        assert!(
            read_chain(&c) == expected,
            "{ctx}: the chain reads other data"
        );
        for path in [&c, &b] {
            let report = crate::check(path, false).unwrap();
            assert!(
                report.errors.is_empty(),
                "{ctx}: check of {}: {:?}",
                path.display(),
                report.errors
            );
        }
        let out = crate::merge(&c, MergeDirection::IntoParent, &mut |_, _| {})
            .unwrap_or_else(|e| panic!("{ctx}: the merge run again failed: {e}"));
        assert!(out.removed && !c.exists(), "{ctx}");
        assert!(
            read_chain(&b) == expected,
            "{ctx}: the merged parent reads other data"
        );
    }
}
