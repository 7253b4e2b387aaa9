//! taskqueuer against the real RabbitMQ: pacing, the job format on the wire, confirms.

mod support;

use std::time::Duration;
use support::broker::{TestBroker, header_u64, unique_name};
use support::daemon::{Bin, Daemon, TempDir, TestConfig, toml_str};

const WAIT: Duration = Duration::from_secs(60);

/// Publishes `max_jobs` at `rate` and returns the jobs as they sit in the queue.
fn publish(what: &str, rate: &str, max_jobs: u64) -> Vec<amiquip::AmqpProperties> {
    let mut broker = TestBroker::connect();
    let queue = unique_name(what);
    broker.owns_queue(&queue);
    let dir = TempDir::new(what);
    let config = TestConfig::new(&queue)
        .flag_file(
            &dir,
            &format!(r#"{{"flagValues": {{"task-rate": {rate}}}}}"#),
        )
        .set("queuer", "max_jobs", &max_jobs.to_string())
        .set("queuer", "ttl_ms", "600000")
        .set("queuer", "work_ms", "250")
        .write(&dir, "flagshed.toml");
    let mut queuer = Daemon::start(Bin::Queuer, &config);
    let status = queuer.wait_exit(WAIT);
    assert!(status.success(), "{}", queuer.log());
    let ledger = queuer.final_ledger();
    assert_eq!(ledger.get("published"), max_jobs, "{ledger:?}");
    assert_eq!(ledger.get("unconfirmed"), 0);
    let jobs = broker.drain(&queue);
    assert_eq!(
        jobs.len() as u64,
        max_jobs,
        "every confirmed job is in the queue"
    );
    jobs
}

fn created(jobs: &[amiquip::AmqpProperties]) -> Vec<u64> {
    jobs.iter()
        .map(|p| header_u64(p, "x-created-ms").expect("x-created-ms"))
        .collect()
}

/// The pacing itself is checked exactly, on a clock the test drives, in `pacer`'s unit tests.
/// Through the real daemon and broker, only what a busy machine cannot break is checked: jobs
/// never go out faster than the rate (250 jobs at 50/s span at least 249 intervals of 20 ms),
/// and never in a burst (no 100 ms window holds more than twice its share), because credit is
/// capped however long the publisher was held up. A slow machine can only make it slower.
#[test]
fn rate_pacing_is_never_faster_than_the_rate_and_never_bursts() {
    let jobs = publish("pacing", "50", 250);
    let times = created(&jobs);
    let span_ms = times[times.len() - 1] - times[0];
    // Each job is stamped as it is published, a little after its turn came: the span can
    // fall short by the first job's own publishing time, and by a millisecond of resolution.
    assert!(
        span_ms >= 249 * 19,
        "250 jobs at 50/s took only {span_ms} ms"
    );
    for (i, &t) in times.iter().enumerate() {
        let in_window = times[i..].iter().take_while(|&&u| u < t + 100).count();
        assert!(
            in_window <= 10,
            "{in_window} jobs within 100 ms of job {i}: a burst"
        );
    }
}

#[test]
fn fractional_rate_publishes_slower_than_one_per_second() {
    let jobs = publish("fractional", "2.5", 6);
    let times = created(&jobs);
    // 5 intervals of 400 ms at least, less the first job's own publishing time (as above).
    let span_ms = times[5] - times[0];
    assert!(span_ms >= 1_900, "6 jobs at 2.5/s took only {span_ms} ms");
}

#[test]
fn jobs_carry_id_deadline_work_and_expiration() {
    let jobs = publish("format", "1000", 5);
    let mut ids = std::collections::HashSet::new();
    for job in &jobs {
        let created = header_u64(job, "x-created-ms").expect("x-created-ms");
        let deadline = header_u64(job, "x-deadline-ms").expect("x-deadline-ms");
        assert_eq!(deadline - created, 600_000);
        assert_eq!(header_u64(job, "x-work-ms"), Some(250));
        assert_eq!(job.expiration().as_deref(), Some("600000"));
        assert_eq!(*job.delivery_mode(), Some(2));
        assert!(job.timestamp().is_some());
        ids.insert(job.message_id().clone().expect("message_id"));
    }
    assert_eq!(ids.len(), 5, "job ids are unique");
}

#[test]
fn rate_zero_pauses_publishing() {
    let mut broker = TestBroker::connect();
    let queue = unique_name("paused");
    broker.owns_queue(&queue);
    let dir = TempDir::new("paused");
    let config = TestConfig::new(&queue)
        .flag_file(&dir, r#"{"flagValues": {"task-rate": 0}}"#)
        .set("flags", "file_check_ms", "50")
        .write(&dir, "flagshed.toml");
    let mut queuer = Daemon::start(Bin::Queuer, &config);
    // Two stats periods at rate 0: nothing sent.
    let (i, _) = queuer.wait_for_stats_from(0, |_| true);
    let (_, stats) = queuer.wait_for_stats_from(i + 1, |_| true);
    assert_eq!(stats.get("sent"), 0, "{stats:?}");
    // The operator raises the rate: publishing starts without a restart.
    dir.write("flags.json", r#"{"flagValues": {"task-rate": 200}}"#);
    queuer.wait_for_stats(|s| s.get("published") > 0);
    queuer.signal(libc::SIGTERM);
    assert!(queuer.wait_exit(WAIT).success());
    let ledger = queuer.final_ledger();
    assert_eq!(ledger.get("unconfirmed"), 0, "stop waits for confirms");
    assert_eq!(
        u64::from(broker.ready_count(&queue)),
        ledger.get("published"),
        "every confirmed job is in the queue"
    );
}

/// Either daemon may start first: both declare the queue with the same arguments.
#[test]
fn queue_arguments_agree_between_daemons() {
    let mut broker = TestBroker::connect();
    let queue = unique_name("declare");
    broker.owns_queue(&queue);
    let (dlx, _) = broker.dead_letter_pair("declare");
    let dir = TempDir::new("declare");
    let config = TestConfig::new(&queue)
        .set("broker", "durable", "true")
        .set("broker", "dead_letter_exchange", &toml_str(&dlx))
        .set("broker", "max_length", "1000")
        .set("broker", "overflow", "\"reject-publish\"")
        .flag_file(&dir, r#"{"flagValues": {"task-rate": 100}}"#)
        .set("queuer", "max_jobs", "3")
        .write(&dir, "flagshed.toml");
    let mut queuer = Daemon::start(Bin::Queuer, &config);
    assert!(queuer.wait_exit(WAIT).success(), "{}", queuer.log());
    let mut worker = Daemon::start(Bin::Worker, &config);
    worker.wait_for_line("consuming from queue", WAIT);
    worker.signal(libc::SIGTERM);
    assert!(worker.wait_exit(WAIT).success(), "{}", worker.log());
}

/// The broker closes the queuer's connection mid-run: it reconnects and keeps publishing;
/// nothing confirmed is published twice, and what was unconfirmed is counted as lost, not as
/// published.
#[test]
fn queuer_reconnects_and_counts_unconfirmed_publishes_as_lost() {
    let mut broker = TestBroker::connect();
    let queue = unique_name("qreconnect");
    broker.owns_queue(&queue);
    let dir = TempDir::new("qreconnect");
    let config = TestConfig::new(&queue)
        .flag_file(&dir, r#"{"flagValues": {"task-rate": 300}}"#)
        .set("queuer", "ttl_ms", "600000")
        .write(&dir, "flagshed.toml");
    let mut queuer = Daemon::start(Bin::Queuer, &config);
    queuer.wait_for_line("publishing to queue", WAIT);
    let closed = support::broker::close_connections_matching(&format!("queue={queue} "));
    assert_eq!(closed, 1);
    let (i, _) = queuer.wait_for_line_from(0, "reconnected to RabbitMQ", WAIT);
    // Publishing resumes on the new connection.
    let (j, stats) = queuer.wait_for_stats_from(i + 1, |s| s.text("broker") == "up");
    let before = stats.get("published");
    queuer.wait_for_stats_from(j + 1, |s| s.get("published") > before + 50);
    queuer.signal(libc::SIGTERM);
    assert!(queuer.wait_exit(WAIT).success(), "{}", queuer.log());
    let ledger = queuer.final_ledger();
    assert_eq!(ledger.get("unconfirmed"), 0);
    assert_eq!(
        ledger.get("sent"),
        ledger.get("published") + ledger.get("nacked") + ledger.get("lost")
    );
    let jobs = broker.drain(&queue);
    let ids: std::collections::HashSet<_> = jobs.iter().map(|p| p.message_id().clone()).collect();
    assert_eq!(ids.len(), jobs.len(), "no job was published twice");
    let published = ledger.get("published") as usize;
    assert!(
        jobs.len() >= published && jobs.len() <= published + ledger.get("lost") as usize,
        "queue holds {} jobs; published {published}, lost {}",
        jobs.len(),
        ledger.get("lost")
    );
}
