//! flagshed keeps time-sensitive RabbitMQ work alive under overload, with feature flags as the
//! control panel.
//!
//! Two daemons share this library: `taskqueuer` publishes jobs at a rate a flag sets, and
//! `taskworker` consumes them on a thread pool, shedding (before spending any work) the share
//! of jobs the skip-rate flag asks for and every job that can no longer meet its deadline, so
//! that under overload some jobs finish on time instead of none.
//!
//! See ARCHITECTURE.md for the threads, channels and who owns what.

pub mod ack_window;
pub mod audit;
pub mod backoff;
pub mod broker;
pub mod broker_address;
pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod flag_source;
pub mod flags;
pub mod gate;
pub mod handler;
pub mod histogram;
pub mod job;
pub mod launchdarkly;
pub mod ledger;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod proxy;
pub mod queuer;
pub mod retries;
pub mod service;
pub mod shed;
pub mod signals;
pub mod throttle;
pub mod worker;
