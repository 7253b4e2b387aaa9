//! The `/metrics` endpoint: tiny_http's blocking server, answered on one thread of ours.
//!
//! tiny_http accepts connections on a thread of its own and reads requests on a small pool of
//! its own; this module's `metrics` thread takes the requests one at a time and renders each
//! scrape from the atomics, so a scrape never touches a daemon's owner threads. The endpoint
//! has no TLS and no authentication: listen on a loopback or private address.
//!
//! tiny_http's accept thread ends at the first error `accept(2)` returns (out of file
//! descriptors, say), which would leave the endpoint dead while the daemon runs on; the
//! `metrics` thread then listens again on the same address, once a second until it can.

use super::Scrape;
use super::process;
use super::text::{CONTENT_TYPE, Text};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;
use tiny_http::{Header, Method, Request, Response, Server};

/// How often the `metrics` thread looks at the stop flag, and waits between attempts to
/// listen again.
const POLL: Duration = Duration::from_millis(250);

/// A running endpoint; dropping it stops the `metrics` thread.
pub struct MetricsServer {
    address: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Listens on `address` and serves `source` on `GET /metrics`. Fails only if the address
    /// cannot be listened on (in use, not this host's, a privileged port).
    pub fn start(
        address: SocketAddr,
        source: Arc<dyn Scrape>,
    ) -> Result<MetricsServer, std::io::Error> {
        let server = listen(address)?;
        // With port 0 the kernel picks one; listening again must use the same.
        let address = match server.server_addr().to_ip() {
            Some(bound) => bound,
            None => address,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || serve(server, address, source.as_ref(), &stopped))?;
        Ok(MetricsServer {
            address,
            stop,
            thread: Some(thread),
        })
    }

    /// The address listened on (with the port the kernel chose, for a port of 0).
    pub fn address(&self) -> SocketAddr {
        self.address
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Bound here rather than by tiny_http, for the `io::Error` (tiny_http boxes it).
fn listen(address: SocketAddr) -> Result<Server, std::io::Error> {
    let listener = TcpListener::bind(address)?;
    Server::from_listener(listener, None).map_err(std::io::Error::other)
}

/// Answers requests until told to stop, listening again whenever tiny_http's accept thread
/// has ended.
fn serve(mut server: Server, address: SocketAddr, source: &dyn Scrape, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match server.recv_timeout(POLL) {
            Ok(Some(request)) => answer(request, source),
            Ok(None) => {}
            Err(e) => {
                log::warn!("metrics endpoint: accepting connections failed ({e}); listening again");
                drop(server);
                server = loop {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(POLL * 4);
                    match listen(address) {
                        Ok(server) => break server,
                        Err(e) => log::debug!("metrics endpoint: cannot listen again yet: {e}"),
                    }
                };
                log::info!("metrics endpoint listening again on {address}");
            }
        }
    }
}

fn answer(request: Request, source: &dyn Scrape) {
    let path = request.url().split('?').next().unwrap_or("");
    let response = match (request.method(), path) {
        (Method::Get | Method::Head, "/metrics") => {
            let mut text = Text::new();
            source.render(&mut text);
            process::render(&mut text);
            Response::from_string(text.into_string())
                .with_header(header("Content-Type", CONTENT_TYPE))
        }
        (_, "/metrics") => Response::from_string("only GET and HEAD\n")
            .with_status_code(405)
            .with_header(header("Allow", "GET, HEAD")),
        _ => Response::from_string("not found; metrics are at /metrics\n").with_status_code(404),
    };
    if let Err(e) = request.respond(response) {
        log::debug!("metrics response not sent: {e}");
    }
}

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("a valid static header")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::text::Kind;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    struct Fixed;

    impl Scrape for Fixed {
        fn render(&self, text: &mut Text) {
            text.family("fixed_total", Kind::Counter, "A fixed count.");
            text.int("fixed_total", &[], 7);
        }
    }

    fn get(address: SocketAddr, method: &str, path: &str) -> String {
        let mut stream = TcpStream::connect(address).expect("connect");
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .expect("send");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("read");
        response
    }

    #[test]
    fn metrics_are_served_and_other_paths_are_not_found() {
        let server = MetricsServer::start("127.0.0.1:0".parse().unwrap(), Arc::new(Fixed))
            .expect("listen on a free port");
        let response = get(server.address(), "GET", "/metrics?x=1");
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(
            response.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8"),
            "{response}"
        );
        assert!(
            response.contains("\r\n\r\n# HELP fixed_total"),
            "{response}"
        );
        assert!(response.contains("\nfixed_total 7\n"), "{response}");
        assert!(response.contains("\nprocess_open_fds "), "{response}");
        let response = get(server.address(), "GET", "/");
        assert!(response.starts_with("HTTP/1.1 404"), "{response}");
        let response = get(server.address(), "POST", "/metrics");
        assert!(response.starts_with("HTTP/1.1 405"), "{response}");
        drop(server);
    }

    #[test]
    fn an_address_in_use_is_an_error() {
        let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
        let err = MetricsServer::start(taken.local_addr().unwrap(), Arc::new(Fixed))
            .err()
            .expect("the address is taken");
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    }
}
