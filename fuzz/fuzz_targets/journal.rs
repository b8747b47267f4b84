//! Fuzz target `journal`: any bytes read as a VM folder's `journal.json` load to a journal
//! whose every step stays inside the VM folder, or to an error; never a panic. The body is
//! `fuzz/src/journal.rs`, which `crates/vm/tests/fuzz_bodies.rs` also runs on stable
//! Rust.

#![no_main]

#[path = "../src/journal.rs"]
mod body;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    body::load_journal(data);
});
