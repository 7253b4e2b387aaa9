//! The seed's imaginary job: it "works" by sleeping for the job's declared work time, so the
//! demo and the overload experiment need no real program. It honours the stop time like a real
//! handler would, so deadline enforcement can be shown with it too.

use super::{Handler, HandlerError, Job};
use crate::clock::now_ms;
use std::time::Duration;

/// Sleeps for `x-work-ms` (or `worker.default_work_ms`), or until the stop time if that comes
/// first.
#[derive(Clone, Copy, Debug, Default)]
pub struct SimulatedHandler;

impl Handler for SimulatedHandler {
    fn handle(&self, job: &Job<'_>) -> Result<(), HandlerError> {
        let work = Duration::from_millis(job.work_ms);
        match job.time_to_stop(now_ms()) {
            Some(left) if left < work => {
                std::thread::sleep(left);
                Err(HandlerError::TimedOut)
            }
            _ => {
                if !work.is_zero() {
                    std::thread::sleep(work);
                }
                Ok(())
            }
        }
    }
}
