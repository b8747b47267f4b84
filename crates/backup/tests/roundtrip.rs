//! Round trips through a real repository on real files: raw and VHDX sources, restores to
//! raw, VHDX and any disk, the read-only point disk, blobs, incremental and express-full
//! copies (no changed byte ever missed), deduplication, point lookup.

mod common;

use backup::{
    EncryptionMode, FileFormat, Method, PointDisk, PointWriter, restore_into, restore_to_file,
};
use common::*;
use disk::{Disk, RawDisk, VhdxDisk};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;

const CS: u32 = 256 << 10;

fn none() -> BTreeMap<String, String> {
    BTreeMap::new()
}

#[test]
fn raw_source_round_trips_bit_exact_and_sparse() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(&dir.path().join("repo"), EncryptionMode::Repokey, CS);
    // Odd size: the last chunk is short and not a whole sector.
    let data = image(9 * CS as usize + 12_345, 1);
    let src = dir.path().join("src.raw");
    write_file(&src, &data);
    let disk = RawDisk::open(&src, false).unwrap();
    let mut w = PointWriter::begin(&repo, "vm-a").unwrap();
    w.set_field("consistency", "crash");
    let stats = w
        .add_disk("disk0", &disk, Method::Full, none(), &|_, _| {})
        .unwrap();
    assert_eq!(stats.bytes_read, data.len() as u64);
    let p = w.commit().unwrap();
    assert_eq!(p.fields["consistency"], "crash");
    assert_eq!(
        stats.chunks_new + stats.chunks_reused + stats.chunks_zero,
        p.disks[0].chunks.len() as u64
    );

    // Reopened (passphrase, no cached state): restore to a new raw file.
    let repo = open(&dir.path().join("repo"));
    let p = repo.load_point(&p.id).unwrap();
    let out = dir.path().join("out.raw");
    let r = restore_to_file(&repo, &p, 0, &out, FileFormat::Raw, &|_, _| {}).unwrap();
    let back = std::fs::read(&out).unwrap();
    assert_same(&back, &data, "raw restore");
    let zero_chunks = p.disks[0].chunks.iter().filter(|c| c.is_zero()).count() as u64;
    assert!(zero_chunks > 0, "the image has zero chunks");
    assert_eq!(
        r.chunks_fetched,
        p.disks[0].chunks.len() as u64 - zero_chunks
    );
    // Zero chunks are holes.
    let allocated = std::fs::metadata(&out).unwrap().blocks() * 512;
    assert!(
        allocated <= data.len() as u64 - zero_chunks * u64::from(CS) + 4096,
        "{allocated} bytes allocated"
    );
    // To a VHDX file too: the odd tail is padded to a whole sector of zeros.
    let vout = dir.path().join("out.vhdx");
    restore_to_file(&repo, &p, 0, &vout, FileFormat::Vhdx, &|_, _| {}).unwrap();
    let v = read_disk(&VhdxDisk::open(&vout, false).unwrap());
    assert_eq!(v.len() as u64, (data.len() as u64).next_multiple_of(512));
    assert_same(&v[..data.len()], &data, "vhdx restore of an odd size");
    assert!(v[data.len()..].iter().all(|&b| b == 0));
    // Restoring over an existing file is refused and leaves it alone.
    let again = restore_to_file(&repo, &p, 0, &out, FileFormat::Raw, &|_, _| {});
    assert!(again.is_err());
    assert_same(&std::fs::read(&out).unwrap(), &data, "untouched");
}

#[test]
fn vhdx_source_round_trips_to_vhdx_raw_and_any_disk() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(&dir.path().join("repo"), EncryptionMode::None, CS);
    let data = image(12 * CS as usize, 2);
    let raw = dir.path().join("src.raw");
    write_file(&raw, &data);
    let vhdx_path = dir.path().join("src.vhdx");
    disk::convert(
        &RawDisk::open(&raw, false).unwrap(),
        &vhdx_path,
        &disk::ConvertOptions {
            format: disk::OutputFormat::Vhdx {
                kind: vhdx::DiskKind::Dynamic,
                block_size: Some(1 << 20),
            },
            physical_sector_size: 4096,
        },
        &mut |_, _| {},
    )
    .unwrap();
    let src = VhdxDisk::open(&vhdx_path, false).unwrap();
    let mut w = PointWriter::begin(&repo, "vm-b").unwrap();
    w.add_disk("disk0", &src, Method::Full, none(), &|_, _| {})
        .unwrap();
    let p = w.commit().unwrap();

    let out = dir.path().join("out.vhdx");
    restore_to_file(&repo, &p, 0, &out, FileFormat::Vhdx, &|_, _| {}).unwrap();
    assert_same(
        &read_disk(&VhdxDisk::open(&out, false).unwrap()),
        &data,
        "vhdx restore",
    );

    // Into an existing disk full of other bytes: zero chunks must be written as zeros.
    let target = dir.path().join("target.raw");
    write_file(&target, &vec![0xa5; data.len()]);
    let t = RawDisk::open(&target, true).unwrap();
    restore_into(&repo, &p, 0, &t, false, &|_, _| {}).unwrap();
    assert_same(&read_disk(&t), &data, "restore into a disk");

    // The read-only point disk, at unaligned offsets across chunk boundaries.
    let pd = PointDisk::new(&repo, &p, 0).unwrap();
    assert_eq!(pd.size(), data.len() as u64);
    assert!(pd.is_read_only());
    assert!(pd.write_at(&[1], 0).is_err());
    let mut rng = StdRng::seed_from_u64(3);
    for _ in 0..200 {
        let off = rng.random_range(0..data.len() - 1);
        let len = rng.random_range(1..=(data.len() - off).min(3 * CS as usize));
        let mut buf = vec![0u8; len];
        pd.read_at(&mut buf, off as u64).unwrap();
        assert!(
            buf == data[off..off + len],
            "point disk read at {off}+{len}"
        );
    }
    let mut past = [0u8; 2];
    assert!(pd.read_at(&mut past, data.len() as u64 - 1).is_err());
    // Block status: zero chunks are holes, so nbdcopy and qemu-img skip them.
    let extents = pd.block_status(0, pd.size()).unwrap();
    let zero: u64 = extents
        .iter()
        .filter_map(|e| match e {
            disk::Extent::Zero(n) => Some(*n),
            _ => None,
        })
        .sum();
    let zero_chunks = p.disks[0].chunks.iter().filter(|c| c.is_zero()).count() as u64;
    assert_eq!(zero, zero_chunks * u64::from(CS));
}

#[test]
fn blobs_and_several_disks_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(&dir.path().join("repo"), EncryptionMode::Repokey, CS);
    let config = br#"{"name":"vm-c","memory":1024}"#.to_vec();
    let memory = image(3 * CS as usize + 7, 4);
    let mem_path = dir.path().join("state.vsv");
    write_file(&mem_path, &memory);
    let d0 = image(2 * CS as usize, 5);
    let d1 = image(CS as usize / 2, 6);
    write_file(&dir.path().join("d0"), &d0);
    write_file(&dir.path().join("d1"), &d1);
    let mut w = PointWriter::begin(&repo, "vm-c").unwrap();
    w.add_blob("vm.json", &config).unwrap();
    w.add_blob("empty", &[]).unwrap();
    w.add_blob_file("memory", &mem_path, &|_, _| {}).unwrap();
    for (i, name) in ["d0", "d1"].iter().enumerate() {
        let d = RawDisk::open(&dir.path().join(name), false).unwrap();
        w.add_disk(&format!("disk{i}"), &d, Method::Full, none(), &|_, _| {})
            .unwrap();
    }
    assert!(w.add_blob("vm.json", b"again").is_err(), "names are unique");
    let p = w.commit().unwrap();
    let p = open(&dir.path().join("repo")).load_point(&p.id).unwrap();
    assert_eq!(backup::read_blob(&repo, &p, "vm.json").unwrap(), config);
    assert_eq!(backup::read_blob(&repo, &p, "empty").unwrap(), b"");
    let mem_out = dir.path().join("state.out");
    backup::restore_blob_to_file(&repo, &p, "memory", &mem_out, &|_, _| {}).unwrap();
    assert_same(&std::fs::read(&mem_out).unwrap(), &memory, "memory blob");
    assert!(backup::read_blob(&repo, &p, "nope").is_err());
    for (i, want) in [&d0, &d1].iter().enumerate() {
        let out = dir.path().join(format!("out{i}"));
        restore_to_file(&repo, &p, i, &out, FileFormat::Raw, &|_, _| {}).unwrap();
        assert_same(&std::fs::read(&out).unwrap(), want, "disk");
    }
    let err = restore_to_file(
        &repo,
        &p,
        2,
        &dir.path().join("x"),
        FileFormat::Raw,
        &|_, _| {},
    )
    .unwrap_err();
    assert_eq!(err.kind(), disk::ErrorKind::NotFound);
    assert!(err.to_string().contains("has no disk 2"), "{err}");
}

/// Random guest-like writes between incremental backups: each point, restored, equals the
/// disk as it was at its instant; only chunks that intersect a changed range are read.
#[test]
fn incremental_never_misses_a_changed_byte() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(&dir.path().join("repo"), EncryptionMode::Repokey, CS);
    let size = 16 * CS as usize + 999;
    let mut data = image(size, 7);
    let src = dir.path().join("src.raw");
    write_file(&src, &data);
    let mut rng = StdRng::seed_from_u64(8);
    let mut w = PointWriter::begin(&repo, "vm").unwrap();
    let d = RawDisk::open(&src, false).unwrap();
    w.add_disk("disk0", &d, Method::Full, none(), &|_, _| {})
        .unwrap();
    drop(d);
    let mut points = vec![(w.commit().unwrap(), data.clone())];
    for round in 0..12 {
        let mut changed = Vec::new();
        let writes = rng.random_range(0..6);
        for _ in 0..writes {
            // Single bytes on both sides of chunk boundaries, short runs, long runs, zeros.
            let (off, len) = match rng.random_range(0..4) {
                0 => {
                    let b = rng.random_range(1..=16) * CS as usize;
                    (b.min(size) - rng.random_range(0..2), 1)
                }
                1 => (rng.random_range(0..size), rng.random_range(1..4096)),
                2 => (
                    rng.random_range(0..size),
                    rng.random_range(1..3 * CS as usize),
                ),
                _ => (rng.random_range(0..size), CS as usize),
            };
            let off = off.min(size - 1);
            let len = len.min(size - off);
            if rng.random_bool(0.3) {
                data[off..off + len].fill(0);
            } else {
                rng.fill_bytes(&mut data[off..off + len]);
            }
            changed.push(off as u64..(off + len) as u64);
        }
        write_file(&src, &data);
        let (prev, _) = points.last().unwrap();
        let d = RawDisk::open(&src, false).unwrap();
        let mut w = PointWriter::begin(&repo, "vm").unwrap();
        let stats = w
            .add_disk(
                "disk0",
                &d,
                Method::Incremental {
                    base: &prev.disks[0],
                    changed: &changed,
                },
                none(),
                &|_, _| {},
            )
            .unwrap();
        let touched: std::collections::BTreeSet<u64> = changed
            .iter()
            .flat_map(|r| r.start / u64::from(CS)..r.end.div_ceil(u64::from(CS)))
            .collect();
        let touched_bytes: u64 = touched
            .iter()
            .map(|&i| (size as u64 - i * u64::from(CS)).min(u64::from(CS)))
            .sum();
        assert_eq!(
            stats.bytes_read, touched_bytes,
            "round {round}: reads only what changed"
        );
        drop(d);
        points.push((w.commit().unwrap(), data.clone()));
    }
    // Every point, restored alone, is the disk at its instant.
    for (i, (p, want)) in points.iter().enumerate() {
        let out = dir.path().join(format!("p{i}.raw"));
        restore_to_file(&repo, p, 0, &out, FileFormat::Raw, &|_, _| {}).unwrap();
        assert_same(&std::fs::read(&out).unwrap(), want, &format!("point {i}"));
    }
    assert!(backup::verify(&repo, None, &|_, _| {}).unwrap().is_clean());
}

#[test]
fn express_full_stores_only_the_chunks_that_differ() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(&dir.path().join("repo"), EncryptionMode::None, CS);
    let mut data = image(10 * CS as usize, 9);
    let src = dir.path().join("src.raw");
    write_file(&src, &data);
    let mut w = PointWriter::begin(&repo, "vm").unwrap();
    w.add_disk(
        "disk0",
        &RawDisk::open(&src, false).unwrap(),
        Method::Full,
        none(),
        &|_, _| {},
    )
    .unwrap();
    let p1 = w.commit().unwrap();
    // Change bytes in chunks 2 and 7 (new random contents: never stored before).
    let mut rng = StdRng::seed_from_u64(10);
    rng.fill_bytes(&mut data[2 * CS as usize + 100..2 * CS as usize + 200]);
    rng.fill_bytes(&mut data[7 * CS as usize..7 * CS as usize + 1]);
    write_file(&src, &data);
    let mut w = PointWriter::begin(&repo, "vm").unwrap();
    let s = w
        .add_disk(
            "disk0",
            &RawDisk::open(&src, false).unwrap(),
            Method::ExpressFull { base: &p1.disks[0] },
            none(),
            &|_, _| {},
        )
        .unwrap();
    let p2 = w.commit().unwrap();
    assert_eq!(
        s.bytes_read,
        data.len() as u64,
        "express full reads everything"
    );
    assert_eq!(
        s.chunks_new, 2,
        "and stores only the two chunks that differ"
    );
    assert_eq!(p2.disks[0].method, "express-full");
    let out = dir.path().join("out");
    restore_to_file(&repo, &p2, 0, &out, FileFormat::Raw, &|_, _| {}).unwrap();
    assert_same(&std::fs::read(&out).unwrap(), &data, "express full restore");
}

#[test]
fn a_clone_of_the_same_base_adds_almost_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let repo_path = dir.path().join("repo");
    let repo = init(&repo_path, EncryptionMode::Repokey, CS);
    let base = image(16 * CS as usize, 11);
    let mut clone = base.clone();
    clone[5 * CS as usize + 3] ^= 0xff; // one byte differs
    write_file(&dir.path().join("a"), &base);
    write_file(&dir.path().join("b"), &clone);
    let size_of_repo = || -> u64 {
        repo.backend()
            .list("chunks/")
            .unwrap()
            .iter()
            .map(|o| o.size)
            .sum()
    };
    let mut w = PointWriter::begin(&repo, "vm-a").unwrap();
    w.add_disk(
        "disk0",
        &RawDisk::open(&dir.path().join("a"), false).unwrap(),
        Method::Full,
        none(),
        &|_, _| {},
    )
    .unwrap();
    w.commit().unwrap();
    let first = size_of_repo();
    let mut w = PointWriter::begin(&repo, "vm-b").unwrap();
    let s = w
        .add_disk(
            "disk0",
            &RawDisk::open(&dir.path().join("b"), false).unwrap(),
            Method::Full,
            none(),
            &|_, _| {},
        )
        .unwrap();
    w.commit().unwrap();
    assert_eq!(s.chunks_new, 1);
    assert!(size_of_repo() - first <= u64::from(CS) + 64);
}

#[test]
fn points_resolve_by_id_prefix_and_group_latest() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(&dir.path().join("repo"), EncryptionMode::None, CS);
    let data = image(CS as usize, 12);
    let mut ids = Vec::new();
    for group in ["a", "b", "a"] {
        let mut w = PointWriter::begin(&repo, group).unwrap();
        w.add_blob("x", &data).unwrap();
        ids.push(w.commit().unwrap().id);
    }
    assert_eq!(repo.resolve(&ids[1]).unwrap(), ids[1]);
    // The shortest prefix that is unique among the three resolves.
    for id in &ids {
        let n = (1..=32)
            .find(|&n| ids.iter().filter(|o| o.starts_with(&id[..n])).count() == 1)
            .unwrap();
        assert_eq!(repo.resolve(&id[..n].to_ascii_uppercase()).unwrap(), *id);
    }
    assert_eq!(repo.resolve("a@latest").unwrap(), ids[2]);
    assert_eq!(repo.resolve("b@latest").unwrap(), ids[1]);
    let e = repo.resolve("c@latest").unwrap_err();
    assert_eq!(e.kind(), disk::ErrorKind::NotFound);
    assert_eq!(
        repo.resolve("").unwrap_err().kind(),
        disk::ErrorKind::NotFound
    );
    assert_eq!(
        repo.resolve("zz").unwrap_err().kind(),
        disk::ErrorKind::NotFound
    );
    let listing = repo.list_points().unwrap();
    assert_eq!(
        listing
            .points
            .iter()
            .map(|p| p.id.clone())
            .collect::<Vec<_>>(),
        ids,
        "listed oldest first"
    );
    // An abandoned writer leaves nothing listed.
    let mut w = PointWriter::begin(&repo, "a").unwrap();
    w.add_blob("x", &image(CS as usize, 13)).unwrap();
    drop(w);
    assert_eq!(repo.point_ids().unwrap().len(), 3);
    assert!(repo.backend().list("leases/").unwrap().is_empty());
}

#[test]
fn init_and_open_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("repo");
    let e = backup::Repository::open(&path, &Default::default()).unwrap_err();
    assert_eq!(e.kind(), disk::ErrorKind::NotFound);
    assert!(e.to_string().contains("no repository at"), "{e}");
    init(&path, EncryptionMode::None, CS);
    let e = backup::Repository::init(&path, &Default::default()).unwrap_err();
    assert!(e.to_string().contains("is not empty"), "{e}");
    let e = backup::Repository::init(
        &dir.path().join("r2"),
        &backup::InitOptions {
            chunk_size: 3 << 20,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert_eq!(e.kind(), disk::ErrorKind::Invalid);
    // Nothing was left behind by the refused init.
    assert!(!dir.path().join("r2").join("config").exists());
}
