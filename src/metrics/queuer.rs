//! taskqueuer's metrics: its ledger (sent, published, nacked, lost), how long confirms take,
//! and the rate it is asked for.

use super::common::{self, BrokerGauge};
use super::registry::{Counter, Histogram};
use super::text::{Kind, Text};
use super::{CONFIRM_BOUNDS_US, Scrape};
use crate::flags::FlagValues;
use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

/// The queuer's metrics as its publisher thread records them: the one writer. It is neither
/// `Clone` nor `Sync`, so no other thread can record; [`QueuerMetrics::scrape`] gives the
/// read side to the `metrics` thread.
#[derive(Debug)]
pub struct QueuerMetrics {
    shared: Arc<Shared>,
    one_thread: PhantomData<Cell<()>>,
}

/// What both sides see.
#[derive(Debug)]
struct Shared {
    values: Arc<FlagValues>,
    sent: Counter,
    published: Counter,
    nacked: Counter,
    lost: Counter,
    confirm_latency: Histogram,
    broker: BrokerGauge,
}

impl QueuerMetrics {
    pub fn new(values: Arc<FlagValues>) -> QueuerMetrics {
        let shared = Shared {
            values,
            sent: Counter::default(),
            published: Counter::default(),
            nacked: Counter::default(),
            lost: Counter::default(),
            confirm_latency: Histogram::new(&CONFIRM_BOUNDS_US),
            broker: BrokerGauge::default(),
        };
        QueuerMetrics {
            shared: Arc::new(shared),
            one_thread: PhantomData,
        }
    }

    /// The read side, for the `metrics` thread.
    pub fn scrape(&self) -> Arc<dyn Scrape> {
        Arc::clone(&self.shared) as Arc<dyn Scrape>
    }

    /// A publish went out.
    #[inline]
    pub fn sent(&self) {
        self.shared.sent.inc();
    }

    /// A job counts as published (confirmed, or sent without confirms).
    #[inline]
    pub fn published(&self) {
        self.shared.published.inc();
    }

    /// The broker refused a publish.
    pub fn nacked(&self) {
        self.shared.nacked.inc();
    }

    /// Publishes of a lost connection that were never confirmed.
    pub fn lost(&self, n: u64) {
        self.shared.lost.add(n);
    }

    /// A confirm (positive or negative) came this long after its publish.
    #[inline]
    pub fn confirmed_after(&self, latency: Duration) {
        self.shared
            .confirm_latency
            .observe_us(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
    }

    /// Connected to `node`, or (`None`) not connected.
    pub fn broker(&self, node: Option<&str>) {
        self.shared.broker.set(node);
    }
}

impl Scrape for Shared {
    fn render(&self, text: &mut Text) {
        let published = self.published.get();
        let nacked = self.nacked.get();
        let lost = self.lost.get();
        // Read after the counts it bounds: the publisher thread adds to it first.
        let sent = self.sent.get();
        for (name, help, value) in [
            (
                "flagshed_jobs_sent_total",
                "Publishes sent to RabbitMQ.",
                sent,
            ),
            (
                "flagshed_jobs_published_total",
                "Publishes RabbitMQ confirmed (all sent ones with queuer.confirms off): the jobs that exist.",
                published,
            ),
            (
                "flagshed_jobs_nacked_total",
                "Publishes RabbitMQ refused with a negative confirm.",
                nacked,
            ),
            (
                "flagshed_jobs_lost_total",
                "Publishes whose connection closed before their confirm came; not counted as published.",
                lost,
            ),
        ] {
            text.family(name, Kind::Counter, help);
            text.int(name, &[], value);
        }
        text.family(
            "flagshed_jobs_unconfirmed",
            Kind::Gauge,
            "Publishes awaiting their confirm.",
        );
        text.int(
            "flagshed_jobs_unconfirmed",
            &[],
            sent.saturating_sub(published + nacked + lost),
        );
        text.histogram(
            "flagshed_confirm_latency_seconds",
            "Time from a publish to its confirm, positive or negative.",
            &self.confirm_latency,
        );
        self.broker.render(text);
        common::render_flags(text, &self.values, false);
        common::render_build_info(text, "queuer");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ledger_and_confirm_latency_are_shown() {
        let metrics = QueuerMetrics::new(Arc::new(FlagValues::new(0.0, 250.0)));
        for _ in 0..3 {
            metrics.sent();
        }
        metrics.published();
        metrics.nacked();
        metrics.confirmed_after(Duration::from_micros(700));
        metrics.confirmed_after(Duration::from_millis(30));
        metrics.broker(Some("rabbit-1:5672"));
        let mut text = Text::new();
        metrics.scrape().render(&mut text);
        let text = text.into_string();
        for line in [
            "flagshed_jobs_sent_total 3\n",
            "flagshed_jobs_unconfirmed 1\n",
            "flagshed_confirm_latency_seconds_bucket{le=\"0.001\"} 1\n",
            "flagshed_confirm_latency_seconds_count 2\n",
            "flagshed_confirm_latency_seconds_sum 0.0307\n",
            "flagshed_broker_connected{node=\"rabbit-1:5672\"} 1\n",
            "flagshed_task_rate_jobs_per_second 250\n",
        ] {
            assert!(text.contains(line), "{line}in\n{text}");
        }
        assert!(!text.contains("skip_rate"), "{text}");
    }
}
