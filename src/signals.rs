//! Signals become messages.
//!
//! A dedicated thread receives SIGHUP, SIGTERM and SIGINT through signal-hook's iterator and
//! forwards each as a [`Signal`] on a crossbeam channel that a daemon's main loop selects on
//! alongside everything else; no work happens inside a signal handler.

use crossbeam_channel::{Receiver, unbounded};
use signal_hook::consts::signal::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// What an operator asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// SIGHUP: re-read the configuration and the flag file.
    Reload,
    /// SIGTERM or SIGINT: drain and stop; a second one stops at once.
    Stop,
}

/// Starts the signal thread; the returned receiver yields one message per signal.
pub fn spawn() -> std::io::Result<Receiver<Signal>> {
    let mut signals = Signals::new([SIGHUP, SIGTERM, SIGINT])?;
    let (tx, rx) = unbounded();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for number in signals.forever() {
                let signal = if number == SIGHUP {
                    Signal::Reload
                } else {
                    Signal::Stop
                };
                if tx.send(signal).is_err() {
                    break;
                }
            }
        })?;
    Ok(rx)
}
