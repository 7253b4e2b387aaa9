//! The sd_notify protocol, spoken directly: one datagram per state change on the Unix socket
//! named by `$NOTIFY_SOCKET` (a path, or an abstract name starting with `@`).
//!
//! Without `$NOTIFY_SOCKET` (not under systemd, or not `Type=notify`) every call is a no-op, so
//! the daemons call it unconditionally. Send failures are ignored after one debug line: the
//! service manager going away must not stop the work.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// A connection to the service manager, or nothing.
#[derive(Debug)]
pub struct Notifier {
    socket: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET` and `$WATCHDOG_USEC` (honouring `$WATCHDOG_PID`).
    pub fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let address = socket_address(path.to_str()?)?;
            let socket = UnixDatagram::unbound().ok()?;
            Some((socket, address))
        });
        let watchdog_for_us = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_none_or(|pid| pid == std::process::id());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|usec| usec.parse::<u64>().ok())
            .filter(|&usec| usec > 0 && watchdog_for_us)
            .map(Duration::from_micros);
        Notifier { socket, watchdog }
    }

    /// A notifier that sends nothing, so unit tests do not depend on the environment.
    #[cfg(test)]
    pub(crate) fn disabled() -> Notifier {
        Notifier {
            socket: None,
            watchdog: None,
        }
    }

    /// How often to send `WATCHDOG=1`: half the watchdog timeout, as systemd advises.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|timeout| timeout / 2)
    }

    /// Startup finished: connected and consuming (or publishing).
    pub fn ready(&self, status: &str) {
        self.send(&format!(
            "READY=1\nSTATUS={status}\nMAINPID={}",
            std::process::id()
        ));
    }

    /// A reload begins; systemd 253+ wants the monotonic time with it.
    pub fn reloading(&self) {
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
    }

    /// Shutdown begins.
    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }

    /// A one-line summary for `systemctl status`.
    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={status}"));
    }

    /// The loop is alive.
    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    fn send(&self, message: &str) {
        if let Some((socket, address)) = &self.socket {
            if let Err(e) = socket.send_to_addr(message.as_bytes(), address) {
                log::debug!("sd_notify: {e}");
            }
        }
    }
}

fn socket_address(path: &str) -> Option<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    match path.strip_prefix('@') {
        Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).ok(),
        None if path.starts_with('/') => std::os::unix::net::SocketAddr::from_pathname(path).ok(),
        None => None,
    }
}

/// CLOCK_MONOTONIC in microseconds: systemd orders a reload against its own clock with it.
fn monotonic_usec() -> u128 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer and has no other effect.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    if rc != 0 {
        return 0;
    }
    now.tv_sec as u128 * 1_000_000 + now.tv_nsec as u128 / 1_000
}
