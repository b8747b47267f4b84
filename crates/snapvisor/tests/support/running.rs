//! Running the test guest: a store with VM `g` on the guest the project builds, and
//! what the tests read back (the console's ticks, the counter file on a disk).

use super::Cli;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn qemu() -> String {
    if let Some(q) = std::env::var_os("SNAPVISOR_QEMU") {
        return q.into_string().unwrap();
    }
    let out = Command::new(repo().join("scripts/get-qemu.sh"))
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

pub fn guest() -> PathBuf {
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
pub fn setup(dir: &Path) -> Cli {
    setup_with(dir, &[])
}

/// [`setup`] with more `vm create` options.
pub fn setup_with(dir: &Path, extra: &[&str]) -> Cli {
    let mut cli = Cli::new(&dir.join("store"));
    cli.env.push(("SNAPVISOR_QEMU".into(), qemu()));
    // KVM guests hang on the build machines: every start in the tests uses TCG.
    cli.env.push(("SNAPVISOR_ACCEL".into(), "tcg".into()));
    cli.stop_on_drop = Some("g".into());
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
    ]
    .into_iter()
    .chain(extra.iter().copied())
    .collect::<Vec<_>>());
    cli
}

/// [`setup`] with a repository `dir/repo` created and named by `SNAPVISOR_REPO`.
#[allow(dead_code)]
pub fn setup_with_repo(dir: &Path) -> Cli {
    let mut cli = setup(dir);
    let repo = dir.join("repo");
    cli.env
        .push(("SNAPVISOR_REPO".into(), repo.to_str().unwrap().into()));
    cli.ok(&["backup", "init"]);
    cli
}

pub fn status(cli: &Cli) -> Value {
    cli.json(&["vm", "status", "g", "--json"])
}

pub fn wait(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn ticks(store: &Path) -> Vec<u32> {
    std::fs::read_to_string(store.join("g/logs/serial.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("tick "))
        .filter_map(|l| l.split(' ').next()?.parse().ok())
        .collect()
}

/// The highest tick VM `g` printed on its console so far.
#[allow(dead_code)]
pub fn max_tick(store: &Path) -> u32 {
    ticks(store).into_iter().max().unwrap_or(0)
}

/// SIGKILLs VM `g`'s worker and waits until the VM no longer counts as up.
#[allow(dead_code)]
pub fn kill_worker(cli: &Cli) {
    let worker = status(cli)["worker_pid"].as_u64().unwrap();
    assert!(
        Command::new("kill")
            .args(["-KILL", &worker.to_string()])
            .status()
            .unwrap()
            .success()
    );
    wait("the killed worker to be gone", 60, || {
        !matches!(status(cli)["state"].as_str(), Some("running" | "paused"))
    });
}

/// The counter file on the VM's disk, read through `disk convert` and debugfs.
pub fn counter_on_disk(cli: &Cli, dir: &Path) -> String {
    let show = cli.json(&["vm", "show", "g", "--json"]);
    counter_in(
        cli,
        dir,
        Path::new(show["disks"][0]["file"].as_str().unwrap()),
    )
}

/// The counter file in a layer's chain (flattened to raw in `dir`).
pub fn counter_in(cli: &Cli, dir: &Path, file: &Path) -> String {
    let file = file.to_str().unwrap();
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

/// The tick numbers of a counter file.
pub fn tick_numbers(counter: &str) -> Vec<u32> {
    counter
        .lines()
        .filter_map(|l| l.strip_prefix("tick "))
        .filter_map(|l| l.split(' ').next()?.parse().ok())
        .collect()
}

/// The counter on a disk has every tick once, in order: the disk and the memory that
/// wrote it belong together.
pub fn assert_whole(counter: &str, what: &str) {
    let n = tick_numbers(counter);
    for w in n.windows(2) {
        assert_eq!(w[1], w[0] + 1, "{what}: ticks on the disk jump: {n:?}");
    }
}
