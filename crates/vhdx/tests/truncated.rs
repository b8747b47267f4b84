//! A truncated VHDX (an incomplete copy): `check` says so and names what lies past the
//! end; `check` with repair keeps every block whose data lies inside the file and makes
//! the rest read zeros, after which the file checks clean here and in `qemu-img check`,
//! every intact block reads back its data byte for byte (here and through QEMU), and the
//! lost ranges read zeros, also in a differencing file (not its parent's older data).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::process::Command;
use vhdx::format::{
    BatEntry, PAYLOAD_BLOCK_FULLY_PRESENT, PAYLOAD_BLOCK_PARTIALLY_PRESENT, SB_BLOCK_PRESENT,
};
use vhdx::{Chain, CreateParams, OpenOptions, VhdxFile};

const MIB: u64 = 1 << 20;

fn truncate(path: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// Stored blocks of `path`: (block, file offset), in file order.
fn stored_blocks(path: &Path) -> Vec<(u64, u64)> {
    let f = VhdxFile::open(path, OpenOptions::default()).unwrap();
    let mut v = Vec::new();
    f.for_each_block_entry(|b, e| {
        if matches!(
            e.state(),
            PAYLOAD_BLOCK_FULLY_PRESENT | PAYLOAD_BLOCK_PARTIALLY_PRESENT
        ) {
            v.push((b, e.file_offset()));
        }
    });
    v.sort_by_key(|&(_, o)| o);
    v
}

fn read_all(path: &Path) -> Vec<u8> {
    let c = Chain::open(path, false).unwrap();
    let mut buf = vec![0u8; c.virtual_size() as usize];
    c.read_at(&mut buf, 0).unwrap();
    buf
}

fn qemu_img(args: &[&str]) -> Option<String> {
    let out = Command::new("qemu-img").args(args).output().ok()?;
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Every byte of `got` equals `expected`, except the lost blocks, which read zeros.
#[track_caller]
fn assert_salvaged(got: &[u8], expected: &[u8], lost: &[u64], bs: u64) {
    assert_eq!(got.len(), expected.len());
    for b in 0..(got.len() as u64).div_ceil(bs) {
        let r = (b * bs) as usize..((b + 1) * bs).min(got.len() as u64) as usize;
        if lost.contains(&b) {
            assert!(
                got[r].iter().all(|&x| x == 0),
                "lost block {b} is not zeros"
            );
        } else {
            assert!(got[r.clone()] == expected[r], "intact block {b} differs");
        }
    }
}

#[test]
fn a_truncated_dynamic_file_is_salvaged_block_for_block() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.vhdx");
    let bs = MIB;
    vhdx::create(
        &path,
        &CreateParams {
            block_size: Some(bs as u32),
            ..CreateParams::dynamic(64 * MIB)
        },
    )
    .unwrap();
    // Blocks written out of order, so that the file's order is not the disk's; one
    // written only in part.
    let mut rng = StdRng::seed_from_u64(10);
    let mut expected = vec![0u8; 64 * MIB as usize];
    {
        let c = Chain::open(&path, true).unwrap();
        for b in [12u64, 3, 40, 0, 1, 2, 27, 63, 20, 21, 50, 7] {
            let mut data = vec![0u8; bs as usize];
            rng.fill(&mut data[..]);
            let data = if b == 27 { &data[..4096] } else { &data[..] };
            c.write_at(data, b * bs).unwrap();
            expected[(b * bs) as usize..(b * bs) as usize + data.len()].copy_from_slice(data);
        }
        c.close().unwrap();
    }
    let stored = stored_blocks(&path);
    assert_eq!(stored.len(), 12);
    // Cut in the middle of the 8th block's data.
    let cut = stored[7].1 + bs / 2;
    truncate(&path, cut);
    let mut lost: Vec<u64> = stored[7..].iter().map(|&(b, _)| b).collect();
    lost.sort_unstable();

    let report = vhdx::check(&path, false).unwrap();
    assert!(!report.is_clean());
    let text = report.errors.join("\n");
    assert!(
        text.contains("past the end of the file") && text.contains("probably truncated"),
        "{text}"
    );
    assert!(text.contains("repair keeps the 7 intact blocks"), "{text}");
    assert_eq!(report.lost_blocks, 5, "{report:?}");
    assert_eq!(report.lost_bytes, 5 * bs);
    let ranges: Vec<(u64, u64)> = {
        let mut r: Vec<(u64, u64)> = Vec::new();
        for &b in &lost {
            match r.last_mut() {
                Some(l) if l.0 + l.1 == b * bs => l.1 += bs,
                _ => r.push((b * bs, bs)),
            }
        }
        r
    };
    assert_eq!(report.lost_ranges, ranges);
    // The check changed nothing.
    assert_eq!(std::fs::metadata(&path).unwrap().len(), cut);

    let report = vhdx::check(&path, true).unwrap();
    assert!(report.is_clean(), "{report:?}");
    let repaired = report.repaired.join("\n");
    assert!(
        repaired.contains("salvaged the truncated file: dropped 5 blocks (5 MiB"),
        "{repaired}"
    );
    assert_eq!(report.lost_ranges, ranges);
    assert_eq!(report.full_blocks, 7);
    // Clean now, and again on a second look.
    let again = vhdx::check(&path, false).unwrap();
    assert!(again.is_clean() && again.lost_blocks == 0, "{again:?}");
    assert_salvaged(&read_all(&path), &expected, &lost, bs);

    if let Some(out) = qemu_img(&["check", "-f", "vhdx", path.to_str().unwrap()]) {
        assert!(out.contains("No errors were found"), "{out}");
        let raw = dir.path().join("q.raw");
        qemu_img(&[
            "convert",
            "-f",
            "vhdx",
            "-O",
            "raw",
            path.to_str().unwrap(),
            raw.to_str().unwrap(),
        ]);
        assert_salvaged(&std::fs::read(&raw).unwrap(), &expected, &lost, bs);
    } else {
        eprintln!("qemu-img is not installed: QEMU's view not checked");
    }
    // The salvaged file takes writes again, in the dropped blocks too.
    let c = Chain::open(&path, true).unwrap();
    c.write_at(&[9u8; 4096], lost[0] * bs).unwrap();
    c.close().unwrap();
    assert!(vhdx::check(&path, false).unwrap().is_clean());
}

#[test]
fn a_truncated_differencing_file_drops_to_zeros_not_to_its_parent() {
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("p.vhdx");
    let child = dir.path().join("c.avhdx");
    let bs = MIB;
    vhdx::create(
        &parent,
        &CreateParams {
            block_size: Some(bs as u32),
            ..CreateParams::dynamic(16 * MIB)
        },
    )
    .unwrap();
    let mut expected = vec![0x11u8; 16 * MIB as usize];
    {
        let c = Chain::open(&parent, true).unwrap();
        c.write_at(&expected, 0).unwrap();
        c.close().unwrap();
    }
    vhdx::create_differencing(&child, &parent, Some(bs as u32)).unwrap();
    {
        let c = Chain::open(&child, true).unwrap();
        // Whole blocks 1 and 2, sectors of block 3 (with the chunk's sector bitmap),
        // whole block 5, sectors of block 6: allocated in this order.
        for (off, len, v) in [
            (MIB, MIB, 0x21u8),
            (2 * MIB, MIB, 0x22),
            (3 * MIB + 4096, 8192, 0x23),
            (5 * MIB, MIB, 0x25),
            (6 * MIB + 512, 512, 0x26),
        ] {
            let data = vec![v; len as usize];
            c.write_at(&data, off).unwrap();
            c.flush().unwrap();
            expected[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        c.close().unwrap();
    }
    let stored = stored_blocks(&child);
    let order: Vec<u64> = stored.iter().map(|&(b, _)| b).collect();
    assert_eq!(order, [1, 2, 3, 5, 6], "{stored:?}");
    // Cut in the middle of block 5: blocks 5 and 6 are lost; the bitmap (allocated with
    // block 3, before it) stays.
    truncate(&child, stored[3].1 + bs / 2);
    let report = vhdx::check(&child, false).unwrap();
    assert_eq!(report.lost_ranges, [(5 * MIB, 2 * MIB)], "{report:?}");
    let report = vhdx::check(&child, true).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!((report.full_blocks, report.partial_blocks), (2, 1));
    assert_salvaged(&read_all(&child), &expected, &[5, 6], bs);
    // (QEMU opens no differencing VHDX: nothing to cross-check there.)
}

/// A sector bitmap past the end takes the partially present blocks of its chunk with it,
/// even when their own data lies inside the file.
#[test]
fn a_lost_sector_bitmap_drops_the_partial_blocks_it_describes() {
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("p.vhdx");
    let child = dir.path().join("c.avhdx");
    let bs = MIB;
    vhdx::create(
        &parent,
        &CreateParams {
            block_size: Some(bs as u32),
            ..CreateParams::dynamic(16 * MIB)
        },
    )
    .unwrap();
    vhdx::create_differencing(&child, &parent, Some(bs as u32)).unwrap();
    let mut expected = vec![0u8; 16 * MIB as usize];
    {
        let c = Chain::open(&child, true).unwrap();
        for (off, len, v) in [(MIB, MIB, 0x31u8), (2 * MIB + 512, 512, 0x32)] {
            let data = vec![v; len as usize];
            c.write_at(&data, off).unwrap();
            c.flush().unwrap();
            expected[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        c.close().unwrap();
    }
    // The engine puts a chunk's bitmap before the first partial block it describes: move
    // it to the end of the file (a copy, and its BAT entry pointed there; the BAT has no
    // checksum), as a file grown by another writer may have it.
    let f = VhdxFile::open(&child, OpenOptions::default()).unwrap();
    let index = f.geometry().bitmap_index(0);
    let old = f.entry(index).file_offset();
    let bat = f.bat_offset();
    drop(f);
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&child)
            .unwrap();
        let sb = file.metadata().unwrap().len().next_multiple_of(MIB);
        let mut bitmap = vec![0u8; MIB as usize];
        file.read_exact_at(&mut bitmap, old).unwrap();
        file.write_all_at(&bitmap, sb).unwrap();
        let entry = BatEntry::new(SB_BLOCK_PRESENT, sb);
        file.write_all_at(&entry.0.to_le_bytes(), bat + index * 8)
            .unwrap();
        drop(file);
        let moved = vhdx::check(&child, false).unwrap();
        assert!(moved.is_clean(), "{moved:?}");
        assert_salvaged(&read_all(&child), &expected, &[], bs);
        // Cut inside the bitmap block: block 2's data is intact, its bitmap is not.
        truncate(&child, sb + bs / 2);
    }
    let report = vhdx::check(&child, false).unwrap();
    assert_eq!(report.lost_ranges, [(2 * MIB, MIB)], "{report:?}");
    assert!(
        report
            .errors
            .join(" ")
            .contains("their sector bitmap does not"),
        "{report:?}"
    );
    let report = vhdx::check(&child, true).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_salvaged(&read_all(&child), &expected, &[2], bs);
}

/// Power lost at any point of a salvage (every sync in turn fails, then none, half or all
/// of the unsynced writes are kept) leaves a file that is either still the truncated one
/// or salvaged, never clean with other data; and a repair of it gives the same result.
#[test]
fn power_loss_during_a_salvage_leaves_a_file_a_repair_finishes() {
    use std::sync::Arc;
    use vhdx::{CrashIo, Fault, FaultyIo, FileIo};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.vhdx");
    let bs = MIB;
    vhdx::create(
        &path,
        &CreateParams {
            block_size: Some(bs as u32),
            ..CreateParams::dynamic(32 * MIB)
        },
    )
    .unwrap();
    let mut rng = StdRng::seed_from_u64(11);
    let mut expected = vec![0u8; 32 * MIB as usize];
    {
        let c = Chain::open(&path, true).unwrap();
        for b in [5u64, 0, 9, 30, 2, 17] {
            let mut data = vec![0u8; bs as usize];
            rng.fill(&mut data[..]);
            c.write_at(&data, b * bs).unwrap();
            expected[(b * bs) as usize..((b + 1) * bs) as usize].copy_from_slice(&data);
        }
        c.close().unwrap();
    }
    let stored = stored_blocks(&path);
    truncate(&path, stored[3].1 + bs / 3);
    let mut lost: Vec<u64> = stored[3..].iter().map(|&(b, _)| b).collect();
    lost.sort_unstable();
    let truncated = std::fs::read(&path).unwrap();
    let crashed = dir.path().join("crashed.vhdx");
    let mut completed = false;
    let mut syncs = 0;
    while !completed {
        let io = Arc::new(FaultyIo::new(
            CrashIo::new(truncated.clone()),
            syncs,
            Fault::SyncFailure,
        ));
        let result = vhdx::salvage_io(io.clone() as Arc<dyn FileIo>, &path);
        completed = result.is_ok();
        if let Ok(n) = result {
            assert_eq!(n, 3);
        }
        for keep in [0.0, 0.5, 1.0] {
            let what = format!("sync {syncs} failed, unsynced writes kept with p={keep}");
            let image = io.inner().crash(|_| rng.random_bool(keep));
            std::fs::write(&crashed, &image).unwrap();
            let report = vhdx::check(&crashed, false).unwrap();
            if report.is_clean() {
                assert_salvaged(&read_all(&crashed), &expected, &lost, bs);
            } else {
                assert_eq!(report.lost_blocks, 3, "{what}: {report:?}");
            }
            let report = vhdx::check(&crashed, true)
                .unwrap_or_else(|e| panic!("{what}: repair failed: {}", vhdx::error_chain(&e)));
            assert!(report.is_clean(), "{what}: {report:?}");
            assert_salvaged(&read_all(&crashed), &expected, &lost, bs);
        }
        syncs += 1;
        assert!(syncs < 50, "the salvage never completed");
    }
    assert!(syncs > 2, "the salvage took only {syncs} syncs");
}

/// Cut before the data area (inside the log, the BAT or the metadata): nothing can be
/// salvaged; check says the file was probably truncated, repair fails and changes nothing.
#[test]
fn a_file_cut_before_its_data_area_is_not_salvaged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.vhdx");
    vhdx::create(&path, &CreateParams::dynamic(64 * MIB)).unwrap();
    {
        let c = Chain::open(&path, true).unwrap();
        c.write_at(&[7u8; 4096], 0).unwrap();
        c.close().unwrap();
    }
    for cut in [MIB + MIB / 2, 3 * MIB + 4096] {
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(cut as usize);
        let p = dir.path().join("cut.vhdx");
        std::fs::write(&p, &bytes).unwrap();
        let report = vhdx::check(&p, false).unwrap();
        let text = report.errors.join("\n");
        assert!(text.contains("probably truncated"), "cut at {cut}: {text}");
        assert!(vhdx::check(&p, true).is_err(), "cut at {cut}");
        assert_eq!(std::fs::read(&p).unwrap(), bytes, "cut at {cut}");
    }
}
