//! `snapvisor vm console NAME`: attached to a running VM's serial console, as
//! `virsh console` is.
//!
//! On a terminal: raw mode (every key goes to the guest, Ctrl-C included), `Ctrl-]`
//! detaches, the terminal is restored however the command ends (detach, the VM stopping,
//! an error). With stdin not a terminal (scripts): stdin is copied to the console and the
//! console to stdout; at stdin's end the console is copied on for `--linger` seconds (so
//! the answer to the last line is seen), then the command detaches. SIGTERM, SIGHUP (and
//! SIGINT, which raw mode passes to the guest as a byte instead) detach as well. Either
//! way the VM runs on after a detach, and the command ends by itself when the VM stops.
//!
//! One client at a time: a second `vm console` of the same VM is refused with the first
//! one's pid (see `host::console`); whatever the guest writes is in the serial log
//! (`vm show` names it) whether or not anyone is attached.

use anyhow::{Context, Result};
use clap::Args;
use host::Host;
use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

/// `Ctrl-]`, the escape byte (as in telnet and virsh).
const ESCAPE: u8 = 0x1d;

#[derive(Args, Debug)]
pub struct ConsoleArgs {
    /// The running VM.
    name: String,
    /// When stdin is not a terminal: seconds to keep copying the console to stdout after
    /// stdin ends (then detach).
    #[arg(long, default_value_t = 1.0, value_name = "SECONDS")]
    linger: f64,
}

enum End {
    /// Ctrl-] on the terminal.
    Detached,
    /// stdin ended (not a terminal).
    InputEnded,
    /// The console closed: the VM stopped.
    ConsoleClosed,
    /// Copying failed.
    Failed(anyhow::Error),
}

pub fn run(host: &Host, a: ConsoleArgs) -> Result<ExitCode> {
    if !(a.linger.is_finite() && a.linger >= 0.0) {
        anyhow::bail!(
            "--linger {} is not a number of seconds: give 0 or more",
            a.linger
        );
    }
    let vm = host.vm(&a.name);
    let console = vm.console()?;
    let terminal = std::io::stdin().is_terminal();
    eprintln!(
        "connected to \"{}\"'s serial console; escape with ^]",
        a.name
    );
    // Raw mode before the first byte is read; the guard restores the terminal on every
    // way out of this function (the threads never touch its settings).
    let raw = if terminal {
        Some(RawMode::enter().context("cannot put the terminal in raw mode")?)
    } else {
        None
    };
    let (tx, rx) = mpsc::channel::<End>();
    // SIGTERM and SIGHUP (and SIGINT when not in raw mode) detach, so that the terminal
    // is restored and the attach message answered, instead of dying in raw mode.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ])
    .context("cannot watch for signals")?;
    let sig_tx = tx.clone();
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            let _ = sig_tx.send(End::Detached);
        }
    });

    let mut from_vm = console
        .stream()
        .try_clone()
        .context("cannot use the console connection")?;
    let out_tx = tx.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        let mut stdout = std::io::stdout().lock();
        let end = loop {
            match from_vm.read(&mut buf) {
                Ok(0) => break End::ConsoleClosed,
                Ok(n) => {
                    if let Err(e) = stdout.write_all(&buf[..n]).and_then(|()| stdout.flush()) {
                        break End::Failed(anyhow::Error::new(e).context("cannot write to stdout"));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    break End::Failed(anyhow::Error::new(e).context("reading the console"));
                }
            }
        };
        let _ = out_tx.send(end);
    });

    let mut to_vm = console
        .stream()
        .try_clone()
        .context("cannot use the console connection")?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut stdin = std::io::stdin().lock();
        let end = loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) => break End::InputEnded,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => break End::Failed(anyhow::Error::new(e).context("reading stdin")),
            };
            let (send, detach) = match terminal.then(|| buf[..n].iter().position(|&b| b == ESCAPE))
            {
                Some(Some(at)) => (&buf[..at], true),
                _ => (&buf[..n], false),
            };
            if let Err(e) = to_vm.write_all(send) {
                // The VM went away: the reader sees the end and says so.
                if e.kind() == std::io::ErrorKind::BrokenPipe {
                    break End::ConsoleClosed;
                }
                break End::Failed(anyhow::Error::new(e).context("writing to the console"));
            }
            if detach {
                break End::Detached;
            }
        };
        let _ = tx.send(end);
    });

    let mut end = rx.recv().unwrap_or(End::ConsoleClosed);
    if let End::InputEnded = end {
        // The guest may still be answering the last line: copy on for --linger, unless
        // the console closes first.
        if let Ok(e @ (End::ConsoleClosed | End::Failed(_))) =
            rx.recv_timeout(Duration::from_secs_f64(a.linger))
        {
            end = e;
        }
    }
    let _ = console.stream().shutdown(std::net::Shutdown::Both);
    drop(raw);
    let name = &a.name;
    match end {
        End::Detached | End::InputEnded => {
            eprintln!("\r\ndetached from \"{name}\"'s serial console; the VM keeps running");
            Ok(ExitCode::SUCCESS)
        }
        End::ConsoleClosed => {
            eprintln!("\r\nthe serial console of \"{name}\" closed: the VM stopped");
            Ok(ExitCode::SUCCESS)
        }
        End::Failed(e) => Err(e),
    }
}

/// The terminal in raw mode until dropped.
struct RawMode {
    saved: rustix::termios::Termios,
}

impl RawMode {
    fn enter() -> std::io::Result<RawMode> {
        let stdin = std::io::stdin();
        let saved = rustix::termios::tcgetattr(&stdin)?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Flush, &raw)?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            std::io::stdin(),
            rustix::termios::OptionalActions::Now,
            &self.saved,
        );
    }
}
