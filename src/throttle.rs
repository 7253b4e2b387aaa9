//! Warnings about individual jobs, at most one a second.
//!
//! A producer sending garbage, or a handler failing on every job, must not flood the journal
//! with a line per job; but the first occurrence deserves its own line, with the job's id and
//! the reason. The lines skipped in between are counted in the next one.

use std::time::{Duration, Instant};

/// How often a throttled warning may be logged.
const PERIOD: Duration = Duration::from_secs(1);

/// One kind of per-job warning and its rate limit.
#[derive(Debug, Default)]
pub struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
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
