//! The `snapvisor backup` contract on stopped VMs, as users and scripts meet it: a point
//! of a VM whose disks are chains, restored as a clone, to a file, in place and over NBD;
//! list, show, verify, prune and gc; encrypted repositories; bad input.

mod support;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{Cli, read_disk};

const MIB: u64 = 1 << 20;

/// Data that compresses badly, so stored bytes are near read bytes.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

struct Setup {
    _dir: tempfile::TempDir,
    cli: Cli,
    repo: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let mut cli = Cli::new(&dir.path().join("store"));
        let repo = dir.path().join("repo");
        cli.env
            .push(("SNAPVISOR_REPO".into(), repo.to_str().unwrap().into()));
        Setup {
            cli,
            repo,
            _dir: dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self._dir.path().join(name)
    }
}

/// Now's data of each disk of a VM, read through its chains.
fn now_data(cli: &Cli, vm: &str) -> Vec<Vec<u8>> {
    let show = cli.json(&["vm", "show", vm, "--json"]);
    show["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| read_disk(Path::new(d["file"].as_str().unwrap())))
        .collect()
}

#[test]
fn a_stopped_vm_backs_up_and_restores_as_a_clone_to_a_file_and_in_place() {
    let s = Setup::new();
    let cli = &s.cli;
    cli.ok(&["vm", "create", "web", "--disk", "128M", "--disk", "64M"]);
    cli.write_disk("web", 0, 0, &noise(1, 6 * MIB as usize));
    cli.ok(&["checkpoint", "create", "web", "--name", "base"]);
    // Now is a chain: data in the base and in Now's layer, on both disks.
    cli.write_disk("web", 0, 4 * MIB, &noise(2, MIB as usize));
    cli.write_disk("web", 1, 3 * MIB + 17, b"second disk");
    let init = cli.run(&["backup", "init"]);
    assert!(init.status.success());
    let out = String::from_utf8_lossy(&init.stdout);
    assert!(out.contains("created repository"), "{out}");
    // The repository sits beside the store in the test's folder.
    let err = String::from_utf8_lossy(&init.stderr);
    assert!(err.contains("same file system as the store"), "{err}");

    let at1 = now_data(cli, "web");
    let p1 = cli.json(&["backup", "create", "web", "--json"]);
    assert_eq!(p1["vm"], "web");
    assert_eq!(p1["consistency"], "offline");
    assert_eq!(p1["method"], "full");
    assert_eq!(p1["freeze_ms"], 0.0);
    assert_eq!(p1["pause_ms"], 0.0);
    assert!(p1["duration_ms"].as_u64().is_some());
    assert_eq!(p1["disks"].as_array().unwrap().len(), 2);
    let read1 = p1["bytes_read"].as_u64().unwrap();
    let stored1 = p1["bytes_stored"].as_u64().unwrap();
    // Sparse: only the first VHDX block (32 MiB) of each disk holds data; the rest of the
    // 192 MiB of disks is not read. The 6 MiB of noise are stored.
    assert!((6 * MIB..=64 * MIB).contains(&read1), "read {read1}");
    assert!(stored1 >= 6 * MIB, "stored {stored1}");
    let id1 = p1["id"].as_str().unwrap().to_owned();

    let tracked = cli.json(&["vm", "show", "web", "--json"]);
    assert_eq!(
        tracked["disks"][0]["tracking"]["state"], "valid",
        "{tracked}"
    );
    assert_eq!(tracked["disks"][0]["tracking"]["reference"], id1.as_str());
    // Chunk 0 of disk 0 changes (point 1's copy of it is then its own), and a new block,
    // written offline, behind change tracking's back: it no longer trusts disk 0.
    cli.write_disk("web", 0, 0, &noise(3, 100_000));
    cli.write_disk("web", 0, 100 * MIB, &noise(4, 100_000));
    let at2 = now_data(cli, "web");
    let tracked = cli.json(&["vm", "show", "web", "--json"]);
    assert_eq!(
        tracked["disks"][0]["tracking"]["state"], "invalid",
        "{tracked}"
    );
    assert_eq!(
        tracked["disks"][1]["tracking"]["state"], "valid",
        "{tracked}"
    );
    let p2 = cli.json(&["backup", "create", "web", "--json"]);
    assert_eq!(p2["method"], "express-full");
    let stored2 = p2["bytes_stored"].as_u64().unwrap();
    assert!(
        stored2 < stored1 && stored2 <= 9 * MIB / 2,
        "an express full stores only the two chunks that changed: {stored2} (full: {stored1})"
    );
    let id2 = p2["id"].as_str().unwrap().to_owned();
    let full = cli.json(&["backup", "create", "web", "--full", "--json"]);
    assert_eq!(full["method"], "full");
    // Nothing changed since the full one, and tracking says so: nothing is read.
    let text = cli.ok(&["backup", "create", "web"]);
    assert!(
        text.starts_with("created recovery point ") && text.contains("offline, incremental"),
        "{text}"
    );

    let list = cli.json(&["backup", "list", "--json"]);
    assert_eq!(list["points"].as_array().unwrap().len(), 4);
    assert_eq!(list["points"][0]["id"], id1.as_str());
    let none = cli.json(&["backup", "list", "other", "--json"]);
    assert!(none["points"].as_array().unwrap().is_empty());
    let text = cli.ok(&["backup", "list", "web"]);
    assert!(
        text.contains(&id1[..8]) && text.contains("offline"),
        "{text}"
    );
    let shown = cli.json(&["backup", "show", &id2[..10], "--json"]);
    assert_eq!(shown["id"], id2.as_str());
    assert_eq!(shown["disks"][1]["size"], 64 * MIB);
    let latest = cli.json(&["backup", "show", "web@latest", "--json"]);
    assert_eq!(latest["vm"], "web");
    assert_ne!(latest["id"], id2.as_str());

    // One disk to a file, sparse, as raw and as VHDX.
    let raw = s.path("disk0.raw");
    cli.ok(&[
        "backup",
        "restore",
        &id1,
        "--disk",
        "0",
        "--to",
        raw.to_str().unwrap(),
    ]);
    assert!(std::fs::read(&raw).unwrap() == at1[0], "disk 0 of point 1");
    let m = std::fs::metadata(&raw).unwrap();
    assert!(m.blocks() * 512 < 12 * MIB, "the raw file is sparse");
    let vhdx = s.path("disk1.vhdx");
    cli.ok(&[
        "backup",
        "restore",
        &id1,
        "--disk",
        "1",
        "--to",
        vhdx.to_str().unwrap(),
        "--format",
        "vhdx",
    ]);
    assert!(read_disk(&vhdx) == at1[1], "disk 1 of point 1");

    // As a new VM beside the original.
    let restored = cli.json(&["backup", "restore", &id2, "--as", "clone", "--json"]);
    assert_eq!(restored["vm"], "clone");
    let orig = cli.json(&["vm", "show", "web", "--json"]);
    let clone = cli.json(&["vm", "show", "clone", "--json"]);
    assert_ne!(orig["uuid"], clone["uuid"]);
    assert_ne!(orig["generation_id"], clone["generation_id"]);
    for i in 0..2 {
        assert_ne!(orig["disks"][i]["disk_id"], clone["disks"][i]["disk_id"]);
        assert_eq!(
            orig["disks"][i]["virtual_size"],
            clone["disks"][i]["virtual_size"]
        );
    }
    assert_eq!(clone["memory"], orig["memory"]);
    assert!(now_data(cli, "clone") == at2, "the clone holds point 2");
    assert!(now_data(cli, "web") == at2, "the original is untouched");
    // Into another store, under the original's own name.
    let other = s.path("other-store");
    let o = other.to_str().unwrap();
    cli.ok(&["backup", "restore", &id2, "--as", "web", "--store", o]);
    let elsewhere = Cli::new(&other);
    assert!(
        now_data(&elsewhere, "web") == at2,
        "the other store's copy holds point 2"
    );
    let taken = cli.fails(&["backup", "restore", &id1, "--as", "clone"]);
    assert!(taken.contains("clone"), "{taken}");
    assert!(
        now_data(cli, "clone") == at2,
        "a refused restore changes nothing"
    );

    // In place: what the VM had is kept as a checkpoint. Change tracking of disk 0 is
    // valid up to here, and the restore rewrites the disk behind it: invalid after.
    let tracked = cli.json(&["vm", "show", "web", "--json"]);
    assert_eq!(
        tracked["disks"][0]["tracking"]["state"], "valid",
        "{tracked}"
    );
    cli.write_disk("web", 1, 0, b"after the last backup");
    let before = now_data(cli, "web");
    let generation = cli.json(&["vm", "show", "web", "--json"])["generation_id"].clone();
    let r = cli.json(&["backup", "restore", &id1, "--in-place", "--json"]);
    let renewed = cli.json(&["vm", "show", "web", "--json"])["generation_id"].clone();
    assert_ne!(renewed, generation, "the disks went back in time");
    assert_eq!(r["generation_id"], renewed);
    let kept = r["kept_as"]["name"].as_str().unwrap().to_owned();
    assert!(kept.starts_with("before restore ("), "{kept}");
    assert!(now_data(cli, "web") == at1, "Now holds point 1");
    let tracked = cli.json(&["vm", "show", "web", "--json"]);
    assert_eq!(
        tracked["disks"][0]["tracking"]["state"], "invalid",
        "{tracked}"
    );
    let tree = cli.json(&["checkpoint", "list", "web", "--json"]);
    let text = tree.to_string();
    assert!(text.contains(&kept), "{text}");
    cli.ok(&["checkpoint", "apply", "web", &kept]);
    assert!(
        now_data(cli, "web") == before,
        "the kept checkpoint holds what the VM had"
    );

    // Verify, prune, gc.
    let v = cli.json(&["backup", "verify", "--json"]);
    assert_eq!(v["clean"], true);
    assert_eq!(v["points_checked"], 4);
    let dry = cli.json(&["backup", "prune", "--keep-last", "1", "--dry-run", "--json"]);
    let removable = dry["points"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["keep"] == false)
        .count();
    assert_eq!(removable, 3);
    assert_eq!(
        cli.json(&["backup", "list", "--json"])["points"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    let pruned = cli.json(&["backup", "prune", "--keep-last", "1", "--json"]);
    assert_eq!(pruned["removed"].as_array().unwrap().len(), 3);
    let gc = cli.json(&["backup", "gc", "--json"]);
    assert!(gc["chunks_deleted"].as_u64().unwrap() >= 1, "{gc}");
    let v = cli.json(&["backup", "verify", "web@latest", "--json"]);
    assert_eq!(v["clean"], true);
    let gone = cli.fails(&["backup", "show", &id1]);
    assert!(
        gone.contains("no recovery point") || gone.contains("not found"),
        "{gone}"
    );
    let raw2 = s.path("latest.raw");
    cli.ok(&[
        "backup",
        "restore",
        "web@latest",
        "--disk",
        "0",
        "--to",
        raw2.to_str().unwrap(),
    ]);
    assert!(std::fs::read(&raw2).unwrap() == at2[0]);
    let _ = &s.repo;
}

/// A restore in place killed at each of its steps in turn: before its marker the VM is as
/// it was; after it, `backup create` (and `vm start`) refuse, naming how to finish; a rerun
/// completes with the checkpoint the first run kept.
#[test]
fn an_interrupted_restore_in_place_is_refused_until_run_again() {
    let mut reached_marker = false;
    for at in 1..60 {
        let s = Setup::new();
        let cli = &s.cli;
        cli.ok(&["vm", "create", "web", "--disk", "64M"]);
        cli.write_disk("web", 0, 0, &noise(1, 3 * MIB as usize));
        cli.ok(&["backup", "init"]);
        let p1 = cli.json(&["backup", "create", "web", "--json"]);
        let id1 = p1["id"].as_str().unwrap().to_owned();
        let at1 = now_data(cli, "web");
        cli.write_disk("web", 0, MIB, &noise(2, 2 * MIB as usize));
        let before = now_data(cli, "web");
        let mut c = cli.command(&["backup", "restore", &id1, "--in-place"]);
        c.env("SNAPVISOR_CRASH_AT", at.to_string())
            .env("SNAPVISOR_CRASH_TRACE", "1");
        let out = c.output().unwrap();
        if out.status.success() {
            assert!(reached_marker, "the restore never wrote its marker");
            assert!(now_data(cli, "web") == at1);
            return;
        }
        let trace = String::from_utf8_lossy(&out.stderr).into_owned();
        let last = trace
            .lines()
            .rfind(|l| l.starts_with("crashpoint "))
            .unwrap_or_else(|| panic!("died without reaching a crash point: {trace}"))
            .to_owned();
        let marked = trace.contains("backup restore: in place, marked");
        reached_marker |= marked;
        let refused = cli.run(&["backup", "create", "web"]);
        if marked {
            assert_eq!(refused.status.code(), Some(1), "after {last}");
            let e = String::from_utf8_lossy(&refused.stderr);
            assert!(
                e.contains("stopped half way")
                    && e.contains(&format!(
                        "snapvisor backup restore {} --in-place",
                        &id1[..12]
                    ))
                    && e.contains("snapvisor checkpoint apply web "),
                "after {last}: {e}"
            );
            let e = cli.fails(&["vm", "start", "web"]);
            assert!(e.contains("stopped half way"), "after {last}: {e}");
        } else {
            assert!(refused.status.success(), "after {last}");
            assert!(now_data(cli, "web") == before, "after {last}");
        }
        let r = cli.json(&["backup", "restore", &id1, "--in-place", "--json"]);
        assert!(now_data(cli, "web") == at1, "after {last}, rerun");
        // By id: a run killed while it took its checkpoint may have left one of the same
        // name (taken within the same second), holding the same disks.
        let kept = r["kept_as"]["id"].as_str().unwrap().to_owned();
        cli.ok(&["checkpoint", "apply", "web", &kept]);
        if marked {
            assert!(
                now_data(cli, "web") == before,
                "after {last}: the kept checkpoint holds what the VM had"
            );
        }
        cli.ok(&["backup", "create", "web"]);
    }
    panic!("the restore never completed");
}

/// A restore as a new VM stopped at each of its crash points in turn leaves no VM, or one
/// that refuses to start or be backed up, saying it is incomplete and how to redo it: never
/// an empty VM that looks whole (the VM's folder appears carrying the restore's marker; it
/// used to get it only after it existed). A rerun of the restore replaces such a VM.
#[test]
fn a_restore_as_a_new_vm_killed_anywhere_leaves_no_vm_or_one_marked_incomplete() {
    let s = Setup::new();
    let cli = &s.cli;
    cli.ok(&["vm", "create", "web", "--disk", "64M", "--disk", "16M"]);
    cli.write_disk("web", 0, 0, &noise(1, 3 * MIB as usize));
    cli.write_disk("web", 1, MIB, &noise(2, MIB as usize));
    cli.ok(&["backup", "init"]);
    let id = cli.json(&["backup", "create", "web", "--json"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let at = now_data(cli, "web");
    let (mut gone, mut marked) = (0, 0);
    for n in 1.. {
        assert!(n < 200, "the restore never completes");
        let mut c = cli.command(&["backup", "restore", &id, "--as", "copy"]);
        c.env("SNAPVISOR_CRASH_AT", n.to_string());
        if c.output().unwrap().status.success() {
            assert!(now_data(cli, "copy") == at, "after {n} crash points");
            break;
        }
        if !cli.run(&["vm", "show", "copy"]).status.success() {
            gone += 1;
            continue;
        }
        marked += 1;
        for args in [&["vm", "start", "copy"][..], &["backup", "create", "copy"]] {
            let e = cli.fails(args);
            assert!(
                e.contains("incomplete")
                    && e.contains(&format!("snapvisor backup restore {} --as copy", &id[..12]))
                    && e.contains("snapvisor vm delete copy"),
                "crash point {n}: {args:?}: {e}"
            );
        }
        // The way out it names: the restore again, over the incomplete VM.
        cli.ok(&["backup", "restore", &id, "--as", "copy"]);
        assert!(now_data(cli, "copy") == at, "crash point {n}: rerun");
        cli.ok(&["backup", "create", "copy"]);
        cli.ok(&["vm", "delete", "copy", "--yes"]);
    }
    eprintln!("{gone} crash points left no VM, {marked} a VM marked incomplete");
    assert!(gone > 0 && marked > 0, "{gone} {marked}");
    // A whole VM of that name is never replaced.
    let e = cli.fails(&["backup", "restore", &id, "--as", "copy"]);
    assert!(e.contains("exists"), "{e}");
    assert!(now_data(cli, "copy") == at);
}

#[test]
fn a_point_is_served_read_only_over_nbd() {
    let s = Setup::new();
    let cli = &s.cli;
    cli.ok(&["vm", "create", "web", "--disk", "16M"]);
    cli.write_disk("web", 0, 5 * MIB + 3, &noise(9, 3 * MIB as usize));
    cli.ok(&["backup", "init"]);
    cli.ok(&["backup", "create", "web"]);
    let expect = now_data(cli, "web");
    let socket = s.path("nbd.sock");
    let mut server = cli
        .command(&[
            "backup",
            "mount",
            "web@latest",
            "--disk",
            "0",
            "--socket",
            socket.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "the server did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    let url = format!("nbd+unix:///?socket={}", socket.display());
    let out = s.path("copy.raw");
    let conv = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &url])
        .arg(&out)
        .output()
        .expect("qemu-img runs");
    assert!(
        conv.status.success(),
        "qemu-img convert: {}",
        String::from_utf8_lossy(&conv.stderr)
    );
    assert!(std::fs::read(&out).unwrap() == expect[0]);
    // Read-only: a write is refused.
    let w = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 4096", &url])
        .output();
    if let Ok(w) = w {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&w.stdout),
            String::from_utf8_lossy(&w.stderr)
        );
        assert!(
            !w.status.success()
                || text.to_lowercase().contains("read-only")
                || text.to_lowercase().contains("permission"),
            "a write was accepted: {text}"
        );
    }
    rustix_kill(server.id());
    let status = server.wait().unwrap();
    assert!(
        status.success(),
        "mount ends cleanly on SIGTERM: {status:?}"
    );
}

fn rustix_kill(pid: u32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
}

#[test]
fn an_encrypted_repository_needs_its_passphrase() {
    let s = Setup::new();
    let mut cli = Cli::new(&s.cli.store);
    let repo = s.repo.to_str().unwrap().to_owned();
    cli.ok(&["vm", "create", "web", "--disk", "8M"]);
    cli.write_disk("web", 0, 0, b"secret data");
    let pass = s.path("pass");
    std::fs::write(&pass, "correct horse\n").unwrap();
    let pf = pass.to_str().unwrap();
    cli.ok(&[
        "backup",
        "init",
        "--repo",
        &repo,
        "--encryption",
        "repokey",
        "--passphrase-file",
        pf,
    ]);
    cli.ok(&[
        "backup",
        "create",
        "web",
        "--repo",
        &repo,
        "--passphrase-file",
        pf,
    ]);
    // Without a passphrase and without a terminal: one clear error.
    let mut c = cli.command(&["backup", "list", "--repo", &repo]);
    c.stdin(Stdio::null()).env_remove("SNAPVISOR_PASSPHRASE");
    let out = c.output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--passphrase-file"), "{err}");
    cli.env
        .push(("SNAPVISOR_PASSPHRASE".into(), "wrong horse".into()));
    let wrong = cli.fails(&["backup", "list", "--repo", &repo]);
    assert!(wrong.contains("wrong passphrase"), "{wrong}");
    cli.env.pop();
    cli.env
        .push(("SNAPVISOR_PASSPHRASE".into(), "correct horse".into()));
    let list = cli.json(&["backup", "list", "--repo", &repo, "--json"]);
    assert_eq!(list["points"].as_array().unwrap().len(), 1);
    // No plaintext in the repository.
    let mut found = false;
    for e in walk(&s.repo) {
        let bytes = std::fs::read(&e).unwrap();
        found |= bytes.windows(11).any(|w| w == b"secret data");
    }
    assert!(!found, "the data is stored in clear");

    // A keyfile repository: the key sits beside it, outside it.
    let krepo = s.path("krepo");
    let k = krepo.to_str().unwrap();
    cli.ok(&["backup", "init", "--repo", k, "--encryption", "keyfile"]);
    assert!(s.path("krepo.key").is_file());
    cli.ok(&["backup", "create", "web", "--repo", k]);
    let v = cli.json(&["backup", "verify", "--repo", k, "--json"]);
    assert_eq!(v["clean"], true);
    std::fs::rename(s.path("krepo.key"), s.path("moved.key")).unwrap();
    let err = cli.fails(&["backup", "list", "--repo", k]);
    assert!(err.contains("key file"), "{err}");
    let moved = s.path("moved.key");
    cli.ok(&[
        "backup",
        "list",
        "--repo",
        k,
        "--key-file",
        moved.to_str().unwrap(),
    ]);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn bad_input_is_one_clear_error() {
    let s = Setup::new();
    let cli = &s.cli;
    let err = cli.fails(&["backup", "list"]);
    assert!(
        err.contains("no repository at") && err.contains("backup init"),
        "{err}"
    );
    cli.ok(&["backup", "init"]);
    let again = cli.fails(&["backup", "init"]);
    assert!(again.contains("not empty"), "{again}");
    let err = cli.fails(&["backup", "create", "ghost"]);
    assert!(err.contains("ghost"), "{err}");
    cli.ok(&["vm", "create", "web", "--disk", "4M"]);
    cli.ok(&["backup", "create", "web"]);
    let err = cli.fails(&["backup", "show", "ffff"]);
    assert!(err.contains("ffff"), "{err}");
    let err = cli.fails(&["backup", "show", "nobody@latest"]);
    assert!(err.contains("nobody@latest"), "{err}");
    let err = cli.fails(&["backup", "restore", "web@latest"]);
    assert!(err.contains("--as NAME"), "{err}");
    let err = cli.fails(&[
        "backup",
        "restore",
        "web@latest",
        "--disk",
        "3",
        "--to",
        "/tmp/x",
    ]);
    assert!(err.contains("disk 3"), "{err}");
    let err = cli.fails(&["backup", "prune", "--dry-run"]);
    assert!(err.contains("keep"), "{err}");
    assert_eq!(
        cli.json(&["backup", "list", "--json"])["points"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}
