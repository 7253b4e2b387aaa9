//! taskworker's metrics: what its consumer thread records, and how a scrape shows it.
//!
//! Settled jobs are counted per outcome and per job type slot, in the flush callback where the
//! ledger counts them, so that once the worker is idle a scrape and the ledger show the same
//! numbers. Type slots are [`WorkEstimates`]' own (at most `worker.max_job_types`, then
//! `(other)`), so a type's counters and its work estimate always carry the same label.

use super::common::{self, BrokerGauge};
use super::registry::{Counter, Histogram};
use super::text::{Kind, Text};
use super::{JOB_BOUNDS_US, Scrape};
use crate::flags::FlagValues;
use crate::handler::estimate::{TypeSlot, WorkEstimates};
use crate::ledger::Outcome;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};

const OUTCOMES: usize = Outcome::ALL.len();

/// How [`WorkEstimates`] names the slot of jobs without a `type`; shown as `type=""`.
const NO_TYPE_SLOT_NAME: &str = "(none)";

/// The worker's metrics as its consumer thread records them: the one writer. It is neither
/// `Clone` nor `Sync`, so no other thread can record; [`WorkerMetrics::scrape`] gives the
/// read side to the `metrics` thread.
#[derive(Debug)]
pub struct WorkerMetrics {
    shared: Arc<Shared>,
    /// Type slots named so far (`shared.types.len()`), kept here to check for new slots
    /// without the lock.
    types_named: Cell<usize>,
}

/// What both sides see.
#[derive(Debug)]
struct Shared {
    values: Arc<FlagValues>,
    pool_threads: usize,
    received: Counter,
    returned: Counter,
    /// `settled[slot * OUTCOMES + outcome]`, for every slot there can be, made at start.
    settled: Box<[Counter]>,
    /// The `type` label of each slot named so far, by slot number; only grows.
    types: Mutex<Vec<String>>,
    /// Per slot: the work the doomed check budgets, in ms.
    work_estimate_ms: Box<[AtomicU64]>,
    /// Per slot: 1 while the type is shut out by its estimate (only probes run), else 0.
    shut_out: Box<[AtomicU64]>,
    /// Probes run, all types together.
    probes: Counter,
    queue_wait: Histogram,
    slack: Histogram,
    handler: Histogram,
    lateness: Histogram,
    broker: BrokerGauge,
    /// Whether intake is held because the handler found its service unavailable.
    handler_unavailable: AtomicBool,
}

impl WorkerMetrics {
    /// Metrics for a worker with `pool_threads` threads and `max_job_types` type slots (plus
    /// `(other)`), showing the flag values in `values`.
    pub fn new(values: Arc<FlagValues>, pool_threads: usize, max_job_types: usize) -> Self {
        let slots = max_job_types.max(1) + 1;
        let shared = Shared {
            values,
            pool_threads,
            received: Counter::default(),
            returned: Counter::default(),
            settled: (0..slots * OUTCOMES).map(|_| Counter::default()).collect(),
            types: Mutex::new(Vec::with_capacity(slots)),
            work_estimate_ms: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            shut_out: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            probes: Counter::default(),
            queue_wait: Histogram::new(&JOB_BOUNDS_US),
            slack: Histogram::new(&JOB_BOUNDS_US),
            handler: Histogram::new(&JOB_BOUNDS_US),
            lateness: Histogram::new(&JOB_BOUNDS_US),
            broker: BrokerGauge::default(),
            handler_unavailable: AtomicBool::new(false),
        };
        WorkerMetrics {
            shared: Arc::new(shared),
            types_named: Cell::new(0),
        }
    }

    /// The read side, for the `metrics` thread.
    pub fn scrape(&self) -> Arc<dyn Scrape> {
        Arc::clone(&self.shared) as Arc<dyn Scrape>
    }

    /// A delivery was taken from the broker.
    #[inline]
    pub fn received(&self) {
        self.shared.received.inc();
    }

    /// Deliveries went back to the broker with their channel, unsettled.
    pub fn returned(&self, n: u64) {
        self.shared.returned.add(n);
    }

    /// A delivery of type `slot` was settled as `outcome`, as the ledger records it. A slot
    /// seen for the first time is named (and its estimate shown) before it is counted, so a
    /// scrape never misses a count.
    #[inline]
    pub fn settled(
        &self,
        estimates: &WorkEstimates,
        slot: TypeSlot,
        outcome: Outcome,
        default_work_ms: u64,
    ) {
        if estimates.type_count() > self.types_named.get() {
            self.name_new_types(estimates, default_work_ms);
        }
        if let Some(counter) = self
            .shared
            .settled
            .get(slot.index() * OUTCOMES + outcome as usize)
        {
            counter.inc();
        }
    }

    /// A task came back from the pool: the times of a job that ran (`wait_ms` is `None` for a
    /// job dropped at start), the slack of one that finished on time, the lateness of one
    /// that finished late.
    #[inline]
    pub fn completed(
        &self,
        wait_ms: Option<u64>,
        worked_ms: u64,
        slack_ms: Option<u64>,
        lateness_ms: Option<u64>,
    ) {
        if let Some(wait) = wait_ms {
            self.shared.queue_wait.observe_ms(wait);
            self.shared.handler.observe_ms(worked_ms);
        }
        if let Some(slack) = slack_ms {
            self.shared.slack.observe_ms(slack);
        }
        if let Some(late) = lateness_ms {
            self.shared.lateness.observe_ms(late);
        }
    }

    /// The estimate of `slot` is now `budget_ms`.
    #[inline]
    pub fn work_estimate(&self, slot: TypeSlot, budget_ms: u64) {
        if let Some(estimate) = self.shared.work_estimate_ms.get(slot.index()) {
            estimate.store(budget_ms, Relaxed);
        }
    }

    /// Type `slot` is now shut out by its estimate, or runs again.
    pub fn shut_out(&self, slot: TypeSlot, shut_out: bool) {
        if let Some(gauge) = self.shared.shut_out.get(slot.index()) {
            gauge.store(u64::from(shut_out), Relaxed);
        }
    }

    /// A job doomed by its type's estimate runs anyway, as a probe.
    pub fn probe(&self) {
        self.shared.probes.inc();
    }

    /// Shows every slot's estimate again: after a reload changed how they are formed.
    pub fn refresh_work_estimates(&self, estimates: &WorkEstimates, default_work_ms: u64) {
        for (estimate, (_, budget)) in self
            .shared
            .work_estimate_ms
            .iter()
            .zip(estimates.budgets(default_work_ms))
        {
            estimate.store(budget, Relaxed);
        }
    }

    /// Connected to `node`, or (`None`) not connected.
    pub fn broker(&self, node: Option<&str>) {
        self.shared.broker.set(node);
    }

    /// Intake is held (`true`) because the handler found its service unavailable, or taken up
    /// again (`false`).
    pub fn handler_unavailable(&self, held: bool) {
        self.shared.handler_unavailable.store(held, Relaxed);
    }

    #[cold]
    fn name_new_types(&self, estimates: &WorkEstimates, default_work_ms: u64) {
        let mut types = self
            .shared
            .types
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let named = types.len();
        for (i, (name, budget)) in estimates.budgets(default_work_ms).enumerate().skip(named) {
            let Some(estimate) = self.shared.work_estimate_ms.get(i) else {
                break;
            };
            estimate.store(budget, Relaxed);
            let label = if name == NO_TYPE_SLOT_NAME { "" } else { name };
            types.push(label.to_owned());
        }
        self.types_named.set(types.len());
    }
}

impl Scrape for Shared {
    fn render(&self, text: &mut Text) {
        let types = self.types.lock().unwrap_or_else(PoisonError::into_inner);
        // Jobs without a type are always shown, at 0 until the first, so that a rate over the
        // first jobs counts them all.
        let no_type_named = types.iter().any(String::is_empty);
        text.family(
            "flagshed_jobs_total",
            Kind::Counter,
            "Jobs settled with the broker, by outcome and job type (the AMQP type property; \"\" for none, (other) past worker.max_job_types).",
        );
        let mut settled_total = 0;
        for (slot, job_type) in types.iter().enumerate() {
            for outcome in Outcome::ALL {
                let n = self.settled[slot * OUTCOMES + outcome as usize].get();
                settled_total += n;
                text.int(
                    "flagshed_jobs_total",
                    &[("outcome", outcome.as_str()), ("type", job_type)],
                    n,
                );
            }
        }
        if !no_type_named {
            for outcome in Outcome::ALL {
                text.int(
                    "flagshed_jobs_total",
                    &[("outcome", outcome.as_str()), ("type", "")],
                    0,
                );
            }
        }
        let returned = self.returned.get();
        // Read after the counts it bounds: the consumer thread adds to it first.
        let received = self.received.get();
        text.family(
            "flagshed_jobs_received_total",
            Kind::Counter,
            "Deliveries taken from RabbitMQ.",
        );
        text.int("flagshed_jobs_received_total", &[], received);
        text.family(
            "flagshed_jobs_returned_total",
            Kind::Counter,
            "Deliveries that went back to the queue unsettled, because their connection closed first.",
        );
        text.int("flagshed_jobs_returned_total", &[], returned);
        text.family(
            "flagshed_jobs_in_flight",
            Kind::Gauge,
            "Deliveries received and not yet settled: running, waiting for a pool thread, or held for a retry.",
        );
        text.int(
            "flagshed_jobs_in_flight",
            &[],
            received.saturating_sub(settled_total + returned),
        );
        text.histogram(
            "flagshed_job_queue_wait_seconds",
            "Time from a job's creation (x-created-ms) to its handler's start, for jobs that ran.",
            &self.queue_wait,
        );
        text.histogram(
            "flagshed_job_slack_seconds",
            "Time left before the deadline when a job finished on time.",
            &self.slack,
        );
        text.histogram(
            "flagshed_job_handler_seconds",
            "Time the handler spent on a job, for jobs that ran.",
            &self.handler,
        );
        text.histogram(
            "flagshed_job_lateness_seconds",
            "Time past the deadline when a job finished late.",
            &self.lateness,
        );
        text.family(
            "flagshed_work_estimate_seconds",
            Kind::Gauge,
            "The work the doomed check budgets for a job of this type without x-work-ms.",
        );
        for (job_type, estimate) in types.iter().zip(self.work_estimate_ms.iter()) {
            text.float(
                "flagshed_work_estimate_seconds",
                &[("type", job_type)],
                estimate.load(Relaxed) as f64 / 1_000.0,
            );
        }
        text.family(
            "flagshed_work_estimate_shut_out",
            Kind::Gauge,
            "1 while every job of this type is doomed by its work estimate and only probes run, else 0.",
        );
        for (job_type, shut_out) in types.iter().zip(self.shut_out.iter()) {
            text.int(
                "flagshed_work_estimate_shut_out",
                &[("type", job_type)],
                shut_out.load(Relaxed),
            );
        }
        text.family(
            "flagshed_work_estimate_probes_total",
            Kind::Counter,
            "Jobs run although their type's work estimate doomed them, to learn whether it still holds.",
        );
        text.int(
            "flagshed_work_estimate_probes_total",
            &[],
            self.probes.get(),
        );
        text.family(
            "flagshed_job_type_skip_rate_ratio",
            Kind::Gauge,
            "The skip-rate flag for a job type whose multi-context (service and job) has a value of its own; types without one follow flagshed_skip_rate_ratio.",
        );
        for (slot, job_type) in types.iter().enumerate() {
            if let Some(rate) = self.values.type_skip_rate(slot) {
                text.float(
                    "flagshed_job_type_skip_rate_ratio",
                    &[("type", job_type)],
                    rate / 100.0,
                );
            }
        }
        drop(types);
        text.family(
            "flagshed_worker_paused",
            Kind::Gauge,
            "1 while the pause flag holds the worker (no new jobs taken), else 0.",
        );
        text.int(
            "flagshed_worker_paused",
            &[],
            u64::from(self.values.paused().unwrap_or(false)),
        );
        text.family(
            "flagshed_worker_pool_threads",
            Kind::Gauge,
            "Pool threads that may run handlers at once (worker.concurrency, or the concurrency flag).",
        );
        text.int(
            "flagshed_worker_pool_threads",
            &[],
            self.values
                .concurrency()
                .map_or(self.pool_threads as u64, u64::from),
        );
        text.family(
            "flagshed_worker_handler_unavailable",
            Kind::Gauge,
            "1 while intake is held because the handler found its service unavailable (handler.when_unavailable = \"hold\"), else 0.",
        );
        text.int(
            "flagshed_worker_handler_unavailable",
            &[],
            u64::from(self.handler_unavailable.load(Relaxed)),
        );
        self.broker.render(text);
        common::render_flags(text, &self.values, true);
        common::render_build_info(text, "worker");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::estimate::EstimateSettings;

    const SETTINGS: EstimateSettings = EstimateSettings {
        quantile: 0.9,
        half_life_jobs: 10,
        min_jobs: 1,
        ..crate::handler::estimate::DEFAULT_SETTINGS
    };

    fn scrape(metrics: &WorkerMetrics) -> String {
        let mut text = Text::new();
        metrics.scrape().render(&mut text);
        text.into_string()
    }

    #[test]
    fn jobs_without_a_type_are_shown_from_the_start() {
        let metrics = WorkerMetrics::new(Arc::new(FlagValues::new(25.0, 3.0)), 4, 2);
        let text = scrape(&metrics);
        assert!(
            text.contains("flagshed_jobs_total{outcome=\"done\",type=\"\"} 0\n"),
            "{text}"
        );
        assert!(text.contains("flagshed_skip_rate_ratio 0.25\n"), "{text}");
        assert!(text.contains("flagshed_worker_pool_threads 4\n"), "{text}");
        assert!(
            text.contains("flagshed_broker_connected{node=\"\"} 0\n"),
            "{text}"
        );
    }

    #[test]
    fn settled_jobs_are_counted_by_type_slot_with_other_past_the_limit() {
        let metrics = WorkerMetrics::new(Arc::new(FlagValues::new(0.0, 1.0)), 1, 2);
        let mut estimates = WorkEstimates::new(SETTINGS, 2);
        let none = estimates.slot("");
        let resize = estimates.slot("resize");
        let other = estimates.slot("thumb");
        metrics.received();
        metrics.settled(&estimates, none, Outcome::Done, 250);
        metrics.settled(&estimates, resize, Outcome::Skipped, 250);
        metrics.settled(&estimates, resize, Outcome::Skipped, 250);
        metrics.settled(&estimates, other, Outcome::Expired, 250);
        let text = scrape(&metrics);
        for line in [
            "flagshed_jobs_total{outcome=\"done\",type=\"\"} 1\n",
            "flagshed_jobs_total{outcome=\"skipped\",type=\"resize\"} 2\n",
            "flagshed_jobs_total{outcome=\"expired\",type=\"(other)\"} 1\n",
            "flagshed_work_estimate_seconds{type=\"resize\"} 0.25\n",
            "flagshed_jobs_received_total 1\n",
            "flagshed_jobs_in_flight 0\n",
        ] {
            assert!(text.contains(line), "{line}in\n{text}");
        }
        assert_eq!(
            text.matches("flagshed_jobs_total{outcome=\"done\",type=\"\"}")
                .count(),
            1,
            "{text}"
        );
    }

    #[test]
    fn a_type_shut_out_by_its_estimate_and_the_probes_are_shown() {
        let metrics = WorkerMetrics::new(Arc::new(FlagValues::new(0.0, 1.0)), 1, 2);
        let mut estimates = WorkEstimates::new(SETTINGS, 2);
        let report = estimates.slot("report");
        estimates.slot("resize");
        metrics.settled(&estimates, report, Outcome::Doomed, 250);
        metrics.shut_out(report, true);
        metrics.probe();
        metrics.probe();
        let text = scrape(&metrics);
        for line in [
            "flagshed_work_estimate_shut_out{type=\"report\"} 1\n",
            "flagshed_work_estimate_shut_out{type=\"resize\"} 0\n",
            "flagshed_work_estimate_probes_total 2\n",
        ] {
            assert!(text.contains(line), "{line}in\n{text}");
        }
        metrics.shut_out(report, false);
        assert!(scrape(&metrics).contains("flagshed_work_estimate_shut_out{type=\"report\"} 0\n"));
    }

    #[test]
    fn the_no_type_slot_is_named_as_work_estimates_names_it() {
        let mut estimates = WorkEstimates::new(SETTINGS, 1);
        estimates.slot("");
        let names: Vec<&str> = estimates.budgets(0).map(|(name, _)| name).collect();
        assert_eq!(names, [NO_TYPE_SLOT_NAME]);
    }

    #[test]
    fn completions_feed_the_histograms_of_what_happened() {
        let metrics = WorkerMetrics::new(Arc::new(FlagValues::new(0.0, 1.0)), 1, 1);
        metrics.completed(Some(40), 120, Some(5), None);
        metrics.completed(Some(10), 300, None, Some(2_000));
        metrics.completed(None, 0, None, None);
        let text = scrape(&metrics);
        for line in [
            "flagshed_job_queue_wait_seconds_count 2\n",
            "flagshed_job_queue_wait_seconds_sum 0.05\n",
            "flagshed_job_handler_seconds_sum 0.42\n",
            "flagshed_job_slack_seconds_count 1\n",
            "flagshed_job_lateness_seconds_bucket{le=\"2.5\"} 1\n",
            "flagshed_job_lateness_seconds_bucket{le=\"1\"} 0\n",
        ] {
            assert!(text.contains(line), "{line}in\n{text}");
        }
    }
}
