//! The streaming loop: hold one `GET {stream_uri}/all` open, pass every change it carries to
//! the flag source, and when it breaks, reconnect after a backoff delay.
//!
//! This is LaunchDarkly's recommended mode: a change made in the dashboard reaches the daemon
//! within a moment, with no polling traffic. Every way a stream can end (the server closing
//! it, a silent connection hitting the read timeout, an error status, a message that does not
//! parse) is a reason to reconnect, except a status that says retrying cannot help (a refused
//! key), after which the thread stays quiet and the source keeps serving its last values.

use super::http::{self, Failure};
use super::sse::{SseItem, SseParser};
use super::{LdSettings, Link, MAX_PAYLOAD_BYTES, protocol};
use crate::flags::SourceState;
use crate::flags::store::DataEvent;
use std::io::BufReader;
use std::time::{Duration, Instant};

/// How one connection ended.
enum End {
    /// The handle asked the thread to stop, or the source is gone.
    Stopped,
    /// Lost after `uptime` connected (zero if it never connected): reconnect.
    Lost { reason: String, uptime: Duration },
    /// Retrying cannot help.
    Refused(String),
}

/// Runs the streaming loop until asked to stop.
pub(crate) fn run(settings: &LdSettings, link: &mut Link) {
    let url = format!("{}/all", settings.stream_uri.trim_end_matches('/'));
    let agent = http::agent_for(
        "streaming",
        &url,
        settings.proxy.as_ref(),
        settings.read_timeout,
        None,
    );
    let mut backoff = super::retry_schedule(settings.initial_retry_delay);
    while !link.stopping() {
        match connect_and_read(&agent, &url, &settings.sdk_key, link) {
            End::Stopped => return,
            End::Refused(reason) => {
                link.state(SourceState::Off, reason);
                link.wait_for_stop();
                return;
            }
            End::Lost { reason, uptime } => {
                link.state(SourceState::Interrupted, reason);
                backoff.connection_ended(uptime);
                if link.sleep(backoff.next_delay()) {
                    return;
                }
            }
        }
    }
}

/// Makes one connection and reads it until it ends.
fn connect_and_read(agent: &ureq::Agent, url: &str, sdk_key: &str, link: &mut Link) -> End {
    log::debug!("LaunchDarkly: connecting to {url}");
    let response = match http::get(agent, url, sdk_key)
        .set("Accept", "text/event-stream")
        .call()
    {
        Ok(response) => response,
        Err(error) => {
            return match http::failure(url, error) {
                Failure::Recoverable(reason) => End::Lost {
                    reason,
                    uptime: Duration::ZERO,
                },
                Failure::Unrecoverable(reason) => End::Refused(reason),
            };
        }
    };
    if response.status() != 200 {
        return End::Lost {
            reason: format!(
                "{url} answered HTTP {} instead of a stream",
                response.status()
            ),
            uptime: Duration::ZERO,
        };
    }
    let connected = Instant::now();
    let lost = |reason: String| End::Lost {
        reason,
        uptime: connected.elapsed(),
    };
    let reader = BufReader::with_capacity(64 * 1024, response.into_reader());
    let mut parser = SseParser::new(reader, MAX_PAYLOAD_BYTES);
    let mut initialized = false;
    loop {
        if link.stopping() {
            return End::Stopped;
        }
        let event = match parser.next_item() {
            Ok(Some(SseItem::Event(event))) => event,
            Ok(Some(SseItem::Heartbeat)) => {
                // The read that brought it also restarted the read timeout: that is all a
                // heartbeat is for.
                log::trace!("LaunchDarkly: heartbeat");
                continue;
            }
            Ok(None) => return lost(format!("{url}: the stream was closed")),
            Err(e) => return lost(format!("{url}: {e}")),
        };
        match protocol::stream_event(&event.name, &event.data) {
            Ok(Some(change)) => {
                let is_put = matches!(change, DataEvent::Put(_));
                if !link.data(change) {
                    return End::Stopped;
                }
                if is_put && !initialized {
                    initialized = true;
                    link.state(SourceState::Valid, format!("{url}: data received"));
                }
            }
            Ok(None) => log::debug!("LaunchDarkly: ignoring a {:?} event", event.name),
            // The change cannot be applied, and later ones may depend on it: start over,
            // and the next `put` re-syncs everything.
            Err(e) => return lost(format!("{url}: {e}; restarting the stream")),
        }
    }
}
