//! Steering a running worker from LaunchDarkly (a fake speaking its protocol) on the real
//! broker: a rule on the job type sheds one kind of job and not another, every skip decision
//! shows up in the analytics events, and the pause, concurrency, deadline-aware and
//! shed-objective flags change what the worker does while it runs, with every job accounted
//! for.

mod support;

use amiquip::AmqpValue;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;
use support::broker::{TestBroker, now_ms, unique_name};
use support::daemon::{Bin, Daemon, TempDir, TestConfig, final_states, ledger_lines, toml_str};
use support::fake_ld::{FakeLd, number_flag};

const WAIT: Duration = Duration::from_secs(60);
const SDK_KEY: &str = "sdk-steering-0123456789";

/// A number flag serving `rule_value` to jobs whose type is in `types` (a rule on the `job`
/// context kind) and `fallthrough` to everything else.
fn per_type_flag(
    key: &str,
    version: u64,
    types: &[&str],
    rule_value: f64,
    fallthrough: f64,
) -> Value {
    json!({
        "key": key, "version": version, "on": true,
        "variations": [fallthrough, rule_value], "offVariation": 0,
        "fallthrough": {"variation": 0},
        "targets": [], "contextTargets": [], "prerequisites": [],
        "rules": [{
            "id": "shed-these-types", "variation": 1, "trackEvents": false,
            "clauses": [{"contextKind": "job", "attribute": "key", "op": "in",
                         "values": types, "negate": false}]
        }],
        "salt": format!("{key}-salt"), "trackEvents": false, "deleted": false
    })
}

fn bool_flag(key: &str, version: u64, value: bool) -> Value {
    json!({
        "key": key, "version": version, "on": true,
        "variations": [value], "offVariation": 0, "fallthrough": {"variation": 0},
        "targets": [], "contextTargets": [], "rules": [], "prerequisites": [],
        "salt": format!("{key}-salt"), "trackEvents": false, "deleted": false
    })
}

/// A worker config talking to `fake` with events flushed every 200 ms.
fn config(queue: &str, fake: &FakeLd, dir: &TempDir) -> TestConfig {
    TestConfig::new(queue)
        .set("launchdarkly", "sdk_key", &toml_str(SDK_KEY))
        .set("launchdarkly", "stream_uri", &toml_str(&fake.uri()))
        .set("launchdarkly", "base_uri", &toml_str(&fake.uri()))
        .set("launchdarkly", "events_uri", &toml_str(&fake.uri()))
        .set("launchdarkly", "events_flush_ms", "200")
        .set("launchdarkly", "startup_wait_ms", "5000")
        .set(
            "worker",
            "ledger_file",
            &toml_str(&dir.path().join("ledger.txt").display().to_string()),
        )
}

fn publish(
    broker: &TestBroker,
    queue: &str,
    id: &str,
    job_type: &str,
    headers: &[(&str, AmqpValue)],
) {
    let mut table = amiquip::FieldTable::new();
    for (k, v) in headers {
        table.insert((*k).to_owned(), v.clone());
    }
    let properties = amiquip::AmqpProperties::default()
        .with_message_id(id.to_owned())
        .with_type_(job_type.to_owned())
        .with_headers(table);
    broker.publish_properties(queue, properties, b"");
}

/// Outcome counts per id prefix (`thumbnail-…`, `payment-…`) from the audit file.
fn outcomes_by_prefix(ledger: &Path) -> HashMap<(String, String), u64> {
    let mut counts = HashMap::new();
    for (id, outcome) in ledger_lines(ledger) {
        let prefix = id.split('-').next().unwrap_or_default().to_owned();
        *counts.entry((prefix, outcome)).or_insert(0) += 1;
    }
    counts
}

/// Summary counters for `flag` across every events payload: (context kinds, value, count).
fn summary_counts(fake: &FakeLd, flag: &str) -> (u64, Vec<String>, HashMap<String, u64>) {
    let mut total = 0;
    let mut kinds = Vec::new();
    let mut by_value = HashMap::new();
    for event in fake.bulk_payloads().into_iter().flatten() {
        if event["kind"] != "summary" {
            continue;
        }
        let Some(feature) = event["features"].get(flag) else {
            continue;
        };
        for kind in feature["contextKinds"].as_array().into_iter().flatten() {
            let kind = kind.as_str().unwrap_or_default().to_owned();
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
        for counter in feature["counters"].as_array().into_iter().flatten() {
            let count = counter["count"].as_u64().expect("a counter has a count");
            total += count;
            let value = counter["value"].as_f64().expect("a number flag's value");
            *by_value.entry(format!("{value}")).or_insert(0) += count;
        }
    }
    kinds.sort();
    (total, kinds, by_value)
}

fn index_contexts(fake: &FakeLd) -> Vec<Value> {
    fake.bulk_payloads()
        .into_iter()
        .flatten()
        .filter(|e| e["kind"] == "index")
        .map(|e| e["context"].clone())
        .collect()
}

#[test]
fn a_rule_on_the_job_type_sheds_only_that_type_and_every_decision_is_counted_in_events() {
    let mut broker = TestBroker::connect();
    let queue = unique_name("per-type");
    broker.owns_queue(&queue);
    let fake = FakeLd::start();
    fake.set_flag(per_type_flag("skip-rate", 3, &["thumbnail"], 80.0, 0.0));
    let dir = TempDir::new("per-type");
    let config = config(&queue, &fake, &dir)
        .set("worker", "concurrency", "2")
        .set("worker", "prefetch", "20")
        .write(&dir, "flagshed.toml");
    let mut worker = Daemon::start(Bin::Worker, &config);
    worker.wait_for_line("consuming from queue", WAIT);

    // One job of each type first, so both types have their own evaluation before the load.
    publish(&broker, &queue, "thumbnail-warm", "thumbnail", &[]);
    publish(&broker, &queue, "payment-warm", "payment", &[]);
    worker.wait_for_stats(|s| s.text("skip_rate_by_type").contains("thumbnail:80"));

    // Overload: 2 threads, 30 ms of work, 400 jobs with 5 s to live: unshed they need 6 s;
    // with 80 % of the thumbnails shed, 3.6 s.
    let deadline = now_ms() + 5_000;
    let headers = [
        ("x-work-ms", AmqpValue::LongLongInt(30)),
        ("x-deadline-ms", AmqpValue::LongLongInt(deadline as i64)),
    ];
    for i in 0..200 {
        publish(
            &broker,
            &queue,
            &format!("thumbnail-{i}"),
            "thumbnail",
            &headers,
        );
        publish(
            &broker,
            &queue,
            &format!("payment-{i}"),
            "payment",
            &headers,
        );
    }
    worker.wait_for_stats(|s| s.get("received") == 402 && s.get("in_flight") == 0);
    let ledger = worker.stop();
    ledger.assert_balanced();

    let outcomes = outcomes_by_prefix(&dir.path().join("ledger.txt"));
    let count = |prefix: &str, outcome: &str| {
        outcomes
            .get(&(prefix.to_owned(), outcome.to_owned()))
            .copied()
            .unwrap_or(0)
    };
    let thumbnails_skipped = count("thumbnail", "skipped");
    assert!(
        (135..=185).contains(&thumbnails_skipped),
        "{thumbnails_skipped} of 200 thumbnails skipped at 80 %: {outcomes:?}"
    );
    assert_eq!(count("payment", "skipped"), 0, "{outcomes:?}");
    assert_eq!(
        count("payment", "done"),
        201,
        "payments keep their full share of capacity: {outcomes:?}"
    );

    // Events: one use of the skip-rate flag per job decided, under the contexts that decided.
    let received = ledger.get("received");
    let mut seen = (0, Vec::new(), HashMap::new());
    let counted = fake.wait_for_bulk_payloads(1, WAIT) && {
        let end = std::time::Instant::now() + WAIT;
        loop {
            seen = summary_counts(&fake, "skip-rate");
            if seen.0 >= received || std::time::Instant::now() > end {
                break seen.0 == received;
            }
            fake.wait_for_bulk_payloads(fake.bulk_payloads().len() + 1, Duration::from_secs(2));
        }
    };
    assert!(counted, "summary counts {seen:?}, jobs decided {received}");
    let (_, kinds, by_value) = &seen;
    assert_eq!(kinds, &["job", "service"], "{seen:?}");
    // Every thumbnail but perhaps the first was decided on its type's value (80): the first
    // of a type is decided on the service-wide value (0) unless the flag source evaluated the
    // new type first. Every payment was decided on 0.
    let (at_80, at_0) = (by_value.get("80").copied(), by_value.get("0").copied());
    assert!(
        matches!(
            (at_80, at_0),
            (Some(200), Some(202)) | (Some(201), Some(201))
        ),
        "{seen:?}"
    );
    let contexts = index_contexts(&fake);
    let job_keys: Vec<&str> = contexts
        .iter()
        .filter(|c| c["kind"] == "multi")
        .filter_map(|c| c["job"]["key"].as_str())
        .collect();
    assert!(
        job_keys.contains(&"thumbnail") && job_keys.contains(&"payment"),
        "index events for each job type's multi-context: {contexts:?}"
    );
    let bulk = fake.requests_to("/bulk");
    assert!(
        bulk.iter()
            .all(|r| r.header("Authorization") == Some(SDK_KEY))
    );
    assert!(
        bulk.iter()
            .all(|r| r.header("X-LaunchDarkly-Event-Schema") == Some("4"))
    );
    assert!(
        !worker.log().contains(SDK_KEY),
        "the SDK key leaked into the log"
    );
}

#[test]
fn pause_stops_taking_jobs_and_lifting_it_resumes_with_nothing_lost() {
    let mut broker = TestBroker::connect();
    let queue = unique_name("pause");
    broker.owns_queue(&queue);
    let fake = FakeLd::start();
    fake.set_flag(bool_flag("pause", 1, false));
    let dir = TempDir::new("pause");
    let config = config(&queue, &fake, &dir)
        .set("flags", "pause_key", "\"pause\"")
        .set("worker", "concurrency", "2")
        .set("worker", "prefetch", "10")
        .write(&dir, "flagshed.toml");
    let mut worker = Daemon::start(Bin::Worker, &config);
    worker.wait_for_line("consuming from queue", WAIT);
    let work = [("x-work-ms", AmqpValue::LongLongInt(30))];
    for i in 0..200 {
        publish(&broker, &queue, &format!("job-{i}"), "", &work);
    }
    worker.wait_for_stats(|s| s.get("done") >= 20);

    fake.push_patch_flag(bool_flag("pause", 2, true));
    let paused = worker.wait_for_new_stats(|s| s.text("paused") == "1" && s.get("in_flight") == 0);
    // Held for three more stats lines: nothing new is taken, the rest waits in the queue.
    let mut later = worker.wait_for_new_stats(|_| true);
    for _ in 0..2 {
        later = worker.wait_for_new_stats(|_| true);
    }
    assert_eq!(later.get("received"), paused.get("received"), "{later:?}");
    assert_eq!(later.text("paused"), "1");
    let waiting = broker.ready_count(&queue);
    assert!(waiting > 0, "jobs wait in the queue while paused");
    let done_while_paused = later.get("done");
    assert!(done_while_paused < 200);

    fake.push_patch_flag(bool_flag("pause", 3, false));
    worker.wait_for_line("resumed: consuming from", WAIT);
    worker.wait_for_stats(|s| s.text("paused") == "0" && s.get("done") == 200);
    let ledger = worker.stop();
    ledger.assert_balanced();

    // Every job ended done exactly once; those handed back at the pause were requeued first.
    let lines = ledger_lines(&dir.path().join("ledger.txt"));
    let finals: HashMap<&str, usize> = lines
        .iter()
        .filter(|(_, outcome)| final_states().contains(&outcome.as_str()))
        .fold(HashMap::new(), |mut m, (id, _)| {
            *m.entry(id.as_str()).or_insert(0) += 1;
            m
        });
    assert_eq!(finals.len(), 200, "every job has a final outcome");
    assert!(finals.values().all(|&n| n == 1), "no job finished twice");
    assert_eq!(ledger.get("done"), 200);
}

/// Intervals `(start_ns, end_ns)` recorded by the exec handler below, one per job.
fn intervals(log: &Path) -> Vec<(u128, u128)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut starts = HashMap::new();
    let mut out = Vec::new();
    for line in text.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        if let [what, id, ns] = parts[..] {
            let ns: u128 = ns.parse().expect("nanoseconds");
            match what {
                "start" => {
                    starts.insert(id.to_owned(), ns);
                }
                "end" => {
                    if let Some(start) = starts.remove(id) {
                        out.push((start, ns));
                    }
                }
                _ => {}
            }
        }
    }
    out
}

/// The most intervals running at one moment.
fn most_at_once(intervals: &[(u128, u128)]) -> usize {
    let mut edges: Vec<(u128, i32)> = intervals
        .iter()
        .flat_map(|&(s, e)| [(s, 1), (e, -1)])
        .collect();
    // At a tie, an end before a start: touching intervals do not overlap.
    edges.sort_by_key(|&(t, d)| (t, d));
    let (mut now, mut most) = (0_i32, 0_i32);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    most as usize
}

#[test]
fn the_concurrency_flag_resizes_the_pool_while_it_runs() {
    let mut broker = TestBroker::connect();
    let queue = unique_name("concurrency");
    broker.owns_queue(&queue);
    let fake = FakeLd::start();
    fake.set_flag(number_flag("concurrency", 1, 1.0));
    let dir = TempDir::new("concurrency");
    let log = dir.path().join("intervals.txt");
    let script = format!(
        "echo start $FLAGSHED_JOB_ID $(date +%s%N) >> {0}; sleep 0.1; echo end $FLAGSHED_JOB_ID $(date +%s%N) >> {0}",
        log.display()
    );
    let config = config(&queue, &fake, &dir)
        .set("flags", "concurrency_key", "\"concurrency\"")
        .set("worker", "concurrency", "2")
        .set("worker", "max_concurrency", "4")
        .set("worker", "prefetch", "12")
        .set("handler", "kind", "\"exec\"")
        .set(
            "handler",
            "command",
            &format!("[\"/bin/sh\", \"-c\", {}]", toml_str(&script)),
        )
        .write(&dir, "flagshed.toml");
    let mut worker = Daemon::start(Bin::Worker, &config);
    worker.wait_for_line("consuming from queue", WAIT);
    worker.wait_for_stats(|s| s.text("concurrency") == "1");
    for i in 0..8 {
        publish(&broker, &queue, &format!("one-{i}"), "", &[]);
    }
    worker.wait_for_stats(|s| s.get("done") == 8 && s.get("in_flight") == 0);
    let one = intervals(&log);
    assert_eq!(one.len(), 8);
    assert_eq!(most_at_once(&one), 1, "concurrency 1: {one:?}");

    std::fs::remove_file(&log).expect("remove the interval log");
    fake.push_patch_flag(number_flag("concurrency", 2, 4.0));
    worker.wait_for_stats(|s| s.text("concurrency") == "4");
    for i in 0..12 {
        publish(&broker, &queue, &format!("four-{i}"), "", &[]);
    }
    worker.wait_for_stats(|s| s.get("done") == 20 && s.get("in_flight") == 0);
    let four = intervals(&log);
    assert_eq!(four.len(), 12);
    let most = most_at_once(&four);
    assert!(
        (2..=4).contains(&most),
        "concurrency 4 runs jobs side by side, never more than 4: {most}"
    );

    // Out of range: warned about, and the config's concurrency (2) applies.
    fake.push_patch_flag(number_flag("concurrency", 3, 9.0));
    worker.wait_for_line(
        "is not a whole number from 1 to worker.max_concurrency",
        WAIT,
    );
    worker.wait_for_stats(|s| s.text("concurrency") == "2");
    worker.stop().assert_balanced();
}

#[test]
fn turning_deadline_aware_shedding_off_lets_doomed_jobs_run() {
    let mut broker = TestBroker::connect();
    let queue = unique_name("deadline-aware");
    broker.owns_queue(&queue);
    let fake = FakeLd::start();
    fake.set_flag(bool_flag("deadline-aware", 1, true));
    let dir = TempDir::new("deadline-aware");
    let config = config(&queue, &fake, &dir)
        .set("flags", "deadline_aware_key", "\"deadline-aware\"")
        .set("handler", "enforce_deadline", "false")
        .write(&dir, "flagshed.toml");
    let mut worker = Daemon::start(Bin::Worker, &config);
    worker.wait_for_line("consuming from queue", WAIT);
    // 400 ms of work with 150 ms to live: doomed when shedding is deadline-aware.
    let doomed_job = |id: &str| {
        let headers = [
            ("x-work-ms", AmqpValue::LongLongInt(400)),
            (
                "x-deadline-ms",
                AmqpValue::LongLongInt((now_ms() + 150) as i64),
            ),
        ];
        publish(&broker, &queue, id, "", &headers);
    };
    worker.wait_for_stats(|s| s.text("deadline_aware") == "1");
    for i in 0..3 {
        doomed_job(&format!("on-{i}"));
    }
    worker.wait_for_stats(|s| s.get("doomed") == 3);

    fake.push_patch_flag(bool_flag("deadline-aware", 2, false));
    worker.wait_for_stats(|s| s.text("deadline_aware") == "0");
    for i in 0..3 {
        doomed_job(&format!("off-{i}"));
    }
    let stats = worker.wait_for_stats(|s| s.get("late") == 3 && s.get("in_flight") == 0);
    assert_eq!(stats.get("doomed"), 3, "{stats:?}");
    worker.stop().assert_balanced();
}

fn string_flag(key: &str, version: u64, value: &str) -> Value {
    json!({
        "key": key, "version": version, "on": true,
        "variations": [value], "offVariation": 0, "fallthrough": {"variation": 0},
        "targets": [], "contextTargets": [], "rules": [], "prerequisites": [],
        "salt": format!("{key}-salt"), "trackEvents": false, "deleted": false
    })
}

/// The `work_estimate_ms` entry for `job_type` in a stats line.
fn estimate_ms(stats: &support::daemon::Ledger, job_type: &str) -> Option<u64> {
    stats
        .text("work_estimate_ms")
        .split(',')
        .filter_map(|entry| entry.split_once(':'))
        .find(|(name, _)| *name == job_type)
        .and_then(|(_, ms)| ms.parse().ok())
}

#[test]
fn the_shed_objective_flag_switches_the_budget_of_learned_work_live() {
    use std::os::unix::fs::PermissionsExt;

    let mut broker = TestBroker::connect();
    let queue = unique_name("shed-objective");
    broker.owns_queue(&queue);
    let fake = FakeLd::start();
    fake.set_flag(string_flag("shed-objective", 1, "fewest_stopped"));
    let dir = TempDir::new("shed-objective");
    let sleeper = dir.write(
        "sleep-ms.sh",
        "#!/bin/sh\nread ms\nexec sleep \"$(printf '%d.%03d' $((ms / 1000)) $((ms % 1000)))\"\n",
    );
    std::fs::set_permissions(&sleeper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let config = config(&queue, &fake, &dir)
        .set("flags", "shed_objective_key", "\"shed-objective\"")
        .set("handler", "kind", "\"exec\"")
        .set(
            "handler",
            "command",
            &format!("[{}]", toml_str(&sleeper.display().to_string())),
        )
        .set("worker", "concurrency", "4")
        .set("worker", "estimate_min_jobs", "5")
        .write(&dir, "flagshed.toml");
    let mut worker = Daemon::start(Bin::Worker, &config);
    worker.wait_for_line("consuming from queue", WAIT);
    worker.wait_for_stats(|s| s.text("shed_objective") == "fewest_stopped");
    // Bimodal work with no deadline: nine in ten take 50 ms, one in ten 600 ms.
    for i in 0..40 {
        let ms = if i % 10 == 9 { 600 } else { 50 };
        let properties = amiquip::AmqpProperties::default()
            .with_message_id(format!("job-{i}"))
            .with_type_("mix".into());
        broker.publish_properties(&queue, properties, ms.to_string().as_bytes());
    }
    let stats = worker.wait_settled(40);
    let fewest_stopped = estimate_ms(&stats, "mix").expect("mix estimated");
    assert!(fewest_stopped >= 600, "{stats:?}");

    // Most on time: 50 ms finishes nine jobs in 0.45 s of work; 600 ms, ten in 1.05 s.
    fake.push_patch_flag(string_flag("shed-objective", 2, "most_on_time"));
    let stats = worker.wait_for_stats(|s| s.text("shed_objective") == "most_on_time");
    let most_on_time = estimate_ms(&stats, "mix").expect("mix estimated");
    assert!((50..100).contains(&most_on_time), "{stats:?}");

    // A value of neither kind is warned about, and the config's objective holds.
    fake.push_patch_flag(string_flag("shed-objective", 3, "fastest"));
    let (warned_at, _) =
        worker.wait_for_line_from(0, "is not \"fewest_stopped\" or \"most_on_time\"", WAIT);
    let (_, stats) =
        worker.wait_for_stats_from(warned_at, |s| s.text("shed_objective") == "fewest_stopped");
    assert_eq!(
        estimate_ms(&stats, "mix"),
        Some(fewest_stopped),
        "{stats:?}"
    );
    worker.stop().assert_balanced();
}
