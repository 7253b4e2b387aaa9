//! A second, deliberately plain reading of the Server-Sent Events rules, and a reader that
//! splits a stream into reads of chosen sizes: what the property tests and the `sse` fuzz
//! target hold the real parser (`flagshed::launchdarkly::sse`) against. Included by both with
//! `#[path]`, so the two checks cannot drift apart.

use flagshed::launchdarkly::sse::{SseError, SseEvent, SseItem, SseParser};
use std::io::{self, BufRead, Read};

/// Hands out `data` in reads whose sizes cycle through `sizes`.
pub struct Chunked {
    data: Vec<u8>,
    at: usize,
    chunk_end: usize,
    sizes: Vec<usize>,
    next_size: usize,
}

impl Chunked {
    /// A reader over `data` whose reads are `sizes` bytes long in turn (0 counts as 1); no
    /// sizes: one read of everything.
    pub fn new(data: &[u8], sizes: &[usize]) -> Chunked {
        Chunked {
            data: data.to_vec(),
            at: 0,
            chunk_end: 0,
            sizes: sizes.to_vec(),
            next_size: 0,
        }
    }
}

impl Read for Chunked {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(out.len());
        out[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for Chunked {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.at == self.chunk_end && self.at < self.data.len() {
            let size = match self.sizes.as_slice() {
                [] => self.data.len(),
                sizes => sizes[self.next_size % sizes.len()].max(1),
            };
            self.next_size += 1;
            self.chunk_end = (self.at + size).min(self.data.len());
        }
        Ok(&self.data[self.at..self.chunk_end])
    }

    fn consume(&mut self, n: usize) {
        self.at += n;
    }
}

/// Every item a parser yields, and whether it ended refusing an oversized event.
pub fn sse_items<R: BufRead>(mut parser: SseParser<R>) -> (Vec<SseItem>, bool) {
    let mut items = Vec::new();
    loop {
        match parser.next_item() {
            Ok(Some(item)) => items.push(item),
            Ok(None) => return (items, false),
            Err(SseError::TooLarge { .. }) => return (items, true),
            Err(SseError::Io(e)) => panic!("reading from memory failed: {e}"),
        }
    }
}

/// The SSE rules applied to the whole input at once: lines end in `\r\n`, `\r` or `\n`; a
/// byte order mark at the very start is dropped; a blank line dispatches an event that has
/// data; a line starting with `:` is a heartbeat; one space after the field's colon is
/// dropped; only `event` and `data` matter; a line cut off by the end is dropped. An event is
/// refused once a line plus what the event already holds exceeds `limit` bytes.
pub fn sse_reference(input: &[u8], limit: usize) -> (Vec<SseItem>, bool) {
    let mut items = Vec::new();
    let (mut name, mut data, mut has_data) = (String::new(), String::new(), false);
    let mut rest = input;
    let mut first = true;
    loop {
        let Some(end) = rest.iter().position(|&b| b == b'\n' || b == b'\r') else {
            // The parser checks the size of what it reads; at the end there is nothing left.
            let too_large = !rest.is_empty() && rest.len() + data.len() + name.len() > limit;
            return (items, too_large);
        };
        let mut line = &rest[..end];
        if line.len() + data.len() + name.len() > limit {
            return (items, true);
        }
        let crlf = rest[end] == b'\r' && rest.get(end + 1) == Some(&b'\n');
        rest = &rest[end + if crlf { 2 } else { 1 }..];
        if std::mem::take(&mut first) {
            line = line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line);
        }
        if line.is_empty() {
            let event_name = std::mem::take(&mut name);
            let event_data = std::mem::take(&mut data);
            if std::mem::take(&mut has_data) {
                let name = if event_name.is_empty() {
                    "message".to_owned()
                } else {
                    event_name
                };
                items.push(SseItem::Event(SseEvent {
                    name,
                    data: event_data,
                }));
            }
        } else if line[0] == b':' {
            items.push(SseItem::Heartbeat);
        } else {
            let (field, value) = match line.iter().position(|&b| b == b':') {
                Some(colon) => {
                    let value = &line[colon + 1..];
                    (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
                }
                None => (line, &b""[..]),
            };
            match field {
                b"event" => name = String::from_utf8_lossy(value).into_owned(),
                b"data" => {
                    if has_data {
                        data.push('\n');
                    }
                    data.push_str(&String::from_utf8_lossy(value));
                    has_data = true;
                }
                _ => {}
            }
        }
    }
}
