//! The test guest boots under TCG with its disk served by `snapvisor disk serve` from a
//! VHDX file over NBD: the counter workload writes to the disk, the guest agent answers
//! (ping, freeze, thaw), the ACPI power button shuts it down cleanly, and afterwards the
//! VHDX file, converted to raw, holds the counter the guest wrote.
//!
//! Needs the guest (`scripts/build-guest.sh`) and QEMU (`scripts/get-qemu.sh`);
//! `scripts/test.sh` provides both through `SNAPVISOR_GUEST` and `SNAPVISOR_QEMU`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
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

/// One request on the guest-agent socket, after resynchronising.
fn agent(sock: &Path, command: &str) -> String {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"\xff{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":4711}}\n")
        .unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    loop {
        let mut line = Vec::new();
        r.read_until(b'\n', &mut line).unwrap();
        if String::from_utf8_lossy(&line).contains("4711") {
            break;
        }
    }
    s.write_all(format!("{{\"execute\":\"{command}\"}}\n").as_bytes())
        .unwrap();
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    line
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_guest_boots_on_a_served_vhdx_and_its_counter_reaches_the_disk() {
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
    let mut vm = Kill(
        Command::new(qemu())
            .args(["-accel", "tcg", "-machine", "pc", "-m", "256", "-smp", "1"])
            .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
            .arg("-kernel")
            .arg(guest.join("vmlinuz"))
            .arg("-initrd")
            .arg(guest.join("initrd.gz"))
            .args(["-append", "console=ttyS0 panic=-1 quiet workload=counter"])
            .args(["-serial", "file:console.log"])
            .args(["-qmp", "unix:qmp.sock,server=on,wait=off"])
            .args([
                "-blockdev",
                "driver=nbd,server.type=unix,server.path=nbd.sock,export=disk0,node-name=nbd0,discard=unmap",
                "-blockdev",
                "driver=raw,file=nbd0,node-name=disk0,discard=unmap",
                "-device",
                "virtio-blk-pci,drive=disk0,id=vblk0",
                "-device",
                "virtio-serial-pci",
                "-chardev",
                "socket,id=qga0,path=ga.sock,server=on,wait=off",
                "-device",
                "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            ])
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
    assert!(agent(&d.join("ga.sock"), "guest-ping").contains("\"return\""));
    assert!(agent(&d.join("ga.sock"), "guest-fsfreeze-freeze").contains("\"return\": 1"));
    assert!(agent(&d.join("ga.sock"), "guest-fsfreeze-thaw").contains("\"return\": 1"));
    // The power button: the guest syncs, unmounts and powers off; QEMU exits.
    let mut q = UnixStream::connect(d.join("qmp.sock")).unwrap();
    q.write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"system_powerdown\"}\n")
        .unwrap();
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
