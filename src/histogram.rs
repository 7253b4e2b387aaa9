//! A fixed-size log-linear histogram of milliseconds, for queue wait and deadline slack.
//!
//! Recording is an index computation and an increment: no allocation after creation, so it can
//! sit on the consumer thread's per-job path. Values are grouped in 16 linear steps per power of
//! two, so a reported quantile is within about 6% of the true value, from 1 ms to ~584 million
//! years.

const LINEAR: usize = 16;
const BUCKETS: usize = LINEAR + (64 - 4) * LINEAR;

/// Counts of values in log-linear buckets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Histogram {
    counts: Box<[u64; BUCKETS]>,
    total: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: Box::new([0; BUCKETS]),
            total: 0,
        }
    }
}

fn bucket(value: u64) -> usize {
    if value < LINEAR as u64 {
        return value as usize;
    }
    let exponent = 63 - value.leading_zeros() as usize; // >= 4
    let mantissa = ((value >> (exponent - 4)) & 0xf) as usize;
    LINEAR + (exponent - 4) * LINEAR + mantissa
}

fn lower_bound(index: usize) -> u64 {
    if index < LINEAR {
        return index as u64;
    }
    let exponent = (index - LINEAR) / LINEAR + 4;
    let mantissa = ((index - LINEAR) % LINEAR) as u64;
    (1u64 << exponent) | (mantissa << (exponent - 4))
}

impl Histogram {
    /// Adds one value.
    #[inline]
    pub fn record(&mut self, value: u64) {
        self.counts[bucket(value)] += 1;
        self.total += 1;
    }

    /// The value at quantile `q` (0.0..=1.0), as its bucket's lower bound; 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (index, &count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return lower_bound(index);
            }
        }
        lower_bound(BUCKETS - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut previous = 0;
        for v in (0..100_000u64).chain([u64::MAX / 2, u64::MAX]) {
            let b = bucket(v);
            assert!(b >= previous, "bucket order at {v}");
            previous = b;
            let low = lower_bound(b);
            assert!(low <= v, "{low} > {v}");
            assert!(v - low <= v / 16 + 1, "bucket of {v} starts at {low}");
        }
    }

    #[test]
    fn quantiles_of_uniform_values() {
        let mut h = Histogram::default();
        for v in 1..=1000 {
            h.record(v);
        }
        let p50 = h.quantile(0.5);
        let p99 = h.quantile(0.99);
        assert!((470..=500).contains(&p50), "p50 {p50}");
        assert!((930..=990).contains(&p99), "p99 {p99}");
        assert_eq!(Histogram::default().quantile(0.5), 0);
    }
}
