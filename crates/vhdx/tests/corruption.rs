//! Damaged files, failing storage and power loss.
//!
//! * Each structure of a file, damaged in turn, is reported as the precise [`Corruption`]
//!   (never a panic), `check` reports it, and `check --repair` fixes a damaged header or
//!   region table copy.
//! * The body of the `open` fuzz target (`fuzz/src/lib.rs`) runs over our own files and
//!   every sample image with many deterministic single-byte mutations.
//! * Writes and flushes on storage that fails (ENOSPC, short writes, failing syncs) return
//!   errors, and the bytes left behind open with every flushed write intact.
//! * Simulated power loss at any point, including in the middle of a commit, leaves a file
//!   that opens and holds every flushed write.

mod common;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::sync::Arc;
use vhdx::format::{BatEntry, checksum_with_zeroed_field};
use vhdx::{Chain, Corruption, CreateParams, DiskKind, Error, FileIo, OpenOptions, VhdxFile};
use vhdx::{CrashIo, Fault, FaultyIo, MemFile};

#[path = "../../../fuzz/src/lib.rs"]
mod fuzz_body;

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

// ------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------

fn rw() -> OpenOptions {
    OpenOptions {
        writable: true,
        ..OpenOptions::default()
    }
}

fn put_u32(b: &mut [u8], at: u64, v: u32) {
    b[at as usize..at as usize + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], at: u64, v: u64) {
    b[at as usize..at as usize + 8].copy_from_slice(&v.to_le_bytes());
}

fn le_u32(b: &[u8], at: u64) -> u32 {
    u32::from_le_bytes(b[at as usize..at as usize + 4].try_into().unwrap())
}

/// Recomputes the CRC-32C at `start + 4` of the structure `[start, start + len)`.
fn fix_crc(b: &mut [u8], start: u64, len: u64) {
    let s = start as usize;
    let crc = checksum_with_zeroed_field(&b[s..s + len as usize], 4);
    put_u32(b, start + 4, crc);
}

/// A write applied both to a file and to its oracle.
#[derive(Clone, Debug)]
enum Op {
    Write(u64, Vec<u8>),
    Zero(u64, u64),
    Flush,
}

impl Op {
    /// The byte this op leaves at disk offset `at`, if it covers it.
    fn byte_at(&self, at: u64) -> Option<u8> {
        match self {
            Op::Write(o, d) if (*o..*o + d.len() as u64).contains(&at) => {
                Some(d[(at - o) as usize])
            }
            Op::Zero(o, l) if (*o..*o + l).contains(&at) => Some(0),
            _ => None,
        }
    }
    fn apply_oracle(&self, oracle: &mut [u8]) {
        match self {
            Op::Write(o, d) => oracle[*o as usize..*o as usize + d.len()].copy_from_slice(d),
            Op::Zero(o, l) => oracle[*o as usize..(*o + *l) as usize].fill(0),
            Op::Flush => {}
        }
    }
    fn apply(&self, f: &VhdxFile) -> vhdx::Result<()> {
        match self {
            Op::Write(o, d) => f.write_at(d, *o),
            Op::Zero(o, l) => f.write_zeroes(*o, *l),
            Op::Flush => f.flush(),
        }
    }
}

/// Random writes (within and across blocks, whole blocks), zeroing and flushes.
fn random_ops(rng: &mut StdRng, size: u64, block: u64, count: usize) -> Vec<Op> {
    (0..count)
        .map(|_| match rng.random_range(0..10) {
            0..=4 => {
                let len = 512 * rng.random_range(1..=24u64);
                let off = 512 * rng.random_range(0..=(size - len) / 512);
                let mut d = vec![0u8; len as usize];
                rng.fill(&mut d[..]);
                Op::Write(off, d)
            }
            5 => {
                let b = rng.random_range(0..size / block);
                let mut d = vec![0u8; block as usize];
                rng.fill(&mut d[..]);
                Op::Write(b * block, d)
            }
            6 => {
                let b = rng.random_range(1..size / block);
                let mut d = vec![0u8; 4096];
                rng.fill(&mut d[..]);
                Op::Write(b * block - 2048, d)
            }
            7 => {
                let len = 512 * rng.random_range(1..=64u64);
                Op::Zero(512 * rng.random_range(0..=(size - len) / 512), len)
            }
            8 => Op::Zero(rng.random_range(0..size / block) * block, block),
            _ => Op::Flush,
        })
        .collect()
}

/// Creates a dynamic file on disk, writes `ops` through our engine, closes it, and returns
/// its bytes and the oracle.
fn written_file(path: &Path, size: u64, block: u32, ops: &[Op]) -> (Vec<u8>, Vec<u8>) {
    vhdx::create(
        path,
        &CreateParams {
            block_size: Some(block),
            ..CreateParams::dynamic(size)
        },
    )
    .unwrap();
    let mut oracle = vec![0u8; size as usize];
    let f = VhdxFile::open(path, rw()).unwrap();
    for op in ops {
        op.apply(&f).unwrap();
        op.apply_oracle(&mut oracle);
    }
    f.close().unwrap();
    (std::fs::read(path).unwrap(), oracle)
}

fn read_whole(f: &VhdxFile) -> Vec<u8> {
    let mut buf = vec![0u8; f.geometry().virtual_size as usize];
    f.read_at(&mut buf, 0).unwrap();
    buf
}

fn open_mem(bytes: Vec<u8>, writable: bool) -> vhdx::Result<VhdxFile> {
    VhdxFile::open_io(
        Arc::new(MemFile::new(bytes)),
        Path::new("mem.vhdx"),
        OpenOptions {
            writable,
            ..OpenOptions::default()
        },
    )
}

/// Asserts the disk `actual` holds `durable` except where one of `pending` (writes not
/// flushed, or cut short) wrote: there each byte is the durable one or one a pending op
/// left there.
#[track_caller]
fn assert_durable(what: &str, actual: &[u8], durable: &[u8], pending: &[Op]) {
    assert_eq!(actual.len(), durable.len());
    for (i, (a, d)) in actual.chunks(4096).zip(durable.chunks(4096)).enumerate() {
        if a == d {
            continue;
        }
        for (j, (x, y)) in a.iter().zip(d).enumerate() {
            if x == y {
                continue;
            }
            let at = (i * 4096 + j) as u64;
            let ok = pending.iter().any(|op| op.byte_at(at) == Some(*x));
            assert!(
                ok,
                "{what}: disk offset {at:#x} reads {x:#04x}: neither the flushed {y:#04x} nor \
                 anything written after the last flush"
            );
        }
    }
}

/// Opens bytes left by a failure or a crash: read-only (the log replayed in memory) and
/// writable (replayed in place, then closed cleanly); both must read the flushed data.
fn verify_image(what: &str, image: Vec<u8>, durable: &[u8], pending: &[Op]) {
    let f = open_mem(image.clone(), false)
        .unwrap_or_else(|e| panic!("{what}: does not open: {}", vhdx::error_chain(&e)));
    let ro = read_whole(&f);
    assert_durable(what, &ro, durable, pending);
    drop(f);
    let mem = Arc::new(MemFile::new(image));
    let f = VhdxFile::open_io(mem.clone(), Path::new("mem.vhdx"), rw())
        .unwrap_or_else(|e| panic!("{what}: does not open writable: {}", vhdx::error_chain(&e)));
    assert!(
        read_whole(&f) == ro,
        "{what}: replay in place reads differently"
    );
    f.close().unwrap();
    let f = open_mem(mem.contents(), false).unwrap();
    assert!(f.header().log_guid.is_nil());
    assert!(
        read_whole(&f) == ro,
        "{what}: reads differently after replay and close"
    );
}

// ------------------------------------------------------------------------------------------
// 6. Each damaged structure is a precise corruption
// ------------------------------------------------------------------------------------------

/// Damages the bytes of a file.
type DamageFn = Box<dyn Fn(&mut Vec<u8>, &Layout)>;

struct Damage {
    name: &'static str,
    damage: DamageFn,
    expect: Box<dyn Fn(&Corruption) -> bool>,
}

/// Where things are in the test file.
struct Layout {
    metadata: u64,
    bat: u64,
    /// Index in the metadata table of each item, by name.
    items: Vec<(&'static str, usize, u32)>,
    file_len: u64,
    /// Index of the BAT in the region table.
    bat_region: usize,
}

impl Layout {
    fn of(path: &Path) -> Layout {
        let f = VhdxFile::open(path, OpenOptions::default()).unwrap();
        let names = [
            (vhdx::format::FILE_PARAMETERS_GUID, "file parameters"),
            (vhdx::format::VIRTUAL_DISK_SIZE_GUID, "virtual disk size"),
            (vhdx::format::PARENT_LOCATOR_GUID, "parent locator"),
        ];
        let items = f
            .metadata_items()
            .iter()
            .enumerate()
            .filter_map(|(i, m)| {
                names
                    .iter()
                    .find(|(id, _)| *id == m.id)
                    .map(|(_, name)| (*name, i, m.offset))
            })
            .collect();
        Layout {
            metadata: f.metadata_location().0,
            bat: f.bat_offset(),
            items,
            file_len: f.file_size().unwrap(),
            bat_region: f
                .regions()
                .iter()
                .position(|r| r.guid == vhdx::format::BAT_REGION_GUID)
                .unwrap(),
        }
    }
    fn item(&self, name: &str) -> (u64, u64) {
        let (_, i, off) = self.items.iter().find(|(n, ..)| *n == name).unwrap();
        (
            self.metadata + 32 + 32 * *i as u64,
            self.metadata + u64::from(*off),
        )
    }
}

fn damages() -> Vec<Damage> {
    fn d(
        name: &'static str,
        damage: impl Fn(&mut Vec<u8>, &Layout) + 'static,
        expect: impl Fn(&Corruption) -> bool + 'static,
    ) -> Damage {
        Damage {
            name,
            damage: Box::new(damage),
            expect: Box::new(expect),
        }
    }
    vec![
        d(
            "file identifier signature",
            |b, _| b[..8].copy_from_slice(b"vhdxfilf"),
            |c| matches!(c, Corruption::BadFileIdentifier),
        ),
        d(
            "both headers",
            |b, _| {
                b[64 * KIB as usize + 100] ^= 1;
                b[128 * KIB as usize] = b'x';
            },
            |c| matches!(c, Corruption::NoValidHeader),
        ),
        d(
            "both region table copies",
            |b, _| {
                b[192 * KIB as usize + 20] ^= 0x80;
                b[256 * KIB as usize + 4] ^= 0x01;
            },
            |c| matches!(c, Corruption::BadRegionTable { .. }),
        ),
        d(
            "both region table copies misaligned (checksums fixed)",
            |b, _| {
                for t in [192 * KIB, 256 * KIB] {
                    // The first entry's file offset, off by 4 KiB.
                    let at = t + 16 + 16;
                    let old =
                        u64::from_le_bytes(b[at as usize..at as usize + 8].try_into().unwrap());
                    put_u64(b, at, old + 4096);
                    fix_crc(b, t, 64 * KIB);
                }
            },
            |c| matches!(c, Corruption::RegionMisaligned { .. }),
        ),
        d(
            "bat region beyond the end of the file (checksums fixed)",
            |b, l| {
                for t in [192 * KIB, 256 * KIB] {
                    put_u64(b, t + 16 + 32 * l.bat_region as u64 + 16, 1 << 40);
                    fix_crc(b, t, 64 * KIB);
                }
            },
            |c| {
                matches!(
                    c,
                    Corruption::BeyondEndOfFile {
                        what: "the bat region",
                        ..
                    }
                )
            },
        ),
        d(
            "log beyond the end of the file (checksums fixed)",
            |b, _| {
                for h in [64 * KIB, 128 * KIB] {
                    put_u64(b, h + 72, 1 << 40);
                    fix_crc(b, h, 4 * KIB);
                }
            },
            |c| {
                matches!(
                    c,
                    Corruption::BeyondEndOfFile {
                        what: "the log",
                        ..
                    }
                )
            },
        ),
        d(
            "metadata table signature",
            |b, l| b[l.metadata as usize + 3] = b'X',
            |c| {
                matches!(
                    c,
                    Corruption::BadMetadataTable {
                        reason: "bad signature"
                    }
                )
            },
        ),
        d(
            "virtual disk size item length 4",
            |b, l| put_u32(b, l.item("virtual disk size").0 + 20, 4),
            |c| {
                matches!(
                    c,
                    Corruption::BadMetadataItem {
                        item: "virtual disk size"
                    }
                )
            },
        ),
        d(
            "virtual disk size item length beyond the region",
            |b, l| put_u32(b, l.item("virtual disk size").0 + 20, 1 << 20),
            |c| matches!(c, Corruption::MetadataItemOutOfBounds { .. }),
        ),
        d(
            "file parameters block size 3 MiB",
            |b, l| put_u32(b, l.item("file parameters").1, 3 << 20),
            |c| {
                matches!(
                    c,
                    Corruption::InvalidBlockSize {
                        block_size: 0x30_0000
                    }
                )
            },
        ),
        d(
            "bat entry state 4",
            |b, l| b[l.bat as usize] = (b[l.bat as usize] & !7) | 4,
            |c| matches!(c, Corruption::BadBatState { index: 0, state: 4 }),
        ),
        d(
            "bat entry beyond the end of the file",
            |b, l| {
                let off = (l.file_len.next_multiple_of(MIB)) + 16 * MIB;
                put_u64(b, l.bat + 8 * 9, BatEntry::new(6, off).0);
            },
            |c| matches!(c, Corruption::BlockBeyondEnd { index: 9, .. }),
        ),
        d(
            "bat entry inside the header section",
            |b, l| put_u64(b, l.bat + 8 * 9, BatEntry::new(6, 0).0),
            |c| {
                matches!(
                    c,
                    Corruption::BlockOutOfBounds {
                        index: 9,
                        offset: 0
                    }
                )
            },
        ),
        d(
            "two bat entries at the same offset",
            |b, l| {
                let e0 = b[l.bat as usize..l.bat as usize + 8].to_vec();
                b[l.bat as usize + 8..l.bat as usize + 16].copy_from_slice(&e0);
            },
            |c| matches!(c, Corruption::Overlap { .. }),
        ),
        d(
            "bat entry over the metadata region",
            |b, l| put_u64(b, l.bat + 8 * 9, BatEntry::new(6, l.metadata).0),
            |c| matches!(c, Corruption::Overlap { .. }),
        ),
    ]
}

#[test]
fn each_damaged_structure_is_a_precise_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.vhdx");
    let ops = vec![
        Op::Write(0, vec![0x11; 2 * MIB as usize]),
        Op::Write(5 * MIB + 512, vec![0x22; 4096]),
        Op::Flush,
        Op::Write(15 * MIB, vec![0x33; 512]),
    ];
    let (bytes, _) = written_file(&good, 16 * MIB, 1 << 20, &ops);
    let layout = Layout::of(&good);
    for dmg in damages() {
        let mut b = bytes.clone();
        (dmg.damage)(&mut b, &layout);
        let path = dir.path().join("damaged.vhdx");
        std::fs::write(&path, &b).unwrap();
        for writable in [false, true] {
            let err = VhdxFile::open(
                &path,
                OpenOptions {
                    writable,
                    ..OpenOptions::default()
                },
            )
            .expect_err(dmg.name);
            let c = err
                .corruption()
                .unwrap_or_else(|| panic!("{}: not a corruption: {err:?}", dmg.name));
            assert!((dmg.expect)(c), "{}: unexpected {c:?}", dmg.name);
            assert!(matches!(&err, Error::Corrupt { path: p, .. } if p == &path));
            // The same through any FileIo.
            let err = open_mem(b.clone(), writable).expect_err(dmg.name);
            assert!((dmg.expect)(err.corruption().unwrap()), "{}", dmg.name);
        }
        let report = vhdx::check(&path, false).unwrap();
        assert!(
            !report.errors.is_empty(),
            "{}: check reports no error",
            dmg.name
        );
        if dmg.name == "bat entry beyond the end of the file" {
            // What a truncated file looks like: repair salvages the rest (the block past
            // the end reads zeros; see tests/truncated.rs).
            let repaired = vhdx::check(&path, true).unwrap();
            assert!(repaired.is_clean(), "{}: {repaired:?}", dmg.name);
            assert_eq!(repaired.lost_blocks, 1, "{}: {repaired:?}", dmg.name);
            continue;
        }
        assert!(
            vhdx::check(&path, true).is_err(),
            "{}: repair of an unusable file must fail",
            dmg.name
        );
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b,
            "{}: repair changed an unusable file",
            dmg.name
        );
    }
}

#[test]
fn damaged_parent_locator_is_a_precise_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("p.vhdx");
    written_file(&parent, 8 * MIB, 1 << 20, &[Op::Write(0, vec![1; 4096])]);
    let child = dir.path().join("c.avhdx");
    vhdx::create_differencing(&child, &parent, Some(1 << 20)).unwrap();
    Chain::open(&child, false).unwrap();
    let layout = Layout::of(&child);
    let good = std::fs::read(&child).unwrap();
    let (_, data) = layout.item("parent locator");
    // Entry 0 of the key-value table at +20: u32 key offset, u32 value offset, u16 key
    // length, u16 value length.
    let cases: [(&str, u64, &[u8], &str); 4] = [
        (
            "key offset out of range",
            data + 20,
            &[0, 0, 0xFF, 0xFF],
            "string beyond the item",
        ),
        (
            "value length odd",
            data + 30,
            &[7, 0],
            "string beyond the item",
        ),
        (
            "entry count beyond the item",
            data + 18,
            &[0xFF, 0x0F],
            "entries beyond the item",
        ),
        ("locator type", data, &[0x12, 0x34], "unknown locator type"),
    ];
    for (name, at, bytes, reason) in cases {
        let mut b = good.clone();
        b[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
        std::fs::write(&child, &b).unwrap();
        let err = VhdxFile::open(&child, OpenOptions::default()).expect_err(name);
        match err.corruption() {
            Some(Corruption::BadParentLocator { reason: r }) => assert_eq!(*r, reason, "{name}"),
            other => panic!("{name}: {other:?}"),
        }
        assert!(matches!(
            Chain::open(&child, false),
            Err(Error::Corrupt { .. })
        ));
        assert!(!vhdx::check(&child, false).unwrap().errors.is_empty());
    }
}

#[test]
fn one_bad_copy_still_opens_and_repair_fixes_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.vhdx");
    let mut rng = StdRng::seed_from_u64(6);
    let ops = random_ops(&mut rng, 16 * MIB, MIB, 30);
    let (bytes, oracle) = written_file(&path, 16 * MIB, 1 << 20, &ops);
    let cases: [(&str, u64, &str); 4] = [
        ("header 1", 64 * KIB + 200, "header"),
        ("header 2", 128 * KIB + 2, "header"),
        ("region table copy 1", 192 * KIB + 40, "region table"),
        ("region table copy 2", 256 * KIB, "region table"),
    ];
    for (name, at, word) in cases {
        let mut b = bytes.clone();
        b[at as usize] ^= 0x40;
        std::fs::write(&path, &b).unwrap();
        let f = VhdxFile::open(&path, OpenOptions::default())
            .unwrap_or_else(|e| panic!("{name}: {}", vhdx::error_chain(&e)));
        assert!(read_whole(&f) == oracle, "{name}: contents");
        drop(f);
        let report = vhdx::check(&path, false).unwrap();
        assert!(report.errors.is_empty(), "{name}: {:?}", report.errors);
        assert!(
            report.warnings.iter().any(|w| w.contains(word)),
            "{name}: {:?}",
            report.warnings
        );
        let report = vhdx::check(&path, true).unwrap();
        assert!(
            report.repaired.iter().any(|r| r.contains(word)),
            "{name}: {:?}",
            report.repaired
        );
        assert!(report.is_clean(), "{name}: {:?}", report.errors);
        assert!(
            !report.warnings.iter().any(|w| w.contains(word)),
            "{name}: still {:?}",
            report.warnings
        );
        let fixed = std::fs::read(&path).unwrap();
        assert_eq!(
            fixed[192 * KIB as usize..256 * KIB as usize],
            fixed[256 * KIB as usize..320 * KIB as usize],
            "{name}: region table copies differ after repair"
        );
        let f = VhdxFile::open(&path, OpenOptions::default()).unwrap();
        assert!(read_whole(&f) == oracle, "{name}: contents after repair");
        assert!(f.header().log_guid.is_nil(), "{name}: repair leaves a log");
        drop(f);
        let out = std::process::Command::new("qemu-img")
            .args(["check", "-f", "vhdx", path.to_str().unwrap()])
            .output()
            .expect("qemu-img is installed");
        assert!(
            out.status.success(),
            "{name}: qemu-img check: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

// ------------------------------------------------------------------------------------------
// The fuzz target body over mutated files
// ------------------------------------------------------------------------------------------

/// A byte range worth mutating, and the checksummed structure around it (recomputed on
/// half of the mutations so that they reach the validation behind the checksum).
struct Spot {
    start: u64,
    len: u64,
    crc: Option<(u64, u64)>,
}

fn spots(bytes: &[u8]) -> Vec<Spot> {
    let f = open_mem(bytes.to_vec(), false).expect("seed opens");
    let (log_off, log_len) = f.log_location();
    let (meta, _) = f.metadata_location();
    let bat = f.bat_offset();
    let bat_bytes = (f.bat_len() * 8).min(64 * KIB);
    let items = f.metadata_items().len() as u64;
    let mut v = vec![
        Spot {
            start: 0,
            len: 16,
            crc: None,
        },
        Spot {
            start: 64 * KIB,
            len: 80,
            crc: Some((64 * KIB, 4 * KIB)),
        },
        Spot {
            start: 128 * KIB,
            len: 80,
            crc: Some((128 * KIB, 4 * KIB)),
        },
        Spot {
            start: 192 * KIB,
            len: 16 + 32 * 2,
            crc: Some((192 * KIB, 64 * KIB)),
        },
        Spot {
            start: 256 * KIB,
            len: 16 + 32 * 2,
            crc: Some((256 * KIB, 64 * KIB)),
        },
        Spot {
            start: meta,
            len: 32 + 32 * items,
            crc: None,
        },
        Spot {
            start: meta + 64 * KIB,
            len: 1024,
            crc: None,
        },
        Spot {
            start: bat,
            len: bat_bytes,
            crc: None,
        },
        Spot {
            start: 0,
            len: bytes.len() as u64,
            crc: None,
        },
    ];
    if log_len > 0 && &bytes[log_off as usize..log_off as usize + 4] == b"loge" {
        let entry_len = u64::from(le_u32(bytes, log_off + 8));
        v.push(Spot {
            start: log_off,
            len: entry_len.min(8 * KIB),
            crc: Some((log_off, entry_len)),
        });
    }
    v
}

/// Runs the fuzz body over `count` single-byte mutations of `seed`.
fn mutate_and_exercise(
    name: &str,
    mut seed: Vec<u8>,
    count: usize,
    rng: &mut StdRng,
    run_check: Option<&Path>,
) {
    let spots = spots(&seed);
    let (mut opened, mut refused) = (0, 0);
    for n in 0..count {
        let spot = &spots[rng.random_range(0..spots.len())];
        let at = (spot.start + rng.random_range(0..spot.len)) as usize;
        let old = seed[at];
        let new = match rng.random_range(0..4) {
            0 => old ^ (1 << rng.random_range(0..8)),
            1 => 0,
            2 => 0xFF,
            _ => rng.random(),
        };
        let fix = spot.crc.filter(|_| rng.random_bool(0.5));
        // Mutate in place and undo afterwards: the samples are large.
        let saved: Option<[u8; 4]> =
            fix.map(|(s, _)| seed[s as usize + 4..s as usize + 8].try_into().unwrap());
        seed[at] = new;
        if let Some((s, l)) = fix {
            fix_crc(&mut seed, s, l);
        }
        let what = format!(
            "{name}: mutation {n}: byte {at:#x} {old:#04x} -> {new:#04x}, crc fixed: {}",
            fix.is_some()
        );
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            fuzz_body::open_and_exercise(&seed)
        }));
        match result {
            Err(_) => panic!("{what}: panicked"),
            Ok(Ok(_)) => opened += 1,
            Ok(Err(e)) => {
                refused += 1;
                assert!(
                    matches!(
                        e,
                        Error::Corrupt { .. }
                            | Error::Unsupported { .. }
                            | Error::Io { .. }
                            | Error::Poisoned { .. }
                    ),
                    "{what}: unexpected error {e:?}"
                );
            }
        }
        if let Some(path) = run_check.filter(|_| n % 8 == 0) {
            std::fs::write(path, &seed).unwrap();
            let report = vhdx::check(path, false)
                .unwrap_or_else(|e| panic!("{what}: check failed: {}", vhdx::error_chain(&e)));
            let opens = open_mem(seed.clone(), false).is_ok();
            // Check may find more than open does (two valid but different region table
            // copies), never less.
            assert!(
                opens || !report.errors.is_empty(),
                "{what}: check finds no error in a file that does not open"
            );
        }
        seed[at] = old;
        if let (Some((s, _)), Some(saved)) = (fix, saved) {
            seed[s as usize + 4..s as usize + 8].copy_from_slice(&saved);
        }
    }
    assert!(
        opened > 0 && refused > 0,
        "{name}: {opened} opened, {refused} refused"
    );
}

/// The unmutated sample goes all the way through, then `count` mutations of it (the large
/// samples cost a copy per run, hence the small counts).
fn mutate_sample(name: &str, count: usize, seed: u64) {
    let bytes = common::sample(name);
    fuzz_body::open_and_exercise(&bytes).unwrap_or_else(|e| panic!("{name}: {e:?}"));
    mutate_and_exercise(name, bytes, count, &mut StdRng::seed_from_u64(seed), None);
}

#[test]
fn fuzz_body_survives_mutated_dirty_log_sample() {
    mutate_sample("iotest-dirtylog-10G-4M.vhdx", 70, 1);
}

#[test]
fn fuzz_body_survives_mutated_windows_sample() {
    mutate_sample("iotest-dynamic-1G.vhdx", 16, 2);
}

#[test]
fn fuzz_body_survives_mutated_disk2vhd_sample() {
    mutate_sample("test-disk2vhd.vhdx", 8, 3);
}

#[test]
fn fuzz_body_survives_mutated_dynamic_and_fixed_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(0xf00d);
    let check_path = dir.path().join("check.vhdx");

    // A dynamic file.
    let ops = random_ops(&mut rng, 8 * MIB, MIB, 20);
    let (dynamic, _) = written_file(&dir.path().join("d.vhdx"), 8 * MIB, 1 << 20, &ops);
    assert_eq!(
        fuzz_body::open_and_exercise(&dynamic).unwrap(),
        fuzz_body::Outcome::Written
    );
    mutate_and_exercise("dynamic", dynamic, 150, &mut rng, Some(&check_path));

    // A fixed file with 4 KiB sectors.
    let fixed_path = dir.path().join("f.vhdx");
    vhdx::create(
        &fixed_path,
        &CreateParams {
            virtual_size: 6 * MIB,
            kind: DiskKind::Fixed,
            block_size: Some(1 << 20),
            logical_sector_size: 4096,
            physical_sector_size: 4096,
        },
    )
    .unwrap();
    let fixed = std::fs::read(&fixed_path).unwrap();
    fuzz_body::open_and_exercise(&fixed).unwrap();
    mutate_and_exercise("fixed", fixed, 60, &mut rng, Some(&check_path));
}

#[test]
fn fuzz_body_survives_mutated_differencing_and_dirty_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(0xbeef);
    let check_path = dir.path().join("check.vhdx");

    let ops = random_ops(&mut rng, 8 * MIB, MIB, 20);
    written_file(&dir.path().join("d.vhdx"), 8 * MIB, 1 << 20, &ops);

    // A differencing file with partial blocks and a sector bitmap.
    let parent = dir.path().join("p.vhdx");
    written_file(&parent, 8 * MIB, 1 << 20, &[Op::Write(0, vec![7; 8 << 20])]);
    let child = dir.path().join("c.avhdx");
    vhdx::create_differencing(&child, &parent, Some(1 << 20)).unwrap();
    let c = Chain::open(&child, true).unwrap();
    for op in random_ops(&mut rng, 8 * MIB, MIB, 20) {
        match op {
            Op::Write(o, d) => c.write_at(&d, o).unwrap(),
            Op::Zero(o, l) => c.write_zeroes(o, l).unwrap(),
            Op::Flush => c.flush().unwrap(),
        }
    }
    c.close().unwrap();
    let diff = std::fs::read(&child).unwrap();
    fuzz_body::open_and_exercise(&diff).unwrap();
    mutate_and_exercise("differencing", diff, 100, &mut rng, None);

    // A file whose writer never closed it: a log to replay.
    let mem = Arc::new(MemFile::new(
        std::fs::read(dir.path().join("d.vhdx")).unwrap(),
    ));
    let f = VhdxFile::open_io(mem.clone(), Path::new("mem.vhdx"), rw()).unwrap();
    // Zeroing whole blocks and writing into them changes the BAT, so the flushes log it.
    let dirty_ops = [
        Op::Zero(3 * MIB, MIB),
        Op::Flush,
        Op::Write(3 * MIB + 512, vec![0x3C; 4096]),
        Op::Zero(6 * MIB, 2 * MIB),
        Op::Write(7 * MIB, vec![0x7C; MIB as usize]),
        Op::Flush,
    ];
    for op in &dirty_ops {
        op.apply(&f).unwrap();
    }
    std::mem::forget(f);
    let dirty = mem.contents();
    assert!(open_mem(dirty.clone(), false).unwrap().replayed_log());
    fuzz_body::open_and_exercise(&dirty).unwrap();
    mutate_and_exercise("pending log", dirty, 120, &mut rng, Some(&check_path));
}

// ------------------------------------------------------------------------------------------
// 7. Failing storage
// ------------------------------------------------------------------------------------------

const FAULT_SIZE: u64 = 8 * MIB;

/// Runs `ops` on a writable file over `io` until the first error. Returns the disk as of
/// the last successful flush, the ops since (including the failed one), and whether every
/// op succeeded.
fn run_until_error(io: Arc<dyn FileIo>, base: &[u8], ops: &[Op]) -> (Vec<u8>, Vec<Op>, bool) {
    let mut durable = base.to_vec();
    let mut current = base.to_vec();
    let mut pending = Vec::new();
    let f = match VhdxFile::open_io(io, Path::new("faulty.vhdx"), rw()) {
        Ok(f) => f,
        Err(_) => return (durable, pending, false),
    };
    for op in ops {
        let r = op.apply(&f);
        pending.push(op.clone());
        if r.is_err() {
            // Closing after an error may fail, but must not panic.
            let _ = f.close();
            return (durable, pending, false);
        }
        op.apply_oracle(&mut current);
        if let Op::Flush = op {
            durable.clone_from(&current);
            pending.clear();
        }
    }
    let closed = f.close();
    if closed.is_ok() {
        durable = current;
        pending.clear();
    }
    (durable, pending, closed.is_ok())
}

#[test]
fn failing_storage_keeps_flushed_writes() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(77);
    let pre = random_ops(&mut rng, FAULT_SIZE, MIB, 10);
    let (seed, base) = written_file(&dir.path().join("s.vhdx"), FAULT_SIZE, 1 << 20, &pre);
    let mut ops = random_ops(&mut rng, FAULT_SIZE, MIB, 24);
    ops.insert(8, Op::Flush);
    ops.insert(16, Op::Flush);
    for fault in [Fault::NoSpace, Fault::ShortWrite, Fault::SyncFailure] {
        let mut n = 0;
        let mut failures = 0;
        loop {
            let faulty = Arc::new(FaultyIo::new(MemFile::new(seed.clone()), n, fault));
            let (durable, pending, completed) = run_until_error(faulty.clone(), &base, &ops);
            if completed {
                break;
            }
            failures += 1;
            let what = format!("{fault:?} after {n} successful calls");
            verify_image(&what, faulty.inner().contents(), &durable, &pending);
            n += if n < 24 { 1 } else { 4 };
            assert!(n < 2000, "{fault:?}: the workload never completes");
        }
        assert!(failures > 10, "{fault:?}: only {failures} failure points");
    }
}

// ------------------------------------------------------------------------------------------
// 8. Power loss
// ------------------------------------------------------------------------------------------

#[test]
fn power_loss_keeps_flushed_writes() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(88);
    let pre = random_ops(&mut rng, FAULT_SIZE, MIB, 10);
    let (seed, base) = written_file(&dir.path().join("s.vhdx"), FAULT_SIZE, 1 << 20, &pre);
    let mut ops = random_ops(&mut rng, FAULT_SIZE, MIB, 30);
    ops.insert(10, Op::Flush);
    ops.insert(20, Op::Flush);

    // Crashes between operations: after any op, with any subset of the unsynced writes.
    let crash = Arc::new(CrashIo::new(seed.clone()));
    let f = VhdxFile::open_io(crash.clone(), Path::new("crash.vhdx"), rw()).unwrap();
    let mut durable = base.clone();
    let mut current = base.clone();
    let mut pending: Vec<Op> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        op.apply(&f).unwrap();
        op.apply_oracle(&mut current);
        if let Op::Flush = op {
            durable.clone_from(&current);
            pending.clear();
            // What a flush leaves unsynced (the last log entry's writes in place) is
            // redone by the replay: losing all of it loses nothing flushed.
            verify_image(
                &format!("crash right after flush {i}, losing every unsynced write"),
                crash.crash(|_| false),
                &durable,
                &[],
            );
        } else {
            pending.push(op.clone());
        }
        if rng.random_bool(0.4) {
            let p = rng.random_range(0.0..1.0);
            let image = crash.crash(|_| rng.random_bool(p));
            verify_image(&format!("crash after op {i}"), image, &durable, &pending);
        }
    }
    f.close().unwrap();
    verify_image("after close", crash.crash(|_| false), &current, &[]);

    // Crashes inside a flush (its commit cut after n syncs or writes), with random subsets
    // of what was not yet synced.
    for fault in [Fault::SyncFailure, Fault::NoSpace] {
        let step = if fault == Fault::SyncFailure { 2 } else { 5 };
        for n in (0..1000).step_by(step) {
            let faulty = Arc::new(FaultyIo::new(CrashIo::new(seed.clone()), n, fault));
            let (durable, pending, completed) = run_until_error(faulty.clone(), &base, &ops);
            if completed {
                break;
            }
            // Lose none, half or all of what was not yet synced.
            let p = [0.0, 0.5, 1.0][(n / step as u64) as usize % 3];
            let image = faulty.inner().crash(|_| rng.random_bool(p));
            let what = format!("{fault:?} after {n} calls, crash keeping {p}");
            verify_image(&what, image, &durable, &pending);
        }
    }
}

/// A flush that dirties more BAT sectors than one log entry holds is committed in several
/// entries; power lost between any two of them must leave a file that opens and reads
/// every write flushed before. (A differencing file is the hard case: a partially present
/// block is only legal once its chunk's sector-bitmap entry is committed.)
#[test]
fn power_loss_between_the_entries_of_a_large_flush_leaves_a_usable_file() {
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("parent.vhdx");
    let child = dir.path().join("child.avhdx");
    vhdx::create(
        &parent,
        &CreateParams {
            block_size: Some(1 << 20),
            ..CreateParams::dynamic(80 << 30)
        },
    )
    .unwrap();
    vhdx::create_differencing(&child, &parent, Some(1 << 20)).unwrap();
    let pristine = std::fs::read(&child).unwrap();
    // 140 writes 512 MiB apart: 140 BAT sectors plus their bitmap sectors.
    let offsets: Vec<u64> = (0..140u64).map(|k| k * (512 << 20)).collect();
    let mut saw_failure_midway = false;
    // Two header writes at the first write, then the flush: data sync, first entry, header
    // naming the log, apply, second entry, apply: about nine syncs in all.
    for syncs in 0..=12 {
        let io = Arc::new(FaultyIo::new(
            CrashIo::new(pristine.clone()),
            syncs,
            Fault::SyncFailure,
        ));
        let f = VhdxFile::open_io(io.clone(), &child, rw()).unwrap();
        let wrote = offsets
            .iter()
            .enumerate()
            .all(|(k, off)| f.write_at(&[k as u8 | 1; 512], *off).is_ok());
        let flushed = wrote && f.flush().is_ok();
        std::mem::forget(f);
        saw_failure_midway |= !flushed && syncs >= 6;
        let image = io.inner().crash(|_| false);
        let reopened = open_mem(image, false).unwrap_or_else(|e| {
            panic!(
                "after {syncs} syncs the child does not open: {}",
                vhdx::error_chain(&e)
            )
        });
        if flushed {
            for (k, off) in offsets.iter().enumerate() {
                let mut buf = [0u8; 512];
                reopened.read_at(&mut buf, *off).unwrap();
                assert_eq!(buf, [k as u8 | 1; 512], "flushed write {k} lost");
            }
        }
    }
    assert!(
        saw_failure_midway,
        "no trial failed in the middle of the flush"
    );
}

/// A damaged BAT entry past the last payload block (padding a reader ignores) must not
/// make repair truncate the file.
#[test]
fn repair_never_truncates_below_the_structures() {
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("p.vhdx");
    let child = dir.path().join("c.avhdx");
    vhdx::create(
        &parent,
        &CreateParams {
            block_size: Some(1 << 20),
            ..CreateParams::dynamic(3 << 30)
        },
    )
    .unwrap();
    vhdx::create_differencing(&child, &parent, Some(1 << 20)).unwrap();
    {
        let c = Chain::open(&child, true).unwrap();
        c.write_at(&[7u8; 4096], 1 << 20).unwrap();
        c.close().unwrap();
    }
    let mut bytes = std::fs::read(&child).unwrap();
    let len = bytes.len();
    // Entry 3072 is padding after the last payload block (3072 blocks, chunk ratio 4096).
    put_u64(&mut bytes, (3 << 20) + 3072 * 8, 0xFFFF_FFFF_FFF0_0006);
    std::fs::write(&child, &bytes).unwrap();
    let report = vhdx::check(&child, true).unwrap();
    assert_eq!(
        std::fs::metadata(&child).unwrap().len(),
        len as u64,
        "{report:?}"
    );
    let c = Chain::open(&child, false).unwrap();
    let mut buf = [0u8; 4096];
    c.read_at(&mut buf, 1 << 20).unwrap();
    assert_eq!(buf, [7u8; 4096]);
}

/// A log entry whose zero descriptor covers an absurd range is not a valid entry: opening
/// neither panics nor writes terabytes of zeros.
#[test]
fn hostile_zero_descriptor_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhdx");
    vhdx::create(&path, &CreateParams::dynamic(64 << 20)).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let log_guid = uuid_bytes(0x42);
    // One entry at the start of the log (1 MiB): a data descriptor, then a zero
    // descriptor from 256 MiB whose length wraps the address space.
    let mut entry = vec![0u8; 8192];
    entry[..4].copy_from_slice(b"loge");
    put_u32(&mut entry, 8, 8192);
    put_u32(&mut entry, 12, 0);
    put_u64(&mut entry, 16, 1);
    put_u32(&mut entry, 24, 2);
    entry[32..48].copy_from_slice(&log_guid);
    put_u64(&mut entry, 48, 4 << 20);
    put_u64(&mut entry, 56, 4 << 20);
    entry[64..68].copy_from_slice(b"desc");
    put_u64(&mut entry, 64 + 16, 3 << 20);
    put_u64(&mut entry, 64 + 24, 1);
    entry[96..100].copy_from_slice(b"zero");
    put_u64(&mut entry, 96 + 8, 0xFFFF_FFFF_F000_0000);
    put_u64(&mut entry, 96 + 16, 0x1000_0000);
    put_u64(&mut entry, 96 + 24, 1);
    entry[4096..4100].copy_from_slice(b"data");
    put_u32(&mut entry, 4096 + 4092, 1);
    fix_crc(&mut entry, 0, 8192);
    bytes[1 << 20..(1 << 20) + 8192].copy_from_slice(&entry);
    // Point the current header at that log GUID.
    for slot in [0x10000u64, 0x20000] {
        let at = slot as usize;
        bytes[at + 48..at + 64].copy_from_slice(&log_guid);
        fix_crc(&mut bytes, slot, 4096);
    }
    for writable in [false, true] {
        match open_mem(bytes.clone(), writable) {
            Err(e) => assert!(
                matches!(e.corruption(), Some(Corruption::LogNoValidSequence { .. })),
                "{}",
                vhdx::error_chain(&e)
            ),
            Ok(_) => panic!("a log with a wrapping zero range was replayed"),
        }
    }
}

fn uuid_bytes(fill: u8) -> [u8; 16] {
    [fill; 16]
}
