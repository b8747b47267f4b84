//! `vm console`: one client on a running VM's serial console.
//!
//! QEMU listens on `run/console.sock` (see [`crate::machine`]) and takes one client at a
//! time; a second connection would wait silently in the socket's backlog until the first
//! goes. So a client first takes `run/console.lock` (an advisory lock, held as long as
//! its [`Console`] lives, released by the kernel when the process ends however it ends)
//! and a second client is refused, naming the first one's pid, rather than hanging.
//!
//! Detaching closes the connection only: QEMU listens again and the guest runs on. The
//! serial log is written whether or not a client is attached.

use crate::error::{Error, Result};
use crate::host::VmHandle;
use crate::machine;
use crate::record::RunStatus;
use crate::run_state::RUN_DIR;
use std::fs::{File, TryLockError};
use std::io::{Read, Seek, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

/// The lock a console client holds, in the VM's run folder.
pub const CONSOLE_LOCK: &str = "console.lock";

/// A connection to a running VM's serial console: bytes written go to the guest's serial
/// port, bytes read are what the guest writes there from now on. Dropping it detaches.
#[derive(Debug)]
pub struct Console {
    stream: UnixStream,
    log: PathBuf,
    _lock: File,
}

impl Console {
    /// The connection (clone it with `try_clone` to read and write from two threads).
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// The serial log of this run, which holds what the guest wrote before the attach.
    pub fn log(&self) -> &std::path::Path {
        &self.log
    }
}

impl VmHandle<'_> {
    /// Attaches to the serial console of the running (or paused) VM. Fails when it is not
    /// running, or when another client is attached (one at a time; see the module doc).
    pub fn console(&self) -> Result<Console> {
        let dir = self.dir()?;
        let state = RunStatus::read(&dir).state;
        if !state.is_live() {
            return Err(Error::ConsoleNotRunning {
                vm: self.name().to_owned(),
                state,
            });
        }
        let lock_path = dir.join(RUN_DIR).join(CONSOLE_LOCK);
        let mut lock = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| Error::io(&lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = lock.read_to_string(&mut holder);
                return Err(Error::ConsoleBusy {
                    vm: self.name().to_owned(),
                    pid: holder.trim().parse().ok(),
                });
            }
            Err(TryLockError::Error(e)) => return Err(Error::io(&lock_path, e)),
        }
        // Who holds it, for the refusal of the next client (advice only: the lock decides).
        let _ = lock
            .set_len(0)
            .and_then(|()| lock.rewind())
            .and_then(|()| write!(lock, "{}", std::process::id()));
        let socket = machine::console_socket(&dir);
        let log = machine::serial_log(&dir);
        if !socket.exists() {
            return Err(Error::NoConsoleSocket {
                vm: self.name().to_owned(),
                log,
            });
        }
        let stream = UnixStream::connect(&socket).map_err(|e| Error::io(&socket, e))?;
        Ok(Console {
            stream,
            log,
            _lock: lock,
        })
    }

    /// The VM's current serial log (this run's, or the last run's when it is off).
    pub fn serial_log(&self) -> Result<PathBuf> {
        Ok(machine::serial_log(&self.dir()?))
    }

    /// The VM's earlier serial logs that are kept, newest first.
    pub fn older_serial_logs(&self) -> Result<Vec<PathBuf>> {
        Ok(machine::older_serial_logs(&self.dir()?))
    }
}
