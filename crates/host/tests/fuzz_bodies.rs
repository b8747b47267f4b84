//! The body of the `control_protocol` fuzz target (`fuzz/src/control.rs`) on stable Rust:
//! every kind of request and reply as the peers write them, then each mutated (bytes
//! flipped, cut short, spliced, fields renamed), deterministically. Decoding must never
//! panic, and what decodes must survive a round trip unchanged.

#[path = "../../../fuzz/src/control.rs"]
mod body;

use host::protocol::{
    Capture, LiveDelete, LiveMerge, LiveStatus, MemoryKept, Outcome, Reply, Request, StopHow,
    WireError, WireKind, encode_reply, encode_request,
};
use uuid::Uuid;

fn seeds() -> Vec<Vec<u8>> {
    let requests = [
        Request::Status,
        Request::Pause,
        Request::Resume,
        Request::Stop {
            force: false,
            timeout_secs: 60,
        },
        Request::Save,
        Request::CheckpointCreate {
            name: Some("before upgrade".into()),
        },
        Request::CheckpointDelete {
            checkpoint: "a".into(),
            subtree: true,
        },
        Request::CheckpointRename {
            checkpoint: "a".into(),
            new_name: "b".into(),
        },
        Request::CheckpointExport {
            checkpoint: "a".into(),
            dir: "/tmp/out".into(),
        },
        Request::CheckpointSettings {
            checkpoint_type: Some(vm::CheckpointType::Standard),
            max_checkpoints: Some(7),
            automatic_checkpoints: None,
        },
    ];
    let id = Uuid::from_u128(0x1234);
    let replies = [
        Reply::Status(LiveStatus {
            qemu_status: "running".into(),
            agent: true,
            generation_id: Some("abc".into()),
        }),
        Reply::Done,
        Reply::Stopped {
            how: StopHow::ShutDown,
        },
        Reply::Saved { ms: 1500 },
        Reply::CheckpointTaken(Capture {
            id,
            name: "x".into(),
            kind: vm::CheckpointKind::Standard,
            consistency: vm::Consistency::CrashConsistentWithMemory,
            has_memory: true,
            paused_ms: 12.5,
            switch_ms: 3.25,
            memory: Some(MemoryKept {
                file: "/vm/checkpoints/x/memory.vsv".into(),
                bytes: 1 << 28,
                background: true,
                ms: 900.0,
            }),
            fallback: Some("the guest agent does not answer".into()),
            frozen_ms: None,
            freeze_to_thaw_ms: Some(0.5),
        }),
        Reply::CheckpointDeleted(LiveDelete {
            deleted: id,
            name: "x".into(),
            checkpoints_removed: 2,
            reconciled: vm::Reconciled::default(),
            live_merges: vec![LiveMerge {
                removed: "disk0_a.avhdx".into(),
                into: "disk0_b.avhdx".into(),
                direction: vm::journal::Direction::IntoParent,
                bytes_copied: 4096,
                copy_seconds: 0.1,
                switch_ms: 2.0,
                longest_write_ms: 1.0,
                total_seconds: 0.2,
            }],
            live_merge_failed: None,
            merge_when_stopped: vec!["disk0_c.avhdx".into()],
        }),
        Reply::CheckpointRenamed { id },
        Reply::CheckpointExported { id },
    ];
    let mut out: Vec<Vec<u8>> = requests.iter().map(encode_request).collect();
    out.extend(replies.into_iter().map(|r| encode_reply(&Outcome::Ok(r))));
    out.push(encode_reply(&Outcome::Error(WireError {
        kind: WireKind::NoSpace,
        message: "no space left".into(),
    })));
    out.push(br#"{"cmd": "status"}"#.to_vec());
    out
}

/// A small deterministic generator (xorshift), so that the corpus is the same every run.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

#[test]
fn the_control_protocol_body_holds_on_every_message_and_its_mutations() {
    let seeds = seeds();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut inputs = 0;
    for seed in &seeds {
        body::decode_control_line(seed);
        for _ in 0..400 {
            let mut m = seed.clone();
            match rng.below(5) {
                0 => {
                    let i = rng.below(m.len());
                    m[i] ^= 1 << rng.below(8);
                }
                1 => m.truncate(rng.below(m.len())),
                2 => {
                    let other = &seeds[rng.below(seeds.len())];
                    let at = rng.below(m.len());
                    let from = rng.below(other.len());
                    m.splice(at..at, other[from..].iter().copied());
                }
                3 => {
                    // A digit changed: versions, numbers, booleans spelled as numbers.
                    if let Some(i) = m.iter().position(u8::is_ascii_digit) {
                        m[i] = b'0' + rng.below(10) as u8;
                    }
                }
                _ => {
                    const SYNTAX: &[u8] = b"{}[]\",:0\\";
                    let i = rng.below(m.len());
                    m.insert(i, SYNTAX[rng.below(SYNTAX.len())]);
                }
            }
            body::decode_control_line(&m);
            inputs += 1;
        }
    }
    assert!(inputs >= 400 * seeds.len());
}
