//! Fuzz target `vm_state`: any bytes read as a VM folder's `vm.json` load to a state that
//! keeps its invariants and names only plain files, or to an error; never a panic. The
//! body is `fuzz/src/vm_state.rs`, which `crates/vm/tests/fuzz_bodies.rs` also runs on
//! stable Rust.

#![no_main]

#[path = "../src/vm_state.rs"]
mod body;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    body::load_vm_state(data);
});
