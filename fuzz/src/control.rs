//! The body of the `control_protocol` fuzz target, shared with the stable test suite
//! (`crates/host/tests/fuzz_bodies.rs` includes this file with `#[path]`), so it uses
//! nothing but `host` and `std`.
//!
//! [`decode_control_line`] treats its input as one line a peer sent on a VM's control
//! socket, both as a request (what a worker reads) and as a reply (what a front end
//! reads). Decoding must return a message or a `ProtocolError`, never panic; and what
//! decodes must mean one thing: encoded again, it decodes to the same message, and the
//! encoded line carries this build's protocol version.

/// Decodes `data` as a request and as a reply; see the module doc.
pub fn decode_control_line(data: &[u8]) {
    use host::protocol::{
        PROTOCOL_VERSION, decode_reply, decode_request, encode_reply, encode_request,
    };
    let version = |line: &[u8]| {
        let v: serde_json_free::Version = serde_json_free::version(line);
        assert_eq!(
            v,
            Some(PROTOCOL_VERSION),
            "an encoded line lacks the version"
        );
    };
    if let Ok(request) = decode_request(data) {
        let line = encode_request(&request);
        version(&line);
        match decode_request(&line) {
            Ok(again) => assert_eq!(again, request, "a request changed through a round trip"),
            Err(e) => panic!("an encoded request does not decode: {e}"),
        }
    }
    if let Ok(outcome) = decode_reply(data) {
        let line = encode_reply(&outcome);
        version(&line);
        match decode_reply(&line) {
            Ok(again) => assert_eq!(again, outcome, "a reply changed through a round trip"),
            Err(e) => panic!("an encoded reply does not decode: {e}"),
        }
    }
}

/// Finds `"version":N` at the start of an encoded line without a JSON parser (this file
/// may use nothing but `host` and `std`).
mod serde_json_free {
    pub type Version = Option<u32>;

    pub fn version(line: &[u8]) -> Version {
        let text = std::str::from_utf8(line).ok()?;
        let rest = text.strip_prefix("{\"version\":")?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    }
}
