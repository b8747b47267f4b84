//! Fuzz target `control_protocol`: any line on a VM's control socket, read as a request
//! and as a reply, decodes to a message or a protocol error, never a panic; what decodes
//! survives a round trip unchanged. The body is `fuzz/src/control.rs`, which
//! `crates/host/tests/fuzz_bodies.rs` also runs on stable Rust.

#![no_main]

#[path = "../src/control.rs"]
mod body;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    body::decode_control_line(data);
});
