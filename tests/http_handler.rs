//! The http handler against a local HTTP server on the real broker: what a request carries,
//! keep-alive, and how each answer (or its absence) maps to an outcome. Every test checks the
//! worker's ledger.

mod support;

use amiquip::{AmqpProperties, AmqpValue, FieldTable};
use std::time::Duration;
use support::broker::{TestBroker, now_ms, unique_name};
use support::daemon::{Bin, Daemon, Ledger, TempDir, TestConfig, toml_str};
use support::http_server::{HttpServer, Reply};

const WAIT: Duration = Duration::from_secs(60);

/// Runs a worker with the http handler posting to `url`, publishes `jobs`, and returns the
/// final ledger once all `deliveries` are settled.
fn run_jobs(
    what: &str,
    url: &str,
    extra: &[(&str, &str, &str)],
    jobs: Vec<(AmqpProperties, Vec<u8>)>,
    deliveries: u64,
) -> (Ledger, Daemon) {
    let mut broker = TestBroker::connect();
    let queue = unique_name(what);
    broker.owns_queue(&queue);
    let dir = TempDir::new(what);
    let mut config = TestConfig::new(&queue)
        .set("handler", "kind", "\"http\"")
        .set("handler", "url", &toml_str(url));
    for (section, key, value) in extra {
        config = config.set(section, key, value);
    }
    let config = config.write(&dir, "flagshed.toml");
    let mut worker = Daemon::start(Bin::Worker, &config);
    worker.wait_for_line("consuming from queue", WAIT);
    for (properties, body) in jobs {
        broker.publish_properties(&queue, properties, &body);
    }
    worker.wait_settled(deliveries);
    let ledger = worker.stop();
    ledger.assert_balanced();
    assert_eq!(broker.ready_count(&queue), 0, "every job settled");
    (ledger, worker)
}

fn job(id: &str) -> AmqpProperties {
    AmqpProperties::default().with_message_id(id.to_owned())
}

fn job_due(id: &str, in_ms: u64) -> AmqpProperties {
    let now = now_ms();
    let mut headers = FieldTable::new();
    headers.insert("x-created-ms".into(), AmqpValue::LongLongInt(now as i64));
    headers.insert(
        "x-deadline-ms".into(),
        AmqpValue::LongLongInt((now + in_ms) as i64),
    );
    job(id).with_headers(headers)
}

#[test]
fn jobs_are_posted_with_their_facts_over_reused_connections() {
    let server = HttpServer::start(|_| Reply::status(204));
    let big = vec![b'b'; 5 * 1024 * 1024];
    let mut jobs = vec![(
        job_due("big", 60_000)
            .with_type_("report".into())
            .with_content_type("application/json".into()),
        big.clone(),
    )];
    for i in 0..30 {
        jobs.push((job(&format!("small-{i}")), b"{}".to_vec()));
    }
    let (ledger, _) = run_jobs(
        "http-ok",
        &server.url("/jobs"),
        &[("worker", "concurrency", "2")],
        jobs,
        31,
    );
    assert_eq!(ledger.get("done"), 31, "{ledger:?}");
    let requests = server.requests();
    assert_eq!(requests.len(), 31);
    let first = requests
        .iter()
        .find(|r| r.header("x-flagshed-job-id") == Some("big"))
        .expect("the big job was posted");
    assert_eq!(first.method, "POST");
    assert_eq!(first.path, "/jobs");
    assert_eq!(first.body, big, "the whole body arrived");
    assert_eq!(first.header("content-type"), Some("application/json"));
    assert_eq!(first.header("x-flagshed-job-type"), Some("report"));
    let deadline: u64 = first
        .header("x-flagshed-deadline-ms")
        .and_then(|v| v.parse().ok())
        .expect("a deadline header");
    let left: u64 = first
        .header("x-flagshed-time-left-ms")
        .and_then(|v| v.parse().ok())
        .expect("a time-left header");
    assert!(left <= 60_000 && deadline > now_ms(), "{left} {deadline}");
    let small = requests
        .iter()
        .find(|r| r.header("x-flagshed-job-id") == Some("small-0"))
        .expect("small job posted");
    assert_eq!(
        small.header("content-type"),
        Some("application/octet-stream")
    );
    assert_eq!(small.header("x-flagshed-deadline-ms"), None);
    assert!(
        server.connections() <= 2,
        "{} connections for 31 jobs on 2 threads",
        server.connections()
    );
}

#[test]
fn too_many_requests_and_unavailable_are_retried_then_failed() {
    let server = HttpServer::start(|r| match r.header("x-flagshed-job-id") {
        Some("busy") => Reply::status(429),
        _ => Reply::status(503),
    });
    let (ledger, _) = run_jobs(
        "http-retry",
        &server.url("/"),
        &[("handler", "max_retries", "3")],
        vec![(job("busy"), Vec::new()), (job("down"), Vec::new())],
        8,
    );
    assert_eq!(ledger.get("retried"), 6, "{ledger:?}");
    assert_eq!(ledger.get("failed"), 2, "{ledger:?}");
    assert_eq!(server.requests().len(), 8);
}

#[test]
fn other_statuses_and_redirects_fail() {
    let server = HttpServer::start(|r| match r.header("x-flagshed-job-id") {
        Some("moved") => Reply {
            headers: vec![("Location".into(), "http://127.0.0.1:1/elsewhere".into())],
            ..Reply::status(302)
        },
        Some("broken") => Reply::status(500),
        _ => Reply::status(400),
    });
    let (ledger, worker) = run_jobs(
        "http-fail",
        &server.url("/"),
        &[],
        vec![(job("moved"), Vec::new())],
        1,
    );
    assert_eq!(ledger.get("failed"), 1, "{ledger:?}");
    let log = worker.log();
    assert!(
        log.contains("HTTP 302 redirect to http://127.0.0.1:1/elsewhere"),
        "{log}"
    );
    assert_eq!(server.requests().len(), 1, "the redirect was not followed");

    let (ledger, _) = run_jobs(
        "http-fail",
        &server.url("/"),
        &[],
        vec![(job("broken"), Vec::new()), (job("bad"), Vec::new())],
        2,
    );
    assert_eq!(ledger.get("failed"), 2, "{ledger:?}");
}

#[test]
fn a_server_that_is_down_fails_the_job_when_told_to_and_the_worker_goes_on() {
    // A port that was just free: nothing listens there.
    let port = support::daemon::free_port();
    let (ledger, worker) = run_jobs(
        "http-down",
        &format!("http://127.0.0.1:{port}/jobs"),
        &[("handler", "when_unavailable", "\"fail\"")],
        vec![(job("a"), Vec::new()), (job("b"), Vec::new())],
        2,
    );
    assert_eq!(ledger.get("failed"), 2, "{ledger:?}");
    assert!(
        worker.log().contains("Connection Failed"),
        "{}",
        worker.log()
    );
}

#[test]
fn a_slow_server_is_abandoned_at_the_deadline() {
    let server = HttpServer::start(|_| Reply {
        delay: Duration::from_secs(20),
        ..Reply::status(200)
    });
    let (ledger, worker) = run_jobs(
        "http-slow",
        &server.url("/"),
        // Budget little work for it, so that it starts rather than being dropped as doomed.
        &[("worker", "default_work_ms", "10")],
        vec![(job_due("slow", 700), Vec::new())],
        1,
    );
    assert_eq!(ledger.get("timed_out"), 1, "{ledger:?}\n{}", worker.log());
    assert_eq!(ledger.get("done"), 0);
}

#[test]
fn connecting_to_a_service_that_does_not_accept_ends_at_the_deadline() {
    let (_listener, port, _filling) = support::http_server::full_listener();
    let dir = TempDir::new("http-full");
    let ledger_file = dir.path().join("ledger.jsonl");
    let deadline_in = 1_000;
    let properties = job_due("stuck", deadline_in);
    let deadline = now_ms() + deadline_in;
    let ledger_setting = toml_str(&ledger_file.display().to_string());
    let (ledger, worker) = run_jobs(
        "http-full",
        &format!("http://127.0.0.1:{port}/jobs"),
        &[
            // Budget little work for it, so that it starts rather than being dropped as doomed.
            ("worker", "default_work_ms", "10"),
            ("worker", "ledger_file", &ledger_setting),
        ],
        vec![(properties, Vec::new())],
        1,
    );
    assert_eq!(ledger.get("timed_out"), 1, "{ledger:?}\n{}", worker.log());
    let text = std::fs::read_to_string(&ledger_file).expect("ledger file");
    let record: serde_json::Value =
        serde_json::from_str(text.lines().next().expect("a line")).expect("JSON");
    let settled_ms = record["ms"].as_u64().expect("ms");
    // connect_timeout_ms is 5,000 ms: without the deadline's bound the job would end about
    // four seconds after it.
    assert!(
        settled_ms < deadline + 2_000,
        "settled {} ms after its deadline",
        settled_ms.saturating_sub(deadline)
    );
    assert!(
        worker.log().contains("job \"stuck\" timed_out"),
        "{}",
        worker.log()
    );
}

/// Jobs `job-0` to `job-{n-1}`, without deadlines.
fn numbered_jobs(n: usize) -> Vec<(AmqpProperties, Vec<u8>)> {
    (0..n)
        .map(|i| (job(&format!("job-{i}")), b"{}".to_vec()))
        .collect()
}

#[test]
fn a_service_restarted_under_load_loses_no_job_to_failed() {
    let reply = |_: &support::http_server::Request| Reply {
        delay: Duration::from_millis(2),
        ..Reply::status(204)
    };
    let server = HttpServer::start(reply);
    let port = server.port();
    let mut broker = TestBroker::connect();
    let queue = unique_name("http-restart");
    broker.owns_queue(&queue);
    let dir = TempDir::new("http-restart");
    let ledger_file = dir.path().join("ledger.jsonl");
    let config = TestConfig::new(&queue)
        .set("handler", "kind", "\"http\"")
        .set("handler", "url", &toml_str(&server.url("/jobs")))
        .set("worker", "concurrency", "4")
        .set("worker", "prefetch", "20")
        .set(
            "worker",
            "ledger_file",
            &toml_str(&ledger_file.display().to_string()),
        )
        .write(&dir, "flagshed.toml");
    let mut worker = Daemon::start(Bin::Worker, &config);
    worker.wait_for_line("consuming from queue", WAIT);
    let jobs = 300;
    for (properties, body) in numbered_jobs(jobs) {
        broker.publish_properties(&queue, properties, &body);
    }
    worker.wait_for_stats(|s| s.get("done") >= 50);
    drop(server);
    worker.wait_for_line("handler unavailable", WAIT);
    let _server = HttpServer::start_on(port, reply);
    worker.wait_for_line("handler answers again", WAIT);
    worker.wait_for_stats(|s| s.get("done") == jobs as u64 && s.get("in_flight") == 0);
    let ledger = worker.stop();
    ledger.assert_balanced();
    assert_eq!(ledger.get("failed"), 0, "{ledger:?}");
    assert_eq!(ledger.get("done"), jobs as u64, "{ledger:?}");
    assert!(ledger.get("requeued") > 0, "some went back: {ledger:?}");
    let last: std::collections::BTreeMap<String, String> =
        support::daemon::ledger_lines(&ledger_file)
            .into_iter()
            .collect();
    assert_eq!(last.len(), jobs);
    assert!(last.values().all(|s| s == "done"), "{last:?}");
    assert_eq!(broker.ready_count(&queue), 0);
}

/// CPU time (user and system) the process `pid` has used, from /proc.
fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("a comm field")
        .1
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of stat(5); `fields` starts at field 3.
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no memory effects.
    let per_sec = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
    Duration::from_millis(ticks * 1000 / per_sec)
}

#[test]
fn a_service_that_never_comes_back_holds_the_jobs_without_spinning() {
    let port = support::daemon::free_port();
    let mut broker = TestBroker::connect();
    let queue = unique_name("http-gone");
    broker.owns_queue(&queue);
    let dir = TempDir::new("http-gone");
    let config = TestConfig::new(&queue)
        .set("handler", "kind", "\"http\"")
        .set(
            "handler",
            "url",
            &toml_str(&format!("http://127.0.0.1:{port}/jobs")),
        )
        .set("worker", "concurrency", "4")
        .set("worker", "prefetch", "10")
        .write(&dir, "flagshed.toml");
    let mut worker = Daemon::start(Bin::Worker, &config);
    worker.wait_for_line("consuming from queue", WAIT);
    let jobs = 20;
    for (properties, body) in numbered_jobs(jobs) {
        broker.publish_properties(&queue, properties, &body);
    }
    worker.wait_for_line("handler unavailable", WAIT);
    // Every job goes back to the queue and stays there.
    broker.wait_for_ready(&queue, "every job back in the queue", WAIT, |n| {
        n == jobs as u32
    });
    let held = worker.wait_for_new_stats(|s| s.get("in_flight") == 0);
    assert_eq!(held.text("handler_unavailable"), "1", "{held:?}");
    let before = cpu_time(worker.pid());
    let window = Duration::from_secs(3);
    std::thread::sleep(window);
    let used = cpu_time(worker.pid()) - before;
    assert!(
        used < window / 10,
        "{used:?} of CPU in {window:?} while holding"
    );
    let ledger = worker.stop();
    ledger.assert_balanced();
    assert_eq!(ledger.get("failed"), 0, "{ledger:?}");
    assert_eq!(ledger.get("done"), 0, "{ledger:?}");
    assert_eq!(ledger.get("requeued"), ledger.get("received"), "{ledger:?}");
    assert_eq!(broker.ready_count(&queue), jobs as u32);
}
