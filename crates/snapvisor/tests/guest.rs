//! The test guest boots under TCG with its disk served by `snapvisor disk serve` from a
//! VHDX file over NBD, driven through the `qemu` crate's clients: the counter workload
//! writes to the disk; QMP reports the run state and the generation ID; the guest agent
//! answers ping, freezes (the counter stops) and thaws; stop/cont pause and resume the
//! guest; the ACPI power button shuts it down cleanly; and afterwards the VHDX file,
//! converted to raw, passes e2fsck and holds the last tick the guest wrote.
//!
//! Needs the guest (`scripts/build-guest.sh`) and QEMU (`scripts/get-qemu.sh`);
//! `scripts/test.sh` provides both through `SNAPVISOR_GUEST` and `SNAPVISOR_QEMU`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn guest_dir() -> PathBuf {
    std::env::var_os("SNAPVISOR_GUEST")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/guest"))
}

fn qemu() -> PathBuf {
    if let Some(q) = std::env::var_os("SNAPVISOR_QEMU") {
        return q.into();
    }
    let out = Command::new(repo().join("scripts/get-qemu.sh"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn sv(args: &[&str], dir: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_snapvisor"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_guest_runs_on_a_served_vhdx_under_qmp_and_its_agent() {
    let guest = guest_dir();
    assert!(
        guest.join("vmlinuz").exists() && guest.join("initrd.gz").exists(),
        "no test guest in {}: run ./scripts/build-guest.sh",
        guest.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = d.join("fs.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&raw)
        .status()
        .unwrap();
    assert!(st.success());
    assert!(
        sv(&["disk", "convert", "fs.raw", "disk.vhdx"], d)
            .status
            .success()
    );
    let server = Kill(
        Command::new(env!("CARGO_BIN_EXE_snapvisor"))
            .args([
                "disk",
                "serve",
                "disk.vhdx",
                "--socket",
                "nbd.sock",
                "--name",
                "disk0",
            ])
            .current_dir(d)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until("the NBD socket", Duration::from_secs(10), || {
        d.join("nbd.sock").exists()
    });
    let started = Instant::now();
    let spec = qemu::MachineSpec {
        name: "guest-test".into(),
        uuid: "6f1d1a2e-0000-4000-8000-000000000001".into(),
        generation_id: "5a9e1f00-1234-4cde-8f00-0123456789ab".into(),
        machine: "pc".into(),
        accel: qemu::Accel::Tcg,
        memory_mib: 256,
        cpus: 1,
        kernel: Some((
            guest.join("vmlinuz"),
            Some(guest.join("initrd.gz")),
            "console=ttyS0 panic=-1 quiet workload=counter".into(),
        )),
        uefi: None,
        disks: vec![qemu::NbdDisk {
            socket: d.join("nbd.sock"),
            export: "disk0".into(),
        }],
        qmp_socket: d.join("qmp.sock"),
        agent_socket: Some(d.join("ga.sock")),
        serial_log: d.join("console.log"),
        console_socket: None,
        paused: false,
        incoming: false,
    };
    let mut vm = Kill(
        Command::new(qemu())
            .args(spec.args())
            .current_dir(d)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let console = || std::fs::read_to_string(d.join("console.log")).unwrap_or_default();
    wait_until("the guest's READY line", Duration::from_secs(90), || {
        console().contains("READY")
    });
    eprintln!("guest ready after {:?}", started.elapsed());
    wait_until("ten ticks", Duration::from_secs(60), || {
        console().contains("tick 10 ")
    });
    let secs = Duration::from_secs;
    let qmp = qemu::Qmp::connect(&d.join("qmp.sock"), secs(10)).unwrap();
    assert_eq!(qmp.status(secs(5)).unwrap(), "running");
    let gen_id = qmp
        .execute("query-vm-generation-id", serde_json::Value::Null, secs(5))
        .unwrap();
    assert_eq!(gen_id["guid"], "5a9e1f00-1234-4cde-8f00-0123456789ab");
    let mut ga = qemu::GuestAgent::connect(&d.join("ga.sock"), secs(20)).unwrap();
    ga.ping(secs(10)).unwrap();
    assert_eq!(ga.freeze(secs(20)).unwrap(), 1);
    assert_eq!(ga.freeze_status(secs(10)).unwrap(), "frozen");
    // Frozen: the counter stops advancing.
    let ticks = || console().matches("tick ").count();
    std::thread::sleep(Duration::from_millis(600));
    let frozen_at = ticks();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(ticks() <= frozen_at + 1, "the counter ran on while frozen");
    assert_eq!(ga.thaw(secs(20)).unwrap(), 1);
    wait_until("ticks after the thaw", secs(30), || ticks() > frozen_at + 2);
    // Pause and resume: no ticks while paused.
    qmp.execute("stop", serde_json::Value::Null, secs(10))
        .unwrap();
    qmp.wait_event("STOP", secs(10)).unwrap();
    assert_eq!(qmp.status(secs(5)).unwrap(), "paused");
    let paused_at = ticks();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(ticks(), paused_at, "the guest ran while paused");
    qmp.execute("cont", serde_json::Value::Null, secs(10))
        .unwrap();
    qmp.wait_event("RESUME", secs(10)).unwrap();
    wait_until("ticks after resume", secs(30), || ticks() > paused_at + 2);
    // The power button: the guest syncs, unmounts and powers off; QEMU exits.
    qmp.execute("system_powerdown", serde_json::Value::Null, secs(10))
        .unwrap();
    qmp.wait_event("POWERDOWN", secs(10)).unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = vm.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the guest ignored the power button"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    vm.0.stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "qemu: {status} {err}");
    assert!(console().contains("POWERDOWN"));
    let last_tick = console()
        .lines()
        .filter_map(|l| l.strip_prefix("tick "))
        .filter_map(|l| l.split(' ').next()?.parse::<u32>().ok())
        .max()
        .unwrap();
    drop(server);
    // The server flushed and closed the file; what the guest wrote is in it.
    let out = sv(&["disk", "check", "disk.vhdx"], d);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        sv(&["disk", "convert", "disk.vhdx", "after.raw"], d)
            .status
            .success()
    );
    let fsck = Command::new("e2fsck")
        .args(["-fn"])
        .arg(d.join("after.raw"))
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let cat = Command::new("debugfs")
        .args(["-R", "cat /counter.log"])
        .arg(d.join("after.raw"))
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&cat.stdout);
    assert!(
        log.contains(&format!("tick {last_tick} ")),
        "the disk lacks tick {last_tick}: {log}"
    );
}
