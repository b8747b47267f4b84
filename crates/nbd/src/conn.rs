//! One client connection: negotiation, then transmission with requests in flight on a
//! small pool of threads.

use crate::proto::*;
use crate::{Error, Export, Result};
use std::io::{BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

/// Threads serving one connection's requests.
const WORKERS: usize = 8;
/// Requests read ahead of the workers (bounds the memory a client can make us hold).
const QUEUE: usize = 64;
/// Writes up to this size are served by the thread that reads requests.
const INLINE_WRITE_MAX: u32 = 64 << 10;

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

pub(crate) fn serve(stream: UnixStream, export: Arc<Export>) -> Result<()> {
    let mut writer = stream.try_clone().map_err(Error::Io)?;
    let mut reader = BufReader::with_capacity(1 << 20, stream);
    let session = match negotiate(&mut reader, &mut writer, &export)? {
        Negotiated::Transmit(s) => s,
        Negotiated::Close => return Ok(()),
    };
    transmit(reader, writer, export, session)
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

fn negotiate(
    r: &mut BufReader<UnixStream>,
    w: &mut UnixStream,
    export: &Export,
) -> Result<Negotiated> {
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

struct Job {
    req: Request,
    payload: Vec<u8>,
}

fn transmit(
    mut r: BufReader<UnixStream>,
    w: UnixStream,
    export: Arc<Export>,
    session: Session,
) -> Result<()> {
    let writer = Arc::new(Mutex::new(w));
    let (tx, rx): (SyncSender<Job>, Receiver<Job>) = sync_channel(QUEUE);
    let rx = Arc::new(Mutex::new(rx));
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let rx = rx.clone();
            let writer = writer.clone();
            let export = export.clone();
            std::thread::spawn(move || {
                loop {
                    let job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                        Ok(j) => j,
                        Err(_) => return,
                    };
                    let reply = execute(&export, session, &job);
                    let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
                    if let Err(e) = w.write_all(&reply) {
                        tracing::debug!("writing a reply: {e}");
                        let _ = w.shutdown(std::net::Shutdown::Both);
                    }
                }
            })
        })
        .collect();
    let result = (|| -> Result<()> {
        let mut header = [0u8; Request::LEN];
        loop {
            match r.read_exact(&mut header) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(Error::Io(e)),
            }
            let Some(req) = Request::parse(&header) else {
                return Err(Error::Protocol("request with a bad magic".into()));
            };
            if req.kind == CMD_DISC {
                return Ok(());
            }
            let mut payload = Vec::new();
            if req.kind == CMD_WRITE {
                if req.len > MAX_PAYLOAD {
                    return Err(Error::Protocol(format!(
                        "write of {} bytes is over the {MAX_PAYLOAD}-byte limit",
                        req.len
                    )));
                }
                payload = vec![0u8; req.len as usize];
                r.read_exact(&mut payload).map_err(Error::Io)?;
            }
            let job = Job { req, payload };
            // Small writes run here: buffered writes to one file serialize in the kernel
            // anyway, and handing them to a worker only adds two thread switches.
            if req.kind == CMD_WRITE && req.len <= INLINE_WRITE_MAX {
                let reply = execute(&export, session, &job);
                let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
                w.write_all(&reply).map_err(Error::Io)?;
                continue;
            }
            if tx.send(job).is_err() {
                return Ok(());
            }
        }
    })();
    // Requests already read finish and are answered before the connection closes.
    drop(tx);
    for w in workers {
        let _ = w.join();
    }
    if let Err(e) = &result {
        tracing::info!("closing a connection: {e}");
    }
    let _ = writer
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .shutdown(std::net::Shutdown::Both);
    result
}

/// Maps a disk error to the errno the protocol carries.
fn errno(e: &disk::Error) -> u32 {
    match e {
        disk::Error::OutOfRange { .. } => EINVAL,
        disk::Error::ReadOnly { .. } => EPERM,
        _ => {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
            while let Some(s) = source {
                if let Some(io) = s.downcast_ref::<std::io::Error>()
                    && io.raw_os_error() == Some(28)
                {
                    return ENOSPC;
                }
                source = s.source();
            }
            EIO
        }
    }
}

fn error_reply(session: Session, cookie: u64, error: u32, msg: &str) -> Vec<u8> {
    let mut out = Vec::new();
    if session.structured {
        let msg = &msg.as_bytes()[..msg.len().min(4096)];
        chunk_header(
            &mut out,
            REPLY_FLAG_DONE,
            REPLY_TYPE_ERROR,
            cookie,
            6 + msg.len() as u32,
        );
        out.extend_from_slice(&error.to_be_bytes());
        out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        out.extend_from_slice(msg);
    } else {
        simple_reply(&mut out, error, cookie);
    }
    out
}

fn ok_reply(session: Session, cookie: u64) -> Vec<u8> {
    let mut out = Vec::new();
    if session.structured {
        chunk_header(&mut out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
    } else {
        simple_reply(&mut out, 0, cookie);
    }
    out
}

fn execute(export: &Export, session: Session, job: &Job) -> Vec<u8> {
    let req = job.req;
    let fail = |error: u32, msg: &str| error_reply(session, req.cookie, error, msg);
    let known =
        CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO;
    if req.flags & !known != 0 {
        return fail(EINVAL, "unknown command flags");
    }
    let disk = export.disk_guard();
    let size = disk.size();
    let len = u64::from(req.len);
    let in_range = req.offset.checked_add(len).is_some_and(|end| end <= size);
    let writes = matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && export.read_only() {
        return fail(EPERM, "the export is read-only");
    }
    if !in_range {
        let e = if writes { ENOSPC } else { EINVAL };
        return fail(e, "the request reaches beyond the end of the export");
    }
    let flush_after = |out: Vec<u8>| -> Vec<u8> {
        if req.flags & CMD_FLAG_FUA != 0
            && let Err(e) = disk.flush()
        {
            return fail(errno(&e), &e.to_string());
        }
        out
    };
    match req.kind {
        CMD_READ => {
            if req.len > MAX_PAYLOAD {
                return fail(EINVAL, "read over the size limit");
            }
            let header = if session.structured { 20 + 8 } else { 16 };
            let mut out = Vec::with_capacity(header + req.len as usize);
            if session.structured {
                chunk_header(
                    &mut out,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_OFFSET_DATA,
                    req.cookie,
                    8 + req.len,
                );
                out.extend_from_slice(&req.offset.to_be_bytes());
            } else {
                simple_reply(&mut out, 0, req.cookie);
            }
            out.resize(header + req.len as usize, 0);
            match disk.read_at(&mut out[header..], req.offset) {
                Ok(()) => out,
                Err(e) => fail(errno(&e), &e.to_string()),
            }
        }
        CMD_WRITE => match disk.write_at(&job.payload, req.offset) {
            Ok(()) => flush_after(ok_reply(session, req.cookie)),
            Err(e) => fail(errno(&e), &e.to_string()),
        },
        CMD_TRIM => match disk.discard(req.offset, len) {
            Ok(()) => flush_after(ok_reply(session, req.cookie)),
            Err(e) => fail(errno(&e), &e.to_string()),
        },
        CMD_WRITE_ZEROES => match disk.write_zeroes(req.offset, len) {
            Ok(()) => flush_after(ok_reply(session, req.cookie)),
            Err(e) => fail(errno(&e), &e.to_string()),
        },
        CMD_FLUSH => match disk.flush() {
            Ok(()) => ok_reply(session, req.cookie),
            Err(e) => fail(errno(&e), &e.to_string()),
        },
        CMD_CACHE => ok_reply(session, req.cookie),
        CMD_BLOCK_STATUS => {
            if !session.base_allocation {
                return fail(EINVAL, "no metadata context was negotiated");
            }
            if req.len == 0 {
                return fail(EINVAL, "block status of an empty range");
            }
            let extents = match disk.block_status(req.offset, len) {
                Ok(x) => x,
                Err(e) => return fail(errno(&e), &e.to_string()),
            };
            let mut descriptors = Vec::new();
            for x in extents.iter().filter(|x| !x.is_empty()) {
                let flags = match x {
                    disk::Extent::Data(_) => 0,
                    disk::Extent::Zero(_) => STATE_HOLE | STATE_ZERO,
                };
                descriptors.push((x.len() as u32, flags));
                if req.flags & CMD_FLAG_REQ_ONE != 0 {
                    break;
                }
            }
            let mut out = Vec::new();
            chunk_header(
                &mut out,
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
            out
        }
        _ => fail(EINVAL, "unknown command"),
    }
}
