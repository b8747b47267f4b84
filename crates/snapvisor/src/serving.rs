//! Serving a disk over NBD in the foreground until the user stops it (`disk serve`,
//! `backup mount`).

use anyhow::{Context, Result};
use std::io::Write;

/// Prints `banner` once the server listens, serves until SIGINT or SIGTERM, then closes
/// the server (its socket file goes with it). `what` names the export in the error.
pub fn until_signal(server: nbd::Server, banner: &str, what: &str) -> Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .context("cannot install signal handlers")?;
    let stopper = server.stopper();
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            stopper.stop();
        }
    });
    println!("{banner}");
    std::io::stdout().flush().ok();
    server
        .run()
        .with_context(|| format!("serving {what} failed"))?;
    drop(server);
    Ok(())
}
