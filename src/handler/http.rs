//! The http handler: one POST per job to a local or internal service, in the manner of Cloud
//! Tasks' HTTP targets: the job's time left is the request's timeout, and the status says how
//! the job ended (2xx done, 429 and 503 retry later, anything else failed).
//!
//! The request carries the body with the job's content type (`application/octet-stream` if it
//! has none) and the headers `X-Flagshed-Job-Id`, `X-Flagshed-Job-Type`,
//! `X-Flagshed-Deadline-Ms` and `X-Flagshed-Time-Left-Ms` (the last two only with a deadline).
//! Connections are kept alive and reused: the agent keeps one idle connection per pool thread.
//! Redirects are not followed (a redirected POST would lose its body or change its method); a
//! 3xx is a failure whose reason names the new location, so the operator can fix the URL.
//! Error reasons never quote the URL, which may hold credentials.

use super::{Handler, HandlerError, Job};
use crate::clock::now_ms;
use std::io::Read;
use std::time::Duration;

/// How much of a response body is read (and discarded) so the connection can be reused.
const RESPONSE_DRAIN_BYTES: u64 = 1024 * 1024;

/// POSTs each job to `url`.
pub struct HttpHandler {
    url: String,
    agent: ureq::Agent,
}

impl std::fmt::Debug for HttpHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpHandler").finish_non_exhaustive()
    }
}

impl HttpHandler {
    /// `pool_threads` idle connections are kept, one per pool thread.
    pub fn new(url: String, connect_timeout: Duration, pool_threads: usize) -> HttpHandler {
        let agent = ureq::AgentBuilder::new()
            .redirects(0)
            .timeout_connect(connect_timeout)
            .max_idle_connections(pool_threads)
            .max_idle_connections_per_host(pool_threads)
            .user_agent(concat!("flagshed/", env!("CARGO_PKG_VERSION")))
            .build();
        HttpHandler { url, agent }
    }
}

impl Handler for HttpHandler {
    fn handle(&self, job: &Job<'_>) -> Result<(), HandlerError> {
        let now = now_ms();
        let mut request = self
            .agent
            .post(&self.url)
            .set(
                "Content-Type",
                job.properties
                    .content_type()
                    .as_deref()
                    .filter(|t| is_header_safe(t))
                    .unwrap_or("application/octet-stream"),
            )
            .set("X-Flagshed-Job-Id", &header_value(job.id.unwrap_or("")))
            .set("X-Flagshed-Job-Type", &header_value(job.job_type));
        if let Some(deadline) = job.deadline_ms {
            request = request
                .set("X-Flagshed-Deadline-Ms", &deadline.to_string())
                .set(
                    "X-Flagshed-Time-Left-Ms",
                    &deadline.saturating_sub(now).to_string(),
                );
        }
        if let Some(left) = job.time_to_stop(now) {
            if left.is_zero() {
                return Err(HandlerError::TimedOut);
            }
            request = request.timeout(left);
        }
        match request.send_bytes(job.body) {
            Ok(response) => {
                let status = response.status();
                let location = response.header("Location").map(header_value);
                drain(response);
                match status {
                    200..=299 => Ok(()),
                    300..=399 => Err(HandlerError::Failed(format!(
                        "HTTP {status} redirect to {}; redirects are not followed, set handler.url to the final address",
                        location.as_deref().unwrap_or("(no Location)")
                    ))),
                    _ => Err(HandlerError::Failed(format!("HTTP {status}"))),
                }
            }
            Err(ureq::Error::Status(status, response)) => {
                drain(response);
                match status {
                    429 | 503 => Err(HandlerError::Retry(format!("HTTP {status}"))),
                    _ => Err(HandlerError::Failed(format!("HTTP {status}"))),
                }
            }
            Err(ureq::Error::Transport(e)) => {
                if job.stop_at_ms.is_some_and(|at| now_ms() >= at) {
                    return Err(HandlerError::TimedOut);
                }
                let mut why = e.kind().to_string();
                if let Some(message) = e.message() {
                    why = format!("{why}: {message}");
                }
                if let Some(source) = std::error::Error::source(&e) {
                    why = format!("{why}: {source}");
                }
                Err(HandlerError::Failed(why))
            }
        }
    }
}

/// Reads the rest of the response so its connection can serve the next job.
fn drain(response: ureq::Response) {
    let _ = std::io::copy(
        &mut response.into_reader().take(RESPONSE_DRAIN_BYTES),
        &mut std::io::sink(),
    );
}

fn is_header_safe(value: &str) -> bool {
    value
        .bytes()
        .all(|b| b == b'\t' || (0x20..0x7f).contains(&b))
}

/// A header value that HTTP can carry: bytes outside printable ASCII are percent-encoded.
fn header_value(value: &str) -> String {
    if is_header_safe(value) && !value.contains('%') {
        return value.to_owned();
    }
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_are_printable_ascii() {
        assert_eq!(header_value("job-1"), "job-1");
        assert_eq!(header_value("a\nb%é"), "a%0Ab%25%C3%A9");
    }
}
