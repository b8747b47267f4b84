//! Every on-disk structure of the VHDX format, in one place.
//!
//! Each structure has its offsets and meaning documented next to the code that parses and
//! encodes it, following MS-VHDX v8.0 (see `shared/reference/vhdx-format.md` for the digest
//! this project works from). Parsing is explicit little-endian reads from byte slices; every
//! parser validates what it reads and returns a precise [`Corruption`] instead of panicking.
//!
//! **Never change** the byte layout produced by the `encode` functions: other
//! implementations (Hyper-V, qemu-img) read these files.

use crate::error::Corruption;
use uuid::Uuid;

/// One kibibyte.
pub const KIB: u64 = 1024;
/// One mebibyte: the alignment unit of every object after the header section.
pub const MIB: u64 = 1024 * KIB;
/// Largest virtual disk the format allows: 64 TiB.
pub const MAX_VIRTUAL_SIZE: u64 = 64 * 1024 * 1024 * MIB;
/// Smallest payload block size (1 MiB).
pub const MIN_BLOCK_SIZE: u32 = 1 << 20;
/// Largest payload block size (256 MiB).
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;
/// Size of a sector-bitmap block (1 MiB, one bit per logical sector of a chunk).
pub const SECTOR_BITMAP_BLOCK_SIZE: u64 = MIB;
/// Sectors of a chunk: 2^23 logical sectors share one sector-bitmap block.
pub const SECTORS_PER_CHUNK: u64 = 1 << 23;
/// The log, BAT and metadata are read and written in 4 KiB units.
pub const LOG_SECTOR_SIZE: usize = 4096;

/// Size of the header section at the start of every file (file identifier, two headers,
/// two region tables, reserved space).
pub const HEADER_SECTION_SIZE: u64 = MIB;

// ----------------------------------------------------------------------------------------
// File type identifier (offset 0, 64 KiB)
// ----------------------------------------------------------------------------------------

/// Offset 0: `vhdxfile` (8 bytes). Offset 8: creator, 512 bytes of UTF-16LE, diagnostic only.
pub const FILE_IDENTIFIER_SIGNATURE: &[u8; 8] = b"vhdxfile";
/// Bytes of the creator field.
pub const FILE_IDENTIFIER_CREATOR_LEN: usize = 512;
/// Size of the file identifier structure we read and write (the rest of its 64 KiB is reserved).
pub const FILE_IDENTIFIER_SIZE: usize = 8 + FILE_IDENTIFIER_CREATOR_LEN;

/// Encodes the file type identifier with a creator string (truncated to 255 UTF-16 units).
pub fn encode_file_identifier(creator: &str) -> Vec<u8> {
    let mut buf = vec![0u8; FILE_IDENTIFIER_SIZE];
    buf[..8].copy_from_slice(FILE_IDENTIFIER_SIGNATURE);
    for (i, unit) in creator.encode_utf16().take(255).enumerate() {
        buf[8 + 2 * i..10 + 2 * i].copy_from_slice(&unit.to_le_bytes());
    }
    buf
}

/// Parses the file type identifier; returns the creator string.
pub fn parse_file_identifier(buf: &[u8]) -> Result<String, Corruption> {
    if buf.len() < FILE_IDENTIFIER_SIZE || &buf[..8] != FILE_IDENTIFIER_SIGNATURE {
        return Err(Corruption::BadFileIdentifier);
    }
    let units: Vec<u16> = buf[8..FILE_IDENTIFIER_SIZE]
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    Ok(String::from_utf16_lossy(&units))
}

// ----------------------------------------------------------------------------------------
// Headers (offsets 64 KiB and 128 KiB, 4 KiB each)
// ----------------------------------------------------------------------------------------

/// File offsets of the two header slots.
pub const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
/// Bytes of a header structure (the checksum covers all of them).
pub const HEADER_SIZE: usize = 4096;
/// `head`.
pub const HEADER_SIGNATURE: &[u8; 4] = b"head";

/// The VHDX header.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 4 | signature `head` |
/// | 4 | 4 | CRC-32C of the 4 KiB structure, this field zeroed |
/// | 8 | 8 | sequence number: the valid header with the larger one is current |
/// | 16 | 16 | FileWriteGuid: changes on the first modification of a session |
/// | 32 | 16 | DataWriteGuid: changes on the first guest-visible change; children link to it |
/// | 48 | 16 | LogGuid: zero when the log holds nothing to replay |
/// | 64 | 2 | log version, must be 0 |
/// | 66 | 2 | version, must be 1 |
/// | 68 | 4 | log length in bytes, a multiple of 1 MiB |
/// | 72 | 8 | log offset in bytes, a multiple of 1 MiB, at least 1 MiB |
/// | 80 | 4016 | reserved, zero |
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Sequence number; the valid header with the larger one is current.
    pub sequence_number: u64,
    /// Changes on the first modification of the file in a session.
    pub file_write_guid: Uuid,
    /// Changes before the first guest-visible change in a session.
    pub data_write_guid: Uuid,
    /// Identifies the active log sequence; zero means nothing to replay.
    pub log_guid: Uuid,
    /// Log format version (0).
    pub log_version: u16,
    /// Header format version (1).
    pub version: u16,
    /// Length of the log in bytes.
    pub log_length: u32,
    /// File offset of the log.
    pub log_offset: u64,
}

impl Header {
    /// Parses and validates one header slot (signature, checksum, version).
    pub fn parse(buf: &[u8]) -> Result<Header, Corruption> {
        if buf.len() < HEADER_SIZE || &buf[..4] != HEADER_SIGNATURE {
            return Err(Corruption::BadHeader {
                reason: "bad signature",
            });
        }
        let buf = &buf[..HEADER_SIZE];
        if checksum_with_zeroed_field(buf, 4) != le_u32(buf, 4) {
            return Err(Corruption::BadHeader {
                reason: "checksum mismatch",
            });
        }
        let header = Header {
            sequence_number: le_u64(buf, 8),
            file_write_guid: guid_at(buf, 16),
            data_write_guid: guid_at(buf, 32),
            log_guid: guid_at(buf, 48),
            log_version: le_u16(buf, 64),
            version: le_u16(buf, 66),
            log_length: le_u32(buf, 68),
            log_offset: le_u64(buf, 72),
        };
        if header.version != 1 {
            return Err(Corruption::UnsupportedVersion {
                version: header.version,
            });
        }
        Ok(header)
    }

    /// Encodes the header into a 4 KiB structure with its checksum.
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = vec![0u8; HEADER_SIZE];
        buf[..4].copy_from_slice(HEADER_SIGNATURE);
        put_u64(&mut buf, 8, self.sequence_number);
        put_guid(&mut buf, 16, self.file_write_guid);
        put_guid(&mut buf, 32, self.data_write_guid);
        put_guid(&mut buf, 48, self.log_guid);
        put_u16(&mut buf, 64, self.log_version);
        put_u16(&mut buf, 66, self.version);
        put_u32(&mut buf, 68, self.log_length);
        put_u64(&mut buf, 72, self.log_offset);
        let crc = checksum_with_zeroed_field(&buf, 4);
        put_u32(&mut buf, 4, crc);
        buf
    }

    /// Validates the log location against the file's alignment rules.
    pub fn validate_log_location(&self) -> Result<(), Corruption> {
        let len = u64::from(self.log_length);
        if len % MIB != 0
            || !self.log_offset.is_multiple_of(MIB)
            || (len != 0 && self.log_offset < MIB)
        {
            return Err(Corruption::BadLogLocation {
                offset: self.log_offset,
                length: len,
            });
        }
        if self.log_version != 0 && !self.log_guid.is_nil() {
            return Err(Corruption::UnsupportedLogVersion {
                version: self.log_version,
            });
        }
        Ok(())
    }
}

// ----------------------------------------------------------------------------------------
// Region table (offsets 192 KiB and 256 KiB, 64 KiB each)
// ----------------------------------------------------------------------------------------

/// File offsets of the two region table copies.
pub const REGION_TABLE_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
/// Size of a region table (the checksum covers all of it).
pub const REGION_TABLE_SIZE: usize = 64 * 1024;
/// `regi`.
pub const REGION_TABLE_SIGNATURE: &[u8; 4] = b"regi";
/// Most entries a region table can hold.
pub const MAX_REGION_ENTRIES: u32 = 2047;
/// The block allocation table region.
pub const BAT_REGION_GUID: Uuid = Uuid::from_u128(0x2DC27766_F623_4200_9D64_115E9BFD4A08);
/// The metadata region.
pub const METADATA_REGION_GUID: Uuid = Uuid::from_u128(0x8B7CA206_4790_4B9A_B8FE_575F050F886E);

/// One region table entry (32 bytes).
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 16 | region GUID |
/// | 16 | 8 | file offset, multiple of 1 MiB, at least 1 MiB |
/// | 24 | 4 | length, multiple of 1 MiB |
/// | 28 | 4 | bit 0: required (a reader that does not know the region must refuse the file) |
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionEntry {
    /// What the region is.
    pub guid: Uuid,
    /// Where it starts in the file.
    pub file_offset: u64,
    /// Its length in bytes.
    pub length: u32,
    /// Whether a reader must understand it.
    pub required: bool,
}

/// The region table: a 16-byte header (`regi`, CRC-32C of the 64 KiB table, entry count,
/// reserved) followed by the entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionTable {
    /// The entries, in file order.
    pub entries: Vec<RegionEntry>,
}

impl RegionTable {
    /// Parses and validates a region table copy: signature, checksum, entry count, alignment.
    pub fn parse(buf: &[u8]) -> Result<RegionTable, Corruption> {
        let bad = |reason| Corruption::BadRegionTable { reason };
        if buf.len() < REGION_TABLE_SIZE || &buf[..4] != REGION_TABLE_SIGNATURE {
            return Err(bad("bad signature"));
        }
        let buf = &buf[..REGION_TABLE_SIZE];
        if checksum_with_zeroed_field(buf, 4) != le_u32(buf, 4) {
            return Err(bad("checksum mismatch"));
        }
        let count = le_u32(buf, 8);
        if count > MAX_REGION_ENTRIES {
            return Err(bad("too many entries"));
        }
        let mut entries = Vec::with_capacity(count as usize);
        for i in 0..count as usize {
            let at = 16 + 32 * i;
            let entry = RegionEntry {
                guid: guid_at(buf, at),
                file_offset: le_u64(buf, at + 16),
                length: le_u32(buf, at + 24),
                required: le_u32(buf, at + 28) & 1 == 1,
            };
            if !entry.file_offset.is_multiple_of(MIB)
                || entry.file_offset < HEADER_SECTION_SIZE
                || u64::from(entry.length) % MIB != 0
            {
                return Err(Corruption::RegionMisaligned {
                    guid: entry.guid,
                    offset: entry.file_offset,
                    length: u64::from(entry.length),
                });
            }
            if entries.iter().any(|e: &RegionEntry| e.guid == entry.guid) {
                return Err(Corruption::DuplicateRegion { guid: entry.guid });
            }
            entries.push(entry);
        }
        Ok(RegionTable { entries })
    }

    /// Encodes the table into 64 KiB with its checksum.
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = vec![0u8; REGION_TABLE_SIZE];
        buf[..4].copy_from_slice(REGION_TABLE_SIGNATURE);
        put_u32(&mut buf, 8, len_u32(self.entries.len()));
        for (i, e) in self.entries.iter().enumerate() {
            let at = 16 + 32 * i;
            put_guid(&mut buf, at, e.guid);
            put_u64(&mut buf, at + 16, e.file_offset);
            put_u32(&mut buf, at + 24, e.length);
            put_u32(&mut buf, at + 28, u32::from(e.required));
        }
        let crc = checksum_with_zeroed_field(&buf, 4);
        put_u32(&mut buf, 4, crc);
        buf
    }

    /// The entry with the given GUID, if present.
    pub fn find(&self, guid: Uuid) -> Option<&RegionEntry> {
        self.entries.iter().find(|e| e.guid == guid)
    }
}

// ----------------------------------------------------------------------------------------
// Metadata region
// ----------------------------------------------------------------------------------------

/// `metadata`.
pub const METADATA_TABLE_SIGNATURE: &[u8; 8] = b"metadata";
/// Size of the metadata table at the start of the metadata region.
pub const METADATA_TABLE_SIZE: usize = 64 * 1024;
/// Most entries a metadata table can hold.
pub const MAX_METADATA_ENTRIES: u16 = 2047;
/// Largest metadata item.
pub const MAX_METADATA_ITEM_SIZE: u32 = 1 << 20;

/// File parameters item: u32 block size, u32 flags (bit 0 LeaveBlockAllocated, bit 1 HasParent).
pub const FILE_PARAMETERS_GUID: Uuid = Uuid::from_u128(0xCAA16737_FA36_4D43_B3B6_33F0AA44E76B);
/// Virtual disk size item: u64 bytes.
pub const VIRTUAL_DISK_SIZE_GUID: Uuid = Uuid::from_u128(0x2FA54224_CD1B_4876_B211_5DBED83BF4B8);
/// Virtual disk ID item: a GUID shared by every file of a chain.
pub const VIRTUAL_DISK_ID_GUID: Uuid = Uuid::from_u128(0xBECA12AB_B2E6_4523_93EF_C309E000C746);
/// Logical sector size item: u32, 512 or 4096.
pub const LOGICAL_SECTOR_SIZE_GUID: Uuid = Uuid::from_u128(0x8141BF1D_A96F_4709_BA47_F233A8FAAB5F);
/// Physical sector size item: u32, 512 or 4096.
pub const PHYSICAL_SECTOR_SIZE_GUID: Uuid = Uuid::from_u128(0xCDA348C7_445D_4471_9CC9_E9885251C556);
/// Parent locator item (differencing files only).
pub const PARENT_LOCATOR_GUID: Uuid = Uuid::from_u128(0xA8D35F2D_B30B_454D_ABF7_D3D84834AB0C);
/// Locator type of a VHDX parent locator.
pub const VHDX_PARENT_LOCATOR_TYPE: Uuid = Uuid::from_u128(0xB04AEFB7_D19E_4A81_B789_25B8E9445913);

/// Metadata entry flag: user metadata.
pub const METADATA_FLAG_IS_USER: u32 = 1;
/// Metadata entry flag: a property of the virtual disk (copied to children).
pub const METADATA_FLAG_IS_VIRTUAL_DISK: u32 = 2;
/// Metadata entry flag: a reader that does not know the item must refuse the file.
pub const METADATA_FLAG_IS_REQUIRED: u32 = 4;

/// One metadata table entry (32 bytes) with its item data.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 16 | item id |
/// | 16 | 4 | offset of the data from the start of the region (>= 64 KiB, 0 if length 0) |
/// | 20 | 4 | length of the data, at most 1 MiB |
/// | 24 | 4 | flags: bit 0 IsUser, bit 1 IsVirtualDisk, bit 2 IsRequired |
/// | 28 | 4 | reserved |
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetadataItem {
    /// Item id.
    pub id: Uuid,
    /// Entry flags (`METADATA_FLAG_*`).
    pub flags: u32,
    /// Offset of the item data inside the region, as found on disk.
    pub offset: u32,
    /// The item's bytes.
    pub data: Vec<u8>,
}

impl MetadataItem {
    /// Whether this is user metadata.
    pub fn is_user(&self) -> bool {
        self.flags & METADATA_FLAG_IS_USER != 0
    }
    /// Whether this item describes the virtual disk (and is copied to children).
    pub fn is_virtual_disk(&self) -> bool {
        self.flags & METADATA_FLAG_IS_VIRTUAL_DISK != 0
    }
    /// Whether a reader must understand this item.
    pub fn is_required(&self) -> bool {
        self.flags & METADATA_FLAG_IS_REQUIRED != 0
    }
}

/// Parses the metadata table and reads each item's data out of the region bytes.
pub fn parse_metadata_region(region: &[u8]) -> Result<Vec<MetadataItem>, Corruption> {
    parse_metadata_prefix(region, region.len() as u64)
}

/// How many bytes from the start of a metadata region hold its table and every item the
/// table names (at least the table): what [`parse_metadata_prefix`] needs. `table` is the
/// region's first [`METADATA_TABLE_SIZE`] bytes; items past `region_len` count up to it.
pub fn metadata_prefix_len(table: &[u8], region_len: u64) -> u64 {
    let count = if table.len() >= METADATA_TABLE_SIZE {
        usize::from(le_u16(table, 10)).min(usize::from(MAX_METADATA_ENTRIES))
    } else {
        0
    };
    (0..count)
        .map(|i| {
            let at = 32 + 32 * i;
            u64::from(le_u32(table, at + 16)) + u64::from(le_u32(table, at + 20))
        })
        .fold(METADATA_TABLE_SIZE as u64, u64::max)
        .min(region_len)
}

/// Parses a metadata region of `region_len` bytes from its first bytes `region`, which must
/// cover the table and the items ([`metadata_prefix_len`]): a region is 1 MiB, its items
/// a few hundred bytes, and an open should not read the rest.
pub fn parse_metadata_prefix(
    region: &[u8],
    region_len: u64,
) -> Result<Vec<MetadataItem>, Corruption> {
    let bad = |reason| Corruption::BadMetadataTable { reason };
    if region.len() < METADATA_TABLE_SIZE || &region[..8] != METADATA_TABLE_SIGNATURE {
        return Err(bad("bad signature"));
    }
    let count = le_u16(region, 10);
    if count > MAX_METADATA_ENTRIES {
        return Err(bad("too many entries"));
    }
    let mut items: Vec<MetadataItem> = Vec::with_capacity(usize::from(count));
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for i in 0..usize::from(count) {
        let at = 32 + 32 * i;
        let id = guid_at(region, at);
        let offset = le_u32(region, at + 16);
        let length = le_u32(region, at + 20);
        let flags = le_u32(region, at + 24);
        if length > MAX_METADATA_ITEM_SIZE {
            return Err(Corruption::MetadataItemOutOfBounds { id });
        }
        let data = if length == 0 {
            Vec::new()
        } else {
            let start = u64::from(offset);
            let end = start + u64::from(length);
            if start < METADATA_TABLE_SIZE as u64 || end > region_len.min(region.len() as u64) {
                return Err(Corruption::MetadataItemOutOfBounds { id });
            }
            if ranges.iter().any(|&(s, e)| start < e && s < end) {
                return Err(Corruption::MetadataItemOverlap { id });
            }
            ranges.push((start, end));
            region[start as usize..end as usize].to_vec()
        };
        let is_user = flags & METADATA_FLAG_IS_USER != 0;
        if items.iter().any(|m| m.id == id && m.is_user() == is_user) {
            return Err(Corruption::DuplicateMetadataItem { id });
        }
        items.push(MetadataItem {
            id,
            flags,
            offset,
            data,
        });
    }
    Ok(items)
}

/// Encodes a metadata region of `region_len` bytes: the table, then the items' data packed
/// from offset 64 KiB in the order given. Returns the bytes and each item's new offset.
pub fn encode_metadata_region(
    items: &[MetadataItem],
    region_len: usize,
) -> Result<Vec<u8>, Corruption> {
    let mut region = vec![0u8; region_len];
    region[..8].copy_from_slice(METADATA_TABLE_SIGNATURE);
    let count = u16::try_from(items.len())
        .ok()
        .filter(|&c| c <= MAX_METADATA_ENTRIES)
        .ok_or(Corruption::BadMetadataTable {
            reason: "too many entries",
        })?;
    put_u16(&mut region, 10, count);
    let mut next = METADATA_TABLE_SIZE;
    for (i, item) in items.iter().enumerate() {
        let at = 32 + 32 * i;
        put_guid(&mut region, at, item.id);
        let offset = if item.data.is_empty() { 0 } else { next };
        if offset + item.data.len() > region_len {
            return Err(Corruption::MetadataItemOutOfBounds { id: item.id });
        }
        region[offset..offset + item.data.len()].copy_from_slice(&item.data);
        next += item.data.len();
        put_u32(&mut region, at + 16, len_u32(offset));
        put_u32(&mut region, at + 20, len_u32(item.data.len()));
        put_u32(&mut region, at + 24, item.flags);
    }
    Ok(region)
}

/// The file parameters item (8 bytes): u32 block size; u32 flags, bit 0 LeaveBlockAllocated
/// (a fixed file), bit 1 HasParent (a differencing file).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileParameters {
    /// Payload block size in bytes.
    pub block_size: u32,
    /// Blocks must stay allocated (fixed files).
    pub leave_block_allocated: bool,
    /// The file is a differencing file.
    pub has_parent: bool,
}

impl FileParameters {
    /// Parses and validates the item.
    pub fn parse(data: &[u8]) -> Result<FileParameters, Corruption> {
        if data.len() != 8 {
            return Err(Corruption::BadMetadataItem {
                item: "file parameters",
            });
        }
        let block_size = le_u32(data, 0);
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(Corruption::InvalidBlockSize { block_size });
        }
        let flags = le_u32(data, 4);
        Ok(FileParameters {
            block_size,
            leave_block_allocated: flags & 1 != 0,
            has_parent: flags & 2 != 0,
        })
    }

    /// Encodes the item.
    pub fn encode(&self) -> Vec<u8> {
        let mut data = vec![0u8; 8];
        put_u32(&mut data, 0, self.block_size);
        let flags = u32::from(self.leave_block_allocated) | (u32::from(self.has_parent) << 1);
        put_u32(&mut data, 4, flags);
        data
    }
}

/// Parses a u64 item (virtual disk size).
pub fn parse_u64_item(data: &[u8], item: &'static str) -> Result<u64, Corruption> {
    (data.len() == 8)
        .then(|| le_u64(data, 0))
        .ok_or(Corruption::BadMetadataItem { item })
}

/// Parses a u32 item (sector sizes).
pub fn parse_u32_item(data: &[u8], item: &'static str) -> Result<u32, Corruption> {
    (data.len() == 4)
        .then(|| le_u32(data, 0))
        .ok_or(Corruption::BadMetadataItem { item })
}

/// Parses a GUID item (virtual disk id).
pub fn parse_guid_item(data: &[u8], item: &'static str) -> Result<Uuid, Corruption> {
    (data.len() == 16)
        .then(|| guid_at(data, 0))
        .ok_or(Corruption::BadMetadataItem { item })
}

// ----------------------------------------------------------------------------------------
// Parent locator
// ----------------------------------------------------------------------------------------

/// Parent locator key: the parent's DataWriteGuid, braced.
pub const KEY_PARENT_LINKAGE: &str = "parent_linkage";
/// Parent locator key: an alternative DataWriteGuid (used while merging into the parent).
pub const KEY_PARENT_LINKAGE2: &str = "parent_linkage2";
/// Parent locator key: path relative to the child's folder, `\` separators.
pub const KEY_RELATIVE_PATH: &str = "relative_path";
/// Parent locator key: `\\?\Volume{GUID}\...` (Windows only).
pub const KEY_VOLUME_PATH: &str = "volume_path";
/// Parent locator key: an absolute Windows path.
pub const KEY_ABSOLUTE_WIN32_PATH: &str = "absolute_win32_path";

/// The parent locator item.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 16 | locator type (VHDX parent) |
/// | 16 | 2 | reserved |
/// | 18 | 2 | key-value count |
/// | 20 | 12 each | u32 key offset, u32 value offset, u16 key length, u16 value length |
/// | after | | keys and values, UTF-16LE, offsets from the start of the item |
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ParentLocator {
    /// Key-value pairs in file order.
    pub entries: Vec<(String, String)>,
}

impl ParentLocator {
    /// Parses and validates the item.
    pub fn parse(data: &[u8]) -> Result<ParentLocator, Corruption> {
        let bad = |reason| Corruption::BadParentLocator { reason };
        if data.len() < 20 {
            return Err(bad("too short"));
        }
        if guid_at(data, 0) != VHDX_PARENT_LOCATOR_TYPE {
            return Err(bad("unknown locator type"));
        }
        let count = usize::from(le_u16(data, 18));
        if 20 + 12 * count > data.len() {
            return Err(bad("entries beyond the item"));
        }
        let string_at = |offset: u32, len: u16| -> Result<String, Corruption> {
            let start = offset as usize;
            let end = start
                .checked_add(usize::from(len))
                .ok_or(bad("string beyond the item"))?;
            if len == 0 || !len.is_multiple_of(2) || end > data.len() {
                return Err(bad("string beyond the item"));
            }
            let units: Vec<u16> = data[start..end]
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            if units.contains(&0) {
                return Err(bad("embedded nul"));
            }
            String::from_utf16(&units).map_err(|_| bad("invalid utf-16"))
        };
        let mut entries = Vec::with_capacity(count);
        for i in 0..count {
            let at = 20 + 12 * i;
            let key = string_at(le_u32(data, at), le_u16(data, at + 8))?;
            let value = string_at(le_u32(data, at + 4), le_u16(data, at + 10))?;
            if entries.iter().any(|(k, _): &(String, String)| *k == key) {
                return Err(bad("duplicate key"));
            }
            entries.push((key, value));
        }
        Ok(ParentLocator { entries })
    }

    /// Encodes the item.
    pub fn encode(&self) -> Vec<u8> {
        let header_len = 20 + 12 * self.entries.len();
        let mut data = vec![0u8; header_len];
        put_guid(&mut data, 0, VHDX_PARENT_LOCATOR_TYPE);
        put_u16(&mut data, 18, len_u16(self.entries.len()));
        for (i, (key, value)) in self.entries.iter().enumerate() {
            let at = 20 + 12 * i;
            let key_offset = data.len();
            data.extend(key.encode_utf16().flat_map(u16::to_le_bytes));
            let value_offset = data.len();
            data.extend(value.encode_utf16().flat_map(u16::to_le_bytes));
            put_u32(&mut data, at, len_u32(key_offset));
            put_u32(&mut data, at + 4, len_u32(value_offset));
            put_u16(&mut data, at + 8, len_u16(value_offset - key_offset));
            let value_len = len_u16(data.len() - value_offset);
            put_u16(&mut data, at + 10, value_len);
        }
        data
    }

    /// The value of a key.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Sets (or adds) a key.
    pub fn set(&mut self, key: &str, value: String) {
        match self.entries.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value,
            None => self.entries.push((key.to_owned(), value)),
        }
    }
}

/// Formats a GUID as the parent locator writes it: `{xxxxxxxx-...}`, lowercase.
pub fn braced_guid(guid: Uuid) -> String {
    format!("{{{}}}", guid.hyphenated())
}

/// Parses a GUID as found in a parent locator: braces optional, any case.
pub fn parse_braced_guid(text: &str) -> Option<Uuid> {
    let inner = text.trim().trim_start_matches('{').trim_end_matches('}');
    Uuid::parse_str(inner).ok()
}

// ----------------------------------------------------------------------------------------
// Block allocation table
// ----------------------------------------------------------------------------------------

/// Payload block state: not stored in this file (zeros, or the parent's data).
pub const PAYLOAD_BLOCK_NOT_PRESENT: u8 = 0;
/// Payload block state: contents undefined (read as zeros).
pub const PAYLOAD_BLOCK_UNDEFINED: u8 = 1;
/// Payload block state: reads as zeros.
pub const PAYLOAD_BLOCK_ZERO: u8 = 2;
/// Payload block state: discarded (read as zeros).
pub const PAYLOAD_BLOCK_UNMAPPED: u8 = 3;
/// Legacy value of UNMAPPED in the 2012 draft; read as zeros like QEMU does.
pub const PAYLOAD_BLOCK_UNMAPPED_V095: u8 = 5;
/// Payload block state: every sector stored in this file.
pub const PAYLOAD_BLOCK_FULLY_PRESENT: u8 = 6;
/// Payload block state (differencing only): the sector bitmap says which sectors are here.
pub const PAYLOAD_BLOCK_PARTIALLY_PRESENT: u8 = 7;
/// Sector bitmap state: no bitmap block.
pub const SB_BLOCK_NOT_PRESENT: u8 = 0;
/// Sector bitmap state (differencing only): the bitmap block is allocated.
pub const SB_BLOCK_PRESENT: u8 = 6;

/// A BAT entry: bits 0-2 state, bits 3-19 reserved, bits 20-63 file offset in MiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BatEntry(pub u64);

impl BatEntry {
    /// Builds an entry from a state and a file offset (a multiple of 1 MiB).
    pub fn new(state: u8, file_offset: u64) -> BatEntry {
        debug_assert!(file_offset.is_multiple_of(MIB));
        BatEntry(u64::from(state & 7) | (file_offset & !(MIB - 1)))
    }
    /// The state (bits 0-2).
    pub fn state(self) -> u8 {
        (self.0 & 7) as u8
    }
    /// The file offset in bytes (bits 20-63, in MiB units).
    pub fn file_offset(self) -> u64 {
        self.0 & !(MIB - 1)
    }
}

/// Size of one BAT entry.
pub const BAT_ENTRY_SIZE: u64 = 8;

// ----------------------------------------------------------------------------------------
// Log
// ----------------------------------------------------------------------------------------

/// `loge`.
pub const LOG_ENTRY_SIGNATURE: &[u8; 4] = b"loge";
/// `desc`.
pub const LOG_DATA_DESCRIPTOR_SIGNATURE: &[u8; 4] = b"desc";
/// `zero`.
pub const LOG_ZERO_DESCRIPTOR_SIGNATURE: &[u8; 4] = b"zero";
/// `data`.
pub const LOG_DATA_SECTOR_SIGNATURE: &[u8; 4] = b"data";
/// Size of the entry header at the start of an entry's first sector.
pub const LOG_ENTRY_HEADER_SIZE: usize = 64;
/// Size of a descriptor.
pub const LOG_DESCRIPTOR_SIZE: usize = 32;

/// The header of a log entry (first 64 bytes of its first sector).
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 4 | `loge` |
/// | 4 | 4 | CRC-32C over the whole entry (EntryLength bytes in ring order), this field zeroed |
/// | 8 | 4 | entry length, a multiple of 4 KiB |
/// | 12 | 4 | tail: ring offset of the oldest entry of the sequence this entry ends |
/// | 16 | 8 | sequence number, > 0 |
/// | 24 | 4 | descriptor count |
/// | 28 | 4 | reserved |
/// | 32 | 16 | log GUID: must equal the header's |
/// | 48 | 8 | flushed file offset: a file size known durable when the entry was written |
/// | 56 | 8 | last file offset: a size that contains every allocated structure |
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEntryHeader {
    /// Entry length in bytes.
    pub entry_length: u32,
    /// Ring offset of the first entry of the sequence this entry ends.
    pub tail: u32,
    /// Sequence number.
    pub sequence_number: u64,
    /// Number of descriptors.
    pub descriptor_count: u32,
    /// The log GUID the entry belongs to.
    pub log_guid: Uuid,
    /// Durable file size when the entry was written.
    pub flushed_file_offset: u64,
    /// File size that contains every structure.
    pub last_file_offset: u64,
}

impl LogEntryHeader {
    /// Parses the fixed fields (the checksum is verified over the whole entry elsewhere).
    pub fn parse(buf: &[u8]) -> Option<LogEntryHeader> {
        if buf.len() < LOG_ENTRY_HEADER_SIZE || &buf[..4] != LOG_ENTRY_SIGNATURE {
            return None;
        }
        Some(LogEntryHeader {
            entry_length: le_u32(buf, 8),
            tail: le_u32(buf, 12),
            sequence_number: le_u64(buf, 16),
            descriptor_count: le_u32(buf, 24),
            log_guid: guid_at(buf, 32),
            flushed_file_offset: le_u64(buf, 48),
            last_file_offset: le_u64(buf, 56),
        })
    }

    /// Writes the fixed fields (checksum left zero).
    pub fn encode_into(&self, buf: &mut [u8]) {
        buf[..4].copy_from_slice(LOG_ENTRY_SIGNATURE);
        put_u32(buf, 8, self.entry_length);
        put_u32(buf, 12, self.tail);
        put_u64(buf, 16, self.sequence_number);
        put_u32(buf, 24, self.descriptor_count);
        put_guid(buf, 32, self.log_guid);
        put_u64(buf, 48, self.flushed_file_offset);
        put_u64(buf, 56, self.last_file_offset);
    }
}

/// Number of 4 KiB descriptor sectors an entry with `count` descriptors needs: the first
/// holds 126 after the 64-byte header, each later one 128.
pub fn log_descriptor_sectors(count: u32) -> u32 {
    (count + 2).div_ceil(128).max(1)
}

/// One log descriptor.
///
/// | offset | data descriptor (`desc`) | zero descriptor (`zero`) |
/// |---|---|---|
/// | 0 | signature | signature |
/// | 4 | trailing bytes: bytes 4092..4096 of the target sector | reserved |
/// | 8 | leading bytes: bytes 0..8 of the target sector | zero length, a multiple of 4 KiB |
/// | 16 | file offset, a multiple of 4 KiB | file offset, a multiple of 4 KiB |
/// | 24 | sequence number (the entry's) | sequence number |
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogDescriptor {
    /// A 4 KiB sector is written; its middle bytes are in the matching data sector.
    Data {
        /// Bytes 4092..4096 of the target sector.
        trailing: [u8; 4],
        /// Bytes 0..8 of the target sector.
        leading: [u8; 8],
        /// Target file offset.
        file_offset: u64,
        /// The entry's sequence number.
        sequence_number: u64,
    },
    /// A range is zeroed.
    Zero {
        /// Bytes to zero.
        zero_length: u64,
        /// Target file offset.
        file_offset: u64,
        /// The entry's sequence number.
        sequence_number: u64,
    },
}

impl LogDescriptor {
    /// Parses a descriptor; `None` if the signature is unknown.
    pub fn parse(buf: &[u8]) -> Option<LogDescriptor> {
        let sig = &buf[..4];
        if sig == LOG_DATA_DESCRIPTOR_SIGNATURE {
            Some(LogDescriptor::Data {
                trailing: buf[4..8].try_into().ok()?,
                leading: buf[8..16].try_into().ok()?,
                file_offset: le_u64(buf, 16),
                sequence_number: le_u64(buf, 24),
            })
        } else if sig == LOG_ZERO_DESCRIPTOR_SIGNATURE {
            Some(LogDescriptor::Zero {
                zero_length: le_u64(buf, 8),
                file_offset: le_u64(buf, 16),
                sequence_number: le_u64(buf, 24),
            })
        } else {
            None
        }
    }

    /// Encodes a data descriptor for a full target sector.
    pub fn encode_data(buf: &mut [u8], sector: &[u8], file_offset: u64, sequence_number: u64) {
        buf[..4].copy_from_slice(LOG_DATA_DESCRIPTOR_SIGNATURE);
        buf[4..8].copy_from_slice(&sector[4092..4096]);
        buf[8..16].copy_from_slice(&sector[..8]);
        put_u64(buf, 16, file_offset);
        put_u64(buf, 24, sequence_number);
    }
}

/// Encodes a log data sector: `data`, sequence high, target bytes 8..4092, sequence low.
pub fn encode_log_data_sector(buf: &mut [u8], sector: &[u8], sequence_number: u64) {
    buf[..4].copy_from_slice(LOG_DATA_SECTOR_SIGNATURE);
    put_u32(buf, 4, (sequence_number >> 32) as u32);
    buf[8..4092].copy_from_slice(&sector[8..4092]);
    put_u32(buf, 4092, (sequence_number & 0xffff_ffff) as u32);
}

// ----------------------------------------------------------------------------------------
// Little-endian helpers and checksums
// ----------------------------------------------------------------------------------------

/// CRC-32C of `buf` computed as if the 4 bytes at `field` were zero.
pub fn checksum_with_zeroed_field(buf: &[u8], field: usize) -> u32 {
    let crc = crc32c::crc32c(&buf[..field]);
    let crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc32c::crc32c_append(crc, &buf[field + 4..])
}

pub(crate) fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
pub(crate) fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
pub(crate) fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}
pub(crate) fn guid_at(b: &[u8], at: usize) -> Uuid {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[at..at + 16]);
    Uuid::from_bytes_le(a)
}
pub(crate) fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
pub(crate) fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
pub(crate) fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
pub(crate) fn put_guid(b: &mut [u8], at: usize, g: Uuid) {
    b[at..at + 16].copy_from_slice(&g.to_bytes_le());
}
/// Lengths of structures we build are bounded far below u32::MAX.
fn len_u32(n: usize) -> u32 {
    u32::try_from(n).expect("structure length fits in u32")
}
fn len_u16(n: usize) -> u16 {
    u16::try_from(n).expect("locator length fits in u16")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn guids_match_their_documented_disk_bytes() {
        assert_eq!(
            BAT_REGION_GUID.to_bytes_le(),
            [
                0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd,
                0x4a, 0x08
            ]
        );
        assert_eq!(
            VHDX_PARENT_LOCATOR_TYPE.to_bytes_le(),
            [
                0xb7, 0xef, 0x4a, 0xb0, 0x9e, 0xd1, 0x81, 0x4a, 0xb7, 0x89, 0x25, 0xb8, 0xe9, 0x44,
                0x59, 0x13
            ]
        );
    }

    #[test]
    fn header_round_trips_and_detects_damage() {
        let h = Header {
            sequence_number: 7,
            file_write_guid: Uuid::new_v4(),
            data_write_guid: Uuid::new_v4(),
            log_guid: Uuid::nil(),
            log_version: 0,
            version: 1,
            log_length: MIB as u32,
            log_offset: MIB,
        };
        let mut buf = h.encode();
        assert_eq!(Header::parse(&buf).unwrap(), h);
        buf[100] ^= 1;
        assert!(matches!(
            Header::parse(&buf),
            Err(Corruption::BadHeader { .. })
        ));
    }

    #[test]
    fn locator_round_trips() {
        let mut loc = ParentLocator::default();
        loc.set(KEY_PARENT_LINKAGE, braced_guid(Uuid::new_v4()));
        loc.set(KEY_RELATIVE_PATH, ".\\base.vhdx".into());
        let parsed = ParentLocator::parse(&loc.encode()).unwrap();
        assert_eq!(parsed, loc);
        assert_eq!(parsed.get(KEY_RELATIVE_PATH), Some(".\\base.vhdx"));
    }

    #[test]
    fn descriptor_sector_counts() {
        assert_eq!(log_descriptor_sectors(0), 1);
        assert_eq!(log_descriptor_sectors(126), 1);
        assert_eq!(log_descriptor_sectors(127), 2);
    }
}
