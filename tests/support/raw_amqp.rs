//! A minimal AMQP 0-9-1 publisher over a plain `TcpStream`, for messages amiquip cannot build.
//!
//! amiquip's short strings and table keys are Rust `String`s, so it can only send UTF-8, but
//! the protocol (and RabbitMQ, which passes them through untouched) allows any bytes there. A
//! producer written with another client can therefore send a job whose `message_id`, header
//! key or string header value is not UTF-8; this module sends exactly such bytes, so a test can
//! see what the worker does with them.
//!
//! It speaks just enough of the protocol for that: handshake (PLAIN), one channel with
//! publisher confirms, `basic.publish` with hand-encoded properties, and a clean close. Every
//! read has a timeout, and a refusal from the broker comes back as an error with its text.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;

/// `basic` property flags, in the order the properties are written.
const FLAG_CONTENT_TYPE: u16 = 1 << 15;
const FLAG_HEADERS: u16 = 1 << 13;
const FLAG_MESSAGE_ID: u16 = 1 << 7;
const FLAG_TIMESTAMP: u16 = 1 << 6;
const FLAG_TYPE: u16 = 1 << 5;

/// How long any one read from the broker may take.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A header table under construction, every key and value as raw bytes.
#[derive(Clone, Debug, Default)]
pub struct RawTable {
    bytes: Vec<u8>,
}

impl RawTable {
    pub fn new() -> RawTable {
        RawTable::default()
    }

    /// Adds `key` with a value of AMQP type `kind` (`b'S'`, `b'l'`, ...) whose encoding,
    /// after the type byte, is `value`.
    pub fn entry(mut self, key: &[u8], kind: u8, value: &[u8]) -> RawTable {
        put_short_bytes(&mut self.bytes, key);
        self.bytes.push(kind);
        self.bytes.extend_from_slice(value);
        self
    }

    /// Adds a long string (`S`) holding `value`, UTF-8 or not.
    pub fn long_string(self, key: &[u8], value: &[u8]) -> RawTable {
        let mut encoded = (value.len() as u32).to_be_bytes().to_vec();
        encoded.extend_from_slice(value);
        self.entry(key, b'S', &encoded)
    }

    /// Adds a signed 64-bit integer (`l`).
    pub fn long_long_int(self, key: &[u8], value: i64) -> RawTable {
        self.entry(key, b'l', &value.to_be_bytes())
    }
}

/// One message's properties, each as the bytes that go on the wire.
#[derive(Clone, Debug, Default)]
pub struct RawMessage {
    pub content_type: Option<Vec<u8>>,
    pub headers: Option<RawTable>,
    pub message_id: Option<Vec<u8>>,
    pub timestamp: Option<u64>,
    pub kind: Option<Vec<u8>>,
    pub body: Vec<u8>,
}

impl RawMessage {
    /// The `basic` content header's property flags and list.
    fn encode_properties(&self, out: &mut Vec<u8>) {
        let mut flags = 0u16;
        let mut list = Vec::new();
        if let Some(content_type) = &self.content_type {
            flags |= FLAG_CONTENT_TYPE;
            put_short_bytes(&mut list, content_type);
        }
        if let Some(headers) = &self.headers {
            flags |= FLAG_HEADERS;
            list.extend_from_slice(&(headers.bytes.len() as u32).to_be_bytes());
            list.extend_from_slice(&headers.bytes);
        }
        if let Some(id) = &self.message_id {
            flags |= FLAG_MESSAGE_ID;
            put_short_bytes(&mut list, id);
        }
        if let Some(timestamp) = self.timestamp {
            flags |= FLAG_TIMESTAMP;
            list.extend_from_slice(&timestamp.to_be_bytes());
        }
        if let Some(kind) = &self.kind {
            flags |= FLAG_TYPE;
            put_short_bytes(&mut list, kind);
        }
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&list);
    }
}

/// A short string: one length byte, then the bytes as they are.
fn put_short_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u8::try_from(bytes.len()).expect("a short string holds at most 255 bytes");
    out.push(len);
    out.extend_from_slice(bytes);
}

/// Where and as whom to connect, taken from an `amqp://user:password@host:port/vhost` URL.
struct Endpoint {
    address: String,
    user: String,
    password: String,
    vhost: String,
}

impl Endpoint {
    fn parse(amqp_url: &str) -> Endpoint {
        let url = url::Url::parse(amqp_url).expect("the test broker URL parses");
        let decode = |s: &str| {
            url::form_urlencoded::parse(format!("x={s}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        let vhost = match url.path().trim_start_matches('/') {
            "" => "/".to_owned(),
            path => decode(path),
        };
        Endpoint {
            address: format!(
                "{}:{}",
                url.host_str().unwrap_or("127.0.0.1"),
                url.port().unwrap_or(5672)
            ),
            user: if url.username().is_empty() {
                "guest".to_owned()
            } else {
                decode(url.username())
            },
            password: url.password().map(decode).unwrap_or_else(|| "guest".into()),
            vhost,
        }
    }
}

/// One frame read from the broker.
struct Frame {
    kind: u8,
    payload: Vec<u8>,
}

impl Frame {
    /// (class, method) of a method frame.
    fn method(&self) -> Option<(u16, u16)> {
        if self.kind != FRAME_METHOD || self.payload.len() < 4 {
            return None;
        }
        let class = u16::from_be_bytes([self.payload[0], self.payload[1]]);
        let method = u16::from_be_bytes([self.payload[2], self.payload[3]]);
        Some((class, method))
    }

    /// The reply text of a `connection.close` or `channel.close`.
    fn close_reason(&self) -> String {
        let args = &self.payload[4..];
        let code = args
            .get(..2)
            .map_or(0, |c| u16::from_be_bytes([c[0], c[1]]));
        let text = args
            .get(2)
            .and_then(|&len| args.get(3..3 + usize::from(len)))
            .map(String::from_utf8_lossy)
            .unwrap_or_default();
        format!("{code} {text}")
    }
}

/// An open connection with channel 1 in confirm mode.
pub struct RawPublisher {
    stream: TcpStream,
    frame_max: usize,
}

impl RawPublisher {
    /// Connects to the broker at `amqp_url` and opens a channel in confirm mode.
    pub fn connect(amqp_url: &str) -> io::Result<RawPublisher> {
        let endpoint = Endpoint::parse(amqp_url);
        let stream = TcpStream::connect(&endpoint.address)?;
        stream.set_read_timeout(Some(READ_TIMEOUT))?;
        stream.set_nodelay(true)?;
        let mut publisher = RawPublisher {
            stream,
            frame_max: 4096,
        };
        publisher.stream.write_all(b"AMQP\x00\x00\x09\x01")?;
        publisher.expect(0, (10, 10))?; // connection.start

        let mut start_ok = method(10, 11);
        start_ok.extend_from_slice(&0u32.to_be_bytes()); // client-properties: empty table
        put_short_bytes(&mut start_ok, b"PLAIN");
        let response = format!("\0{}\0{}", endpoint.user, endpoint.password);
        start_ok.extend_from_slice(&(response.len() as u32).to_be_bytes());
        start_ok.extend_from_slice(response.as_bytes());
        put_short_bytes(&mut start_ok, b"en_US");
        publisher.send(FRAME_METHOD, 0, &start_ok)?;

        let tune = publisher.expect(0, (10, 30))?;
        let args = &tune.payload[4..];
        let channel_max = u16::from_be_bytes([args[0], args[1]]);
        let frame_max = u32::from_be_bytes([args[2], args[3], args[4], args[5]]);
        let frame_max = if frame_max == 0 { 131_072 } else { frame_max };
        publisher.frame_max = frame_max as usize;
        let mut tune_ok = method(10, 31);
        tune_ok.extend_from_slice(&channel_max.to_be_bytes());
        tune_ok.extend_from_slice(&frame_max.to_be_bytes());
        tune_ok.extend_from_slice(&0u16.to_be_bytes()); // no heartbeats
        publisher.send(FRAME_METHOD, 0, &tune_ok)?;

        let mut open = method(10, 40);
        put_short_bytes(&mut open, endpoint.vhost.as_bytes());
        put_short_bytes(&mut open, b"");
        open.push(0);
        publisher.send(FRAME_METHOD, 0, &open)?;
        publisher.expect(0, (10, 41))?;

        let mut channel_open = method(20, 10);
        put_short_bytes(&mut channel_open, b"");
        publisher.send(FRAME_METHOD, 1, &channel_open)?;
        publisher.expect(1, (20, 11))?;

        let mut select = method(85, 10);
        select.push(0); // wait for select-ok
        publisher.send(FRAME_METHOD, 1, &select)?;
        publisher.expect(1, (85, 11))?;
        Ok(publisher)
    }

    /// Publishes `message` to `queue` through the default exchange and waits for the broker's
    /// confirm, so that whatever the test publishes next lands behind it in the queue.
    pub fn publish(&mut self, queue: &str, message: &RawMessage) -> io::Result<()> {
        let mut publish = method(60, 40);
        publish.extend_from_slice(&0u16.to_be_bytes());
        put_short_bytes(&mut publish, b"");
        put_short_bytes(&mut publish, queue.as_bytes());
        publish.push(0); // neither mandatory nor immediate
        self.send(FRAME_METHOD, 1, &publish)?;

        let mut header = Vec::new();
        header.extend_from_slice(&60u16.to_be_bytes());
        header.extend_from_slice(&0u16.to_be_bytes());
        header.extend_from_slice(&(message.body.len() as u64).to_be_bytes());
        message.encode_properties(&mut header);
        self.send(FRAME_HEADER, 1, &header)?;
        for chunk in message.body.chunks(self.frame_max - 8) {
            self.send(FRAME_BODY, 1, chunk)?;
        }

        let reply = self.next_method(1)?;
        match reply.method() {
            Some((60, 80)) => Ok(()),
            Some((60, 120)) => Err(io::Error::other("the broker refused the message (nack)")),
            _ => Err(io::Error::other(format!(
                "expected basic.ack, got {:?}",
                reply.method()
            ))),
        }
    }

    /// Closes the connection cleanly.
    pub fn close(mut self) -> io::Result<()> {
        let mut close = method(10, 50);
        close.extend_from_slice(&200u16.to_be_bytes());
        put_short_bytes(&mut close, b"");
        close.extend_from_slice(&[0, 0, 0, 0]);
        self.send(FRAME_METHOD, 0, &close)?;
        self.expect(0, (10, 51))?;
        Ok(())
    }

    fn send(&mut self, kind: u8, channel: u16, payload: &[u8]) -> io::Result<()> {
        let mut frame = Vec::with_capacity(payload.len() + 8);
        frame.push(kind);
        frame.extend_from_slice(&channel.to_be_bytes());
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(payload);
        frame.push(FRAME_END);
        self.stream.write_all(&frame)
    }

    fn read_frame(&mut self) -> io::Result<(u16, Frame)> {
        let mut head = [0u8; 7];
        self.stream.read_exact(&mut head)?;
        let channel = u16::from_be_bytes([head[1], head[2]]);
        let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
        let mut payload = vec![0u8; size + 1];
        self.stream.read_exact(&mut payload)?;
        if payload.pop() != Some(FRAME_END) {
            return Err(io::Error::other("frame does not end in 0xCE"));
        }
        Ok((
            channel,
            Frame {
                kind: head[0],
                payload,
            },
        ))
    }

    /// The next method frame, skipping heartbeats; a close from the broker is an error
    /// carrying its reply text.
    fn next_method(&mut self, channel: u16) -> io::Result<Frame> {
        loop {
            let (on, frame) = self.read_frame()?;
            if frame.kind == FRAME_HEARTBEAT {
                continue;
            }
            match frame.method() {
                Some((10, 50)) | Some((20, 40)) => {
                    return Err(io::Error::other(format!(
                        "the broker closed the {}: {}",
                        if on == 0 { "connection" } else { "channel" },
                        frame.close_reason()
                    )));
                }
                Some(_) if on == channel => return Ok(frame),
                _ => {}
            }
        }
    }

    fn expect(&mut self, channel: u16, want: (u16, u16)) -> io::Result<Frame> {
        let frame = self.next_method(channel)?;
        if frame.method() == Some(want) {
            Ok(frame)
        } else {
            Err(io::Error::other(format!(
                "expected method {want:?}, got {:?}",
                frame.method()
            )))
        }
    }
}

/// The start of a method frame's payload.
fn method(class: u16, method: u16) -> Vec<u8> {
    let mut out = class.to_be_bytes().to_vec();
    out.extend_from_slice(&method.to_be_bytes());
    out
}
