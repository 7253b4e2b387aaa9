//! One taskworker under test, as the benches run it: a fresh queue (and dead-letter queue), a
//! config, the worker's stats lines and audit trail, and an account of every published job by
//! id, so that each run ends with its ledger checked, whatever it measured.

use super::feed::{Feed, FeedOptions, FeedReport, Target};
use super::rig::DAEMON_WAIT;
use super::{StatsLine, stats_lines};
use crate::support::broker::{TestBroker, death_reason, unique_name};
use crate::support::daemon::{Bin, Daemon, TempDir, TestConfig, toml_str};
use flagshed::clock::now_ms;
use flagshed::config::Config;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The exec handler's program for jobs whose work is in the body: sleep that long.
pub const WORK_SCRIPT: &str = "#!/bin/sh\n\
# The body is the job's work in milliseconds: sleep that long.\n\
read ms\n\
exec sleep \"$(printf '%d.%03d' $((ms/1000)) $((ms%1000)))\"\n";

/// Sets the worker up to run [`WORK_SCRIPT`] per job with the exec handler.
pub fn exec_work_config(config: TestConfig, dir: &TempDir) -> TestConfig {
    let script = dir.write("work.sh", WORK_SCRIPT);
    config.set("handler", "kind", "\"exec\"").set(
        "handler",
        "command",
        &toml_array(&["/bin/sh", &script.display().to_string()]),
    )
}

/// One taskworker on a fresh queue, its config, its audit trail and what reaches the
/// dead-letter queue.
pub struct Lab {
    broker: TestBroker,
    /// Holds the config, the script and the audit trail; removed with the lab.
    _dir: TempDir,
    pub queue: String,
    dead: Option<String>,
    config_path: PathBuf,
    /// The queue as the worker declares it.
    pub target: Target,
    audit_path: Option<PathBuf>,
    worker: Option<Daemon>,
    /// Ids of jobs RabbitMQ expired (dead-lettered with reason `expired`).
    expired_ids: Vec<String>,
    /// Ids of jobs the worker rejected (timed out, failed, malformed).
    rejected_ids: Vec<String>,
    other_dead: u64,
}

#[derive(Clone, Copy, Debug)]
pub struct LabOptions {
    /// Pool threads: `worker.concurrency`.
    pub concurrency: u64,
    /// Dead-letter what the worker rejects and RabbitMQ expires, and account for it by id.
    pub dead_letters: bool,
    /// Keep the worker's audit trail (`worker.ledger_file`).
    pub audit: bool,
    pub stats_ms: u64,
}

impl Lab {
    /// Declares nothing and starts nothing: writes the worker's config, which `configure`
    /// completes (it may write files, such as a script, into the directory).
    pub fn new(
        what: &str,
        options: LabOptions,
        configure: impl FnOnce(TestConfig, &TempDir) -> TestConfig,
    ) -> Lab {
        let mut broker = TestBroker::connect();
        let queue = unique_name(what);
        broker.owns_queue(&queue);
        let dir = TempDir::new(what);
        let mut config = TestConfig::new(&queue)
            .set("worker", "concurrency", &options.concurrency.to_string())
            .set("worker", "shed_action", "\"ack\"")
            .set("log", "stats_interval_ms", &options.stats_ms.to_string());
        let dead = if options.dead_letters {
            let (dlx, dead) = broker.dead_letter_pair(what);
            config = config.set("broker", "dead_letter_exchange", &toml_str(&dlx));
            Some(dead)
        } else {
            None
        };
        let audit_path = options.audit.then(|| dir.path().join("audit.log"));
        if let Some(path) = &audit_path {
            config = config.set(
                "worker",
                "ledger_file",
                &toml_str(&path.display().to_string()),
            );
        }
        let config = configure(config, &dir);
        let config_path = config.write(&dir, "flagshed.toml");
        let target = Target::from_config(
            &Config::load(&config_path)
                .unwrap_or_else(|e| panic!("the bench's worker config is invalid: {e}"))
                .broker,
        );
        Lab {
            broker,
            _dir: dir,
            queue,
            dead,
            config_path,
            target,
            audit_path,
            worker: None,
            expired_ids: Vec::new(),
            rejected_ids: Vec::new(),
            other_dead: 0,
        }
    }

    pub fn start_worker(&mut self) {
        let worker = Daemon::start(Bin::Worker, &self.config_path);
        worker.wait_for_line("consuming from queue", DAEMON_WAIT);
        self.worker = Some(worker);
    }

    pub fn worker(&self) -> &Daemon {
        self.worker.as_ref().expect("the worker was started")
    }

    pub fn depth(&self) -> u32 {
        self.broker.ready_count(&self.queue)
    }

    pub fn last_stats(&self) -> Option<StatsLine> {
        self.worker()
            .last_line("stats role=worker")
            .and_then(|l| StatsLine::parse(&l))
    }

    /// Every stats line the worker logged, in order.
    pub fn stats(&self) -> Vec<StatsLine> {
        stats_lines(&self.worker().log(), "stats role=worker")
    }

    /// Takes what reached the dead-letter queue off it, by reason.
    pub fn collect_dead_letters(&mut self) {
        let Some(dead) = &self.dead else { return };
        for properties in self.broker.drain(dead) {
            let id = properties.message_id().clone().unwrap_or_default();
            match death_reason(&properties).as_deref() {
                Some("expired") => self.expired_ids.push(id),
                Some("rejected") => self.rejected_ids.push(id),
                _ => self.other_dead += 1,
            }
        }
    }

    /// Waits (up to `timeout`) until the queue is empty and the worker holds nothing.
    pub fn wait_idle(&mut self, timeout: Duration) {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            self.collect_dead_letters();
            if self.depth() == 0 {
                let asked = now_ms();
                let line_end = Instant::now() + Duration::from_secs(2);
                while Instant::now() < line_end {
                    match self.last_stats() {
                        Some(line) if line.at_ms > asked => {
                            if line.get("in_flight") == 0 && self.depth() == 0 {
                                return;
                            }
                            break;
                        }
                        _ => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the worker as systemd would; returns its final line.
    pub fn stop_worker(&mut self) -> Option<StatsLine> {
        let worker = self.worker.as_mut()?;
        worker.signal(libc::SIGTERM);
        worker.wait_exit(DAEMON_WAIT);
        worker
            .last_line("final role=worker")
            .and_then(|l| StatsLine::parse(&l))
    }

    /// The audit trail: `(ms, id, state)` per settled delivery, in order.
    pub fn audit(&self) -> Vec<AuditLine> {
        let Some(path) = &self.audit_path else {
            return Vec::new();
        };
        let text = std::fs::read_to_string(path).unwrap_or_default();
        // JSON lines: `{"ms":…,"id":…,"state":…}`.
        text.lines()
            .filter_map(|line| {
                let record: serde_json::Value = serde_json::from_str(line).ok()?;
                Some(AuditLine {
                    at_ms: record["ms"].as_u64()?,
                    id: record["id"].as_str().unwrap_or("-").to_owned(),
                    state: record["state"].as_str()?.to_owned(),
                })
            })
            .collect()
    }
}

/// One line of the worker's audit trail.
#[derive(Clone, Debug)]
pub struct AuditLine {
    pub at_ms: u64,
    pub id: String,
    pub state: String,
}

impl AuditLine {
    /// States after which the job comes back (requeued, retried) are not final.
    pub fn is_final(&self) -> bool {
        !matches!(self.state.as_str(), "requeued" | "retried")
    }
}

/// Every published job, accounted for.
#[derive(Clone, Debug, Default)]
pub struct Accounting {
    pub published: u64,
    /// Jobs with a final state in the audit trail.
    pub settled: u64,
    pub broker_expired: u64,
    pub still_queued: u64,
    pub problems: Vec<String>,
}

impl Accounting {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    pub fn cell(&self) -> String {
        if self.ok() {
            format!(
                "ok ({} = {} + {} + {})",
                self.published, self.settled, self.broker_expired, self.still_queued
            )
        } else {
            format!("UNBALANCED: {}", self.problems.join("; "))
        }
    }
}

/// Checks the final ledger line, and each published job by id: settled once in the audit
/// trail, or expired by RabbitMQ, or still in the queue.
pub fn account(
    feed: &FeedReport,
    lab: &Lab,
    audit: &[AuditLine],
    final_line: Option<&StatsLine>,
    still_queued: u64,
) -> Accounting {
    let mut problems = Vec::new();
    match final_line {
        None => problems.push("the worker logged no final line".to_owned()),
        Some(line) if line.text("balanced") != "true" => {
            problems.push(format!("worker ledger balanced={}", line.text("balanced")));
        }
        Some(_) => {}
    }
    if feed.nacked() + feed.unconfirmed() > 0 {
        problems.push(format!(
            "{} publishes nacked, {} unconfirmed",
            feed.nacked(),
            feed.unconfirmed()
        ));
    }
    let published: HashSet<&str> = feed
        .jobs
        .iter()
        .filter(|j| j.confirmed == Some(true))
        .map(|j| j.id.as_str())
        .collect();
    let mut finals: HashMap<&str, u32> = HashMap::new();
    let mut unknown = 0u64;
    for line in audit {
        if !published.contains(line.id.as_str()) {
            unknown += 1;
        } else if line.is_final() {
            *finals.entry(line.id.as_str()).or_default() += 1;
        }
    }
    let twice = finals.values().filter(|&&n| n > 1).count();
    if twice > 0 {
        problems.push(format!("{twice} jobs settled more than once"));
    }
    if unknown > 0 {
        problems.push(format!("{unknown} audit lines for jobs never published"));
    }
    let expired: HashSet<&str> = lab.expired_ids.iter().map(String::as_str).collect();
    let both = expired.iter().filter(|id| finals.contains_key(*id)).count();
    if both > 0 {
        problems.push(format!(
            "{both} jobs both settled by the worker and expired by RabbitMQ"
        ));
    }
    let strangers = expired.iter().filter(|id| !published.contains(*id)).count();
    if strangers > 0 {
        problems.push(format!("{strangers} expired jobs never published"));
    }
    let missing = published
        .iter()
        .filter(|id| !finals.contains_key(*id) && !expired.contains(*id))
        .count() as u64;
    if missing != still_queued {
        problems.push(format!(
            "{missing} published jobs unaccounted for ({still_queued} still queued)"
        ));
    }
    if let Some(line) = final_line {
        let counted: u64 = crate::support::daemon::final_states()
            .iter()
            .map(|k| line.get(k))
            .sum();
        if counted != finals.len() as u64 {
            problems.push(format!(
                "final outcomes {counted} != jobs settled in the audit trail {}",
                finals.len()
            ));
        }
        if lab.dead.is_some() {
            let rejected = line.get("timed_out") + line.get("failed") + line.get("malformed");
            if rejected != lab.rejected_ids.len() as u64 {
                problems.push(format!(
                    "{rejected} jobs rejected but {} dead-lettered as rejected",
                    lab.rejected_ids.len()
                ));
            }
        }
    }
    if lab.other_dead > 0 {
        problems.push(format!(
            "{} dead letters for another reason",
            lab.other_dead
        ));
    }
    Accounting {
        published: published.len() as u64,
        settled: finals.len() as u64,
        broker_expired: expired.len() as u64,
        still_queued,
        problems,
    }
}

/// Counter changes between two stats lines.
#[derive(Clone, Debug, Default)]
pub struct Window {
    pub secs: f64,
    deltas: HashMap<String, u64>,
}

impl Window {
    /// From the first stats line at or after `from_ms` to the last at or before `to_ms`.
    pub fn between(lines: &[StatsLine], from_ms: u64, to_ms: u64) -> Window {
        let first = lines.iter().find(|l| l.at_ms >= from_ms);
        let last = lines.iter().rev().find(|l| l.at_ms <= to_ms);
        let (Some(a), Some(b)) = (first, last) else {
            return Window::default();
        };
        if b.at_ms <= a.at_ms {
            return Window::default();
        }
        let keys = [
            "received",
            "done",
            "late",
            "timed_out",
            "failed",
            "skipped",
            "expired",
            "doomed",
            "work_ms",
            "wasted_work_ms",
        ];
        Window {
            secs: (b.at_ms - a.at_ms) as f64 / 1000.0,
            deltas: keys
                .iter()
                .map(|k| ((*k).to_owned(), b.get(k).saturating_sub(a.get(k))))
                .collect(),
        }
    }

    pub fn d(&self, key: &str) -> u64 {
        self.deltas.get(key).copied().unwrap_or(0)
    }

    pub fn per_sec(&self, key: &str) -> f64 {
        if self.secs > 0.0 {
            self.d(key) as f64 / self.secs
        } else {
            f64::NAN
        }
    }

    /// On-time completions per second as a share of `capacity`.
    pub fn goodput(&self, capacity: f64) -> f64 {
        self.per_sec("done") / capacity
    }

    /// Handler time spent on jobs that finished late or were stopped at their deadline, as a
    /// share of all handler time.
    pub fn wasted_share(&self) -> f64 {
        let work = self.d("work_ms");
        if work == 0 {
            0.0
        } else {
            self.d("wasted_work_ms") as f64 / work as f64
        }
    }

    /// Handler time as a share of the pool's thread time.
    pub fn busy(&self, threads: u64) -> f64 {
        self.d("work_ms") as f64 / (self.secs * 1000.0 * threads as f64)
    }
}

/// The `q` quantile of some values (nearest rank); `None` when there are none.
pub fn quantile_of(values: &mut [i64], q: f64) -> Option<i64> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable();
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    Some(values[rank - 1])
}

pub fn toml_array(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| toml_str(s)).collect();
    format!("[{}]", quoted.join(", "))
}

/// What a run of a job stream through the exec handler left to look at.
pub struct StreamRun {
    pub report: FeedReport,
    pub stats: Vec<StatsLine>,
    pub audit: Vec<AuditLine>,
    pub final_line: Option<StatsLine>,
    pub accounting: Accounting,
}

/// Publishes `feed`'s job stream to a fresh worker set up by `configure`, lets the queue
/// empty, stops the worker and accounts for every job by id.
pub fn run_stream(
    what: &str,
    options: LabOptions,
    feed: FeedOptions,
    configure: impl FnOnce(TestConfig, &TempDir) -> TestConfig,
) -> StreamRun {
    let mut lab = Lab::new(what, options, configure);
    lab.start_worker();
    let duration = feed.duration;
    let feed = Feed::start(&lab.target, feed);
    let end = feed.started + duration;
    while Instant::now() < end {
        std::thread::sleep(
            end.saturating_duration_since(Instant::now())
                .min(Duration::from_secs(1)),
        );
        lab.collect_dead_letters();
    }
    let report = feed.join();
    lab.wait_idle(Duration::from_secs(60));
    let final_line = lab.stop_worker();
    // Dead letters reach their queue asynchronously; give the last ones a moment.
    std::thread::sleep(Duration::from_millis(300));
    lab.collect_dead_letters();
    let still_queued = u64::from(lab.depth());
    let stats = lab.stats();
    let audit = lab.audit();
    let accounting = account(&report, &lab, &audit, final_line.as_ref(), still_queued);
    StreamRun {
        report,
        stats,
        audit,
        final_line,
        accounting,
    }
}
