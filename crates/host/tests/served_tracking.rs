//! Change tracking on the served disk: every write, write-zeroes and discard the guest
//! makes is marked in the tracking file before it is made (read back from the file while
//! the disk is still open, as after a crash), exactly the regions touched; the top file
//! takes the session's DataWriteGuid, which the file then accepts; what marking costs a
//! guest write, first touch and after, with 8 writers first touching at once (their syncs
//! shared), and for a sequential writer (regions marked ahead of it, within bounds).

use disk::Disk;
use host::served::ServedDisk;
use rand::{Rng, SeedableRng};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;
use vm::tracking::{LiveTracker, REGION_BYTES, Status, Tracking, chain_seen};

const SIZE: u64 = 1 << 30;

fn served(dir: &std::path::Path, tracked: bool) -> (ServedDisk, uuid::Uuid) {
    let path = dir.join(if tracked { "t.vhdx" } else { "u.vhdx" });
    vhdx::create(&path, &vhdx::CreateParams::dynamic(SIZE)).unwrap();
    let session = uuid::Uuid::new_v4();
    let d = ServedDisk::open_in_session(&path, Some(session)).unwrap();
    if tracked {
        let seen = d.with_chain(chain_seen).unwrap();
        let mut t = Tracking::new(SIZE, None, seen);
        t.set_session(Some(session));
        let live = LiveTracker::start(&Tracking::path(dir, "disk0"), t).unwrap();
        d.track(Arc::new(live));
    }
    (d, session)
}

fn on_disk(dir: &std::path::Path) -> Tracking {
    match Tracking::load(&Tracking::path(dir, "disk0")).unwrap() {
        Status::Valid(t) => t,
        other => panic!("{other:?}"),
    }
}

#[test]
fn every_change_is_marked_before_it_is_made_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let (d, session) = served(dir.path(), true);
    // Exactly what was touched (marking ahead of a sequential writer is measured below).
    d.tracker().unwrap().set_mark_ahead(0);
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut touched = BTreeSet::new();
    let buf = vec![0xa5u8; 256 << 10];
    for i in 0..300 {
        let len = rng.random_range(1..=buf.len() as u64);
        let offset = rng.random_range(0..SIZE - len);
        match i % 3 {
            0 | 1 => d.write_at(&buf[..len as usize], offset).unwrap(),
            _ => d.write_zeroes(offset, len).unwrap(),
        }
        for r in offset / REGION_BYTES..(offset + len).div_ceil(REGION_BYTES) {
            touched.insert(r);
        }
        if i % 50 == 0 {
            // Durable at once: the file read now (the disk still open) has it.
            let t = on_disk(dir.path());
            assert_eq!(
                t.changed_regions(),
                touched.len() as u64,
                "after change {i}"
            );
        }
    }
    let t = on_disk(dir.path());
    let marked: BTreeSet<u64> = t
        .changed()
        .iter()
        .flat_map(|r| r.start / REGION_BYTES..r.end.div_ceil(REGION_BYTES))
        .collect();
    assert_eq!(marked, touched);
    // The top file carries the session's DataWriteGuid, which the record accepts.
    let seen = d.with_chain(chain_seen).unwrap();
    assert_eq!(
        seen[0].data_write_guid,
        vm::tracking::session_guid(session, &seen[0].file)
    );
    assert_eq!(t.check_chain(SIZE, &seen), Ok(()));
    d.close().unwrap();
}

/// Mean µs per 4 KiB write over `n` writes at offsets `at(i)`.
fn time_writes(d: &ServedDisk, n: u64, at: impl Fn(u64) -> u64) -> f64 {
    let buf = vec![7u8; 4096];
    let t = Instant::now();
    for i in 0..n {
        d.write_at(&buf, at(i)).unwrap();
    }
    t.elapsed().as_secs_f64() * 1e6 / n as f64
}

#[test]
fn marking_costs_a_first_touch_only() {
    let dir = tempfile::tempdir().unwrap();
    let (plain, _) = served(dir.path(), false);
    let (tracked, _) = served(dir.path(), true);
    // Warm both (allocation of the VHDX blocks is not what is measured).
    let spread = |i: u64| (i % 64) * REGION_BYTES + (i / 64 % 256) * 4096;
    time_writes(&plain, 64 * 256, spread);
    time_writes(&tracked, 64 * 256, spread);
    let n = 20_000;
    let again = |i: u64| spread(i % (64 * 256));
    let plain_us = time_writes(&plain, n, again);
    let tracked_us = time_writes(&tracked, n, again);
    // First touches: one page write and fdatasync each (the regions are consecutive:
    // none marked ahead by the one before).
    tracked.tracker().unwrap().set_mark_ahead(0);
    let first = |i: u64| (64 + i) * REGION_BYTES;
    let first_us = time_writes(&tracked, 64, first);
    let plain_first_us = time_writes(&plain, 64, first);
    eprintln!(
        "4 KiB writes to marked regions: {plain_us:.2} µs untracked, {tracked_us:.2} µs tracked; first touch of a region: {first_us:.0} µs tracked, {plain_first_us:.0} µs untracked"
    );
    // An already marked region costs an atomic load, lost in the write's own cost.
    assert!(
        tracked_us < plain_us * 1.5 + 2.0,
        "{tracked_us:.2} µs tracked vs {plain_us:.2} µs"
    );
}

/// First touches by `writers` threads at once, each writing 4 KiB to `per` regions of its
/// own: the mean and the worst µs a write waited, and the wall time in ms.
fn concurrent_first_touches(d: &ServedDisk, writers: u64, per: u64, base: u64) -> (f64, f64, f64) {
    let t = Instant::now();
    let waits: Vec<f64> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..writers)
            .map(|w| {
                s.spawn(move || {
                    let buf = vec![w as u8; 4096];
                    (0..per)
                        .map(|k| {
                            let region = base + k * writers + w;
                            let t = Instant::now();
                            d.write_at(&buf, region * REGION_BYTES).unwrap();
                            t.elapsed().as_secs_f64() * 1e6
                        })
                        .collect::<Vec<f64>>()
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    });
    let wall = t.elapsed().as_secs_f64() * 1e3;
    let mean = waits.iter().sum::<f64>() / waits.len() as f64;
    let worst = waits.iter().cloned().fold(0.0, f64::max);
    (mean, worst, wall)
}

#[test]
fn concurrent_first_touches_share_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let (plain, _) = served(dir.path(), false);
    let (tracked, _) = served(dir.path(), true);
    // The writers' regions interleave: none may be marked ahead by another's.
    tracked.tracker().unwrap().set_mark_ahead(0);
    let (writers, per) = (8, 16);
    // The untracked disk shows what the first writes cost without marking (they
    // allocate VHDX blocks either way).
    let (plain_mean, plain_worst, plain_wall) = concurrent_first_touches(&plain, writers, per, 0);
    let (mean, worst, wall) = concurrent_first_touches(&tracked, writers, per, 0);
    eprintln!(
        "first touches by {writers} concurrent writers ({} regions): {mean:.0} µs mean, {worst:.0} µs worst, {wall:.0} ms in all tracked; {plain_mean:.0} µs mean, {plain_worst:.0} µs worst, {plain_wall:.0} ms untracked",
        writers * per
    );
    // Every region written is marked in the file.
    let t = on_disk(dir.path());
    assert_eq!(t.changed_regions(), writers * per);
}

/// A sequential writer over `regions` regions from region `from`, writing 4 KiB every
/// 256 KiB (so that marking, not the data, is what it waits for): ms in all.
fn sequential(d: &ServedDisk, from: u64, regions: u64) -> f64 {
    let buf = vec![3u8; 4096];
    let t = Instant::now();
    for i in 0..regions * 16 {
        d.write_at(&buf, from * REGION_BYTES + (i << 18)).unwrap();
    }
    t.elapsed().as_secs_f64() * 1e3
}

#[test]
fn a_sequential_writer_is_marked_ahead_within_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let (plain, _) = served(dir.path(), false);
    let (d, _) = served(dir.path(), true);
    let regions = 48;
    let plain_ms = sequential(&plain, 0, regions);
    let live = d.tracker().unwrap();
    live.set_mark_ahead(0);
    let exact_ms = sequential(&d, 0, regions);
    assert_eq!(on_disk(dir.path()).changed_regions(), regions);
    live.set_mark_ahead(vm::tracking::MARK_AHEAD);
    let ahead_ms = sequential(&d, 100, regions);
    // Every region written is marked, and at most MARK_AHEAD more past the end.
    let t = on_disk(dir.path());
    let marked: BTreeSet<u64> = t
        .changed()
        .iter()
        .flat_map(|r| r.start / REGION_BYTES..r.end.div_ceil(REGION_BYTES))
        .collect();
    for r in (0..regions).chain(100..100 + regions) {
        assert!(marked.contains(&r), "region {r} written, not marked");
    }
    let extra: Vec<u64> = marked
        .iter()
        .copied()
        .filter(|r| !(0..regions).contains(r) && !(100..100 + regions).contains(r))
        .collect();
    assert!(
        extra.len() as u64 <= vm::tracking::MARK_AHEAD
            && extra
                .iter()
                .all(|r| (100 + regions..100 + regions + vm::tracking::MARK_AHEAD).contains(r)),
        "marked beyond what was written: {extra:?}"
    );
    eprintln!(
        "a sequential writer over {regions} fresh regions (4 KiB every 256 KiB): {exact_ms:.0} ms tracked without marking ahead, {ahead_ms:.0} ms marking {} ahead, {plain_ms:.0} ms untracked",
        vm::tracking::MARK_AHEAD
    );
}
