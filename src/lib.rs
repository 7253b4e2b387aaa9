//! flagshed keeps time-sensitive RabbitMQ work alive under overload, with feature flags as the
//! control panel.
//!
//! Two daemons share this library: `taskqueuer` publishes jobs at a rate a flag sets, and
//! `taskworker` consumes them on a thread pool, shedding (before spending any work) the share
//! of jobs the skip-rate flag asks for and every job that can no longer meet its deadline, so
//! that under overload some jobs finish on time instead of none.
//!
//! See ARCHITECTURE.md for the threads, channels and who owns what.
//!
//! # As a library
//! A worker binary whose jobs are Rust code implements [`Handler`] and hands it to
//! [`run_worker_with`], which runs the whole taskworker daemon around it (see
//! `examples/custom_handler.rs`). That, and the two daemons' entry points, is the public API.
//! Every module is private to the crate, so the compiler reports code nothing uses; the
//! `internals` feature opens them to this package's own tests, benches and fuzz targets, and
//! is not an interface to build on.
//!
//! ```no_run
//! use flagshed::{Handler, HandlerError, Job};
//!
//! struct Resize;
//!
//! impl Handler for Resize {
//!     fn handle(&self, job: &Job<'_>) -> Result<(), HandlerError> {
//!         if job.body.is_empty() {
//!             return Err(HandlerError::Failed("empty image".into()));
//!         }
//!         // ... resize job.body, giving up by job.stop_at_ms ...
//!         Ok(())
//!     }
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     flagshed::run_worker_with(std::sync::Arc::new(Resize))
//! }
//! ```

// The public API is documented item by item; with `internals`, every module is public too,
// and those are held to the style guide rather than to this lint.
#![cfg_attr(not(feature = "internals"), warn(missing_docs))]

/// Declares the crate's modules: private to the crate, or public (and hidden from the docs)
/// with the `internals` feature, which only this package's tests, benches and fuzz targets
/// turn on.
macro_rules! modules {
    ($($name:ident),* $(,)?) => {$(
        #[cfg(feature = "internals")]
        #[doc(hidden)]
        pub mod $name;
        #[cfg(not(feature = "internals"))]
        mod $name;
    )*};
}

modules!(
    ack_window,
    audit,
    backoff,
    broker,
    broker_address,
    cli,
    clock,
    config,
    daemon,
    flag_source,
    flags,
    gate,
    handler,
    histogram,
    job,
    launchdarkly,
    ledger,
    logging,
    metrics,
    notify,
    pacer,
    proxy,
    queuer,
    retries,
    service,
    shed,
    signals,
    throttle,
    worker,
);

pub use amiquip::{AmqpProperties, AmqpValue, FieldTable};
pub use clock::now_ms;
pub use daemon::{run_taskqueuer, run_taskworker, run_worker_with};
pub use handler::{Handler, HandlerError, Job};
