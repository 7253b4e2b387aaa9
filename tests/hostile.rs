//! taskworker against hostile messages on the real RabbitMQ: huge bodies, timing headers of
//! every AMQP type, negative and overflowing numbers, deadlines at both ends of time, jobs
//! without an id, and bytes that are not UTF-8 where AMQP allows them.
//!
//! Each job gets a clear outcome (`malformed` with a warning naming the reason, or processed
//! like any other job), the worker goes on to finish a normal job published after them, and
//! the final ledger balances. The last tests record what the AMQP client does with bytes that
//! are not UTF-8, including the one message that takes the whole connection down.

mod support;

use amiquip::{AmqpValue, FieldTable};
use flagshed::job::{HEADER_CREATED_MS, HEADER_DEADLINE_MS, HEADER_WORK_MS, MAX_WORK_MS};
use std::time::Duration;
use support::broker::{TestBroker, amqp_url, now_ms, unique_name};
use support::daemon::{Bin, Daemon, Ledger, TempDir, TestConfig};
use support::raw_amqp::{RawMessage, RawPublisher, RawTable};

const WAIT: Duration = Duration::from_secs(60);

/// A fresh queue with a worker on it; jobs without `x-work-ms` take no time.
struct Scenario {
    broker: TestBroker,
    queue: String,
    dir: TempDir,
}

impl Scenario {
    fn new(what: &str) -> Scenario {
        let mut broker = TestBroker::connect();
        let queue = unique_name(what);
        broker.declare(&queue, FieldTable::new());
        Scenario {
            broker,
            queue,
            dir: TempDir::new(what),
        }
    }

    fn config(&self) -> TestConfig {
        TestConfig::new(&self.queue)
            .set("worker", "concurrency", "2")
            .set("worker", "default_work_ms", "0")
    }

    fn start_worker(&self, config: &TestConfig) -> Daemon {
        let path = config.write(&self.dir, "flagshed.toml");
        let worker = Daemon::start(Bin::Worker, &path);
        worker.wait_for_line("consuming from queue", WAIT);
        worker
    }

    fn publish(&self, id: Option<&str>, headers: &[(&str, AmqpValue)], body: &[u8]) {
        self.broker.publish(&self.queue, id, headers, body);
    }

    /// Publishes messages amiquip cannot build, each confirmed before the next.
    fn publish_raw(&self, messages: &[RawMessage]) {
        let mut raw = RawPublisher::connect(&amqp_url()).expect("raw AMQP connection");
        for message in messages {
            raw.publish(&self.queue, message)
                .expect("the broker takes the raw message");
        }
        raw.close().expect("close the raw AMQP connection");
    }
}

/// Publishes a normal job, waits until the worker settled it after the `before` jobs already
/// received, stops the worker and returns its balanced final ledger.
fn finish_with_a_normal_job(scenario: &Scenario, worker: &mut Daemon, before: u64) -> Ledger {
    worker.wait_settled(before);
    scenario.publish(
        Some("after"),
        &[(HEADER_WORK_MS, AmqpValue::LongInt(0))],
        b"",
    );
    worker.wait_settled(before + 1);
    let ledger = worker.stop();
    assert_eq!(ledger.get("received"), before + 1, "{ledger:?}");
    assert_eq!(ledger.get("received"), ledger.settled(), "{ledger:?}");
    assert_eq!(ledger.text("balanced"), "true", "{ledger:?}");
    assert_eq!(ledger.get("requeued"), 0, "{ledger:?}");
    assert_eq!(
        scenario.broker.ready_count(&scenario.queue),
        0,
        "every job was settled"
    );
    ledger
}

/// A decimal value; amiquip does not re-export its type, so it is built through serde.
fn decimal(scale: u8, value: u32) -> AmqpValue {
    serde_json::from_value(serde_json::json!({"DecimalValue": {"scale": scale, "value": value}}))
        .expect("a decimal AMQP value")
}

/// One value of every AMQP field type, named; the integer types hold 1.
fn one_of_every_type() -> Vec<(&'static str, AmqpValue, bool)> {
    let mut table = FieldTable::new();
    table.insert("ms".into(), AmqpValue::LongLongInt(1));
    vec![
        ("ShortShortInt", AmqpValue::ShortShortInt(1), true),
        ("ShortShortUInt", AmqpValue::ShortShortUInt(1), true),
        ("ShortInt", AmqpValue::ShortInt(1), true),
        ("ShortUInt", AmqpValue::ShortUInt(1), true),
        ("LongInt", AmqpValue::LongInt(1), true),
        ("LongUInt", AmqpValue::LongUInt(1), true),
        ("LongLongInt", AmqpValue::LongLongInt(1), true),
        ("Timestamp", AmqpValue::Timestamp(1), true),
        ("Boolean", AmqpValue::Boolean(true), false),
        ("Float", AmqpValue::Float(1.0), false),
        ("Double", AmqpValue::Double(1.0), false),
        ("DecimalValue", decimal(0, 1), false),
        ("LongString", AmqpValue::LongString("1".into()), false),
        (
            "FieldArray",
            AmqpValue::FieldArray(vec![AmqpValue::LongLongInt(1)]),
            false,
        ),
        ("FieldTable", AmqpValue::FieldTable(table), false),
        ("ByteArray", AmqpValue::ByteArray(vec![1]), false),
        ("Void", AmqpValue::Void, false),
    ]
}

#[test]
fn sixteen_mib_body_is_processed_and_the_worker_goes_on() {
    let scenario = Scenario::new("huge");
    let mut worker = scenario.start_worker(&scenario.config());
    let body = vec![0xA5u8; 16 * 1024 * 1024];
    scenario.publish(
        Some("huge"),
        &[(HEADER_WORK_MS, AmqpValue::LongInt(0))],
        &body,
    );
    let ledger = finish_with_a_normal_job(&scenario, &mut worker, 1);
    assert_eq!(ledger.get("done"), 2, "{ledger:?}");
}

/// Integer types hold 1: as `x-created-ms` and `x-work-ms` that is a job to run, as
/// `x-deadline-ms` one that expired in 1970. Every other type is malformed.
#[test]
fn every_amqp_type_in_each_timing_header_has_a_clear_outcome() {
    let scenario = Scenario::new("types");
    let mut worker = scenario.start_worker(&scenario.config());
    let mut published = 0;
    let mut first_malformed = None;
    for header in [HEADER_CREATED_MS, HEADER_DEADLINE_MS, HEADER_WORK_MS] {
        for (type_name, value, _) in one_of_every_type() {
            let id = format!("{header}/{type_name}");
            let mut headers = vec![(header, value)];
            if header != HEADER_WORK_MS {
                headers.push((HEADER_WORK_MS, AmqpValue::LongInt(0)));
            }
            scenario.publish(Some(&id), &headers, b"");
            published += 1;
            if first_malformed.is_none() && type_name == "Boolean" {
                first_malformed = Some(id);
            }
        }
    }
    let types = one_of_every_type();
    let integers = types.iter().filter(|(_, _, integer)| *integer).count() as u64;
    let others = types.len() as u64 - integers;

    let ledger = finish_with_a_normal_job(&scenario, &mut worker, published);
    assert_eq!(ledger.get("malformed"), 3 * others, "{ledger:?}");
    assert_eq!(ledger.get("expired"), integers, "{ledger:?}");
    assert_eq!(ledger.get("done"), 2 * integers + 1, "{ledger:?}");
    let first = first_malformed.expect("a Boolean job was published");
    let warning = worker.wait_for_line(&format!("malformed job {first:?}"), WAIT);
    assert!(
        warning.contains("header x-created-ms is a boolean, expected an integer"),
        "{warning}"
    );
    // Each per-job warning (not the count of those not logged one by one) names the type.
    for line in worker
        .log()
        .lines()
        .filter(|l| l.contains("malformed job \""))
    {
        assert!(line.contains("expected an integer"), "{line}");
    }
}

#[test]
fn negative_numbers_are_malformed_naming_the_header() {
    let scenario = Scenario::new("negative");
    let mut worker = scenario.start_worker(&scenario.config());
    let jobs = [
        ("neg-created", HEADER_CREATED_MS, AmqpValue::LongLongInt(-1)),
        (
            "neg-deadline",
            HEADER_DEADLINE_MS,
            AmqpValue::ShortShortInt(i8::MIN),
        ),
        ("neg-work", HEADER_WORK_MS, AmqpValue::LongInt(i32::MIN)),
        (
            "min-deadline",
            HEADER_DEADLINE_MS,
            AmqpValue::LongLongInt(i64::MIN),
        ),
        ("neg-short", HEADER_CREATED_MS, AmqpValue::ShortInt(-1)),
    ];
    for (id, header, value) in &jobs {
        scenario.publish(Some(id), &[(header, value.clone())], b"");
    }
    let ledger = finish_with_a_normal_job(&scenario, &mut worker, jobs.len() as u64);
    assert_eq!(ledger.get("malformed"), jobs.len() as u64, "{ledger:?}");
    assert_eq!(ledger.get("done"), 1, "{ledger:?}");
    let warning = worker.wait_for_line("malformed job \"neg-created\"", WAIT);
    assert!(
        warning.contains("header x-created-ms is negative"),
        "{warning}"
    );
}

/// Work beyond a day is refused; enqueue times and deadlines beyond the end of time saturate
/// and the job runs; the longest work accepted is still dropped as doomed before it starts.
#[test]
fn overflowing_numbers_are_refused_or_saturate() {
    let scenario = Scenario::new("overflow");
    let config = scenario.config().set("worker", "default_ttl_ms", "60000");
    let mut worker = scenario.start_worker(&config);
    let too_long = [
        ("work-i64-max", AmqpValue::LongLongInt(i64::MAX)),
        ("work-u64-max", AmqpValue::Timestamp(u64::MAX)),
        (
            "work-day-and-1",
            AmqpValue::LongLongInt(MAX_WORK_MS as i64 + 1),
        ),
    ];
    for (id, value) in &too_long {
        scenario.publish(Some(id), &[(HEADER_WORK_MS, value.clone())], b"");
    }
    // Created at the end of time: the default time-to-live saturates instead of wrapping.
    scenario.publish(
        Some("created-u64-max"),
        &[(HEADER_CREATED_MS, AmqpValue::Timestamp(u64::MAX))],
        b"",
    );
    scenario.publish(
        Some("created-i64-max"),
        &[(HEADER_CREATED_MS, AmqpValue::LongLongInt(i64::MAX))],
        b"",
    );
    // A full day of work with a minute left: accepted, then dropped unstarted.
    scenario.publish(
        Some("work-a-day"),
        &[
            (HEADER_WORK_MS, AmqpValue::LongLongInt(MAX_WORK_MS as i64)),
            (HEADER_DEADLINE_MS, AmqpValue::Timestamp(now_ms() + 60_000)),
        ],
        b"",
    );
    let ledger = finish_with_a_normal_job(&scenario, &mut worker, 6);
    assert_eq!(ledger.get("malformed"), 3, "{ledger:?}");
    assert_eq!(ledger.get("doomed"), 1, "{ledger:?}");
    assert_eq!(ledger.get("done"), 3, "{ledger:?}");
    assert_eq!(ledger.get("late_work_ms"), 0, "{ledger:?}");
    let warning = worker.wait_for_line("malformed job \"work-i64-max\"", WAIT);
    assert!(
        warning.contains("header x-work-ms is 9223372036854775807, more than 86400000"),
        "{warning}"
    );
}

#[test]
fn far_future_deadlines_run_and_far_past_deadlines_expire() {
    let scenario = Scenario::new("deadlines");
    let mut worker = scenario.start_worker(&scenario.config());
    for (id, deadline) in [
        ("u64-max", AmqpValue::Timestamp(u64::MAX)),
        ("i64-max", AmqpValue::LongLongInt(i64::MAX)),
        ("u64-max-minus-1", AmqpValue::Timestamp(u64::MAX - 1)),
    ] {
        scenario.publish(
            Some(id),
            &[
                (HEADER_DEADLINE_MS, deadline),
                (HEADER_WORK_MS, AmqpValue::LongInt(1)),
            ],
            b"",
        );
    }
    for (id, deadline) in [
        ("epoch", AmqpValue::Timestamp(0)),
        ("epoch-plus-1", AmqpValue::LongLongInt(1)),
        ("a-second-ago", AmqpValue::Timestamp(now_ms() - 1_000)),
    ] {
        scenario.publish(Some(id), &[(HEADER_DEADLINE_MS, deadline)], b"");
    }
    // Enqueued at the end of time yet already past its deadline: the deadline decides.
    scenario.publish(
        Some("created-future-deadline-past"),
        &[
            (HEADER_CREATED_MS, AmqpValue::Timestamp(u64::MAX)),
            (HEADER_DEADLINE_MS, AmqpValue::Timestamp(1)),
        ],
        b"",
    );
    let ledger = finish_with_a_normal_job(&scenario, &mut worker, 7);
    assert_eq!(ledger.get("done"), 4, "{ledger:?}");
    assert_eq!(ledger.get("expired"), 4, "{ledger:?}");
    assert_eq!(ledger.get("late"), 0, "{ledger:?}");
}

#[test]
fn jobs_without_message_id_are_processed() {
    let scenario = Scenario::new("noid");
    let mut worker = scenario.start_worker(&scenario.config());
    scenario.publish(
        None,
        &[(HEADER_DEADLINE_MS, AmqpValue::LongString("soon".into()))],
        b"",
    );
    for _ in 0..3 {
        scenario.publish(None, &[(HEADER_WORK_MS, AmqpValue::LongInt(0))], b"");
    }
    let ledger = finish_with_a_normal_job(&scenario, &mut worker, 4);
    assert_eq!(ledger.get("done"), 4, "{ledger:?}");
    assert_eq!(ledger.get("malformed"), 1, "{ledger:?}");
    let warning = worker.wait_for_line("malformed job", WAIT);
    assert!(warning.contains("\"(no message_id)\""), "{warning}");
    assert!(warning.contains("x-deadline-ms is a string"), "{warning}");
}

/// A `message_id` that is not UTF-8 arrives with its invalid bytes replaced (U+FFFD): the job
/// keeps an id (for the skip decision and the warnings) and its headers are read normally.
#[test]
fn non_utf8_message_id_arrives_with_replacement_characters() {
    let scenario = Scenario::new("idbytes");
    let mut worker = scenario.start_worker(&scenario.config());
    scenario.publish_raw(&[
        RawMessage {
            headers: Some(RawTable::new().long_string(HEADER_DEADLINE_MS.as_bytes(), b"soon")),
            message_id: Some(vec![0xC3, 0x28]),
            ..RawMessage::default()
        },
        RawMessage {
            headers: Some(RawTable::new().long_long_int(HEADER_WORK_MS.as_bytes(), 0)),
            message_id: Some(b"job-\xFF\xFE".to_vec()),
            ..RawMessage::default()
        },
    ]);
    let ledger = finish_with_a_normal_job(&scenario, &mut worker, 2);
    assert_eq!(ledger.get("malformed"), 1, "{ledger:?}");
    assert_eq!(ledger.get("done"), 2, "{ledger:?}");
    let warning = worker.wait_for_line("malformed job", WAIT);
    assert!(
        warning.contains("malformed job \"\u{fffd}(\": header x-deadline-ms is a string"),
        "{warning}"
    );
}

/// A header key or string value that is not UTF-8 is read with replacement characters, and
/// every header after it is still seen: a deadline or a malformed header placed behind it
/// takes effect.
#[test]
fn non_utf8_header_does_not_hide_the_headers_after_it() {
    let scenario = Scenario::new("headerbytes");
    let mut worker = scenario.start_worker(&scenario.config());
    let deadline = HEADER_DEADLINE_MS.as_bytes();
    scenario.publish_raw(&[
        // Control: the same job with a UTF-8 note expires.
        RawMessage {
            headers: Some(
                RawTable::new()
                    .long_string(b"a-note", b"fine")
                    .long_long_int(deadline, 1),
            ),
            message_id: Some(b"visible-deadline".to_vec()),
            ..RawMessage::default()
        },
        RawMessage {
            headers: Some(
                RawTable::new()
                    .long_string(b"a-note", b"\xFF")
                    .long_long_int(deadline, 1),
            ),
            message_id: Some(b"deadline-after-bad-value".to_vec()),
            ..RawMessage::default()
        },
        RawMessage {
            headers: Some(
                RawTable::new()
                    .long_long_int(b"a-\xFF", 1)
                    .long_string(deadline, b"soon"),
            ),
            message_id: Some(b"malformed-after-bad-key".to_vec()),
            ..RawMessage::default()
        },
    ]);
    let ledger = finish_with_a_normal_job(&scenario, &mut worker, 3);
    assert_eq!(ledger.get("expired"), 2, "{ledger:?}");
    assert_eq!(ledger.get("malformed"), 1, "{ledger:?}");
    assert_eq!(ledger.get("done"), 1, "{ledger:?}");
}

/// A `content_type` that is not UTF-8 in front of the headers used to desynchronise the AMQP
/// client's frame parser and close the connection on every redelivery, wedging the worker on
/// one message forever. The message now arrives like any other, and the job behind it too,
/// on one connection.
#[test]
fn non_utf8_content_type_is_an_ordinary_job_not_a_poison_message() {
    let scenario = Scenario::new("poison");
    scenario.publish_raw(&[RawMessage {
        content_type: Some(vec![0xFF]),
        headers: Some(RawTable::new().long_long_int(HEADER_WORK_MS.as_bytes(), 0)),
        message_id: Some(b"formerly-poison".to_vec()),
        ..RawMessage::default()
    }]);
    scenario.publish(
        Some("behind-it"),
        &[(HEADER_WORK_MS, AmqpValue::LongInt(0))],
        b"",
    );
    let mut worker = scenario.start_worker(&scenario.config());
    let ledger = finish_with_a_normal_job(&scenario, &mut worker, 2);
    assert_eq!(ledger.get("done"), 3, "{ledger:?}");
    assert_eq!(ledger.get("returned"), 0, "{ledger:?}");
    assert!(!worker.log().contains("lost RabbitMQ"), "{}", worker.log());
}
