//! Kill trials of backups on the running test guest: what a kill of `backup create`,
//! `backup prune` or `backup gc` must leave right, checked as a user would (the guest
//! thawed and writing, each new point verified and restored with a whole counter, the
//! next backup working and leaving no recovery checkpoint and no lease).

use super::Cli;
use super::running::*;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// The listed points' ids, oldest first.
pub fn point_ids(cli: &Cli) -> Vec<String> {
    cli.json(&["backup", "list", "--json"])["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_owned())
        .collect()
}

/// What VM `g`'s guest agent says of its file systems (`thawed`, `frozen`).
pub fn freeze_status(store: &Path) -> String {
    let Ok(mut agent) =
        qemu::GuestAgent::connect(&store.join("g/run/qga.sock"), Duration::from_secs(10))
    else {
        return "no agent".into();
    };
    agent
        .freeze_status(Duration::from_secs(10))
        .unwrap_or_else(|e| format!("error: {e}"))
}

/// The VM's backup leases in its run folder (`lease.rs` of the host crate).
pub fn leases(store: &Path) -> Vec<String> {
    std::fs::read_dir(store.join("g/run"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(".lease"))
                .collect()
        })
        .unwrap_or_default()
}

/// What the trials have checked so far.
#[derive(Default)]
pub struct Checked {
    /// Points restored and found whole.
    pub restored: BTreeSet<String>,
    /// The tick numbers on each restored point's disk.
    pub counters: Vec<(String, Vec<u32>)>,
}

/// Restores disk 0 of point `id` into the raw file `raw` (replaced).
pub fn restore_disk0(cli: &Cli, id: &str, raw: &Path) {
    let _ = std::fs::remove_file(raw);
    cli.ok(&[
        "backup",
        "restore",
        id,
        "--disk",
        "0",
        "--to",
        raw.to_str().unwrap(),
    ]);
}

/// Stops VM `g` and checks that every counter restored is a prefix of what the guest
/// wrote in the end, and that its files are whole.
pub fn assert_counters_are_prefixes(cli: &Cli, dir: &Path, checked: &Checked) {
    cli.ok(&["vm", "stop", "g", "--force"]);
    let last = tick_numbers(&counter_on_disk(cli, dir));
    for (id, n) in &checked.counters {
        assert!(
            last.starts_with(n),
            "point {id}'s counter {n:?} is not a prefix of the guest's {last:?}"
        );
    }
    eprintln!("{} points restored and checked", checked.counters.len());
    super::check_all_files(&dir.join("store/g"));
}

/// Restores the points not restored yet to raw files: each counter whole, each verified.
pub fn restore_new_points(cli: &Cli, dir: &Path, checked: &mut Checked, what: &str) {
    for id in point_ids(cli) {
        if checked.restored.contains(&id) {
            continue;
        }
        let v = cli.json(&["backup", "verify", &id, "--json"]);
        assert_eq!(v["clean"], true, "{what}: point {id}: {v}");
        let raw = dir.join("restored.raw");
        restore_disk0(cli, &id, &raw);
        let counter = counter_in(cli, dir, &raw);
        assert_whole(&counter, &format!("{what}: point {id}"));
        let n = tick_numbers(&counter);
        assert!(!n.is_empty(), "{what}: point {id} has no ticks");
        checked.counters.push((id.clone(), n));
        checked.restored.insert(id);
    }
}

/// Everything a kill must leave right (see the module doc); returns how long the next
/// backup (an `auto` one) took.
pub fn check_after_kill(cli: &Cli, dir: &Path, checked: &mut Checked, what: &str) -> Duration {
    let store = dir.join("store");
    // The worker may still be finishing the dead backup's request; it thaws on every path.
    let t = Instant::now();
    loop {
        let s = freeze_status(&store);
        if s == "thawed" {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{what}: the guest is not thawed: {s}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let at = max_tick(&store);
    wait(&format!("{what}: ticks after the kill"), 60, || {
        max_tick(&store) >= at + 2
    });
    restore_new_points(cli, dir, checked, what);
    // The next backup works, and removes what the dead one left.
    let t = Instant::now();
    let next = cli.json(&["backup", "create", "g", "--json"]);
    let took = t.elapsed();
    assert!(
        ["application", "crash"].contains(&next["consistency"].as_str().unwrap()),
        "{what}: {next}"
    );
    let all = cli.json(&["checkpoint", "list", "g", "--all", "--json"]);
    assert!(
        all["checkpoints"].as_array().unwrap().is_empty(),
        "{what}: a recovery checkpoint is left: {all}"
    );
    assert!(
        leases(&store).is_empty(),
        "{what}: leases left: {:?}",
        leases(&store)
    );
    assert_eq!(status(cli)["state"], "running", "{what}");
    took
}

/// How many random kills: `SNAPVISOR_SOAK_TRIALS`, else CI's 20.
pub fn trials() -> usize {
    std::env::var("SNAPVISOR_SOAK_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

/// The random trials' seed: `SNAPVISOR_CRASH_BASE_SEED`, else from the clock.
pub fn seed() -> u64 {
    std::env::var("SNAPVISOR_CRASH_BASE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                % 1_000_000_000
        })
}

/// VM `g` running, ticking and with its agent answering, and a repository `dir/repo`.
pub fn booted(dir: &Path) -> Cli {
    let cli = setup_with_repo(dir);
    let store = dir.join("store");
    cli.ok(&["vm", "start", "g", "--accel", "tcg"]);
    wait("ticks", 120, || ticks(&store).len() >= 3);
    wait("the guest agent", 60, || status(&cli)["agent"] == true);
    cli
}

/// Hidden files a writer that died left in the repository (puts write `.tmp-*` first).
pub fn temporaries(repo: &Path) -> Vec<String> {
    let out = Command::new("find")
        .arg(repo)
        .args(["-name", ".*"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

pub fn objects(repo: &Path, prefix: &str) -> Vec<String> {
    std::fs::read_dir(repo.join(prefix))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

/// A gc with nothing running beside it: it works, and leaves only referenced chunks, no
/// marker, no lease and no temporary file behind. Returns how long it took and its report.
pub fn following_gc(cli: &Cli, repo: &Path, what: &str) -> (Duration, serde_json::Value) {
    let t = Instant::now();
    let r = cli.json(&["backup", "gc", "--json"]);
    let took = t.elapsed();
    assert_eq!(r["deferred"], false, "{what}: {r}");
    assert_eq!(
        r["chunks_kept_recent"], 0,
        "{what}: nothing ran beside it: {r}"
    );
    let again = cli.json(&["backup", "gc", "--dry-run", "--json"]);
    assert_eq!(
        again["chunks_total"], again["chunks_referenced"],
        "{what}: garbage left: {again}"
    );
    assert!(
        objects(repo, "gc").iter().all(|n| n != "run"),
        "{what}: the gc marker is left"
    );
    assert!(
        objects(repo, "leases").is_empty(),
        "{what}: repository leases left: {:?}",
        objects(repo, "leases")
    );
    let tmp = temporaries(repo);
    assert!(tmp.is_empty(), "{what}: temporary files left: {tmp:?}");
    (took, r)
}
