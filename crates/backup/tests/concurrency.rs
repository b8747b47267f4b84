//! Backups, prune and gc at the same time on one repository: no point is ever damaged,
//! gc waits for backups that may rely on unreferenced chunks, a backup that began while a
//! gc ran stores again what that gc deleted, and dead owners never block anything.

mod common;

use backup::lease::{Held, read_gc};
use backup::{
    EncryptionMode, FileFormat, GcOptions, KeepPolicy, Method, PointWriter, Repository, gc,
    restore_to_file,
};
use common::*;
use disk::RawDisk;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const CS: u32 = 256 << 10;

fn full(repo: &Repository, group: &str, path: &Path, fields: &[(&str, &str)]) -> backup::Point {
    let mut w = PointWriter::begin(repo, group).unwrap();
    for (k, v) in fields {
        w.set_field(k, v);
    }
    w.add_disk(
        "disk0",
        &RawDisk::open(path, false).unwrap(),
        Method::Full,
        BTreeMap::new(),
        &|_, _| {},
    )
    .unwrap();
    w.commit().unwrap()
}

/// Every listed point restores to the image its `seed` field names.
fn check_all(repo: &Repository, dir: &Path, image_of: &dyn Fn(u64) -> Vec<u8>) -> usize {
    let listing = repo.list_points().unwrap();
    assert!(listing.damaged.is_empty(), "{:?}", listing.damaged);
    for p in &listing.points {
        let out = dir.join(format!("check-{}", p.id));
        restore_to_file(repo, p, 0, &out, FileFormat::Raw, &|_, _| {}).unwrap();
        let want = image_of(p.fields["seed"].parse().unwrap());
        assert_same(&std::fs::read(&out).unwrap(), &want, &p.id);
        std::fs::remove_file(&out).unwrap();
    }
    let report = backup::verify(repo, None, &|_, _| {}).unwrap();
    assert!(report.is_clean(), "{report:?}");
    listing.points.len()
}

#[test]
fn two_writers_prune_and_gc_at_once_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(&dir.path().join("repo"), EncryptionMode::Repokey, CS);
    // Images share halves pairwise, so writers race on the same chunks.
    let image_of = |seed: u64| -> Vec<u8> {
        let mut v = image(8 * CS as usize, seed / 2);
        v[4 * CS as usize..].copy_from_slice(&image(4 * CS as usize, 100 + seed));
        v
    };
    for seed in 0..8u64 {
        write_file(&dir.path().join(format!("img{seed}")), &image_of(seed));
    }
    let stop = AtomicBool::new(false);
    let gcs = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        let mut writers = Vec::new();
        for w in 0..2u64 {
            let (repo, dir) = (&repo, dir.path());
            writers.push(s.spawn(move || {
                for i in 0..4u64 {
                    let seed = (w * 4 + i) % 8;
                    let path = dir.join(format!("img{seed}"));
                    full(
                        repo,
                        &format!("vm{w}"),
                        &path,
                        &[("seed", &seed.to_string())],
                    );
                }
            }));
        }
        let (repo, stop_ref, gcs) = (&repo, &stop, &gcs);
        s.spawn(move || {
            while !stop_ref.load(Ordering::SeqCst) {
                let policy = KeepPolicy {
                    last: 2,
                    ..Default::default()
                };
                backup::prune(repo, &policy, None, false).unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        s.spawn(move || {
            while !stop_ref.load(Ordering::SeqCst) {
                gc(repo, &GcOptions::default()).unwrap();
                gcs.fetch_add(1, Ordering::SeqCst);
            }
        });
        for w in writers {
            w.join().unwrap();
        }
        stop.store(true, Ordering::SeqCst);
    });
    assert!(gcs.load(Ordering::SeqCst) > 0);
    gc(&repo, &GcOptions::default()).unwrap();
    let n = check_all(&repo, dir.path(), &image_of);
    assert!(n >= 2, "each group keeps its last points");
    // After a final gc nothing unreferenced is left.
    let r = gc(&repo, &GcOptions::default()).unwrap();
    assert_eq!(r.chunks_deleted, 0);
    assert_eq!(r.chunks_total, r.chunks_referenced);
}

#[test]
fn gc_waits_for_a_backup_in_progress_and_skips_dead_ones() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(&dir.path().join("repo"), EncryptionMode::None, CS);
    let data = image(6 * CS as usize, 50);
    let src = dir.path().join("src");
    write_file(&src, &data);
    // A lease left by a backup that died: a pid that no longer runs.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = child.id();
    child.wait().unwrap();
    let dead = serde_json::json!({
        "id": "dead0000000000000000000000000000", "host": backup::lease::me().host,
        "pid": dead_pid, "pid_start": 1, "started_ns": 0, "renewed_ns": 0
    });
    repo.backend()
        .put(
            "leases/dead0000000000000000000000000000",
            dead.to_string().as_bytes(),
        )
        .unwrap();

    let mut w = PointWriter::begin(&repo, "vm").unwrap();
    w.add_disk(
        "disk0",
        &RawDisk::open(&src, false).unwrap(),
        Method::Full,
        BTreeMap::new(),
        &|_, _| {},
    )
    .unwrap();
    // The written chunks are referenced by nothing yet.
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let collector = s.spawn(|| {
            let r = gc(&repo, &GcOptions::default()).unwrap();
            done.store(true, Ordering::SeqCst);
            r
        });
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            !done.load(Ordering::SeqCst),
            "gc must wait for the live backup"
        );
        let p = w.commit().unwrap();
        let r = collector.join().unwrap();
        assert_eq!(r.stale_leases_removed, 1);
        assert_eq!(r.backups_waited_for, 1);
        assert_eq!(r.chunks_deleted, 0);
        let out = dir.path().join("out");
        restore_to_file(&repo, &p, 0, &out, FileFormat::Raw, &|_, _| {}).unwrap();
        assert_same(&std::fs::read(&out).unwrap(), &data, "point");
    });
    assert!(repo.backend().list("leases/").unwrap().is_empty());
}

#[test]
fn a_backup_begun_during_gc_stores_again_what_gc_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(&dir.path().join("repo"), EncryptionMode::Repokey, CS);
    let data = image(8 * CS as usize, 60);
    let src = dir.path().join("src");
    write_file(&src, &data);
    // Chunks of a removed point: garbage, but still listed, so a backup reuses them.
    let old = full(&repo, "old", &src, &[("seed", "0")]);
    repo.delete_point(&old.id).unwrap();
    let garbage = old.disks[0].chunks.iter().filter(|c| !c.is_zero()).count() as u64;
    assert!(garbage > 0);
    std::thread::sleep(Duration::from_millis(20));

    // A backup in progress (its lease only) keeps the collector waiting.
    let blocker = Held::lease(repo.backend()).unwrap();
    let copied = AtomicBool::new(false);
    std::thread::scope(|s| {
        let collector = s.spawn(|| gc(&repo, &GcOptions::default()).unwrap());
        while read_gc(repo.backend().as_ref())
            .unwrap()
            .is_none_or(|m| m.phase != "sweeping")
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        // This backup begins while that collector runs, and is not in its list.
        let writer = s.spawn(|| {
            let mut w = PointWriter::begin(&repo, "new").unwrap();
            w.set_field("seed", "0");
            let st = w
                .add_disk(
                    "disk0",
                    &RawDisk::open(&src, false).unwrap(),
                    Method::Full,
                    BTreeMap::new(),
                    &|_, _| {},
                )
                .unwrap();
            copied.store(true, Ordering::SeqCst);
            (w.commit().unwrap(), st)
        });
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            !copied.load(Ordering::SeqCst),
            "the backup waits for the collector before it relies on listed chunks"
        );
        drop(blocker);
        let r = collector.join().unwrap();
        assert_eq!(
            r.chunks_deleted, garbage,
            "the collector deleted the garbage"
        );
        let (p, st) = writer.join().unwrap();
        assert_eq!(st.chunks_new, 0, "it first reused the listed chunks");
        assert!(
            st.bytes_stored > 0,
            "then stored again those the collector deleted"
        );
        let out = dir.path().join("out");
        restore_to_file(&repo, &p, 0, &out, FileFormat::Raw, &|_, _| {}).unwrap();
        assert_same(&std::fs::read(&out).unwrap(), &data, "point");
    });
    assert!(backup::verify(&repo, None, &|_, _| {}).unwrap().is_clean());
}

#[test]
fn a_dead_collectors_marker_blocks_nothing_and_a_live_one_refuses_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(&dir.path().join("repo"), EncryptionMode::None, CS);
    let src = dir.path().join("src");
    write_file(&src, &image(2 * CS as usize, 70));
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = child.id();
    child.wait().unwrap();
    let marker = serde_json::json!({
        "id": "g", "host": backup::lease::me().host, "pid": dead_pid, "pid_start": 1,
        "started_ns": 0, "renewed_ns": 0, "phase": "sweeping", "waits_for": []
    });
    repo.backend()
        .put("gc/run", marker.to_string().as_bytes())
        .unwrap();
    // A backup neither waits for it nor fails.
    full(&repo, "vm", &src, &[("seed", "70")]);
    // A new collection replaces it.
    gc(&repo, &GcOptions::default()).unwrap();
    assert!(!repo.backend().exists("gc/run").unwrap());
    // While one collection holds the marker, another is refused with a clear error.
    let (held, _) = Held::gc_marker(repo.backend()).unwrap();
    let e = gc(&repo, &GcOptions::default()).unwrap_err();
    assert_eq!(e.kind(), disk::ErrorKind::Busy);
    assert!(
        e.to_string()
            .starts_with("a garbage collection is already running"),
        "{e}"
    );
    drop(held);
    gc(&repo, &GcOptions::default()).unwrap();
}

#[test]
fn an_incremental_whose_base_was_collected_reads_again_what_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(&dir.path().join("repo"), EncryptionMode::None, CS);
    let data = image(8 * CS as usize, 90);
    let src = dir.path().join("src");
    write_file(&src, &data);
    // The caller read its base point, which is then pruned and collected.
    let base = full(&repo, "vm", &src, &[("seed", "90")]);
    repo.delete_point(&base.id).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let r = gc(&repo, &GcOptions::default()).unwrap();
    assert!(r.chunks_deleted > 0);
    // Nothing changed since the base, by the caller's tracking: yet what is gone is read.
    let mut w = PointWriter::begin(&repo, "vm").unwrap();
    let st = w
        .add_disk(
            "disk0",
            &RawDisk::open(&src, false).unwrap(),
            Method::Incremental {
                base: &base.disks[0],
                changed: &[],
            },
            BTreeMap::new(),
            &|_, _| {},
        )
        .unwrap();
    let p = w.commit().unwrap();
    assert_eq!(st.chunks_new, r.chunks_deleted);
    let out = dir.path().join("out");
    restore_to_file(&repo, &p, 0, &out, FileFormat::Raw, &|_, _| {}).unwrap();
    assert_same(&std::fs::read(&out).unwrap(), &data, "point");
}
