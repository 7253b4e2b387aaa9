//! An incremental Server-Sent Events parser: turns the bytes of LaunchDarkly's streaming
//! response into events and heartbeats, one at a time, as they arrive.
//!
//! It reads from any [`BufRead`] so it works the same on a socket and on a byte slice in a
//! test, and it holds at most one event in memory: an event (or a line) larger than the limit
//! is refused with an error instead of growing a buffer for as long as a broken or hostile
//! server keeps sending. Nothing the server sends can make it panic; bytes that are not UTF-8
//! are decoded lossily, as the SSE specification asks.

use std::fmt;
use std::io::{self, BufRead};

/// One complete event: its name (`message` when the server named none) and its data, with
/// several `data:` lines joined by `\n`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field: what kind of message `data` holds.
    pub name: String,
    /// The `data:` lines, joined by `\n`.
    pub data: String,
}

/// What the parser hands back: an event, or a sign of life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SseItem {
    /// A blank line ended an event that had data.
    Event(SseEvent),
    /// A comment line (`:` first): LaunchDarkly sends these as heartbeats, so the caller can
    /// note that the connection is alive even though no data changed.
    Heartbeat,
}

/// Why the stream cannot be read further; after an error the parser should be dropped along
/// with its connection.
#[derive(Debug)]
pub enum SseError {
    /// Reading the underlying connection failed (including a read timeout).
    Io(io::Error),
    /// One event grew past the limit: the server is broken or hostile.
    TooLarge {
        /// The limit the parser was given, in bytes.
        limit: usize,
    },
}

impl fmt::Display for SseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SseError::Io(e) => write!(f, "reading the event stream failed: {e}"),
            SseError::TooLarge { limit } => {
                write!(f, "an event in the stream is larger than {limit} bytes")
            }
        }
    }
}

impl std::error::Error for SseError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SseError::Io(e) => Some(e),
            SseError::TooLarge { .. } => None,
        }
    }
}

/// Reads events from `reader` one at a time.
pub struct SseParser<R> {
    reader: R,
    limit: usize,
    /// The current line's bytes, without its terminator.
    line: Vec<u8>,
    /// The last line ended in `\r`: a `\n` at the start of the next read belongs to it.
    skip_lf: bool,
    /// Still before the first line: a UTF-8 byte order mark there is dropped.
    at_start: bool,
    name: String,
    data: String,
    /// Whether any `data:` field was seen, so an event whose data is empty still dispatches.
    has_data: bool,
}

/// What the line reader found.
enum Line {
    Complete,
    Eof,
}

impl<R: BufRead> SseParser<R> {
    /// A parser refusing any event (all its lines together) longer than `limit` bytes.
    pub fn new(reader: R, limit: usize) -> SseParser<R> {
        SseParser {
            reader,
            limit,
            line: Vec::new(),
            skip_lf: false,
            at_start: true,
            name: String::new(),
            data: String::new(),
            has_data: false,
        }
    }

    /// The next event or heartbeat; `Ok(None)` when the stream ended (an event cut off by
    /// the end is dropped, as the SSE specification says).
    pub fn next_item(&mut self) -> Result<Option<SseItem>, SseError> {
        loop {
            match self.read_line()? {
                Line::Eof => return Ok(None),
                Line::Complete => {}
            }
            if let Some(item) = self.process_line() {
                return Ok(Some(item));
            }
        }
    }

    /// Fills `self.line` with the next line, accepting `\n`, `\r\n` and `\r` as its end.
    fn read_line(&mut self) -> Result<Line, SseError> {
        self.line.clear();
        loop {
            let buf = match self.reader.fill_buf() {
                Ok(buf) => buf,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(SseError::Io(e)),
            };
            if buf.is_empty() {
                return Ok(Line::Eof);
            }
            if self.skip_lf {
                self.skip_lf = false;
                if buf[0] == b'\n' {
                    self.reader.consume(1);
                    continue;
                }
            }
            let end = buf.iter().position(|&b| b == b'\n' || b == b'\r');
            let take = end.unwrap_or(buf.len());
            // The line and the data gathered so far are what this event holds in memory.
            if self.line.len() + take + self.data.len() + self.name.len() > self.limit {
                return Err(SseError::TooLarge { limit: self.limit });
            }
            self.line.extend_from_slice(&buf[..take]);
            match end {
                Some(at) => {
                    self.skip_lf = buf[at] == b'\r';
                    self.reader.consume(at + 1);
                    return Ok(Line::Complete);
                }
                None => self.reader.consume(take),
            }
        }
    }

    /// Applies one line; returns an item when the line completes one.
    fn process_line(&mut self) -> Option<SseItem> {
        let mut line: &[u8] = &self.line;
        if self.at_start {
            self.at_start = false;
            line = line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line);
        }
        if line.is_empty() {
            return self.dispatch();
        }
        if line[0] == b':' {
            return Some(SseItem::Heartbeat);
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"event" => self.name = String::from_utf8_lossy(value).into_owned(),
            b"data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(&String::from_utf8_lossy(value));
                self.has_data = true;
            }
            // `id` and `retry` matter to browsers resuming a stream; LaunchDarkly re-sends
            // everything in a `put` on reconnect, so they are ignored, as are unknown fields.
            _ => {}
        }
        None
    }

    /// Ends the current event at a blank line.
    fn dispatch(&mut self) -> Option<SseItem> {
        let name = std::mem::take(&mut self.name);
        let data = std::mem::take(&mut self.data);
        if !std::mem::replace(&mut self.has_data, false) {
            return None;
        }
        let name = if name.is_empty() {
            "message".to_owned()
        } else {
            name
        };
        Some(SseItem::Event(SseEvent { name, data }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufReader, Cursor, Read};

    const LIMIT: usize = 1024;

    fn items(input: &[u8]) -> Vec<SseItem> {
        let mut parser = SseParser::new(Cursor::new(input.to_vec()), LIMIT);
        let mut out = Vec::new();
        while let Some(item) = parser.next_item().expect("no error") {
            out.push(item);
        }
        out
    }

    fn event(name: &str, data: &str) -> SseItem {
        SseItem::Event(SseEvent {
            name: name.into(),
            data: data.into(),
        })
    }

    /// Hands out its bytes a few at a time, so lines and `\r\n` pairs straddle reads.
    struct Trickle {
        bytes: Vec<u8>,
        at: usize,
        step: usize,
    }

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.step.min(buf.len()).min(self.bytes.len() - self.at);
            buf[..n].copy_from_slice(&self.bytes[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    #[test]
    fn parses_named_events_and_joins_data_lines() {
        let got = items(b"event: put\ndata: {\"a\":1}\n\nevent: patch\ndata: x\ndata: y\n\n");
        assert_eq!(got, vec![event("put", "{\"a\":1}"), event("patch", "x\ny")]);
    }

    #[test]
    fn accepts_every_line_ending() {
        let want = vec![event("put", "1"), event("patch", "2"), event("delete", "3")];
        assert_eq!(
            items(
                b"event: put\r\ndata: 1\r\n\r\nevent: patch\rdata: 2\r\revent: delete\ndata: 3\n\n"
            ),
            want
        );
    }

    #[test]
    fn crlf_split_across_reads_is_one_line_end() {
        let input = b"event: put\r\ndata: 1\r\n\r\nevent: patch\r\ndata: 2\r\n\r\n".to_vec();
        for step in 1..8 {
            let reader = BufReader::with_capacity(
                step,
                Trickle {
                    bytes: input.clone(),
                    at: 0,
                    step,
                },
            );
            let mut parser = SseParser::new(reader, LIMIT);
            let mut got = Vec::new();
            while let Some(item) = parser.next_item().expect("no error") {
                got.push(item);
            }
            assert_eq!(
                got,
                vec![event("put", "1"), event("patch", "2")],
                "step {step}"
            );
        }
    }

    #[test]
    fn comments_are_heartbeats() {
        assert_eq!(
            items(b":\n: keepalive\nevent: put\ndata: 1\n\n"),
            vec![SseItem::Heartbeat, SseItem::Heartbeat, event("put", "1")]
        );
    }

    #[test]
    fn id_retry_and_unknown_fields_are_ignored() {
        assert_eq!(
            items(b"id: 7\nretry: 100\nevent: put\nfoo: bar\ndata: 1\n\n"),
            vec![event("put", "1")]
        );
    }

    #[test]
    fn value_keeps_all_but_one_leading_space() {
        assert_eq!(items(b"data:  x\n\n"), vec![event("message", " x")]);
        assert_eq!(items(b"data:x\n\n"), vec![event("message", "x")]);
    }

    #[test]
    fn blank_lines_without_data_dispatch_nothing() {
        assert_eq!(items(b"\n\nevent: put\n\n\n"), vec![]);
        assert_eq!(items(b"data\n\n"), vec![event("message", "")]);
    }

    #[test]
    fn event_cut_off_by_the_end_is_dropped() {
        assert_eq!(items(b"event: put\ndata: 1\n"), vec![]);
        assert_eq!(items(b"event: put\ndata: 1"), vec![]);
    }

    #[test]
    fn byte_order_mark_is_dropped() {
        assert_eq!(
            items(b"\xEF\xBB\xBFevent: put\ndata: 1\n\n"),
            vec![event("put", "1")]
        );
    }

    #[test]
    fn oversized_event_is_refused() {
        let mut input = b"event: put\n".to_vec();
        for _ in 0..100 {
            input.extend_from_slice(b"data: 0123456789abcdef\n");
        }
        let mut parser = SseParser::new(Cursor::new(input), 512);
        assert!(matches!(
            parser.next_item(),
            Err(SseError::TooLarge { limit: 512 })
        ));
    }

    #[test]
    fn oversized_line_is_refused() {
        let input = vec![b'x'; 10_000];
        let mut parser = SseParser::new(Cursor::new(input), 512);
        assert!(matches!(parser.next_item(), Err(SseError::TooLarge { .. })));
    }

    #[test]
    fn read_errors_are_reported() {
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::new(io::ErrorKind::TimedOut, "idle"))
            }
        }
        let mut parser = SseParser::new(BufReader::new(Broken), LIMIT);
        assert!(matches!(parser.next_item(), Err(SseError::Io(_))));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic generator: every byte value, line ends and colons in
        // many orders, fed in several read sizes.
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        for round in 0..200 {
            let mut input = Vec::new();
            for _ in 0..(round * 7 % 600) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let b = match state % 8 {
                    0 => b'\n',
                    1 => b'\r',
                    2 => b':',
                    3 => b' ',
                    _ => (state >> 8) as u8,
                };
                input.push(b);
            }
            let step = 1 + round % 5;
            let reader = BufReader::with_capacity(
                step,
                Trickle {
                    bytes: input,
                    at: 0,
                    step,
                },
            );
            let mut parser = SseParser::new(reader, 256);
            while let Ok(Some(_)) = parser.next_item() {}
        }
    }
}
