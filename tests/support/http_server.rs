//! A small HTTP/1.1 server for the http handler's tests: keep-alive connections, a reply chosen
//! per request by the test, and a record of every request and connection it saw.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One request as the server received it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What to answer.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    /// Waited before answering.
    pub delay: Duration,
    pub headers: Vec<(String, String)>,
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            delay: Duration::ZERO,
            headers: Vec::new(),
        }
    }
}

type Responder = dyn Fn(&Request) -> Reply + Send + Sync;

/// A server on a loopback port, stopped when dropped: it stops listening and closes every
/// connection it accepted, as a service that exits does.
pub struct HttpServer {
    port: u16,
    requests: Arc<Mutex<Vec<Request>>>,
    connections: Arc<AtomicUsize>,
    stopped: Arc<AtomicBool>,
    /// Every connection accepted, to close them all at drop.
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl HttpServer {
    /// A server on a free port.
    pub fn start(reply: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> HttpServer {
        HttpServer::start_on(0, reply)
    }

    /// A server on `port` (0: a free one), e.g. the port of a server stopped earlier, as a
    /// restarted service comes back on its address.
    pub fn start_on(
        port: u16,
        reply: impl Fn(&Request) -> Reply + Send + Sync + 'static,
    ) -> HttpServer {
        // A server stopped a moment ago lets go of its port when its accept thread sees the
        // stop, which may not have happened yet: wait for the port rather than fail.
        let started = std::time::Instant::now();
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", port)) {
                Ok(listener) => break listener,
                Err(e)
                    if e.kind() == std::io::ErrorKind::AddrInUse
                        && port != 0
                        && started.elapsed() < std::time::Duration::from_secs(10) =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => panic!("bind a loopback port: {e}"),
            }
        };
        let port = listener.local_addr().expect("local address").port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let stopped = Arc::new(AtomicBool::new(false));
        let open = Arc::new(Mutex::new(Vec::new()));
        let reply: Arc<Responder> = Arc::new(reply);
        let (seen, count, stop, accepted) = (
            Arc::clone(&requests),
            Arc::clone(&connections),
            Arc::clone(&stopped),
            Arc::clone(&open),
        );
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                if let Ok(copy) = stream.try_clone() {
                    accepted.lock().expect("connections lock").push(copy);
                }
                let (seen, reply) = (Arc::clone(&seen), Arc::clone(&reply));
                std::thread::spawn(move || serve(stream, &seen, reply.as_ref()));
            }
        });
        HttpServer {
            port,
            requests,
            connections,
            stopped,
            open,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().expect("requests lock").clone()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        for connection in self.open.lock().expect("connections lock").drain(..) {
            let _ = connection.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Answers requests on one connection until the client closes it.
fn serve(stream: TcpStream, seen: &Mutex<Vec<Request>>, reply: &Responder) {
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        match reader.read_line(&mut request_line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut parts = request_line.split_whitespace();
        let method = parts.next().unwrap_or("").to_owned();
        let path = parts.next().unwrap_or("").to_owned();
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
            }
        }
        let length: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let request = Request {
            method,
            path,
            headers,
            body,
        };
        let answer = reply(&request);
        seen.lock().expect("requests lock").push(request);
        std::thread::sleep(answer.delay);
        let mut head = format!("HTTP/1.1 {} Reply\r\nContent-Length: 0\r\n", answer.status);
        for (k, v) in &answer.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        if out.write_all(head.as_bytes()).is_err() {
            return;
        }
    }
}

/// A listener whose accept queue is full: it never accepts, and its one queued connection is
/// taken, so the kernel drops every new connection attempt (SYN) and the client waits.
/// Returns it with the port and the connections that fill it, which must stay open.
pub fn full_listener() -> (std::net::TcpListener, u16, Vec<std::net::TcpStream>) {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket calls on a descriptor this function owns; the address is a valid
    // sockaddr_in for the duration of each call.
    let listener = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let mut address: libc::sockaddr_in = std::mem::zeroed();
        address.sin_family = libc::AF_INET as libc::sa_family_t;
        address.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
        let size = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let rc = libc::bind(fd, (&raw const address).cast(), size);
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        // A backlog of 0: the queue holds one connection.
        assert_eq!(libc::listen(fd, 0), 0, "listen");
        std::net::TcpListener::from_raw_fd(fd)
    };
    let address = listener.local_addr().expect("local address");
    let mut filling = Vec::new();
    loop {
        match std::net::TcpStream::connect_timeout(&address, std::time::Duration::from_millis(300))
        {
            Ok(stream) => filling.push(stream),
            Err(_) => break,
        }
        assert!(filling.len() < 64, "the accept queue never filled");
    }
    (listener, address.port(), filling)
}
