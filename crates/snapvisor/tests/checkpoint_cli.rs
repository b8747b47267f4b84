//! The `snapvisor vm` and `snapvisor checkpoint` contract as users and scripts meet it:
//! JSON fields, the tree listing, identities, and every kind of bad input, each a clear
//! one-line error that changes nothing.

mod support;

use std::fs::File;
use std::time::Duration;
use support::{Cli, observe, read_disk};

fn vm_with_disks(cli: &Cli) {
    cli.ok(&["vm", "create", "web", "--disk", "4M", "--disk", "1M"]);
}

#[test]
fn show_and_list_json_carry_the_contract_fields() {
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli::new(&dir.path().join("store"));
    let kernel = dir.path().join("vmlinuz");
    std::fs::write(&kernel, b"kernel").unwrap();
    let created = cli.json(&[
        "vm",
        "create",
        "web",
        "--memory",
        "512M",
        "--cpus",
        "2",
        "--disk",
        "4M",
        "--kernel",
        kernel.to_str().unwrap(),
        "--append",
        "console=ttyS0",
        "--checkpoint-type",
        "standard",
        "--max-checkpoints",
        "7",
        "--json",
    ]);
    assert_eq!(created["name"], "web");
    assert_eq!(created["memory"], 512u64 << 20);
    assert_eq!(created["cpus"], 2);
    assert_eq!(created["checkpoint_type"], "standard");
    assert_eq!(created["max_checkpoints"], 7);
    assert_eq!(created["checkpoint_count"], 0);
    assert_eq!(created["boot"]["append"], "console=ttyS0");
    let gen0 = created["generation_id"].as_str().unwrap().to_owned();
    assert_eq!(gen0.len(), 36);
    let file0 = created["disks"][0]["file"].as_str().unwrap().to_owned();
    assert!(file0.ends_with("/web/disks/disk0.vhdx"), "{file0}");
    assert_eq!(created["disks"][0]["virtual_size"], 4u64 << 20);

    let c = cli.json(&["checkpoint", "create", "web", "--json"]);
    let name = c["name"].as_str().unwrap();
    // The default name: "VM (YYYY-MM-DD hh:mm:ss)".
    assert!(
        name.starts_with("web (") && name.ends_with(')') && name.len() == 25,
        "{name}"
    );
    assert_eq!(c["type"], "standard");
    assert_eq!(c["consistency"], "vm-off");
    assert_eq!(c["has_memory"], false);
    assert_eq!(c["disks"][0]["file"], file0.as_str());

    let show = cli.json(&["vm", "show", "web", "--json"]);
    assert_eq!(show["checkpoint_count"], 1);
    assert_eq!(
        show["generation_id"],
        gen0.as_str(),
        "taking keeps the generation ID"
    );
    let file1 = show["disks"][0]["file"].as_str().unwrap();
    assert!(file1.ends_with(".avhdx") && file1 != file0, "{file1}");
    assert_eq!(show["disks"][0]["chain_depth"], 2);
    assert_eq!(show["now_parent"]["id"], c["id"]);

    let list = cli.json(&["checkpoint", "list", "web", "--json"]);
    assert_eq!(list["checkpoints"][0]["id"], c["id"]);
    assert_eq!(list["checkpoints"][0]["parent"], serde_json::Value::Null);
    assert_eq!(list["now"]["parent"], c["id"]);
    assert_eq!(list["now"]["disks"][0]["file"], file1);
    assert_eq!(list["now"]["disks"][0]["disk"], "disk0");

    let vms = cli.json(&["vm", "list", "--json"]);
    assert_eq!(vms["vms"][0]["name"], "web");
    assert_eq!(vms["vms"][0]["checkpoint_count"], 1);
    assert_eq!(vms["vms"][0]["state"], "off");

    cli.ok(&[
        "vm",
        "set",
        "web",
        "--memory",
        "2G",
        "--cpus",
        "4",
        "--no-kernel",
    ]);
    let applied = cli.json(&[
        "checkpoint",
        "apply",
        "web",
        c["id"].as_str().unwrap(),
        "--json",
    ]);
    let show = cli.json(&["vm", "show", "web", "--json"]);
    assert_ne!(
        show["generation_id"],
        gen0.as_str(),
        "apply changes the generation ID"
    );
    assert_eq!(applied["generation_id"], show["generation_id"]);
    assert_eq!(
        show["memory"],
        512u64 << 20,
        "apply brings the checkpoint's hardware back"
    );
    assert_eq!(show["cpus"], 2);
    assert_eq!(show["boot"]["append"], "console=ttyS0");
}

#[test]
fn the_tree_listing_shows_now_and_hidden_layers() {
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli::new(&dir.path().join("store"));
    vm_with_disks(&cli);
    cli.ok(&["checkpoint", "create", "web", "--name", "base"]);
    cli.ok(&["checkpoint", "create", "web", "--name", "left"]);
    cli.ok(&["checkpoint", "apply", "web", "base"]);
    cli.ok(&["checkpoint", "create", "web", "--name", "right"]);
    let text = cli.ok(&["checkpoint", "list", "web"]);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("base  [production, vm-off, "),
        "{text}"
    );
    assert!(lines[1].starts_with("├─ left  ["), "{text}");
    assert!(lines[2].starts_with("└─ right  ["), "{text}");
    assert!(lines[3].starts_with("   └─ ▶ Now  ["), "{text}");
    cli.ok(&["checkpoint", "delete", "web", "base"]);
    let text = cli.ok(&["checkpoint", "list", "web"]);
    assert!(text.contains("hidden layers"), "{text}");
    assert!(
        text.contains("disk0.vhdx") && text.contains("2 dependants"),
        "{text}"
    );
    let show = cli.json(&["vm", "show", "web", "--json"]);
    assert_eq!(show["hidden_layers"].as_array().unwrap().len(), 2);
    // Once only one layer depends on it, the hidden layer is merged away.
    cli.ok(&["checkpoint", "delete", "web", "left"]);
    let show = cli.json(&["vm", "show", "web", "--json"]);
    assert_eq!(show["hidden_layers"].as_array().unwrap().len(), 0, "{show}");
}

#[test]
fn unknown_duplicate_and_ambiguous_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli::new(&dir.path().join("store"));
    vm_with_disks(&cli);
    let e = cli.fails(&["vm", "show", "nope"]);
    assert!(e.contains("no VM named \"nope\""), "{e}");
    let e = cli.fails(&["vm", "create", "web", "--disk", "1M"]);
    assert!(e.contains("already exists"), "{e}");
    let e = cli.fails(&["vm", "create", ".hidden"]);
    assert!(e.contains("cannot start with '.'"), "{e}");
    let e = cli.fails(&["checkpoint", "apply", "web", "nothing"]);
    assert!(e.contains("no checkpoint named \"nothing\""), "{e}");
    let a = cli.json(&["checkpoint", "create", "web", "--name", "same", "--json"]);
    let b = cli.json(&["checkpoint", "create", "web", "--name", "same", "--json"]);
    let e = cli.fails(&["checkpoint", "delete", "web", "same"]);
    assert!(e.contains("2 checkpoints named \"same\""), "{e}");
    assert!(
        e.contains(a["id"].as_str().unwrap()) && e.contains(b["id"].as_str().unwrap()),
        "{e}"
    );
    // An id prefix picks one.
    let prefix = &a["id"].as_str().unwrap()[..8];
    cli.ok(&["checkpoint", "rename", "web", prefix, "first"]);
    let long = "x".repeat(101);
    let e = cli.fails(&["checkpoint", "create", "web", "--name", &long]);
    assert!(e.contains("1 to 100 characters"), "{e}");
    cli.ok(&["checkpoint", "create", "web", "--name", &"y".repeat(100)]);
    let e = cli.fails(&[
        "vm",
        "create",
        "x",
        "--import-disk",
        "/nonexistent/disk.vhdx",
    ]);
    assert!(e.contains("does not exist"), "{e}");
    let e = cli.fails(&[
        "vm",
        "create",
        "k",
        "--kernel",
        "/nonexistent/vmlinuz",
        "--append",
        "x",
    ]);
    assert!(
        e.contains("kernel /nonexistent/vmlinuz does not exist"),
        "{e}"
    );
    let list = cli.json(&["vm", "list", "--json"]);
    assert_eq!(
        list["vms"].as_array().unwrap().len(),
        1,
        "failed creates left nothing"
    );
}

#[test]
fn the_limit_and_the_disabled_type_refuse_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli::new(&dir.path().join("store"));
    cli.ok(&["vm", "create", "web", "--disk", "1M"]);
    for i in 0..50 {
        cli.ok(&["checkpoint", "create", "web", "--name", &format!("c{i}")]);
    }
    let before = observe(&cli, "web");
    let e = cli.fails(&["checkpoint", "create", "web"]);
    assert!(e.contains("already has 50 checkpoints, its limit"), "{e}");
    let e = cli.fails(&["checkpoint", "apply", "web", "c3", "--save-current"]);
    assert!(e.contains("limit"), "{e}");
    assert_eq!(observe(&cli, "web"), before);
    cli.ok(&["vm", "set", "web", "--max-checkpoints", "51"]);
    cli.ok(&["checkpoint", "create", "web", "--name", "c50"]);
    cli.ok(&["vm", "set", "web", "--checkpoint-type", "disabled"]);
    let e = cli.fails(&["checkpoint", "create", "web"]);
    assert!(e.contains("checkpoints are disabled for VM \"web\""), "{e}");
    assert_eq!(
        cli.json(&["vm", "show", "web", "--json"])["checkpoint_count"],
        51
    );
}

#[test]
fn missing_foreign_and_corrupt_files_are_reported_and_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let cli = Cli::new(&store);
    vm_with_disks(&cli);
    cli.ok(&["vm", "create", "other", "--disk", "4M"]);
    cli.write_disk("web", 0, 0, &[7u8; 8192]);
    cli.ok(&["checkpoint", "create", "web", "--name", "a"]);
    let before = observe(&cli, "web");
    let show = cli.json(&["vm", "show", "web", "--json"]);
    let now0 = show["disks"][0]["file"].as_str().unwrap().to_owned();

    // A foreign file in place of Now's layer.
    let saved = dir.path().join("saved.avhdx");
    std::fs::rename(&now0, &saved).unwrap();
    std::fs::copy(store.join("other/disks/disk0.vhdx"), &now0).unwrap();
    let e = cli.fails(&["checkpoint", "create", "web"]);
    assert!(e.contains("is not this VM's disk \"disk0\""), "{e}");
    // A missing one.
    std::fs::remove_file(&now0).unwrap();
    let e = cli.fails(&["checkpoint", "create", "web"]);
    assert!(e.contains("is missing"), "{e}");
    std::fs::rename(&saved, &now0).unwrap();
    assert_eq!(observe(&cli, "web"), before);

    // A corrupt state file: a clear error; other VMs still list.
    let state = store.join("web/vm.json");
    let good = std::fs::read(&state).unwrap();
    std::fs::write(&state, b"{ not json").unwrap();
    let e = cli.fails(&["checkpoint", "list", "web"]);
    assert!(e.contains("vm.json: not a valid VM state file"), "{e}");
    let text = cli.ok(&["vm", "list"]);
    assert!(text.contains("web") && text.contains("broken"), "{text}");
    assert!(text.contains("other"), "{text}");
    std::fs::write(&state, &good).unwrap();

    // A corrupt journal.
    std::fs::write(store.join("web/journal.json"), b"garbage").unwrap();
    let e = cli.fails(&["checkpoint", "create", "web"]);
    assert!(e.contains("unreadable operation journal"), "{e}");
    std::fs::remove_file(store.join("web/journal.json")).unwrap();
    assert_eq!(observe(&cli, "web"), before);

    // Consolidate reports files nothing refers to, and deletes none.
    let stray = store.join("web/disks/stray.vhdx");
    std::fs::write(&stray, b"x").unwrap();
    let report = cli.json(&["vm", "consolidate", "web", "--json"]);
    assert_eq!(report["unreferenced_files"][0], stray.to_str().unwrap());
    assert!(stray.exists());
}

#[test]
fn a_busy_vm_refuses_or_waits_and_other_vms_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let cli = Cli::new(&store);
    cli.ok(&["vm", "create", "web", "--disk", "1M"]);
    cli.ok(&["vm", "create", "db", "--disk", "1M"]);
    let lock = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(store.join("web/.lock"))
        .unwrap();
    lock.lock().unwrap();
    std::fs::write(
        store.join("web/.lock"),
        b"pid 1 is running `checkpoint delete`",
    )
    .unwrap();
    let e = cli.fails(&["checkpoint", "create", "web"]);
    assert!(
        e.contains("VM \"web\" is busy: pid 1 is running `checkpoint delete`"),
        "{e}"
    );
    // Listing does not wait.
    cli.ok(&["checkpoint", "list", "web"]);
    cli.ok(&["checkpoint", "create", "db"]);
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(400));
        drop(lock);
    });
    cli.ok(&["--wait", "10", "checkpoint", "create", "web"]);
    release.join().unwrap();
    assert_eq!(
        cli.json(&["vm", "show", "web", "--json"])["checkpoint_count"],
        1
    );
}

#[test]
fn export_and_import_in_place_and_as_a_copy() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let cli = Cli::new(&store);
    vm_with_disks(&cli);
    cli.write_disk("web", 0, 4096, &[1u8; 100_000]);
    cli.ok(&["checkpoint", "create", "web", "--name", "one"]);
    cli.write_disk("web", 0, 8192, &[2u8; 50_000]);
    let model = observe(&cli, "web");
    let out = dir.path().join("out");
    cli.ok(&["vm", "export", "web", out.to_str().unwrap()]);
    let e = cli.fails(&["vm", "export", "web", out.to_str().unwrap()]);
    assert!(e.contains("exists and is not empty"), "{e}");
    let e = cli.fails(&["vm", "import", out.to_str().unwrap()]);
    assert!(
        e.contains(
            "a VM named \"web\" already exists; import it under another name with --name NEW"
        ),
        "{e}"
    );
    let e = cli.fails(&["vm", "import", out.to_str().unwrap(), "--name", "twin"]);
    assert!(e.contains("has the UUID"), "{e}");
    cli.ok(&["vm", "delete", "web"]);
    assert!(!store.join("web").exists());
    // In place: the store links to the folder.
    cli.ok(&["vm", "import", out.to_str().unwrap()]);
    assert!(
        std::fs::symlink_metadata(store.join("web"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(observe(&cli, "web"), model);
    cli.ok(&["checkpoint", "create", "web", "--name", "two"]);
    assert!(out.join("checkpoints").read_dir().unwrap().count() == 2);
    // As a copy: new identities, same tree and data.
    let out2 = dir.path().join("out2");
    cli.ok(&["checkpoint", "export", "web", "one", out2.to_str().unwrap()]);
    cli.ok(&[
        "vm",
        "import",
        out2.to_str().unwrap(),
        "--copy",
        "--name",
        "flat",
    ]);
    let flat = cli.json(&["vm", "show", "flat", "--json"]);
    let web = cli.json(&["vm", "show", "web", "--json"]);
    assert_ne!(flat["uuid"], web["uuid"]);
    assert_ne!(flat["generation_id"], web["generation_id"]);
    assert_eq!(flat["checkpoint_count"], 0);
    let one = model.cps.values().find(|c| c.name == "one").unwrap();
    assert_eq!(
        read_disk(flat["disks"][0]["file"].as_str().unwrap().as_ref()),
        one.data[0]
    );
    cli.ok(&["vm", "delete", "web"]);
    assert!(
        !out.exists(),
        "deleting a VM registered in place removes its folder"
    );
}

/// A full file system in the middle of a merge: the delete reports it, nothing is lost,
/// and once there is room `vm consolidate` finishes the merge.
#[test]
fn starting_without_qemu_says_what_to_install_or_set() {
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli::new(&dir.path().join("store"));
    cli.ok(&[
        "vm",
        "create",
        "web",
        "--disk",
        "1M",
        "--automatic-checkpoints",
    ]);
    // Not on the PATH.
    let out = cli
        .command(&["vm", "start", "web"])
        .env_remove("SNAPVISOR_QEMU")
        .env("PATH", dir.path().join("no-bin"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("qemu-system-x86_64")
            && e.contains("apt install qemu-system-x86")
            && e.contains("SNAPVISOR_QEMU"),
        "{e}"
    );
    // Named by SNAPVISOR_QEMU, but not there.
    let missing = dir.path().join("qemu-here");
    let out = cli
        .command(&["vm", "start", "web"])
        .env("SNAPVISOR_QEMU", &missing)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains(missing.to_str().unwrap()) && e.contains("SNAPVISOR_QEMU"),
        "{e}"
    );
    // Nothing happened: no worker ran, no automatic checkpoint was taken.
    let status = cli.json(&["vm", "status", "web", "--json"]);
    assert_eq!(status["state"], "off", "{status}");
    let show = cli.json(&["vm", "show", "web", "--json"]);
    assert_eq!(show["checkpoint_count"], 0, "{show}");
}

#[test]
fn a_full_disk_during_a_merge_loses_nothing() {
    if !is_root() {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let mount = |opts: &str| {
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs", mnt.to_str().unwrap()])
            .status()
            .unwrap();
        assert!(st.success(), "mount {opts}");
    };
    mount("size=40m");
    struct Unmount<'a>(&'a std::path::Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&mnt);
    let cli = Cli::new(&mnt.join("store"));
    cli.ok(&["vm", "create", "web", "--disk", "64M"]);
    cli.write_disk("web", 0, 0, &vec![3u8; 12 << 20]);
    cli.ok(&["checkpoint", "create", "web", "--name", "a"]);
    cli.write_disk("web", 0, 32 << 20, &vec![4u8; 12 << 20]);
    let before = observe(&cli, "web");
    // Leave too little room for a merge of 12 MiB.
    let filler = mnt.join("filler");
    let free = free_bytes(&mnt);
    std::fs::write(&filler, vec![0u8; (free - (4 << 20)) as usize]).unwrap();
    let out = cli.run(&["checkpoint", "delete", "web", "a"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("No space left on device"), "{err}");
    assert!(err.contains("vm consolidate web"), "{err}");
    let after = observe(&cli, "web");
    assert!(after.cps.is_empty());
    assert_eq!(after.now, before.now, "Now's data survived");
    std::fs::remove_file(&filler).unwrap();
    let report = cli.json(&["vm", "consolidate", "web", "--json"]);
    assert_eq!(report["merged"].as_array().unwrap().len(), 1, "{report}");
    assert_eq!(observe(&cli, "web").now, before.now);
    support::check_all_files(&mnt.join("store/web"));
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn free_bytes(path: &std::path::Path) -> u64 {
    let out = std::process::Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// An export into the store would be listed as a second VM with the same UUID: it is
/// refused (the VM's own folder included), for `vm export` and `checkpoint export` alike,
/// and nothing is written.
#[test]
fn exports_into_the_store_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let cli = Cli::new(&store);
    vm_with_disks(&cli);
    cli.ok(&["checkpoint", "create", "web", "--name", "one"]);
    let inside = store.join("inside");
    let through_dots = dir.path().join("elsewhere/../store/dots");
    std::fs::create_dir(dir.path().join("elsewhere")).unwrap();
    let in_vm = store.join("web").join("copy");
    for dest in [&inside, &through_dots, &in_vm] {
        let d = dest.to_str().unwrap();
        for args in [
            &["vm", "export", "web", d][..],
            &["checkpoint", "export", "web", "one", d][..],
        ] {
            let e = cli.fails(args);
            assert!(
                e.contains("is inside the store") && e.contains("outside the store"),
                "{args:?}: {e}"
            );
        }
    }
    assert!(!inside.exists() && !store.join("dots").exists() && !in_vm.exists());
    let list = cli.json(&["vm", "list", "--json"]);
    assert_eq!(list["vms"].as_array().unwrap().len(), 1, "{list}");
    // Beside the store is fine.
    let out = dir.path().join("out");
    cli.ok(&["vm", "export", "web", out.to_str().unwrap()]);
}

/// A limit below the VM's checkpoint count is refused with the count.
#[test]
fn a_checkpoint_limit_below_the_count_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli::new(&dir.path().join("store"));
    cli.ok(&["vm", "create", "web", "--disk", "1M"]);
    for i in 0..5 {
        cli.ok(&["checkpoint", "create", "web", "--name", &format!("c{i}")]);
    }
    let e = cli.fails(&["vm", "set", "web", "--max-checkpoints", "3"]);
    assert!(
        e.contains("has 5 checkpoints, more than a limit of 3")
            && e.contains("delete 2 of them first, or set a limit of at least 5"),
        "{e}"
    );
    let show = cli.json(&["vm", "show", "web", "--json"]);
    assert_eq!(show["max_checkpoints"], vm::config::DEFAULT_MAX_CHECKPOINTS);
    cli.ok(&["vm", "set", "web", "--max-checkpoints", "5"]);
    assert_eq!(
        cli.json(&["vm", "show", "web", "--json"])["max_checkpoints"],
        5
    );
}

/// This host's memory, from /proc/meminfo, in MiB.
fn host_mib() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kb: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kb >> 10
}

/// Memory beyond the host's is refused at create, set and start, before anything runs
/// (a start does not leave the VM failed).
#[test]
fn memory_beyond_the_hosts_is_refused_at_create_set_and_start() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let cli = Cli::new(&store);
    let too_much = format!("{}M", host_mib() + 1024);
    let e = cli.fails(&["vm", "create", "big", "--memory", &too_much]);
    assert!(
        e.starts_with("snapvisor: cannot create VM \"big\": ")
            && e.contains("of memory is more than this host has"),
        "{e}"
    );
    assert!(!store.join("big").exists());
    cli.ok(&["vm", "create", "web", "--disk", "1M"]);
    let e = cli.fails(&["vm", "set", "web", "--memory", &too_much]);
    assert!(e.contains("more than this host has"), "{e}");
    assert_eq!(
        cli.json(&["vm", "show", "web", "--json"])["memory"],
        1u64 << 30
    );
    // Prepared for a bigger host, it is refused when it starts here.
    let bigger = format!("{}M", host_mib() + 4096);
    let made = cli
        .command(&["vm", "create", "prepared", "--memory", &too_much])
        .env("SNAPVISOR_HOST_MEMORY", &bigger)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let e = cli.fails(&["vm", "start", "prepared", "--accel", "tcg"]);
    assert!(
        e.contains("did not start") && e.contains("more than this host has"),
        "{e}"
    );
    assert_eq!(
        cli.json(&["vm", "status", "prepared", "--json"])["state"],
        "off"
    );
    let bad = cli
        .command(&["vm", "create", "x", "--memory", "1G"])
        .env("SNAPVISOR_HOST_MEMORY", "lots")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("SNAPVISOR_HOST_MEMORY=lots is not a size")
    );
}

/// Names come back as the user wrote them (no escapes), and the commands messages suggest
/// are quoted for the shell.
#[test]
fn names_are_echoed_as_written_and_suggestions_are_shell_quoted() {
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli::new(&dir.path().join("store"));
    let name = r#"my "big" vm\1"#;
    let out = cli.ok(&["vm", "create", name, "--disk", "1M"]);
    assert!(
        out.starts_with(&format!("created VM \"{name}\" in ")),
        "{out}"
    );
    cli.ok(&["vm", "set", name, "--checkpoint-type", "disabled"]);
    let e = cli.fails(&["checkpoint", "create", name]);
    assert_eq!(
        e,
        format!(
            r#"snapvisor: checkpoints are disabled for VM "{name}"; enable them with `snapvisor vm set 'my "big" vm\1' --checkpoint-type production`"#
        )
    );
    let e = cli.fails(&["checkpoint", "apply", name, r#"no "such" one"#]);
    assert!(
        e.contains(r#"has no checkpoint named "no "such" one""#) && !e.contains(r#"\""#),
        "{e}"
    );
}

/// An id prefix too short to name a checkpoint says how long it must be.
#[test]
fn a_short_id_prefix_says_how_long_it_must_be() {
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli::new(&dir.path().join("store"));
    cli.ok(&["vm", "create", "web", "--disk", "1M"]);
    let c = cli.json(&["checkpoint", "create", "web", "--name", "one", "--json"]);
    let id = c["id"].as_str().unwrap();
    let e = cli.fails(&["checkpoint", "apply", "web", &id[..5]]);
    assert!(
        e.contains(&format!(
            "an id prefix must have at least 8 characters (\"{}\" has 5)",
            &id[..5]
        )),
        "{e}"
    );
    cli.ok(&["checkpoint", "apply", "web", &id[..8]]);
}

/// A UEFI VM's variable store goes with `vm export` and `vm import --copy`, byte for byte
/// (without it the copy could not start).
#[test]
fn a_uefi_vms_variable_store_goes_with_export_and_import() {
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli::new(&dir.path().join("store"));
    cli.ok(&["vm", "create", "u", "--firmware", "uefi", "--disk", "1M"]);
    let show = cli.json(&["vm", "show", "u", "--json"]);
    let original = std::fs::read(show["uefi_vars"].as_str().unwrap()).unwrap();
    let export = dir.path().join("export");
    cli.ok(&["vm", "export", "u", export.to_str().unwrap()]);
    cli.ok(&[
        "vm",
        "import",
        export.to_str().unwrap(),
        "--copy",
        "--name",
        "u2",
    ]);
    let show = cli.json(&["vm", "show", "u2", "--json"]);
    let copied = std::fs::read(show["uefi_vars"].as_str().unwrap()).unwrap();
    assert_eq!(copied, original);
    let c = cli.json(&["vm", "consolidate", "u2", "--json"]);
    assert_eq!(c["unreferenced_files"].as_array().unwrap().len(), 0, "{c}");
}
