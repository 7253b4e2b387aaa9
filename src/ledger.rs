//! The ledger: where every job ends up, counted.
//!
//! Each delivery ends in exactly one [`Outcome`]; the worker's consumer thread (the only
//! writer) records it when it acks, rejects or requeues the delivery, so the ledger and the
//! broker never disagree. The stats line and the final line print it as `key=value` pairs
//! that grep and awk can read.

use crate::histogram::Histogram;
use std::fmt::{self, Write as _};

/// A job's final state in this worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Handled and finished before its deadline; acked.
    Done,
    /// Handled, but finished after its deadline; acked.
    Late,
    /// The handler reported an error; rejected without requeue.
    Failed,
    /// Dropped by the skip-rate flag.
    Skipped,
    /// Past its deadline when it arrived or was about to start.
    Expired,
    /// Could no longer finish before its deadline.
    Doomed,
    /// Its metadata could not be read; rejected without requeue.
    Malformed,
    /// Still running at its deadline, and stopped there (`handler.enforce_deadline`).
    TimedOut,
    /// The handler asked to try again later (exit 75, HTTP 429 or 503): back in the queue.
    Retried,
    /// Handed back to the queue unstarted (on shutdown, a pause, or while an unavailable
    /// handler holds intake), or by a handler that found its service unavailable.
    Requeued,
}

impl Outcome {
    /// Every outcome, in ledger order.
    pub const ALL: [Outcome; 10] = [
        Outcome::Done,
        Outcome::Late,
        Outcome::TimedOut,
        Outcome::Failed,
        Outcome::Skipped,
        Outcome::Expired,
        Outcome::Doomed,
        Outcome::Malformed,
        Outcome::Retried,
        Outcome::Requeued,
    ];

    /// Whether the job is finished with here: false for the outcomes that hand it back to the
    /// queue (`retried`, `requeued`), where another delivery of it will end in its own outcome.
    pub fn is_final(self) -> bool {
        !matches!(self, Outcome::Retried | Outcome::Requeued)
    }

    /// The product's word for it, used in logs, stats and docs.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Done => "done",
            Outcome::Late => "late",
            Outcome::Failed => "failed",
            Outcome::Skipped => "skipped",
            Outcome::Expired => "expired",
            Outcome::Doomed => "doomed",
            Outcome::Malformed => "malformed",
            Outcome::TimedOut => "timed_out",
            Outcome::Retried => "retried",
            Outcome::Requeued => "requeued",
        }
    }
}

/// The worker's counters, owned by its consumer thread.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerLedger {
    /// Deliveries taken from the broker.
    pub received: u64,
    counts: [u64; Outcome::ALL.len()],
    /// Deliveries that were never settled because their channel closed first; the broker puts
    /// them back in the queue.
    pub returned: u64,
    /// Milliseconds of handler work spent on jobs that finished late.
    pub late_work_ms: u64,
    /// Milliseconds of handler work that bought nothing: jobs that finished late or were
    /// stopped at their deadline.
    pub wasted_work_ms: u64,
    /// Milliseconds of handler work in all.
    pub work_ms: u64,
    /// Queue wait (enqueue to start) of jobs that ran.
    pub wait_ms: Histogram,
    /// Time to spare (deadline minus finish) of jobs that finished on time.
    pub slack_ms: Histogram,
}

impl WorkerLedger {
    /// Counts one delivery's final state.
    #[inline]
    pub fn record(&mut self, outcome: Outcome) {
        self.counts[outcome as usize] += 1;
    }

    /// How many deliveries ended in `outcome`.
    pub fn count(&self, outcome: Outcome) -> u64 {
        self.counts[outcome as usize]
    }

    /// Deliveries that have reached a final state.
    pub fn settled(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Deliveries received but not yet settled (running, or waiting for a pool thread).
    pub fn in_flight(&self) -> u64 {
        self.received - self.settled() - self.returned
    }

    /// Appends `received=.. done=.. ... in_flight=..` to `line`.
    pub fn write_fields(&self, line: &mut String) {
        let _ = write!(line, "received={}", self.received);
        for outcome in Outcome::ALL {
            let _ = write!(line, " {}={}", outcome.as_str(), self.count(outcome));
        }
        let _ = write!(
            line,
            " returned={} in_flight={} late_work_ms={} wasted_work_ms={} work_ms={} wait_p50_ms={} wait_p99_ms={} slack_p50_ms={}",
            self.returned,
            self.in_flight(),
            self.late_work_ms,
            self.wasted_work_ms,
            self.work_ms,
            self.wait_ms.quantile(0.5),
            self.wait_ms.quantile(0.99),
            self.slack_ms.quantile(0.5)
        );
    }
}

/// The queuer's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueuerLedger {
    /// Publishes sent to the broker.
    pub sent: u64,
    /// Publishes the broker confirmed: the jobs that exist. Without confirms, equal to `sent`.
    pub published: u64,
    /// Publishes the broker refused (negative confirm); the job does not exist.
    pub nacked: u64,
    /// Publishes whose connection closed before their confirm came: they may or may not be
    /// in the queue, and are not counted as published.
    pub lost: u64,
}

impl QueuerLedger {
    /// Publishes still awaiting a confirm.
    pub fn unconfirmed(&self) -> u64 {
        self.sent - self.published - self.nacked - self.lost
    }
}

impl fmt::Display for QueuerLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sent={} published={} nacked={} lost={} unconfirmed={}",
            self.sent,
            self.published,
            self.nacked,
            self.lost,
            self.unconfirmed()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_is_received_minus_settled() {
        let mut ledger = WorkerLedger {
            received: 5,
            ..Default::default()
        };
        ledger.record(Outcome::Done);
        ledger.record(Outcome::Skipped);
        assert_eq!(ledger.in_flight(), 3);
        let mut line = String::new();
        ledger.write_fields(&mut line);
        assert!(line.contains("received=5 done=1 late=0"), "{line}");
        assert!(line.contains("skipped=1"), "{line}");
        assert!(line.contains("in_flight=3"), "{line}");
    }
}
