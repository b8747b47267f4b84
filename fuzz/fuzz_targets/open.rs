//! Fuzz target `open`: any byte string opened as a VHDX file must give a `vhdx::Error` or
//! a file that reads, writes and reopens; never a panic. The body is
//! [`vhdx_fuzz::open_and_exercise`], which `crates/vhdx/tests/corruption.rs` also runs over
//! mutated sample files on stable Rust.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vhdx_fuzz::open_and_exercise(data);
});
