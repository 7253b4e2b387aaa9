//! The LaunchDarkly flag source against a fake LaunchDarkly service: the protocol (put,
//! patch, delete, heartbeats, polling with ETags), the connection rules (backoff, retryable
//! and fatal statuses, malformed events), evaluation of rollouts and rules through the flag
//! source, the state file across a restart, and the SDK key staying out of every log line.
//!
//! Each test waits for an event (a message on the channel, a request at the fake, a value in
//! the atomics) with a timeout; none sleeps for a fixed time to let something happen.

mod support;

use crossbeam_channel::{Receiver, unbounded};
use flagshed::config::Config;
use flagshed::flag_source::{FlagSource, SourceSettings};
use flagshed::flags::store::DataEvent;
use flagshed::flags::{FlagValues, Origin, SourceState};
use flagshed::launchdarkly::{self, LdHandle, LdMessage, LdSettings};
use serde_json::json;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::capture::{capture_logs, captured};
use support::daemon::TempDir;
use support::fake_ld::{FakeLd, number_flag};

/// Shaped like a real server-side key, and unique enough that finding it in a log line can
/// only mean it leaked.
const SDK_KEY: &str = "sdk-7f3a9c1e-52b4-4d0e-9a61-SECRETSECRET";

/// Generous: the events waited for take milliseconds, but CI machines stall.
const TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Helpers.

/// Waits until `done` holds; panics naming `what` after [`TIMEOUT`].
fn wait_until(what: &str, done: impl FnMut() -> bool) {
    support::capture::wait_until(what, TIMEOUT, done);
}

/// Receives messages until one matches `want`; returns it with everything received before.
fn recv_until(
    rx: &Receiver<LdMessage>,
    what: &str,
    want: impl Fn(&LdMessage) -> bool,
) -> (LdMessage, Vec<LdMessage>) {
    let deadline = Instant::now() + TIMEOUT;
    let mut before = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(msg) if want(&msg) => return (msg, before),
            Ok(msg) => before.push(msg),
            Err(_) => panic!("timed out waiting for {what}; got {before:?}"),
        }
    }
}

fn is_state(state: SourceState) -> impl Fn(&LdMessage) -> bool {
    move |m| matches!(m, LdMessage::State { state: s, .. } if *s == state)
}

/// A put whose `key` flag has `version`.
fn is_put_with(key: &'static str, version: u64) -> impl Fn(&LdMessage) -> bool {
    move |m| {
        matches!(m, LdMessage::Data(DataEvent::Put(all))
            if all.flags.get(key).is_some_and(|f| f.version == version))
    }
}

/// Settings for the LaunchDarkly thread alone, pointed at the fake, retrying after ~10 ms.
fn ld_settings(fake: &FakeLd) -> LdSettings {
    LdSettings {
        sdk_key: SDK_KEY.into(),
        stream: true,
        stream_uri: fake.uri(),
        base_uri: fake.uri(),
        poll_interval: Duration::from_secs(30),
        initial_retry_delay: Duration::from_millis(10),
        read_timeout: Duration::from_secs(60),
        proxy: None,
    }
}

fn start_ld(settings: LdSettings) -> (LdHandle, Receiver<LdMessage>) {
    let (tx, rx) = unbounded();
    let handle = launchdarkly::spawn(settings, tx).expect("spawn the LaunchDarkly thread");
    (handle, rx)
}

/// Settings for a whole flag source, as the daemons build them from a config file.
fn source_settings(
    stream_uri: &str,
    context_key: &str,
    queue: &str,
    state_file: Option<&Path>,
) -> SourceSettings {
    let state_file = state_file.map_or(String::new(), |p| p.display().to_string());
    let text = format!(
        r#"
        [flags]
        skip_rate_fallback = 7.5
        rate_fallback = 3.0
        context_key = "{context_key}"

        [launchdarkly]
        sdk_key = "{SDK_KEY}"
        stream_uri = "{stream_uri}"
        base_uri = "{stream_uri}"
        events_uri = "{stream_uri}"
        startup_wait_ms = 5000
        state_file = "{state_file}"
        "#
    );
    let config = Config::parse(Path::new("launchdarkly-test.toml"), &text).expect("valid config");
    let mut settings = flagshed::service::source_settings(&config, flagshed::service::Role::Worker);
    settings.queue = queue.into();
    settings
}

fn start_source(settings: SourceSettings) -> (FlagSource, Arc<FlagValues>) {
    support::fake_ld::start_flag_source(settings)
}

/// A fake serving skip-rate 25 % and task-rate 40/s.
fn fake_with_flags() -> FakeLd {
    let fake = FakeLd::start();
    fake.set_flag(number_flag("skip-rate", 1, 25.0));
    fake.set_flag(number_flag("task-rate", 1, 40.0));
    fake
}

// ---------------------------------------------------------------------------------------------
// Streaming through the flag source: values in the atomics.

#[test]
fn initial_put_sets_values() {
    capture_logs();
    let fake = fake_with_flags();
    let (_source, values) = start_source(source_settings(&fake.uri(), "host-a", "jobs", None));
    // `spawn` returns once the first put is applied (or after the startup wait).
    assert_eq!(values.skip_rate(), 25.0);
    assert_eq!(values.rate_per_sec(), 40.0);
    assert_eq!(values.origin(), Origin::Live);
    wait_until("state valid", || values.state() == SourceState::Valid);
}

#[test]
fn stream_request_carries_launchdarkly_headers() {
    capture_logs();
    let fake = fake_with_flags();
    let (_source, _values) = start_source(source_settings(&fake.uri(), "host-a", "jobs", None));
    let requests = fake.requests_to("/all");
    let request = requests.first().expect("one stream request");
    assert_eq!(request.header("authorization"), Some(SDK_KEY));
    assert_eq!(
        request.header("user-agent"),
        Some(concat!("flagshed/", env!("CARGO_PKG_VERSION")))
    );
    assert_eq!(request.header("accept"), Some("text/event-stream"));
    assert_eq!(
        request.header("x-launchdarkly-tags"),
        Some(concat!(
            "application-id/flagshed application-version/",
            env!("CARGO_PKG_VERSION")
        ))
    );
}

#[test]
fn patch_changes_values() {
    capture_logs();
    let fake = fake_with_flags();
    let (_source, values) = start_source(source_settings(&fake.uri(), "host-a", "jobs", None));
    assert_eq!(values.skip_rate(), 25.0);
    fake.push_patch_flag(number_flag("skip-rate", 2, 60.0));
    wait_until("skip rate 60", || values.skip_rate() == 60.0);
    assert_eq!(values.rate_per_sec(), 40.0);
}

#[test]
fn stale_patch_is_ignored() {
    capture_logs();
    let fake = FakeLd::start();
    fake.set_flag(number_flag("skip-rate", 5, 25.0));
    fake.set_flag(number_flag("task-rate", 1, 40.0));
    let (_source, values) = start_source(source_settings(&fake.uri(), "host-a", "jobs", None));
    assert_eq!(values.skip_rate(), 25.0);
    fake.push_patch_flag_only(number_flag("skip-rate", 4, 90.0));
    fake.push_patch_flag_only(number_flag("skip-rate", 5, 91.0));
    // Events are applied in order: once this later one shows, the stale ones were seen.
    fake.push_patch_flag(number_flag("task-rate", 2, 41.0));
    wait_until("task rate 41", || values.rate_per_sec() == 41.0);
    assert_eq!(values.skip_rate(), 25.0);
}

#[test]
fn delete_falls_back_to_the_config_fallback() {
    capture_logs();
    let fake = fake_with_flags();
    let (_source, values) = start_source(source_settings(&fake.uri(), "host-a", "jobs", None));
    assert_eq!(values.skip_rate(), 25.0);
    fake.push_delete_flag("skip-rate", 2);
    wait_until("skip rate back to the 7.5 fallback", || {
        values.skip_rate() == 7.5
    });
    // The tombstone keeps version 2: an older patch cannot bring the flag back.
    fake.push_patch_flag_only(number_flag("skip-rate", 1, 50.0));
    fake.push_patch_flag(number_flag("task-rate", 2, 41.0));
    wait_until("task rate 41", || values.rate_per_sec() == 41.0);
    assert_eq!(values.skip_rate(), 7.5);
}

// ---------------------------------------------------------------------------------------------
// Connection rules, on the LaunchDarkly thread alone.

#[test]
fn heartbeats_keep_the_connection() {
    capture_logs();
    let fake = fake_with_flags();
    // Heartbeats go out 40 times per read timeout: only a test thread held up for the whole
    // timeout (2 s) could make the connection look silent. The kernel's socket timeout is the
    // one clock here that a test cannot drive.
    let read_timeout = Duration::from_secs(2);
    let (_handle, rx) = start_ld(LdSettings {
        read_timeout,
        ..ld_settings(&fake)
    });
    recv_until(&rx, "valid", is_state(SourceState::Valid));
    // Quiet for longer than the read timeout, but never for a whole timeout at a stretch.
    let until = Instant::now() + read_timeout * 5 / 2;
    while Instant::now() < until {
        fake.push_heartbeat();
        std::thread::sleep(read_timeout / 40);
    }
    assert_eq!(fake.requests_to("/all").len(), 1, "no reconnection");
    assert_eq!(fake.open_streams(), 1);
    // Without heartbeats, the same connection is declared dead and replaced.
    assert!(fake.wait_for_requests("/all", 2, TIMEOUT), "reconnected");
    let (msg, _) = recv_until(&rx, "interrupted", is_state(SourceState::Interrupted));
    let LdMessage::State { reason, .. } = msg else {
        unreachable!()
    };
    assert!(reason.contains("timed out"), "{reason}");
}

#[test]
fn dropped_connection_reconnects_with_backoff_and_applies_the_new_put() {
    capture_logs();
    let fake = fake_with_flags();
    let base = Duration::from_millis(200);
    let (_handle, rx) = start_ld(LdSettings {
        initial_retry_delay: base,
        ..ld_settings(&fake)
    });
    recv_until(&rx, "first put", is_put_with("skip-rate", 1));
    recv_until(&rx, "valid", is_state(SourceState::Valid));
    fake.set_flag(number_flag("skip-rate", 2, 70.0));
    let dropped = Instant::now();
    fake.drop_streams();
    recv_until(&rx, "interrupted", is_state(SourceState::Interrupted));
    recv_until(&rx, "put after reconnecting", is_put_with("skip-rate", 2));
    recv_until(&rx, "valid again", is_state(SourceState::Valid));
    let requests = fake.requests_to("/all");
    assert_eq!(requests.len(), 2, "exactly one reconnection");
    let waited = requests[1].at.duration_since(dropped);
    assert!(
        waited >= base / 2,
        "reconnected after {waited:?}, before the backoff of at least {:?}",
        base / 2
    );
}

#[test]
fn server_errors_are_retried_with_growing_delays() {
    capture_logs();
    let fake = fake_with_flags();
    fake.fail_next(3, 500);
    let (_handle, rx) = start_ld(ld_settings(&fake));
    let (_, before) = recv_until(&rx, "put after the errors", is_put_with("skip-rate", 1));
    assert!(
        before
            .iter()
            .any(|m| matches!(m, LdMessage::State { state: SourceState::Interrupted, reason } if reason.contains("500"))),
        "{before:?}"
    );
    recv_until(&rx, "valid", is_state(SourceState::Valid));
    let at: Vec<Instant> = fake.requests_to("/all").iter().map(|r| r.at).collect();
    assert_eq!(at.len(), 4, "three failures, then a stream");
    // Delays of 10, 20 and 40 ms, each less at most half for jitter.
    for (i, min_ms) in [5, 10, 20].into_iter().enumerate() {
        let gap = at[i + 1].duration_since(at[i]);
        assert!(
            gap >= Duration::from_millis(min_ms),
            "attempt {} came {gap:?} after the previous one",
            i + 2
        );
    }
}

#[test]
fn rate_limited_and_bad_request_statuses_are_retried() {
    capture_logs();
    let fake = fake_with_flags();
    fake.fail_next(1, 429);
    fake.fail_next(1, 400);
    fake.fail_next(1, 503);
    let (_handle, rx) = start_ld(ld_settings(&fake));
    recv_until(&rx, "put after the errors", is_put_with("skip-rate", 1));
    assert_eq!(fake.requests_to("/all").len(), 4);
}

#[test]
fn unauthorized_turns_the_source_off_and_stops_trying() {
    capture_logs();
    let fake = fake_with_flags();
    fake.fail_next(100, 401);
    let (_handle, rx) = start_ld(ld_settings(&fake));
    let (msg, _) = recv_until(&rx, "off", is_state(SourceState::Off));
    let LdMessage::State { reason, .. } = msg else {
        unreachable!()
    };
    assert!(reason.contains("401"), "{reason}");
    // With a 10 ms base delay, a retrying source would have tried many times by now.
    let window = Duration::from_millis(500);
    assert!(
        rx.recv_timeout(window).is_err(),
        "nothing more after giving up"
    );
    assert_eq!(fake.requests_to("/all").len(), 1, "no further attempts");
}

#[test]
fn forbidden_turns_the_flag_source_off_and_keeps_fallbacks() {
    capture_logs();
    let fake = fake_with_flags();
    fake.fail_next(100, 403);
    let (_source, values) = start_source(source_settings(&fake.uri(), "host-a", "jobs", None));
    wait_until("state off", || values.state() == SourceState::Off);
    assert_eq!(values.skip_rate(), 7.5);
    assert_eq!(values.origin(), Origin::Fallback);
}

#[test]
fn malformed_event_is_logged_and_skipped_and_the_stream_recovers() {
    capture_logs();
    let fake = fake_with_flags();
    let (_handle, rx) = start_ld(ld_settings(&fake));
    recv_until(&rx, "first put", is_put_with("skip-rate", 1));
    recv_until(&rx, "valid", is_state(SourceState::Valid));
    fake.set_flag(number_flag("skip-rate", 3, 30.0));
    fake.push_raw("event: patch\ndata: {\"path\":\"/flags/skip-rate\",\"data\":{\"key\":\n\n");
    let (msg, before) = recv_until(&rx, "interrupted", is_state(SourceState::Interrupted));
    assert!(
        before.is_empty(),
        "the broken patch sent nothing: {before:?}"
    );
    let LdMessage::State { reason, .. } = msg else {
        unreachable!()
    };
    assert!(reason.contains("malformed \"patch\" event"), "{reason}");
    recv_until(&rx, "put after restarting", is_put_with("skip-rate", 3));
    recv_until(&rx, "valid again", is_state(SourceState::Valid));
    assert_eq!(fake.requests_to("/all").len(), 2);
    assert!(
        captured()
            .iter()
            .any(|l| l.contains("malformed \"patch\" event")),
        "the reason was logged"
    );
}

#[test]
fn unknown_events_are_ignored_without_reconnecting() {
    capture_logs();
    let fake = fake_with_flags();
    let (_handle, rx) = start_ld(ld_settings(&fake));
    recv_until(&rx, "valid", is_state(SourceState::Valid));
    fake.push_raw("event: something-new\ndata: whatever\n\nid: 4\nretry: 10\n\n");
    fake.push_patch_flag(number_flag("skip-rate", 2, 26.0));
    let (msg, before) = recv_until(&rx, "the patch", |m| matches!(m, LdMessage::Data(_)));
    assert!(before.is_empty(), "{before:?}");
    assert!(matches!(msg, LdMessage::Data(DataEvent::PatchFlag(f)) if f.version == 2));
    assert_eq!(fake.requests_to("/all").len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Polling.

#[test]
fn polling_applies_changes_and_honours_the_etag() {
    capture_logs();
    let fake = fake_with_flags();
    let (_handle, rx) = start_ld(LdSettings {
        stream: false,
        poll_interval: Duration::from_millis(20),
        ..ld_settings(&fake)
    });
    recv_until(&rx, "first poll", is_put_with("skip-rate", 1));
    let first_tag = fake.etag();
    assert!(fake.wait_for_requests("/sdk/latest-all", 4, TIMEOUT));
    fake.set_flag(number_flag("skip-rate", 2, 50.0));
    let (_, before) = recv_until(&rx, "changed data", is_put_with("skip-rate", 2));
    assert!(
        !before.iter().any(|m| matches!(m, LdMessage::Data(_))),
        "304s carry no data: {before:?}"
    );
    let requests = fake.requests_to("/sdk/latest-all");
    assert_eq!(requests[0].header("if-none-match"), None);
    assert_eq!(requests[0].header("authorization"), Some(SDK_KEY));
    assert_eq!(
        requests[1].header("if-none-match"),
        Some(first_tag.as_str())
    );
    assert!(
        requests[1..]
            .iter()
            .all(|r| r.header("if-none-match").is_some()),
        "every later poll is conditional"
    );
}

#[test]
fn polling_retries_errors_and_gives_up_on_unauthorized() {
    capture_logs();
    let fake = fake_with_flags();
    fake.fail_next(2, 500);
    let (_handle, rx) = start_ld(LdSettings {
        stream: false,
        poll_interval: Duration::from_millis(20),
        ..ld_settings(&fake)
    });
    recv_until(&rx, "poll after the errors", is_put_with("skip-rate", 1));
    recv_until(&rx, "valid", is_state(SourceState::Valid));
    fake.fail_next(100, 401);
    recv_until(&rx, "off", is_state(SourceState::Off));
    let count = fake.requests_to("/sdk/latest-all").len();
    assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
    assert_eq!(fake.requests_to("/sdk/latest-all").len(), count);
}

// ---------------------------------------------------------------------------------------------
// Evaluation through the flag source.

/// skip-rate: a rule serving 90 to the `billing` queue, else a 50/50 rollout of 10 and 60 on
/// the context key.
fn rollout_flag() -> serde_json::Value {
    json!({
        "key": "skip-rate", "version": 1, "on": true, "salt": "rollout-salt",
        "variations": [10, 60, 90], "offVariation": 0,
        "rules": [{"id": "billing", "variation": 2, "trackEvents": false,
                   "clauses": [{"contextKind": "service", "attribute": "queue", "op": "in",
                                "values": ["billing"], "negate": false}]}],
        // A rollout buckets the context of `contextKind`, `user` when absent: this daemon's
        // context is a `service`.
        "fallthrough": {"rollout": {"contextKind": "service", "bucketBy": "key",
                        "variations": [{"variation": 0, "weight": 50000},
                                       {"variation": 1, "weight": 50000}]}},
        "targets": [], "contextTargets": [], "prerequisites": [],
        "trackEvents": false, "deleted": false
    })
}

#[test]
fn rollout_and_rule_give_the_documented_buckets() {
    capture_logs();
    let fake = FakeLd::start();
    fake.set_flag(rollout_flag());
    // LaunchDarkly's bucketing, computed independently of the evaluator with
    //   python3 -c 'import hashlib;[print(k, int(hashlib.sha1(("skip-rate.rollout-salt."+k)
    //     .encode()).hexdigest()[:15],16)/0xFFFFFFFFFFFFFFF) for k in ["host-a","host-b",
    //     "host-c","host-e"]]'
    let buckets = [
        ("host-a", 0.5647626198649137),
        ("host-b", 0.41583509986207584),
        ("host-c", 0.15045437912955584),
        ("host-e", 0.6543852742579784),
    ];
    for (context_key, bucket) in buckets {
        let expected = if bucket < 0.5 { 10.0 } else { 60.0 };
        let (_source, values) =
            start_source(source_settings(&fake.uri(), context_key, "jobs", None));
        assert_eq!(
            values.skip_rate(),
            expected,
            "context {context_key} in bucket {bucket}"
        );
    }
    // The rule wins over the rollout, whatever the bucket.
    for context_key in ["host-a", "host-b"] {
        let (_source, values) =
            start_source(source_settings(&fake.uri(), context_key, "billing", None));
        assert_eq!(values.skip_rate(), 90.0, "context {context_key} on billing");
    }
}

// ---------------------------------------------------------------------------------------------
// The state file.

#[test]
fn restart_with_launchdarkly_unreachable_starts_from_the_state_file() {
    capture_logs();
    let dir = TempDir::new("ld-state");
    let state_file = dir.path().join("flags-state.json");
    let fake = fake_with_flags();
    {
        let (_source, values) = start_source(source_settings(
            &fake.uri(),
            "host-a",
            "jobs",
            Some(&state_file),
        ));
        fake.push_patch_flag(number_flag("skip-rate", 2, 33.0));
        wait_until("skip rate 33", || values.skip_rate() == 33.0);
        wait_until("state file with the patch", || {
            std::fs::read(&state_file)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .is_some_and(|v| v["flags"]["skip-rate"]["version"] == 2)
        });
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read the state directory")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name != "flags-state.json")
        .collect();
    assert!(
        leftovers.is_empty(),
        "no temporary files left: {leftovers:?}"
    );

    // Nothing listens on this port any more.
    let unreachable = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", listener.local_addr().expect("addr"))
    };
    let mut settings = source_settings(&unreachable, "host-a", "jobs", Some(&state_file));
    settings.launchdarkly.startup_wait = Duration::from_millis(300);
    let (_source, values) = start_source(settings);
    assert_eq!(values.skip_rate(), 33.0);
    assert_eq!(values.rate_per_sec(), 40.0);
    assert_eq!(values.origin(), Origin::Cached);
    wait_until("state interrupted", || {
        values.state() == SourceState::Interrupted
    });
}

// ---------------------------------------------------------------------------------------------
// The key stays secret.

#[test]
fn sdk_key_never_appears_in_log_output() {
    capture_logs();
    let fake = fake_with_flags();
    // Every path that logs: errors, refusals, a malformed event, polling, an unreachable host.
    fake.fail_next(1, 500);
    fake.fail_next(1, 401);
    let (_source, values) = start_source(source_settings(&fake.uri(), "host-a", "jobs", None));
    wait_until("state off", || values.state() == SourceState::Off);

    let fake = fake_with_flags();
    let (handle, rx) = start_ld(ld_settings(&fake));
    recv_until(&rx, "valid", is_state(SourceState::Valid));
    fake.push_raw("event: put\ndata: nonsense\n\n");
    recv_until(&rx, "interrupted", is_state(SourceState::Interrupted));
    recv_until(&rx, "valid again", is_state(SourceState::Valid));
    handle.stop();

    let (handle, rx) = start_ld(LdSettings {
        stream: false,
        poll_interval: Duration::from_millis(20),
        ..ld_settings(&fake)
    });
    recv_until(&rx, "polled", is_state(SourceState::Valid));
    handle.stop();

    let mut settings = ld_settings(&fake);
    settings.stream_uri = "http://127.0.0.1:1".into();
    let (handle, rx) = start_ld(settings.clone());
    let (msg, _) = recv_until(&rx, "interrupted", is_state(SourceState::Interrupted));
    handle.stop();

    let lines = captured();
    assert!(
        lines.iter().any(|l| l.contains("flag source off")),
        "the flag source's own lines were captured"
    );
    assert!(
        lines.iter().any(|l| l.contains("Authorization: ***")),
        "ureq's request lines, key masked, were captured too"
    );
    for line in &lines {
        assert!(!line.contains(SDK_KEY), "the SDK key leaked: {line}");
    }
    for text in [format!("{msg:?}"), format!("{settings:?}")] {
        assert!(!text.contains(SDK_KEY), "the SDK key leaked: {text}");
    }
}
