//! `backup create --mode saved-state` on the real test guest under TCG, its counter
//! writing: the point holds the guest's memory and device state; restored as a new VM
//! (and in place) the VM is `saved`, and `vm start` resumes the guest from the point's
//! instant: the counter goes on from where it was, in the same boot (the boot id in the
//! counter's lines stays the same), while the original kept running meanwhile; shut down,
//! the resumed clone's disk is a clean file system whose counter has no gap. A stopped
//! VM is copied offline; a saved VM is copied with its saved state.

mod support;

use std::path::Path;
use support::Cli;
use support::running::*;

/// `(tick, boot id)` of each `tick N boot=ID` line on a VM's console.
fn console_ticks(vm_dir: &Path) -> Vec<(u32, String)> {
    std::fs::read_to_string(vm_dir.join("logs/serial.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("tick ")?;
            let mut words = rest.split(' ');
            let n = words.next()?.parse().ok()?;
            let boot = words.next()?.strip_prefix("boot=")?.trim().to_owned();
            Some((n, boot))
        })
        .collect()
}

/// Starts a restored VM and checks that it resumed the original's boot from a tick in
/// `(after, upto]`, and ticks on.
fn starts_where_it_was(cli: &Cli, store: &Path, name: &str, boot: &str, after: u32, upto: u32) {
    let st = cli.json(&["vm", "status", name, "--json"]);
    assert_eq!(st["state"], "saved", "{st}");
    cli.ok(&["vm", "start", name, "--accel", "tcg"]);
    let dir = store.join(name);
    wait("the resumed guest's ticks", 120, || {
        console_ticks(&dir).len() >= 3
    });
    let seen = console_ticks(&dir);
    // No reboot: the first lines come from the same boot as the original's, and the
    // counter continues from where the point caught it.
    assert!(
        seen.iter().all(|(_, b)| b == boot),
        "{name} rebooted: {seen:?} (the original's boot is {boot})"
    );
    let first = seen[0].0;
    assert!(
        first > after && first <= upto + 1,
        "{name} resumed at tick {first}, the point was taken between ticks {after} and {upto}"
    );
    for w in seen.windows(2) {
        assert_eq!(w[1].0, w[0].0 + 1, "{name}'s ticks jump: {seen:?}");
    }
    let st = cli.json(&["vm", "status", name, "--json"]);
    assert_eq!(st["state"], "running", "{st}");
}

#[test]
fn a_saved_state_point_restores_saved_and_resumes_from_its_instant() {
    let dir = tempfile::tempdir().unwrap();
    let cli = setup_with_repo(dir.path());
    let store = dir.path().join("store");
    cli.ok(&["vm", "start", "g", "--accel", "tcg"]);
    wait("ticks", 120, || ticks(&store).len() >= 3);
    let boot = console_ticks(&store.join("g"))[0].1.clone();

    let before = max_tick(&store);
    let p = cli.json(&["backup", "create", "g", "--mode", "saved-state", "--json"]);
    let after = max_tick(&store);
    assert_eq!(p["consistency"], "saved-state", "{p}");
    assert_eq!(p["freeze_ms"], 0.0, "{p}");
    assert!(p["pause_ms"].as_f64().unwrap() > 0.0, "{p}");
    // The point holds the state (QEMU's migration stream, most of 256 MiB of memory).
    let id = p["id"].as_str().unwrap().to_owned();
    let show = cli.json(&["backup", "show", &id, "--json"]);
    let blobs = show["blobs"].to_string();
    assert!(blobs.contains("state.vsv"), "{show}");
    // The recovery checkpoint, with its memory, is gone; the original runs on.
    let all = cli.json(&["checkpoint", "list", "g", "--all", "--json"]);
    assert!(all["checkpoints"].as_array().unwrap().is_empty(), "{all}");
    assert!(
        !store.join("g/checkpoints").exists() || {
            std::fs::read_dir(store.join("g/checkpoints"))
                .unwrap()
                .count()
                == 0
        }
    );
    assert_eq!(status(&cli)["state"], "running");
    wait("the original's ticks", 60, || max_tick(&store) > after + 2);
    let v = cli.json(&["backup", "verify", "--json"]);
    assert_eq!(v["clean"], true, "{v}");

    // Restored as a new VM: saved, and its start resumes the original's boot.
    let mut clone_cli = Cli::new(&store);
    clone_cli.env = cli.env.clone();
    clone_cli.stop_on_drop = Some("clone".into());
    clone_cli.ok(&["backup", "restore", &id, "--as", "clone"]);
    let clone = clone_cli.json(&["vm", "show", "clone", "--json"]);
    let orig = cli.json(&["vm", "show", "g", "--json"]);
    assert_ne!(clone["generation_id"], orig["generation_id"]);
    starts_where_it_was(&clone_cli, &store, "clone", &boot, before, after);
    // Beside the original, which never stopped.
    assert_eq!(status(&cli)["state"], "running");
    let at = max_tick(&store);
    wait("the original's ticks", 60, || max_tick(&store) > at + 1);
    assert!(
        console_ticks(&store.join("g"))
            .iter()
            .all(|(_, b)| *b == boot),
        "the original rebooted"
    );

    // A saved VM is backed up with its saved state, whatever the mode.
    clone_cli.ok(&["vm", "save", "clone"]);
    let ps = clone_cli.json(&["backup", "create", "clone", "--mode", "crash", "--json"]);
    assert_eq!(ps["consistency"], "saved-state", "{ps}");
    // Resumed again and shut down cleanly: what the resumed guest wrote on the restored
    // disk is a clean file system whose counter goes on without a gap, so the memory and
    // the disks of the point belong to the same instant.
    let resumed_at = console_ticks(&store.join("clone"))[0].0;
    let at = console_ticks(&store.join("clone")).last().unwrap().0;
    clone_cli.ok(&["vm", "start", "clone", "--accel", "tcg"]);
    wait("the clone's ticks", 60, || {
        console_ticks(&store.join("clone"))
            .last()
            .is_some_and(|t| t.0 > at + 2)
    });
    clone_cli.ok(&["vm", "stop", "clone"]);
    let show = clone_cli.json(&["vm", "show", "clone", "--json"]);
    let file = show["disks"][0]["file"].as_str().unwrap().to_owned();
    let raw = dir.path().join("clone.raw");
    clone_cli.ok(&["disk", "convert", &file, raw.to_str().unwrap()]);
    let fsck = std::process::Command::new("e2fsck")
        .arg("-fn")
        .arg(&raw)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&fsck.stdout).into_owned();
    assert_eq!(fsck.status.code(), Some(0), "e2fsck -fn: {said}");
    let counter = counter_in(&clone_cli, dir.path(), Path::new(&file));
    assert_whole(&counter, "the resumed clone's disk");
    let n = tick_numbers(&counter);
    assert!(
        n.contains(&resumed_at) && n.last() > Some(&(at + 2)),
        "the clone's disk lacks the ticks it wrote after resuming ({resumed_at}..{at}): {n:?}"
    );

    // In place, on the stopped original: saved again, and it resumes from the point.
    cli.ok(&["vm", "stop", "g", "--force"]);
    // A stopped VM has no memory to save: copied offline.
    let out = cli.run(&["backup", "create", "g", "--mode", "saved-state", "--json"]);
    assert!(out.status.success());
    let off: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(off["consistency"], "offline", "{off}");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("no memory to save"), "{said}");
    cli.ok(&["backup", "restore", &id, "--in-place"]);
    std::fs::remove_file(store.join("g/logs/serial.log")).unwrap();
    starts_where_it_was(&cli, &store, "g", &boot, before, after);

    // The saved VM's point restores saved too.
    let sid = ps["id"].as_str().unwrap().to_owned();
    clone_cli.stop_on_drop = Some("clone2".into());
    clone_cli.ok(&["backup", "restore", &sid, "--as", "clone2"]);
    let st = clone_cli.json(&["vm", "status", "clone2", "--json"]);
    assert_eq!(st["state"], "saved", "{st}");
    cli.ok(&["vm", "stop", "g", "--force"]);
    support::check_all_files(&store.join("g"));
}
