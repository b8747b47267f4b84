//! Where a repository's objects live: object semantics behind a small trait.
//!
//! A [`Backend`] stores named immutable objects: `put` (whole object, atomically visible,
//! replacing any object of that name), `put_new` (create only if absent), `get`, `list` by
//! prefix, `delete`, and `sync` (a durability barrier). There is no append and no in-place
//! rewrite, so an S3 bucket (PUT, PUT with `If-None-Match: *`, GET, LIST, DELETE; every
//! operation durable on return, `sync` a no-op) implements it without a format change.
//!
//! [`FolderBackend`] keeps each object in a file of that name under a folder. A `put`
//! writes a temporary file in the object's folder, syncs it, and renames it over the name:
//! readers see the old object or the new one, never a part. The temporary name says whose
//! it is, so that [`Backend::remove_abandoned`] (run by gc) removes those a killed writer
//! left. The rename becomes durable when
//! the folder is synced: `sync` syncs every folder that the backend renamed into since the
//! last `sync`, and the folders it is given (renames made by other processes included),
//! which the commit of a recovery point needs for chunks it reuses (see the crate doc).
//! Syncing a folder costs a device cache flush even when nothing in it changed, so commits
//! name only the folders that may hold renames not yet durable.

use crate::error::{Error, Result};
use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

/// One object found by [`Backend::list`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Its full name.
    pub key: String,
    /// Stored size in bytes.
    pub size: u64,
    /// When it was last written.
    pub modified: SystemTime,
}

/// Object storage: what a repository needs of the place that keeps it.
///
/// Keys are `/`-separated relative names of ASCII letters, digits, `-`, `_` and `.`.
/// Every method may be called from many threads at once.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Stores `data` under `key`, replacing any object of that name. Atomic: readers see the
    /// whole old object or the whole new one. Durable after the next [`Backend::sync`].
    fn put(&self, key: &str, data: &[u8]) -> Result<()>;
    /// Stores `data` under `key` only if no object has that name; returns whether it did.
    fn put_new(&self, key: &str, data: &[u8]) -> Result<bool>;
    /// Reads a whole object; [`Error::Missing`] if absent.
    fn get(&self, key: &str) -> Result<Vec<u8>>;
    /// Every object whose key starts with `prefix` (which ends with `/`), in no given order.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>>;
    /// Whether an object exists.
    fn exists(&self, key: &str) -> Result<bool>;
    /// Removes an object; removing an absent one succeeds.
    fn delete(&self, key: &str) -> Result<()>;
    /// Makes every completed `put`/`delete` of this backend durable, and those that other
    /// writers of the same storage completed under the folders `also` (key prefixes
    /// without the trailing `/`).
    fn sync(&self, also: &[String]) -> Result<()>;
    /// A human-readable location for messages.
    fn location(&self) -> String;
    /// Removes what puts of writers that died left half done (never visible as objects),
    /// and returns how many it removed. A backend whose puts leave nothing behind (object
    /// storage) has nothing to do.
    fn remove_abandoned(&self) -> Result<u64> {
        Ok(0)
    }
}

/// How a temporary file's name says whose it is: `.tmp-<host>-<pid>-<start>-<n>`, `host`
/// the first 8 hex digits of the BLAKE3 hash of the host name, `start` the process's
/// start time (see [`crate::lease`]), `n` unique within the process.
fn temp_name(n: u64) -> String {
    let me = crate::owner::me();
    format!(
        ".tmp-{}-{}-{}-{n}",
        host_tag(&me.host),
        me.pid,
        me.pid_start
    )
}

fn host_tag(host: &str) -> String {
    crate::format::hex(&blake3::hash(host.as_bytes()).as_bytes()[..4])
}

/// Whether the temporary file `name`, last written at `modified`, belongs to a writer that
/// died: one of this host whose process is gone, or (another host's, or an older name
/// without its owner) one untouched for [`crate::owner::STALE_AFTER`], far longer than
/// any put.
fn abandoned(name: &str, modified: SystemTime) -> bool {
    let Some(rest) = name.strip_prefix(".tmp-") else {
        return false;
    };
    let me = crate::owner::me();
    let parts: Vec<&str> = rest.split('-').collect();
    if let [host, pid, start, _] = parts[..]
        && host == host_tag(&me.host)
        && let (Ok(pid), Ok(start)) = (pid.parse::<u32>(), start.parse::<u64>())
    {
        return !crate::owner::alive(&me.host, pid, start, 0);
    }
    SystemTime::now()
        .duration_since(modified)
        .is_ok_and(|age| age > crate::owner::STALE_AFTER)
}

/// Alignment of memory, offsets and lengths of direct writes.
const DIRECT_ALIGN: usize = 4096;
/// Objects at least this long are written with `O_DIRECT` (all but their last partial
/// page): the data goes from our buffer to the device instead of being copied into the page
/// cache and written back later; a profile of full backups showed that copy as the largest
/// cost after compression. Small objects (manifests, leases) go through the page cache.
const DIRECT_MIN: usize = 256 << 10;

thread_local! {
    /// Each writer thread's aligned staging buffer for direct writes.
    static STAGING: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Writes `data` (a multiple of [`DIRECT_ALIGN`] long) at offset 0 of `path` with `O_DIRECT`.
fn write_direct(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let direct = OpenOptions::new()
        .write(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(path)?;
    STAGING.with(|staging| {
        let mut staging = staging.borrow_mut();
        if staging.len() < data.len() + DIRECT_ALIGN {
            *staging = vec![0u8; data.len() + DIRECT_ALIGN];
        }
        let start = (DIRECT_ALIGN - staging.as_ptr() as usize % DIRECT_ALIGN) % DIRECT_ALIGN;
        let aligned = &mut staging[start..start + data.len()];
        aligned.copy_from_slice(data);
        direct.write_all_at(aligned, 0)
    })
}

/// Folder syncs in flight at once.
const SYNC_THREADS: usize = 16;

/// A repository in a local folder, one file per object.
#[derive(Debug)]
pub struct FolderBackend {
    root: PathBuf,
    /// Folders renamed into (or removed from) since the last sync.
    dirty: Mutex<HashSet<PathBuf>>,
    /// Makes temporary names unique within the process.
    counter: AtomicU64,
    /// Whether the file system takes direct writes (until one is refused).
    direct: std::sync::atomic::AtomicBool,
}

impl FolderBackend {
    /// A backend over `root` (which must exist to be read from).
    pub fn new(root: &Path) -> FolderBackend {
        FolderBackend {
            root: root.to_owned(),
            dirty: Mutex::new(HashSet::new()),
            counter: AtomicU64::new(0),
            direct: std::sync::atomic::AtomicBool::new(true),
        }
    }

    /// The folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        let ok = !key.is_empty()
            && key.split('/').all(|part| {
                !part.is_empty()
                    && part != "."
                    && part != ".."
                    && !part.starts_with('.')
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            });
        if !ok {
            return Err(Error::Invalid(format!("invalid object name {key:?}")));
        }
        Ok(self.root.join(key))
    }

    /// An error of a write: a full storage is one clear error, whatever object it hit.
    fn write_error(&self, key: &str, e: std::io::Error) -> Error {
        match e.kind() {
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => Error::NoSpace {
                location: self.root.display().to_string(),
            },
            _ => Error::io(key, e),
        }
    }

    /// Writes `data` to a new temporary file in `dir` and syncs it.
    fn write_temp(&self, dir: &Path, key: &str, data: &[u8]) -> Result<PathBuf> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(temp_name(n));
        let write = || -> std::io::Result<()> {
            let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            let direct_len = data.len() / DIRECT_ALIGN * DIRECT_ALIGN;
            if direct_len >= DIRECT_MIN && self.direct.load(Ordering::Relaxed) {
                match write_direct(&tmp, &data[..direct_len]) {
                    Ok(()) => {
                        f.write_all_at(&data[direct_len..], direct_len as u64)?;
                        return f.sync_data();
                    }
                    // A file system without direct I/O: buffered from now on.
                    Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
                        self.direct.store(false, Ordering::Relaxed);
                    }
                    Err(e) => return Err(e),
                }
            }
            f.write_all(data)?;
            f.sync_data()
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(self.write_error(key, e));
        }
        Ok(tmp)
    }

    fn ensure_dir(&self, key: &str, dir: &Path) -> Result<()> {
        if !dir.is_dir() {
            std::fs::create_dir_all(dir).map_err(|e| self.write_error(key, e))?;
            // The new folder's own entry must survive a crash too.
            if let Some(parent) = dir.parent() {
                self.dirty.lock().unwrap().insert(parent.to_owned());
            }
        }
        Ok(())
    }

    fn mark_dirty(&self, dir: &Path) {
        let mut dirty = self.dirty.lock().unwrap();
        if !dirty.contains(dir) {
            dirty.insert(dir.to_owned());
        }
    }
}

fn parent(p: &Path) -> &Path {
    p.parent().unwrap_or(Path::new("."))
}

impl Backend for FolderBackend {
    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        let path = self.path(key)?;
        let dir = parent(&path);
        self.ensure_dir(key, dir)?;
        let tmp = self.write_temp(dir, key, data)?;
        if let Err(e) = std::fs::rename(&tmp, &path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(self.write_error(key, e));
        }
        self.mark_dirty(dir);
        Ok(())
    }

    fn put_new(&self, key: &str, data: &[u8]) -> Result<bool> {
        let path = self.path(key)?;
        let dir = parent(&path);
        self.ensure_dir(key, dir)?;
        let tmp = self.write_temp(dir, key, data)?;
        // link(2) fails if the name exists: an atomic create-if-absent of a whole file.
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                self.mark_dirty(dir);
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(self.write_error(key, e)),
        }
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        let path = self.path(key)?;
        match std::fs::read(&path) {
            Ok(v) => Ok(v),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::Missing {
                what: key.to_owned(),
            }),
            Err(e) => Err(Error::io(key, e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let prefix = prefix.trim_end_matches('/');
        let dir = self.path(prefix)?;
        let mut out = Vec::new();
        let mut stack = vec![(dir, prefix.to_owned())];
        while let Some((dir, key)) = stack.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(&key, e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| Error::io(&key, e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue; // temporary files of writers in progress
                }
                let child = format!("{key}/{name}");
                let meta = match entry.metadata() {
                    Ok(m) => m,
                    // Deleted between readdir and stat: not there any more.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(Error::io(&child, e)),
                };
                if meta.is_dir() {
                    stack.push((entry.path(), child));
                } else {
                    let modified = SystemTime::UNIX_EPOCH
                        + Duration::new(meta.mtime().max(0) as u64, meta.mtime_nsec() as u32);
                    out.push(ObjectInfo {
                        key: child,
                        size: meta.len(),
                        modified,
                    });
                }
            }
        }
        Ok(out)
    }

    fn exists(&self, key: &str) -> Result<bool> {
        let path = self.path(key)?;
        match std::fs::symlink_metadata(&path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io(key, e)),
        }
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        match std::fs::remove_file(&path) {
            Ok(()) => {
                self.mark_dirty(parent(&path));
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(key, e)),
        }
    }

    fn sync(&self, also: &[String]) -> Result<()> {
        let mut dirs: Vec<PathBuf> = self.dirty.lock().unwrap().drain().collect();
        for prefix in also {
            let dir = self.path(prefix)?;
            // The folder's own entry, too.
            dirs.push(parent(&dir).to_owned());
            dirs.push(dir);
        }
        dirs.sort();
        dirs.dedup();
        // Each folder sync may cost a device cache flush; flushes issued together are
        // merged by the block layer, so sync the folders from several threads at once.
        let next = std::sync::atomic::AtomicUsize::new(0);
        let failed: Mutex<Option<Error>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..dirs.len().min(SYNC_THREADS) {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(dir) = dirs.get(i) else { return };
                        match File::open(dir).and_then(|f| f.sync_all()) {
                            Ok(()) => {}
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                            Err(e) => {
                                failed
                                    .lock()
                                    .unwrap()
                                    .get_or_insert(Error::io(dir.display().to_string(), e));
                            }
                        }
                    }
                });
            }
        });
        if let Some(e) = failed.into_inner().unwrap() {
            // Keep them all for the next attempt.
            self.dirty.lock().unwrap().extend(dirs);
            return Err(e);
        }
        Ok(())
    }

    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn remove_abandoned(&self) -> Result<u64> {
        let mut removed = 0;
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(dir.display().to_string(), e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| Error::io(dir.display().to_string(), e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                // Only temporary files are looked at closer: the walk of a repository of
                // a million chunks stays one read of each folder.
                if !name.starts_with(".tmp-") {
                    if entry.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push(entry.path());
                    }
                    continue;
                }
                let meta = match entry.metadata() {
                    Ok(m) => m,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(Error::io(entry.path().display().to_string(), e)),
                };
                let modified = SystemTime::UNIX_EPOCH
                    + Duration::new(meta.mtime().max(0) as u64, meta.mtime_nsec() as u32);
                if !abandoned(&name, modified) {
                    continue;
                }
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => {
                        tracing::info!(file = %entry.path().display(), "removing the temporary file of a writer that died");
                        self.mark_dirty(&dir);
                        removed += 1;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::io(entry.path().display().to_string(), e)),
                }
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporaries_are_abandoned_when_their_writer_is_gone_or_long_silent() {
        let now = SystemTime::now();
        let old = now - crate::owner::STALE_AFTER - Duration::from_secs(60);
        // This process's own: alive, whatever its age.
        assert!(!abandoned(&temp_name(7), now));
        assert!(!abandoned(&temp_name(7), old));
        // A process of this host that ended.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let me = crate::owner::me();
        let dead = format!(".tmp-{}-{pid}-{}-0", host_tag(&me.host), me.pid_start);
        assert!(abandoned(&dead, now));
        // Another host's, and a name without its owner: only once long silent.
        for name in [".tmp-0badcafe-1-2-3", ".tmp-123-4"] {
            assert!(!abandoned(name, now), "{name}");
            assert!(abandoned(name, old), "{name}");
        }
        // Never anything but a temporary file.
        assert!(!abandoned("0123abcd", old));
        assert!(!abandoned(".other", old));
    }
}
