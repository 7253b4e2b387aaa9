//! Test support: a real broker with a fresh queue per test, daemons spawned as real processes
//! with a temporary config, and (for flag tests) a fake LaunchDarkly service.
#![allow(dead_code)]

pub mod accept;
pub mod broker;
pub mod capture;
pub mod connect_proxy;
pub mod daemon;
pub mod fake_ld;
pub mod http_server;
pub mod nodes;
pub mod raw_amqp;
