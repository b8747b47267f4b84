//! A full repository disk (a small tmpfs, mounted as root): a backup that does not fit
//! fails with one clear error, lists nothing partial, leaves the earlier points whole, and
//! after a gc the repository takes backups again.

mod common;

use backup::{EncryptionMode, FileFormat, GcOptions, Method, PointWriter, restore_to_file};
use common::*;
use disk::RawDisk;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

const CS: u32 = 256 << 10;

/// A tmpfs of `mib` MiB, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, mib: u64) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mounting a tmpfs failed (this test runs as root)");
        Tmpfs(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

fn backup(repo: &backup::Repository, path: &Path) -> backup::Result<backup::Point> {
    let mut w = PointWriter::begin(repo, "vm")?;
    w.add_disk(
        "disk0",
        &RawDisk::open(path, false)?,
        Method::Full,
        BTreeMap::new(),
        &|_, _| {},
    )?;
    w.commit()
}

#[test]
fn a_full_repository_disk_is_one_clear_error_and_nothing_partial() {
    if !is_root() {
        eprintln!("skipped: mounting a tmpfs needs root (CI runs as root)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _mnt = Tmpfs::mount(&dir.path().join("mnt"), 16);
    let repo_path = dir.path().join("mnt/repo");
    let repo = init(&repo_path, EncryptionMode::Repokey, CS);
    // A small point that fits.
    let small = image(4 * CS as usize, 80);
    write_file(&dir.path().join("small"), &small);
    let p1 = backup(&repo, &dir.path().join("small")).unwrap();
    // 32 MiB of incompressible data into 16 MiB.
    let mut big = vec![0u8; 32 << 20];
    rand::RngCore::fill_bytes(
        &mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(81),
        &mut big,
    );
    write_file(&dir.path().join("big"), &big);
    let e = backup(&repo, &dir.path().join("big")).unwrap_err();
    assert_eq!(e.kind(), disk::ErrorKind::NoSpace, "{e:?}");
    assert!(
        e.to_string()
            .starts_with("the repository's storage is full"),
        "{e}"
    );
    // Nothing partial: one point listed, no lease, no temporary file, verify clean.
    assert_eq!(repo.point_ids().unwrap(), vec![p1.id.clone()]);
    assert!(repo.backend().list("leases/").unwrap().is_empty());
    let stray = Command::new("find")
        .arg(&repo_path)
        .args(["-name", ".tmp-*"])
        .output()
        .unwrap();
    assert!(
        stray.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&stray.stdout)
    );
    assert!(backup::verify(&repo, None, &|_, _| {}).unwrap().is_clean());
    let out = dir.path().join("out");
    restore_to_file(&repo, &p1, 0, &out, FileFormat::Raw, &|_, _| {}).unwrap();
    assert_same(&std::fs::read(&out).unwrap(), &small, "earlier point");
    // The failed backup's chunks go at the next gc, and backups work again.
    let r = backup::gc(&repo, &GcOptions::default()).unwrap();
    assert!(r.chunks_deleted > 0);
    let again = image(4 * CS as usize, 82);
    write_file(&dir.path().join("again"), &again);
    backup(&repo, &dir.path().join("again")).unwrap();
    assert!(backup::verify(&repo, None, &|_, _| {}).unwrap().is_clean());
}
