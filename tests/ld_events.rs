//! The LaunchDarkly analytics events thread against a fake LaunchDarkly service: the headers
//! and payload IDs, the summary and index events as the SDKs shape them, nothing sent when
//! idle, one retry of a failed post, a refused key stopping all posts, the capacity, and
//! `stop()` sending what is held.
//!
//! Each test waits for an event (a payload at the fake, a counter, the thread's end) with a
//! timeout; none sleeps for a fixed time to let something happen. Flush intervals are an hour
//! unless a test is about the interval, so payloads go out when the test asks for them.

mod support;

use flagshed::launchdarkly::events::{Evaluation, EventProcessor, EventSettings};
use launchdarkly_server_sdk_evaluation::{Context, ContextBuilder, MultiContextBuilder};
use serde_json::{Value, json};
use std::time::Duration;
use support::capture::{capture_logs, captured};
use support::fake_ld::FakeLd;

/// Shaped like a real server-side key, and unique enough that finding it in a log line can
/// only mean it leaked.
const SDK_KEY: &str = "sdk-5d1c0e7a-93b2-4f60-8e1d-EVENTSSECRET";

/// Generous: the events waited for take milliseconds, but CI machines stall.
const TIMEOUT: Duration = Duration::from_secs(10);

const HOUR: Duration = Duration::from_secs(3600);

// ---------------------------------------------------------------------------------------------
// Helpers.

fn wait_until(what: &str, done: impl FnMut() -> bool) {
    support::capture::wait_until(what, TIMEOUT, done);
}

/// Settings pointed at `uri`, flushing only when asked, retrying after 10 ms.
fn settings(uri: String) -> EventSettings {
    EventSettings {
        sdk_key: SDK_KEY.into(),
        events_uri: uri,
        flush_interval: HOUR,
        capacity: 100,
        retry_delay: Duration::from_millis(10),
        proxy: None,
    }
}

fn start(fake: &FakeLd) -> EventProcessor {
    EventProcessor::spawn(settings(fake.uri())).expect("spawn the events thread")
}

fn service(host: &str) -> Context {
    ContextBuilder::new(host)
        .kind("service")
        .set_string("role", "worker")
        .build()
        .expect("valid context")
}

fn service_and_job(host: &str, job: &str) -> Context {
    let job = ContextBuilder::new(job)
        .kind("job")
        .build()
        .expect("valid context");
    MultiContextBuilder::new()
        .add_context(service(host))
        .add_context(job)
        .build()
        .expect("valid multi-context")
}

/// `count` evaluations of `flag` (version 7, unless `None` for an unknown flag) serving
/// variation `variation` with `value`, for `context`, at `at_ms`.
fn evaluation(
    flag: &str,
    version: Option<u64>,
    variation: Option<usize>,
    value: Value,
    context: Context,
    count: u64,
    at_ms: u64,
) -> Evaluation {
    Evaluation {
        flag_key: flag.into(),
        flag_version: version,
        variation,
        value,
        default: json!(2.5),
        context,
        count,
        at_ms,
    }
}

fn skip_rate(context: Context, count: u64) -> Evaluation {
    evaluation(
        "skip-rate",
        Some(7),
        Some(1),
        json!(25),
        context,
        count,
        1_000,
    )
}

/// Asks for a flush and waits for the `n`th accepted payload; returns it.
fn flush_and_wait(fake: &FakeLd, processor: &EventProcessor, n: usize) -> Vec<Value> {
    processor.flush();
    assert!(
        fake.wait_for_bulk_payloads(n, TIMEOUT),
        "timed out waiting for payload {n}; requests: {:?}",
        fake.requests_to("/bulk")
    );
    fake.bulk_payloads().swap_remove(n - 1)
}

fn of_kind<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["kind"] == kind).collect()
}

fn summary(events: &[Value]) -> &Value {
    match of_kind(events, "summary").as_slice() {
        [one] => one,
        other => panic!("expected one summary event, got {other:?}"),
    }
}

fn is_uuid_v4(id: &str) -> bool {
    let groups: Vec<&str> = id.split('-').collect();
    groups.iter().map(|g| g.len()).collect::<Vec<_>>() == [8, 4, 4, 4, 12]
        && groups.iter().all(|g| {
            g.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        })
        && groups[2].starts_with('4')
        && matches!(groups[3].as_bytes()[0], b'8' | b'9' | b'a' | b'b')
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[test]
fn payloads_carry_launchdarkly_headers_and_a_fresh_payload_id() {
    let fake = FakeLd::start();
    let processor = start(&fake);
    processor.record(vec![skip_rate(service("host-1"), 1)]);
    flush_and_wait(&fake, &processor, 1);
    processor.record(vec![skip_rate(service("host-1"), 1)]);
    flush_and_wait(&fake, &processor, 2);

    let posts = fake.requests_to("/bulk");
    assert_eq!(posts.len(), 2);
    for post in &posts {
        assert_eq!(post.method, "POST");
        assert_eq!(post.header("authorization"), Some(SDK_KEY));
        assert_eq!(post.header("content-type"), Some("application/json"));
        let agent = format!("flagshed/{}", env!("CARGO_PKG_VERSION"));
        assert_eq!(post.header("user-agent"), Some(agent.as_str()));
        assert_eq!(post.header("x-launchdarkly-event-schema"), Some("4"));
        let id = post
            .header("x-launchdarkly-payload-id")
            .expect("payload id");
        assert!(is_uuid_v4(id), "not a v4 UUID: {id}");
    }
    assert_ne!(
        posts[0].header("x-launchdarkly-payload-id"),
        posts[1].header("x-launchdarkly-payload-id")
    );
    wait_until("two payloads counted", || processor.posted_payloads() == 2);
    processor.stop();
}

#[test]
fn summary_counts_evaluations_per_variation_and_version() {
    let fake = FakeLd::start();
    let processor = start(&fake);
    let host = || service("host-1");
    processor.record(vec![
        evaluation("skip-rate", Some(7), Some(1), json!(25), host(), 40, 5_000),
        evaluation("skip-rate", Some(7), Some(2), json!(50), host(), 2, 3_000),
    ]);
    processor.record(vec![
        evaluation("skip-rate", Some(7), Some(1), json!(25), host(), 10, 8_000),
        // A patch bumped the version: a counter of its own.
        evaluation("skip-rate", Some(8), Some(1), json!(25), host(), 5, 9_000),
        evaluation(
            "task-rate",
            Some(3),
            Some(0),
            json!(40.0),
            service_and_job("host-1", "resize"),
            7,
            4_000,
        ),
        evaluation("missing-flag", None, None, json!(2.5), host(), 3, 6_000),
    ]);
    let events = flush_and_wait(&fake, &processor, 1);

    let summary = summary(&events);
    assert_eq!(summary["startDate"], json!(3_000));
    assert_eq!(summary["endDate"], json!(9_000));
    assert_eq!(
        summary["features"],
        json!({
            "skip-rate": {
                "default": 2.5,
                "contextKinds": ["service"],
                "counters": [
                    {"variation": 1, "version": 7, "value": 25, "count": 50},
                    {"variation": 2, "version": 7, "value": 50, "count": 2},
                    {"variation": 1, "version": 8, "value": 25, "count": 5},
                ],
            },
            "task-rate": {
                "default": 2.5,
                "contextKinds": ["job", "service"],
                "counters": [{"variation": 0, "version": 3, "value": 40.0, "count": 7}],
            },
            "missing-flag": {
                "default": 2.5,
                "contextKinds": ["service"],
                "counters": [{"unknown": true, "value": 2.5, "count": 3}],
            },
        })
    );
    processor.stop();
}

#[test]
fn each_new_context_gets_one_index_event() {
    let fake = FakeLd::start();
    let processor = start(&fake);
    processor.record(vec![
        skip_rate(service("host-1"), 1),
        skip_rate(service("host-2"), 1),
        skip_rate(service("host-1"), 1),
        skip_rate(service_and_job("host-1", "resize"), 1),
    ]);
    let first = flush_and_wait(&fake, &processor, 1);
    let contexts: Vec<&Value> = of_kind(&first, "index")
        .into_iter()
        .map(|e| {
            assert_eq!(e["creationDate"], json!(1_000));
            &e["context"]
        })
        .collect();
    assert_eq!(
        contexts,
        [
            &json!({"kind": "service", "key": "host-1", "role": "worker"}),
            &json!({"kind": "service", "key": "host-2", "role": "worker"}),
            &json!({"kind": "multi",
                    "service": {"key": "host-1", "role": "worker"},
                    "job": {"key": "resize"}}),
        ]
    );
    assert_eq!(first.last().map(|e| &e["kind"]), Some(&json!("summary")));

    // Seen a moment ago: counted, not indexed again.
    processor.record(vec![skip_rate(service("host-2"), 1)]);
    let second = flush_and_wait(&fake, &processor, 2);
    assert!(of_kind(&second, "index").is_empty(), "{second:?}");
    assert_eq!(
        summary(&second)["features"]["skip-rate"]["counters"][0]["count"],
        json!(1)
    );
    processor.stop();
}

#[test]
fn no_feature_events_are_sent() {
    let fake = FakeLd::start();
    let processor = start(&fake);
    processor.record(vec![skip_rate(service("host-1"), 3)]);
    let events = flush_and_wait(&fake, &processor, 1);
    let kinds: Vec<&Value> = events.iter().map(|e| &e["kind"]).collect();
    assert_eq!(kinds, [&json!("index"), &json!("summary")]);
    processor.stop();
}

#[test]
fn nothing_is_posted_when_idle() {
    let fake = FakeLd::start();
    // Flushing every millisecond, and asked to flush and to stop: still nothing to send.
    let processor = EventProcessor::spawn(EventSettings {
        flush_interval: Duration::from_millis(1),
        ..settings(fake.uri())
    })
    .expect("spawn");
    processor.flush();
    processor.record(Vec::new());
    processor.record(vec![skip_rate(service("host-1"), 0)]);
    processor.stop();
    assert!(
        fake.requests_to("/bulk").is_empty(),
        "{:?}",
        fake.requests()
    );
}

#[test]
fn flush_interval_sends_without_being_asked() {
    let fake = FakeLd::start();
    let processor = EventProcessor::spawn(EventSettings {
        flush_interval: Duration::from_millis(20),
        ..settings(fake.uri())
    })
    .expect("spawn");
    processor.record(vec![skip_rate(service("host-1"), 2)]);
    assert!(fake.wait_for_bulk_payloads(1, TIMEOUT));
    let events = fake.bulk_payloads().swap_remove(0);
    assert_eq!(
        summary(&events)["features"]["skip-rate"]["counters"][0]["count"],
        json!(2)
    );
    processor.stop();
}

#[test]
fn failed_post_is_retried_once_with_the_same_payload_id() {
    let fake = FakeLd::start();
    fake.fail_next(1, 503);
    let processor = start(&fake);
    processor.record(vec![skip_rate(service("host-1"), 1)]);
    flush_and_wait(&fake, &processor, 1);

    let posts = fake.requests_to("/bulk");
    assert_eq!(posts.len(), 2, "{posts:?}");
    assert_eq!(posts[0].failed_with, Some(503));
    assert_eq!(posts[1].failed_with, None);
    assert_eq!(
        posts[0].header("x-launchdarkly-payload-id"),
        posts[1].header("x-launchdarkly-payload-id")
    );
    assert_eq!(posts[0].json(), posts[1].json());
    wait_until("the retry counted as posted", || {
        processor.posted_payloads() == 1
    });
    assert_eq!(processor.dropped_events(), 0);
    processor.stop();
}

#[test]
fn payload_failing_twice_is_dropped_and_counted() {
    let fake = FakeLd::start();
    fake.fail_next(2, 500);
    let processor = start(&fake);
    // One index event and four evaluations.
    processor.record(vec![skip_rate(service("host-1"), 4)]);
    processor.flush();
    wait_until("the payload dropped", || processor.dropped_events() == 5);
    assert_eq!(fake.requests_to("/bulk").len(), 2);

    // Sending goes on with the next payload, under a new ID.
    processor.record(vec![skip_rate(service("host-1"), 1)]);
    flush_and_wait(&fake, &processor, 1);
    let posts = fake.requests_to("/bulk");
    assert_eq!(posts.len(), 3);
    assert_ne!(
        posts[1].header("x-launchdarkly-payload-id"),
        posts[2].header("x-launchdarkly-payload-id")
    );
    processor.stop();
}

#[test]
fn unreachable_service_is_retried_once_then_the_payload_dropped() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let uri = format!("http://{}", listener.local_addr().expect("addr"));
    drop(listener);
    let processor = EventProcessor::spawn(settings(uri)).expect("spawn");
    processor.record(vec![skip_rate(service("host-1"), 1)]);
    processor.flush();
    wait_until("the payload dropped", || processor.dropped_events() == 2);
    assert_eq!(processor.posted_payloads(), 0);
    processor.stop();
}

/// After `status`, nothing more is posted, however much is recorded and flushed.
fn refused_key_stops_all_posts(status: u16) {
    let fake = FakeLd::start();
    fake.fail_next(1, status);
    let processor = start(&fake);
    processor.record(vec![skip_rate(service("host-1"), 1)]);
    processor.flush();
    assert!(fake.wait_for_requests("/bulk", 1, TIMEOUT));
    for host in ["host-2", "host-3"] {
        processor.record(vec![skip_rate(service(host), 1)]);
        processor.flush();
    }
    // `stop` waits for the thread, so every flush asked for has been handled.
    processor.stop();
    let posts = fake.requests_to("/bulk");
    assert_eq!(posts.len(), 1, "{posts:?}");
    assert_eq!(posts[0].failed_with, Some(status));
}

#[test]
fn unauthorized_stops_all_further_posts() {
    refused_key_stops_all_posts(401);
}

#[test]
fn forbidden_stops_all_further_posts() {
    refused_key_stops_all_posts(403);
}

#[test]
fn index_events_beyond_capacity_are_dropped_and_counted() {
    let fake = FakeLd::start();
    // Room for two index events and the summary.
    let processor = EventProcessor::spawn(EventSettings {
        capacity: 3,
        ..settings(fake.uri())
    })
    .expect("spawn");
    let hosts = ["host-1", "host-2", "host-3", "host-4", "host-5"];
    processor.record(hosts.iter().map(|h| skip_rate(service(h), 1)).collect());
    let events = flush_and_wait(&fake, &processor, 1);
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!(of_kind(&events, "index").len(), 2);
    assert_eq!(
        summary(&events)["features"]["skip-rate"]["counters"][0]["count"],
        json!(5),
        "every evaluation is still counted"
    );
    assert_eq!(processor.dropped_events(), 3);
    processor.stop();
}

#[test]
fn stop_sends_what_is_held() {
    let fake = FakeLd::start();
    let processor = start(&fake);
    processor.record(vec![skip_rate(service("host-1"), 9)]);
    processor.stop();
    // No waiting: `stop` returns once the post is answered.
    let payloads = fake.bulk_payloads();
    assert_eq!(payloads.len(), 1, "{:?}", fake.requests());
    assert_eq!(
        summary(&payloads[0])["features"]["skip-rate"]["counters"][0]["count"],
        json!(9)
    );
}

#[test]
fn dropping_the_processor_sends_what_is_held() {
    let fake = FakeLd::start();
    let processor = start(&fake);
    processor.record(vec![skip_rate(service("host-1"), 1)]);
    drop(processor);
    assert!(fake.wait_for_bulk_payloads(1, TIMEOUT));
}

#[test]
fn sdk_key_never_appears_in_log_output() {
    capture_logs();
    let fake = FakeLd::start();
    fake.fail_next(2, 503);
    fake.fail_next(1, 401);
    let processor = start(&fake);
    processor.record(vec![skip_rate(service("host-1"), 1)]);
    processor.flush();
    wait_until("the payload dropped", || processor.dropped_events() == 2);
    processor.record(vec![skip_rate(service("host-2"), 1)]);
    processor.flush();
    assert!(fake.wait_for_requests("/bulk", 3, TIMEOUT));
    processor.stop();
    let lines = captured();
    assert!(
        lines.iter().any(|l| l.contains("401")),
        "the refusal is logged: {lines:#?}"
    );
    for line in &lines {
        assert!(!line.contains(SDK_KEY), "key leaked: {line}");
    }
}
