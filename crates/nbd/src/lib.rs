//! An NBD server over any [`disk::Disk`], on a unix socket.
//!
//! # What it speaks
//!
//! Fixed newstyle negotiation with `NBD_OPT_GO`/`INFO` (export size, flags, block sizes:
//! 1 / 4096 / 32 MiB), `EXPORT_NAME`, `LIST`, `ABORT`, structured replies, and the
//! `base:allocation` metadata context. In transmission: `READ`, `WRITE` (with `FUA`),
//! `FLUSH`, `TRIM`, `WRITE_ZEROES`, `CACHE`, `BLOCK_STATUS` (with `REQ_ONE`) and `DISC`.
//! The export answers to its name and to the empty (default) name.
//!
//! With structured replies, a read goes out as data chunks and hole chunks: the ranges
//! [`disk::Disk::read_sparse`] reports as reading zeros without stored data (holes of a
//! VHDX chain) cost a 32-byte chunk instead of their bytes, unless shorter than a page
//! (then they are zeros inside the data chunk around them) or the client asked for one
//! chunk (`DF`: one data chunk, zeros included, unless the whole range is a hole).
//!
//! # Guarantees
//!
//! - `FLUSH` returns once every write completed before it is durable (the disk's own
//!   flush: for a VHDX chain, data synced and metadata committed through the log); a write
//!   with `FUA` is durable when answered.
//! - Requests run concurrently: one thread reads requests and up to eight serve them,
//!   answering in completion order (each reply written whole, never interleaved). Small
//!   writes, and small reads when nothing else is in flight, are served by the reading
//!   thread itself.
//! - A bad request (out of range, write to a read-only export, unknown command or flag,
//!   block status without a negotiated context) gets an error reply and the connection
//!   goes on; a request that breaks framing (bad magic, oversized write) closes the
//!   connection. On disconnect, requests already read finish and are answered first. A
//!   client that ends negotiation (`ABORT`, an unknown export) sees the connection closed.
//! - A failure of the disk goes out as the errno of its [`disk::ErrorKind`] (no space:
//!   `ENOSPC`; read-only or permission denied: `EPERM`; invalid: `EINVAL`; unsupported:
//!   `ENOTSUP`; anything else: `EIO`), decided in one place.
//! - [`Export::swap`] replaces the disk behind the export without clients reconnecting:
//!   it waits for requests in flight, so callers switch a running VM's disk while QEMU is
//!   paused (QEMU drains its requests on pause) and the guest never sees the switch.

#![forbid(unsafe_code)]

mod conn;
pub mod proto;

use disk::Disk;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

/// Errors of the server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A socket call failed.
    #[error("socket i/o failed")]
    Io(#[source] std::io::Error),
    /// The socket path is taken by a live server.
    #[error("{} is in use by another server", path.display())]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// Binding the socket failed.
    #[error("cannot listen on {}", path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The client broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A swap offered a disk of another size.
    #[error("the new disk has {new} bytes, the export {old}")]
    SizeMismatch {
        /// The export's size.
        old: u64,
        /// The offered disk's size.
        new: u64,
    },
    /// The disk failed (flushing it when the server stops).
    #[error("the served disk failed")]
    Disk(#[source] disk::Error),
}

impl Error {
    /// What kind of failure this is (see [`disk::ErrorKind`]).
    pub fn kind(&self) -> disk::ErrorKind {
        use disk::ErrorKind;
        match self {
            Error::Io(e) | Error::Bind { source: e, .. } => ErrorKind::of_io(e),
            Error::InUse { .. } => ErrorKind::Busy,
            Error::Protocol(_) | Error::SizeMismatch { .. } => ErrorKind::Invalid,
            Error::Disk(e) => e.kind(),
        }
    }
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A disk served under a name.
pub struct Export {
    name: String,
    read_only: bool,
    disk: RwLock<Arc<dyn Disk>>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl Export {
    /// Serves `disk` as `name`; read-only when asked or when the disk is.
    pub fn new(name: &str, disk: Arc<dyn Disk>, read_only: bool) -> Export {
        Export {
            name: name.to_owned(),
            read_only: read_only || disk.is_read_only(),
            disk: RwLock::new(disk),
        }
    }

    /// The export's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.disk_guard().size()
    }

    /// Replaces the disk once no request is in flight; returns the previous one.
    pub fn swap(&self, disk: Arc<dyn Disk>) -> Result<Arc<dyn Disk>> {
        let mut guard = self.disk.write().unwrap_or_else(|p| p.into_inner());
        if guard.size() != disk.size() {
            return Err(Error::SizeMismatch {
                old: guard.size(),
                new: disk.size(),
            });
        }
        Ok(std::mem::replace(&mut *guard, disk))
    }

    /// The current disk (flushing it, for example).
    pub fn disk(&self) -> Arc<dyn Disk> {
        self.disk_guard().clone()
    }

    fn disk_guard(&self) -> RwLockReadGuard<'_, Arc<dyn Disk>> {
        self.disk.read().unwrap_or_else(|p| p.into_inner())
    }

    fn answers_to(&self, name: &str) -> bool {
        name.is_empty() || name == self.name
    }

    fn transmission_flags(&self) -> u16 {
        use proto::*;
        let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_DF | TF_CAN_MULTI_CONN | TF_SEND_CACHE;
        if self.read_only {
            f |= TF_READ_ONLY;
        } else {
            f |= TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES;
        }
        f
    }
}

/// A listening server.
#[derive(Debug)]
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
    export: Arc<Export>,
    stopping: Arc<AtomicBool>,
}

/// Stops a [`Server::run`] from another thread.
#[derive(Clone, Debug)]
pub struct Stopper {
    path: PathBuf,
    stopping: Arc<AtomicBool>,
}

impl Stopper {
    /// Makes `run` stop accepting, disconnect clients, and return.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wakes the accept call.
        let _ = UnixStream::connect(&self.path);
    }
}

impl Server {
    /// Listens on `socket`. A stale socket file (nobody listening) is replaced; a live one
    /// is refused.
    pub fn bind(socket: &Path, export: Arc<Export>) -> Result<Server> {
        if socket.exists() {
            if UnixStream::connect(socket).is_ok() {
                return Err(Error::InUse {
                    path: socket.to_owned(),
                });
            }
            let _ = std::fs::remove_file(socket);
        }
        let listener = UnixListener::bind(socket).map_err(|e| Error::Bind {
            path: socket.to_owned(),
            source: e,
        })?;
        Ok(Server {
            listener,
            path: socket.to_owned(),
            export,
            stopping: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The export served.
    pub fn export(&self) -> &Arc<Export> {
        &self.export
    }

    /// A handle that stops [`Server::run`].
    pub fn stopper(&self) -> Stopper {
        Stopper {
            path: self.path.clone(),
            stopping: self.stopping.clone(),
        }
    }

    /// Accepts clients (each on its own thread) until stopped; then disconnects them, waits
    /// for their requests in flight, flushes the disk, and removes the socket file.
    pub fn run(&self) -> Result<()> {
        // Each client's thread, with a handle on its socket to disconnect it at the stop;
        // both are dropped once the thread is done, so the socket closes with it.
        let mut clients: Vec<(std::thread::JoinHandle<()>, Option<UnixStream>)> = Vec::new();
        for stream in self.listener.incoming() {
            if self.stopping.load(Ordering::SeqCst) {
                break;
            }
            let stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("accepting a client: {e}");
                    continue;
                }
            };
            let handle = stream.try_clone().ok();
            let export = self.export.clone();
            let thread = std::thread::spawn(move || {
                if let Err(e) = conn::serve(stream, export) {
                    tracing::debug!("client connection ended: {e}");
                }
            });
            clients.retain(|(t, _)| !t.is_finished());
            clients.push((thread, handle));
        }
        for (_, handle) in &clients {
            if let Some(s) = handle {
                let _ = s.shutdown(std::net::Shutdown::Read);
            }
        }
        for (t, _) in clients {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
        self.export.disk().flush().map_err(Error::Disk)
    }
}

/// Serves one client over any pair of byte streams on the calling thread, answering each
/// request before reading the next: the negotiation, request parsing, execution and
/// replies of [`Server`], without its threads. For fuzzing and protocol tests. Returns at
/// the end of the input, after `NBD_OPT_ABORT` or `NBD_CMD_DISC`, or with an error at the
/// first request that breaks framing.
pub fn serve_stream(input: impl Read, output: impl Write, export: &Export) -> Result<()> {
    conn::serve_sequential(input, output, export)
}
