//! Keys, chunk ids and the envelope every chunk and manifest is stored in.
//!
//! An encrypted repository has a 64-byte master key made of random bytes at `init`: the
//! first 32 are the AES-256-GCM key of every object, the last 32 the BLAKE3 key of chunk ids
//! (so equal plaintext in two repositories gets unrelated ids, and ids say nothing about
//! contents to whoever can list the objects). The master key is stored only sealed under a
//! key derived from the passphrase by argon2id ([`wrap`]).
//!
//! The envelope (see [`crate::format`]): an 8-byte header, then either the payload and a
//! BLAKE3 checksum of it (plaintext repositories) or a random 12-byte nonce, the payload
//! encrypted and a 16-byte tag. The associated data is the header followed by the object's
//! id, so an object moved under another name, or a header byte changed, fails to open.

use crate::error::{Error, Result};
use crate::format::{
    self, ChunkId, ENCRYPTION_AES256GCM, ENCRYPTION_NONE, ENVELOPE_HEADER, ENVELOPE_VERSION,
    ID_LEN, KdfParams, KeyFile, NONCE_LEN, TAG_LEN, hex, unhex,
};
use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};

/// Length of a master key.
pub const MASTER_LEN: usize = 64;

/// `N` random bytes from the operating system.
pub fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("the operating system's random source failed");
    b
}

/// The keys of an open repository (none for a plaintext one).
#[derive(Clone)]
pub struct Keys {
    aead: Option<Aes256Gcm>,
    id_key: Option<[u8; 32]>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.aead.is_some() {
            "Keys(encrypted)"
        } else {
            "Keys(plain)"
        })
    }
}

impl Keys {
    /// A plaintext repository's.
    pub fn plain() -> Keys {
        Keys {
            aead: None,
            id_key: None,
        }
    }

    /// An encrypted repository's, from its master key.
    pub fn from_master(master: &[u8; MASTER_LEN]) -> Keys {
        let mut id_key = [0u8; 32];
        id_key.copy_from_slice(&master[32..]);
        Keys {
            aead: Some(Aes256Gcm::new_from_slice(&master[..32]).expect("32-byte key")),
            id_key: Some(id_key),
        }
    }

    /// Whether objects are encrypted.
    pub fn encrypted(&self) -> bool {
        self.aead.is_some()
    }

    /// The id of a chunk with this plaintext.
    pub fn chunk_id(&self, data: &[u8]) -> ChunkId {
        let hash = match &self.id_key {
            Some(k) => blake3::keyed_hash(k, data),
            None => blake3::hash(data),
        };
        ChunkId(*hash.as_bytes())
    }

    /// Stores `payload` (already compressed as `compression` says) in an envelope.
    pub fn seal(&self, magic: [u8; 4], compression: u8, id: &[u8], payload: &[u8]) -> Vec<u8> {
        let enc = if self.encrypted() {
            ENCRYPTION_AES256GCM
        } else {
            ENCRYPTION_NONE
        };
        let header = [
            magic[0],
            magic[1],
            magic[2],
            magic[3],
            ENVELOPE_VERSION,
            compression,
            enc,
            0,
        ];
        let mut out = Vec::with_capacity(ENVELOPE_HEADER + NONCE_LEN + payload.len() + ID_LEN);
        out.extend_from_slice(&header);
        match &self.aead {
            Some(aead) => {
                let nonce = random::<NONCE_LEN>();
                out.extend_from_slice(&nonce);
                out.extend_from_slice(payload);
                let aad = [&header[..], id].concat();
                let tag = aead
                    .encrypt_in_place_detached(
                        Nonce::from_slice(&nonce),
                        &aad,
                        &mut out[ENVELOPE_HEADER + NONCE_LEN..],
                    )
                    .expect("payload within AES-GCM's limit");
                out.extend_from_slice(&tag);
            }
            None => {
                out.extend_from_slice(payload);
                let mut h = blake3::Hasher::new();
                h.update(&header);
                h.update(id);
                h.update(payload);
                out.extend_from_slice(h.finalize().as_bytes());
            }
        }
        out
    }

    /// Opens an envelope: checks its header and its tag or checksum, and returns the
    /// compression byte and the payload (still compressed).
    pub fn open(
        &self,
        what: &str,
        magic: [u8; 4],
        id: &[u8],
        mut object: Vec<u8>,
    ) -> Result<(u8, Vec<u8>)> {
        if object.len() < ENVELOPE_HEADER {
            return Err(Error::corrupt(what, "shorter than its header"));
        }
        let header: [u8; ENVELOPE_HEADER] = object[..ENVELOPE_HEADER].try_into().unwrap();
        if header[..4] != magic {
            return Err(Error::corrupt(what, "wrong magic"));
        }
        if header[4] != ENVELOPE_VERSION {
            return Err(Error::corrupt(
                what,
                format!("unknown envelope version {}", header[4]),
            ));
        }
        let compression = header[5];
        if compression > format::COMPRESSION_ZSTD {
            return Err(Error::corrupt(
                what,
                format!("unknown compression {compression}"),
            ));
        }
        match (header[6], &self.aead) {
            (ENCRYPTION_AES256GCM, Some(aead)) => {
                if object.len() < ENVELOPE_HEADER + NONCE_LEN + TAG_LEN {
                    return Err(Error::corrupt(what, "truncated"));
                }
                let tag_at = object.len() - TAG_LEN;
                let tag = *Tag::from_slice(&object[tag_at..]);
                let nonce =
                    *Nonce::from_slice(&object[ENVELOPE_HEADER..ENVELOPE_HEADER + NONCE_LEN]);
                let aad = [&header[..], id].concat();
                aead.decrypt_in_place_detached(
                    &nonce,
                    &aad,
                    &mut object[ENVELOPE_HEADER + NONCE_LEN..tag_at],
                    &tag,
                )
                .map_err(|_| Error::corrupt(what, "authentication failed"))?;
                object.truncate(tag_at);
                object.drain(..ENVELOPE_HEADER + NONCE_LEN);
                Ok((compression, object))
            }
            (ENCRYPTION_NONE, None) => {
                if object.len() < ENVELOPE_HEADER + ID_LEN {
                    return Err(Error::corrupt(what, "truncated"));
                }
                let sum_at = object.len() - ID_LEN;
                let mut h = blake3::Hasher::new();
                h.update(&header);
                h.update(id);
                h.update(&object[ENVELOPE_HEADER..sum_at]);
                if h.finalize().as_bytes()[..] != object[sum_at..] {
                    return Err(Error::corrupt(what, "checksum mismatch"));
                }
                object.truncate(sum_at);
                object.drain(..ENVELOPE_HEADER);
                Ok((compression, object))
            }
            (ENCRYPTION_NONE, Some(_)) => Err(Error::corrupt(
                what,
                "stored in plaintext in an encrypted repository",
            )),
            (ENCRYPTION_AES256GCM, None) => {
                Err(Error::corrupt(what, "encrypted in a plaintext repository"))
            }
            (other, _) => Err(Error::corrupt(what, format!("unknown encryption {other}"))),
        }
    }
}

fn derive(passphrase: &[u8], salt: &[u8], params: &KdfParams) -> Result<[u8; 32]> {
    let p = argon2::Params::new(
        params.memory_kib,
        params.iterations,
        params.parallelism,
        Some(32),
    )
    .map_err(|e| Error::Invalid(format!("key derivation parameters: {e}")))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, p);
    let mut out = [0u8; 32];
    argon
        .hash_password_into(passphrase, salt, &mut out)
        .map_err(|e| Error::Invalid(format!("key derivation: {e}")))?;
    Ok(out)
}

/// Seals a master key under a passphrase for repository `repository`.
pub fn wrap(
    master: &[u8; MASTER_LEN],
    passphrase: &[u8],
    repository: &str,
    params: KdfParams,
) -> Result<KeyFile> {
    let salt = random::<16>();
    let kek = derive(passphrase, &salt, &params)?;
    let aead = Aes256Gcm::new_from_slice(&kek).expect("32-byte key");
    let nonce = random::<NONCE_LEN>();
    let mut buf = master.to_vec();
    let tag = aead
        .encrypt_in_place_detached(Nonce::from_slice(&nonce), repository.as_bytes(), &mut buf)
        .expect("short payload");
    buf.extend_from_slice(&tag);
    Ok(KeyFile {
        version: 1,
        repository: repository.to_owned(),
        kdf: "argon2id".into(),
        kdf_params: params,
        salt: hex(&salt),
        nonce: hex(&nonce),
        wrapped: hex(&buf),
    })
}

/// Opens a sealed master key; [`Error::WrongPassphrase`] if the passphrase does not fit.
pub fn unwrap(key: &KeyFile, passphrase: &[u8], repository: &str) -> Result<[u8; MASTER_LEN]> {
    let bad = |r: &str| Error::corrupt("the repository key", r.to_owned());
    if key.version != 1 || key.kdf != "argon2id" {
        return Err(bad("unknown key format"));
    }
    // Caps against a hostile key: at most 4 GiB of memory and 100 passes.
    let p = &key.kdf_params;
    if p.memory_kib > 4 << 20 || p.iterations > 100 || p.parallelism > 64 {
        return Err(bad("key derivation parameters out of range"));
    }
    let salt = unhex(&key.salt).ok_or_else(|| bad("salt is not hex"))?;
    let nonce = unhex(&key.nonce)
        .filter(|n| n.len() == NONCE_LEN)
        .ok_or_else(|| bad("bad nonce"))?;
    let mut buf = unhex(&key.wrapped)
        .filter(|w| w.len() == MASTER_LEN + TAG_LEN)
        .ok_or_else(|| bad("bad wrapped key"))?;
    let kek = derive(passphrase, &salt, p)?;
    let aead = Aes256Gcm::new_from_slice(&kek).expect("32-byte key");
    let tag = *Tag::from_slice(&buf[MASTER_LEN..]);
    buf.truncate(MASTER_LEN);
    aead.decrypt_in_place_detached(
        Nonce::from_slice(&nonce),
        repository.as_bytes(),
        &mut buf,
        &tag,
    )
    .map_err(|_| Error::WrongPassphrase)?;
    Ok(buf.try_into().expect("64 bytes"))
}
