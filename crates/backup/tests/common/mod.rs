//! Helpers shared by the backup crate's tests: reproducible images of mixed data on real
//! files, and repositories opened with a cheap key derivation.
#![allow(dead_code)]

use backup::{EncryptionMode, InitOptions, KdfParams, OpenOptions, Repository};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use std::path::Path;

/// Cheap argon2id parameters: tests open repositories hundreds of times.
pub const KDF: KdfParams = KdfParams {
    memory_kib: 1024,
    iterations: 1,
    parallelism: 1,
};

pub const PASS: &[u8] = b"correct horse battery staple";

pub fn init(path: &Path, encryption: EncryptionMode, chunk_size: u32) -> Repository {
    Repository::init(
        path,
        &InitOptions {
            encryption,
            passphrase: (encryption != EncryptionMode::None).then(|| PASS.to_vec()),
            key_file: (encryption == EncryptionMode::Keyfile).then(|| path.with_extension("key")),
            chunk_size,
            kdf: KDF,
            ..Default::default()
        },
    )
    .unwrap()
}

pub fn open(path: &Path) -> Repository {
    Repository::open(
        path,
        &OpenOptions {
            passphrase: Some(PASS.to_vec()),
            key_file: Some(path.with_extension("key")),
        },
    )
    .unwrap()
}

/// `size` bytes of a disk-like mix, in 64 KiB grains: random (incompressible), text-like,
/// repeated patterns and zeros.
pub fn image(size: usize, seed: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; size];
    let words: [&[u8]; 6] = [b"the ", b"disk ", b"backup ", b"chunk ", b"zero ", b"\n"];
    for grain in v.chunks_mut(64 << 10) {
        match rng.random_range(0..5) {
            0 => rng.fill_bytes(grain),
            1 => {
                let mut i = 0;
                while i < grain.len() {
                    let w = words[rng.random_range(0..words.len())];
                    let n = w.len().min(grain.len() - i);
                    grain[i..i + n].copy_from_slice(&w[..n]);
                    i += n;
                }
            }
            2 => {
                let b = rng.random::<u8>();
                grain.fill(b);
            }
            _ => {}
        }
    }
    v
}

pub fn write_file(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap();
}

/// Reads a whole disk.
pub fn read_disk(d: &dyn disk::Disk) -> Vec<u8> {
    let mut v = vec![0u8; d.size() as usize];
    d.read_at(&mut v, 0).unwrap();
    v
}

/// Whether two buffers are equal, without printing megabytes on failure.
#[track_caller]
pub fn assert_same(a: &[u8], b: &[u8], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
        panic!("{what}: first difference at byte {i}");
    }
}
