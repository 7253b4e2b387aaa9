//! LaunchDarkly's event stream, as bytes off the socket: the parser must agree with a
//! straightforward reading of the SSE rules whatever the line endings, give the same events
//! however the bytes are split into reads, refuse what is over its limit, and never panic; each
//! event it yields then goes through the protocol decoder as the stream thread would.

#![no_main]

#[path = "../../tests/support/sse_model.rs"]
mod sse_model;

use flagshed::launchdarkly::protocol;
use flagshed::launchdarkly::sse::{SseItem, SseParser};
use libfuzzer_sys::fuzz_target;
use sse_model::{Chunked, sse_items, sse_reference};
use std::io::Cursor;

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

    let sizes: Vec<usize> = sizes.iter().map(|b| 1 + usize::from(b % 16)).collect();
    let whole = sse_items(SseParser::new(Cursor::new(stream), limit));
    let chunked = sse_items(SseParser::new(Chunked::new(stream, &sizes), limit));
    assert_eq!(whole, chunked, "chunking {sizes:?} changed the result");
    assert_eq!(
        whole,
        sse_reference(stream, limit),
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
