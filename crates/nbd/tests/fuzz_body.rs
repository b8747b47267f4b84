//! The body of the `nbd` fuzz target (`fuzz/src/nbd_session.rs`) on stable Rust, over
//! client byte streams that reach every part of the server: the sessions of real clients
//! (`qemu-io`, `qemu-img`, `nbdinfo`), recorded on their way to a real server of the same
//! in-memory disk, hand-written sessions doing what real clients never do, and
//! deterministic mutations of all of them. Each stream is served by `nbd::serve_stream`
//! and every byte of the answer is checked against a model of the disk.
//!
//! `NBD_FUZZ_SEEDS=DIR cargo test -p nbd --test fuzz_body` also writes the streams into DIR
//! as the fuzzer's seeds (see `fuzz/README.md`).

#[path = "../../../fuzz/src/nbd_session.rs"]
mod nbd_session;

use nbd::proto::*;
use nbd_session::{EXPORT, Outcome, SIZE, session};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

/// What every client sent, one entry per connection, while `client` ran against a proxy
/// in front of a real server of the fuzz body's export.
fn record(dir: &Path, client: impl FnOnce(&str)) -> Vec<Vec<u8>> {
    let server_sock = dir.join("server.sock");
    let proxy_sock = dir.join("proxy.sock");
    let _ = std::fs::remove_file(&proxy_sock);
    let server = nbd::Server::bind(&server_sock, Arc::new(nbd_session::export())).unwrap();
    let stopper = server.stopper();
    let serving = std::thread::spawn(move || server.run().unwrap());
    let listener = UnixListener::bind(&proxy_sock).unwrap();
    let streams = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let proxy = {
        let streams = streams.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut conns = Vec::new();
            for c in listener.incoming() {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let mut client = c.unwrap();
                let mut upstream = UnixStream::connect(&server_sock).unwrap();
                let streams = streams.clone();
                conns.push(std::thread::spawn(move || {
                    let mut down = upstream.try_clone().unwrap();
                    let mut client_w = client.try_clone().unwrap();
                    let back = std::thread::spawn(move || {
                        let _ = std::io::copy(&mut down, &mut client_w);
                        let _ = client_w.shutdown(std::net::Shutdown::Write);
                    });
                    let mut sent = Vec::new();
                    let mut buf = vec![0u8; 1 << 16];
                    loop {
                        match client.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                sent.extend_from_slice(&buf[..n]);
                                if upstream.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = upstream.shutdown(std::net::Shutdown::Write);
                    let _ = back.join();
                    streams.lock().unwrap().push(sent);
                }));
            }
            for c in conns {
                c.join().unwrap();
            }
        })
    };
    client(&format!(
        "nbd+unix:///{EXPORT}?socket={}",
        proxy_sock.display()
    ));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = UnixStream::connect(&proxy_sock);
    proxy.join().unwrap();
    stopper.stop();
    serving.join().unwrap();
    std::mem::take(&mut *streams.lock().unwrap())
}

/// Runs a client and returns what it printed; it must succeed.
fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{cmd} {args:?}: {text}");
    text
}

/// Runs `qemu-io` commands on the export and returns what it printed (it may report
/// failed commands).
fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(uri);
    let out = Command::new("qemu-io").args(&args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// Sessions of real clients against the fuzz body's export.
fn real_sessions(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut add = |name: &str, streams: Vec<Vec<u8>>| {
        assert!(!streams.is_empty(), "{name} never connected");
        for (i, s) in streams.into_iter().enumerate() {
            out.push((format!("{name}-{i}"), s));
        }
    };
    add(
        "qemu-io",
        record(dir, |uri| {
            let text = qemu_io(
                uri,
                &[
                    "write -P 0x11 0 4k",
                    "read -P 0x11 0 4k",
                    "read 60k 8k",
                    "read -P 0 200k 16k",
                    "write -z 8k 8k",
                    "read -P 0 8k 8k",
                    "discard 16k 4k",
                    "aio_write -P 0x22 32k 4k",
                    "aio_write -P 0x23 36k 4k",
                    "aio_flush",
                    "write -P 0x33 100k 1k",
                    "read -P 0x33 100k 1k",
                    "read 0 252k",
                    "flush",
                ],
            );
            assert!(
                !text.contains("failed") && !text.contains("error"),
                "{text}"
            );
        }),
    );
    // The disk's injected failures reach the client as the errno of their kind.
    add(
        "qemu-io-errors",
        record(dir, |uri| {
            let text = qemu_io(uri, &["read 252k 4k", "write 252k 4k"]);
            assert!(text.contains("Input/output error"), "{text}");
            assert!(text.contains("No space left on device"), "{text}");
        }),
    );
    add(
        "qemu-img-map",
        record(dir, |uri| {
            let map = run("qemu-img", &["map", "-f", "raw", "--output=json", uri]);
            assert!(map.contains("\"data\": false"), "{map}");
        }),
    );
    add(
        "nbdinfo-map",
        record(dir, |uri| {
            let map = run("nbdinfo", &["--map", uri]);
            assert!(map.contains("hole,zero") && map.contains("data"), "{map}");
        }),
    );
    add(
        "nbdinfo-list",
        record(dir, |uri| {
            run("nbdinfo", &["--list", uri]);
        }),
    );
    out
}

/// Builds a client's byte stream.
struct Stream(Vec<u8>);

impl Stream {
    fn new(flags: u32) -> Stream {
        Stream(flags.to_be_bytes().to_vec())
    }
    fn option(mut self, opt: u32, data: &[u8]) -> Stream {
        self.0.extend_from_slice(&IHAVEOPT.to_be_bytes());
        self.0.extend_from_slice(&opt.to_be_bytes());
        self.0.extend_from_slice(&(data.len() as u32).to_be_bytes());
        self.0.extend_from_slice(data);
        self
    }
    fn structured(self) -> Stream {
        let mut ctx = 0u32.to_be_bytes().to_vec();
        ctx.extend_from_slice(&1u32.to_be_bytes());
        ctx.extend_from_slice(&15u32.to_be_bytes());
        ctx.extend_from_slice(b"base:allocation");
        self.option(OPT_STRUCTURED_REPLY, &[])
            .option(OPT_SET_META_CONTEXT, &ctx)
    }
    fn go(self) -> Stream {
        let mut go = (EXPORT.len() as u32).to_be_bytes().to_vec();
        go.extend_from_slice(EXPORT.as_bytes());
        go.extend_from_slice(&1u16.to_be_bytes());
        go.extend_from_slice(&INFO_NAME.to_be_bytes());
        self.option(OPT_GO, &go)
    }
    fn req(mut self, kind: u16, flags: u16, offset: u64, len: u32) -> Stream {
        self.0.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        self.0.extend_from_slice(&flags.to_be_bytes());
        self.0.extend_from_slice(&kind.to_be_bytes());
        self.0
            .extend_from_slice(&(0xc0de_0000 + self.0.len() as u64).to_be_bytes());
        self.0.extend_from_slice(&offset.to_be_bytes());
        self.0.extend_from_slice(&len.to_be_bytes());
        if kind == CMD_WRITE {
            self.0.extend((0..len).map(|i| (i * 31 + 7) as u8));
        }
        self
    }
    /// Requests of every kind: data, holes (long and short), both, the range's edges,
    /// "don't fragment", writes read back, zeroes, trims, block status, and the requests
    /// the server must refuse.
    fn requests(self) -> Stream {
        self.req(CMD_READ, 0, 0, 64 << 10)
            .req(CMD_READ, 0, 60 << 10, 16 << 10)
            .req(CMD_READ, CMD_FLAG_DF, 60 << 10, 16 << 10)
            .req(CMD_READ, 0, 63 << 10, 3 << 10)
            .req(CMD_READ, 0, 128 << 10, 64 << 10)
            .req(CMD_READ, CMD_FLAG_DF, 128 << 10, 4096)
            .req(CMD_READ, 0, 1000, 0)
            .req(CMD_READ, 0, 150_000, 1)
            .req(CMD_WRITE, CMD_FLAG_FUA, 70 << 10, 6000)
            .req(CMD_READ, 0, 68 << 10, 12 << 10)
            .req(CMD_WRITE_ZEROES, 0, 4096, 8192)
            .req(CMD_TRIM, 0, 70 << 10, 513)
            .req(CMD_READ, 0, 0, 96 << 10)
            .req(CMD_BLOCK_STATUS, 0, 0, SIZE as u32)
            .req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 60 << 10, 8192)
            .req(CMD_BLOCK_STATUS, 0, 0, 0)
            .req(CMD_FLUSH, 0, 0, 0)
            .req(CMD_CACHE, 0, 0, 4096)
            .req(CMD_READ, 0, SIZE - 512, 1024)
            .req(CMD_WRITE, 0, SIZE, 512)
            .req(CMD_READ, 1 << 9, 0, 512)
            .req(42, 0, 0, 512)
            .req(CMD_READ, 0, SIZE - 4096, 4096)
            .req(CMD_WRITE, 0, SIZE - 8192, 8192)
            .req(CMD_WRITE_ZEROES, 0, SIZE - 512, 512)
            .req(CMD_READ, 0, u64::MAX - 10, 100)
    }
}

/// Hand-written sessions.
fn written_sessions() -> Vec<(String, Vec<u8>)> {
    let both = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
    let mut list = vec![
        ("structured", Stream::new(both).structured().go().requests()),
        ("simple", Stream::new(both).go().requests()),
        (
            "export-name",
            Stream::new(FLAG_C_FIXED_NEWSTYLE)
                .option(OPT_LIST, &[])
                .option(OPT_EXPORT_NAME, EXPORT.as_bytes())
                .requests(),
        ),
        (
            "export-name-default",
            Stream::new(both)
                .option(OPT_STRUCTURED_REPLY, &[])
                .option(OPT_EXPORT_NAME, b"")
                .requests(),
        ),
        (
            "options",
            Stream::new(both)
                .option(OPT_STARTTLS, &[])
                .option(99, b"what")
                .option(OPT_LIST, b"x")
                .option(OPT_INFO, &[0, 0, 0, 5, b'o', b't', b'h', b'e', b'r', 0, 0])
                .option(OPT_INFO, &[0, 0, 0, 0, 0, 0])
                .option(OPT_INFO, &[0, 0, 0, 0, 0, 1])
                .option(OPT_LIST_META_CONTEXT, &[0, 0, 0, 0, 0, 0, 0, 0])
                .option(OPT_SET_META_CONTEXT, &[0, 0, 0, 0, 0, 0, 0, 0])
                .option(OPT_STRUCTURED_REPLY, &[1])
                .option(OPT_ABORT, &[]),
        ),
        (
            "unknown-export",
            Stream::new(both).option(OPT_EXPORT_NAME, b"nope"),
        ),
        ("bad-flags", Stream::new(1 << 7)),
        ("disconnect", {
            let mut s = Stream::new(both).structured().go();
            s = s.req(CMD_DISC, 0, 0, 0).req(CMD_READ, 0, 0, 512);
            s
        }),
        ("bad-magic", {
            let mut s = Stream::new(both).go().req(CMD_READ, 0, 0, 512);
            s.0.extend_from_slice(&[0u8; 28]);
            s.req(CMD_READ, 0, 0, 512)
        }),
        ("oversized-write", {
            let mut s = Stream::new(both).go();
            s.0.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            s.0.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1]);
            s.0.extend_from_slice(&0u64.to_be_bytes());
            s.0.extend_from_slice(&(MAX_PAYLOAD + 1).to_be_bytes());
            s
        }),
    ];
    list.push(("cut-write", {
        let mut s = Stream::new(both).go().req(CMD_WRITE, 0, 0, 4096);
        s.0.truncate(s.0.len() - 100);
        s
    }));
    list.into_iter().map(|(n, s)| (n.to_owned(), s.0)).collect()
}

/// Deterministic mutations of a stream: bytes changed in several ways at spread-out
/// positions (every position of the first 160 bytes, where negotiation and the first
/// request are), and the stream cut short there.
fn mutations(seed: &[u8]) -> Vec<Vec<u8>> {
    let mut positions: Vec<usize> = (0..seed.len().min(160)).collect();
    let step = (seed.len() / 100).max(1);
    positions.extend((160..seed.len()).step_by(step));
    let mut out = Vec::new();
    let changes: [fn(u8) -> u8; 4] = [|b| b ^ 0x01, |b| b ^ 0x80, |_| 0xff, |_| 0];
    for &p in &positions {
        for f in changes {
            let mut m = seed.to_vec();
            m[p] = f(m[p]);
            if m[p] != seed[p] {
                out.push(m);
            }
        }
        out.push(seed[..p].to_vec());
    }
    out
}

#[test]
fn real_clients_sessions_replayed_get_the_answers_the_model_predicts() {
    let dir = tempfile::tempdir().unwrap();
    let sessions = real_sessions(dir.path());
    let seeds = std::env::var_os("NBD_FUZZ_SEEDS");
    for (name, stream) in &sessions {
        let outcome = session(stream);
        // Every real client reached transmission (qemu and nbdinfo ask for structured
        // replies) except when only listing exports.
        if name.starts_with("nbdinfo-list") {
            assert!(
                matches!(outcome, Outcome::Negotiation { .. }),
                "{name}: {outcome:?}"
            );
        } else {
            assert!(
                matches!(
                    outcome,
                    Outcome::Transmission {
                        structured: true,
                        ..
                    }
                ),
                "{name}: {outcome:?}"
            );
        }
    }
    let written = written_sessions();
    for (name, stream) in &written {
        let outcome = session(stream);
        match name.as_str() {
            "structured" | "simple" | "export-name" | "export-name-default" => {
                assert!(
                    matches!(outcome, Outcome::Transmission { requests: 26, .. }),
                    "{name}: {outcome:?}"
                );
            }
            "options" => assert_eq!(outcome, Outcome::Negotiation { options: 10 }),
            _ => {}
        }
    }
    // Real clients' streams mutated: their option sequences (qemu asks for extended
    // headers first, for instance) are not in the hand-written ones.
    for (_, stream) in &sessions {
        for m in mutations(stream) {
            session(&m);
        }
    }
    if let Some(dir) = seeds {
        let dir = Path::new(&dir);
        std::fs::create_dir_all(dir).unwrap();
        for (name, stream) in sessions.iter().chain(&written) {
            std::fs::write(dir.join(format!("{name}.bin")), stream).unwrap();
        }
    }
}

#[test]
fn mutated_sessions_get_the_answers_the_model_predicts() {
    let mut runs = 0;
    for (_, seed) in written_sessions() {
        for m in mutations(&seed) {
            session(&m);
            runs += 1;
        }
    }
    assert!(runs > 5_000, "{runs} mutated sessions");
}
