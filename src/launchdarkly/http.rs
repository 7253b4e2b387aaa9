//! The HTTP side shared by streaming, polling and events: one configured agent per connection
//! (direct, or through the proxy [`crate::proxy`] chooses for its URL), the headers every
//! request carries, and what a failed request means (retry, or give up).
//!
//! It is also where the SDK key is kept out of text: the key is only ever passed to ureq as a
//! header value (which ureq's own debug log masks), never put in a URL, never formatted; a key
//! ureq would refuse as a header is rejected here first, because ureq's error for a bad header
//! quotes the whole header line.

use crate::proxy::{ProxyRules, ProxyServer};
use std::time::Duration;

/// How long opening a connection (DNS, TCP, TLS) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The version sent in `User-Agent` and `X-LaunchDarkly-Tags`.
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What a failed request means for the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Worth retrying with backoff: the service or the network may recover.
    Recoverable(String),
    /// Retrying cannot help (the key was refused, the path does not exist): give up.
    Unrecoverable(String),
}

/// Whether an HTTP error status may go away by itself. LaunchDarkly's SDKs retry 400, 408,
/// 429 and every 5xx, and give up on any other 4xx (401 and 403 mean a wrong or revoked key).
pub fn is_recoverable(status: u16) -> bool {
    !(400..500).contains(&status) || matches!(status, 400 | 408 | 429)
}

/// Whether `key` can be sent as a header value at all.
pub fn key_is_sendable(key: &str) -> bool {
    !key.is_empty()
        && key
            .bytes()
            .all(|b| b == b' ' || b == b'\t' || (0x21..=0x7E).contains(&b))
}

/// An agent for the connections `purpose` (`streaming`, `polling`, `events`) makes to `url`,
/// through the proxy `proxy` chooses for that URL (see [`crate::proxy`] for how ureq tunnels).
/// It logs once, at info, which way the connection goes, so an operator can tell from the
/// startup lines whether the proxy is used; the line names the proxy by host and port only.
pub fn agent_for(
    purpose: &str,
    url: &str,
    proxy: Option<&ProxyRules>,
    read_timeout: Duration,
    total_timeout: Option<Duration>,
) -> ureq::Agent {
    let route = crate::proxy::route(proxy, url);
    log::info!("LaunchDarkly {purpose}: {url} {route}");
    agent(read_timeout, total_timeout, route.server())
}

/// An agent whose every read gives up after `read_timeout` without a byte, and whose every
/// request gives up after `total_timeout` if one is given (polling; a stream has no end),
/// connecting through `proxy` if one is given. Without one it connects directly: ureq's own
/// reading of proxy variables is not built in, so the environment is only read in one place.
pub fn agent(
    read_timeout: Duration,
    total_timeout: Option<Duration>,
    proxy: Option<&ProxyServer>,
) -> ureq::Agent {
    let mut builder = ureq::AgentBuilder::new()
        .timeout_connect(CONNECT_TIMEOUT)
        .timeout_read(read_timeout)
        .timeout_write(CONNECT_TIMEOUT);
    if let Some(total) = total_timeout {
        builder = builder.timeout(total);
    }
    if let Some(proxy) = proxy {
        builder = builder.proxy(proxy.to_ureq());
    }
    builder.build()
}

/// A GET of `url` with the headers LaunchDarkly expects. The key must have passed
/// [`key_is_sendable`].
pub fn get(agent: &ureq::Agent, url: &str, sdk_key: &str) -> ureq::Request {
    agent
        .get(url)
        .set("Authorization", sdk_key)
        .set("User-Agent", &format!("flagshed/{VERSION}"))
        .set(
            "X-LaunchDarkly-Tags",
            &format!("application-id/flagshed application-version/{VERSION}"),
        )
}

/// Turns a ureq error into a failure with a message naming the URL (never the key).
pub fn failure(url: &str, error: ureq::Error) -> Failure {
    match error {
        ureq::Error::Status(status, _) => {
            let message = format!("{url} answered HTTP {status}");
            if is_recoverable(status) {
                Failure::Recoverable(message)
            } else {
                Failure::Unrecoverable(message)
            }
        }
        // Transport errors name the URL, the kind and the cause; none of them holds headers.
        ureq::Error::Transport(transport) => Failure::Recoverable(transport.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified_as_launchdarkly_sdks_do() {
        for status in [400, 408, 429, 500, 502, 503, 504, 599] {
            assert!(is_recoverable(status), "{status}");
        }
        for status in [401, 403, 404, 405, 410, 499] {
            assert!(!is_recoverable(status), "{status}");
        }
    }

    #[test]
    fn keys_ureq_would_quote_in_an_error_are_refused() {
        assert!(key_is_sendable("sdk-01234567-89ab-cdef"));
        assert!(!key_is_sendable(""));
        assert!(!key_is_sendable("sdk-123\n"));
        assert!(!key_is_sendable("sdk-é"));
    }

    #[test]
    fn refused_connection_is_recoverable_and_names_the_url() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}/all", listener.local_addr().expect("addr"));
        drop(listener);
        let error = get(
            &agent(Duration::from_secs(1), None, None),
            &url,
            "sdk-secret-key",
        )
        .call()
        .expect_err("nothing listens");
        match failure(&url, error) {
            Failure::Recoverable(message) => {
                assert!(message.contains(&url), "{message}");
                assert!(!message.contains("sdk-secret-key"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
