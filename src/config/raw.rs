//! The file as written: every key optional, so that defaults live in one place
//! ([`Config::from_raw`](super::Config::from_raw)), and unknown keys refused, so that a typo is
//! an error rather than a silent default.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The file as written: every key optional so that defaults live in one place
/// ([`Config::from_raw`]), unknown keys refused so that a typo is an error, not a silent default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub(super) broker: RawBroker,
    #[serde(default)]
    pub(super) worker: RawWorker,
    #[serde(default)]
    pub(super) handler: RawHandler,
    #[serde(default)]
    pub(super) queuer: RawQueuer,
    #[serde(default)]
    pub(super) flags: RawFlags,
    #[serde(default)]
    pub(super) launchdarkly: RawLaunchDarkly,
    #[serde(default)]
    pub(super) log: RawLog,
    #[serde(default)]
    pub(super) metrics: RawMetrics,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBroker {
    pub(super) url: Option<String>,
    pub(super) urls: Option<Vec<String>>,
    pub(super) tls_ca_file: Option<PathBuf>,
    pub(super) tls_cert_file: Option<PathBuf>,
    pub(super) tls_key_file: Option<PathBuf>,
    pub(super) queue: Option<String>,
    pub(super) durable: Option<bool>,
    pub(super) queue_type: Option<String>,
    pub(super) dead_letter_exchange: Option<String>,
    pub(super) max_length: Option<u64>,
    pub(super) overflow: Option<String>,
    pub(super) delivery_limit: Option<u64>,
    pub(super) heartbeat_secs: Option<u16>,
    pub(super) connect_timeout_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWorker {
    pub(super) concurrency: Option<u64>,
    pub(super) prefetch: Option<u64>,
    pub(super) default_work_ms: Option<u64>,
    pub(super) default_ttl_ms: Option<u64>,
    pub(super) drop_doomed: Option<bool>,
    pub(super) shed_action: Option<String>,
    pub(super) drain_grace_ms: Option<u64>,
    pub(super) ledger_file: Option<PathBuf>,
    pub(super) estimate_quantile: Option<f64>,
    pub(super) estimate_half_life_jobs: Option<u64>,
    pub(super) estimate_half_life_ms: Option<u64>,
    pub(super) estimate_min_jobs: Option<u64>,
    pub(super) estimate_probe_interval_ms: Option<u64>,
    pub(super) shed_objective: Option<String>,
    pub(super) max_job_types: Option<u64>,
    pub(super) max_concurrency: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHandler {
    pub(super) kind: Option<String>,
    pub(super) command: Option<Vec<String>>,
    pub(super) env: Option<BTreeMap<String, String>>,
    pub(super) url: Option<String>,
    pub(super) enforce_deadline: Option<bool>,
    pub(super) kill_grace_ms: Option<u64>,
    pub(super) output_limit_bytes: Option<u64>,
    pub(super) output_limit_lines: Option<u64>,
    pub(super) max_retries: Option<u64>,
    pub(super) retry_delay_ms: Option<u64>,
    pub(super) connect_timeout_ms: Option<u64>,
    pub(super) when_unavailable: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawQueuer {
    pub(super) ttl_ms: Option<u64>,
    pub(super) work_ms: Option<u64>,
    pub(super) persistent: Option<bool>,
    pub(super) confirms: Option<bool>,
    pub(super) confirm_window: Option<u64>,
    pub(super) payload_bytes: Option<u64>,
    pub(super) max_jobs: Option<u64>,
    pub(super) drain_grace_ms: Option<u64>,
    pub(super) ledger_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFlags {
    pub(super) file: Option<PathBuf>,
    pub(super) file_check_ms: Option<u64>,
    pub(super) skip_rate_key: Option<String>,
    pub(super) rate_key: Option<String>,
    pub(super) skip_rate_fallback: Option<f64>,
    pub(super) rate_fallback: Option<f64>,
    pub(super) context_kind: Option<String>,
    pub(super) context_key: Option<String>,
    pub(super) pause_key: Option<String>,
    pub(super) concurrency_key: Option<String>,
    pub(super) deadline_aware_key: Option<String>,
    pub(super) shed_objective_key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLaunchDarkly {
    pub(super) sdk_key: Option<String>,
    pub(super) stream: Option<bool>,
    pub(super) stream_uri: Option<String>,
    pub(super) base_uri: Option<String>,
    pub(super) poll_interval_secs: Option<u64>,
    pub(super) startup_wait_ms: Option<u64>,
    pub(super) state_file: Option<PathBuf>,
    pub(super) events: Option<bool>,
    pub(super) events_uri: Option<String>,
    pub(super) events_flush_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub(super) level: Option<String>,
    pub(super) stats_interval_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    pub(super) worker_listen: Option<String>,
    pub(super) queuer_listen: Option<String>,
}
