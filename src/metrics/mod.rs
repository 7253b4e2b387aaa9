//! Prometheus metrics: what each daemon counts and measures, and the `GET /metrics` endpoint
//! that shows it (`metrics.worker_listen`, `metrics.queuer_listen`; off by default).
//!
//! The owner thread of a daemon (the consumer or publisher thread) records into atomics
//! created at start, beside its ledger and at the same places. It is their only writer, so an
//! addition is a relaxed load and store rather than a locked read-modify-write; a settled job
//! costs one such addition (its type's slot travels with the delivery, resolved at receipt),
//! a finished job a few more for its histograms, with no lock, allocation or lookup. The
//! `metrics` thread renders a scrape from those atomics, the flag values and `/proc/self`, so
//! a scrape never waits on the hot path nor the hot path on a scrape. `benches/metrics_cost.rs`
//! measures what recording adds to the consumer thread's bookkeeping: about 20 ns per job.
//!
//! The registry and the text format are our own (`registry`, `text`), not the
//! `prometheus-client` crate's: its histogram takes a mutex per observation, where ours is two
//! atomic additions, and it writes the OpenMetrics format (`# EOF`, counter families named
//! without `_total`), not the Prometheus text format 0.0.4 that `promtool check metrics`
//! reads. What we need of the format is small: counters, gauges and histograms with fixed
//! buckets, written with `# HELP` and `# TYPE`, escaped and ordered as the format asks.
//! HTTP comes from `tiny_http`, a blocking server with no async runtime.
//!
//! Names follow Prometheus' conventions: a `flagshed_` prefix, base units (seconds, ratios,
//! bytes) in the name, `_total` on counters. The job type label uses the worker's bounded
//! type slots (`worker.max_job_types`), so a scrape stays small whatever producers send.

mod common;
mod process;
mod queuer;
mod registry;
mod server;
mod text;
mod worker;

pub use queuer::QueuerMetrics;
pub use server::MetricsServer;
pub use text::Text;
pub use worker::WorkerMetrics;

/// Something a scrape shows: a daemon's metrics, written into the scrape's text.
pub trait Scrape: Send + Sync {
    fn render(&self, text: &mut Text);
}

/// Upper bounds for job times (queue wait, slack, handler time, lateness), in microseconds:
/// 1 ms to 5 minutes. The worker's clock has millisecond resolution.
const JOB_BOUNDS_US: [u64; 15] = [
    1_000,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    30_000_000,
    60_000_000,
    300_000_000,
];

/// Upper bounds for publish-to-confirm times, in microseconds: 250 µs to 10 s.
const CONFIRM_BOUNDS_US: [u64; 15] = [
    250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000,
];
