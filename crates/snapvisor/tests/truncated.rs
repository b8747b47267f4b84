//! `disk check --repair` of a truncated VHDX from the command line: the check exits 3
//! saying the file was probably truncated and what lies past its end; the repair keeps
//! every intact block, drops the rest (reading zeros), says exactly what was lost, and
//! the file then checks clean here and in `qemu-img check`.

use serde_json::Value;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn snapvisor(args: &[&str], dir: &Path, stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_snapvisor"))
        .args(args)
        .current_dir(dir)
        .env_remove("SNAPVISOR_STORE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(data) = stdin {
        input.write_all(data).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn ok(args: &[&str], dir: &Path, stdin: Option<&[u8]>) -> String {
    let out = snapvisor(args, dir, stdin);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

const MIB: usize = 1 << 20;

#[test]
fn disk_check_repair_salvages_a_truncated_vhdx() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(
        &[
            "disk",
            "create",
            "t.vhdx",
            "--size",
            "32M",
            "--block-size",
            "1M",
        ],
        d,
        None,
    );
    // Eight blocks of known data, each block its own byte pattern.
    let mut data = vec![0u8; 8 * MIB];
    for (i, b) in data.iter_mut().enumerate() {
        *b = ((i / MIB) as u8 + 1).wrapping_mul(37) ^ (i % 251) as u8;
    }
    ok(
        &["disk", "write", "t.vhdx", "--offset", "0"],
        d,
        Some(&data),
    );
    // Cut in the middle of the sixth block's data: blocks 5, 6 and 7 (written in order,
    // so stored in order) are lost.
    let before = ok(&["disk", "check", "t.vhdx", "--json"], d, None);
    let before: Value = serde_json::from_str(&before).unwrap();
    assert_eq!(before["full_blocks"], 8);
    let len = std::fs::metadata(d.join("t.vhdx")).unwrap().len();
    let cut = len - (2 * MIB + MIB / 2) as u64;
    std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("t.vhdx"))
        .unwrap()
        .set_len(cut)
        .unwrap();

    let out = snapvisor(&["disk", "check", "t.vhdx"], d, None);
    assert_eq!(out.status.code(), Some(3));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("probably truncated")
            && text.contains("3 blocks (3 MiB of the virtual disk: 0x500000-0x7fffff (3 MiB))")
            && text.contains("repair keeps the 5 intact blocks")
            && text.contains("to salvage the rest: snapvisor disk check --repair t.vhdx"),
        "{text}"
    );
    let out = snapvisor(&["disk", "check", "t.vhdx", "--json"], d, None);
    assert_eq!(out.status.code(), Some(3));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        json["lost"],
        serde_json::json!({"blocks": 3, "bytes": 3 * MIB, "ranges": [{"offset": 5 * MIB, "length": 3 * MIB}]}),
        "{json}"
    );

    let out = ok(&["disk", "check", "t.vhdx", "--repair"], d, None);
    assert!(
        out.contains("repaired: salvaged the truncated file: dropped 3 blocks (3 MiB of the virtual disk: 0x500000-0x7fffff (3 MiB))")
            && out.contains("no errors"),
        "{out}"
    );
    let out = ok(&["disk", "check", "t.vhdx", "--json"], d, None);
    let json: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["clean"], true, "{json}");
    assert_eq!(json["full_blocks"], 5, "{json}");

    // The intact blocks byte for byte, the lost ones zeros, the rest of the disk zeros.
    ok(&["disk", "convert", "t.vhdx", "t.raw"], d, None);
    let raw = std::fs::read(d.join("t.raw")).unwrap();
    assert_eq!(raw.len(), 32 * MIB);
    assert!(raw[..5 * MIB] == data[..5 * MIB], "an intact block differs");
    assert!(
        raw[5 * MIB..].iter().all(|&b| b == 0),
        "lost data is not zeros"
    );

    if let Ok(q) = Command::new("qemu-img")
        .args(["check", "-f", "vhdx", "t.vhdx"])
        .current_dir(d)
        .output()
    {
        let out = String::from_utf8_lossy(&q.stdout);
        assert!(
            q.status.success() && out.contains("No errors were found"),
            "{out}{}",
            String::from_utf8_lossy(&q.stderr)
        );
    }
}
