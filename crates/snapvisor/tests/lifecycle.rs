//! VMs really run: `vm start` (a detached worker, QEMU under TCG, disks served from the
//! VM's VHDX chains over NBD), `vm status`, `pause`/`resume`, `stop` (power button) and
//! `stop --force`, a worker killed with SIGKILL (QEMU dies with it, the VM is reported
//! stopped unexpectedly and starts again), and QEMU failing to start. Every run is checked
//! on the disk afterwards through `snapvisor disk convert`.

mod support;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use support::Cli;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn qemu() -> String {
    if let Some(q) = std::env::var_os("SNAPVISOR_QEMU") {
        return q.into_string().unwrap();
    }
    let out = Command::new(repo().join("scripts/get-qemu.sh"))
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn guest() -> PathBuf {
    let g = std::env::var_os("SNAPVISOR_GUEST")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/guest"));
    assert!(
        g.join("vmlinuz").exists(),
        "no test guest in {}: run ./scripts/build-guest.sh",
        g.display()
    );
    g
}

/// A store with VM `g`: 256 MiB, the test guest with its counter, one ext4 disk.
fn setup(dir: &Path) -> Cli {
    let mut cli = Cli::new(&dir.join("store"));
    cli.env.push(("SNAPVISOR_QEMU".into(), qemu()));
    let fs = dir.join("fs.raw");
    std::fs::File::create(&fs)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    assert!(
        Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&fs)
            .status()
            .unwrap()
            .success()
    );
    let g = guest();
    cli.ok(&[
        "vm",
        "create",
        "g",
        "--memory",
        "256M",
        "--import-disk",
        fs.to_str().unwrap(),
        "--kernel",
        g.join("vmlinuz").to_str().unwrap(),
        "--initrd",
        g.join("initrd.gz").to_str().unwrap(),
        "--append",
        "console=ttyS0 panic=-1 quiet workload=counter",
    ]);
    cli
}

fn status(cli: &Cli) -> Value {
    cli.json(&["vm", "status", "g", "--json"])
}

fn wait(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn ticks(store: &Path) -> Vec<u32> {
    std::fs::read_to_string(store.join("g/logs/serial.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("tick "))
        .filter_map(|l| l.split(' ').next()?.parse().ok())
        .collect()
}

/// The counter file on the VM's disk, read through `disk convert` and debugfs.
fn counter_on_disk(cli: &Cli, dir: &Path) -> String {
    let show = cli.json(&["vm", "show", "g", "--json"]);
    let file = show["disks"][0]["file"].as_str().unwrap();
    let raw = dir.join("check.raw");
    let _ = std::fs::remove_file(&raw);
    cli.ok(&["disk", "convert", file, raw.to_str().unwrap()]);
    // debugfs ignores the ext4 journal: replay it on the copy first (a guest killed with
    // its VM has a crash-consistent file system). Exit codes 0 and 1 mean clean or fixed.
    let fsck = Command::new("e2fsck")
        .args(["-fy"])
        .arg(&raw)
        .output()
        .unwrap();
    assert!(
        fsck.status.code().is_some_and(|c| c <= 1),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let out = Command::new("debugfs")
        .args(["-R", "cat /counter.log"])
        .arg(&raw)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

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
    let e = cli.fails(&["checkpoint", "create", "g"]);
    assert!(e.contains("busy"), "{e}");
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
    // QEMU's death signal fires when the worker's thread exits, which can be a moment
    // before the worker's last thread has gone and released its lock.
    wait("the worker to be gone", 10, || !alive(worker));
    assert_eq!(status(&cli)["state"], "stopped-unexpectedly");
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
