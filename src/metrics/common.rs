//! What both daemons expose alike: the broker connection, the flags, the build.

use super::text::{Kind, Text};
use crate::flags::{FlagValues, Origin, SourceState};
use std::sync::{Mutex, PoisonError};

/// Whether the daemon is connected, and to which node; set by the owner thread when a
/// connection starts or is lost, read at scrape time.
#[derive(Debug, Default)]
pub struct BrokerGauge {
    state: Mutex<BrokerState>,
}

#[derive(Debug, Default)]
struct BrokerState {
    connected: bool,
    /// The node of the live connection, or of the last one: the series keeps its `node` label
    /// while the broker is away, so an alert on it has something to say. Empty before the
    /// first connection.
    node: String,
}

impl BrokerGauge {
    /// Connected to `node` (`host:port`), or (`None`) not connected.
    pub fn set(&self, node: Option<&str>) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.connected = node.is_some();
        if let Some(node) = node {
            node.clone_into(&mut state.node);
        }
    }

    pub fn render(&self, text: &mut Text) {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        text.family(
            "flagshed_broker_connected",
            Kind::Gauge,
            "1 while connected to RabbitMQ, else 0; node is the node of the live (or last) connection.",
        );
        text.int(
            "flagshed_broker_connected",
            &[("node", &state.node)],
            u64::from(state.connected),
        );
    }
}

/// The flag gauges: the values being served (the skip rate only where it is used), how old
/// they are, where they came from and the state of the remote source.
pub fn render_flags(text: &mut Text, values: &FlagValues, skip_rate: bool) {
    if skip_rate {
        text.family(
            "flagshed_skip_rate_ratio",
            Kind::Gauge,
            "The skip-rate flag: the share of jobs the worker drops unopened, from 0 to 1.",
        );
        text.float("flagshed_skip_rate_ratio", &[], values.skip_rate() / 100.0);
    }
    text.family(
        "flagshed_task_rate_jobs_per_second",
        Kind::Gauge,
        "The task-rate flag: the jobs per second taskqueuer publishes.",
    );
    text.float(
        "flagshed_task_rate_jobs_per_second",
        &[],
        values.rate_per_sec(),
    );
    text.family(
        "flagshed_flags_age_seconds",
        Kind::Gauge,
        "How stale the flag values may be: 0 while LaunchDarkly is connected and healthy, else seconds since they were last known current.",
    );
    text.float(
        "flagshed_flags_age_seconds",
        &[],
        values.age_ms() as f64 / 1_000.0,
    );
    let origin = values.origin();
    text.family(
        "flagshed_flags_origin",
        Kind::Gauge,
        "1 for where the flag values being served came from (fallback, cached, file, live), else 0.",
    );
    for each in [Origin::Fallback, Origin::Cached, Origin::File, Origin::Live] {
        text.int(
            "flagshed_flags_origin",
            &[("origin", each.as_str())],
            u64::from(each == origin),
        );
    }
    let state = values.state();
    text.family(
        "flagshed_flag_source_state",
        Kind::Gauge,
        "1 for the state of the LaunchDarkly data source (none, initializing, valid, interrupted, off), else 0.",
    );
    for each in [
        SourceState::None,
        SourceState::Initializing,
        SourceState::Valid,
        SourceState::Interrupted,
        SourceState::Off,
    ] {
        text.int(
            "flagshed_flag_source_state",
            &[("state", each.as_str())],
            u64::from(each == state),
        );
    }
}

/// `flagshed_build_info`: always 1, with the version and the role as labels.
pub fn render_build_info(text: &mut Text, role: &str) {
    text.family(
        "flagshed_build_info",
        Kind::Gauge,
        "Always 1; the labels say which flagshed daemon and version this is.",
    );
    text.int(
        "flagshed_build_info",
        &[("version", env!("CARGO_PKG_VERSION")), ("role", role)],
        1,
    );
}
