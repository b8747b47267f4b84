//! Checkpoints of running VMs, on the real test guest under TCG with its counter workload
//! writing to its disk: production checkpoints (the guest agent freezes the file
//! systems), standard checkpoints (memory kept), apply on a running VM, the fallback when
//! the agent is gone, delete under a running guest, automatic checkpoints, and the VM
//! generation ID as QMP and the guest itself see it.

mod support;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use support::running::*;
use support::{Cli, guest_sh};

fn start(cli: &Cli, store: &Path) {
    cli.ok(&["vm", "start", "g", "--accel", "tcg"]);
    wait("ticks", 120, || ticks(store).len() >= 3);
    wait("the guest agent", 60, || status(cli)["agent"] == true);
}

fn max_tick(store: &Path) -> u32 {
    ticks(store).into_iter().max().unwrap_or(0)
}

/// A layer's chain flattened to a raw file in `dir`, as bytes.
fn flatten(cli: &Cli, dir: &Path, file: &str, name: &str) -> PathBuf {
    let raw = dir.join(name);
    let _ = std::fs::remove_file(&raw);
    cli.ok(&["disk", "convert", file, raw.to_str().unwrap()]);
    raw
}

/// `e2fsck -fn` on a copy: exit code and output.
fn fsck_readonly(raw: &Path) -> (i32, String) {
    let out = Command::new("e2fsck").arg("-fn").arg(raw).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// The counter on disk is there and whole.
fn assert_consecutive(counter: &str) {
    assert!(!tick_numbers(counter).is_empty(), "no ticks on the disk");
    assert_whole(counter, "the disk");
}

fn checkpoint_file(cli: &Cli, name: &str) -> String {
    let list = cli.json(&["checkpoint", "list", "g", "--json"]);
    let c = list["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no checkpoint {name}: {list}"))
        .clone();
    c["disks"][0]["file"].as_str().unwrap().to_owned()
}

fn now_file(cli: &Cli) -> String {
    cli.json(&["vm", "show", "g", "--json"])["disks"][0]["file"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn config_generation(cli: &Cli) -> String {
    cli.json(&["vm", "show", "g", "--json"])["generation_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The generation ID as QEMU reports it and as the guest reads it from its memory.
fn guest_generation(cli: &Cli, store: &Path) -> (String, String) {
    let qmp = status(cli)["generation_id"].as_str().unwrap().to_owned();
    let (code, inside) = guest_sh(&store.join("g"), "vmgenid");
    assert_eq!(code, 0, "vmgenid in the guest failed: {inside}");
    (qmp, inside.trim().to_owned())
}

#[test]
fn production_checkpoint_of_a_writing_guest_is_application_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let cli = setup(dir.path());
    let store = dir.path().join("store");
    start(&cli, &store);
    let generation = config_generation(&cli);
    let c = cli.json(&["checkpoint", "create", "g", "--name", "prod", "--json"]);
    assert_eq!(c["type"], "production", "{c}");
    assert_eq!(c["consistency"], "application-consistent", "{c}");
    assert_eq!(c["has_memory"], false);
    assert!(c["capture"]["frozen_ms"].as_f64().unwrap() > 0.0, "{c}");
    assert!(c["capture"]["fallback"].is_null(), "{c}");
    // The guest goes on writing, into the new layer.
    let at = max_tick(&store);
    wait("ticks after the checkpoint", 60, || {
        max_tick(&store) > at + 4
    });
    assert_eq!(status(&cli)["state"], "running");

    // The checkpoint's disk needs no journal recovery: the freeze flushed it.
    let cp = checkpoint_file(&cli, "prod");
    let raw = flatten(&cli, dir.path(), &cp, "cp.raw");
    let (code, out) = fsck_readonly(&raw);
    assert_eq!(code, 0, "e2fsck -fn on the checkpoint's disk: {out}");
    assert!(!out.contains("recover"), "{out}");
    let cp_counter = counter_in(&cli, dir.path(), Path::new(&cp));
    assert_consecutive(&cp_counter);
    // Exported while the VM runs: a standalone VM whose disk is the checkpoint's.
    let exported = dir.path().join("exported");
    cli.ok(&[
        "checkpoint",
        "export",
        "g",
        "prod",
        exported.to_str().unwrap(),
    ]);
    let flat = flatten(
        &cli,
        dir.path(),
        exported.join("disks/disk0.vhdx").to_str().unwrap(),
        "exported.raw",
    );
    assert!(
        std::fs::read(&flat).unwrap() == std::fs::read(&raw).unwrap(),
        "the export differs from the checkpoint"
    );
    cli.ok(&["checkpoint", "rename", "g", "prod", "prod-renamed"]);
    cli.ok(&["checkpoint", "rename", "g", "prod-renamed", "prod"]);

    // Applied on the running VM: the VM is off, its disk is the checkpoint's.
    let applied = cli.json(&["checkpoint", "apply", "g", "prod", "--json"]);
    assert_eq!(applied["state"], "off", "{applied}");
    assert_ne!(config_generation(&cli), generation);
    let now = flatten(&cli, dir.path(), &now_file(&cli), "now.raw");
    assert!(
        std::fs::read(&now).unwrap() == std::fs::read(&raw).unwrap(),
        "Now's disk differs from the checkpoint's after apply"
    );
    support::check_all_files(&store.join("g"));
    // --start boots it from there; its counter continues from the checkpoint's disk.
    let last = *tick_numbers(&cp_counter).last().unwrap();
    cli.ok(&["checkpoint", "apply", "g", "prod", "--start"]);
    wait("ticks", 120, || !ticks(&store).is_empty());
    assert_eq!(ticks(&store)[0], last + 1);
    cli.ok(&["vm", "stop", "g"]);
    assert_consecutive(&counter_on_disk(&cli, dir.path()));
}

#[test]
fn standard_checkpoint_comes_back_running_from_its_memory() {
    let dir = tempfile::tempdir().unwrap();
    let cli = setup_with(dir.path(), &["--checkpoint-type", "standard"]);
    let store = dir.path().join("store");
    start(&cli, &store);
    let generation = config_generation(&cli);
    assert_eq!(
        guest_generation(&cli, &store),
        (generation.clone(), generation.clone())
    );
    // Neither pause nor save changes it.
    cli.ok(&["vm", "pause", "g"]);
    cli.ok(&["vm", "resume", "g"]);
    cli.ok(&["vm", "save", "g"]);
    cli.ok(&["vm", "start", "g", "--accel", "tcg"]);
    wait("the guest agent", 60, || status(&cli)["agent"] == true);
    assert_eq!(config_generation(&cli), generation);
    assert_eq!(
        guest_generation(&cli, &store),
        (generation.clone(), generation.clone())
    );

    let c = cli.json(&["checkpoint", "create", "g", "--name", "std", "--json"]);
    let taken_at = max_tick(&store);
    assert_eq!(c["type"], "standard", "{c}");
    assert_eq!(c["consistency"], "crash-consistent-with-memory", "{c}");
    assert_eq!(c["has_memory"], true);
    let memory = Path::new(c["capture"]["memory"]["file"].as_str().unwrap());
    assert!(memory.metadata().unwrap().len() > 1 << 20, "{c}");
    let on_disk = tick_numbers(&counter_in(
        &cli,
        dir.path(),
        Path::new(&checkpoint_file(&cli, "std")),
    ));
    let disk_last = *on_disk.last().unwrap();
    // The guest goes on well past the checkpoint.
    wait("ticks after the checkpoint", 60, || {
        max_tick(&store) > taken_at + 8
    });

    let applied = cli.json(&["checkpoint", "apply", "g", "std", "--json"]);
    assert_eq!(applied["state"], "running", "{applied}");
    wait("ticks of the restored guest", 60, || {
        !ticks(&store).is_empty()
    });
    let first = ticks(&store)[0];
    // The counter continues from the checkpoint's memory: not from the discarded future,
    // not from a new boot (which would start after the disk's last tick).
    assert!(
        first > disk_last && first <= taken_at + 2,
        "first tick after apply {first}; the checkpoint's disk ended at {disk_last}, the console was at {taken_at}"
    );
    // A new generation ID, and the guest sees it in its memory.
    let new_generation = config_generation(&cli);
    assert_ne!(new_generation, generation);
    wait("the guest agent", 60, || status(&cli)["agent"] == true);
    assert_eq!(
        guest_generation(&cli, &store),
        (new_generation.clone(), new_generation)
    );
    let at = max_tick(&store);
    wait("more ticks", 60, || max_tick(&store) > at + 3);
    cli.ok(&["vm", "stop", "g"]);
    let counter = counter_on_disk(&cli, dir.path());
    assert_consecutive(&counter);
    assert!(tick_numbers(&counter).contains(&first));
    support::check_all_files(&store.join("g"));

    // Applied to the VM while it is off, a checkpoint with memory leaves it saved (as
    // Hyper-V does), wherever the state shows; `vm stop` discards that state, and
    // `vm start` resumes from the checkpoint's memory.
    let applied = cli.json(&["checkpoint", "apply", "g", "std", "--json"]);
    assert_eq!(applied["state"], "saved", "{applied}");
    assert_state_everywhere(&cli, "saved");
    let e = cli.fails(&["vm", "set", "g", "--memory", "512M"]);
    assert!(e.contains("is saved"), "{e}");
    let out = cli.ok(&["vm", "stop", "g"]);
    assert!(out.contains("discarded the saved state"), "{out}");
    assert_state_everywhere(&cli, "off");
    assert!(!store.join("g/saved/state.vsv").exists());
    let applied = cli.json(&["checkpoint", "apply", "g", "std", "--json"]);
    assert_eq!(applied["state"], "saved", "{applied}");
    cli.ok(&["vm", "start", "g", "--accel", "tcg"]);
    assert_state_everywhere(&cli, "running");
    wait("ticks of the resumed guest", 60, || {
        !ticks(&store).is_empty()
    });
    let first = ticks(&store)[0];
    assert!(
        first > disk_last && first <= taken_at + 2,
        "first tick after the start {first}; the checkpoint's disk ended at {disk_last}, the console was at {taken_at}"
    );
    cli.ok(&["vm", "stop", "g", "--force"]);
}

/// `vm status`, `vm show` and `vm list`, text and JSON, all say `state`.
fn assert_state_everywhere(cli: &Cli, state: &str) {
    assert_eq!(status(cli)["state"], state);
    assert_eq!(cli.json(&["vm", "show", "g", "--json"])["state"], state);
    assert_eq!(
        cli.json(&["vm", "list", "--json"])["vms"][0]["state"],
        state
    );
    assert!(
        cli.ok(&["vm", "status", "g"])
            .starts_with(&format!("g: {state}\n"))
    );
    assert!(
        cli.ok(&["vm", "show", "g"])
            .contains(&format!("state          {state}\n"))
    );
    assert!(
        cli.ok(&["vm", "list"])
            .lines()
            .nth(1)
            .unwrap()
            .contains(&format!(" {state} "))
    );
}

#[test]
fn without_the_agent_production_falls_back_and_production_only_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let cli = setup(dir.path());
    let store = dir.path().join("store");
    start(&cli, &store);
    // The agent dies inside the guest (a second later, so that this call returns).
    guest_sh(
        &store.join("g"),
        "(sleep 1; kill $(pidof qemu-ga)) >/dev/null 2>&1 &",
    );
    wait("the agent to be gone", 30, || {
        status(&cli)["agent"] == false
    });

    let c = cli.json(&["checkpoint", "create", "g", "--name", "fallback", "--json"]);
    assert_eq!(c["type"], "standard", "{c}");
    assert_eq!(c["has_memory"], true);
    assert!(
        c["capture"]["fallback"]
            .as_str()
            .is_some_and(|f| f.contains("agent")),
        "{c}"
    );
    let text = cli.ok(&["checkpoint", "list", "g"]);
    assert!(text.contains("fallback  [standard"), "{text}");

    cli.ok(&["vm", "set", "g", "--checkpoint-type", "production-only"]);
    let files_before = folder_listing(&store.join("g"));
    let e = cli.fails(&["checkpoint", "create", "g", "--name", "refused"]);
    assert!(e.contains("production-only"), "{e}");
    assert_eq!(folder_listing(&store.join("g")), files_before);
    let list = cli.json(&["checkpoint", "list", "g", "--json"]);
    assert_eq!(list["checkpoints"].as_array().unwrap().len(), 1);
    // The guest never stopped.
    let at = max_tick(&store);
    wait("ticks", 60, || max_tick(&store) > at + 2);
    cli.ok(&["vm", "stop", "g", "--force"]);
    support::check_all_files(&store.join("g"));
}

fn folder_listing(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for sub in ["disks", "checkpoints"] {
        for e in std::fs::read_dir(dir.join(sub)).unwrap() {
            out.push(format!(
                "{sub}/{}",
                e.unwrap().file_name().to_string_lossy()
            ));
        }
    }
    out.sort();
    out
}

#[test]
fn deleting_checkpoints_under_a_running_guest_keeps_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let cli = setup(dir.path());
    let store = dir.path().join("store");
    start(&cli, &store);
    cli.ok(&["checkpoint", "create", "g", "--name", "a"]);
    let at = max_tick(&store);
    wait("ticks", 60, || max_tick(&store) > at + 4);
    cli.ok(&["checkpoint", "create", "g", "--name", "b"]);
    let b_counter = counter_in(&cli, dir.path(), Path::new(&checkpoint_file(&cli, "b")));
    let at = max_tick(&store);
    wait("ticks", 60, || max_tick(&store) > at + 4);

    // a's layer (the base) merges with b's, below the guest's writable layer.
    let d: Value = cli.json(&["checkpoint", "delete", "g", "a", "--json"]);
    assert_eq!(d["checkpoints_removed"], 1, "{d}");
    assert_eq!(d["live_merges"].as_array().unwrap().len(), 1, "{d}");
    assert!(
        d["merge_when_stopped"].as_array().unwrap().is_empty(),
        "{d}"
    );
    // b's data is what it was.
    assert_eq!(
        counter_in(&cli, dir.path(), Path::new(&checkpoint_file(&cli, "b"))),
        b_counter
    );
    // b's layer merges with the layer the guest is writing.
    let d: Value = cli.json(&["checkpoint", "delete", "g", "b", "--json"]);
    assert_eq!(d["live_merges"].as_array().unwrap().len(), 1, "{d}");
    let list = cli.json(&["checkpoint", "list", "g", "--json"]);
    assert!(list["checkpoints"].as_array().unwrap().is_empty(), "{list}");
    // Merged while the guest runs: one layer left, and the guest goes on writing.
    let show = cli.json(&["vm", "show", "g", "--json"]);
    assert!(
        show["hidden_layers"].as_array().unwrap().is_empty(),
        "{show}"
    );
    assert_eq!(show["disks"][0]["chain_depth"], 1, "{show}");
    assert_eq!(status(&cli)["state"], "running");
    let at = max_tick(&store);
    wait("ticks after the deletes", 60, || max_tick(&store) > at + 4);
    cli.ok(&["vm", "stop", "g"]);
    let show = cli.json(&["vm", "show", "g", "--json"]);
    assert_eq!(show["disks"][0]["chain_depth"], 1, "{show}");
    let counter = counter_on_disk(&cli, dir.path());
    assert_consecutive(&counter);
    assert!(counter.contains(b_counter.lines().last().unwrap()));
    support::check_all_files(&store.join("g"));
}

#[test]
fn automatic_checkpoints_come_and_go_with_a_clean_run() {
    let dir = tempfile::tempdir().unwrap();
    let cli = setup_with(dir.path(), &["--automatic-checkpoints"]);
    let store = dir.path().join("store");
    start(&cli, &store);
    let list = cli.json(&["checkpoint", "list", "g", "--json"]);
    let cps = list["checkpoints"].as_array().unwrap();
    assert_eq!(cps.len(), 1, "{list}");
    assert!(
        cps[0]["name"]
            .as_str()
            .unwrap()
            .starts_with("Automatic checkpoint"),
        "{list}"
    );
    // A clean shutdown takes it away again, its layer merged.
    cli.ok(&["vm", "stop", "g"]);
    let list = cli.json(&["checkpoint", "list", "g", "--json"]);
    assert!(list["checkpoints"].as_array().unwrap().is_empty(), "{list}");
    let show = cli.json(&["vm", "show", "g", "--json"]);
    assert_eq!(show["disks"][0]["chain_depth"], 1, "{show}");
    // A VM turned off keeps it: it is what the user goes back to.
    start(&cli, &store);
    cli.ok(&["vm", "stop", "g", "--force"]);
    let list = cli.json(&["checkpoint", "list", "g", "--json"]);
    assert_eq!(list["checkpoints"].as_array().unwrap().len(), 1, "{list}");
    assert_consecutive(&counter_on_disk(&cli, dir.path()));
}

/// When the guest wrote more since the checkpoint than the checkpoint's layer holds, the
/// layer merges into the guest's writable layer (the cheaper direction), under its writes.
#[test]
fn a_small_layer_merges_into_the_writing_guests_layer() {
    let dir = tempfile::tempdir().unwrap();
    let cli = setup(dir.path());
    let store = dir.path().join("store");
    let vm_dir = store.join("g");
    start(&cli, &store);
    cli.ok(&["checkpoint", "create", "g", "--name", "big-base"]);
    cli.ok(&["checkpoint", "create", "g", "--name", "small"]);
    let (code, out) = guest_sh(
        &vm_dir,
        "dd if=/dev/urandom of=/mnt/big bs=1M count=24 2>/dev/null && sync && md5sum /mnt/big",
    );
    assert_eq!(code, 0, "{out}");
    let sum = out.split_whitespace().next().unwrap().to_owned();
    let d: Value = cli.json(&["checkpoint", "delete", "g", "small", "--json"]);
    let m = &d["live_merges"][0];
    assert_eq!(m["direction"], "into-child", "{d}");
    assert!(m["switch_ms"].as_f64().unwrap() < 1000.0, "{d}");
    // The guest reads its file back from the merged chain (its page cache dropped).
    let (code, out) = guest_sh(
        &vm_dir,
        "echo 3 > /proc/sys/vm/drop_caches; md5sum /mnt/big",
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.split_whitespace().next().unwrap(), sum);
    let at = max_tick(&store);
    wait("ticks after the merge", 60, || max_tick(&store) > at + 4);
    cli.ok(&["vm", "stop", "g"]);
    let show = cli.json(&["vm", "show", "g", "--json"]);
    assert_eq!(show["disks"][0]["chain_depth"], 2, "{show}");
    assert_consecutive(&counter_on_disk(&cli, dir.path()));
    support::check_all_files(&vm_dir);
}
