//! Helpers shared by the integration tests: the VHDX sample images made by Windows, QEMU
//! and Disk2VHD, kept in `tests/data/samples/` (origin and licence in its README).

use std::path::{Path, PathBuf};

/// The samples folder; fails the test with a clear message when it is missing.
pub fn samples_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/samples");
    assert!(
        dir.join("README.md").exists(),
        "the VHDX sample images are missing: expected {}",
        dir.display()
    );
    dir
}

/// The decompressed bytes of sample `name` (without `.bz2`).
pub fn sample(name: &str) -> Vec<u8> {
    let src = samples_dir().join(format!("{name}.bz2"));
    let out = std::process::Command::new("bzcat")
        .arg(&src)
        .output()
        .expect("bzcat is installed");
    assert!(out.status.success(), "bzcat {}", src.display());
    out.stdout
}
