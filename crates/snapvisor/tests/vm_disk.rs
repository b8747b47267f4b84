//! `vm disk add|remove|list` as a user meets them: numbers that stay, disks that belong to
//! Now while checkpoints keep theirs, files deleted only when no checkpoint uses them,
//! a kill at every crash point leaving the VM as before or as after; and on the real
//! guest (TCG) the new disk seen as /dev/vdb with its size, a running VM's refusals, and
//! a live `vm export` that imports back and boots.

mod support;

use serde_json::Value;
use std::path::Path;
use support::running::*;
use support::{Cli, guest_sh};

fn disks(cli: &Cli, vm: &str) -> Vec<Value> {
    cli.json(&["vm", "disk", "list", vm, "--json"])["disks"]
        .as_array()
        .unwrap()
        .clone()
}

fn names(cli: &Cli, vm: &str) -> Vec<String> {
    disks(cli, vm)
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_owned())
        .collect()
}

/// `len` bytes at `offset` of the VM's disk at `position`, read through `disk read`.
fn read(cli: &Cli, vm: &str, position: usize, offset: u64, len: usize) -> Vec<u8> {
    let file = disks(cli, vm)[position]["file"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = cli.run(&[
        "disk",
        "read",
        &file,
        "--offset",
        &offset.to_string(),
        "--length",
        &len.to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn files(store: &Path, vm: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(store.join(vm).join("disks"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn has_file_of(store: &Path, vm: &str, disk: &str) -> bool {
    files(store, vm)
        .iter()
        .any(|f| f == &format!("{disk}.vhdx") || f.starts_with(&format!("{disk}_")))
}

#[test]
fn disks_belong_to_now_and_checkpoints_keep_theirs() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let cli = Cli::new(&store);
    cli.ok(&["vm", "create", "web", "--disk", "16M"]);
    cli.write_disk("web", 0, 0, b"disk zero");
    cli.ok(&["checkpoint", "create", "web", "--name", "one"]);

    // Added: the lowest free number, last in the guest's order.
    let added = cli.json(&["vm", "disk", "add", "web", "--size", "8M", "--json"]);
    assert_eq!(added["number"], 1, "{added}");
    assert_eq!(added["name"], "disk1");
    assert_eq!(added["position"], 1);
    assert_eq!(added["virtual_size"], 8 << 20);
    assert_eq!(added["chain_depth"], 1);
    assert_eq!(added["checkpoints"].as_array().unwrap().len(), 0);
    let text = cli.ok(&["vm", "disk", "list", "web"]);
    assert!(
        text.contains("disk1") && text.contains("vdb") && text.contains("8.0 MiB"),
        "{text}"
    );
    assert_eq!(
        cli.json(&["vm", "show", "web", "--json"])["disks"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    cli.write_disk("web", 1, 4096, b"disk one");
    cli.ok(&["checkpoint", "create", "web", "--name", "two"]);
    let d = disks(&cli, "web");
    assert_eq!(d[1]["checkpoints"][0]["name"], "two");
    assert_eq!(d[0]["checkpoints"].as_array().unwrap().len(), 2);

    // Removing disk 0: Now's layer goes, the checkpoints' layers stay; disk1 keeps its
    // number and becomes the guest's first disk.
    let dry = cli.json(&["vm", "disk", "remove", "web", "0", "--dry-run", "--json"]);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["deleted"].as_array().unwrap().len(), 1, "{dry}");
    assert_eq!(dry["kept"].as_array().unwrap().len(), 2, "{dry}");
    let before = files(&store, "web");
    let text = cli.ok(&["vm", "disk", "remove", "web", "0", "--dry-run"]);
    assert!(
        text.contains("would keep disk0.vhdx: checkpoint(s) \"one\", \"two\" use it"),
        "{text}"
    );
    assert!(text.contains("nothing was changed"), "{text}");
    assert_eq!(files(&store, "web"), before, "a dry run changes nothing");
    let done = cli.json(&["vm", "disk", "remove", "web", "0", "--json"]);
    assert_eq!(done["deleted"], dry["deleted"]);
    assert_eq!(done["kept"], dry["kept"]);
    let deleted = done["deleted"][0]["file"].as_str().unwrap();
    assert!(!files(&store, "web").contains(&deleted.to_owned()));
    let d = disks(&cli, "web");
    assert_eq!(
        (d.len(), &d[0]["number"], &d[0]["position"]),
        (1, &1.into(), &0.into())
    );
    assert_eq!(read(&cli, "web", 0, 4096, 8), b"disk one");
    assert_eq!(
        cli.fails(&["vm", "disk", "remove", "web", "0"]),
        "snapvisor: VM \"web\" has no disk 0 now (only checkpoints have it: applying one of them brings it back); its disks are 1 (`snapvisor vm disk list web`)"
    );
    // disk0 still has checkpoint layers: a new disk does not take its number.
    let added = cli.json(&["vm", "disk", "add", "web", "--size", "4M", "--json"]);
    assert_eq!(added["name"], "disk2");
    assert_eq!(names(&cli, "web"), ["disk1", "disk2"]);

    // Applying a checkpoint brings its disk set back; Now's disk2 goes with Now.
    cli.ok(&["checkpoint", "apply", "web", "one"]);
    assert_eq!(names(&cli, "web"), ["disk0"]);
    assert_eq!(read(&cli, "web", 0, 0, 9), b"disk zero");
    assert!(
        !has_file_of(&store, "web", "disk2"),
        "{:?}",
        files(&store, "web")
    );
    cli.ok(&["checkpoint", "apply", "web", "two"]);
    assert_eq!(names(&cli, "web"), ["disk0", "disk1"]);
    assert_eq!(read(&cli, "web", 1, 4096, 8), b"disk one");

    // Once no checkpoint has disk1, removing it deletes its last file and frees its number.
    cli.ok(&["checkpoint", "delete", "web", "two"]);
    cli.ok(&["vm", "disk", "remove", "web", "1"]);
    assert!(
        !has_file_of(&store, "web", "disk1"),
        "{:?}",
        files(&store, "web")
    );
    let added = cli.json(&["vm", "disk", "add", "web", "--size", "4M", "--json"]);
    assert_eq!(added["name"], "disk1");
    let c = cli.json(&["vm", "consolidate", "web", "--json"]);
    assert_eq!(c["unreferenced_files"].as_array().unwrap().len(), 0, "{c}");

    // Imports: a raw image copied in (the original only read).
    let raw = dir.path().join("data.img");
    let mut bytes = vec![0u8; 2 << 20];
    bytes[1 << 20..(1 << 20) + 5].copy_from_slice(b"hello");
    std::fs::write(&raw, &bytes).unwrap();
    let added = cli.json(&[
        "vm",
        "disk",
        "add",
        "web",
        "--import",
        raw.to_str().unwrap(),
        "--format",
        "raw",
        "--json",
    ]);
    assert_eq!(added["name"], "disk2");
    assert_eq!(added["virtual_size"], 2 << 20);
    assert_eq!(read(&cli, "web", 2, 1 << 20, 5), b"hello");
    assert_eq!(std::fs::read(&raw).unwrap(), bytes);

    // Bad input changes nothing and says what to do.
    let before = files(&store, "web");
    let e = cli.fails(&["vm", "disk", "add", "web", "--import", "/nonexistent.img"]);
    assert_eq!(
        e,
        "snapvisor: cannot add a disk to VM \"web\": the disk to import /nonexistent.img does not exist"
    );
    // Another tool's image is refused with the command that converts it.
    let qcow2 = dir.path().join("q.qcow2");
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&qcow2)
        .arg("16M")
        .status()
        .unwrap();
    assert!(made.success());
    let e = cli.fails(&[
        "vm",
        "disk",
        "add",
        "web",
        "--import",
        qcow2.to_str().unwrap(),
    ]);
    assert!(
        e.starts_with("snapvisor: cannot add a disk to VM \"web\": ")
            && e.contains("is a qcow2 image")
            && e.contains("qemu-img convert -O vhdx"),
        "{e}"
    );
    let out = cli.run(&["vm", "disk", "add", "web", "--size", "4M", "--import", "x"]);
    assert_eq!(out.status.code(), Some(2));
    let out = cli.run(&["vm", "disk", "add", "web"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        cli.fails(&["vm", "disk", "remove", "web", "7"]),
        "snapvisor: VM \"web\" has no disk 7; its disks are 0, 1, 2 (`snapvisor vm disk list web`)"
    );
    assert_eq!(
        cli.fails(&["vm", "disk", "list", "nope"]),
        format!(
            "snapvisor: no VM named \"nope\" in the store {}",
            store.display()
        )
    );
    assert_eq!(files(&store, "web"), before);
}

/// The state a kill can leave: the disk names of Now, and whether the store is clean
/// (no file the tree does not name, after the next command finished what was journaled).
fn settled(cli: &Cli) -> Vec<String> {
    let c = cli.json(&["vm", "consolidate", "web", "--json"]);
    assert_eq!(c["unreferenced_files"].as_array().unwrap().len(), 0, "{c}");
    for d in disks(cli, "web") {
        let out = cli.run(&["disk", "check", d["file"].as_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    names(cli, "web")
}

#[test]
fn a_kill_at_every_crash_point_leaves_the_disks_as_before_or_after() {
    for (what, before, after) in [
        ("add", vec!["disk0"], vec!["disk0", "disk1"]),
        ("remove", vec!["disk0", "disk1"], vec!["disk0"]),
    ] {
        let mut saw_after = false;
        for n in 1.. {
            let dir = tempfile::tempdir().unwrap();
            let mut cli = Cli::new(&dir.path().join("store"));
            cli.ok(&["vm", "create", "web", "--disk", "8M"]);
            cli.ok(&["checkpoint", "create", "web", "--name", "one"]);
            if what == "remove" {
                cli.ok(&["vm", "disk", "add", "web", "--size", "8M"]);
                cli.write_disk("web", 1, 0, b"data");
            }
            let args: &[&str] = if what == "add" {
                &["vm", "disk", "add", "web", "--size", "8M"]
            } else {
                &["vm", "disk", "remove", "web", "1"]
            };
            cli.env.push(("SNAPVISOR_CRASH_AT".into(), n.to_string()));
            let out = cli.command(args).output().unwrap();
            cli.env.pop();
            let got = settled(&cli);
            if out.status.success() {
                assert_eq!(got, after, "{what}: finished");
                assert!(n > 2, "{what}: the crash points were not reached");
                break;
            }
            assert!(
                got == before || got == after,
                "{what} killed at crash point {n}: disks {got:?}"
            );
            saw_after |= got == after;
            assert!(n < 100, "{what} never finished");
        }
        assert!(
            saw_after,
            "{what}: no kill left the change made (the journal's replay)"
        );
    }
}

#[test]
fn the_guest_sees_an_added_disk_and_a_running_vm_is_exported_live() {
    let dir = tempfile::tempdir().unwrap();
    let cli = setup(dir.path());
    let store = dir.path().join("store");
    let added = cli.json(&["vm", "disk", "add", "g", "--size", "48M", "--json"]);
    assert_eq!(added["name"], "disk1");
    cli.ok(&["vm", "start", "g", "--accel", "tcg"]);
    wait("ticks", 120, || ticks(&store).len() >= 3);
    wait("the guest agent", 60, || status(&cli)["agent"] == true);
    let (code, out) = guest_sh(&store.join("g"), "cat /sys/block/vdb/size");
    assert_eq!(
        (code, out.trim()),
        (0, "98304"),
        "48 MiB in 512-byte sectors"
    );

    // Refusals of a running VM name it once and say what to do.
    let stop_first = "VM \"g\" is running; stop it first: `snapvisor vm stop g`";
    for args in [
        &["vm", "disk", "add", "g", "--size", "8M"][..],
        &["vm", "disk", "remove", "g", "1", "--yes"],
        &["vm", "delete", "g", "--yes"],
        &["vm", "consolidate", "g"],
    ] {
        assert_eq!(
            cli.fails(args),
            format!("snapvisor: {stop_first}"),
            "{args:?}"
        );
    }
    assert_eq!(
        cli.fails(&["checkpoint", "delete", "g", "nosuch"]),
        "snapvisor: VM \"g\" has no checkpoint named \"nosuch\" or with that id"
    );
    assert_eq!(names(&cli, "g"), ["disk0", "disk1"]);
    cli.ok(&["vm", "pause", "g"]);
    assert_eq!(
        cli.fails(&["vm", "disk", "add", "g", "--size", "8M"]),
        "snapvisor: VM \"g\" is paused; stop it first: `snapvisor vm stop g`"
    );
    cli.ok(&["vm", "resume", "g"]);

    // Export-VM, live: the guest keeps writing, the checkpoint taken for it goes again.
    let (_, written) = guest_sh(&store.join("g"), "echo exported > /dev/vdb; sync; echo ok");
    assert_eq!(written.trim(), "ok");
    // An export killed once its checkpoint is taken leaves no folder; the checkpoint
    // stays hidden until the next recovery checkpoint's sweep (its lease died with it).
    let killed = dir.path().join("killed");
    let out = cli
        .command(&["vm", "export", "g", killed.to_str().unwrap()])
        .env("SNAPVISOR_CRASH_AT", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!killed.exists());
    let all = cli.json(&["checkpoint", "list", "g", "--all", "--json"]);
    assert_eq!(all["checkpoints"][0]["type"], "recovery", "{all}");
    // Now's layers are the worker's alone; sizes come from the checkpoint's under them.
    let d = disks(&cli, "g");
    assert_eq!(
        (&d[0]["virtual_size"], &d[1]["virtual_size"]),
        (&(64 << 20).into(), &(48 << 20).into()),
        "{d:?}"
    );
    let at = ticks(&store).into_iter().max().unwrap();
    let export = dir.path().join("export");
    let e = cli.json(&["vm", "export", "g", export.to_str().unwrap(), "--json"]);
    assert_eq!(e["live"], true, "{e}");
    assert_eq!(e["consistency"], "application-consistent", "{e}");
    assert!(e["frozen_ms"].as_f64().unwrap() > 0.0, "{e}");
    assert_eq!(status(&cli)["state"], "running");
    let all = cli.json(&["checkpoint", "list", "g", "--all", "--json"]);
    assert_eq!(
        all["checkpoints"].as_array().unwrap().len(),
        0,
        "the dead export's checkpoint was swept: {all}"
    );
    let exported: Value =
        serde_json::from_slice(&std::fs::read(export.join("vm.json")).unwrap()).unwrap();
    assert_eq!(
        exported["checkpoints"].as_array().unwrap().len(),
        0,
        "{exported}"
    );
    wait("ticks after the export", 60, || {
        ticks(&store).into_iter().max().unwrap() > at + 3
    });
    // The export into an existing folder or the store is refused before any checkpoint.
    assert!(
        cli.fails(&["vm", "export", "g", export.to_str().unwrap()])
            .contains("is not empty")
    );
    let inside = store.join("inside");
    assert!(
        cli.fails(&["vm", "export", "g", inside.to_str().unwrap()])
            .contains("inside the store")
    );
    let all = cli.json(&["checkpoint", "list", "g", "--all", "--json"]);
    assert_eq!(all["checkpoints"].as_array().unwrap().len(), 0, "{all}");

    // The export imports back as a new VM and boots with both disks, the counter going on
    // from where the export caught it.
    cli.ok(&["vm", "stop", "g", "--force"]);
    cli.ok(&["vm", "consolidate", "g"]);
    let all = cli.json(&["checkpoint", "list", "g", "--all", "--json"]);
    assert_eq!(all["checkpoints"].as_array().unwrap().len(), 0, "{all}");
    cli.ok(&[
        "vm",
        "import",
        export.to_str().unwrap(),
        "--copy",
        "--name",
        "g2",
    ]);
    let mut cli2 = Cli::new(&store);
    cli2.env = cli.env.clone();
    cli2.stop_on_drop = Some("g2".into());
    assert_eq!(names(&cli2, "g2"), ["disk0", "disk1"]);
    cli2.ok(&["vm", "start", "g2", "--accel", "tcg"]);
    let g2_ticks = || -> Vec<u32> {
        std::fs::read_to_string(store.join("g2/logs/serial.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix("tick "))
            .filter_map(|l| l.split(' ').next()?.parse().ok())
            .collect()
    };
    wait("the copy's ticks", 120, || g2_ticks().len() >= 2);
    let first = g2_ticks()[0];
    assert!(
        first > at.saturating_sub(5) && first > 1,
        "copy started at tick {first}, export near {at}"
    );
    wait("the copy's agent", 60, || {
        cli2.json(&["vm", "status", "g2", "--json"])["agent"] == true
    });
    let (_, out) = guest_sh(&store.join("g2"), "head -c 8 /dev/vdb");
    assert_eq!(out, "exported");
}
