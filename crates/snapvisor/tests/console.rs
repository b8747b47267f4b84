//! `vm console` on the real test guest (TCG): attached through a pipe it shows what the
//! guest writes on its serial port (the counter's `tick N boot=ID` lines), refuses a
//! second client, detaches at stdin's end with the VM still running, and ends by itself
//! when the VM stops. Serial logs are kept across starts (rotated, not overwritten).

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::Duration;
use support::running::*;

/// `vm console g` with stdin and stdout piped; stdout's lines arrive on the channel.
fn attach(cli: &support::Cli, args: &[&str]) -> (Child, mpsc::Receiver<String>) {
    let mut child = cli
        .command(&[&["vm", "console", "g"][..], args].concat())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// The next `tick N boot=ID` line on the console, as (N, ID).
fn next_tick(rx: &mpsc::Receiver<String>, secs: u64) -> (u32, String) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|e| panic!("no tick on the console within {secs} s: {e}"));
        let line = line.trim_end_matches('\r');
        if let Some(rest) = line.strip_prefix("tick ") {
            let mut parts = rest.split(' ');
            let n = parts.next().unwrap().parse().unwrap();
            let boot = parts
                .next()
                .unwrap()
                .strip_prefix("boot=")
                .unwrap()
                .to_owned();
            return (n, boot);
        }
    }
}

fn stderr_of(child: Child) -> (std::process::ExitStatus, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn console_through_a_pipe_shows_the_guest_detaches_and_the_vm_runs_on() {
    let dir = tempfile::tempdir().unwrap();
    let cli = setup(dir.path());
    let store = dir.path().join("store");
    let e = cli.fails(&["vm", "console", "g"]);
    assert!(
        e.contains("VM \"g\" is not running: start it with snapvisor vm start g"),
        "{e}"
    );
    cli.ok(&["vm", "start", "g", "--accel", "tcg"]);

    let (mut child, rx) = attach(&cli, &["--linger", "0"]);
    let (first, boot) = next_tick(&rx, 120);
    let (second, _) = next_tick(&rx, 30);
    assert!(second > first, "{first} then {second}");
    // One client at a time: the second is refused, naming the first.
    let e = cli.fails(&["vm", "console", "g"]);
    assert!(
        e.contains("in use by another snapvisor vm console")
            && e.contains(&format!("(pid {})", child.id())),
        "{e}"
    );
    // stdin's end detaches.
    drop(child.stdin.take());
    let (status, err) = stderr_of(child);
    assert!(status.success(), "{err}");
    assert!(
        err.contains("connected to \"g\"'s serial console; escape with ^]"),
        "{err}"
    );
    assert!(
        err.contains("detached") && err.contains("keeps running"),
        "{err}"
    );
    // The VM runs on, and the log holds what the console showed and more after it.
    assert_eq!(status_of(&cli), "running");
    wait("ticks after the detach", 60, || {
        ticks(&store).iter().any(|&t| t > second + 4)
    });
    assert!(ticks(&store).contains(&first) && ticks(&store).contains(&second));
    let log = std::fs::read_to_string(store.join("g/logs/serial.log")).unwrap();
    assert!(log.contains(&format!("tick {second} boot={boot}")), "{log}");

    // SIGTERM detaches too (the terminal, if any, restored), the VM running on.
    let (child, rx) = attach(&cli, &[]);
    next_tick(&rx, 60);
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let (status, err) = stderr_of(child);
    assert!(
        status.success() && err.contains("detached"),
        "{status}: {err}"
    );
    assert_eq!(status_of(&cli), "running");

    // Attached again (the first client's lock went with it); the VM stopping ends it.
    let (child, rx) = attach(&cli, &[]);
    let (again, again_boot) = next_tick(&rx, 60);
    assert!(again > second && again_boot == boot, "{again} {again_boot}");
    cli.ok(&["vm", "stop", "g", "--force"]);
    let (status, err) = stderr_of(child);
    assert!(status.success(), "{err}");
    assert!(err.contains("closed: the VM stopped"), "{err}");
}

fn status_of(cli: &support::Cli) -> String {
    status(cli)["state"].as_str().unwrap().to_owned()
}

fn boot_of(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("tick "))
        .and_then(|l| l.split("boot=").nth(1))
        .map(|b| b.split_whitespace().next().unwrap_or("").to_owned())
}

#[test]
fn serial_logs_are_kept_across_starts() {
    let dir = tempfile::tempdir().unwrap();
    let cli = setup(dir.path());
    let store = dir.path().join("store");
    let logs = store.join("g/logs");
    cli.ok(&["vm", "start", "g", "--accel", "tcg"]);
    wait("first boot's ticks", 120, || ticks(&store).len() >= 2);
    let show = cli.json(&["vm", "show", "g", "--json"]);
    assert_eq!(
        show["serial_log"].as_str().unwrap(),
        logs.join("serial.log").to_str().unwrap()
    );
    assert_eq!(show["older_serial_logs"], serde_json::json!([]));
    assert_eq!(
        status(&cli)["serial_log"].as_str().unwrap(),
        logs.join("serial.log").to_str().unwrap()
    );
    cli.ok(&["vm", "stop", "g", "--force"]);
    let first = std::fs::read_to_string(logs.join("serial.log")).unwrap();
    let first_boot = boot_of(&first).unwrap();

    cli.ok(&["vm", "start", "g", "--accel", "tcg"]);
    wait("second boot's ticks", 120, || ticks(&store).len() >= 2);
    cli.ok(&["vm", "stop", "g", "--force"]);
    let second = std::fs::read_to_string(logs.join("serial.log")).unwrap();
    let second_boot = boot_of(&second).unwrap();
    assert_ne!(first_boot, second_boot);
    // The first boot's whole log moved to serial.log.1, untouched.
    assert_eq!(
        std::fs::read_to_string(logs.join("serial.log.1")).unwrap(),
        first
    );
    assert!(!second.contains(&first_boot), "{second}");
    let show = cli.json(&["vm", "show", "g", "--json"]);
    assert_eq!(
        show["older_serial_logs"],
        serde_json::json!([logs.join("serial.log.1")])
    );
    let text = cli.ok(&["vm", "show", "g"]);
    assert!(
        text.contains(&format!(
            "serial log     {} (1 earlier kept)",
            logs.join("serial.log").display()
        )),
        "{text}"
    );
}

/// On a terminal (a pty from util-linux's `script`): raw mode, the guest's output, and
/// Ctrl-] detaching with the VM still running.
#[test]
fn console_on_a_terminal_detaches_with_ctrl_close_bracket() {
    use std::io::Write;
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: no `script` (util-linux) to give the console a terminal");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cli = setup(dir.path());
    cli.ok(&["vm", "start", "g", "--accel", "tcg"]);
    let inner = format!("exec {} vm console g", env!("CARGO_BIN_EXE_snapvisor"));
    let c = cli.command(&[]);
    let mut script = std::process::Command::new("script");
    script.args(["-qfec", &inner, "/dev/null"]);
    for (k, v) in c.get_envs() {
        match v {
            Some(v) => script.env(k, v),
            None => script.env_remove(k),
        };
    }
    let mut child = script
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let (n, _) = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("the guest's ticks on the terminal");
        seen.push(line.clone());
        let line = line.trim_end_matches('\r');
        if let Some(i) = line.find("tick ") {
            let rest = &line[i + 5..];
            let n: u32 = rest.split(' ').next().unwrap().parse().unwrap();
            break (n, rest.to_owned());
        }
    };
    assert!(
        seen.iter()
            .any(|l| l.contains("connected to \"g\"'s serial console; escape with ^]")),
        "{seen:?}"
    );
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&[0x1d]).unwrap();
    stdin.flush().unwrap();
    let mut rest = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(5)) {
        rest.push(l);
        assert!(
            std::time::Instant::now() < deadline,
            "still attached after ^]: {rest:?}"
        );
    }
    let status = child.wait().unwrap();
    drop(stdin);
    assert!(status.success(), "{rest:?}");
    assert!(
        rest.iter()
            .any(|l| l.contains("detached from \"g\"'s serial console")),
        "{rest:?}"
    );
    assert_eq!(status_of(&cli), "running");
    let store = dir.path().join("store");
    wait("ticks after the detach", 60, || {
        ticks(&store).iter().any(|&t| t > n + 4)
    });
}
