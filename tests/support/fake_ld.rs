//! A fake LaunchDarkly service on 127.0.0.1, speaking the real protocol over plain HTTP/1.1:
//! `GET /all` streams Server-Sent Events (chunked), `GET /sdk/latest-all` answers the data set
//! as JSON with an `ETag` (and `304` to a matching `If-None-Match`), and `POST /bulk` takes an
//! analytics events payload (its body read by `Content-Length` or chunked) and answers `202`.
//!
//! Tests drive it: set the data set, push `put`/`patch`/`delete`/heartbeats or any raw text to
//! every open stream, drop the streams, make the next requests (posts included) fail with a
//! status; and they inspect it: every request's method, path, headers, body, arrival time and
//! whether it was failed on purpose, and the events payloads decoded. It uses only std networking, a
//! thread per connection, so it starts in microseconds and needs nothing installed.
#![allow(dead_code)]

use serde_json::{Map, Value, json};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The largest request body the fake reads; a client sending more is broken.
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// One request as the fake received it.
#[derive(Clone, Debug)]
pub struct Request {
    /// `GET`, `POST`, …
    pub method: String,
    /// The path without the query string.
    pub path: String,
    /// Header names lower-cased, values as sent.
    pub headers: Vec<(String, String)>,
    /// The body, decoded from `Content-Length` or chunked framing; empty if there was none.
    pub body: Vec<u8>,
    /// When the request's headers had arrived.
    pub at: Instant,
    /// The status it was answered with instead of being served, when [`FakeLd::fail_next`]
    /// asked for one.
    pub failed_with: Option<u16>,
}

impl Request {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON; panics (naming the path) if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} {} body is not JSON ({e}): {}",
                self.method,
                self.path,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

struct Stream {
    id: u64,
    socket: TcpStream,
}

#[derive(Default)]
struct State {
    flags: Map<String, Value>,
    segments: Map<String, Value>,
    /// Bumped on every change to the data set; the ETag is derived from it.
    data_version: u64,
    requests: Vec<Request>,
    streams: Vec<Stream>,
    next_stream_id: u64,
    /// Statuses to answer the next requests with, instead of serving them.
    failures: VecDeque<u16>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    stopping: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The running fake; it stops (and cuts its streams) when dropped.
pub struct FakeLd {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl FakeLd {
    /// Starts the fake on a free port with an empty data set.
    pub fn start() -> FakeLd {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fake LaunchDarkly");
        let addr = listener.local_addr().expect("local address");
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            stopping: AtomicBool::new(false),
        });
        super::accept::spawn(
            listener,
            "fake-ld",
            Arc::clone(&shared),
            |s| s.stopping.load(Ordering::Relaxed),
            serve,
        );
        FakeLd { addr, shared }
    }

    /// The base URI to configure as both `stream_uri` and `base_uri`.
    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Adds or replaces a flag in the data set, without telling open streams.
    pub fn set_flag(&self, flag: Value) {
        let mut state = self.shared.lock();
        let key = flag["key"].as_str().expect("flag has a key").to_owned();
        state.flags.insert(key, flag);
        state.data_version += 1;
    }

    /// Adds or replaces a segment in the data set, without telling open streams.
    pub fn set_segment(&self, segment: Value) {
        let mut state = self.shared.lock();
        let key = segment["key"]
            .as_str()
            .expect("segment has a key")
            .to_owned();
        state.segments.insert(key, segment);
        state.data_version += 1;
    }

    /// Empties the data set, without telling open streams.
    pub fn clear(&self) {
        let mut state = self.shared.lock();
        state.flags.clear();
        state.segments.clear();
        state.data_version += 1;
    }

    /// The `ETag` the polling endpoint currently sends.
    pub fn etag(&self) -> String {
        etag(&self.shared.lock())
    }

    /// Sends the whole data set as a `put` to every open stream.
    pub fn push_put(&self) {
        let mut state = self.shared.lock();
        let text = event("put", &put_body(&state).to_string());
        broadcast(&mut state, text.as_bytes());
    }

    /// Stores `flag` and sends it as a `patch` to every open stream.
    pub fn push_patch_flag(&self, flag: Value) {
        let mut state = self.shared.lock();
        let key = flag["key"].as_str().expect("flag has a key").to_owned();
        let body = json!({"path": format!("/flags/{key}"), "data": flag});
        state.flags.insert(key, flag);
        state.data_version += 1;
        broadcast(&mut state, event("patch", &body.to_string()).as_bytes());
    }

    /// Sends a flag `patch` to every open stream without storing it (a stale or replayed
    /// event, which LaunchDarkly may deliver out of order).
    pub fn push_patch_flag_only(&self, flag: Value) {
        let mut state = self.shared.lock();
        let key = flag["key"].as_str().expect("flag has a key").to_owned();
        let body = json!({"path": format!("/flags/{key}"), "data": flag});
        broadcast(&mut state, event("patch", &body.to_string()).as_bytes());
    }

    /// Removes a flag and sends a `delete` with `version` to every open stream.
    pub fn push_delete_flag(&self, key: &str, version: u64) {
        let mut state = self.shared.lock();
        state.flags.remove(key);
        state.data_version += 1;
        let body = json!({"path": format!("/flags/{key}"), "version": version});
        broadcast(&mut state, event("delete", &body.to_string()).as_bytes());
    }

    /// Sends a comment line, LaunchDarkly's heartbeat, to every open stream.
    pub fn push_heartbeat(&self) {
        let mut state = self.shared.lock();
        broadcast(&mut state, b":\n");
    }

    /// Sends `text` as it is to every open stream.
    pub fn push_raw(&self, text: &str) {
        let mut state = self.shared.lock();
        broadcast(&mut state, text.as_bytes());
    }

    /// Cuts every open stream, as a network failure or a server restart would.
    pub fn drop_streams(&self) {
        let mut state = self.shared.lock();
        for stream in state.streams.drain(..) {
            let _ = stream.socket.shutdown(Shutdown::Both);
        }
        self.shared.changed.notify_all();
    }

    /// Answers the next `n` requests (to any path, posts included: their body is read first)
    /// with `status` instead of serving them.
    pub fn fail_next(&self, n: usize, status: u16) {
        let mut state = self.shared.lock();
        state.failures.extend(std::iter::repeat_n(status, n));
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.lock().requests.clone()
    }

    /// The requests received so far for `path`, oldest first.
    pub fn requests_to(&self, path: &str) -> Vec<Request> {
        self.shared
            .lock()
            .requests
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    /// The events payloads accepted so far (posts to `/bulk` not failed on purpose), each
    /// decoded from its JSON array body, oldest first.
    pub fn bulk_payloads(&self) -> Vec<Vec<Value>> {
        self.shared
            .lock()
            .requests
            .iter()
            .filter(|r| is_accepted_bulk(r))
            .map(|r| match r.json() {
                Value::Array(events) => events,
                other => panic!("a bulk payload must be a JSON array, got {other}"),
            })
            .collect()
    }

    /// Waits until at least `n` events payloads have been accepted; false on timeout.
    pub fn wait_for_bulk_payloads(&self, n: usize, timeout: Duration) -> bool {
        self.wait(timeout, |s| {
            s.requests.iter().filter(|r| is_accepted_bulk(r)).count() >= n
        })
    }

    /// How many streams are open now.
    pub fn open_streams(&self) -> usize {
        self.shared.lock().streams.len()
    }

    /// Waits until at least `n` requests for `path` have arrived; false on timeout.
    pub fn wait_for_requests(&self, path: &str, n: usize, timeout: Duration) -> bool {
        self.wait(timeout, |s| {
            s.requests.iter().filter(|r| r.path == path).count() >= n
        })
    }

    /// Waits until at least `n` streams are open (each has had its initial `put`); false on
    /// timeout.
    pub fn wait_for_streams(&self, n: usize, timeout: Duration) -> bool {
        self.wait(timeout, |s| s.streams.len() >= n)
    }

    fn wait(&self, timeout: Duration, done: impl Fn(&State) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        while !done(&state) {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = match self.shared.changed.wait_timeout(state, deadline - now) {
                Ok((guard, _)) => guard,
                Err(e) => e.into_inner().0,
            };
        }
        true
    }
}

impl Drop for FakeLd {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        self.drop_streams();
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

/// A flag that is on and serves `value` to everyone: the simplest thing to evaluate.
pub fn number_flag(key: &str, version: u64, value: f64) -> Value {
    value_flag(key, version, json!(value))
}

/// A flag that is on and serves `value`, of any JSON type, to everyone.
pub fn value_flag(key: &str, version: u64, value: Value) -> Value {
    json!({
        "key": key, "version": version, "on": true,
        "variations": [value], "offVariation": 0, "fallthrough": {"variation": 0},
        "targets": [], "contextTargets": [], "rules": [], "prerequisites": [],
        "salt": format!("{key}-salt"), "trackEvents": false, "deleted": false
    })
}

fn is_accepted_bulk(request: &Request) -> bool {
    request.method == "POST" && request.path == "/bulk" && request.failed_with.is_none()
}

fn etag(state: &State) -> String {
    format!("\"fake-{}\"", state.data_version)
}

fn put_body(state: &State) -> Value {
    json!({"path": "/", "data": {"flags": state.flags, "segments": state.segments}})
}

fn all_data(state: &State) -> Value {
    json!({"flags": state.flags, "segments": state.segments})
}

fn event(name: &str, data: &str) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

/// Writes `bytes` as one HTTP chunk to every open stream, dropping those that fail.
fn broadcast(state: &mut State, bytes: &[u8]) {
    if bytes.is_empty() {
        return; // An empty chunk would end the response.
    }
    state
        .streams
        .retain_mut(|stream| write_chunk(&mut stream.socket, bytes).is_ok());
}

fn write_chunk(socket: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    let mut chunk = format!("{:x}\r\n", bytes.len()).into_bytes();
    chunk.extend_from_slice(bytes);
    chunk.extend_from_slice(b"\r\n");
    socket.write_all(&chunk)?;
    socket.flush()
}

/// Reads the request line, headers and body; `None` if the client went away first.
fn read_request(reader: &mut impl BufRead) -> Option<Request> {
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut words = line.split_whitespace();
    let method = words.next()?.to_owned();
    let target = words.next()?.to_owned();
    let path = target.split('?').next().unwrap_or_default().to_owned();
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
        if let Some((name, value)) = trimmed.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
    let at = Instant::now();
    let mut request = Request {
        method,
        path,
        headers,
        body: Vec::new(),
        at,
        failed_with: None,
    };
    request.body = read_body(reader, &request)?;
    Some(request)
}

/// Reads the body `request`'s headers announce: chunked, or `Content-Length` bytes, or none.
fn read_body(reader: &mut impl BufRead, request: &Request) -> Option<Vec<u8>> {
    let chunked = request
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        return read_chunked(reader);
    }
    let length: usize = match request.header("content-length") {
        Some(text) => text.parse().ok()?,
        None => 0,
    };
    if length > MAX_BODY_BYTES {
        return None;
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some(body)
}

/// Decodes a chunked body, trailers skipped.
fn read_chunked(reader: &mut impl BufRead) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        reader.read_line(&mut line).ok()?;
        let size_text = line.trim_end_matches(['\r', '\n']);
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).ok()?;
        if size == 0 {
            break;
        }
        if body.len() + size > MAX_BODY_BYTES {
            return None;
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..]).ok()?;
        let mut crlf = [0u8; 2];
        reader.read_exact(&mut crlf).ok()?;
    }
    loop {
        line.clear();
        if reader.read_line(&mut line).ok()? == 0 || line.trim_end_matches(['\r', '\n']).is_empty()
        {
            return Some(body);
        }
    }
}

fn respond(socket: &mut TcpStream, status: u16, headers: &[(&str, &str)], body: &[u8]) {
    let reason = match status {
        200 => "OK",
        202 => "Accepted",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    };
    let mut head = format!("HTTP/1.1 {status} {reason}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if status != 304 {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let _ = socket.write_all(head.as_bytes());
    if status != 304 {
        let _ = socket.write_all(body);
    }
    let _ = socket.flush();
}

fn serve(mut socket: TcpStream, shared: &Shared) {
    let _ = socket.set_write_timeout(Some(Duration::from_secs(5)));
    let Ok(read_half) = socket.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let Some(mut request) = read_request(&mut reader) else {
        return;
    };
    let mut state = shared.lock();
    if shared.stopping.load(Ordering::Relaxed) {
        return;
    }
    let method = request.method.clone();
    let path = request.path.clone();
    let if_none_match = request.header("if-none-match").map(str::to_owned);
    let failure = state.failures.pop_front();
    request.failed_with = failure;
    state.requests.push(request);
    shared.changed.notify_all();

    if let Some(status) = failure {
        drop(state);
        respond(
            &mut socket,
            status,
            &[("Content-Type", "text/plain")],
            b"no",
        );
        return;
    }
    match (method.as_str(), path.as_str()) {
        ("POST", "/bulk") => {
            drop(state);
            respond(&mut socket, 202, &[], b"");
        }
        (_, "/all") => {
            let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
                        Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n";
            let put = event("put", &put_body(&state).to_string());
            if socket.write_all(head.as_bytes()).is_err()
                || write_chunk(&mut socket, put.as_bytes()).is_err()
            {
                return;
            }
            let Ok(registered) = socket.try_clone() else {
                return;
            };
            let id = state.next_stream_id;
            state.next_stream_id += 1;
            state.streams.push(Stream {
                id,
                socket: registered,
            });
            shared.changed.notify_all();
            drop(state);
            // Hold the connection until the client closes it or the fake cuts it.
            let mut sink = [0u8; 256];
            while matches!(reader.read(&mut sink), Ok(n) if n > 0) {}
            let mut state = shared.lock();
            state.streams.retain(|s| s.id != id);
            shared.changed.notify_all();
        }
        (_, "/sdk/latest-all") => {
            let tag = etag(&state);
            if if_none_match.as_deref() == Some(tag.as_str()) {
                drop(state);
                respond(&mut socket, 304, &[("ETag", &tag)], b"");
            } else {
                let body = all_data(&state).to_string();
                drop(state);
                respond(
                    &mut socket,
                    200,
                    &[("Content-Type", "application/json"), ("ETag", &tag)],
                    body.as_bytes(),
                );
            }
        }
        _ => {
            drop(state);
            respond(
                &mut socket,
                404,
                &[("Content-Type", "text/plain")],
                b"not found",
            );
        }
    }
}

/// Starts a flag source with `settings`, values starting from their fallbacks, as a daemon
/// would.
pub fn start_flag_source(
    settings: flagshed::flag_source::SourceSettings,
) -> (
    flagshed::flag_source::FlagSource,
    std::sync::Arc<flagshed::flags::FlagValues>,
) {
    let values = std::sync::Arc::new(flagshed::flags::FlagValues::new(
        settings.flags.skip_rate_fallback,
        settings.flags.rate_fallback,
    ));
    let source = flagshed::flag_source::FlagSource::spawn(settings, std::sync::Arc::clone(&values))
        .expect("spawn the flag source");
    (source, values)
}
