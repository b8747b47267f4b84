//! Durable file operations (atomic writes, whole folders built aside and renamed into
//! place), time formatting, and crash points for tests (the `testing` feature).

use crate::error::{Error, Result};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Writes `path` whole: a temporary sibling is written and synced, renamed over `path`,
/// and the folder is synced, so a crash leaves either the old or the new contents.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = vhdx::temp_name(path);
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    crashpoint("atomic write: temporary file written");
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    sync_dir_of(path)
}

/// Syncs the folder holding `path`.
pub fn sync_dir_of(path: &Path) -> Result<()> {
    vhdx::sync_parent_dir(path).map_err(|e| Error::io(path, e))
}

/// Syncs a folder itself.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// Removes a file if it exists, durably.
pub fn remove_file(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => sync_dir_of(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Removes a folder and everything in it if it exists, durably.
pub fn remove_dir_all(path: &Path) -> Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => sync_dir_of(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Makes a file read-only (a layer that belongs to a checkpoint) or writable again.
pub fn set_read_only(path: &Path, read_only: bool) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let mode = meta.permissions().mode();
    let wanted = if read_only {
        mode & !0o222
    } else {
        mode | 0o200
    };
    if wanted != mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(wanted))
            .map_err(|e| Error::io(path, e))?;
    }
    Ok(())
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `YYYY-MM-DD hh:mm:ss` (UTC) for seconds since the Unix epoch.
pub fn format_time(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The last component of a folder's path (a VM folder's name is its VM's name).
pub fn folder_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Builds a folder at `dest` (which must not exist, or be empty) under a temporary
/// sibling name and renames it into place, so `dest` appears whole or not at all.
pub fn write_folder_atomically(dest: &Path, build: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    match std::fs::read_dir(dest) {
        Ok(mut rd) => {
            if rd.next().is_some() {
                return Err(Error::InvalidArgument(format!(
                    "{} exists and is not empty; name a new folder",
                    dest.display()
                )));
            }
            std::fs::remove_dir(dest).map_err(|e| Error::io(dest, e))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(dest, e)),
    }
    let name = folder_name(dest);
    if name.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{} is not a folder name",
            dest.display()
        )));
    }
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "the folder {} does not exist",
            parent.display()
        )));
    }
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let result = build(&tmp).and_then(|()| {
        sync_dir(&tmp)?;
        std::fs::rename(&tmp, dest).map_err(|e| Error::io(dest, e))?;
        sync_dir(&parent)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Copies a file and syncs the copy.
pub fn copy_file(src: &Path, dst: &Path) -> Result<()> {
    // std::fs::copy uses copy_file_range: extents are shared or copied in the kernel.
    std::fs::copy(src, dst).map_err(|e| Error::io(src, e))?;
    std::fs::File::open(dst)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(dst, e))
}

/// Copies a folder recursively (hidden entries skipped), syncing every file and folder.
pub fn copy_tree(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst).map_err(|e| Error::io(dst, e))?;
    let rd = match std::fs::read_dir(src) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(src, e)),
    };
    for e in rd {
        let e = e.map_err(|e| Error::io(src, e))?;
        let name = e.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let ty = e.file_type().map_err(|err| Error::io(e.path(), err))?;
        if ty.is_dir() {
            copy_tree(&e.path(), &dst.join(&name))?;
        } else if ty.is_file() {
            copy_file(&e.path(), &dst.join(&name))?;
        }
    }
    sync_dir(dst)
}

#[cfg(feature = "testing")]
static CRASH_COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A point where a multi-step operation can be interrupted. With the `testing` feature,
/// when the environment variable `SNAPVISOR_CRASH_AT=N` is set, the N-th point reached
/// aborts the process on the spot (no destructors, no flushes), which the crash tests use
/// to stop an operation at every step boundary in turn; `SNAPVISOR_CRASH_ON=what` aborts
/// at the first point of that name instead (for a process, such as a VM's worker, whose
/// count of points reached depends on timing); `SNAPVISOR_CRASH_TRACE=1` prints each
/// point reached. Without the feature (release builds) it does nothing.
#[cfg(feature = "testing")]
pub fn crashpoint(what: &str) {
    use std::sync::atomic::Ordering;
    let n = CRASH_COUNTER.fetch_add(1, Ordering::SeqCst) + 1;
    if std::env::var_os("SNAPVISOR_CRASH_TRACE").is_some() {
        eprintln!("crashpoint {n}: {what}");
    }
    if let Some(at) = std::env::var("SNAPVISOR_CRASH_AT")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        && n == at
    {
        std::process::abort();
    }
    if std::env::var_os("SNAPVISOR_CRASH_ON").is_some_and(|v| v == what) {
        std::process::abort();
    }
}

/// A point where a multi-step operation can be interrupted: nothing in a build without
/// the `testing` feature.
#[cfg(not(feature = "testing"))]
#[inline(always)]
pub fn crashpoint(_what: &str) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_civil_time() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00");
        assert_eq!(format_time(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(format_time(1_795_321_845), "2026-11-22 04:30:45");
    }
}
