//! One client connection: negotiation, then transmission with requests in flight on a
//! small pool of threads.
//!
//! A request's bytes are copied as few times as the socket allows: a write's payload goes
//! from the read-ahead buffer into a reused buffer and from there to the disk; a read's
//! data goes from the disk into a reused buffer and out with its header in one vectored
//! write. When
//! the client negotiated structured replies, the parts of a read that the disk reports as
//! holes go out as hole chunks, without their bytes.

use crate::proto::*;
use crate::{Error, Export, Result};
use disk::{ErrorKind, Extent};
use std::io::{BufReader, IoSlice, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

/// Threads serving one connection's requests.
const WORKERS: usize = 8;
/// Requests read ahead of the workers (bounds the memory a client can make us hold).
const QUEUE: usize = 64;
/// Writes up to this size are served by the thread that reads requests.
const INLINE_WRITE_MAX: u32 = 64 << 10;
/// Reads up to this size are served by the thread that reads requests when nothing else
/// is in flight or waiting.
const INLINE_READ_MAX: u32 = 64 << 10;
/// Bytes read from the socket at once. Payloads come through this buffer too: one system
/// call bringing in several requests costs less than the copy out of it (reading the rest
/// of each payload straight from the socket made 64 KiB writes at depth 16 slower).
const READ_AHEAD: usize = 1 << 20;
/// Request buffers a connection keeps for reuse, and the largest one kept.
const POOL_BUFFERS: usize = WORKERS + 2;
const POOL_KEEP_MAX: usize = 2 << 20;
/// Holes shorter than this go out as zeros inside the data chunk around them: a chunk
/// costs its header and the client's handling of it, more than a few sectors of zeros.
const MIN_HOLE: usize = 4096;

/// What negotiation agreed on.
#[derive(Clone, Copy, Debug, Default)]
struct Session {
    structured: bool,
    base_allocation: bool,
}

enum Negotiated {
    Transmit(Session),
    Close,
}

/// Serves a client until it leaves, then closes the connection (the server holds another
/// handle on the socket, so dropping ours would not).
pub(crate) fn serve(stream: UnixStream, export: Arc<Export>) -> Result<()> {
    let mut writer = stream.try_clone().map_err(Error::Io)?;
    let mut reader = BufReader::with_capacity(READ_AHEAD, stream);
    let session = match negotiate(&mut reader, &mut writer, &export) {
        Ok(Negotiated::Transmit(s)) => s,
        other => {
            let _ = writer.shutdown(std::net::Shutdown::Both);
            return other.map(|_| ());
        }
    };
    // Shuts the connection down when done.
    transmit(reader, writer, export, session)
}

/// [`crate::serve_stream`]: the connection on the calling thread, one request at a time.
pub(crate) fn serve_sequential(
    input: impl Read,
    mut output: impl Write,
    export: &Export,
) -> Result<()> {
    let mut r = BufReader::with_capacity(READ_AHEAD, input);
    let session = match negotiate(&mut r, &mut output, export)? {
        Negotiated::Transmit(s) => s,
        Negotiated::Close => return Ok(()),
    };
    let pool = Pool::default();
    while let Some(job) = read_request(&mut r, &pool)? {
        let reply = execute(export, session, &pool, job);
        reply.send(&mut output).map_err(Error::Io)?;
        pool.give(reply.buf);
    }
    Ok(())
}

fn read_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// A bounds-checked reader over an option's payload.
struct Payload<'a>(&'a [u8]);

impl Payload<'_> {
    fn u16(&mut self) -> Option<u16> {
        let (h, t) = self.0.split_at_checked(2)?;
        self.0 = t;
        Some(u16::from_be_bytes(h.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        let (h, t) = self.0.split_at_checked(4)?;
        self.0 = t;
        Some(u32::from_be_bytes(h.try_into().ok()?))
    }
    fn bytes(&mut self, n: usize) -> Option<&[u8]> {
        let (h, t) = self.0.split_at_checked(n)?;
        self.0 = t;
        Some(h)
    }
    fn string(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        String::from_utf8(self.bytes(n)?.to_vec()).ok()
    }
}

fn negotiate(r: &mut impl Read, w: &mut impl Write, export: &Export) -> Result<Negotiated> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&hello).map_err(Error::Io)?;
    let client_flags = read_u32(r).map_err(Error::Io)?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        tracing::debug!("client sent unknown handshake flags {client_flags:#x}; closing");
        return Ok(Negotiated::Close);
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    let mut session = Session::default();
    loop {
        if read_u64(r).map_err(Error::Io)? != IHAVEOPT {
            tracing::debug!("option without IHAVEOPT; closing");
            return Ok(Negotiated::Close);
        }
        let option = read_u32(r).map_err(Error::Io)?;
        let len = read_u32(r).map_err(Error::Io)?;
        if len > MAX_OPTION_LEN {
            tracing::debug!("option {option} of {len} bytes is too long; closing");
            return Ok(Negotiated::Close);
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).map_err(Error::Io)?;
        let mut out = Vec::new();
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                if !export.answers_to(&name) {
                    tracing::debug!("unknown export {name:?}; closing");
                    return Ok(Negotiated::Close);
                }
                out.extend_from_slice(&export.size().to_be_bytes());
                out.extend_from_slice(&export.transmission_flags().to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                w.write_all(&out).map_err(Error::Io)?;
                return Ok(Negotiated::Transmit(session));
            }
            OPT_ABORT => {
                option_reply(&mut out, option, REP_ACK, &[]);
                let _ = w.write_all(&out);
                return Ok(Negotiated::Close);
            }
            OPT_LIST => {
                if len != 0 {
                    option_reply(&mut out, option, REP_ERR_INVALID, &[]);
                } else {
                    let mut d = (export.name().len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(export.name().as_bytes());
                    option_reply(&mut out, option, REP_SERVER, &d);
                    option_reply(&mut out, option, REP_ACK, &[]);
                }
            }
            OPT_INFO | OPT_GO => {
                let mut p = Payload(&data);
                let parsed = (|| {
                    let name = p.string()?;
                    let n = p.u16()?;
                    let mut wants = Vec::new();
                    for _ in 0..n {
                        wants.push(p.u16()?);
                    }
                    p.0.is_empty().then_some((name, wants))
                })();
                match parsed {
                    None => option_reply(&mut out, option, REP_ERR_INVALID, &[]),
                    Some((name, _)) if !export.answers_to(&name) => {
                        option_reply(&mut out, option, REP_ERR_UNKNOWN, &[])
                    }
                    Some((_, wants)) => {
                        let mut d = INFO_EXPORT.to_be_bytes().to_vec();
                        d.extend_from_slice(&export.size().to_be_bytes());
                        d.extend_from_slice(&export.transmission_flags().to_be_bytes());
                        option_reply(&mut out, option, REP_INFO, &d);
                        // Sent unasked too: a client may ignore it, and it tells qemu the
                        // largest request we take.
                        let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                        d.extend_from_slice(&MIN_BLOCK.to_be_bytes());
                        d.extend_from_slice(&PREFERRED_BLOCK.to_be_bytes());
                        d.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                        option_reply(&mut out, option, REP_INFO, &d);
                        if wants.contains(&INFO_NAME) {
                            let mut d = INFO_NAME.to_be_bytes().to_vec();
                            d.extend_from_slice(export.name().as_bytes());
                            option_reply(&mut out, option, REP_INFO, &d);
                        }
                        option_reply(&mut out, option, REP_ACK, &[]);
                        if option == OPT_GO {
                            w.write_all(&out).map_err(Error::Io)?;
                            return Ok(Negotiated::Transmit(session));
                        }
                    }
                }
            }
            OPT_STRUCTURED_REPLY => {
                if len != 0 {
                    option_reply(&mut out, option, REP_ERR_INVALID, &[]);
                } else {
                    session.structured = true;
                    option_reply(&mut out, option, REP_ACK, &[]);
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let mut p = Payload(&data);
                let parsed = (|| {
                    let name = p.string()?;
                    let n = p.u32()?;
                    let mut queries = Vec::new();
                    for _ in 0..n {
                        queries.push(p.string()?);
                    }
                    p.0.is_empty().then_some((name, queries))
                })();
                let set = option == OPT_SET_META_CONTEXT;
                match parsed {
                    None => option_reply(&mut out, option, REP_ERR_INVALID, &[]),
                    Some(_) if set && !session.structured => {
                        option_reply(&mut out, option, REP_ERR_INVALID, &[])
                    }
                    Some((name, _)) if !export.answers_to(&name) => {
                        option_reply(&mut out, option, REP_ERR_UNKNOWN, &[])
                    }
                    Some((_, queries)) => {
                        let matches = queries.iter().any(|q| {
                            q == META_BASE_ALLOCATION || (!set && (q == "base:" || q.is_empty()))
                        }) || (!set && queries.is_empty());
                        if matches {
                            let mut d = META_BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                            d.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
                            option_reply(&mut out, option, REP_META_CONTEXT, &d);
                        }
                        if set {
                            session.base_allocation = matches;
                        }
                        option_reply(&mut out, option, REP_ACK, &[]);
                    }
                }
            }
            OPT_STARTTLS => option_reply(&mut out, option, REP_ERR_POLICY, &[]),
            _ => option_reply(&mut out, option, REP_ERR_UNSUP, &[]),
        }
        w.write_all(&out).map_err(Error::Io)?;
    }
}

/// A request as read from the client, with a write's payload.
struct Job {
    req: Request,
    /// A write's payload (at least `req.len` bytes, from the pool); empty otherwise.
    payload: Vec<u8>,
}

/// Reads the next request; `None` at the end of the stream or on `NBD_CMD_DISC`. A request
/// that breaks framing is an error: nothing after it can be trusted to be a request.
fn read_request<R: Read>(r: &mut BufReader<R>, pool: &Pool) -> Result<Option<Job>> {
    let mut header = [0u8; Request::LEN];
    match r.read_exact(&mut header) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(Error::Io(e)),
    }
    let Some(req) = Request::parse(&header) else {
        return Err(Error::Protocol("request with a bad magic".into()));
    };
    if req.kind == CMD_DISC {
        return Ok(None);
    }
    let mut payload = Vec::new();
    if req.kind == CMD_WRITE {
        if req.len > MAX_PAYLOAD {
            return Err(Error::Protocol(format!(
                "write of {} bytes is over the {MAX_PAYLOAD}-byte limit",
                req.len
            )));
        }
        payload = pool.take(req.len as usize);
        r.read_exact(&mut payload[..req.len as usize])
            .map_err(Error::Io)?;
    }
    Ok(Some(Job { req, payload }))
}

/// Buffers reused from request to request: a fresh buffer per request costs an allocation
/// and, for large ones, page faults and zero-filling, more than the copy of the data.
#[derive(Default)]
struct Pool(Mutex<Vec<Vec<u8>>>);

impl Pool {
    /// A buffer of at least `len` bytes, with whatever an earlier request left in it.
    fn take(&self, len: usize) -> Vec<u8> {
        let mut b = if len <= POOL_KEEP_MAX {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop()
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        if b.len() < len {
            b.reserve_exact(len - b.len());
            b.resize(len, 0);
        }
        b
    }

    fn give(&self, b: Vec<u8>) {
        if b.capacity() == 0 || b.capacity() > POOL_KEEP_MAX {
            return;
        }
        let mut p = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if p.len() < POOL_BUFFERS {
            p.push(b);
        }
    }
}

/// One part of a reply on the wire.
#[derive(Clone, Copy)]
enum Part {
    /// A range of [`Reply::head`].
    Head(usize, usize),
    /// A range of [`Reply::buf`].
    Buf(usize, usize),
}

/// A reply ready to send: headers built here, data left in the request's buffer, all of it
/// written with one vectored write.
struct Reply {
    head: Vec<u8>,
    /// The request's buffer: a read's data, or a write's payload going back to the pool.
    buf: Vec<u8>,
    parts: Vec<Part>,
}

impl Reply {
    fn new(buf: Vec<u8>) -> Reply {
        Reply {
            head: Vec::new(),
            buf,
            parts: Vec::new(),
        }
    }

    /// Appends the bytes `f` writes into the header area.
    fn head(&mut self, f: impl FnOnce(&mut Vec<u8>)) {
        let start = self.head.len();
        f(&mut self.head);
        let end = self.head.len();
        match self.parts.last_mut() {
            Some(Part::Head(_, e)) if *e == start => *e = end,
            _ => self.parts.push(Part::Head(start, end)),
        }
    }

    /// Appends `buf[start..end]`.
    fn data(&mut self, start: usize, end: usize) {
        self.parts.push(Part::Buf(start, end));
    }

    /// The reply's parts, in order.
    fn slices(&self) -> impl Iterator<Item = IoSlice<'_>> {
        self.parts.iter().map(|p| match *p {
            Part::Head(s, e) => IoSlice::new(&self.head[s..e]),
            Part::Buf(s, e) => IoSlice::new(&self.buf[s..e]),
        })
    }

    fn send(&self, w: &mut impl Write) -> std::io::Result<()> {
        send_all(w, std::slice::from_ref(self))
    }
}

/// Writes replies one after the other, with as few system calls as the vectors allow.
fn send_all(w: &mut impl Write, replies: &[Reply]) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = replies.iter().flat_map(Reply::slices).collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        match w.write_vectored(rest) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// What the threads of one connection share.
struct Shared {
    export: Arc<Export>,
    session: Session,
    writer: Mutex<UnixStream>,
    /// Replies ready while another thread held the writer: that thread sends them too
    /// before it lets go, so no thread sleeps waiting to send, and replies that pile up
    /// go out together.
    ready: Mutex<Vec<Reply>>,
    pool: Pool,
    /// Requests handed to the workers and not yet answered.
    queued: AtomicUsize,
}

impl Shared {
    /// Executes a request and has its reply sent whole (replies never interleave).
    fn serve(&self, job: Job) {
        let reply = execute(&self.export, self.session, &self.pool, job);
        self.ready
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(reply);
        self.send_ready();
    }

    /// Sends the ready replies unless another thread is sending (it will send them). A
    /// reply that cannot be sent ends the connection: the client would wait for it forever.
    fn send_ready(&self) {
        loop {
            let mut w = match self.writer.try_lock() {
                Ok(w) => w,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => return,
            };
            loop {
                let batch =
                    std::mem::take(&mut *self.ready.lock().unwrap_or_else(|p| p.into_inner()));
                if batch.is_empty() {
                    break;
                }
                if let Err(e) = send_all(&mut *w, &batch) {
                    tracing::debug!("writing a reply: {e}");
                    let _ = w.shutdown(std::net::Shutdown::Both);
                }
                for r in batch {
                    self.pool.give(r.buf);
                }
            }
            drop(w);
            // A reply queued after the last look, by a thread that found the writer
            // taken, is ours to send.
            if self
                .ready
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty()
            {
                return;
            }
        }
    }
}

fn transmit(
    mut r: BufReader<UnixStream>,
    w: UnixStream,
    export: Arc<Export>,
    session: Session,
) -> Result<()> {
    let shared = Arc::new(Shared {
        export,
        session,
        writer: Mutex::new(w),
        ready: Mutex::new(Vec::new()),
        pool: Pool::default(),
        queued: AtomicUsize::new(0),
    });
    let (tx, rx): (SyncSender<Job>, Receiver<Job>) = sync_channel(QUEUE);
    let rx = Arc::new(Mutex::new(rx));
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let rx = rx.clone();
            let shared = shared.clone();
            std::thread::spawn(move || {
                loop {
                    let job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                        Ok(j) => j,
                        Err(_) => return,
                    };
                    shared.serve(job);
                    shared.queued.fetch_sub(1, Ordering::AcqRel);
                }
            })
        })
        .collect();
    let result = (|| -> Result<()> {
        while let Some(job) = read_request(&mut r, &shared.pool)? {
            let req = job.req;
            // Small writes run here: buffered writes to one file serialize in the kernel
            // anyway, and handing them to a worker only adds two thread switches. A small
            // read runs here when nothing else is in flight or already received: a
            // client waiting on one request at a time then pays no thread switch, and
            // one that sends many still has them spread over the workers.
            let inline = match req.kind {
                CMD_WRITE => req.len <= INLINE_WRITE_MAX,
                CMD_READ => {
                    req.len <= INLINE_READ_MAX
                        && r.buffer().is_empty()
                        && shared.queued.load(Ordering::Acquire) == 0
                }
                _ => false,
            };
            if inline {
                shared.serve(job);
                continue;
            }
            shared.queued.fetch_add(1, Ordering::AcqRel);
            if tx.send(job).is_err() {
                return Ok(());
            }
        }
        Ok(())
    })();
    // Requests already read finish and are answered before the connection closes.
    drop(tx);
    for w in workers {
        let _ = w.join();
    }
    if let Err(e) = &result {
        tracing::info!("closing a connection: {e}");
    }
    let _ = shared
        .writer
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .shutdown(std::net::Shutdown::Both);
    result
}

/// The errno a failure of the disk goes out as: the one place disk errors meet the
/// protocol. The protocol's list of errors is short, so whatever it cannot say is `EIO`.
pub(crate) fn errno(kind: ErrorKind) -> u32 {
    match kind {
        ErrorKind::NoSpace => ENOSPC,
        ErrorKind::ReadOnly | ErrorKind::PermissionDenied => EPERM,
        ErrorKind::Invalid => EINVAL,
        ErrorKind::Unsupported => ENOTSUP,
        ErrorKind::NotFound | ErrorKind::Busy | ErrorKind::Corrupt | ErrorKind::Io => EIO,
        _ => EIO,
    }
}

fn error_reply(session: Session, cookie: u64, error: u32, msg: &str, buf: Vec<u8>) -> Reply {
    let mut reply = Reply::new(buf);
    reply.head(|out| {
        if session.structured {
            let msg = &msg.as_bytes()[..msg.len().min(4096)];
            chunk_header(
                out,
                REPLY_FLAG_DONE,
                REPLY_TYPE_ERROR,
                cookie,
                6 + msg.len() as u32,
            );
            out.extend_from_slice(&error.to_be_bytes());
            out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
            out.extend_from_slice(msg);
        } else {
            simple_reply(out, error, cookie);
        }
    });
    reply
}

fn ok_reply(session: Session, cookie: u64, buf: Vec<u8>) -> Reply {
    let mut reply = Reply::new(buf);
    reply.head(|out| {
        if session.structured {
            chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
        } else {
            simple_reply(out, 0, cookie);
        }
    });
    reply
}

/// A chunk of a structured read reply, in bytes from the start of the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    Data(usize, usize),
    Hole(usize, usize),
}

/// The chunks a structured read goes out as, given what [`disk::Disk::read_sparse`]
/// reported for `len` bytes. Holes shorter than [`MIN_HOLE`] are zero-filled in `buf` and
/// sent with the data around them; with `one` (the client's "don't fragment"), every hole
/// is, unless the whole range is one. `None` when the extents do not cover `len` bytes.
fn plan_chunks(extents: &[Extent], len: usize, one: bool, buf: &mut [u8]) -> Option<Vec<Chunk>> {
    if extents.iter().map(|x| x.len()).sum::<u64>() != len as u64 {
        return None;
    }
    let whole_hole = extents.iter().all(|x| matches!(x, Extent::Zero(_)));
    let mut chunks: Vec<Chunk> = Vec::new();
    let mut at = 0usize;
    for x in extents.iter().filter(|x| !x.is_empty()) {
        let n = x.len() as usize;
        let chunk = match x {
            Extent::Zero(_) if whole_hole || (!one && n >= MIN_HOLE) => Chunk::Hole(at, n),
            Extent::Zero(_) => {
                buf[at..at + n].fill(0);
                Chunk::Data(at, n)
            }
            Extent::Data(_) => Chunk::Data(at, n),
        };
        match (chunks.last_mut(), chunk) {
            (Some(Chunk::Data(_, l)), Chunk::Data(_, m))
            | (Some(Chunk::Hole(_, l)), Chunk::Hole(_, m)) => *l += m,
            _ => chunks.push(chunk),
        }
        at += n;
    }
    Some(chunks)
}

fn execute(export: &Export, session: Session, pool: &Pool, job: Job) -> Reply {
    let Job { req, payload } = job;
    let fail =
        |error: u32, msg: &str, buf: Vec<u8>| error_reply(session, req.cookie, error, msg, buf);
    let known =
        CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO;
    if req.flags & !known != 0 {
        return fail(EINVAL, "unknown command flags", payload);
    }
    let disk = export.disk_guard();
    let size = disk.size();
    let len = u64::from(req.len);
    let in_range = req.offset.checked_add(len).is_some_and(|end| end <= size);
    let writes = matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && export.read_only() {
        return fail(EPERM, "the export is read-only", payload);
    }
    if !in_range {
        let e = if writes { ENOSPC } else { EINVAL };
        return fail(
            e,
            "the request reaches beyond the end of the export",
            payload,
        );
    }
    let failed = |e: disk::Error, buf: Vec<u8>| fail(errno(e.kind()), &e.to_string(), buf);
    let done = |result: disk::Result<()>, buf: Vec<u8>| -> Reply {
        let result = result.and_then(|()| {
            if req.flags & CMD_FLAG_FUA != 0 {
                disk.flush()
            } else {
                Ok(())
            }
        });
        match result {
            Ok(()) => ok_reply(session, req.cookie, buf),
            Err(e) => failed(e, buf),
        }
    };
    match req.kind {
        CMD_READ => {
            if req.len > MAX_PAYLOAD {
                return fail(EINVAL, "read over the size limit", payload);
            }
            let n = req.len as usize;
            let mut buf = pool.take(n);
            if n == 0 {
                return ok_reply(session, req.cookie, buf);
            }
            if !session.structured {
                if let Err(e) = disk.read_at(&mut buf[..n], req.offset) {
                    return failed(e, buf);
                }
                let mut reply = Reply::new(buf);
                reply.head(|out| simple_reply(out, 0, req.cookie));
                reply.data(0, n);
                return reply;
            }
            let extents = match disk.read_sparse(&mut buf[..n], req.offset) {
                Ok(x) => x,
                Err(e) => return failed(e, buf),
            };
            let one = req.flags & CMD_FLAG_DF != 0;
            let Some(chunks) = plan_chunks(&extents, n, one, &mut buf[..n]) else {
                let msg = "the disk's extents do not cover the read";
                return fail(EIO, msg, buf);
            };
            let mut reply = Reply::new(buf);
            let last = chunks.len() - 1;
            for (i, c) in chunks.into_iter().enumerate() {
                let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
                match c {
                    Chunk::Data(at, l) => {
                        reply.head(|out| {
                            chunk_header(
                                out,
                                flags,
                                REPLY_TYPE_OFFSET_DATA,
                                req.cookie,
                                8 + l as u32,
                            );
                            out.extend_from_slice(&(req.offset + at as u64).to_be_bytes());
                        });
                        reply.data(at, at + l);
                    }
                    Chunk::Hole(at, l) => reply.head(|out| {
                        chunk_header(out, flags, REPLY_TYPE_OFFSET_HOLE, req.cookie, 12);
                        out.extend_from_slice(&(req.offset + at as u64).to_be_bytes());
                        out.extend_from_slice(&(l as u32).to_be_bytes());
                    }),
                }
            }
            reply
        }
        CMD_WRITE => {
            let result = disk.write_at(&payload[..req.len as usize], req.offset);
            done(result, payload)
        }
        CMD_TRIM => done(disk.discard(req.offset, len), payload),
        CMD_WRITE_ZEROES => done(disk.write_zeroes(req.offset, len), payload),
        CMD_FLUSH => match disk.flush() {
            Ok(()) => ok_reply(session, req.cookie, payload),
            Err(e) => failed(e, payload),
        },
        CMD_CACHE => ok_reply(session, req.cookie, payload),
        CMD_BLOCK_STATUS => {
            if !session.base_allocation {
                return fail(EINVAL, "no metadata context was negotiated", payload);
            }
            if req.len == 0 {
                return fail(EINVAL, "block status of an empty range", payload);
            }
            let extents = match disk.block_status(req.offset, len) {
                Ok(x) => x,
                Err(e) => return failed(e, payload),
            };
            let mut descriptors = Vec::new();
            for x in extents.iter().filter(|x| !x.is_empty()) {
                let flags = match x {
                    Extent::Data(_) => 0,
                    Extent::Zero(_) => STATE_HOLE | STATE_ZERO,
                };
                descriptors.push((x.len() as u32, flags));
                if req.flags & CMD_FLAG_REQ_ONE != 0 {
                    break;
                }
            }
            let mut reply = Reply::new(payload);
            reply.head(|out| {
                chunk_header(
                    out,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_BLOCK_STATUS,
                    req.cookie,
                    4 + 8 * descriptors.len() as u32,
                );
                out.extend_from_slice(&META_BASE_ALLOCATION_ID.to_be_bytes());
                for (l, f) in descriptors {
                    out.extend_from_slice(&l.to_be_bytes());
                    out.extend_from_slice(&f.to_be_bytes());
                }
            });
            reply
        }
        _ => fail(EINVAL, "unknown command", payload),
    }
}
