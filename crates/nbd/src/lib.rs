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
//! # Guarantees
//!
//! - `FLUSH` returns once every write completed before it is durable (the disk's own
//!   flush: for a VHDX chain, data synced and metadata committed through the log); a write
//!   with `FUA` is durable when answered.
//! - Requests run concurrently: one thread reads requests and up to eight serve them,
//!   answering in completion order (each reply written whole, never interleaved).
//! - A bad request (out of range, write to a read-only export, unknown command or flag,
//!   block status without a negotiated context) gets an error reply and the connection
//!   goes on; a request that breaks framing (bad magic, oversized write) closes the
//!   connection. On disconnect, requests already read finish and are answered first.
//! - [`Export::swap`] replaces the disk behind the export without clients reconnecting:
//!   it waits for requests in flight, so callers switch a running VM's disk while QEMU is
//!   paused (QEMU drains its requests on pause) and the guest never sees the switch.

#![forbid(unsafe_code)]

mod conn;
pub mod proto;

use disk::Disk;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

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
    clients: Arc<Mutex<Vec<UnixStream>>>,
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
            clients: Arc::new(Mutex::new(Vec::new())),
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
        let mut threads = Vec::new();
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
            if let Ok(s) = stream.try_clone() {
                self.clients
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(s);
            }
            let export = self.export.clone();
            threads.push(std::thread::spawn(move || {
                if let Err(e) = conn::serve(stream, export) {
                    tracing::debug!("client connection ended: {e}");
                }
            }));
            threads.retain(|t| !t.is_finished());
        }
        for c in self
            .clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = c.shutdown(std::net::Shutdown::Read);
        }
        for t in threads {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
        self.export
            .disk()
            .flush()
            .map_err(|e| Error::Io(std::io::Error::other(e)))
    }
}
