//! An into-parent merge that resumes: `merge_into_parent_from` reports, after each flush of
//! the parent, the offset below which the copy is durable, and a run started at such an
//! offset copies only what lies above it.

use vhdx::merge_into_parent_from;
use vhdx::{Chain, CreateParams, VhdxFile};

const MIB: u64 = 1 << 20;

fn pattern(tag: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| tag ^ (i / 4096) as u8).collect()
}

/// A base with `0x11` everywhere written and a child with `0x22` over [0, 96 MiB).
fn pair(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let base = dir.join("base.vhdx");
    let child = dir.join("child.avhdx");
    vhdx::create(&base, &CreateParams::dynamic(256 * MIB)).unwrap();
    let c = Chain::open(&base, true).unwrap();
    c.write_at(&pattern(0x11, 128 * MIB as usize), 0).unwrap();
    c.close().unwrap();
    vhdx::create_differencing(&child, &base, None).unwrap();
    let c = Chain::open(&child, true).unwrap();
    c.write_at(&pattern(0x22, 96 * MIB as usize), 0).unwrap();
    c.close().unwrap();
    (base, child)
}

fn read(path: &std::path::Path, offset: u64, len: usize) -> Vec<u8> {
    let f = VhdxFile::open(path, vhdx::OpenOptions::default()).unwrap();
    let c = Chain::from_top(f).unwrap();
    let mut buf = vec![0u8; len];
    c.read_at(&mut buf, offset).unwrap();
    buf
}

#[test]
fn reports_durable_offsets_and_completes() {
    let dir = tempfile::tempdir().unwrap();
    let (base, child) = pair(dir.path());
    let mut reported = Vec::new();
    let out = merge_into_parent_from(&child, 0, &mut |_, _| {}, &mut |d| reported.push(d)).unwrap();
    assert!(out.removed && !child.exists());
    assert_eq!(out.bytes_copied, 96 * MIB);
    assert!(!reported.is_empty(), "no durable offset was reported");
    assert!(reported.windows(2).all(|w| w[0] <= w[1]), "{reported:?}");
    assert!(reported.iter().all(|&d| d <= 96 * MIB), "{reported:?}");
    let expected = pattern(0x22, 96 * MIB as usize);
    assert!(read(&base, 0, 96 * MIB as usize) == expected);
    assert!(
        read(&base, 96 * MIB, 32 * MIB as usize)
            == pattern(0x11, 128 * MIB as usize)[96 * MIB as usize..]
    );
}

#[test]
fn a_resumed_run_copies_only_what_lies_above_its_start() {
    let dir = tempfile::tempdir().unwrap();
    let (base, child) = pair(dir.path());
    let out = merge_into_parent_from(&child, 64 * MIB, &mut |_, _| {}, &mut |_| {}).unwrap();
    assert_eq!(out.bytes_copied, 32 * MIB);
    // Below the start the parent kept its own data: a real resume starts only where an
    // earlier run reported the copy durable.
    assert!(read(&base, 0, 64 * MIB as usize) == pattern(0x11, 64 * MIB as usize));
    assert!(
        read(&base, 64 * MIB, 32 * MIB as usize)
            == pattern(0x22, 96 * MIB as usize)[64 * MIB as usize..]
    );
}
