//! An open repository: its configuration, its keys, and the objects in it.

use crate::backend::{Backend, FolderBackend, ObjectInfo};
use crate::crypto::{self, Keys, MASTER_LEN};
use crate::error::{Error, Result};
use crate::format::{
    self, CHUNK_MAGIC, CHUNKS_PREFIX, COMPRESSION_NONE, COMPRESSION_ZSTD, CONFIG_KEY, ChunkId,
    EncryptionMode, KdfParams, KeyFile, POINT_MAGIC, POINTS_PREFIX, RepoConfig, hex,
};
use crate::point::{self, Point};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How to create a repository.
#[derive(Clone, Debug)]
pub struct InitOptions {
    /// How contents are protected.
    pub encryption: EncryptionMode,
    /// The passphrase that wraps the key (needed unless `encryption` is `None`).
    pub passphrase: Option<Vec<u8>>,
    /// Where to write the key file (`Keyfile` only; must not exist).
    pub key_file: Option<PathBuf>,
    /// Bytes per chunk.
    pub chunk_size: u32,
    /// zstd level of new chunks.
    pub zstd_level: i32,
    /// Cost of the key derivation.
    pub kdf: KdfParams,
}

impl Default for InitOptions {
    fn default() -> InitOptions {
        InitOptions {
            encryption: EncryptionMode::None,
            passphrase: None,
            key_file: None,
            chunk_size: format::DEFAULT_CHUNK_SIZE,
            zstd_level: format::DEFAULT_ZSTD_LEVEL,
            kdf: KdfParams::default(),
        }
    }
}

/// How to open a repository.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// The passphrase (encrypted repositories).
    pub passphrase: Option<Vec<u8>>,
    /// The key file (`keyfile` repositories).
    pub key_file: Option<PathBuf>,
}

/// What a listing of points found.
#[derive(Debug, Default)]
pub struct Listing {
    /// Points whose manifest opened, oldest first.
    pub points: Vec<Point>,
    /// Points whose manifest did not open, with the reason.
    pub damaged: Vec<(String, Error)>,
}

/// An open repository. Cheap to clone; every method takes `&self` and may run from many
/// threads.
#[derive(Clone, Debug)]
pub struct Repository {
    backend: Arc<dyn Backend>,
    config: Arc<RepoConfig>,
    keys: Keys,
}

impl Repository {
    /// Creates a repository in a new or empty folder.
    pub fn init(path: &Path, options: &InitOptions) -> Result<Repository> {
        if let Ok(mut entries) = std::fs::read_dir(path)
            && entries.next().is_some()
        {
            return Err(Error::NotEmpty {
                path: path.to_owned(),
            });
        }
        std::fs::create_dir_all(path).map_err(|e| Error::io(path.display().to_string(), e))?;
        let backend = Arc::new(FolderBackend::new(path));
        Repository::init_backend(backend, options)
    }

    /// Creates a repository in any backend.
    pub fn init_backend(backend: Arc<dyn Backend>, options: &InitOptions) -> Result<Repository> {
        let cs = options.chunk_size;
        if !cs.is_power_of_two() || !(format::MIN_CHUNK_SIZE..=format::MAX_CHUNK_SIZE).contains(&cs)
        {
            return Err(Error::Invalid(format!(
                "chunk size {cs} is not a power of two between {} KiB and {} MiB",
                format::MIN_CHUNK_SIZE >> 10,
                format::MAX_CHUNK_SIZE >> 20
            )));
        }
        if !(1..=19).contains(&options.zstd_level) {
            return Err(Error::Invalid(format!(
                "zstd level {} is not between 1 and 19",
                options.zstd_level
            )));
        }
        let id = hex(&crypto::random::<16>());
        let mut config = RepoConfig {
            version: format::FORMAT_VERSION,
            id: id.clone(),
            chunk_size: cs,
            zstd_level: options.zstd_level,
            encryption: options.encryption,
            key: None,
            created: point::to_ns(std::time::SystemTime::now()).div_euclid(1_000_000_000) as i64,
        };
        let keys = match options.encryption {
            EncryptionMode::None => Keys::plain(),
            mode => {
                let pass = options
                    .passphrase
                    .as_deref()
                    .ok_or(Error::PassphraseRequired)?;
                if pass.is_empty() {
                    return Err(Error::Invalid(
                        "an empty passphrase protects nothing: choose one".into(),
                    ));
                }
                let master = crypto::random::<MASTER_LEN>();
                let wrapped = crypto::wrap(&master, pass, &id, options.kdf)?;
                if mode == EncryptionMode::Keyfile {
                    let path = options.key_file.as_deref().ok_or_else(|| {
                        Error::Invalid("a keyfile repository needs the path of its key file".into())
                    })?;
                    write_key_file(path, &wrapped)?;
                } else {
                    config.key = Some(wrapped);
                }
                Keys::from_master(&master)
            }
        };
        let bytes = serde_json::to_vec_pretty(&config).expect("config serializes");
        if !backend.put_new(CONFIG_KEY, &bytes)? {
            return Err(Error::NotEmpty {
                path: PathBuf::from(backend.location()),
            });
        }
        backend.sync(&[])?;
        tracing::info!(repo = %backend.location(), encryption = %config.encryption, "repository created");
        Ok(Repository {
            backend,
            config: Arc::new(config),
            keys,
        })
    }

    /// Opens the repository in a folder.
    pub fn open(path: &Path, options: &OpenOptions) -> Result<Repository> {
        if !path.join(CONFIG_KEY).is_file() {
            return Err(Error::NoRepository {
                path: path.to_owned(),
            });
        }
        Repository::open_backend(Arc::new(FolderBackend::new(path)), options)
    }

    /// Opens a repository in any backend.
    pub fn open_backend(backend: Arc<dyn Backend>, options: &OpenOptions) -> Result<Repository> {
        let bytes = match backend.get(CONFIG_KEY) {
            Err(e) if e.is_missing() => {
                return Err(Error::NoRepository {
                    path: PathBuf::from(backend.location()),
                });
            }
            r => r?,
        };
        #[derive(serde::Deserialize)]
        struct Version {
            version: u32,
        }
        let v: Version = format::parse_json("the repository config", &bytes)?;
        if v.version > format::FORMAT_VERSION {
            return Err(Error::NewerFormat {
                found: v.version,
                supported: format::FORMAT_VERSION,
            });
        }
        let config: RepoConfig = format::parse_json("the repository config", &bytes)?;
        let cs = config.chunk_size;
        if !cs.is_power_of_two() || !(format::MIN_CHUNK_SIZE..=format::MAX_CHUNK_SIZE).contains(&cs)
        {
            return Err(Error::corrupt(
                "the repository config",
                "chunk size out of range",
            ));
        }
        let keys = match config.encryption {
            EncryptionMode::None => Keys::plain(),
            EncryptionMode::Repokey | EncryptionMode::Keyfile => {
                let key = if config.encryption == EncryptionMode::Repokey {
                    config
                        .key
                        .clone()
                        .ok_or_else(|| Error::corrupt("the repository config", "no key"))?
                } else {
                    let path = options.key_file.as_deref().ok_or(Error::KeyFileRequired {
                        repository: config.id.clone(),
                    })?;
                    let k: KeyFile = format::parse_json(
                        &path.display().to_string(),
                        &std::fs::read(path)
                            .map_err(|e| Error::io(path.display().to_string(), e))?,
                    )?;
                    if k.repository != config.id {
                        return Err(Error::ForeignKey {
                            path: path.to_owned(),
                            found: k.repository,
                            expected: config.id.clone(),
                        });
                    }
                    k
                };
                let pass = options
                    .passphrase
                    .as_deref()
                    .ok_or(Error::PassphraseRequired)?;
                Keys::from_master(&crypto::unwrap(&key, pass, &config.id)?)
            }
        };
        Ok(Repository {
            backend,
            config: Arc::new(config),
            keys,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &RepoConfig {
        &self.config
    }
    /// Bytes per chunk.
    pub fn chunk_size(&self) -> u32 {
        self.config.chunk_size
    }
    /// The storage.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }
    /// Whether contents are encrypted.
    pub fn encryption(&self) -> EncryptionMode {
        self.config.encryption
    }

    /// The id a chunk with this plaintext has in this repository.
    pub fn chunk_id(&self, data: &[u8]) -> ChunkId {
        self.keys.chunk_id(data)
    }

    /// A chunk encoder at the repository's zstd level (one per thread).
    pub(crate) fn encoder(&self) -> ChunkEncoder {
        ChunkEncoder {
            full: zstd::bulk::Compressor::new(self.config.zstd_level).expect("zstd context"),
            probe: zstd::bulk::Compressor::new(1).expect("zstd context"),
            out: Vec::new(),
        }
    }

    /// The stored form of a chunk: compressed when that saves space, then sealed.
    pub(crate) fn encode_chunk(
        &self,
        id: &ChunkId,
        data: &[u8],
        enc: &mut ChunkEncoder,
    ) -> Vec<u8> {
        match enc.compress(data) {
            Some(c) => self.keys.seal(CHUNK_MAGIC, COMPRESSION_ZSTD, &id.0, c),
            None => self.keys.seal(CHUNK_MAGIC, COMPRESSION_NONE, &id.0, data),
        }
    }

    /// Opens a stored chunk and checks that its plaintext is `len` bytes and, with
    /// `rehash`, that it hashes to `id`. The tag (or checksum, bound to the id) already
    /// proves the stored bytes are those written under this id, so restores skip the
    /// re-hash; verify does not.
    pub(crate) fn decode_chunk_checked(
        &self,
        id: &ChunkId,
        object: Vec<u8>,
        len: usize,
        rehash: bool,
    ) -> Result<Vec<u8>> {
        let what = || format!("chunk {}", id.hex());
        let (compression, payload) = self.keys.open(&what(), CHUNK_MAGIC, &id.0, object)?;
        let data = if compression == COMPRESSION_ZSTD {
            let mut out = Vec::with_capacity(len);
            zstd::bulk::Decompressor::new()
                .and_then(|mut d| d.decompress_to_buffer(&payload, &mut out))
                .map_err(|e| Error::corrupt(what(), format!("does not decompress: {e}")))?;
            out
        } else {
            payload
        };
        if data.len() != len {
            return Err(Error::corrupt(
                what(),
                format!("holds {} bytes, not {len}", data.len()),
            ));
        }
        if rehash && self.keys.chunk_id(&data) != *id {
            return Err(Error::corrupt(what(), "contents do not match the id"));
        }
        Ok(data)
    }

    /// Reads, opens and checks one chunk of `len` bytes (re-hashing its plaintext too).
    pub fn read_chunk(&self, id: &ChunkId, len: usize) -> Result<Vec<u8>> {
        self.fetch_chunk(id, len, true)
    }

    /// Reads and opens one chunk; `rehash` as in [`Repository::decode_chunk_checked`].
    pub(crate) fn fetch_chunk(&self, id: &ChunkId, len: usize, rehash: bool) -> Result<Vec<u8>> {
        if id.is_zero() {
            return Ok(vec![0; len]);
        }
        let obj = self.backend.get(&id.key())?;
        self.decode_chunk_checked(id, obj, len, rehash)
    }

    /// Every chunk object in the repository.
    pub fn list_chunks(&self) -> Result<HashMap<ChunkId, ObjectInfo>> {
        Ok(self
            .backend
            .list(&format!("{CHUNKS_PREFIX}/"))?
            .into_iter()
            .filter_map(|o| Some((ChunkId::from_key(&o.key)?, o)))
            .collect())
    }

    /// The ids of every point (without reading their manifests).
    pub fn point_ids(&self) -> Result<Vec<String>> {
        let mut ids: Vec<String> = self
            .backend
            .list(&format!("{POINTS_PREFIX}/"))?
            .into_iter()
            .filter_map(|o| o.key.rsplit('/').next().map(str::to_owned))
            .filter(|k| k.len() == 32 && format::unhex(k).is_some())
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Reads one point's manifest.
    pub fn load_point(&self, id: &str) -> Result<Point> {
        let key = format!("{POINTS_PREFIX}/{id}");
        let what = format!("manifest of point {id}");
        let obj = match self.backend.get(&key) {
            Err(e) if e.is_missing() => {
                return Err(Error::PointNotFound {
                    query: id.to_owned(),
                });
            }
            r => r?,
        };
        if obj.len() > format::MAX_MANIFEST {
            return Err(Error::corrupt(&what, "too large"));
        }
        let (compression, payload) = self.keys.open(&what, POINT_MAGIC, id.as_bytes(), obj)?;
        let payload = if compression == COMPRESSION_ZSTD {
            zstd::bulk::decompress(&payload, format::MAX_MANIFEST)
                .map_err(|e| Error::corrupt(&what, format!("does not decompress: {e}")))?
        } else {
            payload
        };
        point::decode(&what, id, &payload)
    }

    /// Stores a manifest and makes it durable: the commit of a point.
    pub(crate) fn store_point(&self, p: &Point) -> Result<()> {
        let payload = point::encode(p);
        let compressed = zstd::bulk::compress(&payload, 3).expect("zstd compresses");
        let obj = self
            .keys
            .seal(POINT_MAGIC, COMPRESSION_ZSTD, p.id.as_bytes(), &compressed);
        self.backend
            .put(&format!("{POINTS_PREFIX}/{}", p.id), &obj)?;
        self.backend.sync(&[])
    }

    /// Removes a point's manifest (its chunks go at the next [`crate::gc`]).
    pub fn delete_point(&self, id: &str) -> Result<()> {
        self.backend.delete(&format!("{POINTS_PREFIX}/{id}"))?;
        self.backend.sync(&[])
    }

    /// Every point, oldest first, and those whose manifest is damaged.
    pub fn list_points(&self) -> Result<Listing> {
        let mut listing = Listing::default();
        for id in self.point_ids()? {
            match self.load_point(&id) {
                Ok(p) => listing.points.push(p),
                // Deleted between the listing and the read (a prune ran): not listed.
                Err(Error::PointNotFound { .. }) => {}
                Err(e) => listing.damaged.push((id, e)),
            }
        }
        listing
            .points
            .sort_by(|a, b| (a.time, &a.id).cmp(&(b.time, &b.id)));
        Ok(listing)
    }

    /// The point `query` names: a whole id, a unique prefix of one, or `GROUP@latest` (the
    /// newest point of a group).
    pub fn resolve(&self, query: &str) -> Result<String> {
        let not_found = || Error::PointNotFound {
            query: query.to_owned(),
        };
        if let Some(group) = query.strip_suffix("@latest") {
            return self
                .list_points()?
                .points
                .into_iter()
                .rfind(|p| p.group == group)
                .map(|p| p.id)
                .ok_or_else(not_found);
        }
        let q = query.to_ascii_lowercase();
        if q.is_empty()
            || format::unhex(&format!("{q}{}", if q.len() % 2 == 1 { "0" } else { "" })).is_none()
        {
            return Err(not_found());
        }
        let matches: Vec<String> = self
            .point_ids()?
            .into_iter()
            .filter(|id| id.starts_with(&q))
            .collect();
        match matches.len() {
            0 => Err(not_found()),
            1 => Ok(matches.into_iter().next().unwrap()),
            n => Err(Error::AmbiguousPoint {
                query: query.to_owned(),
                count: n,
            }),
        }
    }
}

/// Compression contexts of one thread, reused from chunk to chunk.
pub(crate) struct ChunkEncoder {
    full: zstd::bulk::Compressor<'static>,
    probe: zstd::bulk::Compressor<'static>,
    out: Vec<u8>,
}

/// Bytes per probe of [`ChunkEncoder::compress`], and probes per chunk.
const PROBE: usize = 16 << 10;
const PROBES: usize = 4;

impl ChunkEncoder {
    /// `data` compressed, or `None` when compression would not save at least 1/64.
    ///
    /// Incompressible data (already compressed or encrypted files, media) costs zstd as
    /// much time as text and saves nothing; four 16 KiB probes spread over the chunk,
    /// compressed at level 1, tell it apart for 1.5% of the chunk's cost. Only a chunk
    /// whose every probe saves less than 2% is stored without trying.
    fn compress(&mut self, data: &[u8]) -> Option<&[u8]> {
        if data.len() >= PROBE * PROBES * 4 {
            let step = data.len() / PROBES;
            let mut compressible = false;
            for k in 0..PROBES {
                let sample = &data[k * step..k * step + PROBE];
                self.out.clear();
                self.out.reserve(zstd::zstd_safe::compress_bound(PROBE));
                match self.probe.compress_to_buffer(sample, &mut self.out) {
                    Ok(n) if n < PROBE - PROBE / 50 => {
                        compressible = true;
                        break;
                    }
                    _ => {}
                }
            }
            if !compressible {
                return None;
            }
        }
        self.out.clear();
        self.out
            .reserve(zstd::zstd_safe::compress_bound(data.len()));
        match self.full.compress_to_buffer(data, &mut self.out) {
            Ok(n) if n < data.len() - data.len() / 64 => Some(&self.out[..n]),
            _ => None,
        }
    }
}

/// Writes a key file atomically; refuses to replace one.
fn write_key_file(path: &Path, key: &KeyFile) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let what = path.display().to_string();
    if path.exists() {
        return Err(Error::Invalid(format!(
            "{what} already exists: choose a new path for the key file"
        )));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(&what, e))?;
    }
    let tmp = vhdx::temp_name(path);
    let bytes = serde_json::to_vec_pretty(key).expect("key serializes");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::hard_link(&tmp, path)?;
        std::fs::remove_file(&tmp)?;
        vhdx::sync_parent_dir(path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(what, e)
    })
}
