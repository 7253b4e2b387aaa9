//! A tiny HTTP proxy on 127.0.0.1, for tests of LaunchDarkly connections through a proxy.
//!
//! It speaks the two forms a client uses: `CONNECT host:port` (answered `200 Connection
//! established`, then bytes are copied both ways, as for `https://` URLs) and absolute-form
//! requests such as `GET http://host:port/all` (what ureq sends for `http://` URLs), which it
//! forwards in origin form (`GET /all`) over one upstream connection per client connection,
//! dropping the `Proxy-*` headers, and whose answers it copies back untouched. It records
//! every request (method, target, path, `Proxy-Authorization`) and never asks for
//! credentials itself. Only std networking and a thread or two per connection.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// One request the proxy received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proxied {
    /// `CONNECT`, or the forwarded request's method (`GET`, `POST`).
    pub method: String,
    /// `host:port` the client asked for.
    pub target: String,
    /// The forwarded request's path (and query); empty for `CONNECT`.
    pub path: String,
    /// The `Proxy-Authorization` header as sent, if it was.
    pub proxy_authorization: Option<String>,
}

struct Shared {
    requests: Mutex<Vec<Proxied>>,
    arrived: Condvar,
    connections: AtomicUsize,
    stopping: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Vec<Proxied>> {
        self.requests.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, request: Proxied) {
        self.lock().push(request);
        self.arrived.notify_all();
    }
}

/// The running proxy; it stops accepting when dropped (open tunnels end with their peers).
pub struct ConnectProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl ConnectProxy {
    /// Starts the proxy on a free port.
    pub fn start() -> ConnectProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("local address");
        let shared = Arc::new(Shared {
            requests: Mutex::new(Vec::new()),
            arrived: Condvar::new(),
            connections: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
        });
        super::accept::spawn(
            listener,
            "proxy",
            Arc::clone(&shared),
            |s| s.stopping.load(Ordering::Relaxed),
            |conn, s| {
                s.connections.fetch_add(1, Ordering::Relaxed);
                serve(conn, s);
            },
        );
        ConnectProxy { addr, shared }
    }

    /// `http://127.0.0.1:port`, for `https_proxy` and friends.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://user:password@127.0.0.1:port`.
    pub fn url_with_credentials(&self, user: &str, password: &str) -> String {
        format!("http://{user}:{password}@{}", self.addr)
    }

    /// `127.0.0.1:port`, as the daemon's log line names the proxy.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// Every request so far, in order of arrival.
    pub fn requests(&self) -> Vec<Proxied> {
        self.shared.lock().clone()
    }

    /// How many connections the proxy has accepted, requests or not.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Waits until a request satisfying `want` has arrived; returns it, or `None` on timeout.
    pub fn wait_for(&self, timeout: Duration, want: impl Fn(&Proxied) -> bool) -> Option<Proxied> {
        let deadline = Instant::now() + timeout;
        let mut requests = self.shared.lock();
        loop {
            if let Some(found) = requests.iter().find(|r| want(r)) {
                return Some(found.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            requests = self
                .shared
                .arrived
                .wait_timeout(requests, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

/// A request line and its headers.
struct Head {
    method: String,
    target: String,
    version: String,
    /// Names as sent.
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads a request line and headers; `None` if the client went away or sent nonsense.
fn read_head(reader: &mut impl BufRead) -> Option<Head> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut words = line.split_whitespace();
    let method = words.next()?.to_owned();
    let target = words.next()?.to_owned();
    let version = words.next().unwrap_or("HTTP/1.1").to_owned();
    let mut headers = Vec::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let trimmed = line.trim_end_matches(['\r', '\n']);
        if trimmed.is_empty() {
            break;
        }
        let (name, value) = trimmed.split_once(':')?;
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    Some(Head {
        method,
        target,
        version,
        headers,
    })
}

fn serve(client: TcpStream, shared: &Shared) {
    let Ok(read_half) = client.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let Some(head) = read_head(&mut reader) else {
        return;
    };
    if head.method.eq_ignore_ascii_case("CONNECT") {
        tunnel(head, reader, client, shared);
    } else {
        forward(head, reader, client, shared);
    }
}

/// `CONNECT host:port`: connect, say so, then copy both ways until either side ends.
fn tunnel(head: Head, reader: BufReader<TcpStream>, mut client: TcpStream, shared: &Shared) {
    shared.record(Proxied {
        method: head.method.clone(),
        target: head.target.clone(),
        path: String::new(),
        proxy_authorization: head.header("proxy-authorization").map(str::to_owned),
    });
    let Ok(upstream) = TcpStream::connect(&head.target) else {
        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n");
        return;
    };
    if client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .is_err()
    {
        return;
    }
    // The reader may already hold bytes the client sent after the request: copy from it.
    pipe(reader, client, upstream);
}

/// Absolute-form requests: each is sent on in origin form over one upstream connection; the
/// answers flow back as they come.
fn forward(first: Head, mut reader: BufReader<TcpStream>, mut client: TcpStream, shared: &Shared) {
    let Some((authority, _)) = split_absolute(&first.target) else {
        let _ = client.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        return;
    };
    let Ok(upstream) = TcpStream::connect(authority) else {
        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n");
        return;
    };
    let (Ok(mut upstream_write), Ok(client_write)) = (upstream.try_clone(), client.try_clone())
    else {
        return;
    };
    let back = std::thread::spawn(move || copy_and_close(upstream, client_write));
    let mut next = Some(first);
    while let Some(head) = next.take().or_else(|| read_head(&mut reader)) {
        let Some((target, path)) = split_absolute(&head.target) else {
            break;
        };
        shared.record(Proxied {
            method: head.method.clone(),
            target: target.to_owned(),
            path: path.to_owned(),
            proxy_authorization: head.header("proxy-authorization").map(str::to_owned),
        });
        let mut out = format!("{} {path} {}\r\n", head.method, head.version);
        for (name, value) in &head.headers {
            if !name.to_ascii_lowercase().starts_with("proxy-") {
                out.push_str(&format!("{name}: {value}\r\n"));
            }
        }
        out.push_str("\r\n");
        if upstream_write.write_all(out.as_bytes()).is_err()
            || copy_body(&head, &mut reader, &mut upstream_write).is_err()
        {
            break;
        }
    }
    let _ = upstream_write.shutdown(Shutdown::Write);
    let _ = back.join();
}

/// `http://host:port/path?query` as (`host:port`, `/path?query`); the fake servers' URLs
/// always name the port.
fn split_absolute(target: &str) -> Option<(&str, &str)> {
    let rest = target.strip_prefix("http://")?;
    let (authority, path) = match rest.find('/') {
        Some(slash) => rest.split_at(slash),
        None => (rest, "/"),
    };
    (!authority.is_empty() && authority.contains(':')).then_some((authority, path))
}

/// Copies the request body `head` announces: `Content-Length` bytes, chunks, or nothing.
fn copy_body(head: &Head, reader: &mut impl BufRead, out: &mut impl Write) -> std::io::Result<()> {
    let chunked = head
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if !chunked {
        let length: u64 = head
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        std::io::copy(&mut reader.by_ref().take(length), out)?;
        return Ok(());
    }
    let mut line = String::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        out.write_all(line.as_bytes())?;
        let size_text = line.trim().split(';').next().unwrap_or_default();
        let size = u64::from_str_radix(size_text, 16)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        if size == 0 {
            // Trailers, then the empty line that ends the body.
            loop {
                line.clear();
                if reader.read_line(&mut line)? == 0 {
                    return Ok(());
                }
                out.write_all(line.as_bytes())?;
                if line.trim().is_empty() {
                    return Ok(());
                }
            }
        }
        // The chunk and its CRLF.
        std::io::copy(&mut reader.by_ref().take(size + 2), out)?;
    }
}

/// Copies both ways until each side has ended.
fn pipe(from_client: BufReader<TcpStream>, client: TcpStream, upstream: TcpStream) {
    let Ok(upstream_read) = upstream.try_clone() else {
        return;
    };
    let back = std::thread::spawn(move || copy_and_close(upstream_read, client));
    copy_and_close(from_client, upstream);
    let _ = back.join();
}

/// Copies `from` into `to`, then tells `to`'s peer nothing more is coming.
fn copy_and_close(mut from: impl Read, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}
