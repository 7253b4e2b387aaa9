//! Flag data from outside: a flag file, a stream event's body (`put`, `patch`, `delete`) or a
//! polling response. Each must parse to a clear result; whatever parses is applied to a flag
//! store and every flag evaluated for a daemon's context, as the flag source thread does.
//!
//! The first byte picks the kind of payload; the rest is the payload.

#![no_main]

use flagshed::flags::evaluate::evaluate_flag;
use flagshed::flags::file;
use flagshed::flags::store::{DataEvent, FlagStore};
use flagshed::launchdarkly::protocol::{self, ProtocolError};
use launchdarkly_server_sdk_evaluation::ContextBuilder;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fn apply_and_evaluate(event: DataEvent) {
    let mut store = FlagStore::default();
    store.apply(event);
    let mut builder = ContextBuilder::new("worker-host-1");
    builder
        .kind("service")
        .set_string("role", "worker")
        .set_string("queue", "flagshed.jobs")
        .set_string("host", "worker-host-1");
    let context = builder.build().expect("a valid context");
    for key in store.snapshot().flags.keys() {
        // What the flag source thread calls: it guards the evaluator against data that would
        // overflow its stack or never finish.
        let _ = evaluate_flag(&store, key, &context);
    }
}

fn check_protocol(result: Result<Option<DataEvent>, ProtocolError>) {
    match result {
        Ok(Some(event)) => {
            match &event {
                DataEvent::PatchFlag(flag) => assert!(!flag.key.is_empty()),
                DataEvent::PatchSegment(segment) => assert!(!segment.key.is_empty()),
                DataEvent::DeleteFlag { key, .. } | DataEvent::DeleteSegment { key, .. } => {
                    assert!(!key.is_empty())
                }
                DataEvent::Put(_) => {}
            }
            apply_and_evaluate(event);
        }
        Ok(None) => {}
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&kind, payload)) = input.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(payload);
    match kind % 5 {
        0 => match file::parse(Path::new("flags.json"), payload) {
            Ok(data) => apply_and_evaluate(DataEvent::Put(data)),
            Err(e) => assert!(e.to_string().starts_with("flags.json: ")),
        },
        1 => check_protocol(protocol::stream_event("put", &text)),
        2 => check_protocol(protocol::stream_event("patch", &text)),
        3 => check_protocol(protocol::stream_event("delete", &text)),
        _ => check_protocol(protocol::poll_body(payload).map(Some)),
    }
});
