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
//!
//! No wait outlasts the job's stop time: the name lookup runs on a thread the pool thread
//! waits for no longer than that, the TCP connection attempt is bounded by
//! `connect_timeout_ms` or the time left, whichever is shorter, and the TLS handshake and the
//! request by the time left. ureq 2 bounds a connection attempt by its agent's connect
//! timeout alone, whatever the request's deadline, so a job with less time left than
//! `connect_timeout_ms` is sent through a second agent whose attempts last
//! [`SHORT_CONNECT_ATTEMPT`], made again while time is left: its connection attempt ends
//! within that of the stop time. (Nothing is sent before a connection is made, so trying
//! again cannot send a job twice.)
//!
//! A connection refused or reset before any response, a name that does not resolve, or a
//! connection attempt that times out before the job's stop time means the service is not
//! there: the job is [`HandlerError::Unavailable`] (nothing was answered), and
//! [`Handler::probe`] is a TCP connection attempt to the service's address.

use super::{Handler, HandlerError, Job};
use crate::clock::now_ms;
use std::cell::Cell;
use std::io::{self, Read};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// How much of a response body is read (and discarded) so the connection can be reused.
const RESPONSE_DRAIN_BYTES: u64 = 1024 * 1024;

/// One connection attempt of a job with less time left than `connect_timeout_ms`: how far
/// past its stop time such an attempt may end.
const SHORT_CONNECT_ATTEMPT: Duration = Duration::from_millis(100);

/// Longest wait for one probe's connection attempt, whatever `connect_timeout_ms` says: a
/// service that takes longer to accept is not ready for jobs.
const PROBE_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

thread_local! {
    /// When the connection attempt of the request this pool thread is sending must be over:
    /// the name lookup (which ureq does not bound) waits no later than this.
    static CONNECT_BY: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// POSTs each job to `url`.
pub struct HttpHandler {
    url: String,
    /// Connects within `connect_timeout`: for jobs with at least that much time left.
    agent: ureq::Agent,
    /// Connects in attempts of [`SHORT_CONNECT_ATTEMPT`]: for jobs with less time left than
    /// `connect_timeout`.
    short_agent: ureq::Agent,
    connect_timeout: Duration,
    /// Host and port of `url`, for the probe.
    service: Option<(String, u16)>,
}

impl std::fmt::Debug for HttpHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpHandler").finish_non_exhaustive()
    }
}

impl HttpHandler {
    /// `pool_threads` idle connections are kept, one per pool thread.
    pub fn new(url: String, connect_timeout: Duration, pool_threads: usize) -> HttpHandler {
        let builder = || {
            ureq::AgentBuilder::new()
                .redirects(0)
                .resolver(resolve_in_time)
                .max_idle_connections(pool_threads)
                .max_idle_connections_per_host(pool_threads)
                .user_agent(concat!("flagshed/", env!("CARGO_PKG_VERSION")))
        };
        let service = url::Url::parse(&url).ok().and_then(|u| {
            Some((
                u.host_str()?.trim_matches(['[', ']']).to_owned(),
                u.port_or_known_default()?,
            ))
        });
        HttpHandler {
            url,
            agent: builder().timeout_connect(connect_timeout).build(),
            short_agent: builder()
                .timeout_connect(SHORT_CONNECT_ATTEMPT.min(connect_timeout))
                .build(),
            connect_timeout,
            service,
        }
    }

    /// The request for a job with `left` until it must stop, and whether its connection
    /// attempt is made in short steps (see the module's documentation). It is sent while a
    /// [`ConnectWithin`] lives, with its timeout set just before each attempt.
    fn request(&self, left: Option<Duration>, headers: &[(&str, &str)]) -> (ureq::Request, bool) {
        let short = left.is_some_and(|left| left < self.connect_timeout);
        let agent = if short {
            &self.short_agent
        } else {
            &self.agent
        };
        let mut request = agent.post(&self.url);
        for (name, value) in headers {
            request = request.set(name, value);
        }
        (request, short)
    }
}

/// Whether a request failed because its connection attempt ran out of time.
fn connect_timed_out(result: &Result<ureq::Response, ureq::Error>) -> bool {
    match result {
        Err(ureq::Error::Transport(e)) => {
            e.kind() == ureq::ErrorKind::ConnectionFailed
                && io_cause(e).is_some_and(|io| io.kind() == io::ErrorKind::TimedOut)
        }
        _ => false,
    }
}

/// While it lives, the name lookups of this pool thread's requests end within the time it was
/// made with ([`CONNECT_BY`]).
struct ConnectWithin;

impl ConnectWithin {
    fn new(within: Duration) -> ConnectWithin {
        CONNECT_BY.with(|by| by.set(Instant::now().checked_add(within)));
        ConnectWithin
    }
}

impl Drop for ConnectWithin {
    fn drop(&mut self) {
        CONNECT_BY.with(|by| by.set(None));
    }
}

/// The name lookup, bounded by [`CONNECT_BY`]: `getaddrinfo(3)` has no timeout of its own, so
/// it runs on a thread of its own that is left to finish alone if the time runs out. An
/// address given as numbers needs no lookup.
fn resolve_in_time(netloc: &str) -> io::Result<Vec<SocketAddr>> {
    if let Ok(address) = netloc.parse::<SocketAddr>() {
        return Ok(vec![address]);
    }
    let Some(by) = CONNECT_BY.with(Cell::get) else {
        return netloc.to_socket_addrs().map(Iterator::collect);
    };
    let (tx, rx) = crossbeam_channel::bounded(1);
    let name = netloc.to_owned();
    std::thread::Builder::new()
        .name("http-lookup".into())
        .spawn(move || {
            let _ = tx.send(name.to_socket_addrs().map(Iterator::collect));
        })?;
    rx.recv_timeout(by.saturating_duration_since(Instant::now()))
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the name lookup outlasted the connection's time",
            ))
        })
}

/// The I/O error under a ureq transport error, if there is one.
fn io_cause(e: &ureq::Transport) -> Option<&io::Error> {
    std::error::Error::source(e)?.downcast_ref::<io::Error>()
}

/// Whether a transport error says the service is not there, rather than something about
/// this request: nothing was answered, and every job would meet the same.
fn service_absent(e: &ureq::Transport) -> bool {
    let io_kind = io_cause(e).map(io::Error::kind);
    match e.kind() {
        ureq::ErrorKind::Dns => true,
        ureq::ErrorKind::ConnectionFailed => matches!(
            io_kind,
            Some(
                io::ErrorKind::ConnectionRefused
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::TimedOut
                    | io::ErrorKind::AddrNotAvailable
                    | io::ErrorKind::HostUnreachable
                    | io::ErrorKind::NetworkUnreachable
            )
        ),
        // A connection the service closed before it answered (a restart drops its
        // keep-alive connections): reset, aborted, or the stream ending before a status line.
        ureq::ErrorKind::Io | ureq::ErrorKind::BadStatus => matches!(
            io_kind,
            Some(
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
            )
        ),
        _ => false,
    }
}

impl Handler for HttpHandler {
    fn handle(&self, job: &Job<'_>) -> Result<(), HandlerError> {
        let now = now_ms();
        if job.time_to_stop(now).is_some_and(|left| left.is_zero()) {
            return Err(HandlerError::TimedOut);
        }
        let id = header_value(job.id.unwrap_or(""));
        let job_type = header_value(job.job_type);
        let (deadline, time_left) = match job.deadline_ms {
            Some(deadline) => (
                deadline.to_string(),
                deadline.saturating_sub(now).to_string(),
            ),
            None => (String::new(), String::new()),
        };
        let mut headers = vec![
            (
                "Content-Type",
                job.properties
                    .content_type()
                    .as_deref()
                    .filter(|t| is_header_safe(t))
                    .unwrap_or("application/octet-stream"),
            ),
            ("X-Flagshed-Job-Id", id.as_str()),
            ("X-Flagshed-Job-Type", job_type.as_str()),
        ];
        if job.deadline_ms.is_some() {
            headers.push(("X-Flagshed-Deadline-Ms", deadline.as_str()));
            headers.push(("X-Flagshed-Time-Left-Ms", time_left.as_str()));
        }
        let left = job.time_to_stop(now);
        let stop_at = left.map(|left| Instant::now() + left);
        let (request, short) = self.request(left, &headers);
        let connect_within = left.map_or(self.connect_timeout, |l| l.min(self.connect_timeout));
        let _lookups = ConnectWithin::new(connect_within);
        let result = loop {
            let mut attempt = request.clone();
            if let Some(stop_at) = stop_at {
                let left = stop_at.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(HandlerError::TimedOut);
                }
                attempt = attempt.timeout(left);
            }
            let result = attempt.send_bytes(job.body);
            if !(short && connect_timed_out(&result)) {
                break result;
            }
        };
        match result {
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
                if service_absent(&e) {
                    Err(HandlerError::Unavailable(why))
                } else {
                    Err(HandlerError::Failed(why))
                }
            }
        }
    }

    /// A TCP connection to the service's address, within `connect_timeout_ms` (at most 2 s).
    fn probe(&self) -> Result<(), HandlerError> {
        let Some((host, port)) = &self.service else {
            return Ok(());
        };
        let unavailable =
            |why: String| HandlerError::Unavailable(format!("Connection Failed: {why}"));
        let addresses: Vec<SocketAddr> = (host.as_str(), *port)
            .to_socket_addrs()
            .map_err(|e| unavailable(e.to_string()))?
            .collect();
        let within = self.connect_timeout.min(PROBE_CONNECT_TIMEOUT);
        let mut last = None;
        for address in addresses {
            match TcpStream::connect_timeout(&address, within) {
                Ok(_) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        Err(unavailable(last.map_or_else(
            || "no address for the service".to_owned(),
            |e| e.to_string(),
        )))
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
