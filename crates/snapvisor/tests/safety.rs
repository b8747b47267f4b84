//! `--dry-run` and the confirmations, as a user meets them: on a terminal (a real pty,
//! through util-linux `script`) and from scripts (stdin not a terminal: nothing asked).

use serde_json::Value;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_snapvisor")
}

fn snapvisor(args: &[&str], dir: &Path) -> Output {
    Command::new(bin())
        .args(args)
        .current_dir(dir)
        .env("SNAPVISOR_STORE", dir.join("store"))
        .stdin(Stdio::null())
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

/// Runs `snapvisor args` on a terminal, typing `answer`; returns (success, all output).
fn on_terminal(args: &[&str], dir: &Path, answer: &str) -> (bool, String) {
    let line = std::iter::once(bin())
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let mut child = Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .current_dir(dir)
        .env("SNAPVISOR_STORE", dir.join("store"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("util-linux script is installed");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(answer.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn vm_names(dir: &Path) -> Vec<String> {
    let v: Value = serde_json::from_str(&ok(&["vm", "list", "--json"], dir)).unwrap();
    v["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|vm| vm["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn vm_delete_shows_what_it_would_remove_and_asks_on_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(&["vm", "create", "web", "--disk", "16M"], d);
    ok(&["checkpoint", "create", "web", "--name", "one"], d);

    let out = ok(&["vm", "delete", "web", "--dry-run"], d);
    assert!(
        out.contains("would delete VM \"web\"") && out.contains("1 checkpoint(s)"),
        "{out}"
    );
    assert!(
        out.contains("disk0.vhdx") && out.contains("nothing was changed"),
        "{out}"
    );
    let v: Value =
        serde_json::from_str(&ok(&["vm", "delete", "web", "--dry-run", "--json"], d)).unwrap();
    assert_eq!(v["checkpoints"], 1);
    assert!(v["files"].as_array().unwrap().len() >= 3, "{v}");
    assert!(v["bytes"].as_u64().unwrap() > 0);
    assert_eq!(vm_names(d), ["web"]);

    // On a terminal: asked; anything but yes keeps the VM.
    let (success, text) = on_terminal(&["vm", "delete", "web"], d, "n\n");
    assert!(
        !success && text.contains("[y/N]") && text.contains("not deleted"),
        "{text}"
    );
    assert_eq!(vm_names(d), ["web"]);
    let (success, text) = on_terminal(&["vm", "delete", "web"], d, "y\n");
    assert!(success && text.contains("deleted VM \"web\""), "{text}");
    assert!(vm_names(d).is_empty());

    // --yes on a terminal, and any script (stdin not a terminal): nothing asked.
    ok(&["vm", "create", "a", "--disk", "16M"], d);
    ok(&["vm", "create", "b", "--disk", "16M"], d);
    let (success, text) = on_terminal(&["vm", "delete", "a", "--yes"], d, "");
    assert!(success && !text.contains("[y/N]"), "{text}");
    let out = ok(&["vm", "delete", "b"], d);
    assert!(out.contains("deleted VM \"b\""), "{out}");
    assert!(vm_names(d).is_empty());
}

#[test]
fn checkpoint_apply_asks_before_discarding_the_current_state() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(&["vm", "create", "web", "--disk", "16M"], d);
    ok(&["checkpoint", "create", "web", "--name", "one"], d);
    let disk = || -> String {
        let v: Value = serde_json::from_str(&ok(&["vm", "show", "web", "--json"], d)).unwrap();
        v["disks"][0]["file"].as_str().unwrap().to_owned()
    };
    let before = disk();

    // A name that does not resolve fails at once, without a question.
    let (success, text) = on_terminal(&["checkpoint", "apply", "web", "nosuch"], d, "");
    assert!(
        !success && !text.contains("[y/N]") && text.contains("nosuch"),
        "{text}"
    );
    let (success, text) = on_terminal(&["checkpoint", "apply", "web", "one"], d, "no\n");
    assert!(
        !success && text.contains("--save-current keeps it") && text.contains("not applied"),
        "{text}"
    );
    assert_eq!(disk(), before, "nothing changed");
    // --save-current discards nothing, so nothing is asked; nor with --yes, nor in scripts.
    let (success, text) = on_terminal(
        &["checkpoint", "apply", "web", "one", "--save-current"],
        d,
        "",
    );
    assert!(success && !text.contains("[y/N]"), "{text}");
    let (success, text) = on_terminal(&["checkpoint", "apply", "web", "one", "-y"], d, "");
    assert!(success && !text.contains("[y/N]"), "{text}");
    let (success, text) = on_terminal(&["checkpoint", "apply", "web", "one"], d, "y\n");
    assert!(success && text.contains("applied checkpoint"), "{text}");
    ok(&["checkpoint", "apply", "web", "one"], d);
}

#[test]
fn disk_merge_dry_run_tells_what_the_merge_then_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(
        &[
            "disk",
            "create",
            "p.vhdx",
            "--size",
            "64M",
            "--block-size",
            "1M",
        ],
        d,
    );
    let fill = |path: &str, len: usize, byte: u8| {
        let mut child = Command::new(bin())
            .args(["disk", "write", path, "--offset", "0"])
            .current_dir(d)
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(&vec![byte; len])
            .unwrap();
        assert!(child.wait().unwrap().success());
    };
    fill("p.vhdx", 8 << 20, 1);
    ok(
        &[
            "disk",
            "create",
            "c.vhdx",
            "--parent",
            "p.vhdx",
            "--block-size",
            "1M",
        ],
        d,
    );
    fill("c.vhdx", 1 << 20, 2);
    let before = (
        std::fs::read(d.join("p.vhdx")).unwrap(),
        std::fs::read(d.join("c.vhdx")).unwrap(),
    );

    let out = ok(&["disk", "merge", "c.vhdx", "--dry-run"], d);
    assert!(
        out.contains("would merge into-parent") && out.contains("1.0 MiB of data copied"),
        "{out}"
    );
    assert!(out.contains("would remove c.vhdx"), "{out}");
    let plan: Value = serde_json::from_str(&ok(
        &[
            "disk",
            "merge",
            "c.vhdx",
            "--dry-run",
            "--json",
            "--direction",
            "into-child",
        ],
        d,
    ))
    .unwrap();
    assert_eq!(plan["direction"], "into-child");
    assert_eq!(plan["bytes_to_copy"], 7u64 << 20);
    assert_eq!(plan["removed"], false);
    let plan: Value =
        serde_json::from_str(&ok(&["disk", "merge", "c.vhdx", "--dry-run", "--json"], d)).unwrap();
    // Nothing changed, to the byte.
    assert_eq!(
        (
            std::fs::read(d.join("p.vhdx")).unwrap(),
            std::fs::read(d.join("c.vhdx")).unwrap()
        ),
        before
    );
    let done: Value = serde_json::from_str(&ok(&["disk", "merge", "c.vhdx", "--json"], d)).unwrap();
    for key in ["direction", "result", "merged_away", "removed"] {
        assert_eq!(plan[key], done[key], "{key}");
    }
    assert_eq!(plan["bytes_to_copy"], done["bytes_copied"]);
}

fn now_file(d: &Path) -> String {
    let v: Value = serde_json::from_str(&ok(&["vm", "show", "web", "--json"], d)).unwrap();
    v["disks"][0]["file"].as_str().unwrap().to_owned()
}

fn write_into(file: &str, offset: &str, len: usize, d: &Path) {
    let mut child = Command::new(bin())
        .args(["disk", "write", file, "--offset", offset])
        .current_dir(d)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 + 1).collect();
    child.stdin.take().unwrap().write_all(&data).unwrap();
    assert!(child.wait().unwrap().success());
}

#[test]
fn checkpoint_delete_and_consolidate_dry_runs_match_what_then_happens() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(&["vm", "create", "web", "--disk", "64M"], d);
    write_into(&now_file(d), "0", 3 << 20, d);
    ok(&["checkpoint", "create", "web", "--name", "one"], d);
    write_into(&now_file(d), "0", 1 << 20, d);
    ok(&["checkpoint", "create", "web", "--name", "two"], d);
    write_into(&now_file(d), "10M", 1 << 19, d);
    let vm_json = d.join("store/web/vm.json");
    let before = std::fs::read(&vm_json).unwrap();

    let out = ok(&["checkpoint", "delete", "web", "one", "--dry-run"], d);
    assert!(out.contains("would delete checkpoint \"one\""), "{out}");
    assert!(out.contains("into-parent (1.0 MiB copied)"), "{out}");
    let plan: Value = serde_json::from_str(&ok(
        &["checkpoint", "delete", "web", "one", "--dry-run", "--json"],
        d,
    ))
    .unwrap();
    let sub: Value = serde_json::from_str(&ok(
        &[
            "checkpoint",
            "delete",
            "web",
            "one",
            "--dry-run",
            "--json",
            "--subtree",
        ],
        d,
    ))
    .unwrap();
    assert_eq!(
        sub["checkpoints_removed"].as_array().unwrap().len(),
        2,
        "{sub}"
    );
    assert_eq!(std::fs::read(&vm_json).unwrap(), before, "nothing changed");
    let done: Value =
        serde_json::from_str(&ok(&["checkpoint", "delete", "web", "one", "--json"], d)).unwrap();
    assert_eq!(plan["checkpoints_removed"][0]["id"], done["deleted"]);
    let planned: Vec<(Value, Value)> = plan["merged"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["removed"].clone(), m["into"].clone()))
        .collect();
    let merged: Vec<(Value, Value)> = done["merged"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["removed"].clone(), m["into"].clone()))
        .collect();
    assert_eq!(planned, merged);
    assert_eq!(planned.len(), 1);
    assert_eq!(plan["merged"][0]["bytes"], 1u64 << 20);

    // A layer two branches depend on stays; consolidate's dry run says so, as it does.
    ok(&["checkpoint", "apply", "web", "two"], d);
    write_into(&now_file(d), "20M", 4096, d);
    ok(&["checkpoint", "create", "web", "--name", "three"], d);
    ok(&["checkpoint", "apply", "web", "two"], d);
    ok(&["checkpoint", "delete", "web", "two"], d);
    let plan: Value =
        serde_json::from_str(&ok(&["vm", "consolidate", "web", "--dry-run", "--json"], d)).unwrap();
    let done: Value =
        serde_json::from_str(&ok(&["vm", "consolidate", "web", "--json"], d)).unwrap();
    assert_eq!(plan["merged"].as_array().unwrap().len(), 0, "{plan}");
    assert_eq!(
        plan["hidden_layers"], done["hidden_layers"],
        "{plan} {done}"
    );
    let out = ok(&["vm", "consolidate", "web", "--dry-run"], d);
    assert!(out.contains("would stay: 2 layers depend on it"), "{out}");
}

/// The first stderr line of a command that must fail.
fn fails(args: &[&str], dir: &Path) -> String {
    let out = snapvisor(args, dir);
    assert!(
        !out.status.success(),
        "snapvisor {args:?} should have failed"
    );
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Holds VM `vm`'s lock from another process (`flock`) with `note` in it, as a command or
/// a VM's worker (whose note says the VM runs) holds it; released when dropped.
struct Held(std::process::Child);

impl Held {
    fn new(dir: &Path, vm: &str, note: &str) -> Held {
        let lock = dir.join("store").join(vm).join(".lock");
        std::fs::write(&lock, note).unwrap();
        // --no-fork: the lock dies with the pid killed on drop, not with an orphan.
        let child = Command::new("flock")
            .arg("--no-fork")
            .arg(&lock)
            .args(["sleep", "60"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("util-linux flock is installed");
        let held = Held(child);
        // Taken once another locker would be refused.
        for _ in 0..100 {
            let probe = Command::new("flock")
                .args(["-n", "-E", "9"])
                .arg(&lock)
                .arg("true")
                .status()
                .unwrap();
            if probe.code() == Some(9) {
                return held;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("flock did not take {}", lock.display());
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A refusal names the VM once, and says what to do: no `cannot delete VM "x": VM "x" is
/// running` (the real running guest's refusals are in tests/vm_disk.rs).
#[test]
fn refusals_name_the_vm_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(&["vm", "create", "my vm", "--disk", "16M"], d);
    ok(&["checkpoint", "create", "my vm", "--name", "one"], d);
    let store = d.join("store");

    {
        // What a VM's worker writes in the lock it holds while the VM runs.
        let _held = Held::new(
            d,
            "my vm",
            "pid 1 is running `vm worker (the VM is running)` since 2026-01-01 00:00:00",
        );
        let running =
            "snapvisor: VM \"my vm\" is running; stop it first: `snapvisor vm stop 'my vm'`";
        for args in [
            &["vm", "delete", "my vm", "--yes"][..],
            &["vm", "export", "my vm", d.join("out").to_str().unwrap()],
            &["vm", "consolidate", "my vm"],
            &["vm", "set", "my vm", "--max-checkpoints", "20"],
            &["vm", "disk", "add", "my vm", "--size", "8M"],
            &["vm", "disk", "remove", "my vm", "0", "--yes"],
            &["checkpoint", "create", "my vm"],
            &["checkpoint", "delete", "my vm", "one"],
            &["checkpoint", "apply", "my vm", "one", "--yes"],
        ] {
            assert_eq!(fails(args, d), running, "{args:?}");
        }
    }
    {
        let _held = Held::new(
            d,
            "my vm",
            "pid 1 is running `checkpoint create` since 2026-01-01 00:00:00",
        );
        assert_eq!(
            fails(&["vm", "delete", "my vm", "--yes"], d),
            "snapvisor: VM \"my vm\" is busy: pid 1 is running `checkpoint create` since 2026-01-01 00:00:00; wait for it to finish, or pass --wait SECONDS"
        );
        assert_eq!(
            fails(&["vm", "disk", "add", "my vm", "--size", "8M"], d),
            "snapvisor: VM \"my vm\" is busy: pid 1 is running `checkpoint create` since 2026-01-01 00:00:00; wait for it to finish, or pass --wait SECONDS"
        );
    }
    let missing = format!(
        "snapvisor: no VM named \"nope\" in the store {}",
        store.display()
    );
    for args in [
        &["vm", "delete", "nope", "--yes"][..],
        &["vm", "consolidate", "nope"],
        &["vm", "consolidate", "nope", "--dry-run"],
        &["vm", "export", "nope", d.join("out").to_str().unwrap()],
        &["checkpoint", "create", "nope"],
        &["vm", "disk", "add", "nope", "--size", "8M"],
    ] {
        assert_eq!(fails(args, d), missing, "{args:?}");
    }
    // Nothing was changed by any of them.
    assert_eq!(vm_names(d), ["my vm"]);
}

/// `vm disk remove` asks on a terminal before it deletes a disk's files (scripts and
/// `--yes` are not asked).
#[test]
fn vm_disk_remove_asks_before_deleting_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(&["vm", "create", "web", "--disk", "16M", "--disk", "8M"], d);
    let disks = || -> usize {
        let v: Value =
            serde_json::from_str(&ok(&["vm", "disk", "list", "web", "--json"], d)).unwrap();
        v["disks"].as_array().unwrap().len()
    };
    let (success, text) = on_terminal(&["vm", "disk", "remove", "web", "1"], d, "n\n");
    assert!(
        !success
            && text.contains("delete 1 file(s)")
            && text.contains("[y/N]")
            && text.contains("not removed"),
        "{text}"
    );
    assert_eq!(disks(), 2);
    let (success, text) = on_terminal(&["vm", "disk", "remove", "web", "1"], d, "y\n");
    assert!(success && text.contains("deleted disk1.vhdx"), "{text}");
    assert_eq!(disks(), 1);
    // With a checkpoint, only Now's layer (what changed since) is deleted, and asked for;
    // the checkpoint's stays.
    ok(&["checkpoint", "create", "web", "--name", "one"], d);
    let (success, text) = on_terminal(&["vm", "disk", "remove", "web", "0"], d, "y\n");
    assert!(
        success && text.contains("[y/N]") && text.contains("deleted disk0_"),
        "{text}"
    );
    assert!(
        text.contains("kept disk0.vhdx: checkpoint(s) \"one\" use it"),
        "{text}"
    );
    assert_eq!(disks(), 0);
}
