//! The overload experiment: what share of a worker's capacity turns into jobs finished on
//! time, as the offered load grows past capacity, with and without flagshed's shedding.
//!
//! Real taskworker and taskqueuer processes run against the local RabbitMQ with a local flag
//! file. The worker has 4 threads and each job takes 200 ms, so its capacity C is 20 jobs/s;
//! every job's deadline is 2 s after it was enqueued. Offered load goes 0.5C, 1C, 2C, 5C, 10C,
//! in four modes:
//! - original: no shedding (skip rate 0, no doomed drop);
//! - operator: the skip-rate flag set to 100 * (1 - C/load) above capacity;
//! - deadline-aware: flagshed's doomed drop, skip rate 0;
//! - both: doomed drop and the operator's skip rate.
//!
//! Each run warms up (5 s), then measures a steady window (20 s) from the daemons' stats
//! lines, then stops the queuer, lets the queue empty and checks the ledger against what was
//! published. Then a story run replays an operator's afternoon (overload, skip-rate raised,
//! load falls, skip-rate reset), and a scale-out run puts 1, 2 and 4 workers on one queue.
//!
//! `cargo bench --bench overload [-- --quick | --ci]`: `--quick` measures 5 s windows after
//! 3 s of warm-up; `--ci` runs only 2C in the original and deadline-aware modes, for a few
//! seconds each, and exits non-zero unless every ledger balanced. `FLAGSHED_BENCH_SECS` sets
//! the steady window, `FLAGSHED_BENCH_DIR` where CSV, markdown and SVG files go
//! (`target/bench`). A full run with the default window also writes `docs/goodput.svg` and
//! `docs/story.svg`.

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "harness/mod.rs"]
mod harness;

use harness::rig::{Rig, RigOptions, Settlement, Snapshot, Window};
use harness::svg::{Axis, Figure, Marker, PALETTE, Panel, Series};
use harness::{Settings, Table, fmt1, pct};
use std::time::{Duration, Instant};

const CONCURRENCY: u64 = 4;
const WORK_MS: u64 = 200;
/// Jobs per second one worker finishes when busy: concurrency / work time.
const CAPACITY: f64 = CONCURRENCY as f64 * 1000.0 / WORK_MS as f64;
const TTL_MS: u64 = 2_000;
/// Offered load, in multiples of capacity.
const LOADS: [f64; 5] = [0.5, 1.0, 2.0, 5.0, 10.0];
/// The goodput flagshed's shedding should keep above capacity.
const TARGET_GOODPUT: f64 = 0.95;
/// Goodput at or below this share of capacity counts as collapsed.
const COLLAPSED_GOODPUT: f64 = 0.10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Original,
    Operator,
    DeadlineAware,
    Both,
}

impl Mode {
    const ALL: [Mode; 4] = [
        Mode::Original,
        Mode::Operator,
        Mode::DeadlineAware,
        Mode::Both,
    ];

    fn name(self) -> &'static str {
        match self {
            Mode::Original => "original",
            Mode::Operator => "operator",
            Mode::DeadlineAware => "deadline-aware",
            Mode::Both => "both",
        }
    }

    fn drop_doomed(self) -> bool {
        matches!(self, Mode::DeadlineAware | Mode::Both)
    }

    /// The skip rate (percent) for `load` (a multiple of capacity).
    fn skip_rate(self, load: f64) -> f64 {
        match self {
            Mode::Operator | Mode::Both if load > 1.0 => operator_skip_rate(load),
            _ => 0.0,
        }
    }
}

/// What an operator who knows the capacity would set: drop the excess exactly.
fn operator_skip_rate(load: f64) -> f64 {
    100.0 * (1.0 - 1.0 / load)
}

#[derive(Clone, Copy, Debug)]
struct Durations {
    warmup: Duration,
    window: Duration,
}

/// One (mode, load) run.
struct RunResult {
    mode: Mode,
    load: f64,
    skip_rate: f64,
    window: Window,
    /// Cumulative since the worker started (warm-up included).
    wait_p50_ms: u64,
    wait_p99_ms: u64,
    slack_p50_ms: u64,
    settlement: Settlement,
}

impl RunResult {
    fn goodput(&self) -> f64 {
        self.window.done_per_sec / CAPACITY
    }

    /// Share of the worker's thread time spent on jobs that finished late.
    fn late_work_share(&self) -> f64 {
        self.window.late_work_ms as f64 / (self.window.secs * 1000.0 * CONCURRENCY as f64)
    }
}

/// One second of a run, for the CSV files and the story plot.
struct Sample {
    t_secs: f64,
    depth: u32,
    published_per_sec: f64,
    done_per_sec: f64,
    late_per_sec: f64,
    skipped_per_sec: f64,
    expired_per_sec: f64,
    doomed_per_sec: f64,
    skip_rate: f64,
}

fn sample_table(samples: &[Sample]) -> Table {
    let mut table = Table::new(&[
        "t_s",
        "queue_depth",
        "published_per_s",
        "on_time_per_s",
        "late_per_s",
        "skipped_per_s",
        "expired_per_s",
        "doomed_per_s",
        "skip_rate",
    ]);
    for s in samples {
        table.row(vec![
            format!("{:.1}", s.t_secs),
            s.depth.to_string(),
            fmt1(s.published_per_sec),
            fmt1(s.done_per_sec),
            fmt1(s.late_per_sec),
            fmt1(s.skipped_per_sec),
            fmt1(s.expired_per_sec),
            fmt1(s.doomed_per_sec),
            format!("{}", s.skip_rate),
        ]);
    }
    table
}

fn sample_between(start: Instant, a: &Snapshot, b: &Snapshot) -> Sample {
    let w = Window::between(a, b);
    let secs = w.secs.max(1e-3);
    Sample {
        t_secs: b.at.duration_since(start).as_secs_f64(),
        depth: b.depth,
        published_per_sec: w.published_per_sec,
        done_per_sec: w.done_per_sec,
        late_per_sec: w.late_per_sec,
        skipped_per_sec: w.skipped as f64 / secs,
        expired_per_sec: (w.expired_by_worker + w.expired_by_broker) as f64 / secs,
        doomed_per_sec: w.doomed as f64 / secs,
        skip_rate: b
            .workers
            .iter()
            .flatten()
            .next()
            .map_or(0.0, |l| l.float("skip_rate")),
    }
}

/// Samples the rig once a second until `until` after `start`, appending to `samples`; `last`
/// is left holding the latest snapshot.
fn sample_until(
    rig: &mut Rig,
    start: Instant,
    until: Duration,
    last: &mut Snapshot,
    samples: &mut Vec<Sample>,
) {
    loop {
        let elapsed = start.elapsed();
        if elapsed >= until {
            return;
        }
        let next_second = Duration::from_secs(elapsed.as_secs() + 1).min(until);
        std::thread::sleep(next_second.saturating_sub(start.elapsed()));
        let now = rig.snapshot();
        samples.push(sample_between(start, last, &now));
        *last = now;
    }
}

fn run_overload(settings: &Settings, mode: Mode, load: f64, durations: Durations) -> RunResult {
    let skip_rate = mode.skip_rate(load);
    let options = RigOptions {
        concurrency: CONCURRENCY,
        work_ms: WORK_MS,
        ttl_ms: TTL_MS,
        drop_doomed: mode.drop_doomed(),
        skip_rate,
        rate_per_sec: load * CAPACITY,
        ..RigOptions::default()
    };
    let mut rig = Rig::new("overload", &options);
    rig.start_workers(1);
    rig.start_queuer();
    rig.wait_for_stats();
    let start = Instant::now();
    let mut samples = Vec::new();
    let mut last = rig.snapshot();
    sample_until(&mut rig, start, durations.warmup, &mut last, &mut samples);
    let steady_start = last.clone();
    sample_until(
        &mut rig,
        start,
        durations.warmup + durations.window,
        &mut last,
        &mut samples,
    );
    let window = Window::between(&steady_start, &last);
    let worker = last.workers.first().cloned().flatten();
    let settlement = rig.finish();
    settings.write(
        &format!("overload-{}-{}C.csv", mode.name(), load),
        &sample_table(&samples).to_csv(),
    );
    RunResult {
        mode,
        load,
        skip_rate,
        window,
        wait_p50_ms: worker.as_ref().map_or(0, |l| l.get("wait_p50_ms")),
        wait_p99_ms: worker.as_ref().map_or(0, |l| l.get("wait_p99_ms")),
        slack_p50_ms: worker.as_ref().map_or(0, |l| l.get("slack_p50_ms")),
        settlement,
    }
}

fn ledger_cell(settlement: &Settlement) -> String {
    if settlement.balanced {
        format!(
            "ok ({} = {} + {} + {})",
            settlement.published,
            settlement.received,
            settlement.expired_by_broker,
            settlement.still_queued
        )
    } else {
        format!("UNBALANCED: {}", settlement.why_not)
    }
}

fn results_table(results: &[RunResult]) -> Table {
    let mut table = Table::new(&[
        "mode",
        "load",
        "skip %",
        "offered/s",
        "goodput",
        "on time/s",
        "late/s",
        "late work",
        "wait p50 ms",
        "wait p99 ms",
        "slack p50 ms",
        "skipped",
        "expired",
        "doomed",
        "ledger (published = received + broker-expired + queued)",
    ]);
    for r in results {
        let w = &r.window;
        table.row(vec![
            r.mode.name().to_owned(),
            format!("{}C", r.load),
            fmt1(r.skip_rate),
            fmt1(w.published_per_sec),
            pct(r.goodput()),
            fmt1(w.done_per_sec),
            fmt1(w.late_per_sec),
            pct(r.late_work_share()),
            r.wait_p50_ms.to_string(),
            r.wait_p99_ms.to_string(),
            r.slack_p50_ms.to_string(),
            w.skipped.to_string(),
            (w.expired_by_worker + w.expired_by_broker).to_string(),
            w.doomed.to_string(),
            ledger_cell(&r.settlement),
        ]);
    }
    table
}

fn goodput_figure(results: &[RunResult], durations: Durations) -> Figure {
    let ticks = [
        (0.5, "0.5C"),
        (1.0, "1C"),
        (2.0, "2C"),
        (5.0, "5C"),
        (10.0, "10C"),
    ];
    let mut panel = Panel::new(
        "On-time completions as a share of capacity",
        Axis::log(
            "offered load (multiples of capacity C = 20 jobs/s)",
            0.45,
            11.0,
            &ticks,
        ),
        Axis::linear("goodput (% of C)", 0.0, 110.0),
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
            .filter(|r| r.mode == *mode)
            .map(|r| (r.load, r.goodput() * 100.0))
            .collect();
        if points.is_empty() {
            continue;
        }
        let mut series = Series::new(mode.name(), PALETTE[i], points).with_markers();
        if *mode == Mode::Operator {
            series = series.dashed();
        }
        panel.series.push(series);
    }
    panel
        .y_markers
        .push(Marker::new(TARGET_GOODPUT * 100.0, "95% target"));
    let mut figure = Figure::new("flagshed under overload: goodput vs offered load");
    figure.panels.push(panel);
    figure.note = format!(
        "1 taskworker, 4 threads x 200 ms jobs, deadline 2 s; steady window {} s after {} s warm-up, real RabbitMQ",
        durations.window.as_secs(),
        durations.warmup.as_secs()
    );
    figure
}

/// One phase of the story run: what the flags say from `at_secs` on.
struct StoryPhase {
    label: &'static str,
    load: f64,
    skip_rate: f64,
}

const STORY: [StoryPhase; 4] = [
    StoryPhase {
        label: "load 2C, skip 0",
        load: 2.0,
        skip_rate: 0.0,
    },
    StoryPhase {
        label: "operator: skip 60",
        load: 2.0,
        skip_rate: 60.0,
    },
    StoryPhase {
        label: "load falls to 0.5C",
        load: 0.5,
        skip_rate: 60.0,
    },
    StoryPhase {
        label: "operator: skip 0",
        load: 0.5,
        skip_rate: 0.0,
    },
];

/// The original design through an operator's afternoon; returns the samples and the ledger.
fn run_story(phase_len: Duration) -> (Vec<Sample>, Settlement) {
    let options = RigOptions {
        concurrency: CONCURRENCY,
        work_ms: WORK_MS,
        ttl_ms: TTL_MS,
        drop_doomed: false,
        skip_rate: STORY[0].skip_rate,
        rate_per_sec: STORY[0].load * CAPACITY,
        ..RigOptions::default()
    };
    let mut rig = Rig::new("story", &options);
    rig.start_workers(1);
    rig.start_queuer();
    rig.wait_for_stats();
    let start = Instant::now();
    let mut samples = Vec::new();
    let mut last = rig.snapshot();
    for (i, phase) in STORY.iter().enumerate() {
        if i > 0 {
            rig.set_flags(phase.load * CAPACITY, phase.skip_rate);
        }
        sample_until(
            &mut rig,
            start,
            phase_len * (i as u32 + 1),
            &mut last,
            &mut samples,
        );
    }
    let settlement = rig.finish();
    (samples, settlement)
}

fn story_figure(samples: &[Sample], phase_len: Duration) -> Figure {
    let end = phase_len.as_secs_f64() * STORY.len() as f64;
    let markers: Vec<Marker> = STORY
        .iter()
        .enumerate()
        .map(|(i, p)| Marker::new(phase_len.as_secs_f64() * i as f64, p.label))
        .collect();
    let series = |f: &dyn Fn(&Sample) -> f64| -> Vec<(f64, f64)> {
        samples.iter().map(|s| (s.t_secs, f(s))).collect()
    };
    let max_rate = samples
        .iter()
        .map(|s| s.published_per_sec.max(s.done_per_sec).max(s.late_per_sec))
        .fold(CAPACITY * 2.0, f64::max);
    let mut rates = Panel::new(
        "Completions per second",
        Axis::linear("time (s)", 0.0, end),
        Axis::linear("jobs/s", 0.0, (max_rate * 1.1).ceil()),
    );
    rates.series.push(Series::new(
        "on time",
        PALETTE[2],
        series(&|s| s.done_per_sec),
    ));
    rates
        .series
        .push(Series::new("late", PALETTE[1], series(&|s| s.late_per_sec)));
    rates
        .series
        .push(Series::new("offered", PALETTE[6], series(&|s| s.published_per_sec)).dashed());
    rates.x_markers = markers.clone();
    rates
        .y_markers
        .push(Marker::new(CAPACITY, "capacity").label_right());
    let max_depth = samples
        .iter()
        .map(|s| f64::from(s.depth))
        .fold(10.0, f64::max);
    let mut depth = Panel::new(
        "Queue depth (ready jobs)",
        Axis::linear("time (s)", 0.0, end),
        Axis::linear("jobs", 0.0, (max_depth * 1.1).ceil()),
    );
    depth.series.push(Series::new(
        "queue depth",
        PALETTE[0],
        series(&|s| f64::from(s.depth)),
    ));
    depth.x_markers = markers.clone();
    let mut skip = Panel::new(
        "Skip rate the worker applies",
        Axis::linear("time (s)", 0.0, end),
        Axis::linear("%", 0.0, 100.0),
    );
    skip.series.push(Series::new(
        "skip rate",
        PALETTE[3],
        series(&|s| s.skip_rate),
    ));
    skip.x_markers = markers;
    let mut figure = Figure::new("The original design through an operator's afternoon");
    figure.panel_height = 200.0;
    figure.panels = vec![rates, depth, skip];
    figure.note = "1 taskworker (capacity 20 jobs/s), deadline 2 s, no doomed drop; the skip rate is changed by rewriting the flag file".into();
    figure
}

/// `workers` taskworker processes at twice their total capacity, deadline-aware.
struct ScaleResult {
    workers: usize,
    window: Window,
    settlement: Settlement,
}

fn run_scaleout(workers: usize, durations: Durations) -> ScaleResult {
    let capacity = CAPACITY * workers as f64;
    let options = RigOptions {
        concurrency: CONCURRENCY,
        work_ms: WORK_MS,
        ttl_ms: TTL_MS,
        drop_doomed: true,
        rate_per_sec: 2.0 * capacity,
        ..RigOptions::default()
    };
    let mut rig = Rig::new("scaleout", &options);
    rig.start_workers(workers);
    rig.start_queuer();
    rig.wait_for_stats();
    std::thread::sleep(durations.warmup);
    let a = rig.snapshot();
    std::thread::sleep(durations.window);
    let b = rig.snapshot();
    let window = Window::between(&a, &b);
    let settlement = rig.finish();
    ScaleResult {
        workers,
        window,
        settlement,
    }
}

fn main() {
    let settings = Settings::from_args();
    let window = harness::env_secs("FLAGSHED_BENCH_SECS");
    let durations = if settings.ci {
        Durations {
            warmup: Duration::from_secs(2),
            window: window.unwrap_or(Duration::from_secs(3)),
        }
    } else if settings.quick {
        Durations {
            warmup: Duration::from_secs(3),
            window: window.unwrap_or(Duration::from_secs(5)),
        }
    } else {
        Durations {
            warmup: Duration::from_secs(5),
            window: window.unwrap_or(Duration::from_secs(20)),
        }
    };
    let full = !settings.ci && !settings.quick && window.is_none();

    let (modes, loads): (Vec<Mode>, Vec<f64>) = if settings.ci {
        (vec![Mode::Original, Mode::DeadlineAware], vec![2.0])
    } else {
        (Mode::ALL.to_vec(), LOADS.to_vec())
    };
    println!(
        "overload: 1 taskworker ({CONCURRENCY} threads x {WORK_MS} ms: C = {CAPACITY} jobs/s), deadline {TTL_MS} ms, \
         warm-up {} s, steady window {} s",
        durations.warmup.as_secs_f64(),
        durations.window.as_secs_f64()
    );
    let mut results = Vec::new();
    for &mode in &modes {
        for &load in &loads {
            let result = run_overload(&settings, mode, load, durations);
            println!(
                "  {:<15} {:>4}C  goodput {:>4}  on time {:>5.1}/s  late {:>5.1}/s  ledger {}",
                mode.name(),
                load,
                pct(result.goodput()),
                result.window.done_per_sec,
                result.window.late_per_sec,
                if result.settlement.balanced {
                    "ok"
                } else {
                    "UNBALANCED"
                }
            );
            results.push(result);
        }
    }
    let table = results_table(&results);
    println!(
        "\ngoodput = on-time completions per second over the steady window / C; late work = share of \
         worker thread time spent on jobs that finished late; wait and slack percentiles are \
         cumulative since the worker started (warm-up included); skipped/expired/doomed are \
         counts in the window (expired = by the worker + by RabbitMQ)\n"
    );
    print!("{}", table.to_text());
    settings.write("overload-summary.csv", &table.to_csv());
    let mut markdown = table.to_markdown();

    let unbalanced = results.iter().filter(|r| !r.settlement.balanced).count();
    if settings.ci {
        if unbalanced > 0 {
            eprintln!("bench-ci: {unbalanced} run(s) did not balance");
            std::process::exit(1);
        }
        println!(
            "\nbench-ci: {} runs completed, every ledger balanced",
            results.len()
        );
        return;
    }

    println!("\ntargets:");
    let mut verdicts = String::new();
    for r in &results {
        if r.load < 2.0 {
            continue;
        }
        let line = match r.mode {
            Mode::DeadlineAware | Mode::Both => format!(
                "{} {} at {}C: goodput {} (target >= {})",
                if r.goodput() >= TARGET_GOODPUT {
                    "PASS"
                } else {
                    "MISS"
                },
                r.mode.name(),
                r.load,
                pct(r.goodput()),
                pct(TARGET_GOODPUT)
            ),
            Mode::Original => format!(
                "{} original collapses at {}C: goodput {} (collapsed: <= {})",
                if r.goodput() <= COLLAPSED_GOODPUT {
                    "PASS"
                } else {
                    "MISS"
                },
                r.load,
                pct(r.goodput()),
                pct(COLLAPSED_GOODPUT)
            ),
            Mode::Operator => continue,
        };
        println!("  {line}");
        verdicts.push_str(&format!("- {line}\n"));
    }
    let goodput = goodput_figure(&results, durations).render();
    settings.write("goodput.svg", &goodput);

    // The story run: phases of 15 s (6 s when quick).
    let phase_len = if settings.quick {
        Duration::from_secs(6)
    } else {
        Duration::from_secs(15)
    };
    println!(
        "\nstory: original design, phases of {} s: {}",
        phase_len.as_secs(),
        STORY
            .iter()
            .map(|p| p.label)
            .collect::<Vec<_>>()
            .join(" -> ")
    );
    let (samples, story_ledger) = run_story(phase_len);
    let story_table = sample_table(&samples);
    print!("{}", story_table.to_text());
    println!("story ledger: {}", ledger_cell(&story_ledger));
    settings.write("story.csv", &story_table.to_csv());
    let story = story_figure(&samples, phase_len).render();
    settings.write("story.svg", &story);

    // Scale-out.
    println!("\nscale-out: deadline-aware, offered 2x the workers' total capacity");
    let mut scale = Table::new(&[
        "workers",
        "capacity/s",
        "offered/s",
        "on time/s",
        "goodput",
        "late/s",
        "ledger (published = sum received + broker-expired + queued)",
    ]);
    let mut scale_balanced = true;
    for workers in [1, 2, 4] {
        let r = run_scaleout(workers, durations);
        scale_balanced &= r.settlement.balanced;
        let capacity = CAPACITY * r.workers as f64;
        scale.row(vec![
            r.workers.to_string(),
            fmt1(capacity),
            fmt1(r.window.published_per_sec),
            fmt1(r.window.done_per_sec),
            pct(r.window.done_per_sec / capacity),
            fmt1(r.window.late_per_sec),
            ledger_cell(&r.settlement),
        ]);
    }
    print!("{}", scale.to_text());
    settings.write("scaleout.csv", &scale.to_csv());

    markdown.push_str("\nScale-out:\n\n");
    markdown.push_str(&scale.to_markdown());
    markdown.push_str("\nTargets:\n\n");
    markdown.push_str(&verdicts);
    settings.write("overload.md", &markdown);
    if full {
        let docs = harness::repo_root().join("docs");
        harness::write_file(&docs.join("goodput.svg"), &goodput);
        harness::write_file(&docs.join("story.svg"), &story);
        println!("\nwrote docs/goodput.svg and docs/story.svg");
    }
    println!(
        "CSV, markdown and SVG files in {}",
        settings.out_dir.display()
    );
    if unbalanced > 0 || !story_ledger.balanced || !scale_balanced {
        println!("NOTE: some ledgers did not balance (see the tables above)");
    }
}
