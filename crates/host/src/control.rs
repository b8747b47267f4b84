//! The control socket's framing: a client's call, and the worker's side of one
//! connection (the messages are in [`crate::protocol`]).

use crate::error::{Error, Result};
use crate::protocol::{self, MAX_MESSAGE, Outcome, ProtocolError, Reply, Request, WireError};
use crate::run_state::RUN_DIR;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The control socket of the VM in `vm_dir`.
pub fn socket_path(vm_dir: &Path) -> PathBuf {
    vm_dir.join(RUN_DIR).join("control.sock")
}

/// Sends one request to the worker of the VM in `vm_dir` and waits up to `timeout` for
/// its reply. A failure the worker reports comes back as [`Error::Worker`], with the kind
/// and message it had in the worker.
pub fn call(vm_dir: &Path, request: &Request, timeout: Duration) -> Result<Reply> {
    let socket = socket_path(vm_dir);
    let mut stream = UnixStream::connect(&socket).map_err(|source| Error::Unreachable {
        socket: socket.clone(),
        source,
    })?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| Error::io(&socket, e))?;
    let mut line = protocol::encode_request(request);
    line.push(b'\n');
    stream.write_all(&line).map_err(|e| Error::io(&socket, e))?;
    let reply = read_line(&stream).map_err(|source| Error::NoReply { source })?;
    if reply.is_empty() {
        return Err(Error::NoReply {
            source: std::io::ErrorKind::UnexpectedEof.into(),
        });
    }
    match protocol::decode_reply(&reply)? {
        Outcome::Ok(reply) => Ok(reply),
        Outcome::Error(e) => Err(Error::Worker {
            kind: e.kind.into(),
            message: e.message,
        }),
    }
}

/// The error for a reply that does not answer `request`.
pub fn unexpected(request: &Request, reply: &Reply) -> Error {
    Error::Protocol(ProtocolError::Unexpected {
        request: request.op(),
        reply: reply.name(),
    })
}

/// Reads one line (without its newline), at most [`MAX_MESSAGE`] bytes; empty at end of
/// stream.
fn read_line(stream: &UnixStream) -> std::io::Result<Vec<u8>> {
    let mut line = Vec::new();
    BufReader::new(stream.take(MAX_MESSAGE as u64 + 1)).read_until(b'\n', &mut line)?;
    if line.last() == Some(&b'\n') {
        line.pop();
    }
    Ok(line)
}

/// The worker's side of one connection: reads the request, answers it with `handle`'s
/// outcome (an error goes back with its kind and whole message).
pub(crate) fn serve_one(
    stream: UnixStream,
    handle: impl FnOnce(Request) -> Result<Reply>,
) -> std::io::Result<()> {
    let line = read_line(&stream)?;
    let outcome = match protocol::decode_request(&line) {
        Ok(request) => {
            let op = request.op();
            match handle(request) {
                Ok(reply) => Outcome::Ok(reply),
                Err(e) => {
                    tracing::warn!("control request {op}: {}", e.chain());
                    Outcome::Error(wire_error(&e))
                }
            }
        }
        Err(e) => Outcome::Error(wire_error(&Error::Protocol(e))),
    };
    let mut out = protocol::encode_reply(&outcome);
    out.push(b'\n');
    (&stream).write_all(&out)
}

fn wire_error(e: &Error) -> WireError {
    WireError {
        kind: e.kind().into(),
        message: e.chain(),
    }
}
