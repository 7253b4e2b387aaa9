//! taskworker against the real RabbitMQ: every job ends in exactly one recorded state.

mod support;

use amiquip::AmqpValue;
use std::time::Duration;
use support::broker::{TestBroker, death_reason, now_ms, unique_name};
use support::daemon::{Bin, Daemon, TempDir, TestConfig, toml_str};

const WAIT: Duration = Duration::from_secs(60);

fn int(ms: u64) -> AmqpValue {
    AmqpValue::LongLongInt(ms as i64)
}

/// Starts a worker on `config`, then a queuer that publishes its `max_jobs`; waits for the
/// queuer to finish with every publish confirmed. Returns the running worker and the number of
/// jobs published.
fn publish_to_a_worker(config: &std::path::Path) -> (Daemon, u64) {
    let worker = Daemon::start(Bin::Worker, config);
    worker.wait_for_line("consuming from queue", WAIT);
    let mut queuer = Daemon::start(Bin::Queuer, config);
    assert!(queuer.wait_exit(WAIT * 2).success(), "{}", queuer.log());
    let published = queuer.final_ledger();
    assert_eq!(published.get("unconfirmed"), 0, "{published:?}");
    (worker, published.get("published"))
}

#[test]
fn end_to_end_published_jobs_are_processed_and_acked() {
    let mut broker = TestBroker::connect();
    let queue = unique_name("e2e");
    broker.owns_queue(&queue);
    let dir = TempDir::new("e2e");
    let config = TestConfig::new(&queue)
        .flag_file(
            &dir,
            r#"{"flagValues": {"task-rate": 500, "skip-rate": 0}}"#,
        )
        .set("queuer", "max_jobs", "200")
        .set("queuer", "work_ms", "0")
        .set("queuer", "ttl_ms", "60000")
        .set("worker", "prefetch", "20")
        .write(&dir, "flagshed.toml");

    let (mut worker, published) = publish_to_a_worker(&config);
    assert_eq!(published, 200);

    worker.wait_settled(200);
    let ledger = worker.stop();
    assert_eq!(ledger.get("received"), 200);
    assert_eq!(ledger.get("done"), 200);
    assert_eq!(ledger.text("balanced"), "true");
    assert_eq!(broker.ready_count(&queue), 0, "every job was acked");
}

/// Overload with a deadline: the broker expires some jobs itself, the worker sheds others, and
/// a dead-letter queue keeps everything rejected or expired. Every confirmed job is accounted
/// for exactly once: acked by the worker, dead-lettered, or still queued.
#[test]
fn ledger_balances_under_overload() {
    let mut broker = TestBroker::connect();
    let queue = unique_name("overload");
    broker.owns_queue(&queue);
    let (dlx, dead) = broker.dead_letter_pair("overload");
    let dir = TempDir::new("overload");
    // Capacity: 2 threads x 100 ms = 20 jobs/s; offered 60 jobs/s; TTL 600 ms.
    let config = TestConfig::new(&queue)
        .set("broker", "dead_letter_exchange", &toml_str(&dlx))
        .flag_file(
            &dir,
            r#"{"flagValues": {"task-rate": 60, "skip-rate": 10}}"#,
        )
        .set("queuer", "max_jobs", "180")
        .set("queuer", "work_ms", "100")
        .set("queuer", "ttl_ms", "600")
        .set("worker", "concurrency", "2")
        .set("worker", "prefetch", "4")
        .write(&dir, "flagshed.toml");

    let (mut worker, published) = publish_to_a_worker(&config);
    assert_eq!(published, 180);

    // Wait until the queue is empty (served or expired by the broker) and the worker is idle.
    broker.wait_for_ready(&queue, "the queue empties", WAIT, |n| n == 0);
    worker.wait_for_new_stats(|s| s.get("in_flight") == 0);
    let ledger = worker.stop();
    let dead_letters = broker.drain(&dead);
    let expired_by_broker = dead_letters
        .iter()
        .filter(|p| death_reason(p).as_deref() == Some("expired"))
        .count() as u64;
    let rejected_by_worker = dead_letters
        .iter()
        .filter(|p| death_reason(p).as_deref() == Some("rejected"))
        .count() as u64;

    let acked = ledger.get("done") + ledger.get("late");
    let shed = ["failed", "skipped", "expired", "doomed", "malformed"]
        .iter()
        .map(|k| ledger.get(k))
        .sum::<u64>();
    assert_eq!(ledger.get("requeued"), 0);
    assert_eq!(ledger.text("balanced"), "true");
    assert_eq!(ledger.get("received"), acked + shed, "{ledger:?}");
    assert_eq!(
        rejected_by_worker, shed,
        "every shed job reached the dead-letter queue"
    );
    assert_eq!(
        published,
        ledger.get("received") + expired_by_broker + u64::from(broker.ready_count(&queue)),
        "published = received by the worker + expired in the broker + still queued; {ledger:?}"
    );
    assert!(
        ledger.get("done") > 0,
        "some jobs finish on time: {ledger:?}"
    );
    assert!(
        ledger.get("skipped") > 0,
        "the skip rate sheds some: {ledger:?}"
    );
}

#[test]
fn skip_share_matches_the_flag_within_one_point() {
    let mut broker = TestBroker::connect();
    let queue = unique_name("skip");
    broker.owns_queue(&queue);
    let dir = TempDir::new("skip");
    let config = TestConfig::new(&queue)
        .flag_file(
            &dir,
            r#"{"flagValues": {"task-rate": 20000, "skip-rate": 30}}"#,
        )
        .set("queuer", "max_jobs", "20000")
        .set("queuer", "work_ms", "0")
        .set("queuer", "ttl_ms", "600000")
        .set("queuer", "payload_bytes", "10")
        .set("worker", "prefetch", "200")
        .write(&dir, "flagshed.toml");

    let (mut worker, published) = publish_to_a_worker(&config);
    assert_eq!(published, 20_000);
    worker.wait_settled(20_000);
    let ledger = worker.stop();
    assert_eq!(ledger.get("received"), 20_000);
    let share = ledger.get("skipped") as f64 / 20_000.0 * 100.0;
    assert!(
        (29.0..=31.0).contains(&share),
        "skipped {share:.2}% with skip-rate 30"
    );
    assert_eq!(
        ledger.get("skipped") + ledger.get("done"),
        20_000,
        "{ledger:?}"
    );
}

#[test]
fn expired_and_doomed_jobs_are_dropped_without_running() {
    let mut broker = TestBroker::connect();
    let queue = unique_name("deadline");
    broker.declare(&queue, amiquip::FieldTable::new());
    let now = now_ms();
    // Already past its deadline.
    broker.publish(
        &queue,
        Some("past"),
        &[("x-deadline-ms", int(now - 1_000))],
        b"",
    );
    // 30 s left but needs 10 minutes of work: doomed.
    broker.publish(
        &queue,
        Some("hopeless"),
        &[
            ("x-deadline-ms", int(now + 30_000)),
            ("x-work-ms", int(600_000)),
        ],
        b"",
    );
    // Plenty of time, no work: done.
    broker.publish(
        &queue,
        Some("fine"),
        &[("x-deadline-ms", int(now + 60_000)), ("x-work-ms", int(0))],
        b"",
    );
    let dir = TempDir::new("deadline");
    let config = TestConfig::new(&queue)
        .set("worker", "concurrency", "1")
        .write(&dir, "flagshed.toml");
    let mut worker = Daemon::start(Bin::Worker, &config);
    worker.wait_settled(3);
    let ledger = worker.stop();
    assert_eq!(ledger.get("expired"), 1, "{ledger:?}");
    assert_eq!(ledger.get("doomed"), 1, "{ledger:?}");
    assert_eq!(ledger.get("done"), 1, "{ledger:?}");
    assert_eq!(
        ledger.get("late_work_ms"),
        0,
        "no work was spent on the dropped jobs"
    );
}

#[test]
fn malformed_job_is_rejected_counted_and_the_worker_goes_on() {
    let mut broker = TestBroker::connect();
    let queue = unique_name("malformed");
    let (dlx, dead) = broker.dead_letter_pair("malformed");
    let mut args = amiquip::FieldTable::new();
    args.insert(
        "x-dead-letter-exchange".into(),
        AmqpValue::LongString(dlx.clone()),
    );
    broker.declare(&queue, args);
    broker.publish(
        &queue,
        Some("bad-deadline"),
        &[("x-deadline-ms", AmqpValue::LongString("tomorrow".into()))],
        b"",
    );
    broker.publish(
        &queue,
        Some("negative-work"),
        &[
            ("x-work-ms", int(0)),
            ("x-created-ms", AmqpValue::LongInt(-3)),
        ],
        b"",
    );
    broker.publish(&queue, Some("good"), &[("x-work-ms", int(0))], b"");
    let dir = TempDir::new("malformed");
    let config = TestConfig::new(&queue)
        .set("broker", "durable", "false")
        .set("broker", "dead_letter_exchange", &toml_str(&dlx))
        .write(&dir, "flagshed.toml");
    let mut worker = Daemon::start(Bin::Worker, &config);
    worker.wait_settled(3);
    let warning = worker.wait_for_line("malformed job \"bad-deadline\"", WAIT);
    assert!(warning.contains("x-deadline-ms"), "{warning}");
    let ledger = worker.stop();
    assert_eq!(ledger.get("malformed"), 2, "{ledger:?}");
    assert_eq!(ledger.get("done"), 1, "{ledger:?}");
    let dead_letters = broker.drain(&dead);
    assert_eq!(
        dead_letters.len(),
        2,
        "malformed jobs are kept by the dead-letter exchange"
    );
}

#[test]
fn bad_config_is_refused_at_start_naming_file_and_key() {
    let dir = TempDir::new("badconfig");
    let config = dir.write("flagshed.toml", "[worker]\nconcurrency = 0\n");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_taskworker"))
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run taskworker");
    assert_eq!(output.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("worker.concurrency"), "{stderr}");
    assert!(stderr.contains(&config.display().to_string()), "{stderr}");
}

/// A broker that is not there yet is an error logged once, not once per retry; the worker
/// keeps trying, reports `broker=down`, and still stops cleanly.
#[test]
fn unreachable_broker_is_logged_once_and_retried() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let dir = TempDir::new("nobroker");
    let config = TestConfig::new("unused")
        .set(
            "broker",
            "url",
            &toml_str(&format!("amqp://u:secret-pw@127.0.0.1:{port}/%2f")),
        )
        .write(&dir, "flagshed.toml");
    let mut worker = Daemon::start(Bin::Worker, &config);
    let (i, _) = worker.wait_for_line_from(0, "broker=down", WAIT);
    // Several retries happen within a few stats periods (the first delays are sub-second).
    for _ in 0..4 {
        worker.wait_for_line_from(i + 1, "broker=down", WAIT);
    }
    let (i, _) = worker.wait_for_stats_from(i + 1, |_| true);
    worker.wait_for_stats_from(i + 1, |_| true);
    worker.signal(libc::SIGTERM);
    assert!(worker.wait_exit(WAIT).success());
    let log = worker.log();
    assert_eq!(
        log.matches("cannot connect to RabbitMQ").count(),
        1,
        "{log}"
    );
    assert!(
        !log.contains("secret-pw"),
        "the broker password leaked: {log}"
    );
}

#[test]
fn test_support_says_how_to_start_a_missing_broker() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let result = std::panic::catch_unwind(|| {
        TestBroker::connect_to(&format!("amqp://guest:guest@127.0.0.1:{port}/%2f"));
    });
    let panic = result.expect_err("connecting to a closed port must fail");
    let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("rabbitmq-server -detached"), "{message}");
}

/// SIGTERM under load: running jobs finish and are acked, unstarted ones go back to the queue,
/// and acked + requeued = received; nothing is lost.
#[test]
fn sigterm_drains_without_losing_a_job() {
    let mut broker = TestBroker::connect();
    let queue = unique_name("drain");
    broker.declare(&queue, amiquip::FieldTable::new());
    for i in 0..40 {
        broker.publish(
            &queue,
            Some(&format!("job-{i}")),
            &[("x-work-ms", int(300))],
            b"",
        );
    }
    let dir = TempDir::new("drain");
    let config = TestConfig::new(&queue)
        .set("worker", "concurrency", "2")
        .set("worker", "prefetch", "10")
        .write(&dir, "flagshed.toml");
    let mut worker = Daemon::start(Bin::Worker, &config);
    // Wait until work is under way: some done, some in flight.
    worker.wait_for_stats(|s| s.get("done") >= 2 && s.get("in_flight") >= 2);
    let ledger = worker.stop();
    assert_eq!(ledger.text("balanced"), "true", "{ledger:?}");
    assert_eq!(ledger.get("returned_unacked"), 0);
    assert!(
        ledger.get("requeued") > 0,
        "prefetched jobs went back: {ledger:?}"
    );
    assert_eq!(
        ledger.get("done") + ledger.get("requeued"),
        ledger.get("received")
    );
    let left = u64::from(broker.ready_count(&queue));
    assert_eq!(
        ledger.get("done") + left,
        40,
        "acked + left in the queue = published"
    );
}

/// The broker closes the worker's connection mid-load: the worker reconnects and resumes
/// within seconds, jobs it held are redelivered (never acked on the new channel), and every
/// job still ends `done` exactly once.
#[test]
fn worker_reconnects_after_the_broker_closes_its_connection() {
    let mut broker = TestBroker::connect();
    let queue = unique_name("reconnect");
    broker.declare(&queue, amiquip::FieldTable::new());
    for i in 0..40 {
        broker.publish(
            &queue,
            Some(&format!("job-{i}")),
            &[("x-work-ms", int(300))],
            b"",
        );
    }
    let dir = TempDir::new("reconnect");
    let config = TestConfig::new(&queue)
        .set("worker", "concurrency", "2")
        .set("worker", "prefetch", "4")
        .write(&dir, "flagshed.toml");
    let mut worker = Daemon::start(Bin::Worker, &config);
    worker.wait_for_stats(|s| s.get("done") >= 4);
    let closed = support::broker::close_connections_matching(&format!("queue={queue} "));
    assert_eq!(closed, 1, "one worker connection");
    worker.wait_for_line("lost RabbitMQ", WAIT);
    worker.wait_for_line("reconnected to RabbitMQ", WAIT);
    worker.wait_settled(40);
    let stats = worker.wait_for_stats(|s| s.get("done") == 40 && s.get("in_flight") == 0);
    assert!(stats.get("returned") > 0, "held jobs went back: {stats:?}");
    assert_eq!(
        stats.get("received"),
        40 + stats.get("returned"),
        "{stats:?}"
    );
    let ledger = worker.stop();
    assert_eq!(ledger.get("done"), 40);
    assert_eq!(ledger.text("balanced"), "true");
    assert_eq!(broker.ready_count(&queue), 0);
}

/// A job that never gets to finish (its worker is stopped, or crashes, every time it runs it)
/// does not come back forever: with a quorum queue's delivery limit, RabbitMQ dead-letters it
/// once it has been returned more times than the limit (here 1: at the second return).
#[test]
fn delivery_limit_stops_a_job_that_never_finishes_from_looping() {
    let mut broker = TestBroker::connect();
    let queue = unique_name("limit");
    broker.owns_queue(&queue);
    let (dlx, dead) = broker.dead_letter_pair("limit");
    let dir = TempDir::new("limit");
    let config = TestConfig::new(&queue)
        .set("broker", "durable", "true")
        .set("broker", "queue_type", "\"quorum\"")
        .set("broker", "delivery_limit", "1")
        .set("broker", "dead_letter_exchange", &toml_str(&dlx))
        .set("worker", "concurrency", "1")
        .set("worker", "drain_grace_ms", "50")
        .write(&dir, "flagshed.toml");
    // The worker declares the queue; the job is published once it exists.
    let mut worker = Daemon::start(Bin::Worker, &config);
    worker.wait_for_line("consuming from queue", WAIT);
    broker.publish(&queue, Some("endless"), &[("x-work-ms", int(600_000))], b"");
    // Two deliveries, each cut short by a stop whose grace is too short for the job; the job
    // goes back to the queue each time.
    for attempt in 1..=2 {
        worker.wait_for_stats(|s| s.get("received") == 1);
        let ledger = worker.stop();
        assert_eq!(
            ledger.get("returned_unacked"),
            1,
            "attempt {attempt}: {ledger:?}"
        );
        worker = Daemon::start(Bin::Worker, &config);
        worker.wait_for_line("consuming from queue", WAIT);
    }
    // The limit is reached: the job goes to the dead-letter queue, not to a worker.
    let end = std::time::Instant::now() + WAIT;
    let dead_letters = loop {
        let dead_letters = broker.drain(&dead);
        if !dead_letters.is_empty() {
            break dead_letters;
        }
        assert!(
            std::time::Instant::now() < end,
            "the job was never dead-lettered"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(dead_letters.len(), 1);
    assert_eq!(
        death_reason(&dead_letters[0]).as_deref(),
        Some("delivery_limit")
    );
    let ledger = worker.stop();
    assert_eq!(ledger.get("received"), 0, "{ledger:?}");
}
