//! Fuzz target `nbd`: any byte string, sent by a client to the NBD server (negotiation,
//! then requests), must get exactly the replies the protocol and a model of the disk call
//! for, and never a panic. The body is `fuzz/src/nbd_session.rs`, which
//! `crates/nbd/tests/fuzz_body.rs` also runs on stable Rust over real clients' sessions.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../src/nbd_session.rs"]
mod nbd_session;

fuzz_target!(|data: &[u8]| {
    let _ = nbd_session::session(data);
});
