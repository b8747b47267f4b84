//! Every on-disk structure of the repository, in one place.
//!
//! NEVER CHANGE the meaning of a byte or a field once written: a new format gets a new
//! version number, new JSON fields are optional with a meaningful default, and nothing is
//! removed. `docs/repository-format.md` describes the same structures for people.
//!
//! Layout (object keys):
//!
//! | key | what |
//! |---|---|
//! | `config` | [`RepoConfig`], JSON, written once by `init` |
//! | `chunks/<2 hex>/<64 hex>` | one chunk: an [`Envelope`] with [`CHUNK_MAGIC`] |
//! | `points/<32 hex>` | one recovery point's manifest: an [`Envelope`] with [`POINT_MAGIC`] |
//! | `leases/<32 hex>` | one backup in progress: [`Lease`], JSON |
//! | `gc/run` | the garbage collection in progress: [`GcMarker`], JSON |

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Key of the configuration object.
pub const CONFIG_KEY: &str = "config";
/// Prefix of chunk objects.
pub const CHUNKS_PREFIX: &str = "chunks";
/// Prefix of manifests.
pub const POINTS_PREFIX: &str = "points";
/// Prefix of leases.
pub const LEASES_PREFIX: &str = "leases";
/// Key of the garbage collector's marker.
pub const GC_KEY: &str = "gc/run";

/// The repository format this build writes and the highest it reads.
pub const FORMAT_VERSION: u32 = 1;

/// First bytes of a chunk object.
pub const CHUNK_MAGIC: [u8; 4] = *b"SVCK";
/// First bytes of a manifest object.
pub const POINT_MAGIC: [u8; 4] = *b"SVPT";
/// Version byte of both envelopes.
pub const ENVELOPE_VERSION: u8 = 1;
/// Size of the envelope header: magic, version, compression, encryption, reserved.
pub const ENVELOPE_HEADER: usize = 8;
/// `compression` byte: stored as is.
pub const COMPRESSION_NONE: u8 = 0;
/// `compression` byte: one zstd frame.
pub const COMPRESSION_ZSTD: u8 = 1;
/// `encryption` byte: plaintext (manifests then end with a BLAKE3 of the payload).
pub const ENCRYPTION_NONE: u8 = 0;
/// `encryption` byte: AES-256-GCM, a 12-byte random nonce after the header, a 16-byte tag
/// at the end; the header and the object's id are the associated data.
pub const ENCRYPTION_AES256GCM: u8 = 1;
/// AES-GCM nonce length.
pub const NONCE_LEN: usize = 12;
/// AES-GCM tag length.
pub const TAG_LEN: usize = 16;
/// BLAKE3 digest length, the length of chunk ids.
pub const ID_LEN: usize = 32;

/// Chunk sizes a repository may use (powers of two).
pub const MIN_CHUNK_SIZE: u32 = 64 << 10;
/// Largest chunk size.
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;
/// The default, chosen by measurement (see `docs/repository-format.md`).
pub const DEFAULT_CHUNK_SIZE: u32 = 4 << 20;
/// The default zstd level, chosen by measurement.
pub const DEFAULT_ZSTD_LEVEL: i32 = 2;
/// Cap on a manifest object's size (a 64 TiB disk in 4 MiB chunks needs 512 MiB of ids).
pub const MAX_MANIFEST: usize = 1 << 30;
/// Cap on a manifest's JSON header.
pub const MAX_MANIFEST_HEADER: usize = 64 << 20;

/// A chunk's id: BLAKE3 of its plaintext (keyed with the repository's id key when the
/// repository is encrypted). All zeros in a manifest's table means "a chunk of zeros,
/// not stored".
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; ID_LEN]);

impl ChunkId {
    /// The marker of a chunk that reads as zeros.
    pub const ZERO: ChunkId = ChunkId([0; ID_LEN]);

    /// Whether this is [`ChunkId::ZERO`].
    pub fn is_zero(&self) -> bool {
        *self == ChunkId::ZERO
    }
    /// Lowercase hex.
    pub fn hex(&self) -> String {
        hex(&self.0)
    }
    /// The object key.
    pub fn key(&self) -> String {
        let h = self.hex();
        format!("{CHUNKS_PREFIX}/{}/{h}", &h[..2])
    }
    /// Parses a chunk object key.
    pub fn from_key(key: &str) -> Option<ChunkId> {
        let name = key.rsplit('/').next()?;
        let bytes = unhex(name)?;
        Some(ChunkId(bytes.try_into().ok()?))
    }
}

impl std::fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", &self.hex()[..16])
    }
}

/// Lowercase hex of bytes.
pub fn hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(DIGITS[(x >> 4) as usize] as char);
        s.push(DIGITS[(x & 15) as usize] as char);
    }
    s
}

/// Bytes of lowercase or uppercase hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    s.as_bytes()
        .chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

/// How a repository protects its contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncryptionMode {
    /// Plaintext (chunks and manifests still carry checksums).
    None,
    /// Encrypted; the key, wrapped by a passphrase, is kept in `config`.
    Repokey,
    /// Encrypted; the key, wrapped by a passphrase, is kept in a file outside the repository.
    Keyfile,
}

impl std::fmt::Display for EncryptionMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EncryptionMode::None => "none",
            EncryptionMode::Repokey => "repokey",
            EncryptionMode::Keyfile => "keyfile",
        })
    }
}

impl std::str::FromStr for EncryptionMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<EncryptionMode> {
        match s {
            "none" => Ok(EncryptionMode::None),
            "repokey" => Ok(EncryptionMode::Repokey),
            "keyfile" => Ok(EncryptionMode::Keyfile),
            other => Err(Error::Invalid(format!(
                "unknown encryption {other:?}: use none, repokey or keyfile"
            ))),
        }
    }
}

/// The `config` object.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoConfig {
    /// Format version ([`FORMAT_VERSION`]).
    pub version: u32,
    /// 16 random bytes, hex: names the repository (key files carry it).
    pub id: String,
    /// Bytes per chunk (a power of two in `MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE`).
    pub chunk_size: u32,
    /// zstd level of new chunks.
    pub zstd_level: i32,
    /// How contents are protected.
    pub encryption: EncryptionMode,
    /// The wrapped key (`repokey` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<KeyFile>,
    /// Creation time, seconds since the Unix epoch.
    pub created: i64,
}

/// Parameters of argon2id, as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KdfParams {
    /// Memory in KiB.
    pub memory_kib: u32,
    /// Passes.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

impl Default for KdfParams {
    /// 64 MiB, 3 passes, 1 lane: about 0.15 s on this project's reference machine.
    fn default() -> KdfParams {
        KdfParams {
            memory_kib: 64 << 10,
            iterations: 3,
            parallelism: 1,
        }
    }
}

/// A master key wrapped by a passphrase (in `config` for `repokey`, in a file for
/// `keyfile`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    /// Format version of this structure (1).
    pub version: u32,
    /// The repository it opens (its `config.id`); also the wrap's associated data.
    pub repository: String,
    /// Always `argon2id`.
    pub kdf: String,
    /// Its parameters.
    pub kdf_params: KdfParams,
    /// Salt, hex (16 bytes).
    pub salt: String,
    /// AES-256-GCM nonce, hex.
    pub nonce: String,
    /// The 64-byte master key (encryption key, then id key) sealed under the derived key, hex.
    pub wrapped: String,
}

/// One stream of a point (a disk or a blob) in a manifest's JSON header. Its chunk ids
/// follow the header in the binary table, in stream order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamHeader {
    /// Name given by the caller (`disk0`, `vm.json`, ...).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// How it was copied (`full`, `incremental`, `express-full`; `blob` for blobs).
    #[serde(default)]
    pub method: String,
    /// Caller-supplied fields.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fields: BTreeMap<String, String>,
    /// Bytes read from the source.
    #[serde(default)]
    pub bytes_read: u64,
    /// New bytes the repository stored for it (after compression).
    #[serde(default)]
    pub bytes_stored: u64,
}

/// A manifest's JSON header.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ManifestHeader {
    /// [`FORMAT_VERSION`].
    pub version: u32,
    /// The point's id (must equal the object's name).
    pub id: String,
    /// The caller's grouping key (e.g. a VM's name); prune keeps per group.
    pub group: String,
    /// When the backup started, nanoseconds since the Unix epoch.
    pub time_ns: i128,
    /// When it was committed, nanoseconds since the Unix epoch.
    pub committed_ns: i128,
    /// The repository's chunk size when written.
    pub chunk_size: u32,
    /// Caller-supplied fields.
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
    /// Named blobs (VM config, firmware variables, memory state...).
    #[serde(default)]
    pub blobs: Vec<StreamHeader>,
    /// Disks, in order (disk N is `disks[N]`).
    #[serde(default)]
    pub disks: Vec<StreamHeader>,
}

/// A backup in progress (`leases/<id>`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Lease {
    /// Its id (the object's name).
    pub id: String,
    /// The host that runs it.
    pub host: String,
    /// Its process.
    pub pid: u32,
    /// The process's start time (clock ticks since boot), to tell a reused pid.
    pub pid_start: u64,
    /// When it started, nanoseconds since the Unix epoch.
    pub started_ns: i128,
    /// When it last renewed the lease, nanoseconds since the Unix epoch.
    pub renewed_ns: i128,
}

/// The garbage collection in progress (`gc/run`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GcMarker {
    /// Its id.
    pub id: String,
    /// The host that runs it.
    pub host: String,
    /// Its process.
    pub pid: u32,
    /// The process's start time (clock ticks since boot).
    pub pid_start: u64,
    /// When it started, nanoseconds since the Unix epoch.
    pub started_ns: i128,
    /// When it last renewed the marker.
    pub renewed_ns: i128,
    /// `marking` until the leases it waits for are known, then `sweeping`.
    pub phase: String,
    /// The leases that existed when it started: it deletes nothing before they are gone.
    #[serde(default)]
    pub waits_for: Vec<String>,
}

/// Parses a stored JSON object with a size cap.
pub fn parse_json<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T> {
    if bytes.len() > MAX_MANIFEST_HEADER {
        return Err(Error::corrupt(what, "too large"));
    }
    serde_json::from_slice(bytes).map_err(|e| Error::corrupt(what, e.to_string()))
}
