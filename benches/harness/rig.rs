//! A test rig of real daemons on one fresh queue: taskworker processes, a taskqueuer, a flag
//! file an operator can rewrite, and a dead-letter queue that catches what RabbitMQ expires.
//!
//! The worker acks what it sheds (`shed_action = "ack"`), so the only messages reaching the
//! dead-letter queue are the broker's own expirations; that keeps the two kinds of expiry
//! apart and lets the rig check the ledger: every published job was received by a worker,
//! expired in the broker, or is still queued.

use super::StatsLine;
use crate::support::broker::{TestBroker, death_reason, unique_name};
use crate::support::daemon::{Bin, Daemon, TempDir, TestConfig, toml_str};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How long a daemon may take to start, or to stop after SIGTERM.
pub const DAEMON_WAIT: Duration = Duration::from_secs(60);

/// The shape of one experiment.
#[derive(Clone, Debug)]
pub struct RigOptions {
    /// Pool threads per worker.
    pub concurrency: u64,
    /// `x-work-ms` on every job (and the worker's default).
    pub work_ms: u64,
    /// Each job's deadline after creation, and its AMQP expiration.
    pub ttl_ms: u64,
    /// `None`: the worker's default (= concurrency).
    pub prefetch: Option<u64>,
    /// flagshed's deadline-aware shedding: drop doomed jobs and stop a job at its deadline.
    pub drop_doomed: bool,
    /// Initial flag values.
    pub skip_rate: f64,
    pub rate_per_sec: f64,
    pub stats_interval_ms: u64,
    /// Stop the queuer after this many jobs.
    pub max_jobs: Option<u64>,
    /// Catch broker expirations in a dead-letter queue.
    pub dead_letters: bool,
}

impl Default for RigOptions {
    fn default() -> RigOptions {
        RigOptions {
            concurrency: 4,
            work_ms: 200,
            ttl_ms: 2_000,
            prefetch: None,
            drop_doomed: true,
            skip_rate: 0.0,
            rate_per_sec: 0.0,
            stats_interval_ms: 250,
            max_jobs: None,
            dead_letters: true,
        }
    }
}

/// The daemons, their queue and their flag file.
pub struct Rig {
    pub broker: TestBroker,
    pub dir: TempDir,
    pub queue: String,
    dead: Option<String>,
    pub config_path: PathBuf,
    pub workers: Vec<Daemon>,
    pub queuer: Option<Daemon>,
    rate_per_sec: f64,
    skip_rate: f64,
    /// Dead letters seen so far, by reason.
    pub expired_by_broker: u64,
    pub other_dead_letters: u64,
}

/// Everything the rig can see at one moment.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub at: Instant,
    /// Each worker's latest stats line.
    pub workers: Vec<Option<StatsLine>>,
    pub queuer: Option<StatsLine>,
    pub expired_by_broker: u64,
    /// Messages ready in the queue (not counting those held by workers).
    pub depth: u32,
}

impl Snapshot {
    /// A worker counter summed over the workers.
    pub fn worker_sum(&self, key: &str) -> u64 {
        self.workers.iter().flatten().map(|l| l.get(key)).sum()
    }
}

/// Rates between two snapshots, each worker's measured on its own stats-line clock.
#[derive(Clone, Debug, Default)]
pub struct Window {
    pub secs: f64,
    pub published_per_sec: f64,
    pub done_per_sec: f64,
    pub late_per_sec: f64,
    pub done: u64,
    pub late: u64,
    pub skipped: u64,
    pub expired_by_worker: u64,
    pub expired_by_broker: u64,
    pub doomed: u64,
    pub late_work_ms: u64,
}

impl Window {
    pub fn between(a: &Snapshot, b: &Snapshot) -> Window {
        let mut w = Window {
            secs: b.at.duration_since(a.at).as_secs_f64(),
            expired_by_broker: b.expired_by_broker - a.expired_by_broker,
            ..Window::default()
        };
        for (before, after) in a.workers.iter().zip(&b.workers) {
            let (Some(before), Some(after)) = (before, after) else {
                continue;
            };
            let d = |k: &str| after.get(k).saturating_sub(before.get(k));
            let secs = after.at_ms.saturating_sub(before.at_ms) as f64 / 1000.0;
            if secs > 0.0 {
                w.done_per_sec += d("done") as f64 / secs;
                w.late_per_sec += d("late") as f64 / secs;
            }
            w.done += d("done");
            w.late += d("late");
            w.skipped += d("skipped");
            w.expired_by_worker += d("expired");
            w.doomed += d("doomed");
            w.late_work_ms += d("late_work_ms");
        }
        if let (Some(before), Some(after)) = (&a.queuer, &b.queuer) {
            let secs = after.at_ms.saturating_sub(before.at_ms) as f64 / 1000.0;
            if secs > 0.0 {
                w.published_per_sec = after
                    .get("published")
                    .saturating_sub(before.get("published"))
                    as f64
                    / secs;
            }
        }
        w
    }
}

/// How a run ended: the final ledgers and whether they balance against what was published.
#[derive(Clone, Debug)]
pub struct Settlement {
    pub published: u64,
    pub workers: Vec<StatsLine>,
    pub received: u64,
    pub expired_by_broker: u64,
    pub still_queued: u64,
    /// Every worker said `balanced=true`, and published = received + expired in the broker +
    /// still queued (less any requeued or returned, which are back in the queue).
    pub balanced: bool,
    pub why_not: String,
}

impl Rig {
    /// Declares a fresh queue (and dead-letter queue), writes the config and the flag file;
    /// starts nothing.
    pub fn new(what: &str, options: &RigOptions) -> Rig {
        let mut broker = TestBroker::connect();
        let queue = unique_name(what);
        broker.owns_queue(&queue);
        let dir = TempDir::new(what);
        let flags_path = dir.path().join("flags.json");
        let mut config = TestConfig::new(&queue)
            .set(
                "flags",
                "file",
                &toml_str(&flags_path.display().to_string()),
            )
            .set("flags", "file_check_ms", "100")
            .set("worker", "concurrency", &options.concurrency.to_string())
            .set("worker", "default_work_ms", &options.work_ms.to_string())
            .set("worker", "shed_action", "\"ack\"")
            .set("worker", "drop_doomed", &options.drop_doomed.to_string())
            // The original design ran every job to its end; flagshed's shedding also stops a
            // job at its deadline.
            .set(
                "handler",
                "enforce_deadline",
                &options.drop_doomed.to_string(),
            )
            .set("queuer", "ttl_ms", &options.ttl_ms.to_string())
            .set("queuer", "work_ms", &options.work_ms.to_string())
            .set(
                "log",
                "stats_interval_ms",
                &options.stats_interval_ms.to_string(),
            );
        if let Some(prefetch) = options.prefetch {
            config = config.set("worker", "prefetch", &prefetch.to_string());
        }
        if let Some(max) = options.max_jobs {
            config = config.set("queuer", "max_jobs", &max.to_string());
        }
        let dead = if options.dead_letters {
            let (dlx, dead) = broker.dead_letter_pair(what);
            config = config.set("broker", "dead_letter_exchange", &toml_str(&dlx));
            Some(dead)
        } else {
            None
        };
        let config_path = config.write(&dir, "flagshed.toml");
        let rig = Rig {
            broker,
            dir,
            queue,
            dead,
            config_path,
            workers: Vec::new(),
            queuer: None,
            rate_per_sec: options.rate_per_sec,
            skip_rate: options.skip_rate,
            expired_by_broker: 0,
            other_dead_letters: 0,
        };
        rig.write_flags();
        rig
    }

    fn write_flags(&self) {
        self.dir.write(
            "flags.json",
            &format!(
                r#"{{"flagValues": {{"task-rate": {}, "skip-rate": {}}}}}"#,
                self.rate_per_sec, self.skip_rate
            ),
        );
    }

    /// Rewrites the flag file, as an operator would; the daemons notice within
    /// `file_check_ms`.
    pub fn set_flags(&mut self, rate_per_sec: f64, skip_rate: f64) {
        self.rate_per_sec = rate_per_sec;
        self.skip_rate = skip_rate;
        self.write_flags();
    }

    pub fn start_workers(&mut self, count: usize) {
        for _ in 0..count {
            let worker = Daemon::start(Bin::Worker, &self.config_path);
            worker.wait_for_line("consuming from queue", DAEMON_WAIT);
            self.workers.push(worker);
        }
    }

    pub fn start_queuer(&mut self) {
        let queuer = Daemon::start(Bin::Queuer, &self.config_path);
        queuer.wait_for_line("publishing to queue", DAEMON_WAIT);
        self.queuer = Some(queuer);
    }

    /// Takes what reached the dead-letter queue off it, counting by reason.
    pub fn collect_dead_letters(&mut self) {
        let Some(dead) = &self.dead else { return };
        for properties in self.broker.drain(dead) {
            if death_reason(&properties).as_deref() == Some("expired") {
                self.expired_by_broker += 1;
            } else {
                self.other_dead_letters += 1;
            }
        }
    }

    pub fn depth(&self) -> u32 {
        self.broker.ready_count(&self.queue)
    }

    pub fn snapshot(&mut self) -> Snapshot {
        self.collect_dead_letters();
        let last =
            |d: &Daemon, needle: &str| d.last_line(needle).and_then(|l| StatsLine::parse(&l));
        Snapshot {
            at: Instant::now(),
            workers: self
                .workers
                .iter()
                .map(|w| last(w, "stats role=worker"))
                .collect(),
            queuer: self
                .queuer
                .as_ref()
                .and_then(|q| last(q, "stats role=queuer")),
            expired_by_broker: self.expired_by_broker,
            depth: self.depth(),
        }
    }

    /// Waits until every daemon has logged a stats line, so rates can be measured from the
    /// first snapshot on.
    pub fn wait_for_stats(&self) {
        for worker in &self.workers {
            worker.wait_for_line("stats role=worker", DAEMON_WAIT);
        }
        if let Some(queuer) = &self.queuer {
            queuer.wait_for_line("stats role=queuer", DAEMON_WAIT);
        }
    }

    /// Stops the queuer, lets the queue empty (served by the workers or expired by the
    /// broker), stops the workers, and checks the ledger.
    pub fn finish(&mut self) -> Settlement {
        let mut published = 0;
        let mut why_not = Vec::new();
        if let Some(mut queuer) = self.queuer.take() {
            queuer.signal(libc::SIGTERM);
            queuer.wait_exit(DAEMON_WAIT);
            let last = queuer
                .last_line("final role=queuer")
                .and_then(|l| StatsLine::parse(&l));
            match last {
                Some(line) => {
                    published = line.get("published");
                    if line.get("lost") + line.get("nacked") > 0 {
                        why_not.push(format!(
                            "queuer lost {} and had {} nacked",
                            line.get("lost"),
                            line.get("nacked")
                        ));
                    }
                }
                None => why_not.push("the queuer logged no final line".to_owned()),
            }
        }
        let end = Instant::now() + DAEMON_WAIT;
        while !self.workers.is_empty() && self.depth() > 0 && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut finals = Vec::new();
        for mut worker in self.workers.drain(..) {
            worker.signal(libc::SIGTERM);
            worker.wait_exit(DAEMON_WAIT);
            match worker
                .last_line("final role=worker")
                .and_then(|l| StatsLine::parse(&l))
            {
                Some(line) => {
                    if line.text("balanced") != "true" {
                        why_not.push(format!(
                            "a worker's ledger: balanced={}",
                            line.text("balanced")
                        ));
                    }
                    finals.push(line);
                }
                None => why_not.push("a worker logged no final line".to_owned()),
            }
        }
        // Expirations reach the dead-letter queue asynchronously; give the last ones a moment.
        std::thread::sleep(Duration::from_millis(300));
        self.collect_dead_letters();
        let still_queued = u64::from(self.depth());
        let received: u64 = finals
            .iter()
            .map(|l| l.get("received") - l.get("requeued") - l.get("returned"))
            .sum();
        let accounted = received + self.expired_by_broker + still_queued;
        if accounted != published {
            why_not.push(format!(
                "published {published} != received {received} + expired in the broker {} + still queued {still_queued}",
                self.expired_by_broker
            ));
        }
        if self.other_dead_letters > 0 {
            why_not.push(format!(
                "{} dead letters were not broker expirations",
                self.other_dead_letters
            ));
        }
        Settlement {
            published,
            workers: finals,
            received,
            expired_by_broker: self.expired_by_broker,
            still_queued,
            balanced: why_not.is_empty(),
            why_not: why_not.join("; "),
        }
    }
}
