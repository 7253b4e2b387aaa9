//! The seam between the worker's plumbing and the work itself.
//!
//! The worker decides whether and when a job runs; a [`Handler`] does it. The only handler
//! today is the seed's simulated job, which sleeps for the job's work time ("one job takes one
//! second"); real handlers plug in here without touching shedding or acking.

use crate::job::JobMeta;
use std::fmt;
use std::time::Duration;

/// Why a handler gave up on a job; the job ends `failed`.
#[derive(Debug)]
pub struct HandlerError(pub String);

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HandlerError {}

/// Does one job's work. Called on a pool thread; may block for as long as the job takes.
pub trait Handler: Send + Sync {
    fn handle(&self, meta: &JobMeta, body: &[u8]) -> Result<(), HandlerError>;
}

/// The seed's imaginary job: works (sleeps) for the job's `work_ms`.
#[derive(Clone, Copy, Debug, Default)]
pub struct SimulatedHandler;

impl Handler for SimulatedHandler {
    fn handle(&self, meta: &JobMeta, _body: &[u8]) -> Result<(), HandlerError> {
        if meta.work_ms > 0 {
            std::thread::sleep(Duration::from_millis(meta.work_ms));
        }
        Ok(())
    }
}
