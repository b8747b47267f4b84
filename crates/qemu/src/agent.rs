//! The guest-agent (qemu-ga) client.

use crate::{Error, Result, command_error};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const WHAT: &str = "guest agent";

/// A connection to the guest agent's host-side socket.
#[derive(Debug)]
pub struct GuestAgent {
    path: PathBuf,
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl GuestAgent {
    /// Connects and synchronises within `timeout` (fails with a timeout when no agent
    /// runs in the guest).
    pub fn connect(path: &Path, timeout: Duration) -> Result<GuestAgent> {
        let stream = UnixStream::connect(path).map_err(|e| Error::Connect {
            path: path.to_owned(),
            source: e,
        })?;
        let reader = BufReader::new(stream.try_clone().map_err(io)?);
        let mut agent = GuestAgent {
            path: path.to_owned(),
            stream,
            reader,
        };
        agent.sync(timeout)?;
        Ok(agent)
    }

    /// The socket.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn sync(&mut self, timeout: Duration) -> Result<()> {
        let id = u64::from(std::process::id()) << 20 ^ nanos();
        let mut msg = vec![0xffu8];
        msg.extend_from_slice(
            &serde_json::to_vec(
                &json!({"execute": "guest-sync-delimited", "arguments": {"id": id}}),
            )
            .expect("serializes"),
        );
        msg.push(b'\n');
        self.stream.write_all(&msg).map_err(io)?;
        let deadline = Instant::now() + timeout;
        loop {
            // Skip to the agent's 0xFF, then read the line after it.
            let mut junk = Vec::new();
            self.read_until(0xff, &mut junk, deadline, "guest-sync-delimited")?;
            if junk.last() != Some(&0xff) {
                continue;
            }
            let line = self.read_line(deadline, "guest-sync-delimited")?;
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && v["return"].as_u64() == Some(id)
            {
                return Ok(());
            }
        }
    }

    fn set_deadline(&self, deadline: Instant, command: &str) -> Result<()> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Timeout {
                what: WHAT,
                command: command.to_owned(),
                seconds: 0.0,
            });
        }
        self.stream.set_read_timeout(Some(left)).map_err(io)
    }

    fn read_until(
        &mut self,
        byte: u8,
        buf: &mut Vec<u8>,
        deadline: Instant,
        command: &str,
    ) -> Result<()> {
        self.set_deadline(deadline, command)?;
        match self.reader.read_until(byte, buf) {
            Ok(0) => Err(Error::Closed(WHAT)),
            Ok(_) => Ok(()),
            Err(e) if is_timeout(&e) => Err(Error::Timeout {
                what: WHAT,
                command: command.to_owned(),
                seconds: 0.0,
            }),
            Err(e) => Err(io(e)),
        }
    }

    fn read_line(&mut self, deadline: Instant, command: &str) -> Result<String> {
        let mut buf = Vec::new();
        self.read_until(b'\n', &mut buf, deadline, command)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    /// Runs a command and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value, timeout: Duration) -> Result<Value> {
        let mut msg = json!({ "execute": command });
        if !arguments.is_null() {
            msg["arguments"] = arguments;
        }
        let mut line = serde_json::to_vec(&msg).expect("serializes");
        line.push(b'\n');
        self.stream.write_all(&line).map_err(io)?;
        let deadline = Instant::now() + timeout;
        let reply = self.read_line(deadline, command).map_err(|e| match e {
            Error::Timeout { what, command, .. } => Error::Timeout {
                what,
                command,
                seconds: timeout.as_secs_f64(),
            },
            e => e,
        })?;
        let v: Value = serde_json::from_str(&reply).map_err(|_| Error::Protocol {
            what: WHAT,
            message: reply.clone(),
        })?;
        if let Some(err) = v.get("error") {
            return Err(command_error(command, err));
        }
        Ok(v.get("return").cloned().unwrap_or(Value::Null))
    }

    /// `guest-ping`.
    pub fn ping(&mut self, timeout: Duration) -> Result<()> {
        self.execute("guest-ping", Value::Null, timeout).map(|_| ())
    }

    /// `guest-fsfreeze-freeze`: flushes and freezes the guest's file systems; returns how
    /// many were frozen.
    pub fn freeze(&mut self, timeout: Duration) -> Result<u64> {
        let v = self.execute("guest-fsfreeze-freeze", Value::Null, timeout)?;
        Ok(v.as_u64().unwrap_or(0))
    }

    /// `guest-fsfreeze-thaw`; returns how many file systems were thawed.
    pub fn thaw(&mut self, timeout: Duration) -> Result<u64> {
        let v = self.execute("guest-fsfreeze-thaw", Value::Null, timeout)?;
        Ok(v.as_u64().unwrap_or(0))
    }

    /// Runs a program in the guest (`guest-exec`) and waits for it: its exit code and what
    /// it printed on stdout.
    pub fn exec(&mut self, path: &str, args: &[&str], timeout: Duration) -> Result<(i64, Vec<u8>)> {
        let deadline = Instant::now() + timeout;
        let started = self.execute(
            "guest-exec",
            json!({"path": path, "arg": args, "capture-output": true}),
            timeout,
        )?;
        let pid = started["pid"].as_i64().ok_or_else(|| Error::Protocol {
            what: WHAT,
            message: format!("guest-exec returned no pid: {started}"),
        })?;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let st = self.execute("guest-exec-status", json!({"pid": pid}), left)?;
            if st["exited"].as_bool() == Some(true) {
                let out = st["out-data"]
                    .as_str()
                    .map(base64_decode)
                    .unwrap_or_default();
                return Ok((st["exitcode"].as_i64().unwrap_or(-1), out));
            }
            if left.is_zero() {
                return Err(Error::Timeout {
                    what: WHAT,
                    command: format!("guest-exec {path}"),
                    seconds: timeout.as_secs_f64(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `guest-fsfreeze-status`: `thawed` or `frozen`.
    pub fn freeze_status(&mut self, timeout: Duration) -> Result<String> {
        let v = self.execute("guest-fsfreeze-status", Value::Null, timeout)?;
        Ok(v.as_str().unwrap_or("unknown").to_owned())
    }
}

fn io(e: std::io::Error) -> Error {
    Error::Io {
        what: WHAT,
        source: e,
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

fn nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::from(d.subsec_nanos()))
        .unwrap_or(0)
}

/// Decodes standard base64 (what qemu-ga uses for captured output); invalid characters
/// are skipped.
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for v in text.bytes().filter_map(value) {
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn decodes_base64() {
        assert_eq!(super::base64_decode("aGVsbG8gd29ybGQK"), b"hello world\n");
        assert_eq!(super::base64_decode("YQ=="), b"a");
        assert_eq!(super::base64_decode("YWI="), b"ab");
    }
}
