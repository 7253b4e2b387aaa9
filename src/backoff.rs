//! How long to wait before the next connection attempt: exponential backoff with jitter.
//!
//! Both remote services flagshed depends on use it: LaunchDarkly (first delay 1 s, cap 30 s,
//! as LaunchDarkly's SDKs do) and RabbitMQ (first delay 250 ms, cap 5 s, so a worker resumes
//! within seconds of the broker coming back). The delay doubles after every failure up to the
//! cap, and a random part of up to half of it is taken off so that many daemons cut off by the
//! same outage do not reconnect in lockstep and overload the service as it comes back. A
//! connection that stayed up long enough proves the service healthy again, so the next
//! failure starts from the first delay once more.
//!
//! The randomness is a small xorshift generator seeded from the clock and the process id:
//! spreading retries needs no cryptographic quality, and no extra crate.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The retry schedule of one connection.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    reset_after: Duration,
    /// Failures since the schedule last started over.
    failures: u32,
    rng: XorShift,
}

impl Backoff {
    /// A schedule starting at `base`, capped at `max` (or at `base` if larger), that starts
    /// over after a connection stayed up for `reset_after`.
    pub fn new(base: Duration, max: Duration, reset_after: Duration) -> Backoff {
        Backoff {
            base,
            max: max.max(base),
            reset_after,
            failures: 0,
            rng: XorShift::from_time_and_pid(),
        }
    }

    /// The wait before the next attempt; each call counts one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let full = self.full_delay();
        self.failures = self.failures.saturating_add(1);
        // Take off up to half, so the wait lies in [full / 2, full].
        let half_nanos = u64::try_from(full.as_nanos() / 2).unwrap_or(u64::MAX);
        let jitter = if half_nanos == 0 {
            0
        } else {
            self.rng.next() % (half_nanos + 1)
        };
        full.saturating_sub(Duration::from_nanos(jitter))
    }

    /// Called when a connection ends: one that lasted long enough starts the schedule over.
    pub fn connection_ended(&mut self, uptime: Duration) {
        if uptime >= self.reset_after {
            self.reset();
        }
    }

    /// Starts the schedule over (a poll succeeded).
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// The delay before jitter: base × 2^failures, capped.
    fn full_delay(&self) -> Duration {
        // Past 2^16 the cap has long been reached; the bound keeps the shift in range.
        let factor = 1u32 << self.failures.min(16);
        self.base.saturating_mul(factor).min(self.max)
    }
}

/// Marsaglia's xorshift64: a few instructions per number, good enough to spread retries.
#[derive(Debug)]
pub(crate) struct XorShift(u64);

impl XorShift {
    pub(crate) fn from_time_and_pid() -> XorShift {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let seed = nanos ^ (u64::from(std::process::id()) << 32) ^ 0x9E37_79B9_7F4A_7C15;
        // Zero is xorshift's one fixed point.
        XorShift(if seed == 0 { 1 } else { seed })
    }

    pub(crate) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX_DELAY: Duration = Duration::from_secs(30);
    const RESET_AFTER: Duration = Duration::from_secs(60);

    fn launchdarkly(base: Duration) -> Backoff {
        Backoff::new(base, MAX_DELAY, RESET_AFTER)
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn delays_double_up_to_the_cap_with_jitter_of_at_most_half() {
        let mut backoff = launchdarkly(Duration::from_secs(1));
        for full in [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0] {
            let delay = backoff.next_delay();
            assert!(
                delay >= secs(full / 2.0) && delay <= secs(full),
                "{delay:?} not within [{}, {full}] s",
                full / 2.0
            );
        }
    }

    #[test]
    fn jitter_varies() {
        let mut backoff = launchdarkly(Duration::from_secs(1));
        let delays: Vec<Duration> = (0..20)
            .map(|_| {
                backoff.reset();
                backoff.next_delay()
            })
            .collect();
        assert!(delays.iter().any(|d| *d != delays[0]), "{delays:?}");
    }

    #[test]
    fn a_long_connection_starts_the_schedule_over() {
        let mut backoff = launchdarkly(Duration::from_secs(1));
        for _ in 0..5 {
            backoff.next_delay();
        }
        backoff.connection_ended(Duration::from_secs(59));
        assert!(backoff.next_delay() > secs(15.0));
        backoff.connection_ended(RESET_AFTER);
        assert!(backoff.next_delay() <= secs(1.0));
    }

    #[test]
    fn many_failures_do_not_overflow() {
        let mut backoff = launchdarkly(Duration::from_millis(10));
        for _ in 0..10_000 {
            assert!(backoff.next_delay() <= MAX_DELAY);
        }
    }

    #[test]
    fn a_small_base_suits_tests() {
        let mut backoff = launchdarkly(Duration::from_millis(4));
        let delay = backoff.next_delay();
        assert!(delay >= Duration::from_millis(2) && delay <= Duration::from_millis(4));
    }
}
