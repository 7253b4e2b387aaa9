//! Learned shedding, when only the job knows how long its work takes.
//!
//! The story: one taskworker with 4 threads runs the exec handler, a real process per job
//! (`/bin/sh` and `sleep`) whose work is drawn per job and carried only in the body, so the
//! worker must learn work times from what it sees: a job that finishes shows its time, a job
//! stopped at its deadline shows only that it needed more. Mean work 200 ms, so the capacity
//! is C = 4 / 0.2 s = 20 jobs/s; every job is due 2 s after it was created (10x the mean
//! work), in `x-deadline-ms` and the AMQP expiration. This bench publishes Poisson arrivals
//! at 0.5, 1, 2, 5 and 10C to a FIFO classic queue, with confirms, for six work mixes:
//! lognormal with CV 0.3, 1 and 2; bimodal (90 % 100 ms, 10 % 1,100 ms); two job types 16x
//! apart (`short` and `long`, half each, CV 0.3); and drift (CV 0.3, the work doubles for
//! the middle third of the run, then halves again).
//!
//! Three designs see the same job stream at each (mix, load):
//! - original: no doomed drop and no stop at the deadline (jobs run late), as the seed did;
//! - fewest_stopped: flagshed's default objective (the 0.99 quantile of the work time);
//! - most_on_time: the objective that budgets the most jobs on time per second of work.
//!
//! Figures: goodput = jobs done by their deadline per second / C; wasted = handler time on
//! jobs that finished late or were stopped / all handler time; doomed = jobs dropped as
//! doomed / jobs received. For drift, goodput is over the capacity at the current work time,
//! and "back after" is the seconds from each change until on-time completions (over 2 s) are
//! back at 0.9 of min(offered, capacity). Every run ends with its ledger balanced and every
//! published job accounted for by id (audit trail and dead-letter queue).
//!
//! `cargo bench --bench shedding [-- --quick | --ci] [--mix NAME]... [--load N]...`:
//! `--quick` shorter windows; `--ci` two short runs that fail only if a ledger does not
//! balance. `FLAGSHED_BENCH_SECS` sets the steady window; CSV and markdown files go to
//! `FLAGSHED_BENCH_DIR` (`target/bench`).

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "harness/mod.rs"]
mod harness;

use harness::feed::{FeedOptions, Mix};
use harness::lab::{LabOptions, StreamRun, Window, exec_work_config, run_stream};
use harness::random::LogNormal;
use harness::{Settings, Table, fmt1, fmt2};
use std::time::{Duration, Instant};

const CONCURRENCY: u64 = 4;
const MEAN_WORK_MS: f64 = 200.0;
/// Jobs per second one worker finishes at the mean work.
const CAPACITY: f64 = CONCURRENCY as f64 * 1000.0 / MEAN_WORK_MS;
const TTL_MS: u64 = 2_000;
const LOADS: [f64; 5] = [0.5, 1.0, 2.0, 5.0, 10.0];
const STATS_MS: u64 = 250;

/// The work mixes, by the name `--mix` takes.
#[derive(Clone, Copy, Debug, PartialEq)]
enum MixName {
    Cv03,
    Cv1,
    Cv2,
    Bimodal,
    TwoTypes,
    Drift,
}

impl MixName {
    const ALL: [MixName; 6] = [
        MixName::Cv03,
        MixName::Cv1,
        MixName::Cv2,
        MixName::Bimodal,
        MixName::TwoTypes,
        MixName::Drift,
    ];

    fn name(self) -> &'static str {
        match self {
            MixName::Cv03 => "cv0.3",
            MixName::Cv1 => "cv1",
            MixName::Cv2 => "cv2",
            MixName::Bimodal => "bimodal",
            MixName::TwoTypes => "two-types",
            MixName::Drift => "drift",
        }
    }

    /// The publisher's mix for a run of `duration` (drift: doubled in the middle third).
    fn mix(self, duration: Duration) -> Mix {
        let lognormal = |cv| LogNormal::new(MEAN_WORK_MS, cv);
        match self {
            MixName::Cv03 => Mix::LogNormal(lognormal(0.3)),
            MixName::Cv1 => Mix::LogNormal(lognormal(1.0)),
            MixName::Cv2 => Mix::LogNormal(lognormal(2.0)),
            MixName::Bimodal => Mix::Bimodal {
                short_ms: MEAN_WORK_MS / 2.0,
                long_ms: MEAN_WORK_MS * 5.5,
                long_share: 0.1,
            },
            // Half at s, half at 16 s: a mean of 8.5 s.
            MixName::TwoTypes => Mix::TwoTypes {
                short: LogNormal::new(MEAN_WORK_MS / 8.5, 0.3),
                long: LogNormal::new(MEAN_WORK_MS * 16.0 / 8.5, 0.3),
            },
            MixName::Drift => Mix::Drift {
                base: lognormal(0.3),
                factor: 2.0,
                from: duration / 3,
                until: duration * 2 / 3,
            },
        }
    }

    /// The wasted-work target of the default objective.
    fn wasted_target(self) -> Option<f64> {
        match self {
            MixName::Cv2 => Some(0.12),
            MixName::Drift => None,
            _ => Some(0.06),
        }
    }

    /// The goodput target of the default objective at `load`.
    fn goodput_target(self, load: f64) -> Option<f64> {
        if load < 1.0 {
            None
        } else if load == 1.0 {
            Some(match self {
                MixName::Bimodal => 0.85,
                MixName::Cv2 => 0.75,
                _ => 0.90,
            })
        } else {
            Some(0.95)
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Design {
    Original,
    FewestStopped,
    MostOnTime,
}

impl Design {
    const ALL: [Design; 3] = [Design::Original, Design::FewestStopped, Design::MostOnTime];

    fn name(self) -> &'static str {
        match self {
            Design::Original => "original",
            Design::FewestStopped => "fewest_stopped",
            Design::MostOnTime => "most_on_time",
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Durations {
    warmup: Duration,
    window: Duration,
    /// A drift run: three phases this long.
    phase: Duration,
}

/// One run's figures.
#[derive(Clone, Debug)]
struct Figures {
    goodput: f64,
    wasted: f64,
    doomed: f64,
    /// Drift: seconds until on-time completions were back after the doubling and after the
    /// halving (`None`: not within the phase).
    back_after: Option<(Option<u64>, Option<u64>)>,
    /// Handler time / pool thread time over the window.
    busy: f64,
    /// The worker's budgets at the end of the window (`work_estimate_ms`).
    estimates: String,
    ledger: String,
    balanced: bool,
}

fn run(mix: MixName, load: f64, design: Design, durations: Durations) -> Figures {
    let duration = if mix == MixName::Drift {
        durations.phase * 3
    } else {
        durations.warmup + durations.window
    };
    let seed = (mix as u64 + 1) * 1_000_003 + (load * 100.0) as u64;
    let shedding = design != Design::Original;
    let StreamRun {
        report,
        stats,
        audit,
        accounting,
        ..
    } = run_stream(
        "shedding",
        LabOptions {
            concurrency: CONCURRENCY,
            dead_letters: true,
            audit: true,
            stats_ms: STATS_MS,
        },
        FeedOptions {
            id_prefix: "job".into(),
            rate_per_sec: load * CAPACITY,
            poisson: true,
            ttl_ms: Some(TTL_MS),
            declare_work: false,
            job_type: Some("work".into()),
            mix: mix.mix(duration),
            duration,
            seed,
        },
        |config, dir| {
            let config = exec_work_config(config, dir)
                .set("handler", "enforce_deadline", &shedding.to_string())
                .set("worker", "drop_doomed", &shedding.to_string());
            if design == Design::MostOnTime {
                config.set("worker", "shed_objective", "\"most_on_time\"")
            } else {
                config
            }
        },
    );
    let started = report.started_ms;
    let from_ms = started + durations.warmup.as_millis() as u64;
    let to_ms = started + duration.as_millis() as u64;
    let window = Window::between(&stats, from_ms, to_ms);
    let received = window.d("received").max(1) as f64;
    let (goodput, back_after) = if mix == MixName::Drift {
        // On-time completions per second of the window, by the audit trail's times, over the
        // capacity at each second's work time.
        let phase_ms = durations.phase.as_millis() as u64;
        let capacity_at = |ms: u64| {
            let since = ms.saturating_sub(started);
            if since >= phase_ms && since < 2 * phase_ms {
                CAPACITY / 2.0
            } else {
                CAPACITY
            }
        };
        let done: Vec<u64> = audit
            .iter()
            .filter(|l| l.state == "done")
            .map(|l| l.at_ms)
            .collect();
        let in_window = done
            .iter()
            .filter(|&&ms| ms >= from_ms && ms < to_ms)
            .count();
        let capacity_secs: f64 = (from_ms..to_ms)
            .step_by(100)
            .map(|ms| capacity_at(ms) * 0.1)
            .sum();
        let offered = load * CAPACITY;
        let back = |change_ms: u64| -> Option<u64> {
            let target = 0.9 * offered.min(capacity_at(change_ms));
            (0..phase_ms / 1000).find(|s| {
                let a = change_ms + s * 1000;
                let n = done.iter().filter(|&&ms| ms >= a && ms < a + 2000).count();
                n as f64 / 2.0 >= target
            })
        };
        (
            in_window as f64 / capacity_secs,
            Some((back(started + phase_ms), back(started + 2 * phase_ms))),
        )
    } else {
        (window.goodput(CAPACITY), None)
    };
    Figures {
        goodput,
        wasted: window.wasted_share(),
        doomed: window.d("doomed") as f64 / received,
        back_after,
        busy: window.busy(CONCURRENCY),
        estimates: stats
            .iter()
            .rev()
            .find(|l| l.at_ms <= to_ms)
            .map(|l| l.text("work_estimate_ms").to_owned())
            .unwrap_or_default(),
        balanced: accounting.ok(),
        ledger: if accounting.ok() {
            "ok".to_owned()
        } else {
            accounting.cell()
        },
    }
}

/// Every design's figures at one (mix, load).
struct Row {
    mix: MixName,
    load: f64,
    figures: Vec<(Design, Figures)>,
}

impl Row {
    fn of(&self, design: Design) -> Option<&Figures> {
        self.figures
            .iter()
            .find(|(d, _)| *d == design)
            .map(|(_, f)| f)
    }
}

fn back_cell(figures: Option<&Figures>) -> String {
    match figures.and_then(|f| f.back_after) {
        None => "-".to_owned(),
        Some((up, down)) => {
            let s = |v: Option<u64>| v.map_or_else(|| ">phase".to_owned(), |s| format!("{s} s"));
            format!("{} / {}", s(up), s(down))
        }
    }
}

fn table(rows: &[Row]) -> Table {
    let mut table = Table::new(&[
        "mix",
        "load",
        "original goodput",
        "original wasted",
        "fewest_stopped goodput",
        "wasted",
        "doomed",
        "back after (x2 / x0.5)",
        "most_on_time goodput",
        "wasted",
        "doomed",
        "ledgers",
    ]);
    let cell =
        |f: Option<&Figures>, get: fn(&Figures) -> f64| f.map_or("-".into(), |f| fmt2(get(f)));
    for row in rows {
        let o = row.of(Design::Original);
        let f = row.of(Design::FewestStopped);
        let m = row.of(Design::MostOnTime);
        let ledgers = row
            .figures
            .iter()
            .map(|(_, f)| f.ledger.as_str())
            .collect::<Vec<_>>();
        let ledgers = if ledgers.iter().all(|l| *l == "ok") {
            "ok".to_owned()
        } else {
            ledgers.join("; ")
        };
        table.row(vec![
            row.mix.name().to_owned(),
            format!("{}C", row.load),
            cell(o, |f| f.goodput),
            pct_cell(o.map(|f| f.wasted)),
            cell(f, |f| f.goodput),
            pct_cell(f.map(|f| f.wasted)),
            pct_cell(f.map(|f| f.doomed)),
            back_cell(f),
            cell(m, |f| f.goodput),
            pct_cell(m.map(|f| f.wasted)),
            pct_cell(m.map(|f| f.doomed)),
            ledgers,
        ]);
    }
    table
}

/// A share with one decimal: the wasted-work targets are a few percent.
fn pct1(value: f64) -> String {
    if value.is_finite() {
        format!("{:.1}%", value * 100.0 + 0.0)
    } else {
        "-".to_owned()
    }
}

fn pct_cell(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), pct1)
}

/// The targets, each PASS or MISS with the measured figure.
fn verdicts(rows: &[Row]) -> Vec<String> {
    let mut lines = Vec::new();
    let mut verdict = |ok: bool, text: String| {
        lines.push(format!("{} {text}", if ok { "PASS" } else { "MISS" }));
    };
    for row in rows {
        let (mix, load) = (row.mix.name(), row.load);
        if let (Some(o), Some(f)) = (row.of(Design::Original), row.of(Design::FewestStopped)) {
            verdict(
                f.goodput >= o.goodput - 0.02,
                format!(
                    "{mix} {load}C: fewest_stopped {} >= original {} - 0.02",
                    fmt2(f.goodput),
                    fmt2(o.goodput)
                ),
            );
        }
        if let Some(f) = row.of(Design::FewestStopped) {
            if let Some(target) = row.mix.goodput_target(load) {
                verdict(
                    f.goodput >= target,
                    format!(
                        "{mix} {load}C: fewest_stopped goodput {} >= {target}",
                        fmt2(f.goodput)
                    ),
                );
            }
            if let Some(target) = row.mix.wasted_target() {
                verdict(
                    f.wasted <= target,
                    format!(
                        "{mix} {load}C: fewest_stopped wasted {} <= {}",
                        pct1(f.wasted),
                        pct1(target)
                    ),
                );
            }
            if let Some((up, down)) = f.back_after.filter(|_| load >= 2.0) {
                let worst = up.max(down).filter(|_| up.is_some() && down.is_some());
                verdict(
                    worst.is_some_and(|s| s <= 10),
                    format!(
                        "{mix} {load}C: back within {} after each change (<= 10 s)",
                        worst.map_or_else(|| "more than a phase".to_owned(), |s| format!("{s} s"))
                    ),
                );
            }
        }
        if let Some(m) = row.of(Design::MostOnTime) {
            let target = match (row.mix, load) {
                (MixName::Cv2, 5.0) => Some(1.3),
                (MixName::Bimodal, 5.0) => Some(1.5),
                _ => None,
            };
            if let Some(target) = target {
                verdict(
                    m.goodput >= target,
                    format!(
                        "{mix} {load}C: most_on_time goodput {} >= {target}",
                        fmt2(m.goodput)
                    ),
                );
            }
        }
    }
    lines
}

fn main() {
    let settings = Settings::from_args();
    let mut mixes = Vec::new();
    let mut loads = Vec::new();
    let mut rest = settings.rest.iter();
    while let Some(arg) = rest.next() {
        match (arg.as_str(), rest.next()) {
            ("--mix", Some(name)) => match MixName::ALL.iter().find(|m| m.name() == name) {
                Some(&mix) => mixes.push(mix),
                None => {
                    eprintln!(
                        "unknown mix {name:?}: expected cv0.3, cv1, cv2, bimodal, two-types or drift"
                    );
                    std::process::exit(2);
                }
            },
            ("--load", Some(n)) => match n.parse::<f64>() {
                Ok(load) if load > 0.0 => loads.push(load),
                _ => {
                    eprintln!("--load takes a positive number, got {n:?}");
                    std::process::exit(2);
                }
            },
            (other, _) => {
                eprintln!("unknown argument {other:?}: expected --mix NAME or --load N");
                std::process::exit(2);
            }
        }
    }
    if settings.ci {
        if mixes.is_empty() {
            mixes = vec![MixName::Cv1, MixName::Drift];
        }
        if loads.is_empty() {
            loads = vec![2.0];
        }
    }
    if mixes.is_empty() {
        mixes = MixName::ALL.to_vec();
    }
    if loads.is_empty() {
        loads = LOADS.to_vec();
    }
    let window = harness::env_secs("FLAGSHED_BENCH_SECS");
    let durations = if settings.ci {
        Durations {
            warmup: Duration::from_secs(2),
            window: window.unwrap_or(Duration::from_secs(3)),
            phase: Duration::from_secs(3),
        }
    } else if settings.quick {
        Durations {
            warmup: Duration::from_secs(4),
            window: window.unwrap_or(Duration::from_secs(10)),
            phase: Duration::from_secs(12),
        }
    } else {
        Durations {
            warmup: Duration::from_secs(5),
            window: window.unwrap_or(Duration::from_secs(25)),
            phase: Duration::from_secs(20),
        }
    };
    let designs: &[Design] = if settings.ci {
        &[Design::FewestStopped]
    } else {
        &Design::ALL
    };
    println!(
        "learned shedding: 1 taskworker, exec handler (sh + sleep), {CONCURRENCY} threads, mean work \
         {MEAN_WORK_MS} ms (C = {CAPACITY} jobs/s), deadline {TTL_MS} ms, Poisson arrivals, FIFO queue; \
         {} s warm-up, then a {} s window (drift: three {} s phases, measured after the warm-up)",
        durations.warmup.as_secs(),
        durations.window.as_secs(),
        durations.phase.as_secs()
    );
    let mut rows = Vec::new();
    let mut balanced = true;
    for &mix in &mixes {
        for &load in &loads {
            let mut figures = Vec::new();
            for &design in designs {
                let began = Instant::now();
                let f = run(mix, load, design, durations);
                println!(
                    "  {:<9} {:>4}C  {:<14} goodput {:>5}  wasted {:>5}  doomed {:>5}  busy {:>5}  estimate {}{}  ({:.0} s)  ledger {}",
                    mix.name(),
                    load,
                    design.name(),
                    fmt2(f.goodput),
                    pct1(f.wasted),
                    pct1(f.doomed),
                    pct1(f.busy),
                    f.estimates,
                    if f.back_after.is_some() {
                        format!("  back after {}", back_cell(Some(&f)))
                    } else {
                        String::new()
                    },
                    began.elapsed().as_secs_f64(),
                    f.ledger
                );
                balanced &= f.balanced;
                figures.push((design, f));
            }
            rows.push(Row { mix, load, figures });
        }
    }
    if settings.ci {
        if !balanced {
            eprintln!("bench-ci: some shedding runs did not balance (see above)");
            std::process::exit(1);
        }
        println!("\nbench-ci: every shedding run completed and every ledger balanced");
        return;
    }
    let table = table(&rows);
    println!();
    print!("{}", table.to_text());
    let verdicts = verdicts(&rows);
    println!("\ntargets:");
    for line in &verdicts {
        println!("  {line}");
    }
    let mut markdown = String::from("# Learned shedding\n\n");
    markdown.push_str(&table.to_markdown());
    markdown.push_str("\nTargets:\n\n");
    for line in &verdicts {
        markdown.push_str(&format!("- {line}\n"));
    }
    settings.write("shedding.csv", &table.to_csv());
    settings.write("shedding.md", &markdown);
    println!(
        "\nCSV and markdown in {} ({} done/s at C)",
        settings.out_dir.display(),
        fmt1(CAPACITY)
    );
    if !balanced {
        println!("NOTE: some ledgers did not balance (see above)");
        std::process::exit(1);
    }
}
