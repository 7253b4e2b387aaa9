//! Log output for a daemon that runs under systemd or in a terminal.
//!
//! Under systemd (`$JOURNAL_STREAM` set) each line starts with its syslog priority as `<N>`
//! and has no timestamp, so journald stores the priority (`journalctl -p warning` works) and
//! adds its own time. Elsewhere lines carry an RFC 3339 timestamp and the level in words.
//!
//! The level comes from the config and can change on reload; `RUST_LOG`, when set, wins (it
//! also allows per-module filters) and is not overridden by reloads.

use std::io::Write;

/// Whether `RUST_LOG` took control of filtering at start.
fn rust_log_set() -> bool {
    std::env::var_os("RUST_LOG").is_some_and(|v| !v.is_empty())
}

/// Installs the logger. Called once, before anything logs.
pub fn init(level: log::LevelFilter) {
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let mut builder = env_logger::Builder::new();
    builder.target(env_logger::Target::Stderr);
    if rust_log_set() {
        builder.parse_env("RUST_LOG");
    } else {
        builder.filter_level(log::LevelFilter::Trace);
    }
    if journal {
        builder.format(|out, record| {
            writeln!(
                out,
                "<{}>{}",
                syslog_priority(record.level()),
                record.args()
            )
        });
    } else {
        builder.format(|out, record| {
            writeln!(
                out,
                "{} {:<5} {}",
                out.timestamp_millis(),
                record.level(),
                record.args()
            )
        });
    }
    // A second init (tests running a daemon in-process twice) keeps the first logger.
    if builder.try_init().is_ok() {
        set_level(level);
    }
}

/// Applies the config's level, unless `RUST_LOG` is in charge.
pub fn set_level(level: log::LevelFilter) {
    if !rust_log_set() {
        log::set_max_level(level);
    }
}

/// sd-daemon(3) priorities: error 3, warning 4, info 6, debug 7.
fn syslog_priority(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 6,
        log::Level::Debug | log::Level::Trace => 7,
    }
}
