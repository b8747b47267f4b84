//! Encryption and verification: passphrases and key files, keyed chunk ids, and damage
//! (a flipped bit in a chunk file or a manifest) named by `verify` down to the point.

mod common;

use backup::{
    EncryptionMode, FileFormat, InitOptions, Method, OpenOptions, PointWriter, Repository,
    restore_to_file,
};
use common::*;
use disk::{ErrorKind, RawDisk};
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

const CS: u32 = 256 << 10;

fn backup_file(repo: &Repository, group: &str, path: &Path) -> backup::Point {
    let mut w = PointWriter::begin(repo, group).unwrap();
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

#[test]
fn wrong_or_missing_passphrase_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    for mode in [EncryptionMode::Repokey, EncryptionMode::Keyfile] {
        let path = dir.path().join(format!("repo-{mode}"));
        init(&path, mode, CS);
        let key_file = Some(path.with_extension("key"));
        let e = Repository::open(
            &path,
            &OpenOptions {
                passphrase: Some(b"wrong".to_vec()),
                key_file: key_file.clone(),
            },
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied);
        assert_eq!(
            e.to_string(),
            "wrong passphrase: it does not unlock the repository key"
        );
        let e = Repository::open(
            &path,
            &OpenOptions {
                passphrase: None,
                key_file: key_file.clone(),
            },
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "the repository is encrypted: a passphrase is needed to open it"
        );
        assert_eq!(e.kind(), ErrorKind::PermissionDenied);
        open(&path);
    }
    // A keyfile repository without its key file, and with another repository's.
    let kf = dir.path().join("repo-keyfile");
    let e = Repository::open(
        &kf,
        &OpenOptions {
            passphrase: Some(PASS.to_vec()),
            key_file: None,
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("key file"), "{e}");
    let other = dir.path().join("other");
    init(&other, EncryptionMode::Keyfile, CS);
    let e = Repository::open(
        &kf,
        &OpenOptions {
            passphrase: Some(PASS.to_vec()),
            key_file: Some(other.with_extension("key")),
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("not of this one"), "{e}");
    // The key file is not in the repository.
    assert!(
        !std::fs::read_to_string(kf.join("config"))
            .unwrap()
            .contains("wrapped")
    );
    assert!(
        std::fs::read_to_string(dir.path().join("repo-repokey/config"))
            .unwrap()
            .contains("wrapped")
    );
    // Encryption without a passphrase is refused at init.
    let e = Repository::init(
        &dir.path().join("nopass"),
        &InitOptions {
            encryption: EncryptionMode::Repokey,
            kdf: KDF,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied);
}

#[test]
fn equal_data_in_two_repositories_gets_different_ids_and_no_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let data = image(6 * CS as usize, 21);
    let src = dir.path().join("src.raw");
    write_file(&src, &data);
    let a = init(&dir.path().join("a"), EncryptionMode::Repokey, CS);
    let b = init(&dir.path().join("b"), EncryptionMode::Repokey, CS);
    let pa = backup_file(&a, "vm", &src);
    let pb = backup_file(&b, "vm", &src);
    let ids = |p: &backup::Point| -> HashSet<_> {
        p.disks[0]
            .chunks
            .iter()
            .filter(|c| !c.is_zero())
            .copied()
            .collect()
    };
    assert!(!ids(&pa).is_empty());
    assert!(ids(&pa).is_disjoint(&ids(&pb)));
    // No chunk object holds a 4 KiB run of the plaintext, and the ids are not plain BLAKE3.
    let plain = init(&dir.path().join("plain"), EncryptionMode::None, CS);
    let pp = backup_file(&plain, "vm", &src);
    assert!(ids(&pp).is_disjoint(&ids(&pa)));
    for o in a.backend().list("chunks/").unwrap() {
        let obj = a.backend().get(&o.key).unwrap();
        for probe in data.chunks(64 << 10).filter(|g| g.iter().any(|&b| b != 0)) {
            let needle = &probe[..4096];
            assert!(
                !obj.windows(4096).any(|w| w == needle),
                "plaintext in {}",
                o.key
            );
        }
    }
}

/// Flips one bit in the middle of a file.
fn flip(path: &Path) {
    let mut b = std::fs::read(path).unwrap();
    let i = b.len() / 2;
    b[i] ^= 0x10;
    std::fs::write(path, b).unwrap();
}

#[test]
fn verify_names_exactly_the_points_a_flipped_bit_damages() {
    for mode in [EncryptionMode::Repokey, EncryptionMode::None] {
        let dir = tempfile::tempdir().unwrap();
        let repo_path = dir.path().join("repo");
        let repo = init(&repo_path, mode, CS);
        // Three images: b shares its first half with a; c shares nothing.
        let a = image(8 * CS as usize, 31);
        let mut b = a.clone();
        b[4 * CS as usize..].copy_from_slice(&image(4 * CS as usize, 32));
        let c = image(8 * CS as usize, 33);
        let mut pts = Vec::new();
        for (name, data) in [("a", &a), ("b", &b), ("c", &c)] {
            let f = dir.path().join(name);
            write_file(&f, data);
            pts.push(backup_file(&repo, name, &f));
        }
        assert!(backup::verify(&repo, None, &|_, _| {}).unwrap().is_clean());
        // A chunk that a and b share (offset 0 of both), not c.
        let shared = pts[0].disks[0].chunks[0];
        assert!(!shared.is_zero() && pts[1].disks[0].chunks[0] == shared);
        flip(&repo_path.join(shared.key()));
        let r = backup::verify(&repo, None, &|_, _| {}).unwrap();
        let named: Vec<&str> = r.damaged.iter().map(|d| d.id.as_str()).collect();
        let mut want = vec![pts[0].id.as_str(), pts[1].id.as_str()];
        want.sort();
        assert_eq!(named, want, "{mode}: the two points with that chunk");
        for d in &r.damaged {
            assert_eq!(d.disks.len(), 1);
            assert_eq!(d.disks[0].index, 0);
            assert_eq!(d.disks[0].first_offset, 0);
            assert_eq!(d.disks[0].bad_chunks, 1);
            assert!(d.manifest.is_none());
        }
        // A restore of a damaged point fails loudly and leaves no file.
        let out = dir.path().join("out");
        let e = restore_to_file(&repo, &pts[0], 0, &out, FileFormat::Raw, &|_, _| {}).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        assert!(!out.exists());
        flip(&repo_path.join(shared.key()));

        // A flipped bit in c's manifest: only c is named, as a damaged manifest.
        let manifest = repo_path.join("points").join(&pts[2].id);
        flip(&manifest);
        let r = backup::verify(&repo, None, &|_, _| {}).unwrap();
        assert_eq!(r.damaged.len(), 1, "{mode}: {r:?}");
        assert_eq!(r.damaged[0].id, pts[2].id);
        assert!(r.damaged[0].manifest.is_some());
        // Listing still shows the others, and names the damaged one apart.
        let listing = repo.list_points().unwrap();
        assert_eq!(listing.points.len(), 2);
        assert_eq!(listing.damaged[0].0, pts[2].id);
        // gc refuses to guess the damaged point's references.
        assert!(backup::gc(&repo, &Default::default()).is_err());
        flip(&manifest);
        assert!(backup::verify(&repo, None, &|_, _| {}).unwrap().is_clean());
    }
}

#[test]
fn a_chunk_moved_under_another_name_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let repo_path = dir.path().join("repo");
    let repo = init(&repo_path, EncryptionMode::Repokey, CS);
    let f = dir.path().join("a");
    write_file(&f, &image(4 * CS as usize, 41));
    let p = backup_file(&repo, "a", &f);
    let stored: Vec<_> = p.disks[0].chunks.iter().filter(|c| !c.is_zero()).collect();
    assert!(stored.len() >= 2);
    std::fs::copy(
        repo_path.join(stored[0].key()),
        repo_path.join(stored[1].key()),
    )
    .unwrap();
    let r = backup::verify(&repo, None, &|_, _| {}).unwrap();
    assert_eq!(r.damaged.len(), 1);
    assert!(
        r.damaged[0].disks[0]
            .problem
            .contains("authentication failed")
    );
}
