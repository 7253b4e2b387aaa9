//! The seam between the worker's plumbing and the work itself.
//!
//! The worker decides whether and when a job runs; a [`Handler`] does it, on a pool thread,
//! and says how it ended. Three handlers ship: [`SimulatedHandler`] (the seed's imaginary job,
//! which sleeps), [`ExecHandler`] (a program per job) and [`HttpHandler`] (a POST per job).
//! A Rust program can bring its own: implement [`Handler`] and call
//! [`crate::run_worker_with`], which runs the whole taskworker daemon around it.
//!
//! A handler sees a job through [`Job`]: its id, type, headers and properties, body, deadline
//! and the moment it must stop ([`Job::stop_at_ms`]). The worker cannot stop a thread, so
//! honouring `stop_at_ms` is the handler's part of deadline enforcement: the shipped handlers
//! kill the child process group or abandon the request there and return
//! [`HandlerError::TimedOut`].
//!
//! The crate's own documentation has an example of a handler of one's own.

mod exec;
mod http;
mod meta_json;
mod output;
mod simulated;

pub mod estimate;

pub use exec::ExecHandler;
pub use http::HttpHandler;
pub use meta_json::job_json;
pub use simulated::SimulatedHandler;

use amiquip::{AmqpProperties, FieldTable};
use std::fmt;
use std::time::Duration;

/// Why a job did not finish: the worker maps each kind to an outcome and a broker disposition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandlerError {
    /// The job cannot succeed (bad input, a downstream refusal, a crash): it ends `failed` and
    /// is rejected, so a dead-letter exchange can keep it.
    Failed(String),
    /// Not now (exit status 75, HTTP 429 or 503): the job goes back to the queue to be tried
    /// again, up to `handler.max_retries` times, then ends `failed`.
    Retry(String),
    /// Still running when it had to stop ([`Job::stop_at_ms`]): it ends `timed_out`.
    TimedOut,
    /// The job did not run because what it needs cannot be reached (an http service refusing
    /// or resetting connections before any response, an exec program that cannot be
    /// started): every job would fail the same way. With `handler.when_unavailable = "hold"`
    /// the job goes back to the queue and the worker takes no new jobs until
    /// [`Handler::probe`] succeeds; with `"fail"` the job ends `failed`.
    Unavailable(String),
}

impl HandlerError {
    /// The kind of failure, for grouping warnings: the reason, or `"timed out"`.
    pub fn cause(&self) -> &str {
        match self {
            HandlerError::Failed(why)
            | HandlerError::Retry(why)
            | HandlerError::Unavailable(why) => why,
            HandlerError::TimedOut => "timed out",
        }
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandlerError::Failed(why) => f.write_str(why),
            HandlerError::Retry(why) => write!(f, "asked to retry: {why}"),
            HandlerError::TimedOut => f.write_str("stopped at its deadline"),
            HandlerError::Unavailable(why) => write!(f, "unavailable: {why}"),
        }
    }
}

impl std::error::Error for HandlerError {}

/// Does one job's work. Called on a pool thread, one job at a time per thread, and may block
/// for as long as the job takes; `Sync` because every pool thread shares one handler.
pub trait Handler: Send + Sync {
    /// Runs `job`. Return by `job.stop_at_ms` (with [`HandlerError::TimedOut`] if the work is
    /// not finished): a job that runs on past it holds a pool thread the queue needs.
    fn handle(&self, job: &Job<'_>) -> Result<(), HandlerError>;

    /// Called when the worker stops without waiting for the jobs still running (a second
    /// SIGTERM, or the drain's grace period over): end what they started, so nothing outlives
    /// the daemon. Their deliveries go back to the queue.
    fn abort_running(&self) {}

    /// Whether what the handler needs answers again, after a job returned
    /// [`HandlerError::Unavailable`]: `Ok` lets the worker take jobs again. Called on a
    /// thread of its own, with backoff, while intake is held, never alongside a job's retry
    /// storm; it should be cheap and bounded in time (a connection attempt, a file check),
    /// and must not run a job. The default says yes at once, so a handler that never returns
    /// `Unavailable` need not implement it.
    fn probe(&self) -> Result<(), HandlerError> {
        Ok(())
    }
}

/// A job as its handler sees it. Borrowed from the worker's copy of the delivery, so that
/// handing it over costs nothing.
#[derive(Clone, Copy, Debug)]
pub struct Job<'a> {
    /// The AMQP `message_id`, if the producer set one.
    pub id: Option<&'a str>,
    /// The AMQP `type` property, `""` if none: what the worker learns work times by.
    pub job_type: &'a str,
    /// All AMQP properties, headers included, as published.
    pub properties: &'a AmqpProperties,
    /// The message body, as published.
    pub body: &'a [u8],
    /// Enqueue time, Unix epoch milliseconds (`x-created-ms`, or receipt).
    pub created_ms: u64,
    /// The job's deadline, Unix epoch milliseconds; `None`: it can wait forever.
    pub deadline_ms: Option<u64>,
    /// When the handler must give up (the deadline, when `handler.enforce_deadline` is on);
    /// `None`: run to the end.
    pub stop_at_ms: Option<u64>,
    /// The work the producer declared (`x-work-ms`), else `worker.default_work_ms`: what the
    /// simulated handler spends.
    pub work_ms: u64,
    /// Whether the broker delivered this job before (to this or another worker).
    pub redelivered: bool,
}

impl Job<'_> {
    /// The job's headers, if it has any.
    pub fn headers(&self) -> Option<&FieldTable> {
        self.properties.headers().as_ref()
    }

    /// Time until the deadline as of `now_ms` (zero once it has passed); `None` without one.
    pub fn time_left_ms(&self, now_ms: u64) -> Option<u64> {
        self.deadline_ms.map(|d| d.saturating_sub(now_ms))
    }

    /// Time until the handler must stop as of `now_ms`; `None`: no limit.
    pub fn time_to_stop(&self, now_ms: u64) -> Option<Duration> {
        self.stop_at_ms
            .map(|at| Duration::from_millis(at.saturating_sub(now_ms)))
    }

    /// The id for log lines: the message id, or a placeholder saying there is none.
    pub fn display_id(&self) -> &str {
        self.id.unwrap_or("(no message_id)")
    }
}
