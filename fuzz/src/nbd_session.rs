//! The body of the `nbd` fuzz target: a client's byte stream, whatever it holds, served by
//! [`nbd::serve_stream`] over an in-memory disk, with every byte the server sends checked.
//!
//! `fuzz/fuzz_targets/nbd.rs` and `crates/nbd/tests/fuzz_body.rs` (which runs it on stable
//! Rust over the sessions of real clients and their mutations) include this file as a
//! module (`#[path]`), so it stays a plain module: no crate attributes, no dependencies
//! besides `nbd`, `disk` and `std`.
//!
//! The oracle reads the input as the server must and the server's output as a client
//! would, in lockstep (the sequential server answers each request before reading the
//! next), and panics on the first thing that is wrong:
//! - negotiation: the greeting; for each option, replies echoing it and ending with one
//!   final reply (an acknowledgement or an error); the export's size wherever it is sent;
//!   nothing more after `NBD_OPT_ABORT`, an unknown export name, unknown client flags, a
//!   bad magic or an over-long option;
//! - transmission: one reply per request, carrying its cookie, simple or structured as
//!   negotiated; a request the server must accept succeeds, one it must refuse fails, and
//!   the disk's injected failures come back with the errno of their kind; a read returns
//!   exactly what a model of the disk holds, in content chunks that cover the range
//!   without overlap (a single one under "don't fragment"), holes only where the model
//!   holds zeros; block status descriptors fit the range and call nothing a hole that
//!   holds data; nothing after a request that breaks framing or `NBD_CMD_DISC`;
//! - no byte after the last reply.

use disk::{Disk, Extent};
use nbd::proto::*;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Size of the in-memory disk.
pub const SIZE: u64 = 256 << 10;
/// The export's name (clients may also ask for the empty name).
pub const EXPORT: &str = "disk0";
const SECTOR: u64 = 512;
/// Reads that touch this range fail with an I/O error; writes, zeroes and trims with "no
/// space".
const BAD_START: u64 = SIZE - 4096;
const KNOWN_FLAGS: u16 =
    CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO;

/// What the disk holds at first: sectors of data (including one of zeros) among holes.
fn initial() -> (Vec<u8>, Vec<bool>) {
    let mut bytes = vec![0u8; SIZE as usize];
    let mut mapped = vec![false; (SIZE / SECTOR) as usize];
    for s in (0..128).chain(130..131).chain(136..160).chain(300..302) {
        mapped[s] = true;
        for (i, b) in bytes[s * 512..(s + 1) * 512].iter_mut().enumerate() {
            *b = if s == 140 {
                0
            } else {
                (s * 7 + i * 13 + 1) as u8
            };
        }
    }
    (bytes, mapped)
}

/// An in-memory disk that reports unwritten sectors as holes and, as the trait allows,
/// leaves them untouched in `read_sparse`'s buffer, so that a server sending stale buffer
/// bytes in place of zeros is caught.
pub struct MemDisk {
    state: Mutex<(Vec<u8>, Vec<bool>)>,
}

impl MemDisk {
    /// The disk in its initial state.
    pub fn new() -> MemDisk {
        MemDisk {
            state: Mutex::new(initial()),
        }
    }

    fn check(&self, offset: u64, len: u64, write: bool) -> disk::Result<()> {
        if offset.checked_add(len).is_none_or(|e| e > SIZE) {
            return Err(disk::Error::OutOfRange {
                offset,
                len,
                size: SIZE,
            });
        }
        if len > 0 && offset + len > BAD_START {
            let source = if write {
                std::io::Error::from(std::io::ErrorKind::StorageFull)
            } else {
                std::io::Error::other("injected read failure")
            };
            return Err(disk::Error::Io {
                path: PathBuf::from("mem"),
                source,
            });
        }
        Ok(())
    }

    fn extents(mapped: &[bool], offset: u64, len: u64) -> Vec<Extent> {
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < offset + len {
            let s = pos / SECTOR;
            let n = ((s + 1) * SECTOR).min(offset + len) - pos;
            let x = if mapped[s as usize] {
                Extent::Data(n)
            } else {
                Extent::Zero(n)
            };
            match (out.last_mut(), x) {
                (Some(Extent::Data(l)), Extent::Data(m))
                | (Some(Extent::Zero(l)), Extent::Zero(m)) => *l += m,
                _ => out.push(x),
            }
            pos += n;
        }
        out
    }
}

impl Default for MemDisk {
    fn default() -> MemDisk {
        MemDisk::new()
    }
}

impl Disk for MemDisk {
    fn size(&self) -> u64 {
        SIZE
    }
    fn sector_size(&self) -> u32 {
        SECTOR as u32
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> disk::Result<()> {
        self.check(offset, buf.len() as u64, false)?;
        let st = self.state.lock().unwrap();
        buf.copy_from_slice(&st.0[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn read_sparse(&self, buf: &mut [u8], offset: u64) -> disk::Result<Vec<Extent>> {
        self.check(offset, buf.len() as u64, false)?;
        let st = self.state.lock().unwrap();
        let extents = MemDisk::extents(&st.1, offset, buf.len() as u64);
        let mut at = 0usize;
        for x in &extents {
            let n = x.len() as usize;
            if let Extent::Data(_) = x {
                let from = offset as usize + at;
                buf[at..at + n].copy_from_slice(&st.0[from..from + n]);
            }
            at += n;
        }
        Ok(extents)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> disk::Result<()> {
        self.check(offset, buf.len() as u64, true)?;
        let mut st = self.state.lock().unwrap();
        st.0[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        if !buf.is_empty() {
            let last = (offset + buf.len() as u64 - 1) / SECTOR;
            for s in offset / SECTOR..=last {
                st.1[s as usize] = true;
            }
        }
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> disk::Result<()> {
        self.check(offset, len, true)?;
        let mut st = self.state.lock().unwrap();
        st.0[offset as usize..(offset + len) as usize].fill(0);
        // Whole sectors become holes; partly zeroed ones stay data.
        for s in offset.div_ceil(SECTOR)..(offset + len) / SECTOR {
            st.1[s as usize] = false;
        }
        Ok(())
    }
    fn flush(&self) -> disk::Result<()> {
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> disk::Result<Vec<Extent>> {
        if offset.checked_add(len).is_none_or(|e| e > SIZE) {
            return Err(disk::Error::OutOfRange {
                offset,
                len,
                size: SIZE,
            });
        }
        Ok(MemDisk::extents(&self.state.lock().unwrap().1, offset, len))
    }
}

/// The export the fuzz target serves: a fresh [`MemDisk`], writable, named [`EXPORT`].
pub fn export() -> nbd::Export {
    nbd::Export::new(EXPORT, Arc::new(MemDisk::new()), false)
}

/// How far a session got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It ended during negotiation.
    Negotiation {
        /// Options answered.
        options: usize,
    },
    /// It reached transmission.
    Transmission {
        /// Whether structured replies were negotiated.
        structured: bool,
        /// Requests answered.
        requests: usize,
    },
}

/// Serves `input` as a client's whole byte stream and checks what the server sent; see
/// the module documentation. Panics when the server's output is wrong.
pub fn session(input: &[u8]) -> Outcome {
    let export = export();
    let mut output = Vec::new();
    // Errors are allowed (a request that breaks framing, input ending mid-payload); what
    // was sent before them is checked below all the same.
    let _ = nbd::serve_stream(input, &mut output, &export);
    check(input, &output)
}

/// A cursor over bytes; `None` when they run out.
struct Bytes<'a>(&'a [u8]);

impl<'a> Bytes<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (h, t) = self.0.split_at_checked(n)?;
        self.0 = t;
        Some(h)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
}

/// The server's output, read as a client: running out of it in the middle of something
/// the server owes is a failure.
struct Server<'a>(Bytes<'a>);

impl Server<'_> {
    fn bytes(&mut self, n: usize, what: &str) -> &[u8] {
        match self.0.take(n) {
            Some(b) => b,
            None => panic!("the server's output ends inside {what}"),
        }
    }
    fn u16(&mut self, what: &str) -> u16 {
        u16::from_be_bytes(self.bytes(2, what).try_into().unwrap())
    }
    fn u32(&mut self, what: &str) -> u32 {
        u32::from_be_bytes(self.bytes(4, what).try_into().unwrap())
    }
    fn u64(&mut self, what: &str) -> u64 {
        u64::from_be_bytes(self.bytes(8, what).try_into().unwrap())
    }
    fn end(&self, after: &str) {
        assert!(
            self.0.0.is_empty(),
            "the server sent {} bytes after {after}",
            self.0.0.len()
        );
    }
}

fn is_zero(b: &[u8]) -> bool {
    // Compared a page at a time, so that an unoptimised build stays fast.
    const ZERO: [u8; 4096] = [0; 4096];
    b.chunks(4096).all(|c| c == &ZERO[..c.len()])
}

fn is_final(kind: u32) -> bool {
    kind == REP_ACK || kind & 0x8000_0000 != 0
}

/// Checks `output` against `input`; see the module documentation.
pub fn check(input: &[u8], output: &[u8]) -> Outcome {
    let mut c = Bytes(input);
    let mut s = Server(Bytes(output));
    assert_eq!(s.u64("the greeting"), NBD_MAGIC, "greeting magic");
    assert_eq!(s.u64("the greeting"), IHAVEOPT, "greeting: newstyle");
    assert_eq!(
        s.u16("the greeting"),
        FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
        "handshake flags"
    );
    let mut options = 0;
    let ended = |s: &Server<'_>, options: usize, after: &str| {
        s.end(after);
        Outcome::Negotiation { options }
    };
    let Some(client_flags) = c.u32() else {
        return ended(&s, 0, "the greeting, with no client flags to read");
    };
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return ended(&s, 0, "unknown client flags");
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    let mut base_allocation = false;
    loop {
        let Some(magic) = c.u64() else {
            return ended(&s, options, "the input ran out");
        };
        if magic != IHAVEOPT {
            return ended(&s, options, "an option without IHAVEOPT");
        }
        let (Some(option), Some(len)) = (c.u32(), c.u32()) else {
            return ended(&s, options, "the input ran out in an option header");
        };
        if len > MAX_OPTION_LEN {
            return ended(&s, options, "an over-long option");
        }
        let Some(data) = c.take(len as usize) else {
            return ended(&s, options, "the input ran out in an option");
        };
        options += 1;
        if option == OPT_EXPORT_NAME {
            let name = String::from_utf8_lossy(data);
            if !(name.is_empty() || name == EXPORT) {
                return ended(&s, options, "an unknown export name");
            }
            assert_eq!(s.u64("the export's size"), SIZE, "export size");
            let flags = s.u16("the transmission flags");
            assert!(flags & TF_HAS_FLAGS != 0 && flags & TF_READ_ONLY == 0);
            if !no_zeroes {
                assert!(s.bytes(124, "the zeroes").iter().all(|&b| b == 0));
            }
            break;
        }
        // Replies to this option, up to and including the final one.
        let mut go = false;
        let mut contexts = 0;
        loop {
            assert_eq!(
                s.u64("an option reply"),
                OPT_REPLY_MAGIC,
                "option reply magic"
            );
            assert_eq!(s.u32("an option reply"), option, "option echoed");
            let kind = s.u32("an option reply");
            let n = s.u32("an option reply");
            let mut d = Bytes(s.bytes(n as usize, "an option reply's data"));
            match kind {
                REP_INFO => {
                    assert!(option == OPT_INFO || option == OPT_GO, "info for {option}");
                    if d.u16() == Some(INFO_EXPORT) {
                        assert_eq!(d.u64(), Some(SIZE), "size in NBD_INFO_EXPORT");
                    }
                }
                REP_META_CONTEXT => {
                    assert!(
                        option == OPT_LIST_META_CONTEXT || option == OPT_SET_META_CONTEXT,
                        "a context for option {option}"
                    );
                    assert_eq!(d.u32(), Some(META_BASE_ALLOCATION_ID));
                    assert_eq!(d.0, META_BASE_ALLOCATION.as_bytes());
                    contexts += 1;
                }
                REP_SERVER => assert_eq!(option, OPT_LIST, "a server entry for {option}"),
                k if is_final(k) => {}
                k => panic!("unexpected option reply type {k:#x} to option {option}"),
            }
            if !is_final(kind) {
                continue;
            }
            match option {
                OPT_ABORT => {
                    assert_eq!(kind, REP_ACK, "abort is acknowledged");
                    return ended(&s, options, "the reply to NBD_OPT_ABORT");
                }
                OPT_STRUCTURED_REPLY if kind == REP_ACK => {
                    assert_eq!(len, 0, "structured replies with a payload acknowledged");
                    structured = true;
                }
                OPT_SET_META_CONTEXT if kind == REP_ACK => {
                    assert!(structured, "a context set without structured replies");
                    base_allocation = contexts > 0;
                }
                OPT_GO if kind == REP_ACK => go = true,
                OPT_STARTTLS => assert_eq!(kind, REP_ERR_POLICY),
                OPT_EXPORT_NAME..=OPT_SET_META_CONTEXT => {}
                _ => assert_eq!(kind, REP_ERR_UNSUP, "unknown option {option}"),
            }
            break;
        }
        if go {
            break;
        }
    }

    let mut model = initial().0;
    let mut requests = 0;
    loop {
        let Some(h) = c.take(Request::LEN) else {
            s.end("the last request");
            break;
        };
        let Some(req) = Request::parse(h.try_into().unwrap()) else {
            s.end("a request with a bad magic");
            break;
        };
        if req.kind == CMD_DISC {
            s.end("NBD_CMD_DISC");
            break;
        }
        let mut payload: &[u8] = &[];
        if req.kind == CMD_WRITE {
            if req.len > MAX_PAYLOAD {
                s.end("an over-long write");
                break;
            }
            match c.take(req.len as usize) {
                Some(p) => payload = p,
                None => {
                    s.end("a write whose payload the input cut short");
                    break;
                }
            }
        }
        requests += 1;
        let (off, len) = (req.offset, u64::from(req.len));
        let in_range = off.checked_add(len).is_some_and(|e| e <= SIZE);
        let known = matches!(
            req.kind,
            CMD_READ
                | CMD_WRITE
                | CMD_FLUSH
                | CMD_TRIM
                | CMD_CACHE
                | CMD_WRITE_ZEROES
                | CMD_BLOCK_STATUS
        );
        let valid = known
            && req.flags & !KNOWN_FLAGS == 0
            && in_range
            && (req.kind != CMD_BLOCK_STATUS || (base_allocation && len > 0));
        let touches_bad = in_range && len > 0 && off + len > BAD_START;
        let injected = match req.kind {
            CMD_READ if touches_bad => Some(EIO),
            CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES if touches_bad => Some(ENOSPC),
            _ => None,
        };
        let at = |o: u64| (o - off) as usize;
        let want = &model[off.min(SIZE) as usize..(off.saturating_add(len)).min(SIZE) as usize];
        let what = format!("the reply to request {requests} ({req:?})");
        // The reply: its error (0 for success) and, for a successful read, what it says
        // the range holds and which parts of it the content chunks covered.
        let mut got = vec![
            0u8;
            if req.kind == CMD_READ && valid {
                len as usize
            } else {
                0
            }
        ];
        let mut covered: Vec<(u64, u64)> = Vec::new();
        let error;
        if structured {
            let mut err = 0;
            let mut content_chunks = 0;
            let mut statuses = 0;
            loop {
                assert_eq!(s.u32(&what), STRUCTURED_REPLY_MAGIC, "{what}: magic");
                let flags = s.u16(&what);
                let kind = s.u16(&what);
                assert_eq!(s.u64(&what), req.cookie, "{what}: cookie");
                let n = s.u32(&what) as usize;
                let mut p = Bytes(s.bytes(n, &what));
                match kind {
                    REPLY_TYPE_NONE => {
                        assert_eq!(n, 0, "{what}: NONE with a payload");
                        assert!(flags & REPLY_FLAG_DONE != 0, "{what}: NONE not final");
                    }
                    REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
                        assert_eq!(req.kind, CMD_READ, "{what}: content chunk");
                        assert!(
                            valid && injected.is_none(),
                            "{what}: content for a failed read"
                        );
                        content_chunks += 1;
                        let o = p.u64().unwrap_or_else(|| panic!("{what}: short chunk"));
                        let (l, data) = if kind == REPLY_TYPE_OFFSET_DATA {
                            assert!(n >= 9, "{what}: empty data chunk");
                            (p.0.len() as u64, Some(p.0))
                        } else {
                            assert_eq!(n, 12, "{what}: hole chunk length");
                            let l = u64::from(p.u32().unwrap());
                            assert!(l > 0, "{what}: empty hole");
                            (l, None)
                        };
                        assert!(
                            o >= off && o.checked_add(l).is_some_and(|e| e <= off + len),
                            "{what}: chunk {o}+{l} outside the request"
                        );
                        assert!(
                            covered.iter().all(|&(a, b)| o + l <= a || b <= o),
                            "{what}: chunk {o}+{l} overlaps an earlier one"
                        );
                        covered.push((o, o + l));
                        let part = &mut got[at(o)..at(o + l)];
                        match data {
                            Some(d) => part.copy_from_slice(d),
                            None => part.fill(0),
                        }
                    }
                    REPLY_TYPE_BLOCK_STATUS => {
                        assert_eq!(req.kind, CMD_BLOCK_STATUS, "{what}: block status");
                        statuses += 1;
                        assert_eq!(p.u32(), Some(META_BASE_ALLOCATION_ID), "{what}: context");
                        assert!(!p.0.is_empty() && p.0.len() % 8 == 0, "{what}: descriptors");
                        let mut pos = off;
                        let mut count = 0;
                        while let (Some(l), Some(f)) = (p.u32(), p.u32()) {
                            count += 1;
                            assert!(l > 0, "{what}: empty descriptor");
                            let end = pos + u64::from(l);
                            assert!(end <= off + len, "{what}: descriptors beyond the range");
                            if f & STATE_HOLE != 0 {
                                assert!(
                                    is_zero(&model[pos as usize..end as usize]),
                                    "{what}: {pos}+{l} reported as a hole holds data"
                                );
                            }
                            pos = end;
                        }
                        if req.flags & CMD_FLAG_REQ_ONE != 0 {
                            assert_eq!(count, 1, "{what}: more than one descriptor");
                        }
                    }
                    REPLY_TYPE_ERROR => {
                        let e = p.u32().unwrap_or_else(|| panic!("{what}: short error"));
                        let m = p.u16().unwrap_or_else(|| panic!("{what}: short error"));
                        assert!(e != 0, "{what}: error chunk with no error");
                        assert!(usize::from(m) <= p.0.len(), "{what}: message length");
                        assert_eq!(err, 0, "{what}: two errors");
                        err = e;
                    }
                    k => panic!("{what}: unexpected chunk type {k}"),
                }
                if flags & REPLY_FLAG_DONE != 0 {
                    break;
                }
            }
            if req.flags & CMD_FLAG_DF != 0 {
                assert!(content_chunks <= 1, "{what}: fragmented despite DF");
            }
            if req.kind == CMD_BLOCK_STATUS && err == 0 {
                assert_eq!(statuses, 1, "{what}: block status chunks");
            }
            error = err;
        } else {
            assert_eq!(s.u32(&what), SIMPLE_REPLY_MAGIC, "{what}: magic");
            error = s.u32(&what);
            assert_eq!(s.u64(&what), req.cookie, "{what}: cookie");
            if req.kind == CMD_BLOCK_STATUS {
                assert!(
                    error != 0,
                    "{what}: block status without structured replies"
                );
            }
            if req.kind == CMD_READ && error == 0 {
                let data = s.bytes(len as usize, &what);
                if valid {
                    got.copy_from_slice(data);
                    covered.push((off, off + len));
                }
            }
        }
        match (valid, injected) {
            (false, _) => assert!(error != 0, "{what}: accepted an invalid request"),
            (true, Some(e)) => assert_eq!(error, e, "{what}: injected failure's errno"),
            (true, None) => assert_eq!(error, 0, "{what}: refused a valid request"),
        }
        if error != 0 {
            continue;
        }
        match req.kind {
            CMD_READ => {
                let n: u64 = covered.iter().map(|(a, b)| b - a).sum();
                assert_eq!(n, len, "{what}: bytes covered by the content chunks");
                if got != want {
                    let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
                    panic!("{what}: byte {} reads wrong", off + i as u64);
                }
            }
            CMD_WRITE => model[off as usize..(off + len) as usize].copy_from_slice(payload),
            CMD_TRIM | CMD_WRITE_ZEROES => model[off as usize..(off + len) as usize].fill(0),
            _ => {}
        }
    }
    Outcome::Transmission {
        structured,
        requests,
    }
}
