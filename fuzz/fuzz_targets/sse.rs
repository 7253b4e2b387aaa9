//! LaunchDarkly's event stream, as bytes off the socket: the parser must agree with a
//! straightforward reading of the SSE rules whatever the line endings, give the same events
//! however the bytes are split into reads, refuse what is over its limit, and never panic; each
//! event it yields then goes through the protocol decoder as the stream thread would.

#![no_main]

use flagshed::launchdarkly::protocol;
use flagshed::launchdarkly::sse::{SseError, SseEvent, SseItem, SseParser};
use libfuzzer_sys::fuzz_target;
use std::io::{self, BufRead, Cursor, Read};

/// Hands out `data` in reads whose sizes cycle through `sizes` (1 to 16 bytes each).
struct Chunked<'a> {
    data: &'a [u8],
    at: usize,
    chunk_end: usize,
    sizes: &'a [u8],
    next_size: usize,
}

impl Read for Chunked<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(out.len());
        out[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for Chunked<'_> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.at == self.chunk_end && self.at < self.data.len() {
            let size = match self.sizes {
                [] => self.data.len(),
                sizes => 1 + usize::from(sizes[self.next_size % sizes.len()] % 16),
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

/// Everything a parser yields, and whether it ended refusing an oversized event.
fn drain<R: BufRead>(mut parser: SseParser<R>) -> (Vec<SseItem>, bool) {
    let mut items = Vec::new();
    loop {
        match parser.next_item() {
            Ok(Some(item)) => items.push(item),
            Ok(None) => return (items, false),
            Err(SseError::TooLarge { .. }) => return (items, true),
            Err(SseError::Io(e)) => panic!("reading a byte slice failed: {e}"),
        }
    }
}

/// The SSE rules applied to the whole input at once.
fn reference(input: &[u8], limit: usize) -> (Vec<SseItem>, bool) {
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
        let after = if rest[end] == b'\r' && rest.get(end + 1) == Some(&b'\n') {
            end + 2
        } else {
            end + 1
        };
        rest = &rest[after..];
        if std::mem::take(&mut first) {
            line = line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line);
        }
        if line.is_empty() {
            let event_name = std::mem::take(&mut name);
            let event_data = std::mem::take(&mut data);
            if std::mem::take(&mut has_data) {
                items.push(SseItem::Event(SseEvent {
                    name: if event_name.is_empty() {
                        "message".into()
                    } else {
                        event_name
                    },
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

fuzz_target!(|input: &[u8]| {
    let Some((&limit_byte, rest)) = input.split_first() else {
        return;
    };
    let Some((&sizes_len, rest)) = rest.split_first() else {
        return;
    };
    let sizes_len = usize::from(sizes_len % 8).min(rest.len());
    let (sizes, stream) = rest.split_at(sizes_len);
    // Small limits exercise the refusal; 255 stands for "no practical limit".
    let limit = if limit_byte == 255 {
        1 << 20
    } else {
        usize::from(limit_byte)
    };

    let whole = drain(SseParser::new(Cursor::new(stream), limit));
    let chunked = drain(SseParser::new(
        Chunked {
            data: stream,
            at: 0,
            chunk_end: 0,
            sizes,
            next_size: 0,
        },
        limit,
    ));
    assert_eq!(whole, chunked, "chunking {sizes:?} changed the result");
    assert_eq!(
        whole,
        reference(stream, limit),
        "differs from the SSE rules"
    );

    for item in whole.0 {
        if let SseItem::Event(event) = item {
            assert!(!event.name.is_empty());
            assert!(!event.name.contains(['\r', '\n']));
            assert!(!event.data.contains('\r'));
            let _ = protocol::stream_event(&event.name, &event.data);
        }
    }
});
