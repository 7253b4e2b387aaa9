//! LaunchDarkly's streaming and polling endpoints, read on a thread of their own.
//!
//! This module only moves data: it turns the wire protocol into [`DataEvent`]s and
//! [`SourceState`] changes on a channel. The flag source thread applies them, evaluates and
//! stores values; nothing here touches the hot path.
//!
//! Code map: [`sse`] splits the stream into events, [`protocol`] turns event and polling
//! bodies into data changes, `http` builds requests
//! and classifies failures, [`proxy`] decides which HTTP proxy (if any) each connection goes
//! through, and `stream` and `poll` are the two thread loops. The
//! invariants: one thread, so one connection attempt at a time; nothing is sent on the
//! channel until a message has parsed completely; and the SDK key is only ever a header value,
//! never formatted into a URL, a log line, an error or `Debug` output.

pub mod events;
mod http;
mod poll;
pub mod protocol;
pub mod sse;
mod stream;

use crate::config::LaunchDarklyConfig;
use crate::flags::SourceState;
use crate::flags::store::DataEvent;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The largest event or polling response accepted, in bytes. LaunchDarkly's biggest data sets
/// are a few megabytes; anything far beyond is a broken or hostile server, refused rather than
/// buffered without end.
pub const MAX_PAYLOAD_BYTES: usize = 16 * 1024 * 1024;

/// How long a streaming read may wait for a byte before the connection counts as dead.
/// LaunchDarkly sends a heartbeat comment every few minutes, so a healthy stream never gets
/// this quiet.
pub const STREAM_READ_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// The first reconnection delay LaunchDarkly's SDKs use.
pub const INITIAL_RETRY_DELAY: Duration = Duration::from_secs(1);

/// The longest wait between reconnection attempts, as LaunchDarkly's SDKs cap it.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// How long a connection must stay up for the next failure to start the backoff over.
pub const HEALTHY_AFTER: Duration = Duration::from_secs(60);

/// The reconnection schedule LaunchDarkly's SDKs follow, from `first` delay.
fn retry_schedule(first: Duration) -> crate::backoff::Backoff {
    crate::backoff::Backoff::new(first, MAX_RETRY_DELAY, HEALTHY_AFTER)
}

/// What the LaunchDarkly thread tells the flag source thread.
#[derive(Debug)]
pub enum LdMessage {
    /// A change to apply to the flag store.
    Data(DataEvent),
    /// The connection's state changed; `reason` says why, for a log line (never the key).
    State {
        /// The new state.
        state: SourceState,
        /// What happened, naming the URL (never the key), for the log line.
        reason: String,
    },
}

/// The settings the LaunchDarkly thread needs.
#[derive(Clone)]
pub struct LdSettings {
    /// Sent as `Authorization`; never formatted anywhere.
    pub sdk_key: String,
    /// Streaming (`true`, the default and LaunchDarkly's recommendation) or polling.
    pub stream: bool,
    /// Where `GET /all` streams from, without a trailing `/`.
    pub stream_uri: String,
    /// Where `GET /sdk/latest-all` polls from, without a trailing `/`.
    pub base_uri: String,
    /// The pause between polls when polling.
    pub poll_interval: Duration,
    /// The first reconnection delay; [`INITIAL_RETRY_DELAY`] from the config, shorter in
    /// tests so that they do not wait for seconds.
    pub initial_retry_delay: Duration,
    /// How long a streaming read may wait for a byte; [`STREAM_READ_TIMEOUT`] from the config.
    pub read_timeout: Duration,
    /// The proxy rules read from the environment at start; `None`: every connection is direct.
    pub proxy: Option<crate::proxy::ProxyRules>,
}

impl LdSettings {
    /// Takes what the thread needs from the validated config.
    pub fn from_config(config: &LaunchDarklyConfig) -> LdSettings {
        LdSettings {
            sdk_key: config.sdk_key.clone().unwrap_or_default(),
            stream: config.stream,
            stream_uri: config.stream_uri.clone(),
            base_uri: config.base_uri.clone(),
            poll_interval: config.poll_interval,
            initial_retry_delay: INITIAL_RETRY_DELAY,
            read_timeout: STREAM_READ_TIMEOUT,
            proxy: config.proxy.clone(),
        }
    }
}

/// Shows everything but the key, so settings can be logged or asserted on safely.
impl fmt::Debug for LdSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LdSettings")
            .field("sdk_key", &"<redacted>")
            .field("stream", &self.stream)
            .field("stream_uri", &self.stream_uri)
            .field("base_uri", &self.base_uri)
            .field("poll_interval", &self.poll_interval)
            .field("initial_retry_delay", &self.initial_retry_delay)
            .field("read_timeout", &self.read_timeout)
            .field("proxy", &self.proxy)
            .finish()
    }
}

/// The running LaunchDarkly thread. Dropping it (or calling [`LdHandle::stop`]) asks the
/// thread to stop, so a source that goes away never leaves a thread reconnecting forever.
pub struct LdHandle {
    stop: Arc<AtomicBool>,
    /// Never sent on: dropping it disconnects the thread's receiver, which wakes a thread
    /// sleeping between attempts at once.
    _wake: Sender<()>,
}

impl LdHandle {
    /// Asks the thread to stop; does not wait for it (it may be blocked in a read, which ends
    /// at the latest with the read timeout).
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for LdHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Starts the LaunchDarkly thread, which sends what it learns on `out`.
pub fn spawn(settings: LdSettings, out: Sender<LdMessage>) -> std::io::Result<LdHandle> {
    let stop = Arc::new(AtomicBool::new(false));
    let (wake_tx, wake_rx) = bounded(0);
    let mut link = Link {
        out,
        stop: Arc::clone(&stop),
        wake: wake_rx,
        last_state: None,
        secret: settings.sdk_key.clone(),
    };
    std::thread::Builder::new()
        .name("launchdarkly".into())
        .spawn(move || {
            if !http::key_is_sendable(&settings.sdk_key) {
                link.state(
                    SourceState::Off,
                    "the SDK key is empty or holds characters not allowed in an HTTP header".into(),
                );
                link.wait_for_stop();
            } else if settings.stream {
                stream::run(&settings, &mut link);
            } else {
                poll::run(&settings, &mut link);
            }
        })?;
    Ok(LdHandle {
        stop,
        _wake: wake_tx,
    })
}

/// The thread's side of the channel and of the stop request, shared by both loops.
pub(crate) struct Link {
    out: Sender<LdMessage>,
    stop: Arc<AtomicBool>,
    wake: Receiver<()>,
    /// The last state sent, so a run of failures sends one message, not one per retry.
    last_state: Option<SourceState>,
    /// The key, only to make sure no reason text carries it.
    secret: String,
}

impl Link {
    /// Whether the thread should end now.
    pub(crate) fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Waits `delay`, or less if asked to stop; returns whether to stop.
    pub(crate) fn sleep(&self, delay: Duration) -> bool {
        if self.stopping() {
            return true;
        }
        match self.wake.recv_timeout(delay) {
            Err(RecvTimeoutError::Timeout) => self.stopping(),
            Ok(()) | Err(RecvTimeoutError::Disconnected) => true,
        }
    }

    /// Parks the thread until the handle goes away: after giving up, the thread keeps its end
    /// of the channel open so the source sees a quiet source, not a closed one.
    pub(crate) fn wait_for_stop(&self) {
        while !self.stopping() {
            if self.wake.recv().is_err() {
                return;
            }
        }
    }

    /// Sends a data change; returns `false` when the source is gone (time to stop).
    pub(crate) fn data(&mut self, event: DataEvent) -> bool {
        if self.out.send(LdMessage::Data(event)).is_err() {
            self.stop.store(true, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Reports a state if it differs from the last one reported.
    pub(crate) fn state(&mut self, state: SourceState, reason: String) {
        let reason = scrub(reason, &self.secret);
        log::debug!("LaunchDarkly source {}: {reason}", state.as_str());
        if self.last_state == Some(state) {
            return;
        }
        self.last_state = Some(state);
        if self.out.send(LdMessage::State { state, reason }).is_err() {
            self.stop.store(true, Ordering::Relaxed);
        }
    }
}

/// Replaces the key in `text`, should it ever be there (a server echoing it back in an error
/// body would be enough): a last line of defence behind never formatting it.
fn scrub(text: String, secret: &str) -> String {
    if !secret.is_empty() && text.contains(secret) {
        text.replace(secret, "<sdk key>")
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_hides_the_key() {
        let settings = LdSettings {
            sdk_key: "sdk-very-secret".into(),
            stream: true,
            stream_uri: "http://127.0.0.1:1".into(),
            base_uri: "http://127.0.0.1:1".into(),
            poll_interval: Duration::from_secs(30),
            initial_retry_delay: INITIAL_RETRY_DELAY,
            read_timeout: STREAM_READ_TIMEOUT,
            proxy: None,
        };
        let text = format!("{settings:?}");
        assert!(!text.contains("sdk-very-secret"), "{text}");
        assert!(text.contains("<redacted>"));
    }

    #[test]
    fn scrub_removes_the_key() {
        assert_eq!(
            scrub("bad key sdk-1 given".into(), "sdk-1"),
            "bad key <sdk key> given"
        );
        assert_eq!(scrub("nothing".into(), ""), "nothing");
    }

    #[test]
    fn unsendable_key_turns_the_source_off_without_a_request() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let settings = LdSettings {
            sdk_key: "sdk-bad\nkey".into(),
            stream: true,
            // Nothing listens here; a request would report Interrupted, not Off.
            stream_uri: "http://127.0.0.1:1".into(),
            base_uri: "http://127.0.0.1:1".into(),
            poll_interval: Duration::from_secs(30),
            initial_retry_delay: Duration::from_millis(5),
            read_timeout: STREAM_READ_TIMEOUT,
            proxy: None,
        };
        let handle = spawn(settings, tx).expect("spawn");
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(LdMessage::State { state, reason }) => {
                assert_eq!(state, SourceState::Off);
                assert!(!reason.contains("sdk-bad"), "{reason}");
            }
            other => panic!("unexpected {other:?}"),
        }
        handle.stop();
    }
}
