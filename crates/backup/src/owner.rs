//! Which process owns a lease, a marker or a temporary file, and whether it still runs:
//! on this host by pid and start time (a SIGKILLed owner is recognised at once), from
//! another host by how long ago it last renewed what it owns ([`STALE_AFTER`]).

use crate::point::to_ns;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

/// After how long without renewal another host's lease or marker counts as dead.
pub const STALE_AFTER: Duration = Duration::from_secs(30 * 60);

/// This process as leases name it.
#[derive(Clone, Debug)]
pub struct Owner {
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// Start time of the process in clock ticks since boot.
    pub pid_start: u64,
}

/// This process.
pub fn me() -> &'static Owner {
    static ME: OnceLock<Owner> = OnceLock::new();
    ME.get_or_init(|| {
        let pid = std::process::id();
        Owner {
            host: hostname(),
            pid,
            pid_start: pid_start(pid).unwrap_or(0),
        }
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

/// Field 22 of `/proc/PID/stat` (after the command name, which may hold spaces).
fn pid_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the owner of a lease or marker still runs.
pub fn alive(host: &str, pid: u32, start: u64, renewed_ns: i128) -> bool {
    if host == me().host {
        return pid_start(pid).is_some_and(|s| s == start || start == 0);
    }
    let age = to_ns(SystemTime::now()) - renewed_ns;
    age < STALE_AFTER.as_nanos() as i128
}
