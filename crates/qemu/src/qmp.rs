//! The QMP client.

use crate::{Error, Result, command_error};
use serde_json::{Value, json};
use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// An asynchronous event QEMU sent.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// Its name (`STOP`, `SHUTDOWN`, ...).
    pub name: String,
    /// Its data (`null` when none).
    pub data: Value,
    /// When QEMU emitted it, microseconds since the Unix epoch (0 when it gave none).
    pub micros: u64,
}

#[derive(Default)]
struct Inbox {
    replies: HashMap<u64, Value>,
    events: VecDeque<Event>,
    closed: bool,
}

/// A QMP connection in command mode.
pub struct Qmp {
    writer: Mutex<UnixStream>,
    inbox: Arc<(Mutex<Inbox>, Condvar)>,
    next_id: AtomicU64,
    version: Value,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("version", &self.version)
            .finish()
    }
}

const WHAT: &str = "QMP";

impl Qmp {
    /// Connects, reads the greeting and enters command mode, within `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp> {
        let stream = UnixStream::connect(path).map_err(|e| Error::Connect {
            path: path.to_owned(),
            source: e,
        })?;
        let io = |e| Error::Io {
            what: WHAT,
            source: e,
        };
        stream.set_read_timeout(Some(timeout)).map_err(io)?;
        let mut reader = BufReader::new(stream.try_clone().map_err(io)?);
        let mut line = String::new();
        reader.read_line(&mut line).map_err(io)?;
        let greeting: Value = serde_json::from_str(&line).map_err(|_| Error::Protocol {
            what: WHAT,
            message: line.clone(),
        })?;
        let version = greeting["QMP"]["version"].clone();
        if version.is_null() {
            return Err(Error::Protocol {
                what: WHAT,
                message: line,
            });
        }
        stream.set_read_timeout(None).map_err(io)?;
        let inbox: Arc<(Mutex<Inbox>, Condvar)> = Arc::default();
        let reader_inbox = inbox.clone();
        std::thread::spawn(move || read_loop(reader, reader_inbox));
        let qmp = Qmp {
            writer: Mutex::new(stream),
            inbox,
            next_id: AtomicU64::new(1),
            version,
        };
        qmp.execute("qmp_capabilities", Value::Null, timeout)?;
        Ok(qmp)
    }

    /// QEMU's version as the greeting gave it.
    pub fn version(&self) -> &Value {
        &self.version
    }

    /// Runs a command and returns its `return` value.
    pub fn execute(&self, command: &str, arguments: Value, timeout: Duration) -> Result<Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({ "execute": command, "id": id });
        if !arguments.is_null() {
            msg["arguments"] = arguments;
        }
        let mut line = serde_json::to_vec(&msg).expect("serializes");
        line.push(b'\n');
        self.writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write_all(&line)
            .map_err(|e| Error::Io {
                what: WHAT,
                source: e,
            })?;
        let (lock, cvar) = &*self.inbox;
        let deadline = Instant::now() + timeout;
        let mut inbox = lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(reply) = inbox.replies.remove(&id) {
                if let Some(err) = reply.get("error") {
                    return Err(command_error(command, err));
                }
                return Ok(reply.get("return").cloned().unwrap_or(Value::Null));
            }
            if inbox.closed {
                return Err(Error::Closed(WHAT));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    what: WHAT,
                    command: command.to_owned(),
                    seconds: timeout.as_secs_f64(),
                });
            }
            inbox = cvar
                .wait_timeout(inbox, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Waits for the next queued event named `name` (earlier events of other names stay
    /// queued).
    pub fn wait_event(&self, name: &str, timeout: Duration) -> Result<Event> {
        let (lock, cvar) = &*self.inbox;
        let deadline = Instant::now() + timeout;
        let mut inbox = lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(i) = inbox.events.iter().position(|e| e.name == name) {
                return Ok(inbox.events.remove(i).expect("found"));
            }
            if inbox.closed {
                return Err(Error::Closed(WHAT));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    what: WHAT,
                    command: format!("event {name}"),
                    seconds: timeout.as_secs_f64(),
                });
            }
            inbox = cvar
                .wait_timeout(inbox, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Takes every queued event.
    pub fn drain_events(&self) -> Vec<Event> {
        let (lock, _) = &*self.inbox;
        lock.lock()
            .unwrap_or_else(|p| p.into_inner())
            .events
            .drain(..)
            .collect()
    }

    /// The run state (`running`, `paused`, `shutdown`, ...).
    pub fn status(&self, timeout: Duration) -> Result<String> {
        let v = self.execute("query-status", Value::Null, timeout)?;
        Ok(v["status"].as_str().unwrap_or("unknown").to_owned())
    }
}

fn read_loop(mut reader: BufReader<UnixStream>, inbox: Arc<(Mutex<Inbox>, Condvar)>) {
    let (lock, cvar) = &*inbox;
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            tracing::warn!("QMP sent a line that is not JSON: {line:?}");
            continue;
        };
        let mut guard = lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(name) = v.get("event").and_then(Value::as_str) {
            let ts = &v["timestamp"];
            guard.events.push_back(Event {
                name: name.to_owned(),
                data: v.get("data").cloned().unwrap_or(Value::Null),
                micros: ts["seconds"].as_u64().unwrap_or(0) * 1_000_000
                    + ts["microseconds"].as_u64().unwrap_or(0),
            });
        } else if let Some(id) = v.get("id").and_then(Value::as_u64) {
            guard.replies.insert(id, v);
        } else {
            tracing::warn!("QMP reply without an id: {line:?}");
        }
        cvar.notify_all();
    }
    lock.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
    cvar.notify_all();
}
