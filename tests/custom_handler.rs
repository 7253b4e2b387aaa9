//! The library path: `examples/custom_handler.rs`, a worker binary whose handler is Rust code,
//! runs as the whole daemon on the real broker and maps its handler's answers to outcomes.

mod support;

use amiquip::{AmqpProperties, AmqpValue, FieldTable};
use std::path::PathBuf;
use std::time::Duration;
use support::broker::{TestBroker, now_ms, unique_name};
use support::daemon::{Daemon, TempDir, TestConfig};

/// `target/<profile>/examples/custom_handler`, built by cargo before the tests run.
fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("tests live in target/<profile>/deps");
    let path = profile_dir.join("examples").join("custom_handler");
    assert!(
        path.exists(),
        "{} is missing: cargo builds examples with the tests (cargo test, cargo nextest run)",
        path.display()
    );
    path
}

#[test]
fn a_rust_handler_runs_as_the_whole_daemon() {
    let mut broker = TestBroker::connect();
    let queue = unique_name("custom");
    broker.owns_queue(&queue);
    let dir = TempDir::new("custom");
    let config = TestConfig::new(&queue)
        .set("handler", "max_retries", "1")
        // The long job must start, so that it is the handler that stops it.
        .set("worker", "drop_doomed", "false")
        .write(&dir, "flagshed.toml");
    let mut worker = Daemon::start_program(&example_binary(), &config, &[]);
    worker.wait_for_line("consuming from queue", Duration::from_secs(60));

    let publish = |id: &str, body: &[u8], deadline_in_ms: Option<u64>| {
        let mut properties = AmqpProperties::default().with_message_id(id.to_owned());
        if let Some(ms) = deadline_in_ms {
            let mut headers = FieldTable::new();
            headers.insert(
                "x-deadline-ms".into(),
                AmqpValue::LongLongInt((now_ms() + ms) as i64),
            );
            properties = properties.with_headers(headers);
        }
        broker.publish_properties(&queue, properties, body);
    };
    publish("words", b"three short words", None);
    publish("empty", b"", None);
    publish("later", b"later", None);
    // 100 chunks of 10 ms each cannot finish in 300 ms.
    publish("long", &vec![b'w'; 100 * 64 * 1024], Some(300));

    let stats = worker.wait_settled(5);
    assert!(
        worker.log().contains("job words has 3 words"),
        "{}",
        worker.log()
    );
    assert_eq!(stats.get("done"), 1, "{stats:?}");
    assert_eq!(stats.get("retried"), 1, "{stats:?}");
    assert_eq!(
        stats.get("failed"),
        2,
        "empty, and later after its retry: {stats:?}"
    );
    assert_eq!(stats.get("timed_out"), 1, "{stats:?}");
    let last = worker.stop();
    last.assert_balanced();
    assert_eq!(last.get("received"), 5, "{last:?}");
}
