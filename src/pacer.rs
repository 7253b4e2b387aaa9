//! The queuer's pacing, apart from any clock: credit accrues at the current rate for the time
//! the caller says has passed, each publish spends one, and credit is capped at
//! [`MAX_BURST`]'s worth so a pause or a slow broker never turns into a burst. Taking the
//! time as an argument lets tests drive it, so the pacing is checked exactly rather than
//! against a busy machine's scheduler.

use std::time::{Duration, Instant};

/// The longest the loop sleeps between looks at the rate flag, so a changed rate (or a rate
/// leaving 0) takes effect promptly.
pub const MAX_PACING_SLEEP: Duration = Duration::from_millis(50);

/// Credit may build up to this much time's worth of jobs (and at least one job), and no more.
pub const MAX_BURST: Duration = Duration::from_millis(10);

/// Credit for jobs not yet sent, and when it was last brought up to date.
#[derive(Debug)]
pub struct Pacer {
    credit: f64,
    last: Instant,
}

impl Pacer {
    /// No credit yet: the first job is due one interval after `now`.
    pub fn new(now: Instant) -> Pacer {
        Pacer {
            credit: 0.0,
            last: now,
        }
    }

    /// Adds what `rate` jobs per second earned since the last call, up to the burst cap.
    pub fn accrue(&mut self, rate: f64, now: Instant) {
        let burst = (rate * MAX_BURST.as_secs_f64()).max(1.0);
        let earned = rate * now.saturating_duration_since(self.last).as_secs_f64();
        self.credit = (self.credit + earned).min(burst);
        self.last = now;
    }

    /// Whether a job may be sent now; if so, its credit is spent.
    pub fn take(&mut self) -> bool {
        let due = self.credit >= 1.0;
        if due {
            self.credit -= 1.0;
        }
        due
    }

    /// How long until the next job is due at `rate`, at most [`MAX_PACING_SLEEP`] (and that
    /// at rate 0), so a changed rate is seen soon.
    pub fn wait(&self, rate: f64) -> Duration {
        if rate > 0.0 {
            Duration::from_secs_f64(((1.0 - self.credit) / rate).max(0.0)).min(MAX_PACING_SLEEP)
        } else {
            MAX_PACING_SLEEP
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the pacer as the queuer's loop does, on a clock the test moves: sleeps exactly
    /// as long as asked (plus `stall` every `stall_every` passes), and returns when each job
    /// went out, in microseconds from the start.
    fn send_times(rate: f64, jobs: usize, stall: Duration, stall_every: usize) -> Vec<u64> {
        let start = Instant::now();
        let mut now = start;
        let mut pacer = Pacer::new(now);
        let mut sent = Vec::new();
        let mut pass = 0;
        while sent.len() < jobs {
            pacer.accrue(rate, now);
            while sent.len() < jobs && pacer.take() {
                sent.push(now.duration_since(start).as_micros() as u64);
            }
            now += pacer.wait(rate);
            pass += 1;
            if stall_every > 0 && pass % stall_every == 0 {
                now += stall;
            }
        }
        sent
    }

    #[test]
    fn jobs_go_out_one_interval_apart() {
        let times = send_times(50.0, 250, Duration::ZERO, 0);
        assert_eq!(times[0], 20_000, "the first job after one interval");
        for pair in times.windows(2) {
            let gap = pair[1] - pair[0];
            assert!((19_999..=20_001).contains(&gap), "gap of {gap} us at 50/s");
        }
        assert_eq!(times[249] - times[0], 249 * 20_000);
    }

    #[test]
    fn a_fractional_rate_sends_slower_than_one_a_second_without_drift() {
        let times = send_times(2.5, 6, Duration::ZERO, 0);
        let span = times[5] - times[0];
        assert!((1_999_990..=2_000_010).contains(&span), "{span} us");
    }

    #[test]
    fn a_stall_never_turns_into_a_burst() {
        // A 300 ms stall every 3 passes at 1,000 jobs/s: afterwards at most 10 ms' worth of
        // jobs go out at once, not the 300 owed.
        let times = send_times(1_000.0, 2_000, Duration::from_millis(300), 3);
        let most_at_once = times
            .chunk_by(|a, b| a == b)
            .map(<[u64]>::len)
            .max()
            .unwrap_or(0);
        assert_eq!(most_at_once, 10);
        // At a slow rate the cap is one job.
        let times = send_times(5.0, 20, Duration::from_secs(2), 2);
        assert!(times.windows(2).all(|p| p[1] > p[0]), "{times:?}");
    }

    #[test]
    fn rate_zero_sends_nothing_and_looks_again_soon() {
        let mut pacer = Pacer::new(Instant::now());
        let later = Instant::now() + Duration::from_secs(60);
        pacer.accrue(0.0, later);
        assert!(!pacer.take());
        assert_eq!(pacer.wait(0.0), MAX_PACING_SLEEP);
        // A rate that rises is seen within one sleep, and the waiting is not paid back.
        pacer.accrue(100.0, later + MAX_PACING_SLEEP);
        assert!(pacer.take(), "5 jobs' worth earned, capped at 1");
        assert!(!pacer.take());
        assert_eq!(pacer.wait(100.0), Duration::from_millis(10));
    }
}
