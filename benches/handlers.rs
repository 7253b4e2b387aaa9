//! Handlers that run real programs and services: what deadline-aware shedding is worth when
//! the work per job is unknown and variable, what the exec and http handlers cost against the
//! least a program could do, and how fast the learned work estimate follows a change.
//!
//! 1. Unknown work. The exec handler runs `/bin/sh work.sh` per job, which sleeps for the
//!    job's work: drawn per job from a lognormal distribution (mean 200 ms, CV 0.3 or 1.0)
//!    and carried only in the body. One taskworker with 4 threads (capacity C = 20 jobs/s)
//!    takes Poisson arrivals at 1C, 2C, 5C and 10C, published by this bench with confirms,
//!    each job due 2 s after it was created (`x-deadline-ms`, and the AMQP expiration).
//!    Three modes, on the same job stream:
//!    - original: no doomed drop, no deadline enforcement (only expired jobs are dropped);
//!    - flagshed: the defaults: the doomed check budgets the learned estimate of the job
//!      type's work, and the handler is stopped at the deadline;
//!    - oracle: flagshed, with each job's true work declared in `x-work-ms`.
//!
//!    Then flagshed again with `worker.estimate_quantile` 0.5, 0.9 and 0.99 (the sweep).
//! 2. Overhead. Jobs per second draining a pre-filled queue, 4 at a time: taskworker running
//!    `/bin/true` and `/bin/cat` against a bare Rust loop spawning the same program with 4
//!    threads, and against 4 `amqp-consume` processes (amqp-tools) running `/bin/cat`; the
//!    http handler against a bare ureq keep-alive client with 4 threads, both posting to a
//!    keep-alive server inside this bench.
//! 3. Drift. flagshed at 2C, CV 0.3; halfway through, the publisher doubles the mean work
//!    (200 to 400 ms): how long the estimate takes to follow, and what on-time completions do
//!    meanwhile.
//!
//! Every run ends with the worker's ledger balanced and every published job accounted for by
//! id, from the worker's audit trail (`worker.ledger_file`) and the dead-letter queue.
//!
//! `cargo bench --bench handlers [-- --quick | --ci] [--part unknown|sweep|overhead|drift]...`:
//! `--quick` measures short windows, `--ci` runs a few seconds per case and exits non-zero
//! unless every ledger balanced (no timing claims); `--part` runs only the named parts.
//! `FLAGSHED_BENCH_SECS` sets the steady window, `FLAGSHED_BENCH_DIR` where CSV, markdown and
//! SVG files go (`target/bench`). A full run also writes `docs/handlers-goodput.svg`.

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "harness/mod.rs"]
mod harness;

use flagshed::clock::now_ms;
use flagshed::config::Config;
use flagshed::handler::estimate::DEFAULT_SETTINGS;
use harness::feed::{Feed, FeedOptions, FeedReport, Target, prefill};
use harness::httpd::HttpServer;
use harness::random::LogNormal;
use harness::rig::DAEMON_WAIT;
use harness::svg::{Axis, Figure, Marker, PALETTE, Panel, Series};
use harness::{Settings, StatsLine, Table, fmt1, fmt2, median, pct, stats_lines};
use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use support::broker::{TestBroker, death_reason, unique_name};
use support::daemon::{Bin, Daemon, TempDir, TestConfig, toml_str};

const CONCURRENCY: u64 = 4;
const MEAN_WORK_MS: f64 = 200.0;
/// Jobs per second one worker finishes at the mean work: concurrency / mean work.
const CAPACITY: f64 = CONCURRENCY as f64 * 1000.0 / MEAN_WORK_MS;
const TTL_MS: u64 = 2_000;
const LOADS: [f64; 4] = [1.0, 2.0, 5.0, 10.0];
const CVS: [f64; 2] = [0.3, 1.0];
const QUANTILES: [f64; 3] = [0.5, 0.9, 0.99];
/// The AMQP `type` of every job: the worker learns work times per type.
const JOB_TYPE: &str = "sleep";
const STATS_MS: u64 = 250;
const TARGET_GOODPUT: f64 = 0.95;
const TARGET_GOODPUT_AT_1C: f64 = 0.90;
const TARGET_WASTED: f64 = 0.05;
const TARGET_OVERHEAD_RATIO: f64 = 0.8;
/// The overhead runs' job body, the same for every consumer.
const BODY: &[u8] = b"{\"invoice\": 42}\n";

/// The exec handler's program: the body is the job's work in milliseconds; sleep that long.
const WORK_SCRIPT: &str = "#!/bin/sh\n\
# The body is the job's work in milliseconds: sleep that long.\n\
read ms\n\
exec sleep \"$(printf '%d.%03d' $((ms/1000)) $((ms%1000)))\"\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Original,
    Flagshed,
    Oracle,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Original, Mode::Flagshed, Mode::Oracle];

    fn name(self) -> &'static str {
        match self {
            Mode::Original => "original",
            Mode::Flagshed => "flagshed",
            Mode::Oracle => "oracle",
        }
    }
}

/// One unknown-work run.
#[derive(Clone, Copy, Debug)]
struct Case {
    mode: Mode,
    cv: f64,
    load: f64,
    /// `worker.estimate_quantile`; `None`: the default.
    quantile: Option<f64>,
}

impl Case {
    /// The same job stream for every mode and quantile at one (CV, load).
    fn seed(&self) -> u64 {
        (self.cv * 1000.0) as u64 * 1_000_003 + (self.load * 100.0) as u64
    }

    fn quantile(&self) -> f64 {
        self.quantile.unwrap_or(DEFAULT_SETTINGS.quantile)
    }
}

#[derive(Clone, Copy, Debug)]
struct Durations {
    warmup: Duration,
    window: Duration,
}

/// Which parts to run (`--part`; all when none is named).
#[derive(Clone, Copy, Debug)]
struct Parts {
    unknown: bool,
    sweep: bool,
    overhead: bool,
    drift: bool,
}

impl Parts {
    fn from_args(rest: &[String]) -> Parts {
        let mut named = Vec::new();
        let mut args = rest.iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--part" => named.extend(args.next().cloned()),
                other => match other.strip_prefix("--part=") {
                    Some(part) => named.push(part.to_owned()),
                    None => eprintln!("ignoring argument {other:?}"),
                },
            }
        }
        for part in &named {
            if !["unknown", "sweep", "overhead", "drift"].contains(&part.as_str()) {
                eprintln!("unknown part {part:?}: expected unknown, sweep, overhead or drift");
                std::process::exit(2);
            }
        }
        let on = |p: &str| named.is_empty() || named.iter().any(|n| n == p);
        Parts {
            unknown: on("unknown"),
            sweep: on("sweep"),
            overhead: on("overhead"),
            drift: on("drift"),
        }
    }
}

/// One taskworker on a fresh queue, its config, its audit trail and what reaches the
/// dead-letter queue.
struct Lab {
    broker: TestBroker,
    /// Holds the config, the script and the audit trail; removed with the lab.
    _dir: TempDir,
    queue: String,
    dead: Option<String>,
    config_path: PathBuf,
    /// The queue as the worker declares it.
    target: Target,
    audit_path: Option<PathBuf>,
    worker: Option<Daemon>,
    /// Ids of jobs RabbitMQ expired (dead-lettered with reason `expired`).
    expired_ids: Vec<String>,
    /// Ids of jobs the worker rejected (timed out, failed, malformed).
    rejected_ids: Vec<String>,
    other_dead: u64,
}

#[derive(Clone, Copy, Debug)]
struct LabOptions {
    dead_letters: bool,
    audit: bool,
    stats_ms: u64,
}

impl Lab {
    /// Declares nothing and starts nothing: writes the worker's config, which `configure`
    /// completes (it may write files, such as a script, into the directory).
    fn new(
        what: &str,
        options: LabOptions,
        configure: impl FnOnce(TestConfig, &TempDir) -> TestConfig,
    ) -> Lab {
        let mut broker = TestBroker::connect();
        let queue = unique_name(what);
        broker.owns_queue(&queue);
        let dir = TempDir::new(what);
        let mut config = TestConfig::new(&queue)
            .set("worker", "concurrency", &CONCURRENCY.to_string())
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

    fn start_worker(&mut self) {
        let worker = Daemon::start(Bin::Worker, &self.config_path);
        worker.wait_for_line("consuming from queue", DAEMON_WAIT);
        self.worker = Some(worker);
    }

    fn worker(&self) -> &Daemon {
        self.worker.as_ref().expect("the worker was started")
    }

    fn depth(&self) -> u32 {
        self.broker.ready_count(&self.queue)
    }

    fn last_stats(&self) -> Option<StatsLine> {
        self.worker()
            .last_line("stats role=worker")
            .and_then(|l| StatsLine::parse(&l))
    }

    /// Every stats line the worker logged, in order.
    fn stats(&self) -> Vec<StatsLine> {
        stats_lines(&self.worker().log(), "stats role=worker")
    }

    /// Takes what reached the dead-letter queue off it, by reason.
    fn collect_dead_letters(&mut self) {
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
    fn wait_idle(&mut self, timeout: Duration) {
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
    fn stop_worker(&mut self) -> Option<StatsLine> {
        let worker = self.worker.as_mut()?;
        worker.signal(libc::SIGTERM);
        worker.wait_exit(DAEMON_WAIT);
        worker
            .last_line("final role=worker")
            .and_then(|l| StatsLine::parse(&l))
    }

    /// The audit trail: `(ms, id, state)` per settled delivery, in order.
    fn audit(&self) -> Vec<AuditLine> {
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
struct AuditLine {
    at_ms: u64,
    id: String,
    state: String,
}

impl AuditLine {
    /// States after which the job comes back (requeued, retried) are not final.
    fn is_final(&self) -> bool {
        !matches!(self.state.as_str(), "requeued" | "retried")
    }
}

/// Every published job, accounted for.
#[derive(Clone, Debug, Default)]
struct Accounting {
    published: u64,
    /// Jobs with a final state in the audit trail.
    settled: u64,
    broker_expired: u64,
    still_queued: u64,
    problems: Vec<String>,
}

impl Accounting {
    fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    fn cell(&self) -> String {
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
fn account(
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
        let counted: u64 = support::daemon::final_states()
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
struct Window {
    secs: f64,
    deltas: HashMap<String, u64>,
    /// The worker's estimate for the job type over the window (median of its stats lines).
    estimate_ms: Option<f64>,
}

impl Window {
    /// From the first stats line at or after `from_ms` to the last at or before `to_ms`.
    fn between(lines: &[StatsLine], from_ms: u64, to_ms: u64) -> Window {
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
        let estimates: Vec<f64> = lines
            .iter()
            .filter(|l| l.at_ms >= a.at_ms && l.at_ms <= b.at_ms)
            .filter_map(|l| estimate_ms(l).map(|e| e as f64))
            .collect();
        Window {
            secs: (b.at_ms - a.at_ms) as f64 / 1000.0,
            deltas: keys
                .iter()
                .map(|k| ((*k).to_owned(), b.get(k).saturating_sub(a.get(k))))
                .collect(),
            estimate_ms: (!estimates.is_empty()).then(|| median(&estimates)),
        }
    }

    fn d(&self, key: &str) -> u64 {
        self.deltas.get(key).copied().unwrap_or(0)
    }

    fn per_sec(&self, key: &str) -> f64 {
        if self.secs > 0.0 {
            self.d(key) as f64 / self.secs
        } else {
            f64::NAN
        }
    }

    /// On-time completions per second as a share of `capacity`.
    fn goodput(&self, capacity: f64) -> f64 {
        self.per_sec("done") / capacity
    }

    /// Handler time spent on jobs that finished late or were stopped at their deadline, as a
    /// share of all handler time.
    fn wasted_share(&self) -> f64 {
        let work = self.d("work_ms");
        if work == 0 {
            0.0
        } else {
            self.d("wasted_work_ms") as f64 / work as f64
        }
    }

    /// Handler time as a share of the pool's thread time.
    fn busy(&self) -> f64 {
        self.d("work_ms") as f64 / (self.secs * 1000.0 * CONCURRENCY as f64)
    }
}

/// The worker's estimate for [`JOB_TYPE`], from a stats line's `work_estimate_ms`.
fn estimate_ms(line: &StatsLine) -> Option<u64> {
    line.text("work_estimate_ms")
        .split(',')
        .find_map(|entry| entry.strip_prefix(JOB_TYPE)?.strip_prefix(':'))
        .and_then(|ms| ms.parse().ok())
}

/// The `q` quantile of some values (nearest rank); `None` when there are none.
fn quantile_of(values: &mut [i64], q: f64) -> Option<i64> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable();
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    Some(values[rank - 1])
}

/// One unknown-work run's figures.
#[derive(Clone)]
struct UnknownResult {
    case: Case,
    window: Window,
    /// p99 of (settled - deadline) over the late jobs settled in the window, and their count.
    late_p99_ms: Option<i64>,
    late_in_window: usize,
    /// The same for jobs stopped at their deadline: how far past it they were settled.
    stop_p99_ms: Option<i64>,
    final_line: Option<StatsLine>,
    accounting: Accounting,
}

impl UnknownResult {
    fn goodput(&self) -> f64 {
        self.window.goodput(CAPACITY)
    }

    fn target(&self) -> f64 {
        if self.case.load <= 1.0 {
            TARGET_GOODPUT_AT_1C
        } else {
            TARGET_GOODPUT
        }
    }

    fn count(&self, key: &str) -> u64 {
        self.final_line.as_ref().map_or(0, |l| l.get(key))
    }

    /// The `estimate_quantile` quantile of the work the jobs asked for (the sleep; the
    /// handler's time adds the cost of starting the script, a few ms).
    fn true_quantile_ms(&self) -> f64 {
        LogNormal::new(MEAN_WORK_MS, self.case.cv).quantile(self.case.quantile())
    }
}

/// The exec handler config that runs the work script, for `case`'s mode and quantile.
fn exec_work_config(config: TestConfig, dir: &TempDir, case: Case) -> TestConfig {
    let script = dir.write("work.sh", WORK_SCRIPT);
    let shedding = case.mode != Mode::Original;
    let mut config = config
        .set("handler", "kind", "\"exec\"")
        .set(
            "handler",
            "command",
            &toml_array(&["/bin/sh", &script.display().to_string()]),
        )
        .set("handler", "enforce_deadline", &shedding.to_string())
        .set("worker", "drop_doomed", &shedding.to_string());
    if let Some(q) = case.quantile {
        config = config.set("worker", "estimate_quantile", &q.to_string());
    }
    config
}

fn toml_array(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| toml_str(s)).collect();
    format!("[{}]", quoted.join(", "))
}

/// What a run of a job stream through the exec handler left to look at.
struct StreamRun {
    report: FeedReport,
    stats: Vec<StatsLine>,
    audit: Vec<AuditLine>,
    final_line: Option<StatsLine>,
    accounting: Accounting,
}

/// Publishes `case`'s job stream for `duration` (work switching to `switch` if given) to a
/// fresh worker, lets the queue empty, stops the worker and accounts for every job.
fn run_exec_stream(
    what: &str,
    case: Case,
    duration: Duration,
    switch: Option<(Duration, LogNormal)>,
) -> StreamRun {
    let mut lab = Lab::new(
        what,
        LabOptions {
            dead_letters: true,
            audit: true,
            stats_ms: STATS_MS,
        },
        |config, dir| exec_work_config(config, dir, case),
    );
    lab.start_worker();
    let feed = Feed::start(
        &lab.target,
        FeedOptions {
            id_prefix: "job".into(),
            rate_per_sec: case.load * CAPACITY,
            poisson: true,
            ttl_ms: Some(TTL_MS),
            declare_work: case.mode == Mode::Oracle,
            job_type: Some(JOB_TYPE.into()),
            work: LogNormal::new(MEAN_WORK_MS, case.cv),
            switch,
            duration,
            seed: case.seed(),
        },
    );
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

fn run_unknown(case: Case, durations: Durations) -> UnknownResult {
    let StreamRun {
        report,
        stats,
        audit,
        final_line,
        accounting,
    } = run_exec_stream("handlers", case, durations.warmup + durations.window, None);
    let from_ms = report.started_ms + durations.warmup.as_millis() as u64;
    let to_ms = from_ms + durations.window.as_millis() as u64;
    let window = Window::between(&stats, from_ms, to_ms);
    let deadlines: HashMap<&str, u64> = report
        .jobs
        .iter()
        .filter_map(|j| Some((j.id.as_str(), j.deadline_ms?)))
        .collect();
    let overshoot = |state: &str| -> Vec<i64> {
        audit
            .iter()
            .filter(|l| l.state == state && l.at_ms >= from_ms && l.at_ms <= to_ms)
            .filter_map(|l| Some(l.at_ms as i64 - *deadlines.get(l.id.as_str())? as i64))
            .collect()
    };
    let mut late = overshoot("late");
    let mut stopped = overshoot("timed_out");
    UnknownResult {
        case,
        window,
        late_in_window: late.len(),
        late_p99_ms: quantile_of(&mut late, 0.99),
        stop_p99_ms: quantile_of(&mut stopped, 0.99),
        final_line,
        accounting,
    }
}

fn opt_ms(value: Option<i64>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

fn unknown_table(results: &[UnknownResult]) -> Table {
    let mut table = Table::new(&[
        "CV",
        "load",
        "mode",
        "q",
        "goodput",
        "on time/s",
        "wasted",
        "busy",
        "estimate ms",
        "true q ms",
        "late p99 ms",
        "stop p99 ms",
        "received",
        "done",
        "late",
        "timed_out",
        "expired",
        "doomed",
        "broker-expired",
        "ledger (published = settled + broker-expired + queued)",
    ]);
    for r in results {
        let w = &r.window;
        table.row(vec![
            format!("{}", r.case.cv),
            format!("{}C", r.case.load),
            r.case.mode.name().to_owned(),
            if r.case.mode != Mode::Flagshed {
                "-".to_owned()
            } else {
                format!("{}", r.case.quantile())
            },
            pct(r.goodput()),
            fmt1(w.per_sec("done")),
            pct(w.wasted_share()),
            pct(w.busy()),
            w.estimate_ms
                .map_or_else(|| "-".to_owned(), |e| format!("{e:.0}")),
            format!("{:.0}", r.true_quantile_ms()),
            if r.late_in_window > 0 {
                opt_ms(r.late_p99_ms)
            } else {
                "-".to_owned()
            },
            opt_ms(r.stop_p99_ms),
            r.count("received").to_string(),
            r.count("done").to_string(),
            r.count("late").to_string(),
            r.count("timed_out").to_string(),
            r.count("expired").to_string(),
            r.count("doomed").to_string(),
            r.accounting.broker_expired.to_string(),
            r.accounting.cell(),
        ]);
    }
    table
}

/// Per quantile: how the sweep's cases did against the targets.
fn sweep_summary(results: &[UnknownResult]) -> Table {
    let mut table = Table::new(&[
        "estimate_quantile",
        "cases",
        "min goodput",
        "mean goodput",
        "max wasted",
        "mean wasted",
        "cases meeting both targets",
    ]);
    for q in QUANTILES {
        let rows: Vec<&UnknownResult> = results
            .iter()
            .filter(|r| (r.case.quantile() - q).abs() < 1e-9)
            .collect();
        if rows.is_empty() {
            continue;
        }
        let goodputs: Vec<f64> = rows.iter().map(|r| r.goodput()).collect();
        let wasted: Vec<f64> = rows.iter().map(|r| r.window.wasted_share()).collect();
        let meeting = rows
            .iter()
            .filter(|r| r.goodput() >= r.target() && r.window.wasted_share() <= TARGET_WASTED)
            .count();
        table.row(vec![
            format!(
                "{q}{}",
                if (q - DEFAULT_SETTINGS.quantile).abs() < 1e-9 {
                    " (default)"
                } else {
                    ""
                }
            ),
            rows.len().to_string(),
            pct(goodputs.iter().copied().fold(f64::INFINITY, f64::min)),
            pct(goodputs.iter().sum::<f64>() / goodputs.len() as f64),
            pct(wasted.iter().copied().fold(0.0, f64::max)),
            pct(wasted.iter().sum::<f64>() / wasted.len() as f64),
            format!("{meeting} of {}", rows.len()),
        ]);
    }
    table
}

fn goodput_figure(results: &[UnknownResult], durations: Durations) -> Figure {
    let ticks = [(1.0, "1C"), (2.0, "2C"), (5.0, "5C"), (10.0, "10C")];
    let mut figure = Figure::new("Unknown work: on-time completions vs offered load");
    for cv in CVS {
        let top = results
            .iter()
            .filter(|r| r.case.cv == cv && r.case.quantile.is_none())
            .map(|r| r.goodput() * 100.0)
            .filter(|g| g.is_finite())
            .fold(110.0, f64::max);
        let mut panel = Panel::new(
            &format!("lognormal work, mean 200 ms, CV {cv}"),
            Axis::log(
                "offered load (multiples of capacity C = 20 jobs/s)",
                0.9,
                11.0,
                &ticks,
            ),
            Axis::linear("goodput (% of C)", 0.0, (top / 10.0).ceil() * 10.0),
        );
        panel.series.push(
            Series::new(
                "ideal: min(load, C)",
                "#999999",
                LOADS.iter().map(|&l| (l, l.min(1.0) * 100.0)).collect(),
            )
            .dashed(),
        );
        for (i, mode) in Mode::ALL.iter().enumerate() {
            let points: Vec<(f64, f64)> = results
                .iter()
                .filter(|r| r.case.mode == *mode && r.case.cv == cv && r.case.quantile.is_none())
                .map(|r| (r.case.load, r.goodput() * 100.0))
                .collect();
            if points.is_empty() {
                continue;
            }
            let label = match mode {
                Mode::Oracle => "oracle (x-work-ms)",
                _ => mode.name(),
            };
            let mut series = Series::new(label, PALETTE[i], points).with_markers();
            if *mode == Mode::Oracle {
                series = series.dashed();
            }
            panel.series.push(series);
        }
        panel
            .y_markers
            .push(Marker::new(TARGET_GOODPUT * 100.0, "95% target"));
        figure.panels.push(panel);
    }
    figure.panel_height = 260.0;
    figure.note = format!(
        "1 taskworker, exec handler (sh + sleep), 4 threads, deadline 2 s, Poisson arrivals; {} s window after {} s warm-up",
        durations.window.as_secs(),
        durations.warmup.as_secs()
    );
    figure
}

// ---------------------------------------------------------------------------------------
// Overhead
// ---------------------------------------------------------------------------------------

/// The rate of `key` between the first stats line where it moved and the last where it had
/// not yet reached `total`: the steady part of a run, without start-up or tail.
fn steady_rate(lines: &[StatsLine], key: &str, total: u64) -> f64 {
    let Some(first) = lines.iter().find(|l| l.get(key) > 0) else {
        return f64::NAN;
    };
    let last = lines
        .iter()
        .rev()
        .find(|l| l.get(key) < total && l.at_ms > first.at_ms)
        .or_else(|| lines.iter().rev().find(|l| l.at_ms > first.at_ms));
    match last {
        Some(last) if last.get(key) > first.get(key) => {
            (last.get(key) - first.get(key)) as f64 / ((last.at_ms - first.at_ms) as f64 / 1000.0)
        }
        _ => f64::NAN,
    }
}

/// One overhead measurement: a rate, or why there is none.
type Measured = Result<f64, String>;

/// taskworker drains `jobs` pre-filled jobs with the handler `configure` sets up.
fn taskworker_drain(
    jobs: u64,
    prefetch: Option<u64>,
    configure: impl FnOnce(TestConfig) -> TestConfig,
) -> Measured {
    let mut lab = Lab::new(
        "overhead",
        LabOptions {
            dead_letters: false,
            audit: false,
            stats_ms: 100,
        },
        |config, _| {
            let config = configure(config);
            match prefetch {
                Some(n) => config.set("worker", "prefetch", &n.to_string()),
                None => config,
            }
        },
    );
    let published = prefill(&lab.target, "job", jobs, BODY);
    if published != jobs {
        return Err(format!("only {published} of {jobs} jobs confirmed"));
    }
    lab.start_worker();
    let end = Instant::now() + Duration::from_secs(600);
    while Instant::now() < end && lab.last_stats().is_none_or(|l| l.get("done") < jobs) {
        if lab.last_stats().is_some_and(|l| l.get("failed") > 0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let final_line = lab.stop_worker();
    let stats = lab.stats();
    let mut problems = Vec::new();
    match &final_line {
        None => problems.push("no final line".to_owned()),
        Some(line) => {
            if line.text("balanced") != "true" {
                problems.push(format!("balanced={}", line.text("balanced")));
            }
            if line.get("done") != jobs || line.get("received") != jobs {
                problems.push(format!(
                    "received {} done {} failed {} of {jobs}",
                    line.get("received"),
                    line.get("done"),
                    line.get("failed")
                ));
            }
        }
    }
    let queued = lab.depth();
    if queued > 0 {
        problems.push(format!("{queued} jobs left in the queue"));
    }
    if problems.is_empty() {
        Ok(steady_rate(&stats, "done", jobs))
    } else {
        Err(format!("ledger: {}", problems.join("; ")))
    }
}

fn exec_config(program: &str) -> impl FnOnce(TestConfig) -> TestConfig + '_ {
    move |config| {
        config
            .set("handler", "kind", "\"exec\"")
            .set("handler", "command", &toml_array(&[program]))
    }
}

fn http_config(url: &str) -> impl FnOnce(TestConfig) -> TestConfig + '_ {
    move |config| {
        config
            .set("handler", "kind", "\"http\"")
            .set("handler", "url", &toml_str(url))
    }
}

/// Runs `one` `jobs` times on `threads` threads; jobs per second.
fn bare_loop(jobs: u64, threads: u64, one: impl Fn() -> Result<(), String> + Sync) -> Measured {
    let next = AtomicU64::new(0);
    let failures = AtomicU64::new(0);
    let first_failure = std::sync::Mutex::new(None);
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                while next.fetch_add(1, Ordering::Relaxed) < jobs {
                    if let Err(why) = one() {
                        failures.fetch_add(1, Ordering::Relaxed);
                        first_failure
                            .lock()
                            .expect("failure lock")
                            .get_or_insert(why);
                    }
                }
            });
        }
    });
    let secs = start.elapsed().as_secs_f64();
    match failures.load(Ordering::Relaxed) {
        0 => Ok(jobs as f64 / secs),
        n => Err(format!(
            "{n} of {jobs} failed, first: {}",
            first_failure
                .lock()
                .expect("failure lock")
                .take()
                .unwrap_or_default()
        )),
    }
}

/// Spawns `program` and waits for it; with `body`, writes it to stdin and reads stdout to
/// the end, as a handler would.
fn spawn_once(program: &str, body: Option<&[u8]>) -> Result<(), String> {
    let mut command = Command::new(program);
    command.stderr(Stdio::null());
    let status = match body {
        None => command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .map_err(|e| e.to_string())?,
        Some(body) => {
            let mut child = command
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .map_err(|e| e.to_string())?;
            let mut stdin = child.stdin.take().expect("stdin is piped");
            let _ = stdin.write_all(body);
            drop(stdin);
            let mut out = Vec::new();
            let _ = child
                .stdout
                .take()
                .expect("stdout is piped")
                .read_to_end(&mut out);
            child.wait().map_err(|e| e.to_string())?
        }
    };
    if status.success() {
        Ok(())
    } else {
        Err(format!("{program}: {status}"))
    }
}

/// `processes` amqp-consume processes (prefetch 1 each) run `/bin/cat` on `jobs` pre-filled
/// jobs between them; jobs per second from their start to the last one's exit.
fn amqp_consume(jobs: u64, processes: u64) -> Measured {
    let available = Command::new("amqp-consume")
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !available {
        return Err("amqp-consume is not installed (apt-get install amqp-tools)".into());
    }
    let lab = Lab::new(
        "amqp-consume",
        LabOptions {
            dead_letters: false,
            audit: false,
            stats_ms: 100,
        },
        |config, _| config,
    );
    let published = prefill(&lab.target, "job", jobs, BODY);
    if published != jobs {
        return Err(format!("only {published} of {jobs} jobs confirmed"));
    }
    let url = support::broker::amqp_url();
    let start = Instant::now();
    let children: Vec<_> = (0..processes)
        .map(|i| {
            let count = jobs / processes + u64::from(i < jobs % processes);
            Command::new("amqp-consume")
                .args(["-u", &url, "-q", &lab.queue, "-p", "1", "-c"])
                .arg(count.to_string())
                .arg("/bin/cat")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
        })
        .collect();
    let mut problems = Vec::new();
    for child in children {
        match child.map(|c| c.wait_with_output()) {
            Ok(Ok(output)) if output.status.success() => {}
            Ok(Ok(output)) => problems.push(format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )),
            Ok(Err(e)) | Err(e) => problems.push(e.to_string()),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let left = lab.depth();
    if left > 0 {
        problems.push(format!("{left} jobs left in the queue"));
    }
    if problems.is_empty() {
        Ok(jobs as f64 / secs)
    } else {
        Err(problems.join("; "))
    }
}

/// A bare ureq 2 client: `threads` threads sharing one keep-alive agent post `BODY` `jobs`
/// times.
fn bare_http(url: &str, jobs: u64, threads: u64) -> Measured {
    let agent = http_agent(threads);
    bare_loop(jobs, threads, || post_once(&agent, url))
}

/// A keep-alive agent with an idle connection per thread, as the http handler keeps.
fn http_agent(threads: u64) -> ureq::Agent {
    ureq::AgentBuilder::new()
        .redirects(0)
        .max_idle_connections(threads as usize)
        .max_idle_connections_per_host(threads as usize)
        .build()
}

/// One POST of [`BODY`], its answer read to the end so the connection can be reused.
fn post_once(agent: &ureq::Agent, url: &str) -> Result<(), String> {
    let response = agent
        .post(url)
        .set("Content-Type", "text/plain")
        .send_bytes(BODY)
        .map_err(|e| e.to_string())?;
    let _ = std::io::copy(&mut response.into_reader(), &mut std::io::sink());
    Ok(())
}

/// The least an AMQP-fed handler can cost: `threads` threads, each with its own connection
/// and channel (prefetch 1 each, so as many deliveries are held as taskworker holds by
/// default), consume the `jobs` pre-filled jobs, run `one` per delivery and ack it. Jobs per
/// second from when every thread is consuming to the last ack.
fn bare_amqp(jobs: u64, threads: u64, one: impl Fn() -> Result<(), String> + Sync) -> Measured {
    let lab = Lab::new(
        "bare-amqp",
        LabOptions {
            dead_letters: false,
            audit: false,
            stats_ms: 100,
        },
        |config, _| config,
    );
    let published = prefill(&lab.target, "job", jobs, BODY);
    if published != jobs {
        return Err(format!("only {published} of {jobs} jobs confirmed"));
    }
    let target = &lab.target;
    let done = AtomicU64::new(0);
    let failures = AtomicU64::new(0);
    let barrier = std::sync::Barrier::new(threads as usize + 1);
    let mut secs = f64::NAN;
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let (connection, channel) = target.open();
                channel.qos(0, 1, false).expect("set prefetch");
                let consumer = channel
                    .basic_consume(target.queue.clone(), amiquip::ConsumerOptions::default())
                    .expect("start consuming");
                barrier.wait();
                while done.load(Ordering::Relaxed) < jobs {
                    match consumer.receiver().recv_timeout(Duration::from_millis(50)) {
                        Ok(amiquip::ConsumerMessage::Delivery(delivery)) => {
                            if one().is_err() {
                                failures.fetch_add(1, Ordering::Relaxed);
                            }
                            consumer.ack(delivery).expect("ack");
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => break,
                        Err(_) => {}
                    }
                }
                drop(consumer);
                harness::feed::close(connection, channel);
            });
        }
        barrier.wait();
        let start = Instant::now();
        let end = start + Duration::from_secs(600);
        while done.load(Ordering::Relaxed) < jobs && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(1));
        }
        secs = start.elapsed().as_secs_f64();
    });
    let (done, failures) = (done.into_inner(), failures.into_inner());
    let left = lab.depth();
    if done != jobs || failures > 0 || left > 0 {
        return Err(format!(
            "{done} of {jobs} done, {failures} failed, {left} left in the queue"
        ));
    }
    Ok(jobs as f64 / secs)
}

/// One overhead row: what consumes, and its rates over the repetitions.
struct OverheadRow {
    group: &'static str,
    name: String,
    jobs: u64,
    rates: Vec<f64>,
    problems: Vec<String>,
    /// Checked in CI (taskworker's ledgers).
    checked: bool,
}

impl OverheadRow {
    fn median(&self) -> f64 {
        median(&self.rates)
    }
}

/// What one overhead row runs.
#[derive(Clone, Copy, Debug)]
enum Consumer {
    BareExec {
        program: &'static str,
        body: bool,
    },
    BareAmqpExec {
        program: &'static str,
        body: bool,
    },
    BareAmqpHttp,
    TaskworkerExec {
        program: &'static str,
        prefetch: Option<u64>,
    },
    AmqpConsume,
    BareHttp,
    TaskworkerHttp {
        prefetch: Option<u64>,
    },
}

impl Consumer {
    fn group(self) -> &'static str {
        match self {
            Consumer::BareExec { program, .. }
            | Consumer::BareAmqpExec { program, .. }
            | Consumer::TaskworkerExec { program, .. } => {
                if program.ends_with("true") {
                    "exec /bin/true"
                } else {
                    "exec /bin/cat"
                }
            }
            Consumer::AmqpConsume => "exec /bin/cat",
            Consumer::BareHttp | Consumer::BareAmqpHttp | Consumer::TaskworkerHttp { .. } => {
                "http POST"
            }
        }
    }

    fn name(self) -> String {
        let prefetch = |p: Option<u64>| match p {
            None => format!("prefetch {CONCURRENCY} (default)"),
            Some(n) => format!("prefetch {n}"),
        };
        match self {
            Consumer::BareExec { body: false, .. } => {
                format!("bare Rust loop, {CONCURRENCY} threads")
            }
            Consumer::BareExec { body: true, .. } => {
                format!("bare Rust loop, {CONCURRENCY} threads, body in, output read")
            }
            Consumer::BareAmqpExec { .. } => format!(
                "bare amiquip consumer, {CONCURRENCY} threads, prefetch 1 each, runs it inline"
            ),
            Consumer::BareAmqpHttp => format!(
                "bare amiquip consumer, {CONCURRENCY} threads, prefetch 1 each, posts inline"
            ),
            Consumer::TaskworkerExec { prefetch: p, .. } => format!("taskworker, {}", prefetch(p)),
            Consumer::AmqpConsume => {
                format!("amqp-consume x {CONCURRENCY} processes, prefetch 1 each")
            }
            Consumer::BareHttp => format!("bare ureq 2 keep-alive client, {CONCURRENCY} threads"),
            Consumer::TaskworkerHttp { prefetch: p } => {
                format!("taskworker kind=http, {}", prefetch(p))
            }
        }
    }

    fn is_taskworker(self) -> bool {
        matches!(
            self,
            Consumer::TaskworkerExec { .. } | Consumer::TaskworkerHttp { .. }
        )
    }

    fn run(self, jobs: u64, url: &str) -> Measured {
        match self {
            Consumer::BareExec { program, body } => bare_loop(jobs, CONCURRENCY, || {
                spawn_once(program, body.then_some(BODY))
            }),
            Consumer::BareAmqpExec { program, body } => bare_amqp(jobs, CONCURRENCY, || {
                spawn_once(program, body.then_some(BODY))
            }),
            Consumer::BareAmqpHttp => {
                let agent = http_agent(CONCURRENCY);
                bare_amqp(jobs, CONCURRENCY, || post_once(&agent, url))
            }
            Consumer::TaskworkerExec { program, prefetch } => {
                taskworker_drain(jobs, prefetch, exec_config(program))
            }
            Consumer::AmqpConsume => amqp_consume(jobs, CONCURRENCY),
            Consumer::BareHttp => bare_http(url, jobs, CONCURRENCY),
            Consumer::TaskworkerHttp { prefetch } => {
                taskworker_drain(jobs, prefetch, http_config(url))
            }
        }
    }
}

/// (comparison, numerator row, denominator row, target: at least this; `None`: for
/// information).
type RatioSpec = (&'static str, Option<usize>, Option<usize>, Option<f64>);

fn run_overhead(settings: &Settings, markdown: &mut String) -> bool {
    let (exec_jobs, http_jobs, reps) = if settings.ci {
        (200, 500, 1)
    } else if settings.quick {
        (1_000, 4_000, 1)
    } else {
        (4_000, 20_000, 3)
    };
    let exec_jobs = harness::env_count("FLAGSHED_BENCH_EXEC_JOBS").unwrap_or(exec_jobs);
    let http_jobs = harness::env_count("FLAGSHED_BENCH_HTTP_JOBS").unwrap_or(http_jobs);
    let consumers: Vec<Consumer> = if settings.ci {
        vec![
            Consumer::TaskworkerExec {
                program: "/bin/true",
                prefetch: None,
            },
            Consumer::TaskworkerExec {
                program: "/bin/cat",
                prefetch: None,
            },
            Consumer::TaskworkerHttp { prefetch: None },
        ]
    } else {
        vec![
            Consumer::BareExec {
                program: "/bin/true",
                body: false,
            },
            Consumer::BareAmqpExec {
                program: "/bin/true",
                body: false,
            },
            Consumer::TaskworkerExec {
                program: "/bin/true",
                prefetch: None,
            },
            Consumer::TaskworkerExec {
                program: "/bin/true",
                prefetch: Some(16),
            },
            Consumer::BareExec {
                program: "/bin/cat",
                body: true,
            },
            Consumer::BareAmqpExec {
                program: "/bin/cat",
                body: true,
            },
            Consumer::TaskworkerExec {
                program: "/bin/cat",
                prefetch: None,
            },
            Consumer::AmqpConsume,
            Consumer::BareHttp,
            Consumer::BareAmqpHttp,
            Consumer::TaskworkerHttp { prefetch: None },
            Consumer::TaskworkerHttp { prefetch: Some(16) },
        ]
    };
    println!(
        "\n2. overhead: draining pre-filled queues, {CONCURRENCY} at a time; exec {exec_jobs} jobs, \
         http {http_jobs} jobs, {reps} repetition(s), median shown"
    );
    let server = HttpServer::start(200);
    let url = server.url("/jobs");
    let mut rows: Vec<OverheadRow> = consumers
        .iter()
        .map(|c| OverheadRow {
            group: c.group(),
            name: c.name(),
            jobs: if c.group() == "http POST" {
                http_jobs
            } else {
                exec_jobs
            },
            rates: Vec::new(),
            problems: Vec::new(),
            checked: c.is_taskworker(),
        })
        .collect();
    for rep in 1..=reps {
        for (consumer, row) in consumers.iter().zip(rows.iter_mut()) {
            match consumer.run(row.jobs, &url) {
                Ok(rate) => {
                    println!(
                        "  rep {rep}: {:<15} {:<55} {:>8.0} jobs/s",
                        row.group, row.name, rate
                    );
                    row.rates.push(rate);
                }
                Err(why) => {
                    println!("  rep {rep}: {:<15} {:<55} {why}", row.group, row.name);
                    row.problems.push(why);
                }
            }
        }
    }
    let served = server.requests();
    drop(server);
    let mut table = Table::new(&["handler", "consumer", "jobs", "jobs/s", "each repetition"]);
    for row in &rows {
        table.row(vec![
            row.group.to_owned(),
            row.name.clone(),
            row.jobs.to_string(),
            if row.rates.is_empty() {
                "-".to_owned()
            } else {
                format!("{:.0}", row.median())
            },
            if row.problems.is_empty() {
                row.rates
                    .iter()
                    .map(|r| format!("{r:.0}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            } else {
                row.problems.join("; ")
            },
        ]);
    }
    println!();
    print!("{}", table.to_text());
    println!("  (http server answered {served} requests in all)");
    settings.write("handlers-overhead.csv", &table.to_csv());
    markdown.push_str("\n## Overhead\n\n");
    markdown.push_str(&table.to_markdown());
    let ok = rows
        .iter()
        .filter(|r| r.checked)
        .all(|r| r.problems.is_empty());
    if settings.ci {
        return ok;
    }
    let find = |c: Consumer| {
        consumers
            .iter()
            .position(|x| x.name() == c.name() && x.group() == c.group())
    };
    let exec = |program: &'static str, prefetch: Option<u64>| {
        find(Consumer::TaskworkerExec { program, prefetch })
    };
    let bare = |program: &'static str| {
        find(Consumer::BareExec {
            program,
            body: program == "/bin/cat",
        })
    };
    let bare_amqp = |program: &'static str| {
        find(Consumer::BareAmqpExec {
            program,
            body: program == "/bin/cat",
        })
    };
    let http = |prefetch: Option<u64>| find(Consumer::TaskworkerHttp { prefetch });
    let specs: Vec<RatioSpec> = vec![
        (
            "taskworker /bin/true vs bare loop",
            exec("/bin/true", None),
            bare("/bin/true"),
            Some(TARGET_OVERHEAD_RATIO),
        ),
        (
            "taskworker /bin/true (prefetch 16) vs bare loop",
            exec("/bin/true", Some(16)),
            bare("/bin/true"),
            None,
        ),
        (
            "taskworker /bin/true vs bare amiquip consumer",
            exec("/bin/true", None),
            bare_amqp("/bin/true"),
            None,
        ),
        (
            "taskworker /bin/cat vs bare loop",
            exec("/bin/cat", None),
            bare("/bin/cat"),
            Some(TARGET_OVERHEAD_RATIO),
        ),
        (
            "taskworker /bin/cat vs bare amiquip consumer",
            exec("/bin/cat", None),
            bare_amqp("/bin/cat"),
            None,
        ),
        (
            "taskworker /bin/cat vs amqp-consume",
            exec("/bin/cat", None),
            find(Consumer::AmqpConsume),
            Some(1.0),
        ),
        (
            "taskworker http vs bare ureq",
            http(None),
            find(Consumer::BareHttp),
            Some(TARGET_OVERHEAD_RATIO),
        ),
        (
            "taskworker http (prefetch 16) vs bare ureq",
            http(Some(16)),
            find(Consumer::BareHttp),
            None,
        ),
        (
            "taskworker http vs bare amiquip consumer + ureq",
            http(None),
            find(Consumer::BareAmqpHttp),
            None,
        ),
    ];
    let mut ratios = Table::new(&["comparison", "ratio", "target", "verdict"]);
    for (name, a, b, target) in specs {
        let (Some(a), Some(b)) = (a, b) else { continue };
        let ratio = rows[a].median() / rows[b].median();
        ratios.row(vec![
            name.to_owned(),
            fmt2(ratio),
            match target {
                None => "-".to_owned(),
                Some(1.0) => "> 1 (ahead)".to_owned(),
                Some(t) => format!(">= {t}"),
            },
            match target {
                _ if !ratio.is_finite() => "-".to_owned(),
                None => "(for information)".to_owned(),
                Some(t) if ratio >= t => "PASS".to_owned(),
                Some(_) => "MISS".to_owned(),
            },
        ]);
    }
    println!();
    print!("{}", ratios.to_text());
    println!(
        "  (taskworker: steady rate from its stats lines, start-up and tail excluded; bare loops \
         and amqp-consume: jobs / wall time)"
    );
    settings.write("handlers-overhead-ratios.csv", &ratios.to_csv());
    markdown.push('\n');
    markdown.push_str(&ratios.to_markdown());
    ok
}

// ---------------------------------------------------------------------------------------
// Drift
// ---------------------------------------------------------------------------------------

/// One second of the drift run, from the audit trail and the stats lines.
struct DriftSecond {
    /// Seconds since the switch (negative before it).
    t: i64,
    published: u64,
    on_time: u64,
    timed_out: u64,
    shed: u64,
    estimate_ms: Option<u64>,
}

fn run_drift(
    settings: &Settings,
    before: Duration,
    after: Duration,
    markdown: &mut String,
) -> bool {
    let case = Case {
        mode: Mode::Flagshed,
        cv: 0.3,
        load: 2.0,
        quantile: None,
    };
    let old = LogNormal::new(MEAN_WORK_MS, case.cv);
    let new = LogNormal::new(2.0 * MEAN_WORK_MS, case.cv);
    let new_capacity = CAPACITY / 2.0;
    println!(
        "\n3. drift: flagshed at 2C (40 jobs/s), CV 0.3, mean work 200 ms for {} s then 400 ms for {} s \
         (new capacity {new_capacity} jobs/s); stats every {STATS_MS} ms",
        before.as_secs(),
        after.as_secs()
    );
    let StreamRun {
        report,
        stats,
        audit,
        accounting,
        ..
    } = run_exec_stream("drift", case, before + after, Some((before, new)));
    println!("  ledger: {}", accounting.cell());
    markdown.push_str("\n## Drift\n\n");
    markdown.push_str(&format!("Ledger: {}\n\n", accounting.cell()));
    let Some(switch_ms) = report.switched_ms else {
        println!("  the work never switched (run too short)");
        return accounting.ok();
    };
    let second_of = |ms: u64| (ms as i64 - switch_ms as i64).div_euclid(1000);
    let first = -(before.as_secs() as i64);
    let last = after.as_secs() as i64 - 1;
    let mut seconds: Vec<DriftSecond> = (first..=last)
        .map(|t| DriftSecond {
            t,
            published: 0,
            on_time: 0,
            timed_out: 0,
            shed: 0,
            estimate_ms: None,
        })
        .collect();
    let slot = |t: i64| (t >= first && t <= last).then(|| (t - first) as usize);
    for job in report.jobs.iter().filter(|j| j.confirmed == Some(true)) {
        if let Some(i) = slot(second_of(job.created_ms)) {
            seconds[i].published += 1;
        }
    }
    for line in &audit {
        let Some(i) = slot(second_of(line.at_ms)) else {
            continue;
        };
        match line.state.as_str() {
            "done" => seconds[i].on_time += 1,
            "timed_out" | "late" => seconds[i].timed_out += 1,
            "doomed" | "expired" => seconds[i].shed += 1,
            _ => {}
        }
    }
    for line in &stats {
        if let (Some(i), Some(e)) = (slot(second_of(line.at_ms)), estimate_ms(line)) {
            seconds[i].estimate_ms = Some(e);
        }
    }
    // The estimate before the switch: the median over the last 10 s (or what there is).
    let pre: Vec<f64> = stats
        .iter()
        .filter(|l| l.at_ms < switch_ms && l.at_ms + 10_000 >= switch_ms)
        .filter_map(|l| estimate_ms(l).map(|e| e as f64))
        .collect();
    let pre_level = median(&pre);
    let q = case.quantile();
    let target = 2.0 * pre_level;
    let reached = |level: f64| {
        stats
            .iter()
            .filter(|l| l.at_ms >= switch_ms)
            .find(|l| estimate_ms(l).is_some_and(|e| e as f64 >= level))
            .map(|l| (l.at_ms - switch_ms) as f64 / 1000.0)
    };
    let final_estimate = stats.iter().rev().find_map(estimate_ms);
    let secs = |t: Option<f64>| {
        t.map_or_else(
            || format!("not within {} s", after.as_secs()),
            |t| format!("{t:.1} s"),
        )
    };
    let rate_over = |from: i64, to: i64| {
        let picked: Vec<&DriftSecond> =
            seconds.iter().filter(|s| s.t >= from && s.t < to).collect();
        if picked.is_empty() {
            f64::NAN
        } else {
            picked.iter().map(|s| s.on_time as f64).sum::<f64>() / picked.len() as f64
        }
    };
    let pre_goodput = rate_over(-10, 0) / CAPACITY;
    let dip = seconds
        .iter()
        .filter(|s| s.t >= 0 && s.t < 20)
        .map(|s| s.on_time as f64 / new_capacity)
        .fold(f64::INFINITY, f64::min);
    let recovered = seconds.iter().filter(|s| s.t >= 0).find_map(|s| {
        let run: Vec<&DriftSecond> = seconds
            .iter()
            .filter(|x| x.t >= s.t && x.t < s.t + 5)
            .collect();
        (run.len() == 5 && run.iter().all(|x| x.on_time as f64 >= 0.9 * new_capacity))
            .then_some(s.t)
    });
    let mut summary = Table::new(&["drift figure", "value"]);
    let mut add = |k: &str, v: String| summary.row(vec![k.to_owned(), v]);
    add(
        &format!("estimate before the switch (median, last 10 s; q = {q})"),
        format!(
            "{pre_level:.0} ms (true p{}: {:.0} ms)",
            q * 100.0,
            old.quantile(q)
        ),
    );
    add(
        "new level: twice that",
        format!(
            "{target:.0} ms (true p{} of the new work: {:.0} ms)",
            q * 100.0,
            new.quantile(q)
        ),
    );
    add(
        "estimate first 10 % above the old level",
        secs(reached(1.1 * pre_level)),
    );
    add(
        "estimate reaches 95 % of the new level",
        secs(reached(0.95 * target)),
    );
    add(
        &format!("estimate reaches the true p{} of the new work", q * 100.0),
        secs(reached(new.quantile(q))),
    );
    add(
        "estimate at the end of the run",
        final_estimate.map_or_else(|| "-".to_owned(), |e| format!("{e} ms")),
    );
    add(
        "goodput before the switch (last 10 s, / 20 jobs/s)",
        pct(pre_goodput),
    );
    add(
        "lowest on-time second in the 20 s after, / 10 jobs/s",
        pct(dip),
    );
    for (from, to) in [(0, 5), (5, 10), (10, 20), (20, 30), (30, 40)] {
        if to <= after.as_secs() as i64 {
            add(
                &format!("on time {from}-{to} s after, / 10 jobs/s"),
                pct(rate_over(from, to) / new_capacity),
            );
        }
    }
    add(
        "back to >= 90 % of 10 jobs/s for 5 s in a row",
        recovered.map_or_else(
            || format!("not within {} s", after.as_secs()),
            |t| format!("from {t} s after the switch"),
        ),
    );
    print!("{}", summary.to_text());
    let mut per_second = Table::new(&[
        "t_s (from switch)",
        "published/s",
        "on time/s",
        "on time / new C",
        "late or stopped/s",
        "doomed or expired/s",
        "estimate ms",
    ]);
    for s in seconds.iter().filter(|s| s.t >= -5) {
        per_second.row(vec![
            s.t.to_string(),
            s.published.to_string(),
            s.on_time.to_string(),
            if s.t >= 0 {
                pct(s.on_time as f64 / new_capacity)
            } else {
                "-".to_owned()
            },
            s.timed_out.to_string(),
            s.shed.to_string(),
            s.estimate_ms
                .map_or_else(|| "-".to_owned(), |e| e.to_string()),
        ]);
    }
    println!();
    print!("{}", per_second.to_text());
    println!(
        "  (per second by settle time, from the audit trail; the switch is when the publisher \
         changed the work of new jobs, jobs already queued keep theirs)"
    );
    settings.write("handlers-drift.csv", &per_second.to_csv());
    markdown.push_str(&summary.to_markdown());
    markdown.push('\n');
    markdown.push_str(&per_second.to_markdown());
    settings.write("handlers-drift.svg", &drift_figure(&seconds).render());
    accounting.ok()
}

fn drift_figure(seconds: &[DriftSecond]) -> Figure {
    let (first, last) = (
        seconds.first().map_or(0, |s| s.t) as f64,
        seconds.last().map_or(0, |s| s.t) as f64 + 1.0,
    );
    let mut rates = Panel::new(
        "Jobs per second",
        Axis::linear("seconds since the work doubled", first, last),
        Axis::linear("jobs/s", 0.0, 30.0),
    );
    let series = |f: &dyn Fn(&DriftSecond) -> f64| -> Vec<(f64, f64)> {
        seconds.iter().map(|s| (s.t as f64 + 0.5, f(s))).collect()
    };
    rates.series.push(Series::new(
        "on time",
        PALETTE[2],
        series(&|s| s.on_time as f64),
    ));
    rates.series.push(Series::new(
        "late or stopped",
        PALETTE[1],
        series(&|s| s.timed_out as f64),
    ));
    rates.x_markers.push(Marker::new(0.0, "work doubles"));
    rates
        .y_markers
        .push(Marker::new(CAPACITY, "old capacity").label_right());
    rates
        .y_markers
        .push(Marker::new(CAPACITY / 2.0, "new capacity").label_right());
    let top = seconds
        .iter()
        .filter_map(|s| s.estimate_ms)
        .max()
        .unwrap_or(1000) as f64;
    let mut estimate = Panel::new(
        "The worker's work estimate (estimate_quantile)",
        Axis::linear("seconds since the work doubled", first, last),
        Axis::linear("ms", 0.0, (top * 1.2 / 100.0).ceil() * 100.0),
    );
    estimate.series.push(Series::new(
        "estimate",
        PALETTE[0],
        seconds
            .iter()
            .filter_map(|s| Some((s.t as f64 + 0.5, s.estimate_ms? as f64)))
            .collect(),
    ));
    estimate.x_markers.push(Marker::new(0.0, "work doubles"));
    let mut figure = Figure::new("Drift: the mean work doubles at 2C (CV 0.3)");
    figure.panel_height = 220.0;
    figure.panels = vec![rates, estimate];
    figure.note =
        "1 taskworker, exec handler, 4 threads, deadline 2 s, Poisson arrivals at 40 jobs/s".into();
    figure
}

// ---------------------------------------------------------------------------------------

fn main() {
    let settings = Settings::from_args();
    let parts = Parts::from_args(&settings.rest);
    let window = harness::env_secs("FLAGSHED_BENCH_SECS");
    let durations = if settings.ci {
        Durations {
            warmup: Duration::from_secs(2),
            window: window.unwrap_or(Duration::from_secs(3)),
        }
    } else if settings.quick {
        Durations {
            warmup: Duration::from_secs(3),
            window: window.unwrap_or(Duration::from_secs(6)),
        }
    } else {
        Durations {
            warmup: Duration::from_secs(5),
            window: window.unwrap_or(Duration::from_secs(20)),
        }
    };
    let full = !settings.ci && !settings.quick && window.is_none();
    let mut ok = true;
    let mut markdown = String::from("# Handlers\n");

    let mut results: Vec<UnknownResult> = Vec::new();
    if parts.unknown || parts.sweep {
        let (loads, cvs): (Vec<f64>, Vec<f64>) = if settings.ci {
            (vec![2.0], vec![1.0])
        } else {
            (LOADS.to_vec(), CVS.to_vec())
        };
        let sweep_loads: Vec<f64> = if settings.ci {
            Vec::new()
        } else if settings.quick {
            vec![2.0, 10.0]
        } else {
            vec![1.0, 2.0, 10.0]
        };
        let mut cases = Vec::new();
        if parts.unknown {
            for &cv in &cvs {
                for &load in &loads {
                    for mode in Mode::ALL {
                        cases.push(Case {
                            mode,
                            cv,
                            load,
                            quantile: None,
                        });
                    }
                }
            }
        }
        if parts.sweep {
            for &cv in &cvs {
                for &load in &sweep_loads {
                    for q in QUANTILES {
                        let is_default = (q - DEFAULT_SETTINGS.quantile).abs() < 1e-9;
                        if is_default && parts.unknown {
                            continue; // the flagshed run above
                        }
                        cases.push(Case {
                            mode: Mode::Flagshed,
                            cv,
                            load,
                            quantile: (!is_default).then_some(q),
                        });
                    }
                }
            }
        }
        println!(
            "1. unknown work: 1 taskworker, exec handler (sh + sleep), {CONCURRENCY} threads, lognormal work \
             (mean {MEAN_WORK_MS} ms), C = {CAPACITY} jobs/s, deadline {TTL_MS} ms, Poisson arrivals; \
             warm-up {} s, steady window {} s; {} runs",
            durations.warmup.as_secs_f64(),
            durations.window.as_secs_f64(),
            cases.len()
        );
        for case in cases {
            let began = Instant::now();
            let r = run_unknown(case, durations);
            println!(
                "  CV {:<3} {:>4}C  {:<8} q={:<4}  goodput {:>4}  wasted {:>4}  estimate {:>5}  late p99 {:>5}  ({:.0} s)  ledger {}",
                case.cv,
                case.load,
                case.mode.name(),
                case.quantile(),
                pct(r.goodput()),
                pct(r.window.wasted_share()),
                r.window
                    .estimate_ms
                    .map_or_else(|| "-".to_owned(), |e| format!("{e:.0}")),
                opt_ms(r.late_p99_ms),
                began.elapsed().as_secs_f64(),
                if r.accounting.ok() {
                    "ok".to_owned()
                } else {
                    r.accounting.cell()
                }
            );
            ok &= r.accounting.ok();
            results.push(r);
        }
        let main: Vec<&UnknownResult> = results
            .iter()
            .filter(|r| r.case.quantile.is_none())
            .collect();
        println!(
            "\ngoodput = on-time completions/s in the steady window / C; wasted = handler time on jobs that \
             finished late or were stopped at their deadline / all handler time (wasted_work_ms / work_ms); \
             busy = handler time / pool thread time; estimate = the worker's learned budget for the job type \
             (median over the window); late p99 = p99 of (settled - deadline) over late jobs settled in the \
             window, from the audit trail (settled = acked, at most ~5 ms after the handler returned); \
             stop p99 = the same for jobs stopped at their deadline; counts are whole-run totals from the \
             final ledger line\n"
        );
        let table = unknown_table(&results);
        let main_table = unknown_table(&main.iter().map(|r| (*r).clone()).collect::<Vec<_>>());
        print!("{}", main_table.to_text());
        settings.write("handlers-unknown.csv", &table.to_csv());
        markdown.push_str("\n## Unknown work\n\n");
        markdown.push_str(&main_table.to_markdown());

        let sweep: Vec<&UnknownResult> = results
            .iter()
            .filter(|r| r.case.mode == Mode::Flagshed && sweep_loads.contains(&r.case.load))
            .collect();
        if parts.sweep && !sweep.is_empty() {
            let owned: Vec<UnknownResult> = sweep.iter().map(|r| (*r).clone()).collect();
            let mut sorted: Vec<&UnknownResult> = owned.iter().collect();
            sorted.sort_by(|a, b| {
                (a.case.cv, a.case.load, a.case.quantile())
                    .partial_cmp(&(b.case.cv, b.case.load, b.case.quantile()))
                    .unwrap_or(std::cmp::Ordering::Equal)
            });
            let mut sweep_table = Table::new(&[
                "CV",
                "load",
                "estimate_quantile",
                "goodput",
                "wasted",
                "busy",
                "estimate ms",
                "true q ms",
                "timed_out/s",
                "doomed/s",
                "ledger",
            ]);
            for r in &sorted {
                sweep_table.row(vec![
                    format!("{}", r.case.cv),
                    format!("{}C", r.case.load),
                    format!("{}", r.case.quantile()),
                    pct(r.goodput()),
                    pct(r.window.wasted_share()),
                    pct(r.window.busy()),
                    r.window
                        .estimate_ms
                        .map_or_else(|| "-".to_owned(), |e| format!("{e:.0}")),
                    format!("{:.0}", r.true_quantile_ms()),
                    fmt1(r.window.per_sec("timed_out")),
                    fmt1(r.window.per_sec("doomed")),
                    if r.accounting.ok() {
                        "ok".to_owned()
                    } else {
                        "UNBALANCED".to_owned()
                    },
                ]);
            }
            let summary = sweep_summary(&owned);
            println!("\nestimate_quantile sweep (flagshed):");
            print!("{}", sweep_table.to_text());
            println!();
            print!("{}", summary.to_text());
            settings.write("handlers-sweep.csv", &sweep_table.to_csv());
            markdown.push_str("\n## estimate_quantile sweep\n\n");
            markdown.push_str(&sweep_table.to_markdown());
            markdown.push('\n');
            markdown.push_str(&summary.to_markdown());
        }

        if !settings.ci && parts.unknown {
            println!("\ntargets (flagshed, default quantile):");
            markdown.push_str("\nTargets (flagshed, default quantile):\n\n");
            for r in main.iter().filter(|r| r.case.mode == Mode::Flagshed) {
                let goodput_ok = r.goodput() >= r.target();
                let wasted_ok = r.window.wasted_share() <= TARGET_WASTED;
                let line = format!(
                    "{} CV {} at {}C: goodput {} (target >= {}), wasted {} (target <= {})",
                    if goodput_ok && wasted_ok {
                        "PASS"
                    } else {
                        "MISS"
                    },
                    r.case.cv,
                    r.case.load,
                    pct(r.goodput()),
                    pct(r.target()),
                    pct(r.window.wasted_share()),
                    pct(TARGET_WASTED)
                );
                println!("  {line}");
                markdown.push_str(&format!("- {line}\n"));
            }
            let figure = goodput_figure(&results, durations).render();
            settings.write("handlers-goodput.svg", &figure);
            if full {
                harness::write_file(
                    &harness::repo_root()
                        .join("docs")
                        .join("handlers-goodput.svg"),
                    &figure,
                );
                println!("wrote docs/handlers-goodput.svg");
            }
        }
    }

    if parts.overhead {
        let began = Instant::now();
        ok &= run_overhead(&settings, &mut markdown);
        println!("  (overhead took {:.0} s)", began.elapsed().as_secs_f64());
    }

    if parts.drift {
        let (before, after) = if settings.ci {
            (Duration::from_secs(4), Duration::from_secs(4))
        } else if settings.quick {
            (Duration::from_secs(12), Duration::from_secs(15))
        } else {
            (Duration::from_secs(20), Duration::from_secs(40))
        };
        let began = Instant::now();
        ok &= run_drift(&settings, before, after, &mut markdown);
        println!("  (drift took {:.0} s)", began.elapsed().as_secs_f64());
    }

    if settings.ci {
        if !ok {
            eprintln!("bench-ci: some handler runs did not balance (see above)");
            std::process::exit(1);
        }
        println!("\nbench-ci: every handler run completed and every ledger balanced");
        return;
    }
    settings.write("handlers.md", &markdown);
    println!(
        "\nCSV, markdown and SVG files in {}",
        settings.out_dir.display()
    );
    if !ok {
        println!("NOTE: some ledgers did not balance (see the tables above)");
        std::process::exit(1);
    }
}
