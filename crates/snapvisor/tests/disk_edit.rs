//! `snapvisor disk set-parent`, `disk resize` and the guard on writes into a parent, run
//! as a user runs them: the built binary on real files, checked with `disk read`,
//! `disk info` and qemu-img.

use serde_json::Value;
use std::io::Write;
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

/// Runs a failing command (exit 1) and returns its single stderr line.
fn fails(args: &[&str], dir: &Path) -> String {
    let out = snapvisor(args, dir);
    assert_eq!(out.status.code(), Some(1), "snapvisor {args:?} should fail");
    let err = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = err.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 1, "one error line for {args:?}: {err}");
    lines[0].to_owned()
}

fn write(args: &[&str], dir: &Path, data: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_snapvisor"))
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(data).unwrap();
    child.wait_with_output().unwrap()
}

fn read(path: &str, offset: u64, len: u64, dir: &Path) -> Vec<u8> {
    let out = snapvisor(
        &[
            "disk",
            "read",
            path,
            "--offset",
            &offset.to_string(),
            "--length",
            &len.to_string(),
        ],
        dir,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `disk info --json`, which prints what it could read and exits 1 when the chain is broken.
fn info(path: &str, dir: &Path) -> Value {
    let out = snapvisor(&["disk", "info", path, "--json"], dir);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "disk info {path}: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let want = if v["chain_error"].is_null() { 0 } else { 1 };
    assert_eq!(out.status.code(), Some(want), "disk info {path}: {v}");
    v
}

fn qemu_img_info(path: &str, dir: &Path) -> Value {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "-f", "vhdx", path])
        .current_dir(dir)
        .output()
        .expect("qemu-img is installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn qemu_img_check(path: &str, dir: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "vhdx", path])
        .current_dir(dir)
        .output()
        .expect("qemu-img is installed");
    assert!(
        out.status.success(),
        "qemu-img check {path}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn set_parent_repairs_a_moved_parent_and_refuses_another_disk() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(&["disk", "create", "base.vhdx", "--size", "64M"], d);
    assert!(
        write(&["disk", "write", "base.vhdx", "--offset", "0"], d, b"base")
            .status
            .success()
    );
    ok(
        &["disk", "create", "child.avhdx", "--parent", "base.vhdx"],
        d,
    );
    assert!(
        write(
            &["disk", "write", "child.avhdx", "--offset", "1M"],
            d,
            b"child"
        )
        .status
        .success()
    );

    // Moved away: the chain is broken and says so.
    std::fs::create_dir(d.join("moved")).unwrap();
    std::fs::rename(d.join("base.vhdx"), d.join("moved/base.vhdx")).unwrap();
    let broken = info("child.avhdx", d);
    assert!(
        broken["chain_error"]
            .as_str()
            .unwrap()
            .contains("not found"),
        "{broken}"
    );

    // Another disk of the same size is refused: the child's sectors were written against
    // the base's contents, not these.
    ok(&["disk", "create", "other.vhdx", "--size", "64M"], d);
    let err = fails(&["disk", "set-parent", "child.avhdx", "other.vhdx"], d);
    assert!(
        err.contains("is not the parent child.avhdx was made from"),
        "{err}"
    );
    assert!(err.contains("--ignore-id-mismatch"), "{err}");
    assert!(
        info("child.avhdx", d)["chain_error"]
            .as_str()
            .unwrap()
            .contains("not found")
    );
    // So is a disk of another size, with or without the override.
    ok(&["disk", "create", "small.vhdx", "--size", "32M"], d);
    let err = fails(
        &[
            "disk",
            "set-parent",
            "child.avhdx",
            "small.vhdx",
            "--ignore-id-mismatch",
        ],
        d,
    );
    assert!(err.contains("differ in virtual size"), "{err}");
    // A base file has no parent to set, and a loop is refused.
    let err = fails(&["disk", "set-parent", "moved/base.vhdx", "child.avhdx"], d);
    assert!(err.contains("not a differencing file"), "{err}");
    ok(
        &[
            "disk",
            "create",
            "grandchild.avhdx",
            "--parent",
            "child.avhdx",
        ],
        d,
    );
    // (the grandchild's chain is broken too, so first repair, then try the loop)

    // The real parent in its new place is accepted and the chain reads both layers.
    let out: Value = serde_json::from_str(&ok(
        &[
            "disk",
            "set-parent",
            "child.avhdx",
            "moved/base.vhdx",
            "--json",
        ],
        d,
    ))
    .unwrap();
    assert_eq!(out["id_matched"], true);
    assert_eq!(out["parent"], d.join("moved/base.vhdx").to_str().unwrap());
    let fixed = info("child.avhdx", d);
    assert!(fixed["chain_error"].is_null(), "{fixed}");
    assert_eq!(read("child.avhdx", 0, 4, d), b"base");
    assert_eq!(read("child.avhdx", 1 << 20, 5, d), b"child");
    let err = fails(
        &["disk", "set-parent", "child.avhdx", "grandchild.avhdx"],
        d,
    );
    assert!(err.contains("leads back to child.avhdx"), "{err}");

    // With the override, a copy that holds the same data is accepted even though its
    // identity differs (here: the base converted to a new file).
    ok(&["disk", "convert", "moved/base.vhdx", "copy.vhdx"], d);
    let err = fails(&["disk", "set-parent", "child.avhdx", "copy.vhdx"], d);
    assert!(err.contains("--ignore-id-mismatch"), "{err}");
    let out: Value = serde_json::from_str(&ok(
        &[
            "disk",
            "set-parent",
            "child.avhdx",
            "copy.vhdx",
            "--ignore-id-mismatch",
            "--json",
        ],
        d,
    ))
    .unwrap();
    assert_eq!(out["id_matched"], false);
    std::fs::remove_file(d.join("moved/base.vhdx")).unwrap();
    assert_eq!(read("child.avhdx", 0, 4, d), b"base");
    assert_eq!(read("child.avhdx", 1 << 20, 5, d), b"child");
    assert_eq!(read("grandchild.avhdx", 1 << 20, 5, d), b"child");
    let report = ok(&["disk", "check", "child.avhdx"], d);
    assert!(report.contains("no errors"), "{report}");
}

#[test]
fn writing_into_a_parent_is_refused_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(&["disk", "create", "p.vhdx", "--size", "16M"], d);
    assert!(
        write(&["disk", "write", "p.vhdx", "--offset", "0"], d, b"old")
            .status
            .success()
    );
    ok(&["disk", "create", "c.vhdx", "--parent", "p.vhdx"], d);

    let out = write(&["disk", "write", "p.vhdx", "--offset", "0"], d, b"new");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("p.vhdx is the parent of")
            && err.contains("c.vhdx")
            && err.contains("--force"),
        "{err}"
    );
    let err = fails(
        &[
            "disk", "discard", "p.vhdx", "--offset", "0", "--length", "1M",
        ],
        d,
    );
    assert!(err.contains("is the parent of"), "{err}");
    let err = fails(&["disk", "serve", "p.vhdx", "--socket", "s.sock"], d);
    assert!(
        err.contains("serving it writable") && err.contains("--force"),
        "{err}"
    );
    // Nothing changed: the child still opens and reads the parent's data.
    assert_eq!(read("c.vhdx", 0, 3, d), b"old");
    assert!(info("c.vhdx", d)["chain_error"].is_null());
    // The child itself takes writes, and --force writes into the parent (breaking the
    // child's link, as the refusal said).
    assert!(
        write(&["disk", "write", "c.vhdx", "--offset", "0"], d, b"kid")
            .status
            .success()
    );
    assert!(
        write(
            &["disk", "write", "p.vhdx", "--offset", "0", "--force"],
            d,
            b"new"
        )
        .status
        .success()
    );
    assert_eq!(read("p.vhdx", 0, 3, d), b"new");
    assert!(!info("c.vhdx", d)["chain_error"].is_null());
    ok(
        &[
            "disk", "discard", "p.vhdx", "--offset", "0", "--length", "1M", "--force",
        ],
        d,
    );
    // A file nothing depends on takes writes without --force.
    ok(&["disk", "create", "alone.vhdx", "--size", "16M"], d);
    assert!(
        write(&["disk", "write", "alone.vhdx", "--offset", "0"], d, b"x")
            .status
            .success()
    );
}

/// Grow and shrink as Resize-VHD does, for each kind of file, checked by qemu-img.
#[test]
fn resize_grows_and_shrinks_when_the_tail_is_free() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for kind in ["dynamic", "fixed"] {
        let f = format!("{kind}.vhdx");
        // 10 MiB: the last of its 8 MiB blocks is short.
        ok(
            &[
                "disk",
                "create",
                &f,
                "--size",
                "10M",
                "--type",
                kind,
                "--block-size",
                "8M",
            ],
            d,
        );
        assert!(
            write(&["disk", "write", &f, "--offset", "9M"], d, b"tail data")
                .status
                .success()
        );

        let out = ok(&["disk", "resize", &f, "100M"], d);
        assert!(out.contains("from 10.0 MiB to 100.0 MiB"), "{out}");
        assert_eq!(qemu_img_info(&f, d)["virtual-size"], 100u64 << 20);
        qemu_img_check(&f, d);
        assert_eq!(read(&f, 9 << 20, 9, d), b"tail data");
        // The space past the old end reads as zeros, including the old short block's.
        assert!(read(&f, 10 << 20, 90 << 20, d).iter().all(|&b| b == 0));
        assert!(write(&f_args(&f, 99 << 20), d, b"far").status.success());
        assert_eq!(read(&f, 99 << 20, 3, d), b"far");

        // Shrinking over data is refused with how much lies there (a sector at 9M, one
        // at 99M).
        let err = fails(&["disk", "resize", &f, "9M"], d);
        assert!(
            err.contains("1024 bytes of data lie past the new end at 9437184 bytes")
                && err.contains("offset 9437184"),
            "{err}"
        );
        let err = fails(&["disk", "resize", &f, "50M"], d);
        assert!(err.contains("lie past the new end"), "{err}");
        assert_eq!(qemu_img_info(&f, d)["virtual-size"], 100u64 << 20);
        ok(
            &["disk", "discard", &f, "--offset", "99M", "--length", "1M"],
            d,
        );
        let out = ok(&["disk", "resize", &f, "20M", "--json"], d);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            (v["old_size"].as_u64(), v["new_size"].as_u64()),
            (Some(100 << 20), Some(20 << 20))
        );
        qemu_img_check(&f, d);
        assert_eq!(qemu_img_info(&f, d)["virtual-size"], 20u64 << 20);
        // Growing again does not bring back what was past the end.
        ok(&["disk", "resize", &f, "100M"], d);
        assert!(read(&f, 20 << 20, 80 << 20, d).iter().all(|&b| b == 0));
        assert_eq!(read(&f, 9 << 20, 9, d), b"tail data");
        let report = ok(&["disk", "check", &f], d);
        assert!(report.contains("no errors"), "{report}");
        // A fixed file keeps owning its space: its size follows the disk's.
        if kind == "fixed" {
            let len = std::fs::metadata(d.join(&f)).unwrap().len();
            assert!(len >= 100 << 20, "{len}");
            ok(&["disk", "resize", &f, "16M"], d);
            let len = std::fs::metadata(d.join(&f)).unwrap().len();
            assert!(len < 32 << 20, "the freed blocks are given back: {len}");
            qemu_img_check(&f, d);
        }
    }

    // Past what the BAT region holds (1 MiB of entries: 1 TiB with 8 MiB blocks), the BAT
    // moves to the end of the file.
    ok(&["disk", "resize", "dynamic.vhdx", "3T"], d);
    assert_eq!(qemu_img_info("dynamic.vhdx", d)["virtual-size"], 3u64 << 40);
    qemu_img_check("dynamic.vhdx", d);
    assert!(
        write(&f_args("dynamic.vhdx", (3u64 << 40) - 4096), d, b"end")
            .status
            .success()
    );
    assert_eq!(read("dynamic.vhdx", (3u64 << 40) - 4096, 3, d), b"end");
    assert_eq!(read("dynamic.vhdx", 9 << 20, 9, d), b"tail data");
    qemu_img_check("dynamic.vhdx", d);

    // Bad sizes say the rule.
    let err = fails(&["disk", "resize", "dynamic.vhdx", "1000"], d);
    assert!(
        err.contains("multiple of the 512-byte logical sector"),
        "{err}"
    );

    // A differencing file, and a file with children, keep their size.
    ok(
        &["disk", "create", "child.avhdx", "--parent", "dynamic.vhdx"],
        d,
    );
    let err = fails(&["disk", "resize", "child.avhdx", "4T"], d);
    assert!(
        err.contains("differencing file always has its parent's size"),
        "{err}"
    );
    let err = fails(&["disk", "resize", "dynamic.vhdx", "4T"], d);
    assert!(
        err.contains("is the parent of") && err.contains("child.avhdx"),
        "{err}"
    );

    // A raw file grows and shrinks the same way.
    std::fs::write(d.join("disk.img"), vec![0u8; 1 << 20]).unwrap();
    assert!(write(&f_args("disk.img", 4096), d, b"raw").status.success());
    ok(&["disk", "resize", "disk.img", "8M"], d);
    assert_eq!(
        std::fs::metadata(d.join("disk.img")).unwrap().len(),
        8 << 20
    );
    let err = fails(&["disk", "resize", "disk.img", "2048"], d);
    assert!(
        err.contains("512 B of data lies beyond the new end (the first at offset 4096)"),
        "{err}"
    );
    ok(&["disk", "resize", "disk.img", "8192"], d);
    assert_eq!(read("disk.img", 4096, 3, d), b"raw");
}

fn f_args(path: &str, offset: u64) -> Vec<&str> {
    let offset: &'static str = Box::leak(offset.to_string().into_boxed_str());
    vec!["disk", "write", path, "--offset", offset]
}
