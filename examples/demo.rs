//! `make demo`: bend, don't break, as it happens.
//!
//! Runs taskworker and taskqueuer against the local RabbitMQ with a local flag file, for about
//! a minute, in three phases:
//! 1. the original design: jobs arrive at twice the worker's capacity, skip-rate 0, no doomed
//!    drop; the queue grows until every job waits past its deadline;
//! 2. an operator sets the skip-rate flag to 60 (in the flag file, as in the dashboard);
//! 3. the skip rate goes back to 0 and the worker's deadline-aware shedding is switched on
//!    with a config reload (SIGHUP).
//!
//! It prints a line every few seconds and a table per phase: offered rate, jobs finished on
//! time, late, skipped, expired (by the worker or by RabbitMQ) and doomed.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};
use support::broker::{TestBroker, unique_name};
use support::daemon::{Bin, Daemon, Ledger, TempDir, TestConfig, toml_str};

const CONCURRENCY: u64 = 4;
const WORK_MS: u64 = 200;
const CAPACITY: f64 = CONCURRENCY as f64 * 1000.0 / WORK_MS as f64;
const OFFERED: f64 = 2.0 * CAPACITY;
const TTL_MS: u64 = 2_000;

struct Phase {
    title: &'static str,
    skip_rate: f64,
    drop_doomed: bool,
    secs: u64,
}

const PHASES: [Phase; 3] = [
    Phase {
        title: "1 original: skip-rate 0",
        skip_rate: 0.0,
        drop_doomed: false,
        secs: 20,
    },
    Phase {
        title: "2 operator: skip-rate 60",
        skip_rate: 60.0,
        drop_doomed: false,
        secs: 20,
    },
    Phase {
        title: "3 deadline-aware, skip 0",
        skip_rate: 0.0,
        drop_doomed: true,
        secs: 20,
    },
];

/// Counters at one moment.
#[derive(Clone, Copy, Default)]
struct Sample {
    published: u64,
    done: u64,
    late: u64,
    skipped: u64,
    expired_worker: u64,
    expired_broker: u64,
    doomed: u64,
}

impl Sample {
    fn minus(self, before: Sample) -> Sample {
        Sample {
            published: self.published - before.published,
            done: self.done - before.done,
            late: self.late - before.late,
            skipped: self.skipped - before.skipped,
            expired_worker: self.expired_worker - before.expired_worker,
            expired_broker: self.expired_broker - before.expired_broker,
            doomed: self.doomed - before.doomed,
        }
    }
}

struct Lab {
    broker: TestBroker,
    dir: TempDir,
    queue: String,
    dead: String,
    config: TestConfig,
    worker: Daemon,
    queuer: Daemon,
    expired_broker: u64,
}

impl Lab {
    fn sample(&mut self) -> Sample {
        // Only the broker's expirations reach the dead-letter queue: the worker acks what it
        // sheds in this demo, so the two kinds of expiry can be told apart.
        self.expired_broker += self.broker.drain(&self.dead).len() as u64;
        let worker = self
            .worker
            .last_line("stats role=worker")
            .map(|l| Ledger::parse(&l))
            .unwrap_or_default();
        let queuer = self
            .queuer
            .last_line("stats role=queuer")
            .map(|l| Ledger::parse(&l))
            .unwrap_or_default();
        let get = |l: &Ledger, k: &str| l.fields.get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
        Sample {
            published: get(&queuer, "published"),
            done: get(&worker, "done"),
            late: get(&worker, "late"),
            skipped: get(&worker, "skipped"),
            expired_worker: get(&worker, "expired"),
            expired_broker: self.expired_broker,
            doomed: get(&worker, "doomed"),
        }
    }

    fn set_skip_rate(&self, skip_rate: f64) {
        self.dir.write(
            "flags.json",
            &format!(r#"{{"flagValues": {{"task-rate": {OFFERED}, "skip-rate": {skip_rate}}}}}"#),
        );
    }

    /// Deadline-aware shedding on or off; the original design also ran every job to its end.
    fn set_drop_doomed(&mut self, on: bool) {
        let value = if on { "true" } else { "false" };
        self.config = self.config.clone().set("worker", "drop_doomed", value).set(
            "handler",
            "enforce_deadline",
            value,
        );
        self.config.write(&self.dir, "flagshed.toml");
        self.worker.signal(libc::SIGHUP);
    }
}

fn main() {
    let mut broker = TestBroker::connect();
    let queue = unique_name("demo");
    broker.owns_queue(&queue);
    let (dlx, dead) = broker.dead_letter_pair("demo");
    let dir = TempDir::new("demo");
    let config = TestConfig::new(&queue)
        .set("broker", "dead_letter_exchange", &toml_str(&dlx))
        .set(
            "flags",
            "file",
            &toml_str(&dir.path().join("flags.json").display().to_string()),
        )
        .set("flags", "file_check_ms", "100")
        .set("worker", "concurrency", &CONCURRENCY.to_string())
        .set("worker", "shed_action", "\"ack\"")
        .set("worker", "drop_doomed", "false")
        .set("handler", "enforce_deadline", "false")
        .set("queuer", "ttl_ms", &TTL_MS.to_string())
        .set("queuer", "work_ms", &WORK_MS.to_string())
        .set("log", "stats_interval_ms", "500");
    config.write(&dir, "flagshed.toml");
    let config_path = dir.path().join("flagshed.toml");
    dir.write(
        "flags.json",
        &format!(r#"{{"flagValues": {{"task-rate": {OFFERED}, "skip-rate": 0}}}}"#),
    );

    println!(
        "flagshed demo: worker capacity {CAPACITY} jobs/s ({CONCURRENCY} threads x {WORK_MS} ms), \
         jobs offered at {OFFERED}/s, deadline {TTL_MS} ms after enqueue\n"
    );
    let worker = Daemon::start(Bin::Worker, &config_path);
    worker.wait_for_line("consuming from queue", Duration::from_secs(30));
    let queuer = Daemon::start(Bin::Queuer, &config_path);
    queuer.wait_for_line("publishing to queue", Duration::from_secs(30));
    let mut lab = Lab {
        broker,
        dir,
        queue,
        dead,
        config,
        worker,
        queuer,
        expired_broker: 0,
    };

    let mut rows = Vec::new();
    for phase in &PHASES {
        lab.set_skip_rate(phase.skip_rate);
        if phase.drop_doomed {
            lab.set_drop_doomed(true);
        }
        println!(
            "== phase {}{}",
            phase.title,
            if phase.drop_doomed {
                " (doomed drop on, via SIGHUP)"
            } else {
                ""
            }
        );
        let start = lab.sample();
        let started = Instant::now();
        let mut last = start;
        while started.elapsed() < Duration::from_secs(phase.secs) {
            std::thread::sleep(Duration::from_secs(4));
            let now = lab.sample();
            let d = now.minus(last);
            println!(
                "   t={:>2}s queue={:>4}  per 4 s: on time {:>3}  late {:>3}  skipped {:>3}  expired {:>3}  doomed {:>3}",
                started.elapsed().as_secs(),
                lab.broker.ready_count(&lab.queue),
                d.done,
                d.late,
                d.skipped,
                d.expired_worker + d.expired_broker,
                d.doomed
            );
            last = now;
        }
        rows.push((
            phase,
            lab.sample().minus(start),
            started.elapsed().as_secs_f64(),
        ));
    }

    lab.queuer.signal(libc::SIGTERM);
    lab.queuer.wait_exit(Duration::from_secs(30));
    lab.worker.signal(libc::SIGTERM);
    lab.worker.wait_exit(Duration::from_secs(60));

    println!(
        "\n{:<26} {:>9} {:>9} {:>8} {:>6} {:>8} {:>8} {:>7} {:>9}",
        "phase",
        "offered/s",
        "published",
        "on time",
        "late",
        "skipped",
        "expired",
        "doomed",
        "goodput"
    );
    for (phase, d, secs) in rows {
        println!(
            "{:<26} {:>9.1} {:>9} {:>8} {:>6} {:>8} {:>8} {:>7} {:>8.0}%",
            phase.title,
            d.published as f64 / secs,
            d.published,
            d.done,
            d.late,
            d.skipped,
            d.expired_worker + d.expired_broker,
            d.doomed,
            d.done as f64 / secs / CAPACITY * 100.0
        );
    }
    println!("\ngoodput: jobs finished on time per second, as a share of the worker's capacity.");
    println!(
        "worker's last line: {}",
        lab.worker
            .last_line("final role=worker")
            .unwrap_or_default()
    );
}
