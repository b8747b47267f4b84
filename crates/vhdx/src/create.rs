//! Creating fixed, dynamic and differencing files.
//!
//! Layout of the files we create (Hyper-V's): header section, log (1 MiB at 1 MiB),
//! metadata region (1 MiB at 2 MiB), BAT region from 3 MiB, payload after it. A new file is
//! written under a temporary name, synced, renamed into place, and the folder synced, so a
//! crash never leaves a half-made file under the requested name.

use crate::error::{Error, Result};
use crate::file::{DiskKind, Geometry, OpenOptions, VhdxFile};
use crate::format::*;
use std::fs::{self, File, OpenOptions as FsOpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use uuid::Uuid;

/// Default block size of dynamic and fixed files (Hyper-V's).
pub const DEFAULT_BLOCK_SIZE: u32 = 32 << 20;
/// Default block size of differencing files (Hyper-V's).
pub const DEFAULT_DIFFERENCING_BLOCK_SIZE: u32 = 2 << 20;
const LOG_OFFSET: u64 = MIB;
const LOG_LENGTH: u32 = 1 << 20;
const METADATA_OFFSET: u64 = 2 * MIB;
const METADATA_LENGTH: u32 = 1 << 20;
const BAT_OFFSET: u64 = 3 * MIB;

/// Parameters of a new base (fixed or dynamic) disk.
#[derive(Clone, Debug)]
pub struct CreateParams {
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// Fixed or dynamic.
    pub kind: DiskKind,
    /// Payload block size (default 32 MiB).
    pub block_size: Option<u32>,
    /// Logical sector size (512 or 4096).
    pub logical_sector_size: u32,
    /// Physical sector size (512 or 4096).
    pub physical_sector_size: u32,
}

impl CreateParams {
    /// A dynamic disk of `virtual_size` bytes with default parameters.
    pub fn dynamic(virtual_size: u64) -> CreateParams {
        CreateParams {
            virtual_size,
            kind: DiskKind::Dynamic,
            block_size: None,
            logical_sector_size: 512,
            physical_sector_size: 4096,
        }
    }
}

fn creator() -> String {
    format!("Snapvisor {}", env!("CARGO_PKG_VERSION"))
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidParameters(msg.into())
}

fn validate_block_size(block_size: u32) -> Result<()> {
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(invalid(format!(
            "block size {block_size} must be a power of two from 1 MiB to 256 MiB"
        )));
    }
    Ok(())
}

/// Creates a fixed or dynamic disk at `path` (which must not exist).
pub fn create(path: &Path, params: &CreateParams) -> Result<()> {
    let block_size = params.block_size.unwrap_or(DEFAULT_BLOCK_SIZE);
    validate_block_size(block_size)?;
    if params.kind == DiskKind::Differencing {
        return Err(invalid("use create_differencing for a child"));
    }
    let geometry = Geometry {
        virtual_size: params.virtual_size,
        block_size,
        logical_sector_size: params.logical_sector_size,
        physical_sector_size: params.physical_sector_size,
    };
    geometry.validate().map_err(|c| invalid(c.to_string()))?;
    let fixed = params.kind == DiskKind::Fixed;
    let file_params = FileParameters {
        block_size,
        leave_block_allocated: fixed,
        has_parent: false,
    };
    let items = system_items(&file_params, &geometry, Uuid::new_v4());
    write_new_file(path, &geometry, items, fixed)
}

/// Creates a differencing child of `parent` at `path`. The parent is opened read-only.
pub fn create_differencing(path: &Path, parent: &Path, block_size: Option<u32>) -> Result<()> {
    let parent_file = VhdxFile::open(parent, OpenOptions::default())?;
    create_differencing_of(path, &parent_file, block_size)
}

/// Creates a differencing child of an already open parent (which may be open for writing
/// by the caller, e.g. a VM worker switching a running disk onto a new layer).
pub fn create_differencing_of(
    path: &Path,
    parent: &VhdxFile,
    block_size: Option<u32>,
) -> Result<()> {
    let block_size = block_size.unwrap_or(DEFAULT_DIFFERENCING_BLOCK_SIZE);
    validate_block_size(block_size)?;
    let pg = parent.geometry();
    let geometry = Geometry { block_size, ..pg };
    let file_params = FileParameters {
        block_size,
        leave_block_allocated: false,
        has_parent: true,
    };
    let mut items = system_items(&file_params, &geometry, parent.virtual_disk_id());
    // Every IsVirtualDisk item of the parent (sizes, id, user items) is copied byte for byte.
    for pi in parent.metadata_items() {
        if !pi.is_virtual_disk() {
            continue;
        }
        match items
            .iter_mut()
            .find(|m| m.id == pi.id && m.is_user() == pi.is_user())
        {
            Some(m) => m.data = pi.data.clone(),
            None => items.push(pi.clone()),
        }
    }
    let locator = locator_for(path, parent.path(), parent.data_write_guid())?;
    items.push(MetadataItem {
        id: PARENT_LOCATOR_GUID,
        flags: METADATA_FLAG_IS_REQUIRED,
        offset: 0,
        data: locator.encode(),
    });
    write_new_file(path, &geometry, items, false)
}

/// Builds the parent locator a child at `child` uses to find `parent`: all five keys, in
/// the order Hyper-V writes them.
pub fn locator_for(
    child: &Path,
    parent: &Path,
    parent_data_write_guid: Uuid,
) -> Result<ParentLocator> {
    let parent_abs = absolute(parent)?;
    let child_abs = absolute(child)?;
    let child_dir = child_abs.parent().unwrap_or(Path::new("/"));
    let relative = relative_path(child_dir, &parent_abs);
    let mut win_relative = String::new();
    if !relative.starts_with("..") {
        win_relative.push_str(".\\");
    }
    win_relative.push_str(&relative.to_string_lossy().replace('/', "\\"));
    let abs_win = parent_abs.to_string_lossy().replace('/', "\\");
    let mut loc = ParentLocator::default();
    loc.set(KEY_PARENT_LINKAGE, braced_guid(parent_data_write_guid));
    // A Linux path has no drive letter: written as a UNC path to this host, which readers
    // of this project map back to the absolute path, and which Windows readers skip.
    loc.set(
        KEY_ABSOLUTE_WIN32_PATH,
        format!("\\\\?\\UNC\\localhost{abs_win}"),
    );
    loc.set(KEY_RELATIVE_PATH, win_relative);
    loc.set(
        KEY_VOLUME_PATH,
        format!(
            "\\\\?\\Volume{}{abs_win}",
            braced_guid(volume_guid(&parent_abs))
        ),
    );
    loc.set(KEY_PARENT_LINKAGE2, braced_guid(Uuid::nil()));
    Ok(loc)
}

/// A stable identifier for the file system holding `path` (its device number), standing in
/// for a Windows volume GUID.
fn volume_guid(path: &Path) -> Uuid {
    use std::os::unix::fs::MetadataExt;
    let dev = fs::metadata(path).map(|m| m.dev()).unwrap_or(0);
    Uuid::from_u64_pair(0x736e_6170_7669_736f, dev)
}

pub(crate) fn absolute(path: &Path) -> Result<PathBuf> {
    let abs = if path.is_absolute() {
        path.to_owned()
    } else {
        std::env::current_dir()
            .map_err(|e| Error::io(path, e))?
            .join(path)
    };
    // Normalise `.` and `..` lexically; the parent may not exist yet for a child's own path.
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    Ok(out)
}

/// `target` relative to the folder `from` (both absolute and normalised).
pub(crate) fn relative_path(from: &Path, target: &Path) -> PathBuf {
    let from: Vec<_> = from.components().collect();
    let to: Vec<_> = target.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut rel = PathBuf::new();
    for _ in common..from.len() {
        rel.push("..");
    }
    for c in &to[common..] {
        rel.push(c);
    }
    rel
}

fn system_items(params: &FileParameters, g: &Geometry, disk_id: Uuid) -> Vec<MetadataItem> {
    let item = |id, flags, data: Vec<u8>| MetadataItem {
        id,
        flags,
        offset: 0,
        data,
    };
    let vd = METADATA_FLAG_IS_VIRTUAL_DISK | METADATA_FLAG_IS_REQUIRED;
    vec![
        item(
            FILE_PARAMETERS_GUID,
            METADATA_FLAG_IS_REQUIRED,
            params.encode(),
        ),
        item(
            VIRTUAL_DISK_SIZE_GUID,
            vd,
            g.virtual_size.to_le_bytes().to_vec(),
        ),
        item(
            LOGICAL_SECTOR_SIZE_GUID,
            vd,
            g.logical_sector_size.to_le_bytes().to_vec(),
        ),
        item(
            PHYSICAL_SECTOR_SIZE_GUID,
            vd,
            g.physical_sector_size.to_le_bytes().to_vec(),
        ),
        item(VIRTUAL_DISK_ID_GUID, vd, disk_id.to_bytes_le().to_vec()),
    ]
}

fn write_new_file(path: &Path, g: &Geometry, items: Vec<MetadataItem>, fixed: bool) -> Result<()> {
    if path.exists() {
        return Err(invalid(format!("{} already exists", path.display())));
    }
    let differencing = items
        .iter()
        .any(|m| m.id == PARENT_LOCATOR_GUID && !m.is_user());
    let entries = g.bat_entries(differencing);
    let bat_length = (entries * BAT_ENTRY_SIZE).next_multiple_of(MIB);
    let data_start = BAT_OFFSET + bat_length;
    let bs = u64::from(g.block_size);
    let file_len = if fixed {
        data_start + g.payload_blocks() * bs
    } else {
        data_start
    };

    let tmp = temp_name(path);
    let result = (|| -> std::io::Result<()> {
        let f = FsOpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all_at(&encode_file_identifier(&creator()), 0)?;
        let guid = Uuid::new_v4();
        let mut header = Header {
            sequence_number: 1,
            file_write_guid: guid,
            data_write_guid: Uuid::new_v4(),
            log_guid: Uuid::nil(),
            log_version: 0,
            version: 1,
            log_length: LOG_LENGTH,
            log_offset: LOG_OFFSET,
        };
        f.write_all_at(&header.encode(), HEADER_OFFSETS[0])?;
        header.sequence_number = 2;
        f.write_all_at(&header.encode(), HEADER_OFFSETS[1])?;
        let regions = RegionTable {
            entries: vec![
                RegionEntry {
                    guid: METADATA_REGION_GUID,
                    file_offset: METADATA_OFFSET,
                    length: METADATA_LENGTH,
                    required: true,
                },
                RegionEntry {
                    guid: BAT_REGION_GUID,
                    file_offset: BAT_OFFSET,
                    length: u32::try_from(bat_length).map_err(std::io::Error::other)?,
                    required: true,
                },
            ],
        }
        .encode();
        for off in REGION_TABLE_OFFSETS {
            f.write_all_at(&regions, off)?;
        }
        let meta = encode_metadata_region(&items, METADATA_LENGTH as usize)
            .map_err(std::io::Error::other)?;
        let used = meta
            .iter()
            .rposition(|&b| b != 0)
            .map_or(0, |p| p + 1)
            .next_multiple_of(LOG_SECTOR_SIZE);
        f.write_all_at(&meta[..used], METADATA_OFFSET)?;
        if fixed {
            write_fixed_bat(&f, g, data_start)?;
            preallocate(&f, data_start, file_len - data_start)?;
        }
        f.set_len(file_len)?;
        f.sync_all()?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io(path, e)
    })?;
    sync_parent_dir(path).map_err(|e| Error::io(path, e))
}

/// Reserves the payload of a fixed disk on the file system, so that a full disk is found
/// now rather than by the guest, and the file is not sparse (Windows refuses sparse VHDX
/// files). Where the file system cannot preallocate, the file stays sparse.
pub(crate) fn preallocate(f: &File, offset: u64, len: u64) -> std::io::Result<()> {
    match rustix::fs::fallocate(f, rustix::fs::FallocateFlags::empty(), offset, len) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => {
            tracing::warn!("the file system cannot preallocate; the fixed disk is sparse");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

fn write_fixed_bat(f: &File, g: &Geometry, data_start: u64) -> std::io::Result<()> {
    let entries = g.bat_entries(false);
    let mut bat = vec![0u8; (entries * BAT_ENTRY_SIZE) as usize];
    let bs = u64::from(g.block_size);
    for block in 0..g.payload_blocks() {
        let e = BatEntry::new(PAYLOAD_BLOCK_FULLY_PRESENT, data_start + block * bs);
        put_u64(&mut bat, (g.payload_index(block) * 8) as usize, e.0);
    }
    f.write_all_at(&bat, BAT_OFFSET)
}

/// A sibling name for building a file before renaming it into place.
pub fn temp_name(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Syncs the folder that holds `path`, making a rename or removal in it durable.
pub fn sync_parent_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        assert_eq!(
            relative_path(Path::new("/a/b"), Path::new("/a/b/p.vhdx")),
            PathBuf::from("p.vhdx")
        );
        assert_eq!(
            relative_path(Path::new("/a/b/c"), Path::new("/a/x/p.vhdx")),
            PathBuf::from("../../x/p.vhdx")
        );
    }
}
