//! Kill trials of `backup prune` and `backup gc` through the CLI, on a repository fed by
//! the real test guest under TCG, its counter writing (one booted guest for all trials).
//! Each trial SIGKILLs, at a random instant over 1.2 times what the operation last took,
//! either a `backup prune` with a random keep policy (`--keep-last`, `--keep-hourly`,
//! `--keep-daily`, `--keep-weekly`, mixed; with or without `--vm`), or a `backup gc` after
//! an ordinary prune gave it garbage to delete; in about half of the gc trials a `backup
//! create` of the running guest is in flight (the gc starts, and is killed, at a random
//! instant of the copy), and must finish with its point listed, whole.
//!
//! After each kill, what a user would check: `backup list` shows no damaged point, none
//! that the policy keeps is lost (a gc loses none at all), none comes back; `backup verify`
//! of every point is clean and each point not restored before restores with a whole
//! counter (`support::kill`); the guest is thawed and ticking; the next backup works and
//! leaves no recovery checkpoint and no lease (the VM's or the repository's); the following
//! gc works, replaces the dead collector's marker, and leaves no garbage: every chunk left
//! is referenced, and no hidden temporary file is left in the repository. At the end,
//! every counter restored is a prefix of the guest's.
//!
//! The seed is printed; `SNAPVISOR_CRASH_BASE_SEED=N` replays it.
//! `SNAPVISOR_SOAK_TRIALS=N` runs N trials instead of CI's 20.

mod support;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::collections::BTreeSet;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use support::Cli;
use support::kill::*;

/// A random keep policy, as `backup prune` flags. Every point of the test is from the same
/// hour or two, so the calendar rules keep one or two points.
fn policy(rng: &mut StdRng) -> Vec<String> {
    let n = rng.random_range(1..=3u32).to_string();
    let mut a: Vec<String> = match rng.random_range(0..5) {
        0 | 1 => vec!["--keep-last".into(), n],
        2 => vec!["--keep-hourly".into(), n],
        3 => vec!["--keep-daily".into(), "1".into(), "--keep-weekly".into(), n],
        _ => vec!["--keep-last".into(), n, "--keep-daily".into(), "2".into()],
    };
    if rng.random_bool(0.5) {
        a.extend(["--vm".into(), "g".into()]);
    }
    a
}

fn args<'a>(head: &[&'a str], tail: &'a [String]) -> Vec<&'a str> {
    head.iter()
        .copied()
        .chain(tail.iter().map(String::as_str))
        .collect()
}

fn spawn(cli: &Cli, args: &[&str]) -> Child {
    cli.command(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Runs `args` and kills it after `after`; whether it finished first.
fn kill_after(cli: &Cli, args: &[&str], after: Duration) -> bool {
    let mut child = spawn(cli, args);
    std::thread::sleep(after);
    let _ = child.kill();
    child.wait().unwrap().success()
}

fn timed(cli: &Cli, args: &[&str]) -> (Duration, Value) {
    let t = Instant::now();
    let v = cli.json(args);
    (t.elapsed(), v)
}

/// The points a `prune` with these flags would keep (its dry run).
fn kept_by(cli: &Cli, flags: &[String]) -> BTreeSet<String> {
    let plan = cli.json(&args(&["backup", "prune", "--dry-run", "--json"], flags));
    plan["points"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["keep"] == true)
        .map(|p| p["id"].as_str().unwrap().to_owned())
        .collect()
}

/// The listing as it must be after a kill: nothing damaged, within `before` and the points
/// `added` since, holding every point of `must_keep`.
fn check_listing(
    cli: &Cli,
    before: &BTreeSet<String>,
    added: &BTreeSet<String>,
    must_keep: &BTreeSet<String>,
    what: &str,
) {
    let list = cli.json(&["backup", "list", "--json"]);
    assert!(
        list["damaged"].as_array().unwrap().is_empty(),
        "{what}: damaged points listed: {list}"
    );
    let now: BTreeSet<String> = point_ids(cli).into_iter().collect();
    let lost: Vec<_> = must_keep.difference(&now).collect();
    assert!(lost.is_empty(), "{what}: points lost: {lost:?}");
    let unknown: Vec<_> = now
        .iter()
        .filter(|id| !before.contains(*id) && !added.contains(*id))
        .collect();
    assert!(
        unknown.is_empty(),
        "{what}: points from nowhere: {unknown:?}"
    );
    let v = cli.json(&["backup", "verify", "--json"]);
    assert_eq!(v["clean"], true, "{what}: {v}");
}

#[test]
fn prune_and_gc_killed_at_any_instant_lose_nothing_kept_and_leave_no_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let cli = booted(dir.path());
    let store = dir.path().join("store");
    let repo = dir.path().join("repo");
    let mut checked = Checked::default();

    // A few points to start with, and how long each operation takes now.
    for _ in 0..3 {
        cli.json(&["backup", "create", "g", "--json"]);
    }
    let mut t_backup = check_after_kill(&cli, dir.path(), &mut checked, "no kill");
    let (mut t_prune, _) = timed(&cli, &["backup", "prune", "--keep-last", "2", "--json"]);
    let (mut t_gc, _) = following_gc(&cli, &repo, "no kill");
    eprintln!("a backup takes {t_backup:?}, a prune {t_prune:?}, a gc {t_gc:?}");

    let seed = seed();
    eprintln!("random kills: seed {seed} (SNAPVISOR_CRASH_BASE_SEED={seed} replays it)");
    let mut rng = StdRng::seed_from_u64(seed);
    // Kills that left a prune with some of its points removed, or a gc's marker.
    let (mut killed, mut finished, mut beside_backup, mut part_way) = (0, 0, 0, 0);
    for i in 0..trials() {
        let mut added = BTreeSet::new();
        let what;
        let done;
        if rng.random_bool(0.5) {
            // Several points for it to remove, one manifest at a time.
            while point_ids(&cli).len() < 6 {
                cli.ok(&["backup", "create", "g"]);
            }
            let before: BTreeSet<String> = point_ids(&cli).into_iter().collect();
            let flags = policy(&mut rng);
            let keep = kept_by(&cli, &flags);
            let after = t_prune.mul_f64(rng.random_range(0.0..1.2));
            what = format!(
                "trial {i}: prune {} killed after {after:?}",
                flags.join(" ")
            );
            let t = Instant::now();
            done = kill_after(&cli, &args(&["backup", "prune", "--json"], &flags), after);
            if done {
                t_prune = t.elapsed();
            }
            check_listing(&cli, &before, &added, &keep, &what);
            let left = point_ids(&cli).len();
            if !done && left < before.len() && left > keep.len() {
                part_way += 1;
            }
        } else {
            // Garbage for it to delete: what an ordinary prune leaves.
            cli.ok(&["backup", "prune", "--keep-last", "2"]);
            let before: BTreeSet<String> = point_ids(&cli).into_iter().collect();
            let backup = rng.random_bool(0.5).then(|| {
                let child = cli
                    .command(&["backup", "create", "g", "--json"])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap();
                std::thread::sleep(t_backup.mul_f64(rng.random_range(0.0..0.8)));
                child
            });
            // Beside a backup, the gc waits for it: its span is the backup's rest.
            let span = if backup.is_some() {
                t_backup + t_gc
            } else {
                t_gc
            };
            let after = span.mul_f64(rng.random_range(0.0..1.2));
            what = format!(
                "trial {i}: gc{} killed after {after:?}",
                if backup.is_some() {
                    " beside a backup"
                } else {
                    ""
                }
            );
            let t = Instant::now();
            done = kill_after(&cli, &["backup", "gc", "--json"], after);
            if done && backup.is_none() {
                t_gc = t.elapsed();
            }
            if objects(&repo, "gc").iter().any(|n| n == "run") {
                part_way += 1;
            }
            if let Some(child) = backup {
                beside_backup += 1;
                let out = child.wait_with_output().unwrap();
                assert!(
                    out.status.success(),
                    "{what}: the backup beside it failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let p: Value = serde_json::from_slice(&out.stdout).unwrap();
                added.insert(p["id"].as_str().unwrap().to_owned());
            }
            // A gc removes no point: the backup's is there too.
            let all: BTreeSet<String> = before.union(&added).cloned().collect();
            check_listing(&cli, &before, &added, &all, &what);
        }
        if done {
            finished += 1;
        } else {
            killed += 1;
        }
        t_backup = check_after_kill(&cli, dir.path(), &mut checked, &what);
        following_gc(&cli, &repo, &what);
        assert!(leases(&store).is_empty(), "{what}: {:?}", leases(&store));
    }
    eprintln!(
        "random kills: {killed} killed ({part_way} part way), {finished} finished first, {beside_backup} gcs beside a backup"
    );
    assert!(killed > 0, "no trial was killed");

    // Every counter restored is a prefix of what the guest wrote in the end.
    assert_counters_are_prefixes(&cli, dir.path(), &checked);
}
