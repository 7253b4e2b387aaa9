//! The least an HTTP service can be, for measuring what calls to it cost: HTTP/1.1 on a local
//! port, one thread per connection, keep-alive, and an empty answer (200 with
//! `Content-Length: 0`, or 204) to every request, whose body is read and discarded.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

/// A running server; stops accepting when dropped (open connections end with their clients).
pub struct HttpServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicU64>,
    accept: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Listens on 127.0.0.1 (a free port) and answers every request with `status` (200 or
    /// 204).
    pub fn start(status: u16) -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a local port");
        let addr = listener.local_addr().expect("local address");
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU64::new(0));
        let response: Arc<[u8]> = match status {
            204 => b"HTTP/1.1 204 No Content\r\n\r\n".as_slice().into(),
            _ => b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
                .as_slice()
                .into(),
        };
        let accept = {
            let (stop, requests) = (Arc::clone(&stop), Arc::clone(&requests));
            std::thread::Builder::new()
                .name("httpd-accept".into())
                .spawn(move || {
                    for stream in listener.incoming() {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let Ok(stream) = stream else { continue };
                        let (requests, response) = (Arc::clone(&requests), Arc::clone(&response));
                        let _ = std::thread::Builder::new()
                            .name("httpd-conn".into())
                            .spawn(move || serve(stream, &response, &requests));
                    }
                })
                .expect("start the accept thread")
        };
        HttpServer {
            addr,
            stop,
            requests,
            accept: Some(accept),
        }
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(thread) = self.accept.take() {
            let _ = thread.join();
        }
    }
}

/// Answers requests on one connection until the client closes it (or asks to).
fn serve(stream: TcpStream, response: &[u8], requests: &AtomicU64) {
    let _ = stream.set_nodelay(true);
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if line.trim().is_empty() => continue,
            Ok(_) => {}
        }
        let mut content_length = 0u64;
        let mut close = line.trim_end().ends_with("HTTP/1.0");
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                let value = value.trim();
                if name.eq_ignore_ascii_case("content-length") {
                    content_length = value.parse().unwrap_or(0);
                } else if name.eq_ignore_ascii_case("connection") {
                    close = value.eq_ignore_ascii_case("close");
                }
            }
        }
        if std::io::copy(
            &mut (&mut reader).take(content_length),
            &mut std::io::sink(),
        )
        .is_err()
        {
            return;
        }
        if writer.write_all(response).is_err() {
            return;
        }
        requests.fetch_add(1, Ordering::Relaxed);
        if close {
            return;
        }
    }
}
