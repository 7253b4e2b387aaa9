//! Warnings about individual jobs, at most one a second.
//!
//! A producer sending garbage, or a handler failing on every job, must not flood the journal
//! with a line per job; but the first occurrence deserves its own line, with the job's id and
//! the reason. The lines skipped in between are counted in the next one, or, when no next one
//! comes, in a line of their own once the period is over ([`Throttle::tick`], called from the
//! stats timer) or at exit ([`Throttle::finish`]).

use std::time::{Duration, Instant};

/// How often a throttled warning may be logged.
const PERIOD: Duration = Duration::from_secs(1);

/// One kind of per-job warning and its rate limit.
#[derive(Debug)]
pub struct Throttle {
    /// What is warned about, for the line that counts suppressed warnings.
    what: &'static str,
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// A throttle for warnings about `what` (e.g. "malformed jobs").
    pub fn new(what: &'static str) -> Throttle {
        Throttle {
            what,
            last: None,
            suppressed: 0,
        }
    }

    /// Logs the count of suppressed warnings if the period is over and none came since.
    pub fn tick(&mut self) {
        if self.last.is_some_and(|at| at.elapsed() >= PERIOD) {
            self.finish();
        }
    }

    /// Logs the count of suppressed warnings, if any (at exit).
    pub fn finish(&mut self) {
        match std::mem::take(&mut self.suppressed) {
            0 => {}
            more => log::warn!(
                "{more} more warnings about {} were not logged one by one",
                self.what
            ),
        }
    }

    /// Logs `message` as a warning unless one was logged within the last second, in which case
    /// it is only counted. `message` is built only when it will be logged.
    pub fn warn(&mut self, message: impl FnOnce() -> String) {
        let now = Instant::now();
        if self.last.is_some_and(|at| now.duration_since(at) < PERIOD) {
            self.suppressed += 1;
            return;
        }
        self.last = Some(now);
        match std::mem::take(&mut self.suppressed) {
            0 => log::warn!("{}", message()),
            more => log::warn!("{} (and {more} more since the last warning)", message()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suppressed_warnings_are_counted_at_the_end() {
        let mut throttle = Throttle::new("malformed jobs");
        throttle.warn(|| "first".into());
        throttle.warn(|| unreachable!("suppressed: the message is not built"));
        throttle.warn(|| unreachable!("suppressed: the message is not built"));
        assert_eq!(throttle.suppressed, 2);
        throttle.tick(); // within the period: nothing yet
        assert_eq!(throttle.suppressed, 2);
        throttle.finish();
        assert_eq!(throttle.suppressed, 0);
    }
}
