//! Crash tests of the live operations: a checkpoint of the running guest (production and
//! standard), apply on the running VM, and delete (with its merges) under the running
//! guest, each interrupted by SIGKILL of the VM's worker or of the CLI at a random instant,
//! at least 20 trials each (`SNAPVISOR_LIVE_CRASH_TRIALS` raises it).
//!
//! After each trial:
//! - the guest is never left frozen: when only the CLI died, the worker finished the
//!   operation, the guest's file systems are thawed and it goes on writing;
//! - the tree is the before or the after state (the checkpoint is there or not, the
//!   checkpoints that were there are untouched);
//! - no acknowledged write is lost: every tick the guest printed (it prints a tick only
//!   after its `sync` returned) is on Now's disk, unless Now went back to a checkpoint,
//!   and the counter on the disk is whole (every tick once, in order);
//! - every file passes the engine's check and the tree names every file in `disks/`;
//! - after a delete whose worker was killed, the disk's change tracking is still valid
//!   (its merges are recorded by the tracker before their journal).

mod support;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::running::*;
use support::{Cli, check_all_files, stray_layers};

fn trials() -> usize {
    std::env::var("SNAPVISOR_LIVE_CRASH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

fn list(cli: &Cli) -> Value {
    cli.json(&["checkpoint", "list", "g", "--json"])
}

fn names(l: &Value) -> Vec<String> {
    l["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect()
}

fn layer_of(l: &Value, name: &str) -> Option<String> {
    l["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .map(|c| c["disks"][0]["file"].as_str().unwrap().to_owned())
}

fn ensure_running(cli: &Cli, store: &Path) {
    if status(cli)["state"] != "running" {
        if status(cli)["state"] == "paused" {
            cli.ok(&["vm", "resume", "g"]);
        } else {
            cli.ok(&["vm", "start", "g"]);
        }
    }
    wait("ticks", 120, || !ticks(store).is_empty());
    wait("the guest agent", 60, || status(cli)["agent"] == true);
}

fn spawn(cli: &Cli, args: &[&str]) -> Child {
    cli.command(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn kill(pid: u64) {
    let _ = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
}

/// Waits for the worker to finish what it was doing: the guest thawed and writing again.
fn assert_thawed_and_writing(store: &Path) {
    let dir = store.join("g");
    let t = Instant::now();
    let state = loop {
        let s = qemu::GuestAgent::connect(&dir.join("run/qga.sock"), Duration::from_secs(2))
            .and_then(|mut a| a.freeze_status(Duration::from_secs(2)));
        match s {
            Ok(s) if s == "thawed" => break s,
            _ if t.elapsed() > Duration::from_secs(30) => break format!("{s:?}"),
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    assert_eq!(state, "thawed", "the guest was left frozen");
    let at = ticks(store).into_iter().max().unwrap_or(0);
    wait("ticks after the operation", 60, || {
        ticks(store).into_iter().max().unwrap_or(0) > at
    });
}

/// One kind of interrupted operation. `before` names the checkpoints there before it;
/// `op` is the CLI command; `judge` checks the tree after recovery.
struct Case<'a> {
    name: &'a str,
    prepare: &'a dyn Fn(&Cli, &Path),
    args: &'a [&'a str],
    /// The longest a run of the operation takes (kills land inside it).
    span_ms: u64,
    /// Checks the recovered tree against the one before; returns whether Now went back to
    /// a checkpoint (so it no longer holds the ticks printed before the kill).
    judge: &'a dyn Fn(&Value, &Value) -> bool,
    /// Whether the disk's change tracking must come out of a worker kill valid (the
    /// operation's merges are journaled and recorded by the tracker first).
    tracking_survives: bool,
}

fn run_case(case: &Case) {
    let dir = tempfile::tempdir().unwrap();
    let cli = setup(dir.path());
    let store = dir.path().join("store");
    let mut rng = SmallRng::seed_from_u64(0x11fe ^ case.name.len() as u64);
    ensure_running(&cli, &store);
    for trial in 0..trials() {
        (case.prepare)(&cli, &store);
        ensure_running(&cli, &store);
        let before = list(&cli);
        let kill_worker = trial % 2 == 0;
        let worker = status(&cli)["worker_pid"].as_u64().unwrap();
        let mut child = spawn(&cli, case.args);
        std::thread::sleep(Duration::from_millis(rng.random_range(0..case.span_ms)));
        let acknowledged = ticks(&store).into_iter().max().unwrap_or(0);
        if kill_worker {
            kill(worker);
        } else {
            kill(u64::from(child.id()));
        }
        let _ = child.wait();
        let what = format!(
            "{} trial {trial} ({} killed)",
            case.name,
            if kill_worker { "worker" } else { "CLI" }
        );
        if !kill_worker && matches!(status(&cli)["state"].as_str(), Some("running")) {
            assert_thawed_and_writing(&store);
        }
        if kill_worker {
            // (An apply may have started a new worker since.)
            wait("the killed worker to be gone", 60, || {
                let s = status(&cli);
                !matches!(s["state"].as_str(), Some("running" | "paused"))
                    || s["worker_pid"].as_u64() != Some(worker)
            });
            if case.tracking_survives {
                // Read before anything else opens the VM (`vm show` finishes the journal).
                let show = cli.json(&["vm", "show", "g", "--json"]);
                let t = &show["disks"][0]["tracking"];
                assert_eq!(t["state"], "valid", "{what}: tracking after the kill: {t}");
            }
        } else {
            // The worker finishes what the CLI asked (an apply may still be starting it).
            wait("the operation to end", 120, || {
                list(&cli)["unfinished_operation"].is_null() && status(&cli)["state"] != "starting"
            });
        }
        // Recovery happens at the next command that changes the VM.
        if !matches!(status(&cli)["state"].as_str(), Some("running" | "paused")) {
            if status(&cli)["state"] == "saved" {
                // An apply of a checkpoint with memory ended before its start: fine.
                cli.ok(&["vm", "start", "g"]);
                cli.ok(&["vm", "stop", "g", "--force"]);
            }
            cli.ok(&["vm", "consolidate", "g"]);
        }
        let after = list(&cli);
        assert!(
            after["unfinished_operation"].is_null(),
            "{what}: unfinished: {after}"
        );
        let went_back = (case.judge)(&before, &after);
        // The data: the checkpoints that stayed are as they were; Now holds every
        // acknowledged tick (unless it went back to a checkpoint), its counter whole.
        for c in before["checkpoints"].as_array().unwrap() {
            let name = c["name"].as_str().unwrap();
            if let Some(layer) = layer_of(&after, name) {
                let counter = counter_in(&cli, dir.path(), Path::new(&layer));
                assert_whole(&counter, &format!("{what}: checkpoint {name}"));
            }
        }
        if !matches!(status(&cli)["state"].as_str(), Some("running" | "paused")) {
            let now = counter_on_disk(&cli, dir.path());
            assert_whole(&now, &format!("{what}: Now"));
            if !went_back {
                assert!(
                    tick_numbers(&now).contains(&acknowledged) || acknowledged == 0,
                    "{what}: acknowledged tick {acknowledged} is not on the disk: {:?}",
                    tick_numbers(&now)
                );
            }
            let vm_dir = store.join("g");
            assert!(
                stray_layers(&after, &vm_dir).is_empty(),
                "{what}: stray files"
            );
            check_all_files(&vm_dir);
        }
    }
    cli.ok(&["vm", "stop", "g", "--force"]);
}

fn created_or_not(name: &str) -> impl Fn(&Value, &Value) -> bool + '_ {
    move |before: &Value, after: &Value| {
        let (b, a) = (names(before), names(after));
        let mut expected = b.clone();
        expected.push(name.to_owned());
        assert!(
            a == b || a == expected,
            "the tree is neither before nor after: {b:?} -> {a:?}"
        );
        false
    }
}

fn deleted_or_not(name: &str) -> impl Fn(&Value, &Value) -> bool + '_ {
    move |before: &Value, after: &Value| {
        let (b, a) = (names(before), names(after));
        let without: Vec<String> = b.iter().filter(|n| *n != name).cloned().collect();
        assert!(
            a == b || a == without,
            "the tree is neither before nor after: {b:?} -> {a:?}"
        );
        false
    }
}

#[test]
fn production_checkpoint_interrupted() {
    let judge = created_or_not("p");
    run_case(&Case {
        name: "production checkpoint",
        prepare: &|cli, _| {
            if names(&list(cli)).contains(&"p".to_owned()) {
                cli.ok(&["checkpoint", "delete", "g", "p"]);
            }
        },
        args: &["checkpoint", "create", "g", "--name", "p"],
        span_ms: 150,
        judge: &judge,
        tracking_survives: false,
    });
}

#[test]
fn standard_checkpoint_interrupted() {
    let judge = created_or_not("s");
    run_case(&Case {
        name: "standard checkpoint",
        prepare: &|cli, _| {
            cli.ok(&["vm", "set", "g", "--checkpoint-type", "standard"]);
            if names(&list(cli)).contains(&"s".to_owned()) {
                cli.ok(&["checkpoint", "delete", "g", "s"]);
            }
        },
        args: &["checkpoint", "create", "g", "--name", "s"],
        span_ms: 400,
        judge: &judge,
        tracking_survives: false,
    });
}

#[test]
fn apply_on_a_running_vm_interrupted() {
    run_case(&Case {
        name: "apply",
        prepare: &|cli, store| {
            if !names(&list(cli)).contains(&"base".to_owned()) {
                ensure_running(cli, store);
                cli.ok(&["vm", "set", "g", "--checkpoint-type", "standard"]);
                cli.ok(&["checkpoint", "create", "g", "--name", "base"]);
            }
        },
        args: &["checkpoint", "apply", "g", "base"],
        span_ms: 3000,
        judge: &|before, after| {
            assert_eq!(names(before), names(after), "apply changed the tree");
            // After: Now is a new layer on the checkpoint's.
            before["now"]["disks"][0]["file"] != after["now"]["disks"][0]["file"]
        },
        tracking_survives: false,
    });
}

#[test]
fn delete_under_a_running_guest_interrupted() {
    run_case(&Case {
        name: "delete",
        prepare: &|cli, store| {
            ensure_running(cli, store);
            for n in ["d1", "d2"] {
                if !names(&list(cli)).contains(&n.to_owned()) {
                    cli.ok(&["checkpoint", "create", "g", "--name", n]);
                    let at = ticks(store).into_iter().max().unwrap_or(0);
                    wait("ticks", 60, || {
                        ticks(store).into_iter().max().unwrap_or(0) > at + 2
                    });
                }
            }
        },
        args: &["checkpoint", "delete", "g", "d1"],
        span_ms: 500,
        judge: &deleted_or_not("d1"),
        tracking_survives: true,
    });
}

#[test]
fn delete_of_the_checkpoint_under_now_interrupted() {
    run_case(&Case {
        name: "delete under Now",
        prepare: &|cli, store| {
            ensure_running(cli, store);
            if !names(&list(cli)).contains(&"u".to_owned()) {
                cli.ok(&["checkpoint", "create", "g", "--name", "u"]);
                let at = ticks(store).into_iter().max().unwrap_or(0);
                wait("ticks", 60, || {
                    ticks(store).into_iter().max().unwrap_or(0) > at + 2
                });
            }
        },
        args: &["checkpoint", "delete", "g", "u"],
        span_ms: 400,
        judge: &deleted_or_not("u"),
        tracking_survives: true,
    });
}
