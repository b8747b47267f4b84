//! Crash tests of every multi-step VM and checkpoint operation.
//!
//! Each operation runs on a fresh copy of one prepared store and is stopped:
//! - at every crash point in turn (`SNAPVISOR_CRASH_AT=N` aborts the process at the N-th
//!   step boundary, inside journal steps, between a temporary file and its rename), and
//! - by SIGKILL at random instants of its run (inside merges and engine writes),
//!
//! at least 30 trials per operation (`SNAPVISOR_CRASH_TRIALS` raises it). In half the
//! trials the recovery itself is crashed once more. Afterwards the next command finishes
//! or undoes the operation, and the tree with every checkpoint's data and Now's must be
//! exactly the before or the after state; no file may be left that the tree does not
//! name, and every file passes the engine's check.

mod support;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::{Cli, Model, check_all_files, observe, stray_layers};

/// Builds the prepared store once per test process: VM `t` with two disks and the tree
/// B, C -> Now, where the layer of a deleted checkpoint A stays hidden under both (B and C
/// were taken on two branches from A). An export of `t` sits beside the store.
fn template(root: &Path) -> PathBuf {
    let build = root.join("build");
    let store = build.join("store");
    let cli = Cli::new(&store);
    cli.ok(&["vm", "create", "t", "--disk", "8M", "--disk", "2M"]);
    let fill = |disk, offset: u64, len: usize, byte: u8| {
        cli.write_disk("t", disk, offset, &vec![byte; len]);
    };
    fill(0, 0, 5 << 20, 0x11);
    fill(1, 4096, 1 << 20, 0x12);
    cli.ok(&["checkpoint", "create", "t", "--name", "A"]);
    fill(0, 1 << 20, 3 << 20, 0x21);
    cli.ok(&["checkpoint", "create", "t", "--name", "B"]);
    fill(0, 2 << 20, 1 << 20, 0x22);
    cli.ok(&["checkpoint", "apply", "t", "A"]);
    fill(0, 3 << 20, 4 << 20, 0x31);
    fill(1, 0, 512 << 10, 0x32);
    cli.ok(&["checkpoint", "create", "t", "--name", "C"]);
    fill(0, 5 << 20, 2 << 20, 0x41);
    cli.ok(&["checkpoint", "delete", "t", "A"]);
    let list = cli.json(&["checkpoint", "list", "t", "--json"]);
    assert_eq!(list["hidden_layers"].as_array().unwrap().len(), 2, "{list}");
    cli.ok(&[
        "vm",
        "export",
        "t",
        build.join("exported").to_str().unwrap(),
    ]);
    // Moved, so that the absolute paths in the layers' locators lead nowhere: a trial
    // must never find (let alone write) the template's files.
    let ready = root.join("template");
    std::fs::rename(&build, &ready).unwrap();
    ready
}

fn fresh_copy(template: &Path, dest: &Path) {
    let _ = std::fs::remove_dir_all(dest);
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(template)
        .arg(dest)
        .status()
        .unwrap();
    assert!(st.success());
}

/// The state an operation is judged by: the VMs in the store and each one's tree.
#[derive(Debug, PartialEq)]
struct World {
    vms: Vec<(String, Model)>,
}

fn observe_world(cli: &Cli) -> World {
    let list = cli.json(&["vm", "list", "--json"]);
    let mut vms = Vec::new();
    for v in list["vms"].as_array().unwrap() {
        assert!(v["error"].is_null(), "broken VM after recovery: {v}");
        let name = v["name"].as_str().unwrap().to_owned();
        vms.push((name.clone(), observe(cli, &name)));
    }
    World { vms }
}

fn canonical(w: &World, before: &World) -> World {
    let known = |name: &str| {
        before
            .vms
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, m)| m.clone())
            .unwrap_or_default()
    };
    World {
        vms: w
            .vms
            .iter()
            .map(|(n, m)| (n.clone(), m.canonical(&known(n))))
            .collect(),
    }
}

fn verify_files(cli: &Cli, store: &Path) {
    let list = cli.json(&["vm", "list", "--json"]);
    for v in list["vms"].as_array().unwrap() {
        let name = v["name"].as_str().unwrap();
        let dir = store.join(name);
        let cl = cli.json(&["checkpoint", "list", name, "--json"]);
        assert!(
            cl["unfinished_operation"].is_null(),
            "operation still unfinished: {cl}"
        );
        let stray = stray_layers(&cl, &dir);
        assert!(stray.is_empty(), "stray files after recovery: {stray:?}");
        check_all_files(&dir);
    }
    let leftovers: Vec<_> = std::fs::read_dir(store)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') && n != ".lock")
        .collect();
    assert!(
        leftovers.is_empty(),
        "leftovers in the store: {leftovers:?}"
    );
}

fn trials() -> usize {
    std::env::var("SNAPVISOR_CRASH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30)
}

/// Runs `args` (with `{export}` standing for the exported folder) under crashes and checks
/// every outcome.
fn crash_test(op: &str, args: &[&str]) {
    let root = tempfile::tempdir().unwrap();
    let template = template(root.path());
    let work = root.path().join("work");
    let store = work.join("store");
    let cli = Cli::new(&store);
    let export = work.join("exported");
    let args: Vec<String> = args
        .iter()
        .map(|a| a.replace("{export}", export.to_str().unwrap()))
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    fresh_copy(&template, &work);
    let before = observe_world(&cli);
    let started = Instant::now();
    cli.ok(&args);
    let duration = started.elapsed();
    let after = canonical(&observe_world(&cli), &before);
    assert_ne!(before, after, "{op} changed nothing");

    let mut rng = SmallRng::seed_from_u64(op.len() as u64 * 7919);
    let mut outcomes = [0usize; 2];
    let mut points = 0;
    let mut trial = 0;
    let wanted = trials();
    let judge = |how: &str, outcomes: &mut [usize; 2], rng: &mut SmallRng| {
        // Recovery may itself be interrupted.
        if rng.random_bool(0.5) {
            let mut c = cli.command(&["vm", "list"]);
            c.env("SNAPVISOR_CRASH_AT", rng.random_range(1..6u32).to_string());
            let _ = c.output().unwrap();
        }
        let seen = canonical(&observe_world(&cli), &before);
        if seen == before {
            outcomes[0] += 1;
        } else if seen == after {
            outcomes[1] += 1;
        } else {
            let diff = |w: &World| -> String {
                w.vms
                    .iter()
                    .zip(&seen.vms)
                    .map(|((n, a), (_, b))| format!("{n}: {}", b.diff(a)))
                    .collect::<Vec<_>>()
                    .join(" | ")
            };
            panic!(
                "{op} {how}: neither before nor after.\nvs before: {}\nvs after: {}\nVMs seen: {:?}",
                diff(&before),
                diff(&after),
                seen.vms.iter().map(|(n, _)| n).collect::<Vec<_>>()
            );
        }
        // The next changing command reconciles what a crash left between the tree's
        // commit and the merges.
        for (name, _) in &seen.vms {
            cli.ok(&["vm", "consolidate", name]);
        }
        verify_files(&cli, &store);
    };

    for at in 1.. {
        fresh_copy(&template, &work);
        let mut c = cli.command(&args);
        c.env("SNAPVISOR_CRASH_AT", at.to_string());
        let out = c.output().unwrap();
        if out.status.success() {
            break;
        }
        assert!(
            out.status.code().is_none(),
            "{op} with a crash at point {at} failed instead of crashing: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        points += 1;
        trial += 1;
        judge(&format!("crashed at point {at}"), &mut outcomes, &mut rng);
    }
    assert!(points >= 1, "{op}: only {points} crash points reached");
    let kills = wanted.saturating_sub(trial).max(10);
    let span = duration.as_micros() as u64 * 12 / 10 + 1;
    for _ in 0..kills {
        fresh_copy(&template, &work);
        let mut child = cli
            .command(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_micros(rng.random_range(0..span)));
        let _ = child.kill();
        let _ = child.wait();
        trial += 1;
        judge("killed at a random instant", &mut outcomes, &mut rng);
    }
    eprintln!(
        "{op}: {trial} trials ({points} crash points, {kills} random kills): {} before, {} after; uncrashed run {duration:?}",
        outcomes[0], outcomes[1]
    );
    assert!(
        outcomes[0] > 0 && outcomes[1] > 0,
        "{op}: outcomes {outcomes:?}"
    );
}

#[test]
fn take() {
    crash_test("take", &["checkpoint", "create", "t", "--name", "new"]);
}

#[test]
fn apply() {
    crash_test("apply", &["checkpoint", "apply", "t", "B"]);
}

#[test]
fn apply_save_current() {
    crash_test(
        "apply --save-current",
        &["checkpoint", "apply", "t", "B", "--save-current"],
    );
}

#[test]
fn delete_with_cascading_merge() {
    // B's layer goes; the hidden layer of A is left with one dependant and merges too.
    crash_test("delete B", &["checkpoint", "delete", "t", "B"]);
}

#[test]
fn delete_merging_with_now() {
    crash_test("delete C", &["checkpoint", "delete", "t", "C"]);
}

#[test]
fn delete_subtree() {
    crash_test(
        "delete --subtree B",
        &["checkpoint", "delete", "t", "B", "--subtree"],
    );
}

#[test]
fn rename() {
    crash_test("rename", &["checkpoint", "rename", "t", "C", "renamed"]);
}

#[test]
fn vm_delete() {
    crash_test("vm delete", &["vm", "delete", "t"]);
}

#[test]
fn vm_import_copy() {
    crash_test(
        "vm import --copy",
        &["vm", "import", "{export}", "--copy", "--name", "copy"],
    );
}

#[test]
fn vm_create_importing_a_disk() {
    crash_test(
        "vm create",
        &[
            "vm",
            "create",
            "n",
            "--disk",
            "1M",
            "--import-disk",
            "{export}/disks/disk0.vhdx",
        ],
    );
}

/// A merge into the parent killed halfway resumes from what it had made durable: the
/// progress record is there while it runs, the next command finishes the merge from it, and
/// the data is whole.
#[test]
fn a_killed_merge_into_the_parent_resumes_from_its_progress() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let cli = Cli::new(&store);
    cli.ok(&["vm", "create", "r", "--disk", "1G"]);
    let a: Vec<u8> = (0..256u32 << 20).map(|i| (i / 4096) as u8 ^ 0x5a).collect();
    let b: Vec<u8> = (0..256u32 << 20).map(|i| (i / 4096) as u8 ^ 0xa5).collect();
    cli.write_disk("r", 0, 0, &a);
    cli.ok(&["checkpoint", "create", "r", "--name", "A"]);
    cli.write_disk("r", 0, 512 << 20, &b);
    // Deleting A merges its layer (the base) with Now's, into the parent (a tie).
    let progress = store.join("r").join(vm::journal::MERGE_PROGRESS_FILE);
    let mut child = cli
        .command(&["checkpoint", "delete", "r", "A"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !progress.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(60) && child.try_wait().unwrap().is_none(),
            "the merge recorded no progress"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&progress).unwrap()).unwrap();
    assert!(record["durable"].as_u64().unwrap() > 0, "{record}");
    // The next command finishes it.
    cli.ok(&["vm", "consolidate", "r"]);
    assert!(!progress.exists());
    let show = cli.json(&["vm", "show", "r", "--json"]);
    assert_eq!(show["disks"][0]["chain_depth"], 1, "{show}");
    let file = show["disks"][0]["file"].as_str().unwrap();
    let mut data = vec![0u8; 1 << 30];
    let disk = disk::VhdxDisk::open(Path::new(file), false).unwrap();
    disk::Disk::read_at(&disk, &mut data, 0).unwrap();
    assert!(data[..256 << 20] == a[..], "A's data changed");
    assert!(data[512 << 20..768 << 20] == b[..], "Now's data changed");
    check_all_files(&store.join("r"));
}
