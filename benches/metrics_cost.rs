//! What metrics add to the consumer thread's per-job bookkeeping, in nanoseconds per job.
//!
//! The bookkeeping is what the consumer thread records about a job besides deciding and acking
//! it, in the order it does so (see `worker.rs`):
//!
//! - at receipt: the ledger's `received`, and the job type's slot (held with the delivery);
//! - when the job comes back from the pool: work time, queue wait, and slack or lateness;
//! - at the flush: the outcome in the ledger.
//!
//! With metrics on, the same calls are followed by the `WorkerMetrics` ones the worker makes
//! at each of those places, including the refresh of the type's work estimate gauge. Learning
//! the work estimate itself (`WorkEstimates::observe`) is left out of both: it is the same with
//! and without metrics and would only hide the difference.
//!
//! Jobs are a fixed mix, cycled: 70 % done on time, 10 % late, 20 % skipped at receipt (no
//! completion); a quarter without a type and the rest of three types. Off and on runs
//! alternate; each figure is the median of the runs.
//!
//! `cargo bench --bench metrics_cost [-- --quick]`.

use flagshed::flags::FlagValues;
use flagshed::handler::estimate::WorkEstimates;
use flagshed::ledger::{Outcome, WorkerLedger};
use flagshed::metrics::WorkerMetrics;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

/// Distinct jobs, cycled (a power of two, so the index is a mask).
const JOBS: usize = 4_096;

const TYPES: [&str; 4] = ["", "resize", "thumbnail", "invoice"];

/// One job's facts, as the consumer thread learns them.
#[derive(Clone, Copy)]
struct Job {
    job_type: &'static str,
    outcome: Outcome,
    /// What the pool reports; `None` for a job shed at receipt.
    completion: Option<Completion>,
}

#[derive(Clone, Copy)]
struct Completion {
    worked_ms: u64,
    wait_ms: u64,
    slack_ms: Option<u64>,
    lateness_ms: Option<u64>,
}

/// A fixed pseudo-random mix (xorshift), the same in every run.
fn jobs() -> Vec<Job> {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..JOBS)
        .map(|_| {
            let job_type = TYPES[(next() % 4) as usize];
            let wait_ms = next() % 2_000;
            let worked_ms = 50 + next() % 400;
            match next() % 10 {
                0 | 1 => Job {
                    job_type,
                    outcome: Outcome::Skipped,
                    completion: None,
                },
                2 => Job {
                    job_type,
                    outcome: Outcome::Late,
                    completion: Some(Completion {
                        worked_ms,
                        wait_ms,
                        slack_ms: None,
                        lateness_ms: Some(next() % 3_000),
                    }),
                },
                _ => Job {
                    job_type,
                    outcome: Outcome::Done,
                    completion: Some(Completion {
                        worked_ms,
                        wait_ms,
                        slack_ms: Some(next() % 5_000),
                        lateness_ms: None,
                    }),
                },
            }
        })
        .collect()
}

/// The consumer thread's state that the bookkeeping touches.
struct Books {
    ledger: WorkerLedger,
    estimates: WorkEstimates,
    metrics: Option<WorkerMetrics>,
    default_work_ms: u64,
}

impl Books {
    fn new(metrics: bool) -> Books {
        let settings = flagshed::handler::estimate::DEFAULT_SETTINGS;
        Books {
            ledger: WorkerLedger::default(),
            estimates: WorkEstimates::new(settings, 32),
            metrics: metrics
                .then(|| WorkerMetrics::new(Arc::new(FlagValues::new(0.0, 1.0)), 4, 32)),
            default_work_ms: 1_000,
        }
    }

    /// One job's bookkeeping, receipt to flush.
    #[inline(never)]
    fn job(&mut self, job: &Job) {
        // on_delivery
        self.ledger.received += 1;
        if let Some(metrics) = &self.metrics {
            metrics.received();
        }
        let slot = self.estimates.slot(job.job_type);
        // on_completion
        if let Some(c) = &job.completion {
            if let Some(metrics) = &self.metrics {
                metrics.completed(Some(c.wait_ms), c.worked_ms, c.slack_ms, c.lateness_ms);
            }
            if let Some(slack) = c.slack_ms {
                self.ledger.slack_ms.record(slack);
            }
            if job.outcome == Outcome::Late {
                self.ledger.late_work_ms += c.worked_ms;
                self.ledger.wasted_work_ms += c.worked_ms;
            }
            self.ledger.work_ms += c.worked_ms;
            if let Some(metrics) = &self.metrics {
                metrics.work_estimate(slot, self.estimates.budget_ms(slot, self.default_work_ms));
            }
            self.ledger.wait_ms.record(c.wait_ms);
        }
        // flush
        self.ledger.record(job.outcome);
        if let Some(metrics) = &self.metrics {
            metrics.settled(&self.estimates, slot, job.outcome, self.default_work_ms);
        }
    }
}

/// ns per job over `count` jobs.
fn run(metrics: bool, jobs: &[Job], count: usize) -> f64 {
    let mut books = Books::new(metrics);
    let mask = JOBS - 1;
    let start = Instant::now();
    for i in 0..count {
        books.job(black_box(&jobs[i & mask]));
    }
    let ns = start.elapsed().as_secs_f64() * 1e9 / count as f64;
    black_box(&books.ledger);
    black_box(&books.metrics);
    ns
}

fn median(mut ns: Vec<f64>) -> f64 {
    ns.sort_by(f64::total_cmp);
    ns[ns.len() / 2]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (runs, count) = if quick {
        (5, 1_000_000)
    } else {
        (11, 5_000_000)
    };
    let jobs = jobs();
    // Untimed: warms caches and the branch predictor.
    run(false, &jobs, count / 10);
    run(true, &jobs, count / 10);
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        off.push(run(false, &jobs, count));
        on.push(run(true, &jobs, count));
    }
    let (off, on) = (median(off), median(on));
    println!("consumer-thread bookkeeping per job: median of {runs} runs of {count} jobs");
    println!("metrics off   {off:>6.1} ns/job");
    println!("metrics on    {on:>6.1} ns/job");
    println!("difference    {:>6.1} ns/job", on - off);
}
