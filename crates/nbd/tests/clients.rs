//! The NBD server against real clients (`qemu-io`, `qemu-img`, and `nbdinfo`/`nbdcopy`
//! when libnbd-bin is installed) and against a hand-written client that sends what real
//! clients never do: out-of-range requests, unknown commands, bad magic, many requests
//! in flight.

use disk::{Disk, VhdxDisk};
use nbd::proto::*;
use nbd::{Export, Server, Stopper};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::thread::JoinHandle;

const MIB: u64 = 1 << 20;

struct Running {
    socket: PathBuf,
    stopper: Stopper,
    thread: Option<JoinHandle<()>>,
    export: Arc<Export>,
}

impl Running {
    fn uri(&self) -> String {
        format!("nbd+unix:///disk0?socket={}", self.socket.display())
    }
    fn stop(mut self) {
        self.stopper.stop();
        self.thread.take().unwrap().join().unwrap();
    }
}

fn serve(disk: Arc<dyn Disk>, dir: &Path, read_only: bool) -> Running {
    let socket = dir.join("nbd.sock");
    let export = Arc::new(Export::new("disk0", disk, read_only));
    let server = Server::bind(&socket, export.clone()).unwrap();
    let stopper = server.stopper();
    let thread = std::thread::spawn(move || server.run().unwrap());
    Running {
        socket,
        stopper,
        thread: Some(thread),
        export,
    }
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn have(cmd: &str) -> bool {
    Command::new(cmd).arg("--version").output().is_ok()
}

/// A chain (base with data, child on top) as the served disk.
fn chain(dir: &Path) -> PathBuf {
    let base = dir.join("base.vhdx");
    let child = dir.join("child.avhdx");
    let params = vhdx::CreateParams {
        block_size: Some(MIB as u32),
        ..vhdx::CreateParams::dynamic(64 * MIB)
    };
    vhdx::create(&base, &params).unwrap();
    let d = VhdxDisk::open(&base, true).unwrap();
    d.write_at(&vec![0x5a; (3 * MIB) as usize], 5 * MIB)
        .unwrap();
    d.write_at(&vec![0x5b; (2 * MIB) as usize], 40 * MIB)
        .unwrap();
    d.close().unwrap();
    vhdx::create_differencing(&child, &base, None).unwrap();
    child
}

const QEMU_IO_SCRIPT: &[&str] = &[
    "write -P 0x11 0 1M",
    "write -P 0x22 6M 100k",
    "write -P 0x33 33M 5M",
    "write -z 40M 1M",
    "discard 5M 512k",
    "aio_write -P 0x44 50M 64k",
    "aio_write -P 0x45 51M 64k",
    "aio_flush",
    "write -P 0x55 63M 1M",
    "flush",
];

fn qemu_io(target: &[&str]) {
    let mut args: Vec<&str> = Vec::new();
    for c in QEMU_IO_SCRIPT {
        args.push("-c");
        args.push(c);
    }
    args.extend_from_slice(target);
    run("qemu-io", &args);
}

#[test]
fn qemu_io_and_qemu_img_see_the_chain_and_change_it_like_a_raw_file() {
    let dir = tempfile::tempdir().unwrap();
    let top = chain(dir.path());
    // The oracle: the same chain flattened to raw, then the same qemu-io script on it.
    let oracle = dir.path().join("oracle.raw");
    {
        let d = VhdxDisk::open(&top, false).unwrap();
        disk::convert(
            &d,
            &oracle,
            &disk::ConvertOptions {
                format: disk::OutputFormat::Raw,
                physical_sector_size: 4096,
            },
            &mut |_, _| {},
        )
        .unwrap();
    }
    qemu_io(&["-f", "raw", oracle.to_str().unwrap()]);

    let served: Arc<dyn Disk> = Arc::new(VhdxDisk::open(&top, true).unwrap());
    let s = serve(served, dir.path(), false);
    let info = run("qemu-img", &["info", &s.uri()]);
    assert!(info.contains("virtual size: 64 MiB"), "{info}");
    qemu_io(&["-f", "raw", &s.uri()]);
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &s.uri(),
            oracle.to_str().unwrap(),
        ],
    );
    let copy = dir.path().join("copy.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &s.uri(),
            copy.to_str().unwrap(),
        ],
    );
    assert!(std::fs::read(&copy).unwrap() == std::fs::read(&oracle).unwrap());
    // Block status: what qemu-img map reports as zero is zero in the oracle, and the
    // never-written tail of the base is reported as a hole.
    let map = run("qemu-img", &["map", "-f", "raw", "--output=json", &s.uri()]);
    assert!(map.contains("\"data\": false"), "{map}");
    let raw = std::fs::read(&oracle).unwrap();
    for line in map.lines() {
        if line.contains("\"zero\": true") {
            let num = |k: &str| -> usize {
                let at = line.find(k).unwrap() + k.len();
                line[at..]
                    .split([',', '}'])
                    .next()
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap()
            };
            let (start, len) = (num("\"start\":"), num("\"length\":"));
            assert!(raw[start..start + len].iter().all(|&b| b == 0), "{line}");
        }
    }
    if have("nbdinfo") {
        let m = run("nbdinfo", &["--map", &s.uri()]);
        assert!(m.contains("hole,zero") && m.contains("data"), "{m}");
        let c = dir.path().join("nbdcopy.raw");
        run("nbdcopy", &[&s.uri(), c.to_str().unwrap()]);
        assert!(std::fs::read(&c).unwrap() == raw);
    }
    s.stop();
    // After a clean stop, the chain read directly equals the oracle.
    let d = VhdxDisk::open(&top, false).unwrap();
    let mut buf = vec![0u8; raw.len()];
    d.read_at(&mut buf, 0).unwrap();
    assert!(buf == raw, "the chain differs from the oracle");
    let report = vhdx::check(&top, false).unwrap();
    assert!(
        report.errors.is_empty() && !report.needs_log_replay,
        "{:?}",
        report.errors
    );
}

#[test]
fn a_read_only_export_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let top = chain(dir.path());
    let s = serve(
        Arc::new(VhdxDisk::open(&top, false).unwrap()),
        dir.path(),
        true,
    );
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 4k", &s.uri()])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("Permission denied"), "{text}");
    // A client that writes anyway gets EPERM.
    let mut c = RawClient::connect(&s.socket, false);
    c.send(CMD_WRITE, 0, 9, 0, 512, &[1u8; 512]);
    assert_eq!(c.simple(0).0, EPERM);
    c.send(CMD_TRIM, 0, 10, 0, 512, &[]);
    assert_eq!(c.simple(0).0, EPERM);
    drop(c);
    run(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x5a 5M 3M", &s.uri()],
    );
    s.stop();
}

/// A minimal client for the tests below.
struct RawClient {
    s: UnixStream,
}

impl RawClient {
    fn connect(socket: &Path, structured: bool) -> RawClient {
        let mut s = UnixStream::connect(socket).unwrap();
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).unwrap();
        assert_eq!(&hello[0..8], b"NBDMAGIC");
        assert_eq!(
            u64::from_be_bytes(hello[8..16].try_into().unwrap()),
            IHAVEOPT
        );
        s.write_all(&3u32.to_be_bytes()).unwrap();
        let mut c = RawClient { s };
        if structured {
            c.option(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(c.option_reply().0, REP_ACK);
            let mut d = 0u32.to_be_bytes().to_vec();
            d.extend_from_slice(&1u32.to_be_bytes());
            d.extend_from_slice(&(15u32).to_be_bytes());
            d.extend_from_slice(b"base:allocation");
            c.option(OPT_SET_META_CONTEXT, &d);
            assert_eq!(c.option_reply().0, REP_META_CONTEXT);
            assert_eq!(c.option_reply().0, REP_ACK);
        }
        let mut go = 5u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"disk0");
        go.extend_from_slice(&0u16.to_be_bytes());
        c.option(OPT_GO, &go);
        loop {
            let (kind, _) = c.option_reply();
            if kind == REP_ACK {
                break;
            }
            assert_eq!(kind, REP_INFO);
        }
        c
    }
    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }
    fn option_reply(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(
            u64::from_be_bytes(h[0..8].try_into().unwrap()),
            OPT_REPLY_MAGIC
        );
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        self.s.read_exact(&mut d).unwrap();
        (kind, d)
    }
    fn send(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32, data: &[u8]) {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }
    /// Reads one simple reply: (error, cookie), plus `data_len` bytes on success.
    fn simple(&mut self, data_len: usize) -> (u32, u64, Vec<u8>) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(
            u32::from_be_bytes(h[0..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let mut d = vec![0u8; if err == 0 { data_len } else { 0 }];
        self.s.read_exact(&mut d).unwrap();
        (err, cookie, d)
    }
    /// Reads one structured chunk: (flags, type, cookie, payload).
    fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(
            u32::from_be_bytes(h[0..4].try_into().unwrap()),
            STRUCTURED_REPLY_MAGIC
        );
        let flags = u16::from_be_bytes(h[4..6].try_into().unwrap());
        let kind = u16::from_be_bytes(h[6..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        self.s.read_exact(&mut d).unwrap();
        (flags, kind, cookie, d)
    }
}

#[test]
fn bad_requests_get_errors_and_the_connection_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let top = chain(dir.path());
    let s = serve(
        Arc::new(VhdxDisk::open(&top, true).unwrap()),
        dir.path(),
        false,
    );
    let mut c = RawClient::connect(&s.socket, false);
    c.send(CMD_READ, 0, 1, 64 * MIB - 512, 1024, &[]);
    assert_eq!(c.simple(1024).0, EINVAL, "read past the end");
    c.send(CMD_WRITE, 0, 2, 64 * MIB, 512, &[0u8; 512]);
    assert_eq!(c.simple(0).0, ENOSPC, "write past the end");
    c.send(42, 0, 3, 0, 512, &[]);
    assert_eq!(c.simple(0).0, EINVAL, "unknown command");
    c.send(CMD_READ, 1 << 12, 4, 0, 512, &[]);
    assert_eq!(c.simple(512).0, EINVAL, "unknown flag");
    c.send(CMD_BLOCK_STATUS, 0, 5, 0, 512, &[]);
    assert_eq!(c.simple(0).0, EINVAL, "block status without a context");
    // Still serving.
    c.send(CMD_READ, 0, 6, 5 * MIB, 4096, &[]);
    let (err, cookie, data) = c.simple(4096);
    assert_eq!((err, cookie), (0, 6));
    assert!(data.iter().all(|&b| b == 0x5a));
    // A bad magic ends the connection; the server keeps accepting others.
    c.s.write_all(&[0u8; 28]).unwrap();
    let mut rest = Vec::new();
    let _ = c.s.read_to_end(&mut rest);
    assert!(rest.is_empty());
    let mut c2 = RawClient::connect(&s.socket, true);
    c2.send(CMD_READ, 0, 7, 64 * MIB, 1, &[]);
    let (flags, kind, cookie, payload) = c2.chunk();
    assert_eq!(
        (flags & REPLY_FLAG_DONE, kind, cookie),
        (1, REPLY_TYPE_ERROR, 7)
    );
    assert_eq!(
        u32::from_be_bytes(payload[0..4].try_into().unwrap()),
        EINVAL
    );
    c2.send(CMD_BLOCK_STATUS, 0, 8, 0, (64 * MIB) as u32, &[]);
    let (_, kind, _, payload) = c2.chunk();
    assert_eq!(kind, REPLY_TYPE_BLOCK_STATUS);
    let descriptors: Vec<(u32, u32)> = payload[4..]
        .chunks(8)
        .map(|d| {
            (
                u32::from_be_bytes(d[0..4].try_into().unwrap()),
                u32::from_be_bytes(d[4..8].try_into().unwrap()),
            )
        })
        .collect();
    assert_eq!(
        descriptors.iter().map(|d| u64::from(d.0)).sum::<u64>(),
        64 * MIB
    );
    assert!(descriptors.iter().any(|d| d.1 == STATE_HOLE | STATE_ZERO));
    s.stop();
}

#[test]
fn many_requests_in_flight_are_all_answered() {
    let dir = tempfile::tempdir().unwrap();
    let top = chain(dir.path());
    let s = serve(
        Arc::new(VhdxDisk::open(&top, true).unwrap()),
        dir.path(),
        false,
    );
    let mut c = RawClient::connect(&s.socket, false);
    // 200 writes of distinct patterns, sent before any reply is read.
    for i in 0..200u64 {
        c.send(
            CMD_WRITE,
            0,
            1000 + i,
            i * 65536,
            4096,
            &[(i % 251) as u8 + 1; 4096],
        );
    }
    c.send(CMD_FLUSH, 0, 5000, 0, 0, &[]);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..201 {
        let (err, cookie, _) = c.simple(0);
        assert_eq!(err, 0);
        seen.insert(cookie);
    }
    assert_eq!(seen.len(), 201);
    for i in (0..200u64).step_by(37) {
        c.send(CMD_READ, 0, i, i * 65536, 4096, &[]);
        let (_, _, d) = c.simple(4096);
        assert!(d.iter().all(|&b| b == (i % 251) as u8 + 1));
    }
    // 200 reads in flight, served by the workers: every reply comes once, whole, with
    // its own data.
    for i in 0..200u64 {
        c.send(CMD_READ, 0, 7000 + i, i * 65536, 4096, &[]);
    }
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..200 {
        let (err, cookie, d) = c.simple(4096);
        assert_eq!(err, 0);
        let i = cookie - 7000;
        assert!(d.iter().all(|&b| b == (i % 251) as u8 + 1), "read {i}");
        assert!(seen.insert(cookie));
    }
    if have("qemu-img") {
        run(
            "qemu-img",
            &[
                "bench",
                "-f",
                "raw",
                "-c",
                "2000",
                "-d",
                "16",
                "-s",
                "4k",
                "-w",
                &s.uri(),
            ],
        );
    }
    s.stop();
}

#[test]
fn the_disk_can_be_swapped_under_a_connected_client() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.vhdx");
    let b = dir.path().join("b.vhdx");
    for (p, byte) in [(&a, 0xaa), (&b, 0xbb)] {
        vhdx::create(p, &vhdx::CreateParams::dynamic(8 * MIB)).unwrap();
        let d = VhdxDisk::open(p, true).unwrap();
        d.write_at(&[byte; 4096], 0).unwrap();
        d.close().unwrap();
    }
    let s = serve(
        Arc::new(VhdxDisk::open(&a, true).unwrap()),
        dir.path(),
        false,
    );
    let mut c = RawClient::connect(&s.socket, false);
    c.send(CMD_READ, 0, 1, 0, 4096, &[]);
    assert!(c.simple(4096).2.iter().all(|&x| x == 0xaa));
    let old = s
        .export
        .swap(Arc::new(VhdxDisk::open(&b, true).unwrap()))
        .unwrap();
    drop(old);
    c.send(CMD_READ, 0, 2, 0, 4096, &[]);
    assert!(
        c.simple(4096).2.iter().all(|&x| x == 0xbb),
        "reads come from the new disk"
    );
    let small = dir.path().join("small.vhdx");
    vhdx::create(&small, &vhdx::CreateParams::dynamic(MIB)).unwrap();
    assert!(
        s.export
            .swap(Arc::new(VhdxDisk::open(&small, true).unwrap()))
            .is_err()
    );
    s.stop();
}

#[test]
fn a_live_socket_is_refused_and_a_stale_one_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let top = chain(dir.path());
    let d: Arc<dyn Disk> = Arc::new(VhdxDisk::open(&top, false).unwrap());
    let s = serve(d.clone(), dir.path(), true);
    let e = Server::bind(&s.socket, Arc::new(Export::new("x", d.clone(), true))).unwrap_err();
    assert!(e.to_string().contains("in use by another server"), "{e}");
    s.stop();
    // A socket file nobody listens on.
    let _l = std::os::unix::net::UnixListener::bind(dir.path().join("nbd.sock")).unwrap();
    drop(_l);
    let s = serve(d, dir.path(), true);
    run("qemu-img", &["info", &s.uri()]);
    s.stop();
}

/// The test chain with two small writes into the child, 1 KiB apart: a hole shorter than a
/// page between two runs of data.
fn chain_with_small_hole(dir: &Path) -> PathBuf {
    let top = chain(dir);
    let d = VhdxDisk::open(&top, true).unwrap();
    d.write_at(&[0x77; 4096], 20 * MIB).unwrap();
    d.write_at(&[0x77; 4096], 20 * MIB + 5120).unwrap();
    d.close().unwrap();
    top
}

/// The chain flattened into a raw file: what every client must read.
fn oracle(top: &Path, dir: &Path) -> (PathBuf, Vec<u8>) {
    let path = dir.join("oracle.raw");
    let d = VhdxDisk::open(top, false).unwrap();
    disk::convert(
        &d,
        &path,
        &disk::ConvertOptions {
            format: disk::OutputFormat::Raw,
            physical_sector_size: 4096,
        },
        &mut |_, _| {},
    )
    .unwrap();
    let bytes = std::fs::read(&path).unwrap();
    (path, bytes)
}

/// A content chunk: type, offset, length, data (empty for a hole).
type Chunk = (u16, u64, u64, Vec<u8>);

/// The next structured read reply (the server writes each reply whole): its cookie and
/// its content chunks in the order sent, (type, offset, length, data), checking that only
/// the last one is marked done.
fn read_chunks(c: &mut RawClient) -> (u64, Vec<Chunk>) {
    let mut out = Vec::new();
    let mut cookie = None;
    loop {
        let (flags, kind, got, payload) = c.chunk();
        assert_eq!(
            *cookie.get_or_insert(got),
            got,
            "chunks of two replies interleave"
        );
        match kind {
            REPLY_TYPE_OFFSET_DATA => {
                let off = u64::from_be_bytes(payload[0..8].try_into().unwrap());
                out.push((kind, off, payload.len() as u64 - 8, payload[8..].to_vec()));
            }
            REPLY_TYPE_OFFSET_HOLE => {
                assert_eq!(payload.len(), 12);
                let off = u64::from_be_bytes(payload[0..8].try_into().unwrap());
                let len = u32::from_be_bytes(payload[8..12].try_into().unwrap());
                out.push((kind, off, u64::from(len), Vec::new()));
            }
            other => panic!("chunk type {other} in a read reply"),
        }
        if flags & REPLY_FLAG_DONE != 0 {
            return (got, out);
        }
    }
}

/// Sends reads of data, several in flight, so that every buffer the server keeps for
/// reuse holds data afterwards: a later read that leaked a reused buffer's old bytes in
/// place of zeros would show them.
fn dirty_buffers(c: &mut RawClient, structured: bool) {
    for i in 0..12 {
        c.send(CMD_READ, 0, 900 + i, 5 * MIB + i * 65536, 65536, &[]);
    }
    for _ in 0..12 {
        if structured {
            let (_, chunks) = read_chunks(c);
            assert!(chunks.iter().all(|x| x.3.iter().all(|&b| b == 0x5a)));
        } else {
            let (err, _, d) = c.simple(65536);
            assert_eq!(err, 0);
            assert!(d.iter().all(|&b| b == 0x5a));
        }
    }
}

#[test]
fn holes_go_out_as_hole_chunks_and_read_as_zeros_with_or_without_structured_replies() {
    let dir = tempfile::tempdir().unwrap();
    let top = chain_with_small_hole(dir.path());
    let s = serve(
        Arc::new(VhdxDisk::open(&top, false).unwrap()),
        dir.path(),
        true,
    );
    let mut c = RawClient::connect(&s.socket, true);
    // Hole, data, hole: three chunks, the holes without their bytes.
    c.send(CMD_READ, 0, 1, 4 * MIB, (5 * MIB) as u32, &[]);
    let (cookie, chunks) = read_chunks(&mut c);
    assert_eq!(cookie, 1);
    let shape: Vec<(u16, u64, u64)> = chunks.iter().map(|x| (x.0, x.1, x.2)).collect();
    assert_eq!(
        shape,
        [
            (REPLY_TYPE_OFFSET_HOLE, 4 * MIB, MIB),
            (REPLY_TYPE_OFFSET_DATA, 5 * MIB, 3 * MIB),
            (REPLY_TYPE_OFFSET_HOLE, 8 * MIB, MIB),
        ]
    );
    assert!(chunks[1].3.iter().all(|&b| b == 0x5a));
    // All hole: one hole chunk, done.
    c.send(CMD_READ, 0, 2, 10 * MIB, 4096, &[]);
    let (cookie, chunks) = read_chunks(&mut c);
    assert_eq!(cookie, 2);
    assert_eq!(
        chunks,
        [(REPLY_TYPE_OFFSET_HOLE, 10 * MIB, 4096, Vec::new())]
    );
    // "Don't fragment": one data chunk with the zeros in it, from a reused buffer.
    dirty_buffers(&mut c, true);
    c.send(CMD_READ, CMD_FLAG_DF, 3, 8 * MIB - 32768, 65536, &[]);
    let (cookie, chunks) = read_chunks(&mut c);
    assert_eq!(cookie, 3);
    assert_eq!(chunks.len(), 1);
    let (kind, off, len, data) = &chunks[0];
    assert_eq!(
        (*kind, *off, *len),
        (REPLY_TYPE_OFFSET_DATA, 8 * MIB - 32768, 65536)
    );
    assert!(data[..32768].iter().all(|&b| b == 0x5a));
    assert!(data[32768..].iter().all(|&b| b == 0));
    // A 1 KiB hole between two runs of data goes out as zeros inside one data chunk.
    dirty_buffers(&mut c, true);
    c.send(CMD_READ, 0, 4, 20 * MIB, 9216, &[]);
    let (cookie, chunks) = read_chunks(&mut c);
    assert_eq!(cookie, 4);
    assert_eq!(chunks.len(), 1);
    let data = &chunks[0].3;
    assert_eq!(
        (chunks[0].0, chunks[0].1),
        (REPLY_TYPE_OFFSET_DATA, 20 * MIB)
    );
    assert!(data[..4096].iter().all(|&b| b == 0x77));
    assert!(data[4096..5120].iter().all(|&b| b == 0));
    assert!(data[5120..].iter().all(|&b| b == 0x77));
    drop(c);

    // A client without structured replies gets every byte, zeros included, from reused
    // buffers too.
    let (_, raw) = oracle(&top, dir.path());
    let mut c = RawClient::connect(&s.socket, false);
    for (off, len) in [
        (10 * MIB, 65536),
        (4 * MIB, 2 * MIB),
        (20 * MIB, 9216),
        (39 * MIB, 4096 * 3),
    ] {
        dirty_buffers(&mut c, false);
        c.send(CMD_READ, 0, 7, off, len as u32, &[]);
        let (err, _, d) = c.simple(len as usize);
        assert_eq!(err, 0);
        assert!(d == raw[off as usize..(off + len) as usize], "{off}+{len}");
    }
    drop(c);
    s.stop();
}

#[test]
fn real_clients_read_holes_and_data_over_structured_replies() {
    let dir = tempfile::tempdir().unwrap();
    let top = chain_with_small_hole(dir.path());
    let (oracle_path, raw) = oracle(&top, dir.path());
    let s = serve(
        Arc::new(VhdxDisk::open(&top, false).unwrap()),
        dir.path(),
        true,
    );
    // qemu-io checks each read against the pattern it should hold: holes of every request
    // size, data, the short hole between data, and reads across both.
    let mut args = vec!["-r", "-f", "raw"];
    let cmds = [
        "read -P 0 10M 4k",
        "read -P 0 10M 64k",
        "read -P 0 10M 1M",
        "read -P 0x5a 5M 3M",
        "read -P 0 4M 1M",
        "read -P 0x77 20M 4k",
        "read -P 0 20484k 1k",
        "read -P 0x77 20485k 4k",
        "readv -P 0 8M 64k 64k",
        "aio_read -P 0 30M 1M",
        "aio_read -P 0x5b 40M 1M",
        "aio_flush",
    ];
    for c in &cmds {
        args.extend(["-c", c]);
    }
    let uri = s.uri();
    args.push(&uri);
    let out = run("qemu-io", &args);
    assert!(
        !out.contains("failed") && out.matches("read ").count() >= cmds.len() - 1,
        "{out}"
    );
    // Whole-disk readers: qemu-img compare and nbdcopy read holes and data in large
    // requests, several in flight.
    let cmp = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &s.uri(),
            oracle_path.to_str().unwrap(),
        ],
    );
    assert!(cmp.contains("Images are identical"), "{cmp}");
    let copy = dir.path().join("nbdcopy.raw");
    run("nbdcopy", &[&s.uri(), copy.to_str().unwrap()]);
    assert!(std::fs::read(&copy).unwrap() == raw);
    // nbdinfo's map: the written ranges are data, the rest holes that read as zeros.
    let map = run("nbdinfo", &["--map", &s.uri()]);
    let mut data = 0u64;
    for line in map.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (start, len): (u64, u64) = (f[0].parse().unwrap(), f[1].parse().unwrap());
        if line.contains("hole") {
            assert!(
                raw[start as usize..(start + len) as usize]
                    .iter()
                    .all(|&b| b == 0)
            );
        } else {
            data += len;
        }
    }
    assert!((5 * MIB..64 * MIB).contains(&data), "{map}");
    s.stop();
}

/// A disk whose reads and writes fail with a chosen error.
struct Failing {
    size: u64,
    error: fn() -> disk::Error,
}

impl Disk for Failing {
    fn size(&self) -> u64 {
        self.size
    }
    fn sector_size(&self) -> u32 {
        512
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn read_at(&self, _: &mut [u8], _: u64) -> disk::Result<()> {
        Err((self.error)())
    }
    fn write_at(&self, _: &[u8], _: u64) -> disk::Result<()> {
        Err((self.error)())
    }
    fn write_zeroes(&self, _: u64, _: u64) -> disk::Result<()> {
        Err((self.error)())
    }
    fn flush(&self) -> disk::Result<()> {
        Ok(())
    }
}

#[test]
fn disk_failures_reach_clients_as_the_errno_of_their_kind() {
    let dir = tempfile::tempdir().unwrap();
    // Each error, the errno it must go out as, and what qemu-io then says.
    type Case = (fn() -> disk::Error, u32, &'static str);
    let cases: [Case; 9] = [
        (
            || disk::Error::Io {
                path: PathBuf::from("/disk"),
                source: std::io::Error::from_raw_os_error(28),
            },
            ENOSPC,
            "No space left on device",
        ),
        (
            || {
                disk::Error::Vhdx(vhdx::Error::Io {
                    path: PathBuf::from("/disk"),
                    source: std::io::ErrorKind::StorageFull.into(),
                })
            },
            ENOSPC,
            "No space left on device",
        ),
        (
            || disk::Error::ReadOnly {
                path: PathBuf::from("/disk"),
            },
            EPERM,
            "Operation not permitted",
        ),
        (
            || disk::Error::Io {
                path: PathBuf::from("/disk"),
                source: std::io::ErrorKind::PermissionDenied.into(),
            },
            EPERM,
            "Operation not permitted",
        ),
        (
            || disk::Error::OutOfRange {
                offset: 0,
                len: 1,
                size: 0,
            },
            EINVAL,
            "Invalid argument",
        ),
        (
            || {
                disk::Error::Vhdx(vhdx::Error::Unsupported {
                    path: PathBuf::from("/disk"),
                    reason: "no".into(),
                })
            },
            ENOTSUP,
            "Operation not supported",
        ),
        (
            || {
                disk::Error::Vhdx(vhdx::Error::Poisoned {
                    path: PathBuf::from("/disk"),
                })
            },
            EIO,
            "Input/output error",
        ),
        (
            || {
                disk::Error::Vhdx(vhdx::Error::Locked {
                    path: PathBuf::from("/disk"),
                })
            },
            EIO,
            "Input/output error",
        ),
        (
            || disk::Error::Io {
                path: PathBuf::from("/disk"),
                source: std::io::Error::other("a device failure"),
            },
            EIO,
            "Input/output error",
        ),
    ];
    for (error, errno, text) in cases {
        let s = serve(
            Arc::new(Failing {
                size: 8 * MIB,
                error,
            }),
            dir.path(),
            false,
        );
        let mut c = RawClient::connect(&s.socket, false);
        c.send(CMD_WRITE, 0, 1, 0, 512, &[1u8; 512]);
        assert_eq!(c.simple(0).0, errno, "{}", error());
        c.send(CMD_READ, 0, 2, 0, 512, &[]);
        assert_eq!(c.simple(512).0, errno, "{}", error());
        drop(c);
        let mut c = RawClient::connect(&s.socket, true);
        c.send(CMD_WRITE_ZEROES, 0, 3, 0, 512, &[]);
        let (_, kind, _, payload) = c.chunk();
        assert_eq!(kind, REPLY_TYPE_ERROR);
        assert_eq!(u32::from_be_bytes(payload[0..4].try_into().unwrap()), errno);
        drop(c);
        let out = Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write 0 4k", &s.uri()])
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(said.contains(text), "{}: {said}", error());
        s.stop();
    }
}

#[test]
fn a_client_that_ends_negotiation_sees_the_connection_closed() {
    let dir = tempfile::tempdir().unwrap();
    let top = chain(dir.path());
    let s = serve(
        Arc::new(VhdxDisk::open(&top, false).unwrap()),
        dir.path(),
        true,
    );
    let mut s1 = UnixStream::connect(&s.socket).unwrap();
    s1.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut hello = [0u8; 18];
    s1.read_exact(&mut hello).unwrap();
    s1.write_all(&3u32.to_be_bytes()).unwrap();
    let mut abort = IHAVEOPT.to_be_bytes().to_vec();
    abort.extend_from_slice(&OPT_ABORT.to_be_bytes());
    abort.extend_from_slice(&0u32.to_be_bytes());
    s1.write_all(&abort).unwrap();
    let mut rest = Vec::new();
    s1.read_to_end(&mut rest)
        .expect("the server closes the connection after NBD_OPT_ABORT");
    assert_eq!(rest.len(), 20, "one acknowledgement, then the end");
    s.stop();
}
