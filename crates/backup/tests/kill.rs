//! Kill trials: a child process backing up (full, incremental, express full), pruning or
//! collecting garbage is SIGKILLed at a random instant. After each kill: no partial point
//! is listed, every listed point restores bit-exact, `verify` is clean, and the next
//! operations (a gc that meets the dead lease or marker, a backup) succeed; at the end, a
//! gc leaves no garbage: no unreferenced chunk, no temporary file of a killed put.
//!
//! `SNAPVISOR_SOAK_TRIALS=N` runs N trials instead of the 24 of CI.

mod common;

use backup::{
    EncryptionMode, FileFormat, GcOptions, KeepPolicy, Method, PointWriter, Repository, gc,
    restore_to_file,
};
use common::*;
use disk::RawDisk;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

const CS: u32 = 64 << 10;
const IMAGES: u64 = 3;
const SIZE: usize = 24 * CS as usize;

/// Image `k`: image 0 with chunks changed per `k` (so incrementals between them have
/// known changed ranges).
fn image_of(k: u64) -> Vec<u8> {
    let mut v = image(SIZE, 500);
    for j in 0..k * 3 {
        let at = ((j * 7 + k) % 24) as usize * CS as usize + 1000;
        v[at..at + 5000].copy_from_slice(&image(5000, 600 + k * 10 + j));
    }
    v
}

fn changed_ranges(k: u64) -> Vec<std::ops::Range<u64>> {
    (0..k * 3)
        .map(|j| {
            let at = ((j * 7 + k) % 24) * u64::from(CS) + 1000;
            at..at + 5000
        })
        .collect()
}

fn paths(dir: &Path) -> (PathBuf, Vec<PathBuf>) {
    (
        dir.join("repo"),
        (0..IMAGES).map(|k| dir.join(format!("img{k}"))).collect(),
    )
}

/// The body of the child: loops over one operation until killed. Does nothing when run
/// as an ordinary test.
#[test]
fn child_worker() {
    let Ok(op) = std::env::var("BACKUP_KILL_CHILD") else {
        return;
    };
    let dir = PathBuf::from(std::env::var("BACKUP_KILL_DIR").unwrap());
    let (repo_path, images) = paths(&dir);
    let repo = open(&repo_path);
    let mut rng = StdRng::seed_from_u64(std::process::id() as u64);
    loop {
        match op.as_str() {
            "backup" => {
                let k = rng.random_range(0..IMAGES);
                let group = format!("g{}", rng.random_range(0..2));
                let base = repo
                    .resolve(&format!("{group}@latest"))
                    .ok()
                    .map(|id| repo.load_point(&id).unwrap());
                let mut w = PointWriter::begin(&repo, &group).unwrap();
                w.set_field("image", &k.to_string());
                w.add_blob("config", format!("image {k}").as_bytes())
                    .unwrap();
                let src = RawDisk::open(&images[k as usize], false).unwrap();
                // From image 0 to image k, the changes are known: an incremental.
                let from_zero = base
                    .as_ref()
                    .filter(|b| b.fields["image"] == "0")
                    .map(|b| &b.disks[0]);
                let ranges = changed_ranges(k);
                let method = match (from_zero, base.as_ref(), rng.random_range(0..3)) {
                    (Some(b), _, 0 | 1) => Method::Incremental {
                        base: b,
                        changed: &ranges,
                    },
                    (_, Some(b), 2) => Method::ExpressFull { base: &b.disks[0] },
                    _ => Method::Full,
                };
                w.add_disk("disk0", &src, method, BTreeMap::new(), &|_, _| {})
                    .unwrap();
                w.commit().unwrap();
            }
            "prune" => {
                let policy = KeepPolicy {
                    last: 2,
                    ..Default::default()
                };
                backup::prune(&repo, &policy, None, false).unwrap();
            }
            "gc" => {
                gc(&repo, &GcOptions::default()).unwrap();
            }
            "put" => {
                // A large object, so that a kill lands while its temporary file exists.
                let data = image(128 << 20, 700);
                let key = format!("chunks/00/{}", "0".repeat(64));
                repo.backend().put(&key, &data).unwrap();
            }
            other => panic!("unknown child op {other}"),
        }
    }
}

/// Restores every listed point not restored before (a point never changes; `verify` then
/// checks that every chunk of every point is still there and intact).
fn check(
    repo: &Repository,
    dir: &Path,
    images: &[Vec<u8>],
    restored: &mut std::collections::HashSet<String>,
) -> usize {
    let listing = repo.list_points().unwrap();
    assert!(listing.damaged.is_empty(), "{:?}", listing.damaged);
    for p in &listing.points {
        if !restored.insert(p.id.clone()) {
            continue;
        }
        let k: usize = p.fields["image"].parse().unwrap();
        assert_eq!(
            backup::read_blob(repo, p, "config").unwrap(),
            format!("image {k}").as_bytes()
        );
        let out = dir.join("check.raw");
        let _ = std::fs::remove_file(&out);
        restore_to_file(repo, p, 0, &out, FileFormat::Raw, &|_, _| {}).unwrap();
        assert_same(&std::fs::read(&out).unwrap(), &images[k], &p.id);
        std::fs::remove_file(&out).unwrap();
    }
    let r = backup::verify(repo, None, &|_, _| {}).unwrap();
    assert!(r.is_clean(), "{r:?}");
    listing.points.len()
}

#[test]
fn killed_backups_prunes_and_gcs_leave_every_listed_point_whole() {
    let trials: usize = std::env::var("SNAPVISOR_SOAK_TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24);
    let dir = tempfile::tempdir().unwrap();
    let (repo_path, image_paths) = paths(dir.path());
    let images: Vec<Vec<u8>> = (0..IMAGES).map(image_of).collect();
    for (p, data) in image_paths.iter().zip(&images) {
        write_file(p, data);
    }
    let repo = init(&repo_path, EncryptionMode::Repokey, CS);
    let seed = 0x6b696c6c;
    let mut rng = StdRng::seed_from_u64(seed);
    let exe = std::env::current_exe().unwrap();
    let spawn = |op: &str| {
        std::process::Command::new(&exe)
            .args(["child_worker", "--exact", "--nocapture", "--test-threads=1"])
            .env("BACKUP_KILL_CHILD", op)
            .env("BACKUP_KILL_DIR", dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    // Calibration: how long a child takes to commit its first point on this machine now.
    // Kills then land at random instants over twice that, so they hit every phase
    // (start, copy, commit, between points) whatever the machine's speed and load.
    let t0 = std::time::Instant::now();
    let mut child = spawn("backup");
    while repo.point_ids().unwrap().is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the child never commits"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let first_commit = t0.elapsed();
    child.kill().unwrap();
    child.wait().unwrap();
    let window = (first_commit.as_millis() as u64 * 2).max(50);
    eprintln!("a child commits its first point after {first_commit:?}; kills within {window} ms");
    let mut restored = std::collections::HashSet::new();
    let mut seen_points = check(&repo, dir.path(), &images, &mut restored);
    for trial in 0..trials {
        let op = ["backup", "backup", "backup", "prune", "gc"][rng.random_range(0..5)];
        let delay = Duration::from_millis(rng.random_range(0..window));
        let mut child = spawn(op);
        std::thread::sleep(delay);
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("trial {trial} ({op}): the child exited by itself ({status}): {err}");
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let n = check(&repo, dir.path(), &images, &mut restored);
        seen_points = seen_points.max(n);
        eprintln!("trial {trial}: {op} killed after {delay:?}; {n} points, all whole");
        // Keep the repository small, so each trial's checks stay short.
        let policy = KeepPolicy {
            last: 2,
            ..Default::default()
        };
        backup::prune(&repo, &policy, None, false).unwrap();
        if trial % 4 == 3 {
            // The dead child's lease or marker must not block a collection, and after it
            // every point is still whole.
            let r = gc(&repo, &GcOptions::default()).unwrap();
            assert!(!r.deferred);
            check(&repo, dir.path(), &images, &mut restored);
            assert!(repo.backend().list("leases/").unwrap().is_empty());
        }
    }
    assert!(
        seen_points > 0,
        "no backup got to commit: lengthen the delays"
    );
    // The next backup, in this process, is correct.
    let mut w = PointWriter::begin(&repo, "after").unwrap();
    w.set_field("image", "2");
    w.add_blob("config", b"image 2").unwrap();
    w.add_disk(
        "disk0",
        &RawDisk::open(&image_paths[2], false).unwrap(),
        Method::Full,
        BTreeMap::new(),
        &|_, _| {},
    )
    .unwrap();
    w.commit().unwrap();
    gc(&repo, &GcOptions::default()).unwrap();
    restored.clear();
    check(&repo, dir.path(), &images, &mut restored);
    let r = gc(&repo, &GcOptions::default()).unwrap();
    assert_eq!(r.chunks_total, r.chunks_referenced, "gc left no garbage");
    let left = temporaries(&repo_path);
    assert!(left.is_empty(), "temporary files left: {left:?}");
}

fn temporaries(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else if e.file_name().to_string_lossy().starts_with(".tmp-") {
                out.push(e.path());
            }
        }
    }
    out
}

/// A writer killed in the middle of a put leaves its temporary file, which no listing
/// shows: the next gc removes it (it used to stay for good).
#[test]
fn a_put_killed_half_way_leaves_a_temporary_file_the_next_gc_removes() {
    let dir = tempfile::tempdir().unwrap();
    let (repo_path, _) = paths(dir.path());
    let repo = init(&repo_path, EncryptionMode::None, CS);
    let exe = std::env::current_exe().unwrap();
    let mut child = std::process::Command::new(&exe)
        .args(["child_worker", "--exact", "--nocapture", "--test-threads=1"])
        .env("BACKUP_KILL_CHILD", "put")
        .env("BACKUP_KILL_DIR", dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while temporaries(&repo_path).is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the child never writes"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let left = temporaries(&repo_path);
    assert!(!left.is_empty(), "the kill came after the rename");
    let r = gc(&repo, &GcOptions::default()).unwrap();
    assert_eq!(r.temporaries_removed, left.len() as u64, "{r:?}");
    assert!(temporaries(&repo_path).is_empty());
    // The repository still works.
    let mut w = PointWriter::begin(&repo, "after").unwrap();
    w.add_blob("config", b"after").unwrap();
    w.commit().unwrap();
    assert!(backup::verify(&repo, None, &|_, _| {}).unwrap().is_clean());
}
