//! Backups of a running VM, on the real test guest under TCG with its counter workload
//! writing to its disk: an online (application-consistent) backup through a recovery
//! checkpoint that is merged away afterwards, an express full after more writes, a
//! crash-consistent one, and a restore as a clone that passes `e2fsck -fn`, holds a
//! gap-free prefix of the original's counter, and boots with its own generation ID while
//! the original keeps running.

mod support;

use std::path::Path;
use std::process::Command;
use support::running::*;
use support::{Cli, guest_sh};

fn fsck_readonly(raw: &Path) -> (i32, String) {
    let out = Command::new("e2fsck").arg("-fn").arg(raw).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn checkpoint_count(cli: &Cli) -> usize {
    cli.json(&["checkpoint", "list", "g", "--json"])["checkpoints"]
        .as_array()
        .unwrap()
        .len()
}

#[test]
fn online_backup_of_a_writing_guest_restores_as_a_clean_clone() {
    let dir = tempfile::tempdir().unwrap();
    let cli = setup_with_repo(dir.path());
    let store = dir.path().join("store");
    cli.ok(&["vm", "start", "g", "--accel", "tcg"]);
    wait("ticks", 120, || ticks(&store).len() >= 3);
    wait("the guest agent", 60, || status(&cli)["agent"] == true);

    let p1 = cli.json(&["backup", "create", "g", "--mode", "online", "--json"]);
    assert_eq!(p1["consistency"], "application", "{p1}");
    assert_eq!(p1["method"], "full", "{p1}");
    assert!(p1["freeze_ms"].as_f64().unwrap() > 0.0, "{p1}");
    assert!(p1["pause_ms"].as_f64().unwrap() >= 0.0, "{p1}");
    // The guest's writes went on during the copy, and were timed.
    let longest = p1["longest_write_ms"]
        .as_f64()
        .expect("a running VM's backup times writes");
    assert!((0.0..5000.0).contains(&longest), "{p1}");
    assert!(p1["bytes_read"].as_u64().unwrap() > 0, "{p1}");
    // The recovery checkpoint is gone, and the guest never stopped writing.
    assert_eq!(checkpoint_count(&cli), 0);
    assert_eq!(status(&cli)["state"], "running");
    let at = max_tick(&store);
    wait("ticks after the backup", 60, || max_tick(&store) > at + 3);

    let p2 = cli.json(&["backup", "create", "g", "--json"]);
    assert_eq!(p2["consistency"], "application", "{p2}");
    assert_eq!(p2["method"], "incremental", "{p2}");
    assert!(
        p2["bytes_stored"].as_u64().unwrap() < p1["bytes_stored"].as_u64().unwrap(),
        "{p2}"
    );
    let p3 = cli.json(&["backup", "create", "g", "--mode", "crash", "--json"]);
    assert_eq!(p3["consistency"], "crash", "{p3}");
    assert_eq!(p3["freeze_ms"], 0.0, "{p3}");
    assert_eq!(checkpoint_count(&cli), 0);
    let v = cli.json(&["backup", "verify", "--json"]);
    assert_eq!(v["clean"], true, "{v}");

    // Restored as a clone: a clean file system with a whole counter.
    let id = p2["id"].as_str().unwrap();
    cli.ok(&["backup", "restore", id, "--as", "clone"]);
    let clone = cli.json(&["vm", "show", "clone", "--json"]);
    let orig = cli.json(&["vm", "show", "g", "--json"]);
    assert_ne!(clone["generation_id"], orig["generation_id"]);
    assert_ne!(clone["uuid"], orig["uuid"]);
    let file = clone["disks"][0]["file"].as_str().unwrap().to_owned();
    let raw = dir.path().join("clone.raw");
    cli.ok(&["disk", "convert", &file, raw.to_str().unwrap()]);
    let (code, out) = fsck_readonly(&raw);
    assert_eq!(code, 0, "e2fsck -fn on the restored disk: {out}");
    assert!(!out.contains("recover"), "{out}");
    let restored = counter_in(&cli, dir.path(), Path::new(&file));
    let restored_ticks = tick_numbers(&restored);
    assert!(!restored_ticks.is_empty(), "no ticks in the restored disk");
    assert_whole(&restored, "the restored disk");

    // The clone boots beside the original, with its own generation ID.
    let mut clone_cli = Cli::new(&store);
    clone_cli.env = cli.env.clone();
    clone_cli.stop_on_drop = Some("clone".into());
    clone_cli.ok(&["vm", "start", "clone", "--accel", "tcg"]);
    wait("the clone's agent", 120, || {
        clone_cli.json(&["vm", "status", "clone", "--json"])["agent"] == true
    });
    let (code, inside) = guest_sh(&store.join("clone"), "vmgenid");
    assert_eq!(code, 0, "{inside}");
    let (_, original_inside) = guest_sh(&store.join("g"), "vmgenid");
    assert_ne!(inside.trim(), original_inside.trim());
    clone_cli.ok(&["vm", "stop", "clone", "--force"]);
    assert_eq!(status(&cli)["state"], "running");
    let at = max_tick(&store);
    wait("the original's ticks", 60, || max_tick(&store) > at + 1);

    // The clone's counter is a prefix of the original's.
    cli.ok(&["vm", "stop", "g", "--force"]);
    let original = tick_numbers(&counter_on_disk(&cli, dir.path()));
    assert!(
        original.len() > restored_ticks.len() && original.starts_with(&restored_ticks),
        "restored {restored_ticks:?} is not a prefix of {original:?}"
    );
    support::check_all_files(&store.join("g"));
}

#[test]
fn online_mode_refuses_without_the_agent_and_auto_falls_back_to_crash() {
    let dir = tempfile::tempdir().unwrap();
    let cli = setup_with_repo(dir.path());
    let store = dir.path().join("store");
    cli.ok(&["vm", "start", "g", "--accel", "tcg"]);
    wait("ticks", 120, || ticks(&store).len() >= 3);
    wait("the guest agent", 60, || status(&cli)["agent"] == true);
    guest_sh(
        &store.join("g"),
        "(sleep 1; kill $(pidof qemu-ga)) >/dev/null 2>&1 &",
    );
    wait("the agent to be gone", 30, || {
        status(&cli)["agent"] == false
    });
    let e = cli.fails(&["backup", "create", "g", "--mode", "online"]);
    assert!(e.contains("application-consistent"), "{e}");
    assert_eq!(checkpoint_count(&cli), 0);
    assert!(
        cli.json(&["backup", "list", "--json"])["points"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    let p = cli.json(&["backup", "create", "g", "--json"]);
    assert_eq!(p["consistency"], "crash", "{p}");
    assert_eq!(p["freeze_ms"], 0.0);
    // Paused only for the switch: milliseconds, not a memory save.
    assert!(p["pause_ms"].as_f64().unwrap() < 2000.0, "{p}");
    assert_eq!(checkpoint_count(&cli), 0);

    // A backup that dies after its recovery checkpoint: nothing listed; the checkpoint is
    // hidden from `checkpoint list` (not from `--all`) and not counted in the limit.
    let mut c = cli.command(&["backup", "create", "g", "--mode", "crash"]);
    // Crash point 1 is the lease taken, 2 the recovery checkpoint taken.
    c.env("SNAPVISOR_CRASH_AT", "2");
    let out = c.output().unwrap();
    assert!(!out.status.success(), "the backup should have died");
    assert!(
        cli.json(&["backup", "list", "--json"])["points"]
            .as_array()
            .unwrap()
            .len()
            == 1
    );
    assert_eq!(checkpoint_count(&cli), 0);
    let all = cli.json(&["checkpoint", "list", "g", "--all", "--json"]);
    let left = all["checkpoints"].as_array().unwrap();
    assert_eq!(left.len(), 1, "{all}");
    assert_eq!(left[0]["type"], "recovery", "{all}");
    let show = cli.json(&["vm", "show", "g", "--json"]);
    assert_eq!(
        show["checkpoint_count"], 0,
        "a recovery checkpoint is not the user's"
    );
    let text = cli.ok(&["checkpoint", "list", "g"]);
    assert!(!text.contains("recovery"), "{text}");
    cli.ok(&["vm", "set", "g", "--max-checkpoints", "1"]);
    cli.ok(&["checkpoint", "create", "g", "--name", "mine"]);
    assert_eq!(checkpoint_count(&cli), 1);
    let at = max_tick(&store);
    wait("ticks", 60, || max_tick(&store) > at + 2);
    cli.ok(&["vm", "stop", "g", "--force"]);
    // The next open of the VM removes what the dead backup left.
    cli.ok(&["vm", "consolidate", "g"]);
    let all = cli.json(&["checkpoint", "list", "g", "--all", "--json"]);
    let names: Vec<&str> = all["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["mine"], "{all}");
    support::check_all_files(&store.join("g"));
}
