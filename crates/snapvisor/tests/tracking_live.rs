//! Change tracking on the real test guest under TCG, with its counter workload writing:
//! incremental backups of the running guest read only the changed regions, survive a
//! SIGKILL of the worker, and restore byte for byte what the disk held; an offline write
//! to the disk's file invalidates the tracking, the next backup is an express full, and
//! the one after is incremental again.

mod support;

use serde_json::Value;
use std::path::Path;
use support::Cli;
use support::running::*;

const DISK: u64 = 64 << 20;

fn tracking(cli: &Cli) -> Value {
    cli.json(&["vm", "show", "g", "--json"])["disks"][0]["tracking"].clone()
}

/// The point's disk 0 restored to a raw file, and Now's chain flattened to one.
fn restored_and_now(cli: &Cli, dir: &Path, point: &str) -> (Vec<u8>, Vec<u8>) {
    let restored = dir.join(format!("{point}.raw"));
    cli.ok(&[
        "backup",
        "restore",
        point,
        "--disk",
        "0",
        "--to",
        restored.to_str().unwrap(),
        "--format",
        "raw",
    ]);
    let show = cli.json(&["vm", "show", "g", "--json"]);
    let file = show["disks"][0]["file"].as_str().unwrap().to_owned();
    let now = dir.join(format!("now-{point}.raw"));
    let _ = std::fs::remove_file(&now);
    cli.ok(&["disk", "convert", &file, now.to_str().unwrap()]);
    (
        std::fs::read(&restored).unwrap(),
        std::fs::read(&now).unwrap(),
    )
}

fn assert_same(a: &[u8], b: &[u8], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: sizes differ");
    if let Some(at) = a.iter().zip(b).position(|(x, y)| x != y) {
        panic!(
            "{what}: first difference at byte {at} (region {})",
            at >> 22
        );
    }
}

#[test]
fn incrementals_of_a_running_guest_read_only_changes_and_survive_a_worker_kill() {
    let dir = tempfile::tempdir().unwrap();
    let cli = setup_with_repo(dir.path());
    let store = dir.path().join("store");
    assert_eq!(tracking(&cli)["state"], "none");
    cli.ok(&["vm", "start", "g", "--accel", "tcg"]);
    wait("ticks", 120, || ticks(&store).len() >= 3);
    wait("the guest agent", 60, || status(&cli)["agent"] == true);

    let p1 = cli.json(&["backup", "create", "g", "--json"]);
    assert_eq!(p1["method"], "full", "{p1}");
    let t = tracking(&cli);
    assert_eq!(t["state"], "valid", "{t}");
    assert_eq!(t["reference"], p1["id"], "{t}");
    assert_eq!(t["live"], true, "{t}");

    let at = max_tick(&store);
    wait("ticks after the backup", 60, || max_tick(&store) > at + 3);
    let p2 = cli.json(&["backup", "create", "g", "--json"]);
    assert_eq!(p2["method"], "incremental", "{p2}");
    assert_eq!(p2["consistency"], "application", "{p2}");
    let read1 = p1["bytes_read"].as_u64().unwrap();
    let read2 = p2["bytes_read"].as_u64().unwrap();
    // The counter touches its file, the journal and a few metadata blocks: a handful of
    // 4 MiB regions of the 64 MiB disk.
    assert!(
        read2 > 0 && read2 <= DISK / 4 && read2 < read1,
        "incremental read {read2} bytes (full: {read1})"
    );
    let text = cli.ok(&["vm", "show", "g"]);
    assert!(text.contains("tracking: valid since"), "{text}");
    eprintln!(
        "full: read {read1} bytes in {} ms; incremental: read {read2} bytes in {} ms",
        p1["duration_ms"], p2["duration_ms"]
    );

    // A backup killed right after its switch: its frozen set stays in the file, pending.
    let at = max_tick(&store);
    wait("ticks after p2", 60, || max_tick(&store) > at + 3);
    // 8 MiB written only before that switch: only the frozen set has their regions.
    let (code, out) = support::guest_sh(
        &store.join("g"),
        "dd if=/dev/urandom of=/mnt/frozen-only bs=1M count=8 2>/dev/null && sync",
    );
    assert_eq!(code, 0, "{out}");
    // Crash point 2: after the recovery checkpoint (1 is the lease, taken before it).
    let mut c = cli.command(&["backup", "create", "g"]);
    c.env("SNAPVISOR_CRASH_AT", "2");
    assert!(
        !c.output().unwrap().status.success(),
        "the backup should have died"
    );
    let all = cli.json(&["checkpoint", "list", "g", "--all", "--json"]);
    assert_eq!(all["checkpoints"].as_array().unwrap().len(), 1, "{all}");
    let t = tracking(&cli);
    assert!(t["pending"].is_string(), "{t}");

    // The worker dies with more writes marked; a new one takes over the same file (the
    // open removes the dead backup's recovery checkpoint, merging it away, first).
    let at = max_tick(&store);
    wait("ticks after the killed backup", 60, || {
        max_tick(&store) > at + 3
    });
    kill_worker(&cli);
    let t = tracking(&cli);
    assert_eq!(t["state"], "valid", "after the kill: {t}");
    cli.ok(&["vm", "start", "g", "--accel", "tcg"]);
    let at = max_tick(&store);
    wait("ticks after the restart", 180, || max_tick(&store) > at + 3);
    let all = cli.json(&["checkpoint", "list", "g", "--all", "--json"]);
    assert!(all["checkpoints"].as_array().unwrap().is_empty(), "{all}");
    // Paused, so that the disk after the stop is the disk at the point's switch.
    cli.ok(&["vm", "pause", "g"]);
    let p3 = cli.json(&["backup", "create", "g", "--json"]);
    assert_eq!(p3["method"], "incremental", "{p3}");
    let read3 = p3["bytes_read"].as_u64().unwrap();
    assert!(
        (8 << 20..=DISK * 3 / 4).contains(&read3),
        "{p3}: the dead backup's frozen set (8 MiB of new file at least) and the rest, not the whole disk"
    );
    cli.ok(&["vm", "stop", "g", "--force"]);
    eprintln!(
        "after the kill: incremental read {} bytes",
        p3["bytes_read"]
    );
    let p3_id = p3["id"].as_str().unwrap();
    let (restored, now) = restored_and_now(&cli, dir.path(), p3_id);
    assert_same(&restored, &now, "the incremental after the worker kill");

    // Stopped: the tracking the worker sealed is checked against the chain and used.
    let t = tracking(&cli);
    assert_eq!(t["state"], "valid", "{t}");
    assert_eq!(t["live"], false, "{t}");
    let p4 = cli.json(&["backup", "create", "g", "--json"]);
    assert_eq!(p4["method"], "incremental", "{p4}");
    assert_eq!(p4["consistency"], "offline", "{p4}");

    // An offline write to Now's file, behind the tracker's back.
    cli.write_disk("g", 0, 20 << 20, b"written offline");
    let t = tracking(&cli);
    assert_eq!(t["state"], "invalid", "{t}");
    assert!(
        t["reason"].as_str().unwrap().contains("DataWriteGuid"),
        "{t}"
    );
    let text = cli.ok(&["vm", "show", "g"]);
    assert!(text.contains("tracking: invalid ("), "{text}");
    let p5 = cli.json(&["backup", "create", "g", "--json"]);
    assert_eq!(p5["method"], "express-full", "{p5}");
    let (restored, now) = restored_and_now(&cli, dir.path(), p5["id"].as_str().unwrap());
    assert_same(&restored, &now, "the express full after the offline write");
    let p6 = cli.json(&["backup", "create", "g", "--json"]);
    assert_eq!(p6["method"], "incremental", "{p6}");
    assert!(p6["bytes_read"].as_u64().unwrap() < DISK / 16, "{p6}");
    let v = cli.json(&["backup", "verify", "--json"]);
    assert_eq!(v["clean"], true, "{v}");
    support::check_all_files(&store.join("g"));
}

/// Starts VM `g` with its worker set to abort at the crash point `at` (none: not at all).
fn start_crashing_at(cli: &Cli, store: &Path, at: Option<&str>) {
    let mut c = cli.command(&["vm", "start", "g", "--accel", "tcg"]);
    if let Some(at) = at {
        c.env("SNAPVISOR_CRASH_ON", at);
    }
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "vm start: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let from = max_tick(store);
    wait("ticks after the start", 180, || max_tick(store) > from + 3);
}

#[test]
fn a_worker_killed_while_merging_a_backups_checkpoint_away_keeps_tracking_valid() {
    let dir = tempfile::tempdir().unwrap();
    let cli = setup_with_repo(dir.path());
    let store = dir.path().join("store");
    // Each backup's recovery checkpoint merges away under the guest; the worker dies at
    // one step of that merge after the point committed, before the tracker saw its end.
    let steps = [
        "live merge: planned",
        "live merge: copied",
        "live merge: switched",
        "live merge: committed",
    ];
    let mut last: Option<String> = None;
    for step in steps {
        start_crashing_at(&cli, &store, Some(step));
        // Paused, so that the disk the worker leaves is the disk at the point's switch.
        cli.ok(&["vm", "pause", "g"]);
        let p = cli.json(&["backup", "create", "g", "--json"]);
        let want = if last.is_none() {
            "full"
        } else {
            "incremental"
        };
        assert_eq!(p["method"], want, "{step}: {p}");
        wait("the worker to die in the merge", 60, || {
            !matches!(status(&cli)["state"].as_str(), Some("running" | "paused"))
        });
        let log = std::fs::read_to_string(store.join("g/logs/worker.log")).unwrap_or_default();
        assert!(
            !log.contains("cannot record the merge"),
            "{step}: the worker did not record the merge: {log}"
        );
        // The next open finishes the merge from its journal.
        let all = cli.json(&["checkpoint", "list", "g", "--all", "--json"]);
        assert!(all["checkpoints"].as_array().unwrap().is_empty(), "{all}");
        let t = tracking(&cli);
        assert_eq!(t["state"], "valid", "{step}: after the kill: {t}");
        assert_eq!(t["reference"], p["id"], "{step}: {t}");
        let id = p["id"].as_str().unwrap().to_owned();
        let (restored, now) = restored_and_now(&cli, dir.path(), &id);
        assert_same(&restored, &now, step);
        last = Some(id);
    }
    // A worker that lives: the backup after the last kill is incremental too, and exact.
    start_crashing_at(&cli, &store, None);
    wait("the guest agent", 60, || status(&cli)["agent"] == true);
    let (code, out) = support::guest_sh(
        &store.join("g"),
        "dd if=/dev/urandom of=/mnt/after-kills bs=1M count=4 2>/dev/null && sync",
    );
    assert_eq!(code, 0, "{out}");
    cli.ok(&["vm", "pause", "g"]);
    let p = cli.json(&["backup", "create", "g", "--json"]);
    assert_eq!(p["method"], "incremental", "{p}");
    let read = p["bytes_read"].as_u64().unwrap();
    assert!(
        (4 << 20..=DISK * 3 / 4).contains(&read),
        "{p}: the new file at least, not the whole disk"
    );
    cli.ok(&["vm", "stop", "g", "--force"]);
    let (restored, now) = restored_and_now(&cli, dir.path(), p["id"].as_str().unwrap());
    assert_same(&restored, &now, "the backup after the kills");
    let v = cli.json(&["backup", "verify", "--json"]);
    assert_eq!(v["clean"], true, "{v}");
    support::check_all_files(&store.join("g"));
}

#[test]
fn a_worker_killed_once_a_checkpoint_delete_is_planned_keeps_tracking_valid() {
    // Deleting the checkpoint under Now merges Now's layer, which holds the guest's
    // writes since the checkpoint, into its parent. The worker dies right after the
    // merge's journal is written, before any data moved; the next open replays the merge,
    // and the parent must come out with a DataWriteGuid the tracker accepts.
    let dir = tempfile::tempdir().unwrap();
    let cli = setup(dir.path());
    let store = dir.path().join("store");
    start_crashing_at(&cli, &store, Some("live merge: planned"));
    let t = tracking(&cli);
    assert_eq!(t["state"], "valid", "before the delete: {t}");
    cli.ok(&["checkpoint", "create", "g", "--name", "u"]);
    let from = max_tick(&store);
    wait("ticks in Now's layer", 60, || max_tick(&store) > from + 3);
    let _ = cli.command(&["checkpoint", "delete", "g", "u"]).output();
    wait("the worker to die in the merge", 60, || {
        !matches!(status(&cli)["state"].as_str(), Some("running" | "paused"))
    });
    // `vm show` finishes the merge from its journal.
    let t = tracking(&cli);
    assert_eq!(t["state"], "valid", "after the kill: {t}");
    let list = cli.json(&["checkpoint", "list", "g", "--all", "--json"]);
    assert!(list["checkpoints"].as_array().unwrap().is_empty(), "{list}");
    support::check_all_files(&store.join("g"));
}
