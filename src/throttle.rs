//! Warnings about individual jobs, at most one a second for each cause.
//!
//! A producer sending garbage, or a handler failing on every job, must not flood the journal
//! with a line per job; but each distinct cause (an exit status, a signal, an HTTP status, a
//! timeout, a connection error) deserves its own line, with a job's id, so that one noisy
//! cause does not hide the others. The first warning of a cause is logged at once; more of
//! the same cause within the period are counted, and reported in one line per cause (the
//! count and the id of one of them) with that cause's next warning, or, when none comes, once
//! the period is over ([`Throttle::tick`], called from the stats timer) or at exit
//! ([`Throttle::finish`]).
//!
//! At most [`MAX_CAUSES`] causes are tracked at once (a handler whose messages hold a
//! per-job detail would otherwise make one per job); past that, new causes share one entry.

use std::time::{Duration, Instant};

/// How often a throttled warning of one cause may be logged.
const PERIOD: Duration = Duration::from_secs(1);

/// Distinct causes tracked at once.
const MAX_CAUSES: usize = 32;

/// A quiet cause is forgotten after this long, so the list makes room for new ones.
const FORGET_AFTER: Duration = Duration::from_secs(60);

/// What causes beyond [`MAX_CAUSES`] are counted under.
const OTHER_CAUSES: &str = "(other causes)";

/// One kind of per-job warning and its rate limit, per cause.
#[derive(Debug)]
pub struct Throttle {
    /// What is warned about, for the line that counts suppressed warnings.
    what: &'static str,
    causes: Vec<Cause>,
}

/// One cause's window.
#[derive(Debug)]
struct Cause {
    key: String,
    /// When a warning of this cause was last logged.
    last: Instant,
    suppressed: u64,
    /// The job id of one suppressed warning.
    example: Option<String>,
}

impl Cause {
    /// Logs the suppressed count, if any.
    fn report(&mut self, what: &str) {
        let more = std::mem::take(&mut self.suppressed);
        if more > 0 {
            let example = self.example.take().unwrap_or_default();
            log::warn!(
                "{more} more {what} ({}) were not logged one by one, among them job {example:?}",
                self.key
            );
        }
    }
}

impl Throttle {
    /// A throttle for warnings about `what` (e.g. "malformed jobs").
    pub fn new(what: &'static str) -> Throttle {
        Throttle {
            what,
            causes: Vec::new(),
        }
    }

    /// Logs the count of suppressed warnings of each cause whose period is over, and forgets
    /// causes that have been quiet for long.
    pub fn tick(&mut self) {
        let what = self.what;
        for cause in &mut self.causes {
            if cause.last.elapsed() >= PERIOD {
                cause.report(what);
            }
        }
        self.causes
            .retain(|c| c.suppressed > 0 || c.last.elapsed() < FORGET_AFTER);
    }

    /// Logs the count of suppressed warnings of every cause, if any (at exit).
    pub fn finish(&mut self) {
        let what = self.what;
        for cause in &mut self.causes {
            cause.report(what);
        }
    }

    /// Logs `message` as a warning unless one of the same `cause` was logged within the last
    /// second, in which case it is only counted, with `job_id` kept as an example. `message`
    /// is built only when it will be logged.
    pub fn warn_about(&mut self, cause: &str, job_id: &str, message: impl FnOnce() -> String) {
        let now = Instant::now();
        let index = match self.causes.iter().position(|c| c.key == cause) {
            Some(index) => index,
            None => {
                let key = if self.causes.len() < MAX_CAUSES {
                    cause
                } else {
                    OTHER_CAUSES
                };
                match self.causes.iter().position(|c| c.key == key) {
                    Some(index) => index,
                    None => {
                        // New: its first warning is logged below.
                        self.causes.push(Cause {
                            key: key.to_owned(),
                            last: now.checked_sub(PERIOD).unwrap_or(now),
                            suppressed: 0,
                            example: None,
                        });
                        self.causes.len() - 1
                    }
                }
            }
        };
        let entry = &mut self.causes[index];
        if now.duration_since(entry.last) < PERIOD {
            entry.suppressed += 1;
            if entry.example.is_none() {
                entry.example = Some(job_id.to_owned());
            }
            return;
        }
        entry.last = now;
        entry.example = None;
        match std::mem::take(&mut entry.suppressed) {
            0 => log::warn!("{}", message()),
            more => log::warn!(
                "{} (and {more} more of this cause since its last warning)",
                message()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cause_has_its_own_window_and_count() {
        let mut throttle = Throttle::new("failed jobs");
        throttle.warn_about("exit status 2", "a", || "first exit 2".into());
        throttle.warn_about("killed by signal 9", "b", || "first SIGKILL".into());
        for id in ["c", "d"] {
            throttle.warn_about("exit status 2", id, || {
                unreachable!("suppressed: the message is not built")
            });
        }
        throttle.warn_about("killed by signal 9", "e", || unreachable!("suppressed"));
        let count = |t: &Throttle, key: &str| {
            t.causes
                .iter()
                .find(|c| c.key == key)
                .map(|c| (c.suppressed, c.example.clone()))
        };
        assert_eq!(count(&throttle, "exit status 2"), Some((2, Some("c".into()))));
        assert_eq!(count(&throttle, "killed by signal 9"), Some((1, Some("e".into()))));
        throttle.tick(); // within the period: nothing yet
        assert_eq!(count(&throttle, "exit status 2").map(|c| c.0), Some(2));
        throttle.finish();
        assert_eq!(count(&throttle, "exit status 2"), Some((0, None)));
        assert_eq!(count(&throttle, "killed by signal 9"), Some((0, None)));
    }

    #[test]
    fn causes_beyond_the_bound_share_one_entry() {
        let mut throttle = Throttle::new("failed jobs");
        for n in 0..MAX_CAUSES + 10 {
            throttle.warn_about(&format!("panicked: {n}"), "j", || format!("{n}"));
        }
        assert_eq!(throttle.causes.len(), MAX_CAUSES + 1);
        assert_eq!(
            throttle.causes.last().map(|c| (c.key.as_str(), c.suppressed)),
            Some((OTHER_CAUSES, 9))
        );
    }
}
