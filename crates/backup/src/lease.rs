//! Leases of backups in progress and the garbage collector's marker, and how a process
//! tells whether the owner of either is still alive.
//!
//! A lease (`leases/<id>`) says "a backup runs and may rely on any chunk it has seen". It
//! is written before the backup lists anything, renewed every [`RENEW_EVERY`] by a
//! heartbeat thread, and removed when the backup commits or gives up. Its owner is dead
//! when, on the same host, no process has its pid and start time (a SIGKILLed backup is
//! recognised at once), or, from another host, when it has not been renewed for
//! [`STALE_AFTER`]. The same rule applies to the collector's marker (`gc/run`).

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::format::{GC_KEY, GcMarker, LEASES_PREFIX, Lease, hex};
pub use crate::owner::{Owner, STALE_AFTER, alive, me};
use crate::point::to_ns;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

/// How often a lease or marker is renewed.
pub const RENEW_EVERY: Duration = Duration::from_secs(60);
/// Whether a lease's owner still runs.
pub fn lease_alive(l: &Lease) -> bool {
    alive(&l.host, l.pid, l.pid_start, l.renewed_ns)
}

/// The live garbage collection's marker, if one runs. A marker whose owner is dead is
/// treated as absent.
pub fn read_gc(backend: &dyn Backend) -> Result<Option<GcMarker>> {
    let bytes = match backend.get(GC_KEY) {
        Err(e) if e.is_missing() => return Ok(None),
        r => r?,
    };
    // A marker that does not parse was half-written by nothing (puts are atomic): damage,
    // which must not block backups forever; treat it as absent and let the next gc replace it.
    let Ok(m) = crate::format::parse_json::<GcMarker>("gc marker", &bytes) else {
        return Ok(None);
    };
    Ok(alive(&m.host, m.pid, m.pid_start, m.renewed_ns).then_some(m))
}

/// Every lease in the repository.
pub fn list_leases(backend: &dyn Backend) -> Result<Vec<Lease>> {
    let mut out = Vec::new();
    for o in backend.list(&format!("{LEASES_PREFIX}/"))? {
        match backend.get(&o.key) {
            Ok(b) => {
                if let Ok(l) = crate::format::parse_json::<Lease>(&o.key, &b) {
                    out.push(l);
                } else {
                    // Unparseable: no process can renew it; remove it.
                    backend.delete(&o.key)?;
                }
            }
            Err(e) if e.is_missing() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// A held lease (or gc marker): renewed by a heartbeat thread, removed on drop.
#[derive(Debug)]
pub struct Held {
    key: String,
    id: String,
    lost: Arc<AtomicBool>,
    stop: Option<Sender<()>>,
    heartbeat: Option<JoinHandle<()>>,
    backend: Arc<dyn Backend>,
    body: Arc<Mutex<serde_json::Value>>,
}

impl Held {
    /// Takes a new lease for a backup.
    pub fn lease(backend: &Arc<dyn Backend>) -> Result<Held> {
        let id = hex(&crate::crypto::random::<16>());
        let key = format!("{LEASES_PREFIX}/{id}");
        let now = to_ns(SystemTime::now());
        let me = me();
        let lease = Lease {
            id: id.clone(),
            host: me.host.clone(),
            pid: me.pid,
            pid_start: me.pid_start,
            started_ns: now,
            renewed_ns: now,
        };
        let bytes = serde_json::to_vec(&lease).expect("lease serializes");
        backend.put(&key, &bytes)?;
        backend.sync(&[])?;
        let body = serde_json::to_value(&lease).expect("lease serializes");
        Ok(Held::start(backend, key, id, body))
    }

    /// Takes the gc marker; [`Error::GcRunning`] if a live collection holds it. A dead
    /// collection's marker is replaced.
    pub fn gc_marker(backend: &Arc<dyn Backend>) -> Result<(Held, GcMarker)> {
        let me = me();
        let now = to_ns(SystemTime::now());
        let marker = GcMarker {
            id: hex(&crate::crypto::random::<16>()),
            host: me.host.clone(),
            pid: me.pid,
            pid_start: me.pid_start,
            started_ns: now,
            renewed_ns: now,
            phase: "marking".into(),
            waits_for: Vec::new(),
        };
        let bytes = serde_json::to_vec(&marker).expect("marker serializes");
        for _ in 0..3 {
            if backend.put_new(GC_KEY, &bytes)? {
                backend.sync(&[])?;
                let body = serde_json::to_value(&marker).expect("marker serializes");
                let held = Held::start(backend, GC_KEY.into(), marker.id.clone(), body);
                return Ok((held, marker));
            }
            let bytes = match backend.get(GC_KEY) {
                Err(e) if e.is_missing() => continue,
                r => r?,
            };
            let dead = match crate::format::parse_json::<GcMarker>("gc marker", &bytes) {
                Ok(m) if alive(&m.host, m.pid, m.pid_start, m.renewed_ns) => {
                    return Err(Error::GcRunning {
                        pid: m.pid,
                        host: m.host,
                    });
                }
                Ok(m) => m.id,
                Err(_) => hex(blake3::hash(&bytes).as_bytes()),
            };
            // Two collectors may find the same dead marker: only the one that creates its
            // takeover object removes it, so a live marker the other put meanwhile is never
            // removed by mistake. Takeover objects stay (one per dead collector, empty).
            if backend.put_new(&format!("gc/takeover-{dead}"), b"")? {
                tracing::info!("removing the marker of a garbage collection that died");
                backend.delete(GC_KEY)?;
            }
        }
        Err(Error::GcRunning {
            pid: 0,
            host: "unknown".into(),
        })
    }

    fn start(backend: &Arc<dyn Backend>, key: String, id: String, body: serde_json::Value) -> Held {
        let body = Arc::new(Mutex::new(body));
        let lost = Arc::new(AtomicBool::new(false));
        let (stop, stopped) = channel::<()>();
        let heartbeat = {
            let backend = Arc::clone(backend);
            let key = key.clone();
            let lost = Arc::clone(&lost);
            let body = Arc::clone(&body);
            std::thread::spawn(move || {
                loop {
                    match stopped.recv_timeout(RENEW_EVERY) {
                        Err(RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                    // Never bring back a lease that a collector removed as stale: the
                    // collector no longer waits for it.
                    if !backend.exists(&key).unwrap_or(true) {
                        lost.store(true, Ordering::SeqCst);
                        return;
                    }
                    let bytes = {
                        let mut b = body.lock().unwrap();
                        b["renewed_ns"] = serde_json::json!(to_ns(SystemTime::now()));
                        serde_json::to_vec(&*b).expect("serializes")
                    };
                    let _ = backend.put(&key, &bytes);
                }
            })
        };
        Held {
            key,
            id,
            lost,
            stop: Some(stop),
            heartbeat: Some(heartbeat),
            backend: Arc::clone(backend),
            body,
        }
    }

    /// The lease's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether the lease is still there (a collector removes only leases it judged dead).
    pub fn still_held(&self) -> Result<bool> {
        Ok(!self.lost.load(Ordering::SeqCst) && self.backend.exists(&self.key)?)
    }

    /// Changes the object (the gc marker when its phase changes) and writes it.
    pub fn update(&self, change: impl FnOnce(&mut serde_json::Value)) -> Result<()> {
        let bytes = {
            let mut b = self.body.lock().unwrap();
            change(&mut b);
            serde_json::to_vec(&*b).expect("serializes")
        };
        self.backend.put(&self.key, &bytes)?;
        self.backend.sync(&[])
    }

    /// Stops the heartbeat and removes the object.
    pub fn release(mut self) -> Result<()> {
        self.stop_heartbeat();
        let r = self.backend.delete(&self.key);
        self.key.clear();
        r?;
        self.backend.sync(&[])
    }

    fn stop_heartbeat(&mut self) {
        drop(self.stop.take());
        if let Some(h) = self.heartbeat.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.stop_heartbeat();
        if !self.key.is_empty() {
            let _ = self.backend.delete(&self.key);
            let _ = self.backend.sync(&[]);
        }
    }
}
