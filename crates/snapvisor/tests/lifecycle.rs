//! VMs really run: `vm start` (a detached worker, QEMU under TCG, disks served from the
//! VM's VHDX chains over NBD), `vm status`, `pause`/`resume`, `stop` (power button) and
//! `stop --force`, a worker killed with SIGKILL (QEMU dies with it, the VM is reported
//! stopped unexpectedly and starts again), and QEMU failing to start. Every run is checked
//! on the disk afterwards through `snapvisor disk convert`.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use support::running::*;

fn alive(pid: u64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[test]
fn start_pause_resume_stop() {
    let dir = tempfile::tempdir().unwrap();
    let cli = setup(dir.path());
    let store = dir.path().join("store");
    let t = Instant::now();
    cli.ok(&["vm", "start", "g", "--accel", "tcg"]);
    assert_eq!(status(&cli)["state"], "running");
    wait("the guest agent", 90, || status(&cli)["agent"] == true);
    eprintln!("start to agent-ready: {:?}", t.elapsed());
    wait("ticks", 60, || ticks(&store).len() >= 4);
    let e = cli.fails(&["vm", "start", "g", "--accel", "tcg"]);
    assert!(e.contains("is already running"), "{e}");
    // Hardware waits for the VM to stop; commands that need the VM stopped say so.
    let e = cli.fails(&["vm", "set", "g", "--memory", "512M"]);
    assert!(e.contains("is running") && e.contains("stop it"), "{e}");
    // (`vm export` of a running VM exports it live: tests/vm_disk.rs.)
    for args in [&["vm", "consolidate", "g"][..], &["vm", "delete", "g"]] {
        let e = cli.fails(args);
        assert_eq!(
            e, "snapvisor: VM \"g\" is running; stop it first: `snapvisor vm stop g`",
            "{args:?}"
        );
    }
    assert_eq!(
        cli.json(&["vm", "list", "--json"])["vms"][0]["state"],
        "running"
    );

    cli.ok(&["vm", "pause", "g"]);
    let s = status(&cli);
    assert_eq!(
        (s["state"].as_str(), s["qemu_status"].as_str()),
        (Some("paused"), Some("paused"))
    );
    let n = ticks(&store).len();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(ticks(&store).len(), n, "ticks while paused");
    let out = cli.ok(&["checkpoint", "create", "g", "--name", "while-paused"]);
    assert!(out.contains("of the paused VM"), "{out}");
    assert_eq!(status(&cli)["state"], "paused");
    // Refusals of a paused VM say paused, once, with the way out.
    for args in [
        &["vm", "delete", "g", "--yes"][..],
        &["vm", "consolidate", "g"],
    ] {
        let e = cli.fails(args);
        assert_eq!(
            e, "snapvisor: VM \"g\" is paused; stop it first: `snapvisor vm stop g`",
            "{args:?}"
        );
    }
    cli.ok(&["vm", "resume", "g"]);
    wait("ticks after resume", 60, || ticks(&store).len() > n + 2);

    let out = cli.ok(&["vm", "stop", "g", "--timeout", "60"]);
    assert!(out.contains("shut down"), "{out}");
    assert_eq!(status(&cli)["state"], "off");
    let last = *ticks(&store).iter().max().unwrap();
    assert!(counter_on_disk(&cli, dir.path()).contains(&format!("tick {last} ")));
    support::check_all_files(&store.join("g"));
    let e = cli.fails(&["vm", "stop", "g"]);
    assert!(e.contains("is not running"), "{e}");
    // Off again, checkpoints of the stopped VM work.
    cli.ok(&["checkpoint", "create", "g", "--name", "after-run"]);
}

#[test]
fn force_stop_and_a_killed_worker() {
    let dir = tempfile::tempdir().unwrap();
    let cli = setup(dir.path());
    let store = dir.path().join("store");
    cli.ok(&["vm", "start", "g", "--accel", "tcg"]);
    wait("ticks", 90, || ticks(&store).len() >= 3);
    let t = Instant::now();
    let out = cli.ok(&["vm", "stop", "g", "--force"]);
    assert!(out.contains("forced"), "{out}");
    assert!(t.elapsed() < Duration::from_secs(20));
    assert_eq!(status(&cli)["state"], "off");
    support::check_all_files(&store.join("g"));

    // kill -9 of the worker: QEMU goes with it; the VM is stopped unexpectedly.
    cli.ok(&["vm", "start", "g", "--accel", "tcg"]);
    wait("ticks", 90, || ticks(&store).len() >= 3);
    let s = status(&cli);
    let (worker, qemu_pid) = (
        s["worker_pid"].as_u64().unwrap(),
        s["qemu_pid"].as_u64().unwrap(),
    );
    assert!(
        Command::new("kill")
            .args(["-KILL", &worker.to_string()])
            .status()
            .unwrap()
            .success()
    );
    wait("QEMU to die with its worker", 10, || !alive(qemu_pid));
    // The kill is asynchronous: QEMU's death signal fires when the worker's thread exits,
    // and the worker's lock is released only when its last thread has gone (a thread in
    // an fsync can take a while on a busy disk).
    wait("the VM to be reported stopped unexpectedly", 30, || {
        status(&cli)["state"] == "stopped-unexpectedly"
    });
    let text = cli.ok(&["vm", "list"]);
    assert!(text.contains("stopped-unexpectedly"), "{text}");
    // The files are consistent and the VM starts again, its counter continuing on disk.
    support::check_all_files(&store.join("g"));
    let before = counter_on_disk(&cli, dir.path()).lines().count();
    cli.ok(&["vm", "start", "g", "--accel", "tcg"]);
    wait("new ticks", 90, || ticks(&store).len() >= 3);
    cli.ok(&["vm", "stop", "g"]);
    assert!(counter_on_disk(&cli, dir.path()).lines().count() > before);
}

#[test]
fn qemu_failing_to_start_is_reported_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cli = setup(dir.path());
    let bogus = dir.path().join("not-a-kernel");
    std::fs::write(&bogus, b"this is not a kernel").unwrap();
    cli.ok(&[
        "vm",
        "set",
        "g",
        "--kernel",
        bogus.to_str().unwrap(),
        "--append",
        "x",
    ]);
    let e = cli.fails(&["vm", "start", "g", "--accel", "tcg"]);
    assert!(e.contains("did not start") && e.contains("QEMU"), "{e}");
    let s = status(&cli);
    assert_eq!(s["state"], "failed");
    assert!(s["error"].as_str().unwrap().contains("kernel"), "{s}");
    // A failed start leaves the VM usable.
    cli.ok(&["checkpoint", "create", "g"]);
    // Nothing runs, so a plain stop says how to clear the failure, and --force does.
    let e = cli.fails(&["vm", "stop", "g"]);
    assert!(
        e.contains("is not running (it is failed)") && e.contains("`snapvisor vm stop g --force`"),
        "{e}"
    );
    let out = cli.ok(&["vm", "stop", "g", "--force"]);
    assert!(out.contains("was failed; it is off now"), "{out}");
    let s = status(&cli);
    assert_eq!(
        (&s["state"], &s["error"]),
        (&"off".into(), &serde_json::Value::Null),
        "{s}"
    );
    let e = cli.fails(&["vm", "stop", "g", "--force"]);
    assert!(e.contains("is not running (it is off)"), "{e}");
}

fn boot_ids(store: &Path) -> Vec<String> {
    std::fs::read_to_string(store.join("g/logs/serial.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("tick "))
        .filter_map(|l| l.split("boot=").nth(1))
        .map(|b| b.split_whitespace().next().unwrap_or("").to_owned())
        .collect()
}

#[test]
fn save_then_start_resumes_the_guest_where_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let cli = setup(dir.path());
    let store = dir.path().join("store");
    cli.ok(&["vm", "start", "g", "--accel", "tcg"]);
    wait("ticks", 90, || ticks(&store).len() >= 6);
    let boot = boot_ids(&store)[0].clone();
    let out = cli.ok(&["vm", "save", "g"]);
    assert!(out.contains("saved VM"), "{out}");
    let last = *ticks(&store).iter().max().unwrap();
    assert_eq!(status(&cli)["state"], "saved");
    assert!(store.join("g/saved/state.vsv").exists());
    let e = cli.fails(&["checkpoint", "create", "g"]);
    assert!(e.contains("is saved"), "{e}");
    // Resume: the same boot, the counter going on from where it was.
    cli.ok(&["vm", "start", "g", "--accel", "tcg"]);
    assert!(!store.join("g/saved/state.vsv").exists());
    wait("ticks after the restore", 60, || !ticks(&store).is_empty());
    let after = ticks(&store);
    assert!(
        after[0] > last && after[0] <= last + 2,
        "the counter restarted: {last} before, {after:?} after"
    );
    assert!(
        boot_ids(&store).iter().all(|b| *b == boot),
        "the guest rebooted"
    );
    cli.ok(&["vm", "stop", "g"]);
    let final_tick = *ticks(&store).iter().max().unwrap();
    assert!(counter_on_disk(&cli, dir.path()).contains(&format!("tick {final_tick} boot={boot}")));
    // Saving again and discarding the state leaves the VM off.
    cli.ok(&["vm", "start", "g", "--accel", "tcg"]);
    wait("ticks", 90, || ticks(&store).len() >= 2);
    cli.ok(&["vm", "save", "g"]);
    let out = cli.ok(&["vm", "stop", "g"]);
    assert!(out.contains("discarded the saved state"), "{out}");
    assert_eq!(status(&cli)["state"], "off");
    cli.ok(&["checkpoint", "create", "g"]);
}

/// A UEFI VM boots OVMF with a variable store of its own, and each checkpoint keeps the
/// store as it was: OVMF writes its variables at the first boot, and applying a checkpoint
/// taken before that brings the untouched store back.
#[test]
fn uefi_vm_boots_and_checkpoints_keep_its_variable_store() {
    let dir = tempfile::tempdir().unwrap();
    let cli = setup_with(dir.path(), &["--firmware", "uefi"]);
    let store = dir.path().join("store");
    let show = cli.json(&["vm", "show", "g", "--json"]);
    assert_eq!(show["firmware"], "uefi");
    let vars = PathBuf::from(show["uefi_vars"].as_str().unwrap());
    let fresh = std::fs::read(&vars).unwrap();
    cli.ok(&["checkpoint", "create", "g", "--name", "never-booted"]);

    cli.ok(&["vm", "start", "g", "--accel", "tcg"]);
    wait("ticks", 120, || ticks(&store).len() >= 3);
    wait("the guest agent", 60, || status(&cli)["agent"] == true);
    let (code, out) = support::guest_sh(
        &store.join("g"),
        "test -d /sys/firmware/efi/efivars && echo uefi",
    );
    assert_eq!(
        (code, out.trim()),
        (0, "uefi"),
        "the guest did not boot through UEFI"
    );
    cli.ok(&["vm", "stop", "g"]);
    let booted = std::fs::read(&vars).unwrap();
    assert_ne!(booted, fresh, "OVMF wrote no variables at its first boot");
    cli.ok(&["checkpoint", "create", "g", "--name", "booted"]);

    cli.ok(&["checkpoint", "apply", "g", "never-booted"]);
    let show = cli.json(&["vm", "show", "g", "--json"]);
    let now_vars = PathBuf::from(show["uefi_vars"].as_str().unwrap());
    assert_eq!(std::fs::read(&now_vars).unwrap(), fresh);
    cli.ok(&["checkpoint", "apply", "g", "booted"]);
    let show = cli.json(&["vm", "show", "g", "--json"]);
    let now_vars = PathBuf::from(show["uefi_vars"].as_str().unwrap());
    assert_eq!(std::fs::read(&now_vars).unwrap(), booted);
    // The old stores went with the applies; nothing is left unreferenced.
    let report = cli.ok(&["vm", "consolidate", "g"]);
    assert!(!report.contains("firmware/"), "{report}");
    // It boots again from the applied store.
    cli.ok(&["vm", "start", "g", "--accel", "tcg"]);
    wait("ticks", 120, || ticks(&store).len() >= 3);
    cli.ok(&["vm", "stop", "g", "--force"]);
    support::check_all_files(&store.join("g"));
}
