//! The polling loop: `GET {base_uri}/sdk/latest-all` every poll interval, for networks where
//! a long-lived streaming connection is not possible.
//!
//! Each poll sends the last `ETag` as `If-None-Match`, so an unchanged data set costs a `304`
//! and no body. A failed poll is retried sooner than the interval (with backoff, never later
//! than the interval), so a short outage does not leave flags stale for a whole interval; a
//! status that says retrying cannot help turns the source off, as in streaming.

use super::http::{self, Failure};
use super::{LdSettings, Link, MAX_PAYLOAD_BYTES, protocol};
use crate::flags::SourceState;
use crate::flags::store::DataEvent;
use std::io::Read;
use std::time::Duration;

/// The longest a whole poll (connect, request, body) may take.
const POLL_TIMEOUT: Duration = Duration::from_secs(120);

/// What one poll found.
enum Poll {
    Changed {
        event: DataEvent,
        etag: Option<String>,
    },
    Unchanged,
    Failed(Failure),
}

/// Runs the polling loop until asked to stop.
pub(crate) fn run(settings: &LdSettings, link: &mut Link) {
    let url = format!("{}/sdk/latest-all", settings.base_uri.trim_end_matches('/'));
    let agent = http::agent_for(
        "polling",
        &url,
        settings.proxy.as_ref(),
        settings.read_timeout.min(POLL_TIMEOUT),
        Some(POLL_TIMEOUT),
    );
    let mut backoff = super::retry_schedule(settings.initial_retry_delay);
    let mut etag: Option<String> = None;
    while !link.stopping() {
        let wait = match poll_once(&agent, &url, &settings.sdk_key, etag.as_deref()) {
            Poll::Changed { event, etag: tag } => {
                if !link.data(event) {
                    return;
                }
                // Only a body that parsed may set the tag: otherwise the next poll would get
                // a 304 for data never applied.
                etag = tag;
                link.state(SourceState::Valid, format!("{url}: data received"));
                backoff.reset();
                settings.poll_interval
            }
            Poll::Unchanged => {
                link.state(SourceState::Valid, format!("{url}: unchanged"));
                backoff.reset();
                settings.poll_interval
            }
            Poll::Failed(Failure::Recoverable(reason)) => {
                link.state(SourceState::Interrupted, reason);
                backoff.next_delay().min(settings.poll_interval)
            }
            Poll::Failed(Failure::Unrecoverable(reason)) => {
                link.state(SourceState::Off, reason);
                link.wait_for_stop();
                return;
            }
        };
        if link.sleep(wait) {
            return;
        }
    }
}

fn poll_once(agent: &ureq::Agent, url: &str, sdk_key: &str, etag: Option<&str>) -> Poll {
    log::debug!("LaunchDarkly: polling {url}");
    let mut request = http::get(agent, url, sdk_key).set("Accept", "application/json");
    if let Some(tag) = etag {
        request = request.set("If-None-Match", tag);
    }
    let response = match request.call() {
        Ok(response) => response,
        Err(error) => return Poll::Failed(http::failure(url, error)),
    };
    match response.status() {
        304 => return Poll::Unchanged,
        200 => {}
        status => {
            return Poll::Failed(Failure::Recoverable(format!(
                "{url} answered HTTP {status} instead of the data set"
            )));
        }
    }
    let tag = response
        .header("ETag")
        .filter(|t| http::key_is_sendable(t))
        .map(str::to_owned);
    let mut body = Vec::new();
    let limit = MAX_PAYLOAD_BYTES as u64 + 1;
    if let Err(e) = response.into_reader().take(limit).read_to_end(&mut body) {
        return Poll::Failed(Failure::Recoverable(format!(
            "{url}: reading the body: {e}"
        )));
    }
    if body.len() > MAX_PAYLOAD_BYTES {
        return Poll::Failed(Failure::Recoverable(format!(
            "{url}: the data set is larger than {MAX_PAYLOAD_BYTES} bytes"
        )));
    }
    match protocol::poll_body(&body) {
        Ok(event) => Poll::Changed { event, etag: tag },
        Err(e) => Poll::Failed(Failure::Recoverable(format!("{url}: {e}"))),
    }
}
