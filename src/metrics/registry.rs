//! The two kinds of atomic a metric needs on the hot path: a counter and a histogram with
//! fixed buckets.
//!
//! Each is written by one thread only, the daemon's owner thread, through the daemon's
//! metrics handle (which is neither `Clone` nor `Sync`, so there is one writer by
//! construction), and read by the `metrics` thread at scrape time. One writer needs no
//! read-modify-write: an addition is a relaxed load and a relaxed store, about as cheap as
//! adding to a plain integer, where a `fetch_add` would lock the cache line every time. The
//! reader sees each number as some value it really had; a scrape needs each number to be right,
//! not several numbers to agree to the nanosecond.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A count that only goes up; see the module's doc for who may add to it.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`. Only the one writer calls this.
    #[inline]
    pub fn add(&self, n: u64) {
        add(&self.0, n);
    }

    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// The one writer's addition: no other thread stores to `cell`, so nothing can come between
/// the load and the store.
#[inline]
fn add(cell: &AtomicU64, n: u64) {
    cell.store(cell.load(Relaxed).wrapping_add(n), Relaxed);
}

/// Observations in fixed buckets. A bucket holds the observations up to its upper bound (and
/// above the bound before it); the last, past every bound, is `+Inf`. Bounds and the sum are
/// kept in microseconds, as whole numbers, so that the sum is exact.
#[derive(Debug)]
pub struct Histogram {
    bounds_us: &'static [u64],
    /// One per bound, then the `+Inf` bucket: not cumulative (the exposition adds them up).
    counts: Box<[AtomicU64]>,
    sum_us: AtomicU64,
}

/// What a histogram held at one moment.
#[derive(Debug)]
pub struct Snapshot {
    /// Per bucket (not cumulative), the `+Inf` bucket last.
    pub counts: Vec<u64>,
    /// All observations: the sum of `counts`, so `_count` always equals the `+Inf` bucket.
    pub count: u64,
    pub sum_us: u64,
}

impl Histogram {
    /// A histogram with these upper bounds, in microseconds, ascending.
    pub fn new(bounds_us: &'static [u64]) -> Histogram {
        debug_assert!(bounds_us.windows(2).all(|w| w[0] < w[1]));
        Histogram {
            bounds_us,
            counts: (0..=bounds_us.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
        }
    }

    /// Records one observation: a count of the bounds below it (compared all at once, without
    /// a branch to mispredict) and two additions. Only the one writer calls this.
    #[inline]
    pub fn observe_us(&self, us: u64) {
        let bucket: usize = self
            .bounds_us
            .iter()
            .map(|&bound| usize::from(us > bound))
            .sum();
        add(&self.counts[bucket], 1);
        add(&self.sum_us, us);
    }

    /// Records one observation in milliseconds, the unit the worker's clocks give.
    #[inline]
    pub fn observe_ms(&self, ms: u64) {
        self.observe_us(ms.saturating_mul(1_000));
    }

    pub fn bounds_us(&self) -> &'static [u64] {
        self.bounds_us
    }

    pub fn snapshot(&self) -> Snapshot {
        let counts: Vec<u64> = self.counts.iter().map(|c| c.load(Relaxed)).collect();
        Snapshot {
            count: counts.iter().sum(),
            counts,
            sum_us: self.sum_us.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_observation_on_a_bound_belongs_to_that_bucket() {
        let histogram = Histogram::new(&[1_000, 2_000]);
        histogram.observe_ms(0);
        histogram.observe_ms(1);
        histogram.observe_ms(2);
        histogram.observe_ms(3);
        let snapshot = histogram.snapshot();
        assert_eq!(snapshot.counts, [2, 1, 1]);
        assert_eq!(snapshot.count, 4);
        assert_eq!(snapshot.sum_us, 6_000);
    }
}
