//! Cross-validation with QEMU (`qemu-img`, `qemu-io`): files QEMU makes must read here
//! exactly as QEMU reads them, files we make and write must pass `qemu-img check` and
//! compare equal to a raw oracle, differencing chains and merges must match an oracle
//! built from the same writes, and the sample images in `crates/vhdx/tests/data/samples`
//! must read as their README says.

mod common;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use vhdx::{Chain, CreateParams, DiskKind, Error, OpenOptions, VhdxFile};
use vhdx::{MergeDirection, merge};

const MIB: u64 = 1 << 20;

// ------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------

fn run(prog: &str, args: &[&str]) -> Output {
    Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog} (is qemu-utils installed?): {e}"))
}

/// Runs a command that must succeed; returns its stdout.
fn ok(prog: &str, args: &[&str]) -> String {
    let out = run(prog, args);
    assert!(
        out.status.success(),
        "{prog} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

fn qemu_check(path: &Path) {
    let out = ok("qemu-img", &["check", "-f", "vhdx", s(path)]);
    assert!(
        out.contains("No errors were found on the image."),
        "qemu-img check {}: {out}",
        path.display()
    );
}

fn qemu_compare_raw(vhdx: &Path, raw: &Path) {
    let out = ok(
        "qemu-img",
        &["compare", "-f", "vhdx", "-F", "raw", s(vhdx), s(raw)],
    );
    assert!(
        out.contains("Images are identical."),
        "qemu-img compare: {out}"
    );
}

/// `[offset, offset + len)` of a vhdx file as QEMU reads it.
fn qemu_extract(dir: &Path, vhdx: &Path, offset: u64, len: u64) -> Vec<u8> {
    let out = dir.join("extract.raw");
    let _ = std::fs::remove_file(&out);
    let opts = format!(
        "driver=raw,offset={offset},size={len},file.driver=vhdx,file.file.filename={}",
        s(vhdx)
    );
    ok(
        "qemu-img",
        &["convert", "--image-opts", &opts, "-O", "raw", s(&out)],
    );
    let data = std::fs::read(&out).unwrap();
    assert_eq!(data.len() as u64, len);
    data
}

fn qemu_convert(vhdx: &Path, raw: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(raw);
    ok(
        "qemu-img",
        &["convert", "-f", "vhdx", "-O", "raw", s(vhdx), s(raw)],
    );
    std::fs::read(raw).unwrap()
}

fn read_chain(chain: &Chain, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    chain.read_at(&mut buf, offset).unwrap();
    buf
}

fn read_all(chain: &Chain) -> Vec<u8> {
    read_chain(chain, 0, chain.virtual_size())
}

/// Asserts two byte strings are equal, naming the first differing offset.
#[track_caller]
fn assert_same(what: &str, base: u64, ours: &[u8], expected: &[u8]) {
    assert_eq!(ours.len(), expected.len(), "{what}: length");
    // Slice equality is a memcmp even in unoptimized test builds; find the offset only
    // when they differ.
    if ours == expected {
        return;
    }
    if let Some(i) = ours.iter().zip(expected).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at disk offset {:#x}: ours {:#04x}, expected {:#04x}",
            base + i as u64,
            ours[i],
            expected[i]
        );
    }
}

fn bunzip_sample(name: &str, to: &Path) {
    std::fs::write(to, common::sample(name)).unwrap();
}

fn rw() -> OpenOptions {
    OpenOptions {
        writable: true,
        ..OpenOptions::default()
    }
}

/// A write a test applies both to a vhdx file and to its raw oracle.
#[derive(Clone, Debug)]
enum Op {
    Write(u64, Vec<u8>),
    Zero(u64, u64),
    Flush,
}

fn apply_oracle(oracle: &mut [u8], op: &Op) {
    match op {
        Op::Write(off, data) => {
            oracle[*off as usize..*off as usize + data.len()].copy_from_slice(data)
        }
        Op::Zero(off, len) => oracle[*off as usize..(*off + *len) as usize].fill(0),
        Op::Flush => {}
    }
}

fn apply_chain(chain: &Chain, op: &Op) {
    match op {
        Op::Write(off, data) => chain.write_at(data, *off).unwrap(),
        Op::Zero(off, len) => chain.write_zeroes(*off, *len).unwrap(),
        Op::Flush => chain.flush().unwrap(),
    }
}

fn random_data(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v
}

/// A random mix of writes (partial and whole blocks, across block boundaries), zeroing
/// (partial and whole blocks) and flushes, aligned to `align` bytes.
fn random_ops(rng: &mut StdRng, size: u64, block: u64, align: u64, count: usize) -> Vec<Op> {
    let mut ops = Vec::new();
    for _ in 0..count {
        let kind = rng.random_range(0..10);
        let op = match kind {
            0..=4 => {
                let len = align * rng.random_range(1..=64u64);
                let len = len.min(size);
                let off = align * rng.random_range(0..=(size - len) / align);
                Op::Write(off, random_data(rng, len as usize))
            }
            5 => {
                // A whole block (or the short last one).
                let b = rng.random_range(0..size.div_ceil(block));
                let len = block.min(size - b * block);
                Op::Write(b * block, random_data(rng, len as usize))
            }
            6 => {
                // Across a block boundary.
                let b = rng.random_range(1..size.div_ceil(block).max(2));
                let start = (b * block).min(size) - align * rng.random_range(1..=8u64);
                let len = (align * rng.random_range(2..=16u64)).min(size - start);
                Op::Write(start, random_data(rng, len as usize))
            }
            7 => {
                let len = (align * rng.random_range(1..=4096u64)).min(size);
                let off = align * rng.random_range(0..=(size - len) / align);
                Op::Zero(off, len)
            }
            8 => {
                let b = rng.random_range(0..size.div_ceil(block));
                let n = rng.random_range(1..=2u64);
                let len = (n * block).min(size - b * block);
                Op::Zero(b * block, len)
            }
            _ => Op::Flush,
        };
        ops.push(op);
    }
    ops
}

// ------------------------------------------------------------------------------------------
// 1. qemu-img-made files read here as qemu-img convert reads them (digest 13 A)
// ------------------------------------------------------------------------------------------

struct QemuVariant {
    name: &'static str,
    size: u64,
    options: &'static str,
    /// qemu-io commands.
    writes: &'static [&'static str],
    block_size: u32,
    fixed: bool,
}

#[test]
fn qemu_created_files_read_identically() {
    let variants = [
        QemuVariant {
            name: "d",
            size: 1 << 30,
            options: "",
            writes: &[
                "write -P 0xab 0 64k",
                "write -P 0xcd 9M 4k",
                "write -z 100M 8M",
                "write -P 0xef 1020M 4M",
            ],
            block_size: 8 << 20,
            fixed: false,
        },
        QemuVariant {
            name: "d1m",
            size: 5 << 30,
            options: "block_size=1M,log_size=4M",
            writes: &[
                "write -P 0x11 1M 4k",
                "write -P 0x22 0 4k",
                // Block 4096 lies after the first sector-bitmap slot of the BAT.
                "write -P 0x33 4095M 2M",
                "write -P 0x44 5119M 1M",
            ],
            block_size: 1 << 20,
            fixed: false,
        },
        QemuVariant {
            name: "d256",
            size: 200 << 30,
            options: "block_size=256M",
            writes: &[
                "write -P 0x55 0 64k",
                // Block 16 is the first after the bitmap slot at BAT index 16.
                "write -P 0x66 4095M 2M",
                "write -P 0x77 204799M 1M",
            ],
            block_size: 256 << 20,
            fixed: false,
        },
        QemuVariant {
            name: "dnp",
            size: 64 << 20,
            options: "block_state_zero=off",
            writes: &[
                "write -P 0x12 3M 100k",
                "write -z 8M 8M",
                "write -P 0x13 63M 1M",
            ],
            block_size: 8 << 20,
            fixed: false,
        },
        QemuVariant {
            name: "fix",
            size: 64 << 20,
            options: "subformat=fixed,block_state_zero=off,block_size=8M",
            writes: &[
                "write -P 0x21 0 1M",
                "write -P 0x22 20M 12k",
                "write -z 40M 8M",
            ],
            block_size: 8 << 20,
            fixed: true,
        },
        QemuVariant {
            name: "fixz",
            size: 64 << 20,
            options: "subformat=fixed",
            writes: &[
                "write -P 0xab 0 64k",
                "write -P 0xcd 9M 4k",
                "write -z 32M 8M",
            ],
            block_size: 8 << 20,
            fixed: true,
        },
        QemuVariant {
            name: "short",
            size: 32 << 20,
            options: "block_size=256M,subformat=fixed,block_state_zero=off",
            writes: &["write -P 0x31 0 4k", "write -P 0x32 31M 1M"],
            block_size: 256 << 20,
            fixed: true,
        },
    ];
    let dir = tempfile::tempdir().unwrap();
    for v in &variants {
        let path = dir.path().join(format!("{}.vhdx", v.name));
        let size = v.size.to_string();
        let mut args = vec!["create", "-q", "-f", "vhdx"];
        if !v.options.is_empty() {
            args.extend(["-o", v.options]);
        }
        args.extend([s(&path), &size]);
        ok("qemu-img", &args);
        let mut io_args = vec!["-f", "vhdx"];
        for w in v.writes {
            io_args.extend(["-c", w]);
        }
        io_args.push(s(&path));
        ok("qemu-io", &io_args);

        let report = vhdx::check(&path, false).unwrap();
        assert!(report.errors.is_empty(), "{}: {:?}", v.name, report.errors);
        assert!(!report.needs_log_replay, "{}", v.name);

        let file = VhdxFile::open(&path, OpenOptions::default()).unwrap();
        let g = file.geometry();
        assert_eq!(g.virtual_size, v.size, "{}", v.name);
        assert_eq!(g.block_size, v.block_size, "{}", v.name);
        assert_eq!(g.logical_sector_size, 512, "{}", v.name);
        let expect_kind = if v.fixed {
            DiskKind::Fixed
        } else {
            DiskKind::Dynamic
        };
        assert_eq!(file.kind(), expect_kind, "{}", v.name);
        let chain = Chain::from_top(file).unwrap();

        if v.size <= 1 << 30 {
            let raw = dir.path().join(format!("{}.raw", v.name));
            let expected = qemu_convert(&path, &raw);
            let ours = read_all(&chain);
            assert_same(v.name, 0, &ours, &expected);
            std::fs::remove_file(&raw).unwrap();
        } else {
            // Too large to convert whole within the time budget: compare 4 MiB windows
            // around every write, random probes and the last 4 MiB.
            let mut windows: Vec<u64> = vec![0, v.size - 4 * MIB];
            for w in v.writes {
                let off = parse_qemu_size(w.split_whitespace().nth(3).unwrap());
                windows.push(off.saturating_sub(MIB).min(v.size - 4 * MIB));
            }
            let mut rng = StdRng::seed_from_u64(7);
            for _ in 0..6 {
                windows.push(rng.random_range(0..v.size / MIB - 4) * MIB);
            }
            for off in windows {
                let expected = qemu_extract(dir.path(), &path, off, 4 * MIB);
                let ours = read_chain(&chain, off, 4 * MIB);
                assert_same(v.name, off, &ours, &expected);
            }
        }
        chain.close().unwrap();
        std::fs::remove_file(&path).unwrap();
    }
}

fn parse_qemu_size(t: &str) -> u64 {
    let (num, mul) = match t.as_bytes()[t.len() - 1] {
        b'k' => (&t[..t.len() - 1], 1 << 10),
        b'M' => (&t[..t.len() - 1], 1 << 20),
        b'G' => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    num.parse::<u64>().unwrap() * mul
}

// ------------------------------------------------------------------------------------------
// 2. The sample images read as their README says
// ------------------------------------------------------------------------------------------

/// Asserts `[start, end)` of the chain reads as the byte `value`, in 8 MiB pieces.
#[track_caller]
fn assert_uniform(chain: &Chain, start: u64, end: u64, value: u8) {
    let mut pos = start;
    while pos < end {
        let n = (end - pos).min(8 * MIB);
        let buf = read_chain(chain, pos, n);
        if buf != vec![value; n as usize] {
            let i = buf.iter().position(|&b| b != value).unwrap();
            panic!(
                "offset {:#x} reads {:#04x}, expected {value:#04x}",
                pos + i as u64,
                buf[i]
            );
        }
        pos += n;
    }
}

#[test]
fn sample_windows_dynamic_1g() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dyn.vhdx");
    bunzip_sample("iotest-dynamic-1G.vhdx", &path);
    let file = VhdxFile::open(&path, OpenOptions::default()).unwrap();
    assert_eq!(file.creator(), "Microsoft Windows 6.2.9200.16384");
    let g = file.geometry();
    assert_eq!((g.virtual_size, g.block_size), (1 << 30, 32 << 20));
    assert_eq!((g.logical_sector_size, g.physical_sector_size), (512, 4096));
    assert_eq!(file.kind(), DiskKind::Dynamic);
    let chain = Chain::from_top(file).unwrap();
    assert_uniform(&chain, 0, 0x2100000, 0xA5);
    assert_uniform(&chain, 0x2100000, 0x4200000, 0x96);
    assert_uniform(&chain, 0x4200000, 1 << 30, 0);
    let report = vhdx::check(&path, false).unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
}

#[test]
fn sample_disk2vhd_matches_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d2v.vhdx");
    bunzip_sample("test-disk2vhd.vhdx", &path);
    let chain = Chain::open(&path, false).unwrap();
    assert_eq!(chain.top().creator(), "d2v");
    assert_eq!(chain.virtual_size(), 256 << 20);
    assert_eq!(chain.top().geometry().block_size, 2 << 20);
    let ours = read_all(&chain);
    assert!(
        ours[..0x10000].iter().any(|&b| b != 0),
        "first 64 KiB hold data"
    );
    assert!(ours[0x10000..] == vec![0u8; ours.len() - 0x10000][..]);
    let expected = qemu_convert(&path, &dir.path().join("d2v.raw"));
    assert_same("disk2vhd", 0, &ours, &expected);
}

#[test]
fn sample_dirty_log_is_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dirty.vhdx");
    bunzip_sample("iotest-dirtylog-10G-4M.vhdx", &path);
    let before = std::fs::read(&path).unwrap();

    // QEMU refuses a read-only open while the log waits.
    let out = run(
        "qemu-io",
        &["-r", "-f", "vhdx", "-c", "read 0 4k", s(&path)],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("log that needs to be replayed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Read-only: replayed in memory, the file is not written.
    {
        let file = VhdxFile::open(&path, OpenOptions::default()).unwrap();
        assert!(file.replayed_log());
        assert!(!file.header().log_guid.is_nil());
        assert_eq!(file.geometry().virtual_size, 10 << 30);
        assert_eq!(file.geometry().block_size, 1 << 20);
        let chain = Chain::from_top(file).unwrap();
        check_dirty_log_contents(&chain);
        chain.close().unwrap();
    }
    let after = std::fs::read(&path).unwrap();
    assert!(before == after, "a read-only open changed the file");
    let report = vhdx::check(&path, false).unwrap();
    assert!(report.needs_log_replay);
    assert!(report.errors.is_empty(), "{:?}", report.errors);

    // QEMU's own replay, for comparison.
    let theirs = dir.path().join("theirs.vhdx");
    std::fs::write(&theirs, &before).unwrap();
    ok(
        "qemu-img",
        &["check", "-r", "all", "-f", "vhdx", s(&theirs)],
    );
    let expected = qemu_extract(dir.path(), &theirs, 0, 32 * MIB);

    // Writable: replayed in place.
    {
        let file = VhdxFile::open(&path, rw()).unwrap();
        assert!(file.replayed_log());
        assert!(file.header().log_guid.is_nil());
        let chain = Chain::from_top(file).unwrap();
        check_dirty_log_contents(&chain);
        assert_same(
            "dirty log vs qemu replay",
            0,
            &read_chain(&chain, 0, 32 * MIB),
            &expected,
        );
        chain.close().unwrap();
    }
    assert!(std::fs::read(&path).unwrap() != before);
    let file = VhdxFile::open(&path, OpenOptions::default()).unwrap();
    assert!(!file.replayed_log(), "the log was applied in place");
    drop(file);
    ok(
        "qemu-io",
        &[
            "-r",
            "-f",
            "vhdx",
            "-c",
            "read -P 0xa5 0 0x1200000",
            "-c",
            "read -P 0 0x1200000 0x1000000",
            s(&path),
        ],
    );
    qemu_check(&path);
}

fn check_dirty_log_contents(chain: &Chain) {
    // Block 17 ([0x1100000, 0x1200000)) is present only after the log is replayed.
    assert_uniform(chain, 0, 0x1200000, 0xA5);
    assert_uniform(chain, 0x1200000, 0x3000000, 0);
    let size = chain.virtual_size();
    let status = chain.block_status(0x1200000, size - 0x1200000).unwrap();
    assert_eq!(status, vec![vhdx::Extent::Zero(size - 0x1200000)]);
    assert_uniform(chain, size - 4 * MIB, size, 0);
}

// ------------------------------------------------------------------------------------------
// 3. Our files pass qemu-img check and compare
// ------------------------------------------------------------------------------------------

#[test]
fn our_files_pass_qemu_check_and_compare() {
    // A size that is not a multiple of any block size, so the last block is short.
    let size = 40 * MIB + 3 * 512;
    let variants = [
        (DiskKind::Dynamic, 1u32 << 20),
        (DiskKind::Dynamic, 2 << 20),
        (DiskKind::Dynamic, 32 << 20),
        (DiskKind::Fixed, 1 << 20),
        (DiskKind::Fixed, 8 << 20),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (i, (kind, block)) in variants.into_iter().enumerate() {
        let name = format!("{}-{}M", kind.name(), block >> 20);
        let path = dir.path().join(format!("{name}.vhdx"));
        vhdx::create(
            &path,
            &CreateParams {
                virtual_size: size,
                kind,
                block_size: Some(block),
                logical_sector_size: 512,
                physical_sector_size: 4096,
            },
        )
        .unwrap();
        let mut rng = StdRng::seed_from_u64(100 + i as u64);
        let mut ops = random_ops(&mut rng, size, u64::from(block), 512, 60);
        // Unaligned byte ranges too: a base file has no parent to shine through.
        ops.push(Op::Write(12345, random_data(&mut rng, 3333)));
        ops.push(Op::Zero(777_777, 100_001));
        let mut oracle = vec![0u8; size as usize];
        let chain = Chain::open(&path, true).unwrap();
        for op in &ops {
            apply_chain(&chain, op);
            apply_oracle(&mut oracle, op);
        }
        assert_same(&name, 0, &read_all(&chain), &oracle);
        chain.close().unwrap();

        let report = vhdx::check(&path, false).unwrap();
        assert!(report.errors.is_empty(), "{name}: {:?}", report.errors);
        let raw = dir.path().join(format!("{name}.raw"));
        std::fs::write(&raw, &oracle).unwrap();
        let info = ok("qemu-img", &["info", "--output=json", s(&path)]);
        assert!(
            info.contains(&format!("\"virtual-size\": {size}")),
            "{info}"
        );
        assert!(
            info.contains(&format!("\"cluster-size\": {block}")),
            "{info}"
        );
        qemu_check(&path);
        qemu_compare_raw(&path, &raw);
        // And the other way round: QEMU writes into our file, we read it.
        ok(
            "qemu-io",
            &["-f", "vhdx", "-c", "write -P 0x5c 5M 1536k", s(&path)],
        );
        oracle[5 << 20..(5 << 20) + (1536 << 10)].fill(0x5c);
        let chain = Chain::open(&path, false).unwrap();
        assert_same(
            &format!("{name} after qemu-io"),
            0,
            &read_all(&chain),
            &oracle,
        );
        drop(chain);
        std::fs::remove_file(&path).unwrap();
        std::fs::remove_file(&raw).unwrap();
    }
}

const CRASH_CHILD_ENV: &str = "VHDX_INTEROP_CRASH_CHILD";
const CRASH_SIZE: u64 = 24 * MIB;
const CRASH_BLOCK: u32 = 1 << 20;

/// The writes of the crash test: (flushed ones, unflushed ones). Aligned to sectors.
fn crash_ops() -> (Vec<Op>, Vec<Op>) {
    let mut rng = StdRng::seed_from_u64(4242);
    let mut flushed = random_ops(&mut rng, CRASH_SIZE, u64::from(CRASH_BLOCK), 512, 40);
    flushed.push(Op::Flush);
    let unflushed: Vec<Op> = random_ops(&mut rng, CRASH_SIZE, u64::from(CRASH_BLOCK), 512, 12)
        .into_iter()
        .filter(|op| !matches!(op, Op::Flush))
        .collect();
    (flushed, unflushed)
}

/// Not a test of its own: the child process of `killed_writer_is_replayed_and_qemu_agrees`.
/// It writes, flushes, writes more, and exits without closing the file.
#[test]
fn crash_child_process() {
    let Ok(path) = std::env::var(CRASH_CHILD_ENV) else {
        return;
    };
    let chain = Chain::open(Path::new(&path), true).unwrap();
    let (flushed, unflushed) = crash_ops();
    for op in flushed.iter().chain(&unflushed) {
        apply_chain(&chain, op);
    }
    std::mem::forget(chain);
    std::process::exit(0);
}

#[test]
fn killed_writer_is_replayed_and_qemu_agrees() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("killed.vhdx");
    vhdx::create(
        &path,
        &CreateParams {
            block_size: Some(CRASH_BLOCK),
            ..CreateParams::dynamic(CRASH_SIZE)
        },
    )
    .unwrap();
    // Something committed and cleanly closed before the crashing session.
    let chain = Chain::open(&path, true).unwrap();
    chain.write_at(&[0x77; 3 * MIB as usize], 2 * MIB).unwrap();
    chain.close().unwrap();

    let status = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_child_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_CHILD_ENV, &path)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());

    let (flushed, unflushed) = crash_ops();
    let mut durable = vec![0u8; CRASH_SIZE as usize];
    durable[2 * MIB as usize..5 * MIB as usize].fill(0x77);
    for op in &flushed {
        apply_oracle(&mut durable, op);
    }

    // The process died with a log entry named by the header: QEMU refuses a read-only open.
    let file = VhdxFile::open(&path, OpenOptions::default()).unwrap();
    assert!(
        !file.header().log_guid.is_nil(),
        "log guid left set by the killed writer"
    );
    drop(file);
    let out = run(
        "qemu-io",
        &["-r", "-f", "vhdx", "-c", "read 0 4k", s(&path)],
    );
    assert!(
        !out.status.success(),
        "qemu-io opened a file with a pending log"
    );

    // Our writable open replays; a clean close clears the log GUID.
    let chain = Chain::open(&path, true).unwrap();
    let ours = read_all(&chain);
    chain.close().unwrap();
    let file = VhdxFile::open(&path, OpenOptions::default()).unwrap();
    assert!(file.header().log_guid.is_nil());
    assert!(!file.replayed_log());
    drop(file);

    let report = vhdx::check(&path, false).unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    qemu_check(&path);
    let theirs = qemu_convert(&path, &dir.path().join("killed.raw"));
    assert_same("ours vs qemu after replay", 0, &ours, &theirs);

    // Every sector holds the flushed contents, or one of the unflushed writes to it.
    let mut touched = vec![false; (CRASH_SIZE / 512) as usize];
    for op in &unflushed {
        let (off, len) = match op {
            Op::Write(o, d) => (*o, d.len() as u64),
            Op::Zero(o, l) => (*o, *l),
            Op::Flush => continue,
        };
        for sct in off / 512..(off + len) / 512 {
            touched[sct as usize] = true;
        }
    }
    for (sct, &t) in touched.iter().enumerate() {
        let r = sct * 512..(sct + 1) * 512;
        if ours[r.clone()] == durable[r.clone()] {
            continue;
        }
        assert!(t, "sector {sct} lost flushed data");
        let matches_unflushed = unflushed.iter().any(|op| match op {
            Op::Write(o, d) => {
                let o = *o as usize;
                o <= r.start && r.end <= o + d.len() && ours[r.clone()] == d[r.start - o..r.end - o]
            }
            Op::Zero(o, l) => {
                *o as usize <= r.start
                    && r.end <= (*o + *l) as usize
                    && ours[r.clone()].iter().all(|&b| b == 0)
            }
            Op::Flush => false,
        });
        assert!(matches_unflushed, "sector {sct} holds data nobody wrote");
    }
}

// ------------------------------------------------------------------------------------------
// 4. Differencing chains (digest 13 E)
// ------------------------------------------------------------------------------------------

/// The writes of digest 13 E.2 for a child with `block` byte blocks and `ss` byte sectors on
/// a `size` byte disk, then (second list) random sector-aligned ones.
fn chain_ops(block: u64, ss: u64, size: u64, seed: u64) -> (Vec<Op>, Vec<Op>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let fixed = vec![
        // Partial sectors inside one block: PARTIALLY_PRESENT + bitmap.
        Op::Write(block + 5 * ss, random_data(&mut rng, 3 * ss as usize)),
        // A whole block: FULLY_PRESENT.
        Op::Write(2 * block, random_data(&mut rng, block as usize)),
        // A few sectors of a block whose rest still comes from the parent.
        Op::Write(3 * block + 10 * ss, random_data(&mut rng, 2 * ss as usize)),
        // Sectors 7 and 8 of block 5: bits on both sides of a bitmap byte boundary.
        Op::Write(5 * block + 7 * ss, vec![0xE7; ss as usize]),
        Op::Write(5 * block + 8 * ss, vec![0xE8; ss as usize]),
        // A write across sectors 7-8 of block 6 and across the block 6/7 boundary.
        Op::Write(6 * block + 7 * ss, random_data(&mut rng, 2 * ss as usize)),
        Op::Write(7 * block - ss, random_data(&mut rng, 2 * ss as usize)),
        // The end of the last (partial) chunk.
        Op::Write(size - 2 * ss, random_data(&mut rng, 2 * ss as usize)),
        // Zeroing over parent data must read zeros, partly and for a whole block.
        Op::Zero(4 * block + ss, 4 * ss),
        Op::Zero(block * (size / block - 2), block),
        // Byte ranges that split sectors: the rest of each edge sector keeps the parent's data.
        Op::Write(1000, random_data(&mut rng, 100)),
        Op::Zero(3000, 700),
        Op::Flush,
    ];
    let random = random_ops(&mut rng, size, block, ss, 30);
    (fixed, random)
}

fn disk_id(path: &Path) -> (String, String) {
    let f = VhdxFile::open(path, OpenOptions::default()).unwrap();
    (
        f.virtual_disk_id().to_string(),
        f.data_write_guid().to_string(),
    )
}

/// Checks a child written with `chain_ops` and its parent.
fn check_child_structure(child: &Path, parent: &Path, parent_guids: &(String, String), block: u64) {
    let (pid, pdwg) = disk_id(parent);
    assert_eq!(&(pid.clone(), pdwg), parent_guids, "the parent changed");
    let (cid, _) = disk_id(child);
    assert_eq!(cid, pid, "child virtual disk id == parent's");
    let f = VhdxFile::open(child, OpenOptions::default()).unwrap();
    assert_eq!(f.kind(), DiskKind::Differencing);
    let g = f.geometry();
    assert_eq!(u64::from(g.block_size), block);
    assert!(f.bat_len() >= g.bat_entries(true));
    // Partial blocks are state 7, with the sector-bitmap entry of their chunk present (6).
    assert_eq!(f.block_entry(1).state(), 7);
    assert_eq!(f.entry(g.bitmap_index(0)).state(), 6);
    // Bits are LSB first: sectors 7 and 8 of block 5 are bit 7 of byte 0 and bit 0 of byte 1.
    let bits = f.block_bitmap(5).expect("block 5 is partial");
    assert_eq!(bits[0], 0x80, "sector 7");
    assert_eq!(bits[1] & 0x01, 0x01, "sector 8");
    let bits = f.block_bitmap(1).expect("block 1 is partial");
    assert_eq!(bits[0], 0xE0, "sectors 5-7");
    assert_eq!(bits[1], 0x00);
    let loc = f.parent_locator().unwrap();
    assert!(loc.get("parent_linkage").is_some());
    assert!(loc.get("relative_path").is_some());
}

fn run_child(child: &Path, ops: &[Op], oracle: &mut [u8]) {
    let chain = Chain::open(child, true).unwrap();
    assert_eq!(chain.layers().len(), 2);
    for op in ops {
        apply_chain(&chain, op);
        apply_oracle(oracle, op);
    }
    assert_same("chain before close", 0, &read_all(&chain), oracle);
    chain.close().unwrap();
    let chain = Chain::open(child, false).unwrap();
    assert_same("chain after reopen", 0, &read_all(&chain), oracle);
}

#[test]
fn differencing_chain_on_qemu_parent() {
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("p.vhdx");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vhdx",
            "-o",
            "block_size=1M",
            s(&parent),
            "16M",
        ],
    );
    ok(
        "qemu-io",
        &[
            "-f",
            "vhdx",
            "-c",
            "write -P 0x11 0 12M",
            "-c",
            "write -P 0x22 3M 512k",
            "-c",
            "write -z 8M 1M",
            "-c",
            "write -P 0x33 15M 4k",
            s(&parent),
        ],
    );
    let base = qemu_convert(&parent, &dir.path().join("base.raw"));
    let guids = disk_id(&parent);
    let size = 16 * MIB;

    for (i, block) in [2 * MIB, MIB].into_iter().enumerate() {
        let child = dir.path().join(format!("c{i}.avhdx"));
        vhdx::create_differencing(&child, &parent, Some(block as u32)).unwrap();
        let mut oracle = base.clone();
        let (fixed, random) = chain_ops(block, 512, size, 10 + i as u64);
        run_child(&child, &fixed, &mut oracle);
        check_child_structure(&child, &parent, &guids, block);
        run_child(&child, &random, &mut oracle);
        assert_eq!(disk_id(&parent), guids, "the parent changed");
        let report = vhdx::check(&child, false).unwrap();
        assert!(report.errors.is_empty(), "{:?}", report.errors);

        // E.3: the chain converted to raw equals the oracle for qemu-img too.
        let ours_raw = dir.path().join(format!("c{i}.raw"));
        let oracle_raw = dir.path().join(format!("o{i}.raw"));
        std::fs::write(&ours_raw, read_all(&Chain::open(&child, false).unwrap())).unwrap();
        std::fs::write(&oracle_raw, &oracle).unwrap();
        let out = ok(
            "qemu-img",
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "raw",
                s(&ours_raw),
                s(&oracle_raw),
            ],
        );
        assert!(out.contains("Images are identical."));

        // E.6: QEMU sees HasParent and refuses.
        let out = run("qemu-img", &["info", s(&child)]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("Operation not supported"), "{err}");
    }

    // E.5: a missing parent.
    let moved = dir.path().join("moved.vhdx");
    std::fs::rename(&parent, &moved).unwrap();
    let child = dir.path().join("c0.avhdx");
    match Chain::open(&child, false) {
        Err(Error::ParentNotFound { tried, .. }) => assert!(tried.contains("p.vhdx"), "{tried}"),
        other => panic!("expected ParentNotFound, got {other:?}"),
    }
    let report = vhdx::check(&child, false).unwrap();
    assert!(
        !report.errors.is_empty(),
        "check must report the missing parent"
    );
    std::fs::rename(&moved, &parent).unwrap();
    Chain::open(&child, false).unwrap();

    // E.5: writing to the parent changes its DataWriteGuid, which breaks the linkage.
    let p = Chain::open(&parent, true).unwrap();
    p.write_at(&[1; 512], 0).unwrap();
    p.close().unwrap();
    assert_ne!(disk_id(&parent).1, guids.1);
    match Chain::open(&child, false) {
        Err(Error::ParentLinkageMismatch { actual, .. }) => {
            assert_eq!(actual.to_string(), disk_id(&parent).1)
        }
        other => panic!("expected ParentLinkageMismatch, got {other:?}"),
    }
    let report = vhdx::check(&child, false).unwrap();
    assert!(
        !report.errors.is_empty(),
        "check must report the linkage mismatch"
    );
}

#[test]
fn differencing_chain_4k_sectors() {
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("p4k.vhdx");
    let size = 16 * MIB;
    vhdx::create(
        &parent,
        &CreateParams {
            virtual_size: size,
            kind: DiskKind::Dynamic,
            block_size: Some(1 << 20),
            logical_sector_size: 4096,
            physical_sector_size: 4096,
        },
    )
    .unwrap();
    let mut base = vec![0u8; size as usize];
    let mut rng = StdRng::seed_from_u64(99);
    let p = Chain::open(&parent, true).unwrap();
    for op in [
        Op::Write(0, vec![0x11; 12 << 20]),
        Op::Write(3 << 20, random_data(&mut rng, 512 << 10)),
        Op::Zero(8 << 20, 1 << 20),
        Op::Write(15 << 20, vec![0x33; 4096]),
    ] {
        apply_chain(&p, &op);
        apply_oracle(&mut base, &op);
    }
    p.close().unwrap();
    let guids = disk_id(&parent);
    for (i, block) in [2 * MIB, MIB].into_iter().enumerate() {
        let child = dir.path().join(format!("c4k{i}.avhdx"));
        vhdx::create_differencing(&child, &parent, Some(block as u32)).unwrap();
        assert_eq!(
            VhdxFile::open(&child, OpenOptions::default())
                .unwrap()
                .geometry()
                .logical_sector_size,
            4096
        );
        let mut oracle = base.clone();
        let (fixed, random) = chain_ops(block, 4096, size, 20 + i as u64);
        run_child(&child, &fixed, &mut oracle);
        check_child_structure(&child, &parent, &guids, block);
        run_child(&child, &random, &mut oracle);
        assert_eq!(disk_id(&parent), guids, "the parent changed");
    }
}

// ------------------------------------------------------------------------------------------
// 5. Merges on a three-level chain
// ------------------------------------------------------------------------------------------

struct ThreeLevel {
    base: PathBuf,
    mid: PathBuf,
    top: PathBuf,
    /// What the base, the mid chain and the full chain read.
    view_base: Vec<u8>,
    view_mid: Vec<u8>,
    view_top: Vec<u8>,
}

const MERGE_SIZE: u64 = 24 * MIB;

fn three_level(dir: &Path, qemu_base: bool, seed: u64) -> ThreeLevel {
    let base = dir.join("base.vhdx");
    let mid = dir.join("mid.avhdx");
    let top = dir.join("top.avhdx");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut view = vec![0u8; MERGE_SIZE as usize];
    if qemu_base {
        ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "vhdx",
                "-o",
                "block_size=1M",
                s(&base),
                "24M",
            ],
        );
        ok(
            "qemu-io",
            &[
                "-f",
                "vhdx",
                "-c",
                "write -P 0x41 0 10M",
                "-c",
                "write -P 0x42 14M 3M",
                "-c",
                "write -z 4M 1M",
                s(&base),
            ],
        );
        view = qemu_convert(&base, &dir.join("base.raw"));
    } else {
        vhdx::create(
            &base,
            &CreateParams {
                block_size: Some(4 << 20),
                ..CreateParams::dynamic(MERGE_SIZE)
            },
        )
        .unwrap();
        let c = Chain::open(&base, true).unwrap();
        for op in random_ops(&mut rng, MERGE_SIZE, 4 * MIB, 512, 25) {
            apply_chain(&c, &op);
            apply_oracle(&mut view, &op);
        }
        c.close().unwrap();
    }
    let view_base = view.clone();
    vhdx::create_differencing(&mid, &base, Some(1 << 20)).unwrap();
    let c = Chain::open(&mid, true).unwrap();
    for op in random_ops(&mut rng, MERGE_SIZE, MIB, 512, 30) {
        apply_chain(&c, &op);
        apply_oracle(&mut view, &op);
    }
    c.close().unwrap();
    let view_mid = view.clone();
    vhdx::create_differencing(&top, &mid, Some(2 << 20)).unwrap();
    let c = Chain::open(&top, true).unwrap();
    assert_eq!(c.layers().len(), 3);
    for op in random_ops(&mut rng, MERGE_SIZE, 2 * MIB, 512, 30) {
        apply_chain(&c, &op);
        apply_oracle(&mut view, &op);
    }
    assert_same("three-level chain", 0, &read_all(&c), &view);
    c.close().unwrap();
    ThreeLevel {
        base,
        mid,
        top,
        view_base,
        view_mid,
        view_top: view,
    }
}

#[track_caller]
fn assert_chain(path: &Path, layers: usize, expected: &[u8]) {
    let c = Chain::open(path, false).unwrap();
    assert_eq!(c.layers().len(), layers, "{}", path.display());
    assert_same(&path.display().to_string(), 0, &read_all(&c), expected);
}

/// The file is a standalone dynamic file that QEMU checks clean and reads as `expected`.
fn assert_standalone(dir: &Path, path: &Path, expected: &[u8]) {
    let f = VhdxFile::open(path, OpenOptions::default()).unwrap();
    assert_eq!(f.kind(), DiskKind::Dynamic);
    assert!(f.parent_locator().is_none());
    drop(f);
    assert_chain(path, 1, expected);
    let report = vhdx::check(path, false).unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let raw = dir.join("expected.raw");
    std::fs::write(&raw, expected).unwrap();
    qemu_check(path);
    qemu_compare_raw(path, &raw);
}

#[test]
fn merge_into_parent_then_into_child() {
    let dir = tempfile::tempdir().unwrap();
    let t = three_level(dir.path(), false, 501);
    let mut last = 0;
    let out = merge(&t.top, MergeDirection::IntoParent, &mut |done, total| {
        assert!(done >= last && done <= total);
        last = done;
    })
    .unwrap();
    assert_eq!(out.direction, MergeDirection::IntoParent);
    assert!(out.removed && !t.top.exists());
    assert_eq!(out.result, t.mid);
    assert_chain(&t.mid, 2, &t.view_top);
    assert_chain(&t.base, 1, &t.view_base);

    // Now the two-level chain mid -> base, merged upwards: mid becomes standalone.
    let out = merge(&t.mid, MergeDirection::IntoChild, &mut |_, _| {}).unwrap();
    assert_eq!(out.direction, MergeDirection::IntoChild);
    assert!(!out.removed && t.base.exists());
    assert_standalone(dir.path(), &t.mid, &t.view_top);
    assert_chain(&t.base, 1, &t.view_base);
}

#[test]
fn merge_into_child_then_into_parent_on_qemu_base() {
    let dir = tempfile::tempdir().unwrap();
    let t = three_level(dir.path(), true, 502);
    let out = merge(&t.top, MergeDirection::IntoChild, &mut |_, _| {}).unwrap();
    assert_eq!(out.merged_away, t.mid);
    // top now sits directly on base; mid is untouched and still reads its own view.
    assert_chain(&t.top, 2, &t.view_top);
    assert_chain(&t.mid, 2, &t.view_mid);
    let top = Chain::open(&t.top, false).unwrap();
    assert_eq!(
        std::fs::canonicalize(top.layers()[1].path()).unwrap(),
        std::fs::canonicalize(&t.base).unwrap()
    );
    drop(top);

    // top -> base merged upwards: top is standalone.
    merge(&t.top, MergeDirection::IntoChild, &mut |_, _| {}).unwrap();
    assert_standalone(dir.path(), &t.top, &t.view_top);

    // mid -> base merged downwards into the QEMU-made base, which QEMU then checks.
    let out = merge(&t.mid, MergeDirection::IntoParent, &mut |_, _| {}).unwrap();
    assert!(out.removed && !t.mid.exists());
    assert_standalone(dir.path(), &t.base, &t.view_mid);
    let _ = &t.view_base;
}
