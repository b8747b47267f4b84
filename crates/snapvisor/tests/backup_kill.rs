//! Kill trials of `backup create` on the real test guest under TCG, its counter writing
//! (one booted guest for all trials): the CLI stopped at each of its crash points
//! (`SNAPVISOR_CRASH_AT`), SIGKILLed at random instants over 1.2 times the last backup's
//! time (every mode, `--full` or not), and a few times the VM's worker SIGKILLed instead.
//! After each kill: the guest is thawed (the agent says so) and its counter advances; no
//! partial point is listed; each new point restores (to a raw file whose counter is whole,
//! and at the end a prefix of the original's), `verify` is clean; the next
//! `backup create` works and leaves no recovery checkpoint (`checkpoint list --all`) and
//! no lease behind. With the guest paused (its disk still), more kills, and every point
//! taken meanwhile restores bit-exact to the disk the worker serves (read over NBD). At the
//! end, a gc removes all that the killed backups left (chunks, leases, the temporary files
//! of chunks being written: no garbage, no hidden file) and every point still verifies.
//! And a full repository disk (a small tmpfs, as root): one clear error, the guest thawed
//! and running, nothing left, nothing partial.
//!
//! The random trials' seed is printed; `SNAPVISOR_CRASH_BASE_SEED=N` replays it.
//! `SNAPVISOR_SOAK_TRIALS=N` runs N random CLI kills instead of CI's 20.

mod support;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::Cli;
use support::kill::*;
use support::running::*;

fn mode_args(mode: &str, full: bool) -> Vec<String> {
    let mut a: Vec<String> = ["backup", "create", "g", "--json", "--mode", mode]
        .map(String::from)
        .into();
    if full {
        a.push("--full".into());
    }
    a
}

/// Runs a backup to the end: its duration and the crash points it passed.
fn timed_backup(cli: &Cli, mode: &str) -> (Duration, usize) {
    let args = mode_args(mode, false);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let t = Instant::now();
    let out = cli
        .command(&args)
        .env("SNAPVISOR_CRASH_TRACE", "1")
        .output()
        .unwrap();
    let took = t.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let points = err.lines().filter(|l| l.starts_with("crashpoint ")).count();
    (took, points)
}

#[test]
fn backup_create_killed_at_any_instant_leaves_the_guest_running_and_nothing_partial() {
    let dir = tempfile::tempdir().unwrap();
    let cli = booted(dir.path());
    let store = dir.path().join("store");
    let mut checked = Checked::default();
    let (took, crash_points) = timed_backup(&cli, "online");
    let (took_saved, _) = timed_backup(&cli, "saved-state");
    eprintln!(
        "a backup takes {took:?} ({took_saved:?} with saved state) and passes {crash_points} crash points"
    );
    assert!(crash_points >= 3, "{crash_points}");
    let mut recent = check_after_kill(&cli, dir.path(), &mut checked, "no kill");

    // Every crash point of the CLI, in every mode that takes a recovery checkpoint.
    for mode in ["online", "crash", "saved-state"] {
        for n in 1..=crash_points {
            let what = format!("{mode} backup stopped at crash point {n}");
            let args = mode_args(mode, false);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = cli
                .command(&args)
                .env("SNAPVISOR_CRASH_AT", n.to_string())
                .output()
                .unwrap();
            assert!(!out.status.success(), "{what}: it did not stop");
            recent = check_after_kill(&cli, dir.path(), &mut checked, &what);
        }
    }

    // The CLI SIGKILLed at random instants.
    let seed = seed();
    eprintln!("random kills: seed {seed} (SNAPVISOR_CRASH_BASE_SEED={seed} replays it)");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut outcomes = [0usize; 2];
    for i in 0..trials() {
        let mode = ["auto", "online", "crash", "saved-state"][rng.random_range(0..4)];
        let full = rng.random_bool(0.3);
        // Over the time the last backup took (the machine's load changes), a saved-state
        // one in the proportion measured at the start.
        let span = if mode == "saved-state" {
            recent.mul_f64(took_saved.as_secs_f64() / took.as_secs_f64())
        } else {
            recent
        };
        let after = span.mul_f64(rng.random_range(0.0..1.2));
        let what = format!("trial {i}: {mode} backup (full: {full}) killed after {after:?}");
        let args = mode_args(mode, full);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut child = cli
            .command(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(after);
        let _ = child.kill();
        let st = child.wait().unwrap();
        outcomes[usize::from(st.success())] += 1;
        recent = check_after_kill(&cli, dir.path(), &mut checked, &what);
    }
    eprintln!(
        "random kills: {} killed, {} finished first",
        outcomes[0], outcomes[1]
    );
    assert!(outcomes[0] > 0, "no trial was killed");

    // Bit-exact: while the guest is paused its disk holds still, so every point taken
    // meanwhile, by a backup killed or not, restores to exactly what the worker serves.
    cli.ok(&["vm", "pause", "g"]);
    let oracle = dir.path().join("oracle.raw");
    let socket = store.join("g/run/disk0.sock");
    let url = format!("nbd+unix:///disk0?socket={}", socket.display());
    let read = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &url])
        .arg(&oracle)
        .output()
        .unwrap();
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    let oracle_bytes = std::fs::read(&oracle).unwrap();
    let known: BTreeSet<String> = point_ids(&cli).into_iter().collect();
    for i in 0..6 {
        let mode = ["crash", "saved-state", "auto"][i % 3];
        let after = recent.mul_f64(rng.random_range(0.0..1.2));
        let what = format!("paused trial {i}: {mode} backup killed after {after:?}");
        let args = mode_args(mode, i % 2 == 0);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut child = cli
            .command(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(after);
        let _ = child.kill();
        child.wait().unwrap();
        let next = cli.json(&["backup", "create", "g", "--mode", "crash", "--json"]);
        assert_eq!(next["consistency"], "crash", "{what}: {next}");
        let all = cli.json(&["checkpoint", "list", "g", "--all", "--json"]);
        assert!(
            all["checkpoints"].as_array().unwrap().is_empty(),
            "{what}: {all}"
        );
        assert!(leases(&store).is_empty(), "{what}");
        // Paused in QEMU too, not just in the record (a take of a guest whose memory was
        // just saved used to resume it).
        let st = status(&cli);
        assert_eq!(st["state"], "paused", "{what}: {st}");
        assert_ne!(st["qemu_status"], "running", "{what}: {st}");
    }
    let mut exact = 0;
    for id in point_ids(&cli).into_iter().filter(|id| !known.contains(id)) {
        let raw = dir.path().join("restored.raw");
        restore_disk0(&cli, &id, &raw);
        let got = std::fs::read(&raw).unwrap();
        let differ: Vec<usize> = (0..oracle_bytes.len() / 4096)
            .filter(|b| got[b * 4096..(b + 1) * 4096] != oracle_bytes[b * 4096..(b + 1) * 4096])
            .collect();
        assert!(
            differ.is_empty(),
            "point {id}, taken while the guest was paused, differs from its disk in {} 4 KiB blocks: {:?}",
            differ.len(),
            &differ[..differ.len().min(20)]
        );
        exact += 1;
    }
    assert!(exact >= 6, "{exact}");
    eprintln!("{exact} points of the paused guest restored bit-exact");
    cli.ok(&["vm", "resume", "g"]);
    recent = check_after_kill(&cli, dir.path(), &mut checked, "resumed");

    // The worker SIGKILLed during a backup: QEMU dies with it; the next start's open of
    // the VM removes the recovery checkpoint.
    for (i, frac) in [0.2, 0.5, 0.8].into_iter().enumerate() {
        let what = format!("worker kill {i} at {frac} of a backup");
        let pid = status(&cli)["worker_pid"].as_u64().unwrap();
        let mut child = cli
            .command(&["backup", "create", "g", "--mode", "online"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(recent.mul_f64(frac));
        Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap();
        let _ = child.wait().unwrap();
        wait(&format!("{what}: the worker's end"), 30, || {
            status(&cli)["state"] != "running"
        });
        cli.ok(&["vm", "start", "g", "--accel", "tcg"]);
        let all = cli.json(&["checkpoint", "list", "g", "--all", "--json"]);
        assert!(
            all["checkpoints"].as_array().unwrap().is_empty(),
            "{what}: {all}"
        );
        wait("the guest agent", 120, || status(&cli)["agent"] == true);
        recent = check_after_kill(&cli, dir.path(), &mut checked, &what);
    }

    // Every point, all at once: verify is clean; each counter is a prefix of what the
    // guest wrote in the end.
    let v = cli.json(&["backup", "verify", "--json"]);
    assert_eq!(v["clean"], true, "{v}");
    // A gc removes all that the killed backups left: their chunks, leases and the
    // temporary files of the chunks they were writing.
    let (_, gc) = following_gc(&cli, &dir.path().join("repo"), "after the kills");
    eprintln!(
        "the gc after the kills removed {} chunks, {} leases and {} temporary files",
        gc["chunks_deleted"], gc["stale_leases_removed"], gc["temporaries_removed"]
    );
    let v = cli.json(&["backup", "verify", "--json"]);
    assert_eq!(v["clean"], true, "after the gc: {v}");
    assert_counters_are_prefixes(&cli, dir.path(), &checked);
}

/// A tmpfs of `kib` KiB, unmounted on drop.
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

#[test]
fn a_full_repository_disk_fails_clearly_and_leaves_the_guest_running() {
    if !is_root() {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cli = setup(dir.path());
    let store = dir.path().join("store");
    let mnt = dir.path().join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    assert!(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
            .arg(&mnt)
            .status()
            .unwrap()
            .success()
    );
    let _tmpfs = Tmpfs(mnt.clone());
    let repo = mnt.join("repo");
    cli.env
        .push(("SNAPVISOR_REPO".into(), repo.to_str().unwrap().into()));
    cli.ok(&["backup", "init"]);
    // Fill the file system but for a little: the backup's first chunks no longer fit.
    let filler = mnt.join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/urandom", "bs=64k"])
        .arg(format!("of={}", filler.display()))
        .stderr(Stdio::null())
        .status();
    let free = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(&mnt)
        .output()
        .unwrap();
    let free = String::from_utf8_lossy(&free.stdout).to_string();
    let keep = 16 << 10;
    let len = std::fs::metadata(&filler).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&filler)
        .unwrap()
        .set_len(len.saturating_sub(keep))
        .unwrap();
    cli.ok(&["vm", "start", "g", "--accel", "tcg"]);
    wait("ticks", 120, || ticks(&store).len() >= 3);
    wait("the guest agent", 60, || status(&cli)["agent"] == true);

    for mode in ["online", "saved-state"] {
        let out = cli.run(&["backup", "create", "g", "--mode", mode]);
        assert!(!out.status.success(), "{mode}: the backup fitted ({free})");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{mode}: one error line: {err}");
        assert!(
            lines[0].contains("storage is full") && lines[0].contains("free space"),
            "{mode}: {err}"
        );
        assert!(lines[0].starts_with("snapvisor: "), "{mode}: {err}");
        // The guest: thawed, running, writing.
        assert_eq!(freeze_status(&store), "thawed");
        assert_eq!(status(&cli)["state"], "running");
        let at = max_tick(&store);
        wait("ticks after the failed backup", 60, || {
            max_tick(&store) >= at + 2
        });
        // Nothing left: no recovery checkpoint, no lease, no point.
        let all = cli.json(&["checkpoint", "list", "g", "--all", "--json"]);
        assert!(all["checkpoints"].as_array().unwrap().is_empty(), "{all}");
        assert!(leases(&store).is_empty(), "{:?}", leases(&store));
        assert!(point_ids(&cli).is_empty());
    }
    let v: Value = cli.json(&["backup", "verify", "--json"]);
    assert_eq!(v["clean"], true, "{v}");
    // With room again (after a gc of what the failed backups stored), backups work.
    std::fs::remove_file(&filler).unwrap();
    cli.ok(&["backup", "gc"]);
    let p = cli.json(&["backup", "create", "g", "--mode", "online", "--json"]);
    assert_eq!(p["consistency"], "application", "{p}");
    assert_eq!(point_ids(&cli).len(), 1);
    cli.ok(&["vm", "stop", "g", "--force"]);
}
