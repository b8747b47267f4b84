//! The `snapvisor disk` command line as scripts use it: the JSON fields the contract names,
//! exit codes, one-line errors on stderr, data in and out through stdin/stdout, and the
//! demo the README's first command runs.

use serde_json::Value;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn snapvisor(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_snapvisor"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run snapvisor")
}

fn ok(args: &[&str], dir: &Path) -> String {
    let out = snapvisor(args, dir);
    assert!(
        out.status.success(),
        "snapvisor {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(args: &[&str], dir: &Path) -> Value {
    serde_json::from_str(&ok(args, dir)).expect("valid json")
}

/// Runs a failing command and returns its single stderr line.
fn fails(args: &[&str], dir: &Path) -> String {
    let out = snapvisor(args, dir);
    assert!(!out.status.success(), "snapvisor {args:?} should fail");
    let err = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = err.lines().filter(|l| !l.is_empty()).collect();
    assert!(!lines.is_empty(), "no error message for {args:?}");
    lines[0].to_owned()
}

fn write_stdin(args: &[&str], dir: &Path, data: &[u8]) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_snapvisor"))
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn info_json_has_the_contract_fields() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let created = json(
        &[
            "disk",
            "create",
            "base.vhdx",
            "--size",
            "3G",
            "--block-size",
            "8M",
            "--logical-sector",
            "4096",
            "--physical-sector",
            "4096",
            "--json",
        ],
        d,
    );
    assert_eq!(created["virtual_size"], 3u64 << 30);
    ok(
        &["disk", "create", "child.avhdx", "--parent", "base.vhdx"],
        d,
    );
    let info = json(&["disk", "info", "child.avhdx", "--json"], d);
    for field in [
        "format",
        "type",
        "virtual_size",
        "block_size",
        "logical_sector_size",
        "physical_sector_size",
        "file_size",
        "allocated_bytes",
        "parent",
        "chain",
        "data_write_guid",
        "virtual_disk_id",
    ] {
        assert!(info.get(field).is_some(), "info --json lacks {field}");
    }
    assert_eq!(info["format"], "vhdx");
    assert_eq!(info["type"], "differencing");
    assert_eq!(
        info["block_size"],
        2u64 << 20,
        "a child's default block is 2 MiB"
    );
    assert_eq!(
        info["logical_sector_size"], 4096,
        "a child inherits its sectors"
    );
    assert_eq!(info["virtual_size"], 3u64 << 30);
    let chain: Vec<&str> = info["chain"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(chain.len(), 2);
    assert!(chain[0].ends_with("child.avhdx") && chain[1].ends_with("base.vhdx"));
    assert!(info["parent"].as_str().unwrap().ends_with("base.vhdx"));
    let base = json(&["disk", "info", "base.vhdx", "--json"], d);
    assert_eq!(base["type"], "dynamic");
    assert_eq!(base["parent"], Value::Null);
    assert_eq!(base["virtual_disk_id"], info["virtual_disk_id"]);
    let fixed = json(
        &[
            "disk",
            "create",
            "fixed.vhdx",
            "--size",
            "16M",
            "--type",
            "fixed",
            "--json",
        ],
        d,
    );
    assert_eq!(fixed["type"], "fixed");
    assert_eq!(fixed["allocated_bytes"], 16u64 << 20);
    // A fixed disk owns its space on the file system (not a sparse file).
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(d.join("fixed.vhdx")).unwrap();
    assert!(meta.blocks() * 512 >= 16 << 20, "fixed disk is sparse");
}

#[test]
fn data_goes_in_and_out_and_through_merges() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(&["disk", "create", "a.vhdx", "--size", "64M"], d);
    let base_data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    write_stdin(
        &["disk", "write", "a.vhdx", "--offset", "1M"],
        d,
        &base_data,
    );
    ok(&["disk", "create", "b.avhdx", "--parent", "a.vhdx"], d);
    write_stdin(
        &["disk", "write", "b.avhdx", "--offset", "1000"],
        d,
        b"hello",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_snapvisor"))
        .args([
            "disk", "read", "b.avhdx", "--offset", "1000", "--length", "5",
        ])
        .current_dir(d)
        .output()
        .unwrap();
    assert_eq!(out.stdout, b"hello");
    // The parent's data shows through the child; a discard hides it (reads zeros).
    let out = snapvisor(
        &[
            "disk", "read", "b.avhdx", "--offset", "1M", "--length", "3000000",
        ],
        d,
    );
    assert_eq!(out.stdout, base_data);
    ok(
        &[
            "disk", "discard", "b.avhdx", "--offset", "1M", "--length", "4K",
        ],
        d,
    );
    let out = snapvisor(
        &[
            "disk", "read", "b.avhdx", "--offset", "1M", "--length", "4K",
        ],
        d,
    );
    assert!(out.stdout.iter().all(|&b| b == 0));
    // The parent itself never changed.
    let out = snapvisor(
        &["disk", "read", "a.vhdx", "--offset", "1M", "--length", "4K"],
        d,
    );
    assert_eq!(out.stdout, base_data[..4096]);
    let merged = json(
        &[
            "disk",
            "merge",
            "b.avhdx",
            "--direction",
            "into-parent",
            "--json",
        ],
        d,
    );
    assert_eq!(merged["direction"], "into-parent");
    assert!(merged["result"].as_str().unwrap().ends_with("a.vhdx"));
    assert!(!d.join("b.avhdx").exists(), "the merged child is removed");
    let out = snapvisor(
        &[
            "disk", "read", "a.vhdx", "--offset", "1000", "--length", "5",
        ],
        d,
    );
    assert_eq!(out.stdout, b"hello");
    let out = snapvisor(
        &["disk", "read", "a.vhdx", "--offset", "1M", "--length", "4K"],
        d,
    );
    assert!(out.stdout.iter().all(|&b| b == 0));
    let check = json(&["disk", "check", "a.vhdx", "--json"], d);
    assert_eq!(check["clean"], true);
    // Convert to raw and back: identical bytes.
    ok(&["disk", "convert", "a.vhdx", "a.raw"], d);
    assert_eq!(std::fs::metadata(d.join("a.raw")).unwrap().len(), 64 << 20);
    ok(
        &[
            "disk",
            "convert",
            "a.raw",
            "again.vhdx",
            "--format",
            "vhdx",
            "--type",
            "fixed",
        ],
        d,
    );
    let raw = std::fs::read(d.join("a.raw")).unwrap();
    let out = snapvisor(
        &[
            "disk",
            "read",
            "again.vhdx",
            "--offset",
            "0",
            "--length",
            "64M",
        ],
        d,
    );
    assert!(out.stdout == raw, "raw -> fixed vhdx round trip differs");
}

#[test]
fn bad_input_gives_one_clear_line_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(&["disk", "create", "a.vhdx", "--size", "1G"], d);
    let before = std::fs::read(d.join("a.vhdx")).unwrap();
    let e = fails(&["disk", "create", "a.vhdx", "--size", "1G"], d);
    assert!(e.contains("already exists"), "{e}");
    assert_eq!(std::fs::read(d.join("a.vhdx")).unwrap(), before);
    let e = fails(
        &[
            "disk",
            "read",
            "missing.vhdx",
            "--offset",
            "0",
            "--length",
            "1",
        ],
        d,
    );
    assert!(
        e.contains("missing.vhdx") && e.contains("No such file"),
        "{e}"
    );
    let e = fails(
        &[
            "disk",
            "create",
            "x.vhdx",
            "--size",
            "1G",
            "--block-size",
            "3M",
        ],
        d,
    );
    assert!(e.contains("power of two"), "{e}");
    let e = fails(
        &["disk", "read", "a.vhdx", "--offset", "1G", "--length", "1"],
        d,
    );
    assert!(e.contains("beyond the end"), "{e}");
    let e = fails(&["disk", "create", "y.vhdx", "--size", "12Q"], d);
    assert!(e.contains("not a size"), "{e}");
    let e = fails(&["disk", "merge", "a.vhdx"], d);
    assert!(e.contains("not a differencing file"), "{e}");
    let e = fails(&["disk", "create", "z.vhdx", "--size", "65T"], d);
    assert!(e.contains("invalid"), "{e}");
    // A fixed disk larger than the free space fails at creation and leaves nothing.
    let e = fails(
        &[
            "disk",
            "create",
            "huge.vhdx",
            "--size",
            "60T",
            "--type",
            "fixed",
        ],
        d,
    );
    assert!(
        e.contains("No space left") || e.contains("too large"),
        "{e}"
    );
    assert!(!d.join("huge.vhdx").exists());
    assert_eq!(
        std::fs::read_dir(d).unwrap().count(),
        1,
        "a temporary file was left behind"
    );
    // A damaged file: check says so with exit code 3 and names the structure.
    let mut bad = before.clone();
    bad[0] = b'X';
    std::fs::write(d.join("bad.vhdx"), &bad).unwrap();
    let out = snapvisor(&["disk", "check", "bad.vhdx"], d);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stdout).contains("identifier"));
    let e = fails(&["disk", "info", "bad.vhdx"], d);
    assert!(e.contains("bad.vhdx"), "{e}");
    // A parent written after its child was made (which takes --force): the chain is
    // refused with both names.
    ok(&["disk", "create", "c.avhdx", "--parent", "a.vhdx"], d);
    // Writing into the parent is refused (it would break the child) unless forced.
    let out = Command::new(env!("CARGO_BIN_EXE_snapvisor"))
        .args(["disk", "write", "a.vhdx", "--offset", "0"])
        .current_dir(d)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && e.contains("a.vhdx is the parent of ")
            && e.contains("c.avhdx; writing into it would corrupt")
            && e.contains("--force"),
        "{e}"
    );
    let e = fails(
        &[
            "disk", "discard", "a.vhdx", "--offset", "0", "--length", "4K",
        ],
        d,
    );
    assert!(
        e.contains("is the parent of ") && e.contains("c.avhdx; discarding"),
        "{e}"
    );
    ok(
        &["disk", "read", "c.avhdx", "--offset", "0", "--length", "1"],
        d,
    );
    write_stdin(
        &["disk", "write", "a.vhdx", "--offset", "0", "--force"],
        d,
        b"changed",
    );
    let e = fails(
        &["disk", "read", "c.avhdx", "--offset", "0", "--length", "1"],
        d,
    );
    assert!(e.contains("c.avhdx") && e.contains("a.vhdx"), "{e}");
}

#[test]
fn demo_runs_and_verifies_every_step() {
    let dir = tempfile::tempdir().unwrap();
    let out = ok(
        &[
            "demo",
            "--dir",
            dir.path().to_str().unwrap(),
            "--size",
            "1G",
        ],
        dir.path(),
    );
    assert!(out.contains("demo finished: every step verified"), "{out}");
}

/// `disk serve` answers real clients and, on SIGTERM, closes the file cleanly (qemu-img
/// opens it afterwards with no log to replay).
#[test]
fn serve_until_sigterm_leaves_a_clean_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(&["disk", "create", "d.vhdx", "--size", "32M"], d);
    let mut server = Command::new(env!("CARGO_BIN_EXE_snapvisor"))
        .args([
            "disk", "serve", "d.vhdx", "--socket", "s.sock", "--name", "d0",
        ])
        .current_dir(d)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let sock = d.join("s.sock");
    for _ in 0..200 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///d0?socket={}", sock.display());
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 9 1M 1M", &uri])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A second server on the same socket is refused.
    let second = snapvisor(&["disk", "serve", "d.vhdx", "--socket", "s.sock"], d);
    assert!(!second.status.success());
    let st = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let status = server.wait().unwrap();
    assert!(status.success(), "serve exited with {status}");
    let mut banner = String::new();
    server
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut banner)
        .unwrap();
    assert!(banner.contains("nbd+unix:///d0?socket=s.sock"), "{banner}");
    assert!(!sock.exists(), "the socket file is removed");
    let check = Command::new("qemu-img")
        .args(["check", "-f", "vhdx", "d.vhdx"])
        .current_dir(d)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let data = snapvisor(
        &["disk", "read", "d.vhdx", "--offset", "1M", "--length", "1M"],
        d,
    );
    assert!(data.stdout.iter().all(|&b| b == 9) && data.stdout.len() == 1 << 20);
}

/// An output name that announces another tool's format is not silently written as raw:
/// the refusal says how to make that format, and `--format` still writes what it names.
#[test]
fn convert_refuses_a_destination_named_for_another_format() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(&["disk", "create", "v.vhdx", "--size", "8M"], d);
    write_stdin(&["disk", "write", "v.vhdx", "--offset", "0"], d, b"data");
    ok(
        &["disk", "create", "my child.avhdx", "--parent", "v.vhdx"],
        d,
    );
    for (name, qemu) in [
        ("out.qcow2", "qcow2"),
        ("out.QCOW2", "qcow2"),
        ("out.qed", "qed"),
        ("out.vhd", "vpc"),
        ("out.vmdk", "vmdk"),
        ("out.vdi", "vdi"),
    ] {
        let e = fails(&["disk", "convert", "v.vhdx", name], d);
        assert!(
            e.contains(&format!("qemu-img convert -f vhdx -O {qemu} v.vhdx {name}"))
                && e.contains("--format raw"),
            "{e}"
        );
        assert!(!d.join(name).exists(), "{name} was written");
    }
    // A chain goes through a flattened copy first (qemu-img reads no differencing VHDX),
    // with the names quoted for the shell.
    let e = fails(&["disk", "convert", "my child.avhdx", "out.qcow2"], d);
    assert!(
        e.contains("snapvisor disk convert 'my child.avhdx' out.flat.vhdx && qemu-img convert -f vhdx -O qcow2 out.flat.vhdx out.qcow2"),
        "{e}"
    );
    // What the suggestion says works.
    let out = Command::new("qemu-img")
        .args([
            "convert",
            "-f",
            "vhdx",
            "-O",
            "qcow2",
            "v.vhdx",
            "out.qcow2",
        ])
        .current_dir(d)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Raw names stay raw; --format overrides the name.
    for name in ["out.img", "out.raw", "out.bin"] {
        ok(&["disk", "convert", "v.vhdx", name], d);
        assert_eq!(json(&["disk", "info", name, "--json"], d)["format"], "raw");
    }
    ok(
        &["disk", "convert", "v.vhdx", "raw.vmdk", "--format", "raw"],
        d,
    );
    assert_eq!(
        std::fs::metadata(d.join("raw.vmdk")).unwrap().len(),
        8 << 20
    );
}

/// What is wrong and what to do, once: files that are no VHDX at all, size rules, missing
/// files, broken chains; and exit codes that tell a usage error (2) from a check that found
/// errors (3) and from a failure (1).
#[test]
fn errors_say_what_is_wrong_once_and_exit_codes_differ() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let stdout_and_error = |args: &[&str]| {
        let out = snapvisor(args, d);
        let err = String::from_utf8(out.stderr).unwrap();
        let lines: Vec<&str> = err.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?}: {err}");
        (
            out.status.code(),
            String::from_utf8(out.stdout).unwrap(),
            lines[0].to_owned(),
        )
    };
    std::fs::write(d.join("empty.vhdx"), b"").unwrap();
    std::fs::write(d.join("raw.img"), vec![7u8; 1 << 20]).unwrap();
    std::fs::write(d.join("raw.vhdx"), vec![0u8; 1 << 20]).unwrap();
    let qcow = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "q.qcow2", "64M"])
        .current_dir(d)
        .status()
        .unwrap();
    assert!(qcow.success());
    for (file, says) in [
        (
            "empty.vhdx",
            "empty.vhdx is empty (0 bytes), not a VHDX file",
        ),
        ("raw.img", "raw.img is not a VHDX file (no VHDX signature"),
        ("raw.vhdx", "raw.vhdx is not a VHDX file (no VHDX signature"),
        (
            "q.qcow2",
            "q.qcow2 is a qcow2 image, not a VHDX file; check applies to VHDX files (`qemu-img check -f qcow2 q.qcow2` checks it)",
        ),
    ] {
        let (code, out, e) = stdout_and_error(&["disk", "check", file]);
        assert_eq!(code, Some(1), "{file}");
        assert!(e.contains(says), "{file}: {e}");
        assert!(!out.contains("header"), "{file}: {out}");
    }
    // Usage errors are clap's 2; errors found by check are 3.
    assert_eq!(snapvisor(&["disk", "check"], d).status.code(), Some(2));
    assert_eq!(snapvisor(&["disk", "chekc", "x"], d).status.code(), Some(2));
    // Sizes state the rule.
    for size in ["65T", "1000"] {
        let e = fails(&["disk", "create", "z.vhdx", "--size", size], d);
        assert!(
            e.contains("must be a multiple of the 512-byte logical sector, from 512 B to 64 TiB"),
            "{e}"
        );
    }
    // A missing file is named once.
    let e = fails(
        &[
            "disk",
            "read",
            "missing.vhdx",
            "--offset",
            "0",
            "--length",
            "1",
        ],
        d,
    );
    assert_eq!(e.matches("missing.vhdx").count(), 1, "{e}");
    assert!(e.contains("No such file"), "{e}");
    // A broken chain: info shows what it read, and fails.
    ok(&["disk", "create", "p.vhdx", "--size", "8M"], d);
    ok(&["disk", "create", "c.avhdx", "--parent", "p.vhdx"], d);
    std::fs::rename(d.join("p.vhdx"), d.join("moved.vhdx")).unwrap();
    let (code, out, e) = stdout_and_error(&["disk", "info", "c.avhdx"]);
    assert_eq!(code, Some(1));
    assert!(out.contains("chain error:"), "{out}");
    assert!(e.contains("the chain of c.avhdx is broken"), "{e}");
    let out = snapvisor(&["disk", "info", "c.avhdx", "--json"], d);
    assert_eq!(out.status.code(), Some(1));
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(info["chain_error"].is_string(), "{info}");
}

/// A VHDX cut short (an incomplete copy) is reported as probably truncated.
#[test]
fn a_truncated_vhdx_is_reported_as_probably_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(
        &[
            "disk",
            "create",
            "t.vhdx",
            "--size",
            "64M",
            "--block-size",
            "1M",
        ],
        d,
    );
    write_stdin(
        &["disk", "write", "t.vhdx", "--offset", "0"],
        d,
        &[5u8; 3 << 20],
    );
    let len = std::fs::metadata(d.join("t.vhdx")).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("t.vhdx"))
        .unwrap()
        .set_len(len - (2 << 20))
        .unwrap();
    let out = snapvisor(&["disk", "check", "t.vhdx"], d);
    assert_eq!(out.status.code(), Some(3));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("past the end of the file") && text.contains("probably truncated"),
        "{text}"
    );
}

/// A moved parent is linked again with `disk set-parent`; a parent written since the
/// child was made is refused unless the mismatch is accepted.
#[test]
fn set_parent_relinks_a_moved_parent() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(&["disk", "create", "p.vhdx", "--size", "8M"], d);
    write_stdin(&["disk", "write", "p.vhdx", "--offset", "0"], d, b"parent");
    ok(&["disk", "create", "c.avhdx", "--parent", "p.vhdx"], d);
    std::fs::create_dir(d.join("moved")).unwrap();
    std::fs::rename(d.join("p.vhdx"), d.join("moved/p2.vhdx")).unwrap();
    fails(
        &["disk", "read", "c.avhdx", "--offset", "0", "--length", "6"],
        d,
    );
    let out = ok(&["disk", "set-parent", "c.avhdx", "moved/p2.vhdx"], d);
    assert!(
        out.contains("c.avhdx now has the parent ") && out.contains("moved/p2.vhdx"),
        "{out}"
    );
    let read = snapvisor(
        &["disk", "read", "c.avhdx", "--offset", "0", "--length", "6"],
        d,
    );
    assert_eq!(read.stdout, b"parent");
    // Another file of the same size is not the parent it was made from.
    ok(&["disk", "create", "other.vhdx", "--size", "8M"], d);
    let e = fails(&["disk", "set-parent", "c.avhdx", "other.vhdx"], d);
    assert!(
        e.contains("other.vhdx is not the parent c.avhdx was made from")
            && e.contains("--ignore-id-mismatch"),
        "{e}"
    );
    let read = snapvisor(
        &["disk", "read", "c.avhdx", "--offset", "0", "--length", "6"],
        d,
    );
    assert_eq!(read.stdout, b"parent", "the refused relink changed nothing");
    ok(
        &[
            "disk",
            "set-parent",
            "c.avhdx",
            "other.vhdx",
            "--ignore-id-mismatch",
        ],
        d,
    );
    let read = snapvisor(
        &["disk", "read", "c.avhdx", "--offset", "0", "--length", "6"],
        d,
    );
    assert_eq!(read.stdout, vec![0u8; 6]);
    let e = fails(&["disk", "set-parent", "other.vhdx", "c.avhdx"], d);
    assert!(e.contains("not a differencing file"), "{e}");
}
