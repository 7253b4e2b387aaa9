//! No received job ends without a recorded final state, whatever path hands it back to the
//! queue: a job past its deadline and its AMQP `expiration` (set as taskqueuer sets them) is
//! recorded `expired` rather than handed to RabbitMQ, which would drop it unseen. One test
//! per path: a retry, a drain, a pause, a lost connection, a handler that could not reach its
//! service. Each checks the ledger file: every job's last line is a final state.

mod support;

use amiquip::{AmqpProperties, AmqpValue, FieldTable};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::broker::{TestBroker, now_ms, timing_headers, unique_name};
use support::daemon::{
    Bin, Daemon, Ledger, TempDir, TestConfig, final_states, ledger_lines, toml_str,
};

const WAIT: Duration = Duration::from_secs(60);

/// How long the expiring jobs live: long enough to be received and queued behind the long
/// job on a busy machine, short enough to keep the tests quick.
const TTL_MS: u64 = 1_500;

/// A job as taskqueuer publishes one: `x-created-ms`, `x-deadline-ms` and `x-work-ms`, and an
/// `expiration` equal to its time-to-live. Returns it with the moment it can no longer be
/// delivered again.
fn expiring_job(id: &str, work_ms: u64) -> (AmqpProperties, u64) {
    let created = now_ms();
    let mut headers = timing_headers(created, TTL_MS);
    headers.insert("x-work-ms".into(), AmqpValue::LongLongInt(work_ms as i64));
    let properties = AmqpProperties::default()
        .with_message_id(id.to_owned())
        .with_headers(headers)
        .with_expiration(TTL_MS.to_string())
        .with_timestamp(created / 1000);
    (properties, created + TTL_MS)
}

/// A job without a deadline that keeps the worker's only pool thread busy for `work_ms`.
fn long_job(id: &str, work_ms: u64) -> AmqpProperties {
    let mut headers = FieldTable::new();
    headers.insert("x-work-ms".into(), AmqpValue::LongLongInt(work_ms as i64));
    AmqpProperties::default()
        .with_message_id(id.to_owned())
        .with_headers(headers)
}

/// Waits until the clock passes `ms` (Unix epoch): the event these tests wait for is a
/// job's expiration.
fn wait_until(ms: u64) {
    while now_ms() <= ms {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Every job's last line in the ledger file, by id.
fn last_states(ledger_file: &Path) -> BTreeMap<String, String> {
    ledger_lines(ledger_file).into_iter().collect()
}

/// Asserts that every job in `ids` ended in a final state, the last one recorded for it.
fn assert_all_final(ledger_file: &Path, ids: &[&str]) -> BTreeMap<String, String> {
    let last = last_states(ledger_file);
    let finals = final_states();
    for id in ids {
        let state = last.get(*id).map(String::as_str);
        assert!(
            state.is_some_and(|s| finals.contains(&s)),
            "job {id}: last recorded state {state:?}; ledger: {last:?}"
        );
    }
    last
}

/// A queue, a temp dir and a worker config with a ledger file, for one test.
struct Setup {
    broker: TestBroker,
    queue: String,
    dir: TempDir,
    ledger_file: PathBuf,
}

impl Setup {
    fn new(what: &str) -> Setup {
        let mut broker = TestBroker::connect();
        let queue = unique_name(what);
        broker.owns_queue(&queue);
        let dir = TempDir::new(what);
        let ledger_file = dir.path().join("ledger.jsonl");
        Setup {
            broker,
            queue,
            dir,
            ledger_file,
        }
    }

    /// One pool thread, so the expiring jobs wait behind the long one.
    fn config(&self) -> TestConfig {
        TestConfig::new(&self.queue)
            .set("worker", "concurrency", "1")
            .set("worker", "prefetch", "10")
            .set(
                "worker",
                "ledger_file",
                &toml_str(&self.ledger_file.display().to_string()),
            )
    }

    /// Publishes a long job, then four expiring ones that wait behind it in the worker;
    /// returns their ids and when they expire, once the worker holds all five.
    fn expiring_jobs_wait_behind_a_long_one(&self, worker: &Daemon) -> (Vec<String>, u64) {
        self.broker
            .publish_properties(&self.queue, long_job("long", 4_000), b"");
        let mut ids = Vec::new();
        let mut expires = 0;
        for i in 0..4 {
            let id = format!("short-{i}");
            let (properties, until) = expiring_job(&id, 10);
            self.broker.publish_properties(&self.queue, properties, b"");
            ids.push(id);
            expires = expires.max(until);
        }
        worker.wait_for_stats(|s| s.get("received") == 5);
        (ids, expires)
    }
}

fn start(config: &Path) -> Daemon {
    let worker = Daemon::start(Bin::Worker, config);
    worker.wait_for_line("consuming from queue", WAIT);
    worker
}

/// The expiring jobs ended `expired`, the long one `done`, nothing was requeued, and the
/// queue is empty: nothing was handed to RabbitMQ to drop.
fn assert_shorts_expired(setup: &Setup, ledger: &Ledger, shorts: &[String]) {
    ledger.assert_balanced();
    assert_eq!(ledger.get("expired"), 4, "{ledger:?}");
    assert_eq!(ledger.get("requeued"), 0, "{ledger:?}");
    assert_eq!(ledger.get("handed_back_late"), 0, "{ledger:?}");
    let mut ids: Vec<&str> = shorts.iter().map(String::as_str).collect();
    ids.push("long");
    let last = assert_all_final(&setup.ledger_file, &ids);
    for id in shorts {
        assert_eq!(last[id], "expired", "{last:?}");
    }
    assert_eq!(last["long"], "done", "{last:?}");
    assert_eq!(setup.broker.ready_count(&setup.queue), 0);
}

/// A worker whose exec handler asks for every job to be retried later (exit status 75).
fn always_later(setup: &Setup) -> TestConfig {
    let later = setup.dir.write("later.sh", "#!/bin/sh\nexit 75\n");
    std::fs::set_permissions(&later, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    setup.config().set("handler", "kind", "\"exec\"").set(
        "handler",
        "command",
        &format!("[{}]", toml_str(&later.display().to_string())),
    )
}

#[test]
fn a_retry_that_would_come_after_the_expiration_ends_expired() {
    let setup = Setup::new("handback-retry");
    let config = always_later(&setup)
        .set("handler", "max_retries", "100")
        .set("handler", "retry_delay_ms", "400")
        .write(&setup.dir, "flagshed.toml");
    let mut worker = start(&config);
    let (properties, expires) = expiring_job("later", 10);
    setup
        .broker
        .publish_properties(&setup.queue, properties, b"");
    // Retried every 400 ms until the next retry would come after the expiration.
    let stats = worker.wait_for_stats(|s| s.get("expired") == 1 && s.get("in_flight") == 0);
    assert!(now_ms() >= expires - 400, "ended early: {stats:?}");
    let ledger = worker.stop();
    ledger.assert_balanced();
    assert!(ledger.get("retried") >= 1, "{ledger:?}");
    assert_eq!(ledger.get("expired"), 1, "{ledger:?}");
    assert_eq!(ledger.get("failed"), 0, "{ledger:?}");
    assert_all_final(&setup.ledger_file, &["later"]);
    assert_eq!(setup.broker.ready_count(&setup.queue), 0);
    assert!(
        worker
            .log()
            .contains("but its deadline or expiration comes before handler.retry_delay_ms"),
        "{}",
        worker.log()
    );
}

#[test]
fn a_retry_delay_longer_than_the_time_left_ends_the_job_at_once() {
    let setup = Setup::new("handback-retry-long");
    let config = always_later(&setup)
        .set("handler", "retry_delay_ms", "2000")
        .write(&setup.dir, "flagshed.toml");
    let mut worker = start(&config);
    let (properties, expires) = expiring_job("later", 10);
    setup
        .broker
        .publish_properties(&setup.queue, properties, b"");
    worker.wait_for_stats(|s| s.get("expired") == 1 && s.get("in_flight") == 0);
    assert!(now_ms() < expires, "not held for the retry delay");
    let ledger = worker.stop();
    ledger.assert_balanced();
    assert_eq!(ledger.get("retried"), 0, "{ledger:?}");
    assert_eq!(ledger.get("expired"), 1, "{ledger:?}");
    assert_eq!(last_states(&setup.ledger_file)["later"], "expired");
    assert_eq!(setup.broker.ready_count(&setup.queue), 0);
}

#[test]
fn a_drain_records_unstarted_jobs_past_their_expiration() {
    let setup = Setup::new("handback-drain");
    let config = setup.config().write(&setup.dir, "flagshed.toml");
    let mut worker = start(&config);
    let (shorts, expires) = setup.expiring_jobs_wait_behind_a_long_one(&worker);
    wait_until(expires);
    let ledger = worker.stop();
    assert_shorts_expired(&setup, &ledger, &shorts);
}

#[test]
fn a_pause_records_unstarted_jobs_past_their_expiration() {
    let setup = Setup::new("handback-pause");
    let flags = |paused: bool| format!(r#"{{"flagValues": {{"pause": {paused}}}}}"#);
    let config = setup
        .config()
        .flag_file(&setup.dir, &flags(false))
        .set("flags", "pause_key", "\"pause\"")
        .set("flags", "file_check_ms", "50")
        .write(&setup.dir, "flagshed.toml");
    let mut worker = start(&config);
    let (shorts, expires) = setup.expiring_jobs_wait_behind_a_long_one(&worker);
    wait_until(expires);
    setup.dir.write("flags.json", &flags(true));
    worker.wait_for_line("paused by flag", WAIT);
    worker.wait_for_new_stats(|s| s.get("expired") == 4 && s.get("done") == 1);
    let ledger = worker.stop();
    assert_shorts_expired(&setup, &ledger, &shorts);
}

#[test]
fn a_lost_connection_records_held_jobs_past_their_expiration() {
    let setup = Setup::new("handback-lost");
    let config = setup.config().write(&setup.dir, "flagshed.toml");
    let mut worker = start(&config);
    let (shorts, expires) = setup.expiring_jobs_wait_behind_a_long_one(&worker);
    wait_until(expires);
    let closed = support::broker::close_connections_matching(&format!("queue={} ", setup.queue));
    assert_eq!(closed, 1, "one worker connection");
    worker.wait_for_line("reconnected to RabbitMQ", WAIT);
    // The long job comes back on the new connection and runs again; the expired ones do not.
    worker.wait_for_new_stats(|s| s.get("done") == 1 && s.get("in_flight") == 0);
    let ledger = worker.stop();
    assert_eq!(
        ledger.get("returned"),
        1,
        "only the long job went back: {ledger:?}"
    );
    assert_shorts_expired(&setup, &ledger, &shorts);
    assert!(
        worker
            .log()
            .contains("4 past their deadline or expiration are recorded"),
        "{}",
        worker.log()
    );
}

#[test]
fn a_job_its_handler_could_not_reach_before_its_expiration_ends_expired() {
    let setup = Setup::new("handback-unavailable");
    // A service that never accepts: the connection attempt times out after 2 s, when the
    // job's expiration (1.5 s, its deadline a minute away) has passed.
    let (_listener, port, _filling) = support::http_server::full_listener();
    let config = setup
        .config()
        .set("handler", "kind", "\"http\"")
        .set(
            "handler",
            "url",
            &toml_str(&format!("http://127.0.0.1:{port}/jobs")),
        )
        .set("handler", "connect_timeout_ms", "2000")
        .write(&setup.dir, "flagshed.toml");
    let mut worker = start(&config);
    let (mut properties, expires) = expiring_job("unreached", 10);
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(
        "x-deadline-ms".into(),
        AmqpValue::LongLongInt((now_ms() + 60_000) as i64),
    );
    properties = properties.with_headers(headers);
    setup
        .broker
        .publish_properties(&setup.queue, properties, b"");
    worker.wait_for_line("handler unavailable", WAIT);
    worker.wait_for_stats(|s| s.get("expired") == 1 && s.get("in_flight") == 0);
    assert!(now_ms() >= expires);
    let ledger = worker.stop();
    ledger.assert_balanced();
    assert_eq!(ledger.get("expired"), 1, "{ledger:?}");
    assert_eq!(ledger.get("requeued"), 0, "{ledger:?}");
    assert_eq!(ledger.get("failed"), 0, "{ledger:?}");
    assert_eq!(last_states(&setup.ledger_file)["unreached"], "expired");
    assert_eq!(setup.broker.ready_count(&setup.queue), 0);
}
