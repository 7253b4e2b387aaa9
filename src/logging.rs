//! Log output for a daemon that runs under systemd or in a terminal.
//!
//! Under systemd (`$JOURNAL_STREAM` set) each line starts with its syslog priority as `<N>`
//! and has no timestamp, so journald stores the priority (`journalctl -p warning` works) and
//! adds its own time. Elsewhere lines carry an RFC 3339 timestamp and the level in words.
//!
//! The level comes from the config and can change on reload; `RUST_LOG`, when set, wins (it
//! also allows per-module filters) and is not overridden by reloads.
//!
//! No level shows a secret. amiquip's handshake records (at debug, they print the SASL
//! response, user name and password included) are never emitted, whatever the level; and
//! every line is scrubbed of the secrets the daemon knows (the SDK key, broker passwords, a
//! handler URL's password) before it is written, whichever crate logged it.

use std::borrow::Cow;
use std::io::Write;
use std::sync::OnceLock;

/// The module whose debug records carry the AMQP handshake, credentials included.
const AMQP_HANDSHAKE_TARGET: &str = "amiquip::io_loop::handshake_state";

/// Secrets shorter than this are not scrubbed: replacing every "guest" or "1" in the log would
/// garble it, and such a value is no secret.
const SHORTEST_SCRUBBED: usize = 6;

static SECRETS: OnceLock<Vec<String>> = OnceLock::new();

/// Whether `RUST_LOG` took control of filtering at start.
fn rust_log_set() -> bool {
    std::env::var_os("RUST_LOG").is_some_and(|v| !v.is_empty())
}

/// Installs the logger, scrubbing `secrets` from every line. Called once, before anything
/// logs.
pub fn init(level: log::LevelFilter, secrets: Vec<String>) {
    let _ = SECRETS.set(
        secrets
            .into_iter()
            .filter(|s| s.len() >= SHORTEST_SCRUBBED)
            .collect(),
    );
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let mut builder = env_logger::Builder::new();
    builder.target(env_logger::Target::Stderr);
    if rust_log_set() {
        builder.parse_env("RUST_LOG");
    } else {
        builder.filter_level(log::LevelFilter::Trace);
    }
    builder.filter_module(AMQP_HANDSHAKE_TARGET, log::LevelFilter::Info);
    if journal {
        builder.format(|out, record| {
            writeln!(
                out,
                "<{}>{}",
                syslog_priority(record.level()),
                scrub(record.args())
            )
        });
    } else {
        builder.format(|out, record| {
            writeln!(
                out,
                "{} {:<5} {}",
                out.timestamp_millis(),
                record.level(),
                scrub(record.args())
            )
        });
    }
    // A second init (tests running a daemon in-process twice) keeps the first logger.
    if builder.try_init().is_ok() {
        set_level(level);
    }
}

/// A log message with every known secret replaced by `<redacted>`.
fn scrub(args: &std::fmt::Arguments<'_>) -> Cow<'static, str> {
    let text = match args.as_str() {
        Some(text) => Cow::Borrowed(text),
        None => Cow::Owned(args.to_string()),
    };
    let secrets = SECRETS.get().map(Vec::as_slice).unwrap_or_default();
    if !secrets.iter().any(|s| text.contains(s.as_str())) {
        return text;
    }
    let mut text = text.into_owned();
    for secret in secrets {
        text = text.replace(secret.as_str(), "<redacted>");
    }
    Cow::Owned(text)
}

/// Applies the config's level, unless `RUST_LOG` is in charge.
pub fn set_level(level: log::LevelFilter) {
    if !rust_log_set() {
        log::set_max_level(level);
    }
}

/// `text` cut to at most `max` bytes (on a character boundary) for a log line, saying how
/// long it was: values and parser messages from outside can be megabytes.
pub fn shortened(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max {
        return Cow::Borrowed(text);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}... ({} bytes)", &text[..end], text.len()))
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
