//! What TLS costs the daemons: confirmed publishes per second (taskqueuer) and consumed jobs
//! per second (taskworker, zero-work jobs) against the same local RabbitMQ node, once over
//! plain AMQP and once over TLS, alternating, in the same run; the table gives the medians and
//! the TLS/plain ratio.
//!
//! The node is scripts/rabbitmq-tls-node's (AMQP on 5682, TLS on 5681, started if needed).
//! Each rate is measured from the daemons' own log timestamps: from the line that says the
//! daemon is publishing (consuming) to the final line (the stats line that shows every job
//! settled). `cargo bench --bench tls [-- --quick]`; `FLAGSHED_BENCH_JOBS` sets the jobs per
//! run (20,000; `--quick` 3,000), `FLAGSHED_BENCH_REPS` the repetitions (3).

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::time::Duration;
use support::broker::{TestBroker, unique_name};
use support::daemon::{Bin, Daemon, TempDir, TestConfig, toml_str};

const WAIT: Duration = Duration::from_secs(300);
const PLAIN: &str = support::nodes::TLS_NODE_PLAIN_URL;
const TLS: &str = "amqps://guest:guest@localhost:5681/%2f";

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let jobs: u64 = env_number("FLAGSHED_BENCH_JOBS", if quick { 3_000 } else { 20_000 });
    let reps: usize = env_number("FLAGSHED_BENCH_REPS", if quick { 1 } else { 3 }) as usize;
    let certs = support::nodes::tls_node();
    let mut rates: [[Vec<f64>; 2]; 2] = Default::default(); // [transport][publish, consume]
    for rep in 0..reps {
        for (t, url) in [PLAIN, TLS].into_iter().enumerate() {
            let (publish, consume) = run(url, certs, jobs);
            println!(
                "rep {}: {:<5} publish {publish:>8.0}/s  consume {consume:>8.0}/s",
                rep + 1,
                if t == 0 { "plain" } else { "TLS" }
            );
            rates[t][0].push(publish);
            rates[t][1].push(consume);
        }
    }
    println!();
    println!("| {jobs} jobs, median of {reps} | plain AMQP | TLS | TLS / plain |");
    println!("| --- | --- | --- | --- |");
    for (i, what) in ["confirmed publish (jobs/s)", "consume + ack (jobs/s)"]
        .into_iter()
        .enumerate()
    {
        let plain = median(&mut rates[0][i]);
        let tls = median(&mut rates[1][i]);
        println!(
            "| {what} | {plain:.0} | {tls:.0} | {:.2} |",
            tls / plain.max(1e-9)
        );
    }
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// Publishes `jobs` jobs over `url`, then consumes them; returns both rates in jobs/s.
fn run(url: &str, certs: &Path, jobs: u64) -> (f64, f64) {
    let dir = TempDir::new("bench-tls");
    let queue = unique_name("bench-tls");
    let config = TestConfig::new(&queue)
        .set("broker", "url", &toml_str(url))
        .set(
            "broker",
            "tls_ca_file",
            &toml_str(certs.join("ca.pem").to_str().expect("utf-8 path")),
        )
        .set("queuer", "max_jobs", &jobs.to_string())
        .set("queuer", "work_ms", "0")
        .set("queuer", "ttl_ms", "600000")
        .set("queuer", "payload_bytes", "100")
        .set("worker", "concurrency", "4")
        .set("worker", "prefetch", "50")
        .set("log", "stats_interval_ms", "100")
        .flag_file(
            &dir,
            r#"{"flagValues": {"task-rate": 1000000, "skip-rate": 0}}"#,
        );
    // The TLS keys are refused with a plain URL.
    let config = if url.starts_with("amqps") {
        config
    } else {
        config.without("broker", "tls_ca_file")
    };
    let path = config.write(&dir, "flagshed.toml");

    let mut queuer = Daemon::start(Bin::Queuer, &path);
    let started = queuer.wait_for_line("publishing to queue", WAIT);
    assert!(queuer.wait_exit(WAIT).success(), "{}", queuer.log());
    let ended = queuer.wait_for_line("final role=queuer", WAIT);
    let published = queuer.final_ledger().get("published");
    let publish_rate = published as f64 / seconds_between(&started, &ended);

    let mut worker = Daemon::start(Bin::Worker, &path);
    let started = worker.wait_for_line("consuming from queue", WAIT);
    worker.wait_settled(published);
    let settled = worker.last_line("stats role=worker").expect("a stats line");
    let consume_rate = published as f64 / seconds_between(&started, &settled);
    worker.stop().assert_balanced();

    let mut broker = TestBroker::connect_to(PLAIN);
    broker.owns_queue(&queue);
    (publish_rate, consume_rate)
}

/// Seconds between two log lines, by their RFC 3339 timestamps (`...THH:MM:SS.mmmZ`).
fn seconds_between(from: &str, to: &str) -> f64 {
    let ms = |line: &str| -> i64 {
        let time = line
            .split_whitespace()
            .next()
            .and_then(|stamp| stamp.split_once('T'))
            .map(|(_, t)| t.trim_end_matches('Z'))
            .unwrap_or_else(|| panic!("no timestamp in {line:?}"));
        let mut parts = time.split([':', '.']);
        let mut next = || -> i64 {
            parts
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("bad timestamp in {line:?}"))
        };
        let (h, m, s, milli) = (next(), next(), next(), next());
        ((h * 60 + m) * 60 + s) * 1000 + milli
    };
    let mut elapsed = ms(to) - ms(from);
    if elapsed < 0 {
        elapsed += 86_400_000;
    }
    (elapsed.max(1) as f64) / 1000.0
}
