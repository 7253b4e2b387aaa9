//! The configuration file: raw TOML in, a validated [`Config`] out.
//!
//! Loading has two stages. [`RawConfig`] mirrors the file (every key optional, unknown keys
//! refused); [`Config::from_raw`] checks every value and fills in defaults. Everything past
//! loading trusts `Config`, and a reload builds a whole new one before anything changes, so a
//! bad edit can never leave a daemon half-reconfigured.

use crate::broker_address::BrokerAddress;
pub use crate::handler::estimate::EstimateSettings;
use crate::proxy::{ProxyEnv, ProxyError, ProxyRules};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the daemons look for their configuration unless `--config` says otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/flagshed/flagshed.toml";

/// The flag file installed beside the config (`flags.file`).
pub const DEFAULT_FLAG_FILE: &str = "/etc/flagshed/flags.json";

/// Where the last good LaunchDarkly data is kept (`launchdarkly.state_file`): systemd's
/// `StateDirectory=flagshed`.
pub const DEFAULT_STATE_FILE: &str = "/var/lib/flagshed/flags-state.json";

/// Why a configuration could not be loaded; always names the file and, where there is one,
/// the key, so an operator can fix it without reading code.
#[derive(Debug)]
pub enum ConfigError {
    /// The file could not be read at all.
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid UTF-8 text.
    NotUtf8 { path: PathBuf },
    /// The TOML did not parse, or a key is unknown or of the wrong type. The message never
    /// quotes the file's text (a line may hold a password): it gives the line and column.
    Parse {
        path: PathBuf,
        key: String,
        message: String,
    },
    /// A key parsed but its value is not acceptable.
    Invalid {
        path: PathBuf,
        key: &'static str,
        message: String,
    },
    /// A proxy variable in the environment (`https_proxy`, ...) is unusable while LaunchDarkly
    /// is used; the message names the variable, never its value.
    Proxy(ProxyError),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Read { path, source } => {
                write!(f, "{}: cannot read config file: {source}", path.display())
            }
            ConfigError::NotUtf8 { path } => {
                write!(f, "{}: config file is not valid UTF-8 text", path.display())
            }
            ConfigError::Parse { path, key, message } if key.is_empty() || key == "." => {
                write!(f, "{}: {message}", path.display())
            }
            ConfigError::Parse { path, key, message } => {
                write!(f, "{}: key `{key}`: {message}", path.display())
            }
            ConfigError::Invalid { path, key, message } => {
                write!(f, "{}: key `{key}`: {message}", path.display())
            }
            ConfigError::Proxy(error) => write!(f, "{error}"),
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConfigError::Read { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// The file as written: every key optional so that defaults live in one place
/// ([`Config::from_raw`]), unknown keys refused so that a typo is an error, not a silent default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    broker: RawBroker,
    #[serde(default)]
    worker: RawWorker,
    #[serde(default)]
    handler: RawHandler,
    #[serde(default)]
    queuer: RawQueuer,
    #[serde(default)]
    flags: RawFlags,
    #[serde(default)]
    launchdarkly: RawLaunchDarkly,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    metrics: RawMetrics,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBroker {
    url: Option<String>,
    urls: Option<Vec<String>>,
    tls_ca_file: Option<PathBuf>,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
    queue: Option<String>,
    durable: Option<bool>,
    queue_type: Option<String>,
    dead_letter_exchange: Option<String>,
    max_length: Option<u64>,
    overflow: Option<String>,
    delivery_limit: Option<u64>,
    heartbeat_secs: Option<u16>,
    connect_timeout_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorker {
    concurrency: Option<u64>,
    prefetch: Option<u64>,
    default_work_ms: Option<u64>,
    default_ttl_ms: Option<u64>,
    drop_doomed: Option<bool>,
    shed_action: Option<String>,
    drain_grace_ms: Option<u64>,
    ledger_file: Option<PathBuf>,
    estimate_quantile: Option<f64>,
    estimate_half_life_jobs: Option<u64>,
    estimate_min_jobs: Option<u64>,
    max_job_types: Option<u64>,
    max_concurrency: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHandler {
    kind: Option<String>,
    command: Option<Vec<String>>,
    env: Option<BTreeMap<String, String>>,
    url: Option<String>,
    enforce_deadline: Option<bool>,
    kill_grace_ms: Option<u64>,
    output_limit_bytes: Option<u64>,
    max_retries: Option<u64>,
    retry_delay_ms: Option<u64>,
    connect_timeout_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQueuer {
    ttl_ms: Option<u64>,
    work_ms: Option<u64>,
    persistent: Option<bool>,
    confirms: Option<bool>,
    confirm_window: Option<u64>,
    payload_bytes: Option<u64>,
    max_jobs: Option<u64>,
    drain_grace_ms: Option<u64>,
    ledger_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlags {
    file: Option<PathBuf>,
    file_check_ms: Option<u64>,
    skip_rate_key: Option<String>,
    rate_key: Option<String>,
    skip_rate_fallback: Option<f64>,
    rate_fallback: Option<f64>,
    context_kind: Option<String>,
    context_key: Option<String>,
    pause_key: Option<String>,
    concurrency_key: Option<String>,
    deadline_aware_key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLaunchDarkly {
    sdk_key: Option<String>,
    stream: Option<bool>,
    stream_uri: Option<String>,
    base_uri: Option<String>,
    poll_interval_secs: Option<u64>,
    startup_wait_ms: Option<u64>,
    state_file: Option<PathBuf>,
    events: Option<bool>,
    events_uri: Option<String>,
    events_flush_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
    stats_interval_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    worker_listen: Option<String>,
    queuer_listen: Option<String>,
}

/// The validated configuration shared by both daemons; each reads the sections it needs.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The file this came from, kept for reloads and messages.
    pub path: PathBuf,
    pub broker: BrokerConfig,
    pub worker: WorkerConfig,
    pub handler: HandlerConfig,
    pub queuer: QueuerConfig,
    pub flags: FlagsConfig,
    pub launchdarkly: LaunchDarklyConfig,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    /// What the process's surroundings gave at startup; a reload uses the same.
    pub surroundings: Surroundings,
}

impl Config {
    /// Every secret the config holds (the SDK key, broker passwords, a handler URL's
    /// password), for the logger to scrub from every line.
    pub fn secrets(&self) -> Vec<String> {
        let mut secrets: Vec<String> = self
            .broker
            .addresses
            .iter()
            .map(|a| a.password().to_owned())
            .collect();
        secrets.extend(self.launchdarkly.sdk_key.clone());
        if let Some(proxy) = &self.launchdarkly.proxy {
            secrets.extend(proxy.secrets());
        }
        if let HandlerKind::Http { url, .. } = &self.handler.kind {
            if let Some(password) = url::Url::parse(url)
                .ok()
                .and_then(|u| u.password().map(str::to_owned))
            {
                secrets.push(password);
            }
        }
        secrets
    }
}

/// What a daemon takes from outside its config file, read once at startup
/// ([`Surroundings::read`]): the SDK key from `LAUNCHDARKLY_SDK_KEY` or the `sdk-key`
/// credential, the broker password from the `broker-password` credential, the host name, and
/// the proxy variables for LaunchDarkly's connections.
/// Parsing a config never reads the environment itself, so a test's result does not depend
/// on the shell that runs it.
#[derive(Clone, Default, PartialEq)]
pub struct Surroundings {
    pub sdk_key: Option<String>,
    pub broker_password: Option<String>,
    /// The default `flags.context_key`; empty reads as `localhost`.
    pub host_name: String,
    /// `https_proxy`, `no_proxy` and the rest, unchecked (see [`crate::proxy`]).
    pub proxy: ProxyEnv,
}

impl fmt::Debug for Surroundings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Surroundings")
            .field("sdk_key", &self.sdk_key.as_ref().map(|_| "<redacted>"))
            .field(
                "broker_password",
                &self.broker_password.as_ref().map(|_| "<redacted>"),
            )
            .field("host_name", &self.host_name)
            .field("proxy", &self.proxy)
            .finish()
    }
}

impl Surroundings {
    /// Reads the environment, the credentials directory and the host name: the one place
    /// a daemon does so.
    pub fn read() -> Surroundings {
        let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        let credential = |name: &str| {
            let dir = credentials.as_ref()?;
            let text = std::fs::read_to_string(dir.join(name)).ok()?;
            Some(text.trim().to_owned()).filter(|t| !t.is_empty())
        };
        let sdk_key = std::env::var(SDK_KEY_ENV)
            .ok()
            .map(|k| k.trim().to_owned())
            .filter(|k| !k.is_empty())
            .or_else(|| credential(SDK_KEY_CREDENTIAL));
        Surroundings {
            sdk_key,
            broker_password: credential(BROKER_PASSWORD_CREDENTIAL),
            host_name: host_name(),
            proxy: ProxyEnv::from_process(),
        }
    }
}

/// How to reach RabbitMQ and how the job queue is declared. Both daemons declare the queue
/// with these same arguments, so either may start first.
#[derive(Clone, Debug, PartialEq)]
pub struct BrokerConfig {
    /// The nodes to try, from `broker.url` or `broker.urls`, in the order written (the
    /// connection shuffles them). Their `Debug` and `Display` never show a password.
    pub addresses: Vec<BrokerAddress>,
    /// Certificates for `amqps://` nodes.
    pub tls: TlsFiles,
    pub queue: String,
    pub durable: bool,
    pub queue_type: QueueType,
    /// Where RabbitMQ sends rejected and expired jobs; `None` discards them.
    pub dead_letter_exchange: Option<String>,
    /// Queue length limit; `None` is unbounded.
    pub max_length: Option<u64>,
    pub overflow: Overflow,
    /// Returns to the queue after which a quorum queue drops (or dead-letters) a job instead
    /// of redelivering it: what stops a job that crashes its worker from looping forever.
    /// `None` is no limit.
    pub delivery_limit: Option<u32>,
    pub heartbeat_secs: u16,
    pub connect_timeout: Duration,
}

/// Files for TLS connections, read at each connect so that renewed certificates are picked up
/// without a restart.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TlsFiles {
    /// A PEM CA certificate (bundle) trusted besides the system's roots.
    pub ca_file: Option<PathBuf>,
    /// A PEM client certificate (chain) and its PKCS#8 PEM key, for brokers that ask for one.
    pub client: Option<(PathBuf, PathBuf)>,
}

/// RabbitMQ's `x-queue-type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueType {
    Classic,
    Quorum,
}

/// RabbitMQ's `x-overflow`: what a full queue does with a new job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overflow {
    DropHead,
    RejectPublish,
    RejectPublishDlx,
}

impl Overflow {
    /// The value RabbitMQ expects in `x-overflow`.
    pub fn as_amqp(self) -> &'static str {
        match self {
            Overflow::DropHead => "drop-head",
            Overflow::RejectPublish => "reject-publish",
            Overflow::RejectPublishDlx => "reject-publish-dlx",
        }
    }
}

/// What the worker does with a job it sheds (skipped, expired, doomed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShedAction {
    /// Reject without requeue, so a dead-letter exchange can keep the job.
    Reject,
    /// Acknowledge: the job is gone, counted only in the ledger.
    Ack,
}

/// The worker's pool and its shedding policy.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerConfig {
    pub concurrency: usize,
    /// Unacknowledged deliveries the broker may hand over at once.
    pub prefetch: u16,
    /// Work assumed for a job without `x-work-ms`: the simulated handler works this long, and
    /// the doomed check budgets this much.
    pub default_work_ms: u64,
    /// Time-to-live for a job without `x-deadline-ms`, counted from `x-created-ms` (or from
    /// receipt); `None`: such a job has no deadline.
    pub default_ttl_ms: Option<u64>,
    /// Drop jobs that can no longer finish before their deadline. Off reproduces the original
    /// design, where every job waits its turn.
    pub drop_doomed: bool,
    pub shed_action: ShedAction,
    /// How long a drain waits for running jobs before it gives up on them.
    pub drain_grace: Duration,
    /// Audit trail: one line per settled job, written before the ack.
    pub ledger_file: Option<PathBuf>,
    /// How the work time of jobs without `x-work-ms` is learned.
    pub estimate: EstimateSettings,
    /// Job types that get their own estimate and skip rate; the rest share one.
    pub max_job_types: usize,
    /// The most pool threads the `concurrency` lever flag may ask for; the pool has this many
    /// threads and runs `concurrency` (or the flag's number) of them at once.
    pub max_concurrency: usize,
}

/// What runs a job, and the limits it runs under.
#[derive(Clone, Debug, PartialEq)]
pub struct HandlerConfig {
    pub kind: HandlerKind,
    /// Stop a job that is still running at its deadline (`timed_out`); off, it runs to the
    /// end and ends `late`.
    pub enforce_deadline: bool,
    /// Between SIGTERM and SIGKILL for an exec job stopped at its deadline.
    pub kill_grace: Duration,
    /// Bytes of an exec job's stdout and stderr logged per job.
    pub output_limit_bytes: usize,
    /// Times a job may ask to be retried before it ends `failed`.
    pub max_retries: u32,
    /// How long a job that asked to be retried is held before it goes back to the queue.
    pub retry_delay: Duration,
}

/// Which handler, with what it needs.
#[derive(Clone, PartialEq)]
pub enum HandlerKind {
    /// The seed's imaginary job: sleeps for its work time.
    Simulated,
    /// A program per job.
    Exec {
        /// Resolved to an absolute path when the config is loaded.
        program: PathBuf,
        args: Vec<String>,
        /// The child's whole environment besides the job's facts: `PATH`, `LANG` and
        /// `handler.env`.
        env: Vec<(String, String)>,
    },
    /// A POST per job.
    Http {
        url: String,
        connect_timeout: Duration,
    },
}

impl fmt::Debug for HandlerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandlerKind::Simulated => f.write_str("Simulated"),
            HandlerKind::Exec { program, args, env } => f
                .debug_struct("Exec")
                .field("program", program)
                .field("args", args)
                .field("env", &env.iter().map(|(k, _)| k).collect::<Vec<_>>())
                .finish(),
            HandlerKind::Http {
                url,
                connect_timeout,
            } => f
                .debug_struct("Http")
                .field("url", &redact_userinfo(url))
                .field("connect_timeout", connect_timeout)
                .finish(),
        }
    }
}

impl HandlerKind {
    /// The word used in `handler.kind` and in logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            HandlerKind::Simulated => "simulated",
            HandlerKind::Exec { .. } => "exec",
            HandlerKind::Http { .. } => "http",
        }
    }
}

/// A URL with any password replaced, for logs and debug output.
pub fn redact_userinfo(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("redacted"));
            parsed.to_string()
        }
        Ok(_) => url.to_owned(),
        Err(_) => "(unparsable URL)".to_owned(),
    }
}

/// The handler's `PATH` unless `handler.env` sets one.
pub const HANDLER_DEFAULT_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The queuer's job shape and publishing discipline.
#[derive(Clone, Debug, PartialEq)]
pub struct QueuerConfig {
    /// Deadline of each job, counted from its creation; also its AMQP `expiration`.
    pub ttl_ms: u64,
    /// `x-work-ms` written on each job.
    pub work_ms: u64,
    pub persistent: bool,
    pub confirms: bool,
    /// Publishes that may await their confirm at once.
    pub confirm_window: usize,
    pub payload_bytes: usize,
    /// Stop after this many published jobs; `None` runs until stopped.
    pub max_jobs: Option<u64>,
    /// How long a stop waits for outstanding confirms.
    pub drain_grace: Duration,
    /// Audit trail: one line per confirmed job.
    pub ledger_file: Option<PathBuf>,
}

/// Which flags the daemons watch, their fallbacks, and the local flag file.
#[derive(Clone, Debug, PartialEq)]
pub struct FlagsConfig {
    /// A flag file in LaunchDarkly's file data-source format; `None` without one.
    pub file: Option<PathBuf>,
    /// How often the flag file's modification time is checked.
    pub file_check: Duration,
    pub skip_rate_key: String,
    pub rate_key: String,
    /// Skip rate in percent used until a flag source provides one.
    pub skip_rate_fallback: f64,
    /// Publish rate in jobs per second used until a flag source provides one.
    pub rate_fallback: f64,
    pub context_kind: String,
    /// The context key LaunchDarkly rules and rollouts see; defaults to the host name.
    pub context_key: String,
    /// The machine's host name: the context's `host` attribute, whatever the key is.
    pub host: String,
    /// Optional lever flags (`None`: not watched, the config's value holds): pause the
    /// worker, resize its pool, turn deadline-aware shedding on or off.
    pub pause_key: Option<String>,
    pub concurrency_key: Option<String>,
    pub deadline_aware_key: Option<String>,
}

/// LaunchDarkly's streaming and polling endpoints.
#[derive(Clone, PartialEq)]
pub struct LaunchDarklyConfig {
    /// `None`: LaunchDarkly is not used. Never printed (see the `Debug` impl).
    pub sdk_key: Option<String>,
    pub stream: bool,
    pub stream_uri: String,
    pub base_uri: String,
    pub poll_interval: Duration,
    pub startup_wait: Duration,
    pub state_file: Option<PathBuf>,
    /// Send analytics events (flag usage and contexts) as LaunchDarkly's SDKs do.
    pub events: bool,
    /// Where events are posted (`{events_uri}/bulk`); a Relay Proxy's address when one is used.
    pub events_uri: String,
    /// How often held events are sent.
    pub events_flush: Duration,
    /// The proxy for LaunchDarkly's connections, from the environment at start; `None` when
    /// no proxy variable is set or LaunchDarkly is not used. Never shows a password.
    pub proxy: Option<ProxyRules>,
}

impl fmt::Debug for LaunchDarklyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LaunchDarklyConfig")
            .field("sdk_key", &self.sdk_key.as_ref().map(|_| "<redacted>"))
            .field("stream", &self.stream)
            .field("stream_uri", &self.stream_uri)
            .field("base_uri", &self.base_uri)
            .field("poll_interval", &self.poll_interval)
            .field("startup_wait", &self.startup_wait)
            .field("state_file", &self.state_file)
            .field("events", &self.events)
            .field("events_uri", &self.events_uri)
            .field("events_flush", &self.events_flush)
            .field("proxy", &self.proxy)
            .finish()
    }
}

/// Log level and the period of the stats line.
#[derive(Clone, Debug, PartialEq)]
pub struct LogConfig {
    pub level: log::LevelFilter,
    pub stats_interval: Duration,
}

/// Where each daemon serves `GET /metrics`. Separate keys, since both daemons read this one
/// file and would otherwise ask for one port; `None` (the default) serves nothing.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MetricsConfig {
    pub worker_listen: Option<SocketAddr>,
    pub queuer_listen: Option<SocketAddr>,
}

/// LaunchDarkly enforces this floor on polling; asking for less only gets throttled.
pub const MIN_POLL_INTERVAL_SECS: u64 = 30;

impl Config {
    /// Reads and validates `path` with empty surroundings (see [`Config::parse`]). Any failure
    /// names the file and the key.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_in(path, &Surroundings::default())
    }

    /// Validates TOML text as if it had been read from `path`, with empty surroundings (no
    /// SDK key or broker password from outside the file, host name `localhost`).
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        Config::parse_in(path, text, &Surroundings::default())
    }

    /// Reads and validates `path` in the daemon's `surroundings`.
    pub fn load_in(path: &Path, surroundings: &Surroundings) -> Result<Config, ConfigError> {
        let bytes = std::fs::read(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let text = String::from_utf8(bytes).map_err(|_| ConfigError::NotUtf8 {
            path: path.to_owned(),
        })?;
        Config::parse_in(path, &text, surroundings)
    }

    /// Validates TOML text as if read from `path`, in `surroundings`. A parse error gives the
    /// line and column and never the text there, which may be a password or a key.
    pub fn parse_in(
        path: &Path,
        text: &str,
        surroundings: &Surroundings,
    ) -> Result<Config, ConfigError> {
        let at = |span: Option<std::ops::Range<usize>>| {
            span.map(|span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                format!(" (line {line}, column {column})")
            })
            .unwrap_or_default()
        };
        let deserializer = toml::Deserializer::parse(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            key: String::new(),
            message: format!(
                "{}{}",
                without_quoted_text(&one_line(e.message())),
                at(e.span())
            ),
        })?;
        let raw: RawConfig =
            serde_path_to_error::deserialize(deserializer).map_err(|e| ConfigError::Parse {
                path: path.to_owned(),
                key: e.path().to_string(),
                message: format!(
                    "{}{}",
                    without_quoted_text(&one_line(e.inner().message())),
                    at(e.inner().span())
                ),
            })?;
        Config::from_raw(path, raw, surroundings)
    }

    /// Checks every value of `raw` and fills in the defaults documented in flagshed.toml(5).
    pub fn from_raw(
        path: &Path,
        raw: RawConfig,
        surroundings: &Surroundings,
    ) -> Result<Config, ConfigError> {
        let check = Checker { path };
        let b = raw.broker;
        let addresses = check.broker_addresses(b.url, b.urls)?;
        let addresses: Vec<BrokerAddress> = addresses
            .into_iter()
            .map(|a| a.with_default_password(surroundings.broker_password.as_deref()))
            .collect();
        let tls = check.tls_files(
            addresses.iter().any(|a| a.tls),
            b.tls_ca_file,
            b.tls_cert_file,
            b.tls_key_file,
        )?;
        let broker = BrokerConfig {
            addresses,
            tls,
            queue: check.name("broker.queue", b.queue, "flagshed.jobs")?,
            durable: b.durable.unwrap_or(true),
            queue_type: match b.queue_type.as_deref() {
                None | Some("classic") => QueueType::Classic,
                Some("quorum") => QueueType::Quorum,
                Some(other) => {
                    return Err(check.invalid(
                        "broker.queue_type",
                        format!("expected \"classic\" or \"quorum\", got {other:?}"),
                    ));
                }
            },
            dead_letter_exchange: b.dead_letter_exchange.filter(|s| !s.is_empty()),
            max_length: b.max_length.filter(|&n| n > 0),
            overflow: match b.overflow.as_deref() {
                None | Some("drop-head") => Overflow::DropHead,
                Some("reject-publish") => Overflow::RejectPublish,
                Some("reject-publish-dlx") => Overflow::RejectPublishDlx,
                Some(other) => {
                    return Err(check.invalid(
                        "broker.overflow",
                        format!(
                            "expected \"drop-head\", \"reject-publish\" or \"reject-publish-dlx\", got {other:?}"
                        ),
                    ));
                }
            },
            delivery_limit: match b.delivery_limit {
                None | Some(0) => None,
                Some(n) => {
                    Some(
                        check.range("broker.delivery_limit", Some(n), 0, 1..=i32::MAX as u64)?
                            as u32,
                    )
                }
            },
            heartbeat_secs: b.heartbeat_secs.unwrap_or(30),
            connect_timeout: Duration::from_millis(check.range(
                "broker.connect_timeout_ms",
                b.connect_timeout_ms,
                5_000,
                100..=600_000,
            )?),
        };
        if broker.delivery_limit.is_some() && broker.queue_type != QueueType::Quorum {
            return Err(check.invalid(
                "broker.delivery_limit",
                "only quorum queues count deliveries; set queue_type = \"quorum\" or delivery_limit = 0".into(),
            ));
        }
        if broker.queue_type == QueueType::Quorum && !broker.durable {
            return Err(check.invalid(
                "broker.durable",
                "quorum queues are always durable; set durable = true".into(),
            ));
        }

        let w = raw.worker;
        let concurrency = check.range("worker.concurrency", w.concurrency, 4, 1..=4096)?;
        let prefetch = match w.prefetch {
            None | Some(0) => concurrency,
            Some(n) => check.range("worker.prefetch", Some(n), 0, 1..=65_535)?,
        };
        let worker = WorkerConfig {
            concurrency: concurrency as usize,
            prefetch: u16::try_from(prefetch).map_err(|_| {
                check.invalid(
                    "worker.prefetch",
                    format!("{prefetch} is more than 65535 (set prefetch explicitly)"),
                )
            })?,
            default_work_ms: check.range(
                "worker.default_work_ms",
                w.default_work_ms,
                1_000,
                0..=86_400_000,
            )?,
            default_ttl_ms: w.default_ttl_ms.filter(|&n| n > 0),
            drop_doomed: w.drop_doomed.unwrap_or(true),
            shed_action: match w.shed_action.as_deref() {
                None | Some("reject") => ShedAction::Reject,
                Some("ack") => ShedAction::Ack,
                Some(other) => {
                    return Err(check.invalid(
                        "worker.shed_action",
                        format!("expected \"reject\" or \"ack\", got {other:?}"),
                    ));
                }
            },
            drain_grace: Duration::from_millis(check.range(
                "worker.drain_grace_ms",
                w.drain_grace_ms,
                25_000,
                0..=3_600_000,
            )?),
            ledger_file: w.ledger_file.filter(|p| !p.as_os_str().is_empty()),
            estimate: EstimateSettings {
                quantile: check.float(
                    "worker.estimate_quantile",
                    w.estimate_quantile,
                    DEFAULT_ESTIMATE_QUANTILE,
                    0.5,
                    0.999,
                )?,
                half_life_jobs: check.range(
                    "worker.estimate_half_life_jobs",
                    w.estimate_half_life_jobs,
                    100,
                    1..=1_000_000,
                )? as u32,
                min_jobs: check.range(
                    "worker.estimate_min_jobs",
                    w.estimate_min_jobs,
                    20,
                    1..=1_000_000,
                )? as u32,
            },
            max_job_types: check.range("worker.max_job_types", w.max_job_types, 32, 1..=1024)?
                as usize,
            max_concurrency: match w.max_concurrency {
                None | Some(0) => concurrency as usize,
                Some(n) => {
                    check.range("worker.max_concurrency", Some(n), 0, concurrency..=4096)? as usize
                }
            },
        };
        let handler = check.handler(raw.handler)?;

        let q = raw.queuer;
        let queuer = QueuerConfig {
            ttl_ms: check.range("queuer.ttl_ms", q.ttl_ms, 5_000, 1..=u32::MAX as u64)?,
            work_ms: check.range("queuer.work_ms", q.work_ms, 1_000, 0..=86_400_000)?,
            persistent: q.persistent.unwrap_or(true),
            confirms: q.confirms.unwrap_or(true),
            confirm_window: check.range(
                "queuer.confirm_window",
                q.confirm_window,
                1_000,
                1..=1_000_000,
            )? as usize,
            payload_bytes: check.range(
                "queuer.payload_bytes",
                q.payload_bytes,
                100,
                0..=16 * 1024 * 1024,
            )? as usize,
            max_jobs: q.max_jobs.filter(|&n| n > 0),
            drain_grace: Duration::from_millis(check.range(
                "queuer.drain_grace_ms",
                q.drain_grace_ms,
                10_000,
                0..=3_600_000,
            )?),
            ledger_file: q.ledger_file.filter(|p| !p.as_os_str().is_empty()),
        };

        let f = raw.flags;
        let flags = FlagsConfig {
            file: path_or_default(f.file, DEFAULT_FLAG_FILE),
            file_check: Duration::from_millis(check.range(
                "flags.file_check_ms",
                f.file_check_ms,
                1_000,
                10..=3_600_000,
            )?),
            skip_rate_key: check.name("flags.skip_rate_key", f.skip_rate_key, "skip-rate")?,
            rate_key: check.name("flags.rate_key", f.rate_key, "task-rate")?,
            skip_rate_fallback: check.float(
                "flags.skip_rate_fallback",
                f.skip_rate_fallback,
                0.0,
                0.0,
                100.0,
            )?,
            rate_fallback: check.float(
                "flags.rate_fallback",
                f.rate_fallback,
                1.0,
                0.0,
                crate::flags::MAX_RATE_PER_SEC,
            )?,
            context_kind: check.name("flags.context_kind", f.context_kind, "service")?,
            context_key: match f.context_key.filter(|k| !k.is_empty()) {
                Some(key) => key,
                None if surroundings.host_name.is_empty() => "localhost".to_owned(),
                None => surroundings.host_name.clone(),
            },
            host: match surroundings.host_name.as_str() {
                "" => "localhost".to_owned(),
                name => name.to_owned(),
            },
            pause_key: check.optional_name("flags.pause_key", f.pause_key)?,
            concurrency_key: check.optional_name("flags.concurrency_key", f.concurrency_key)?,
            deadline_aware_key: check
                .optional_name("flags.deadline_aware_key", f.deadline_aware_key)?,
        };
        if flags.context_kind == "multi" || flags.context_kind == "kind" {
            return Err(check.invalid(
                "flags.context_kind",
                format!("{:?} is reserved by LaunchDarkly", flags.context_kind),
            ));
        }

        let l = raw.launchdarkly;
        let sdk_key = l
            .sdk_key
            .filter(|k| !k.is_empty())
            .or_else(|| surroundings.sdk_key.clone());
        // Checked only when LaunchDarkly is used: a host-wide proxy setting that flagshed cannot
        // use must not stop a daemon that reads a flag file.
        let proxy = match sdk_key {
            Some(_) => ProxyRules::from_env(&surroundings.proxy).map_err(ConfigError::Proxy)?,
            None => None,
        };
        let launchdarkly = LaunchDarklyConfig {
            sdk_key,
            stream: l.stream.unwrap_or(true),
            stream_uri: check.http_uri(
                "launchdarkly.stream_uri",
                l.stream_uri,
                "https://stream.launchdarkly.com",
            )?,
            base_uri: check.http_uri(
                "launchdarkly.base_uri",
                l.base_uri,
                "https://sdk.launchdarkly.com",
            )?,
            poll_interval: Duration::from_secs(check.range(
                "launchdarkly.poll_interval_secs",
                l.poll_interval_secs,
                MIN_POLL_INTERVAL_SECS,
                MIN_POLL_INTERVAL_SECS..=86_400,
            )?),
            startup_wait: Duration::from_millis(check.range(
                "launchdarkly.startup_wait_ms",
                l.startup_wait_ms,
                5_000,
                0..=600_000,
            )?),
            state_file: path_or_default(l.state_file, DEFAULT_STATE_FILE),
            events: l.events.unwrap_or(true),
            events_uri: check.http_uri(
                "launchdarkly.events_uri",
                l.events_uri,
                "https://events.launchdarkly.com",
            )?,
            events_flush: Duration::from_millis(check.range(
                "launchdarkly.events_flush_ms",
                l.events_flush_ms,
                5_000,
                100..=3_600_000,
            )?),
            proxy,
        };

        let lg = raw.log;
        let log = LogConfig {
            level: match lg.level.as_deref() {
                None => log::LevelFilter::Info,
                Some(text) => text.parse().map_err(|_| {
                    check.invalid(
                        "log.level",
                        format!(
                            "expected one of off, error, warn, info, debug, trace; got {text:?}"
                        ),
                    )
                })?,
            },
            stats_interval: Duration::from_millis(check.range(
                "log.stats_interval_ms",
                lg.stats_interval_ms,
                10_000,
                100..=86_400_000,
            )?),
        };

        let m = raw.metrics;
        let metrics = MetricsConfig {
            worker_listen: check.listen_address("metrics.worker_listen", m.worker_listen)?,
            queuer_listen: check.listen_address("metrics.queuer_listen", m.queuer_listen)?,
        };
        if let (Some(worker), Some(queuer)) = (metrics.worker_listen, metrics.queuer_listen) {
            if worker == queuer && worker.port() != 0 {
                return Err(check.invalid(
                    "metrics.queuer_listen",
                    format!(
                        "{queuer} is metrics.worker_listen too; the two daemons need an address each"
                    ),
                ));
            }
        }

        Ok(Config {
            path: path.to_owned(),
            broker,
            worker,
            handler,
            queuer,
            flags,
            launchdarkly,
            log,
            metrics,
            surroundings: surroundings.clone(),
        })
    }
}

/// The quantile of learned work times the doomed check budgets by default (see README,
/// "Shedding when nobody declares the work time").
pub const DEFAULT_ESTIMATE_QUANTILE: f64 = 0.99;

/// Where an SDK key may come from besides the config file, in order: the environment
/// variable `LAUNCHDARKLY_SDK_KEY`, then a systemd credential named `sdk-key`
/// (`LoadCredential=sdk-key:...` puts it in `$CREDENTIALS_DIRECTORY`).
pub const SDK_KEY_ENV: &str = "LAUNCHDARKLY_SDK_KEY";

/// The systemd credential holding the SDK key.
pub const SDK_KEY_CREDENTIAL: &str = "sdk-key";

/// The systemd credential holding the broker password, used for every broker URL that has
/// no password of its own (`LoadCredential=broker-password:...`).
pub const BROKER_PASSWORD_CREDENTIAL: &str = "broker-password";

/// A parser message with any double-quoted text replaced: serde quotes the offending value
/// ("invalid type: string \"...\""), which may be a secret.
fn without_quoted_text(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut quoted = false;
    for c in message.chars() {
        match (c, quoted) {
            ('"', false) => {
                quoted = true;
                out.push_str("\"…");
            }
            ('"', true) => {
                quoted = false;
                out.push('"');
            }
            (_, true) => {}
            (c, false) => out.push(c),
        }
    }
    out
}

/// The program of `handler.command` as an absolute path: as given if it holds a `/`, else
/// the first executable of that name in `path` (the handler's `PATH`), as a shell would.
fn resolve_program(program: &str, path: &str) -> Result<PathBuf, String> {
    if program.contains('/') {
        let candidate = PathBuf::from(program);
        return match is_executable_file(&candidate) {
            Ok(()) => Ok(candidate),
            Err(why) => Err(format!("cannot run {program:?}: {why}")),
        };
    }
    path.split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(program))
        .find(|candidate| is_executable_file(candidate).is_ok())
        .ok_or_else(|| format!("no executable {program:?} in the handler's PATH ({path})"))
}

fn is_executable_file(path: &Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| "the path holds a NUL byte".to_owned())?;
    // SAFETY: access(2) reads a NUL-terminated path we own.
    if unsafe { libc::access(c_path.as_ptr(), libc::X_OK) } != 0 {
        return Err(format!(
            "not executable by this user ({})",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// A path key: absent means the default, `""` means none.
fn path_or_default(value: Option<PathBuf>, default: &str) -> Option<PathBuf> {
    match value {
        None => Some(PathBuf::from(default)),
        Some(path) if path.as_os_str().is_empty() => None,
        Some(path) => Some(path),
    }
}

/// Turns a multi-line parser message into one log-friendly line.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The default context key: the host name, so LaunchDarkly rollouts spread across hosts.
/// Read with gethostname(2), which works where /proc is hidden (systemd's `ProcSubset=pid`).
fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into a buffer we own.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let from_kernel = (rc == 0)
        .then(|| {
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            String::from_utf8_lossy(&buf[..end]).trim().to_owned()
        })
        .filter(|name| !name.is_empty());
    from_kernel
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "localhost".to_owned())
}

/// Validation helpers that all produce errors naming the file and key.
struct Checker<'a> {
    path: &'a Path,
}

impl Checker<'_> {
    fn invalid(&self, key: &'static str, message: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_owned(),
            key,
            message,
        }
    }

    fn range(
        &self,
        key: &'static str,
        value: Option<u64>,
        default: u64,
        allowed: std::ops::RangeInclusive<u64>,
    ) -> Result<u64, ConfigError> {
        let value = value.unwrap_or(default);
        if allowed.contains(&value) {
            Ok(value)
        } else {
            Err(self.invalid(
                key,
                format!(
                    "expected a whole number from {} to {}, got {value}",
                    allowed.start(),
                    allowed.end()
                ),
            ))
        }
    }

    fn float(
        &self,
        key: &'static str,
        value: Option<f64>,
        default: f64,
        min: f64,
        max: f64,
    ) -> Result<f64, ConfigError> {
        let value = value.unwrap_or(default);
        if value.is_finite() && (min..=max).contains(&value) {
            Ok(value)
        } else {
            Err(self.invalid(
                key,
                format!("expected a number from {min} to {max}, got {value}"),
            ))
        }
    }

    /// A flag key that may be left out or empty (the lever is not watched).
    fn optional_name(
        &self,
        key: &'static str,
        value: Option<String>,
    ) -> Result<Option<String>, ConfigError> {
        match value.filter(|v| !v.is_empty()) {
            None => Ok(None),
            Some(v) => self.name(key, Some(v), "").map(Some),
        }
    }

    fn name(
        &self,
        key: &'static str,
        value: Option<String>,
        default: &str,
    ) -> Result<String, ConfigError> {
        let value = value.unwrap_or_else(|| default.to_owned());
        if value.is_empty() || value.len() > 255 || value.chars().any(char::is_control) {
            return Err(self.invalid(
                key,
                format!("expected 1 to 255 printable characters, got {value:?}"),
            ));
        }
        Ok(value)
    }

    /// `broker.url` (one node) or `broker.urls` (a cluster's members), not both.
    fn broker_addresses(
        &self,
        url: Option<String>,
        urls: Option<Vec<String>>,
    ) -> Result<Vec<BrokerAddress>, ConfigError> {
        let (key, urls) = match (url, urls) {
            (Some(_), Some(_)) => {
                return Err(self.invalid(
                    "broker.urls",
                    "set broker.url for one node or broker.urls for several, not both".into(),
                ));
            }
            (Some(url), None) => ("broker.url", vec![url]),
            (None, Some(urls)) if urls.is_empty() => {
                return Err(self.invalid(
                    "broker.urls",
                    "expected at least one amqp:// or amqps:// URL".into(),
                ));
            }
            (None, Some(urls)) => ("broker.urls", urls),
            (None, None) => (
                "broker.url",
                vec!["amqp://guest:guest@127.0.0.1:5672/%2f".to_owned()],
            ),
        };
        urls.iter()
            .enumerate()
            .map(|(i, url)| {
                BrokerAddress::parse(url).map_err(|why| {
                    let which = if key == "broker.urls" {
                        format!("URL number {}: ", i + 1)
                    } else {
                        String::new()
                    };
                    self.invalid(key, format!("{which}{why}"))
                })
            })
            .collect()
    }

    /// `broker.tls_*`: only with an `amqps://` node; a client certificate with its key.
    fn tls_files(
        &self,
        any_tls: bool,
        ca_file: Option<PathBuf>,
        cert_file: Option<PathBuf>,
        key_file: Option<PathBuf>,
    ) -> Result<TlsFiles, ConfigError> {
        let nonempty = |p: Option<PathBuf>| p.filter(|p| !p.as_os_str().is_empty());
        let (ca_file, cert_file, key_file) =
            (nonempty(ca_file), nonempty(cert_file), nonempty(key_file));
        if !any_tls {
            for (key, set) in [
                ("broker.tls_ca_file", ca_file.is_some()),
                ("broker.tls_cert_file", cert_file.is_some()),
                ("broker.tls_key_file", key_file.is_some()),
            ] {
                if set {
                    return Err(self.invalid(
                        key,
                        "is only used with amqps:// URLs; use amqps:// or remove it".into(),
                    ));
                }
            }
        }
        if let Some(ca) = &ca_file {
            self.pem_file("broker.tls_ca_file", ca, "CERTIFICATE")?;
        }
        let client = match (cert_file, key_file) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                self.pem_file("broker.tls_cert_file", &cert, "CERTIFICATE")?;
                self.pem_file("broker.tls_key_file", &key, "PRIVATE KEY")?;
                Some((cert, key))
            }
            (Some(_), None) => {
                return Err(self.invalid(
                    "broker.tls_key_file",
                    "is needed with broker.tls_cert_file".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(self.invalid(
                    "broker.tls_cert_file",
                    "is needed with broker.tls_key_file".into(),
                ));
            }
        };
        Ok(TlsFiles { ca_file, client })
    }

    /// Checks that `path` is readable and holds a PEM block of `kind`; never quotes it.
    fn pem_file(&self, key: &'static str, path: &Path, kind: &str) -> Result<(), ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| self.invalid(key, format!("cannot read {}: {e}", path.display())))?;
        let found = text.lines().any(|l| {
            let l = l.trim_end();
            l == format!("-----BEGIN {kind}-----")
                || (kind == "CERTIFICATE" && l == "-----BEGIN TRUSTED CERTIFICATE-----")
        });
        if !found {
            let expected = if kind == "PRIVATE KEY" {
                "a PEM PKCS#8 private key (-----BEGIN PRIVATE KEY-----; convert others with `openssl pkcs8 -topk8 -nocrypt`)"
            } else {
                "a PEM certificate (-----BEGIN CERTIFICATE-----)"
            };
            return Err(self.invalid(key, format!("{} is not {expected}", path.display())));
        }
        Ok(())
    }

    /// `[handler]`: the kind and what it needs, refusing keys that belong to another kind.
    fn handler(&self, h: RawHandler) -> Result<HandlerConfig, ConfigError> {
        let kind_name = h.kind.as_deref().unwrap_or("simulated");
        let unused = |key: &'static str, set: bool| {
            if set {
                Err(self.invalid(
                    key,
                    format!("is not used by handler.kind = {kind_name:?}; remove it"),
                ))
            } else {
                Ok(())
            }
        };
        let kind = match kind_name {
            "simulated" => {
                unused("handler.command", h.command.is_some())?;
                unused("handler.env", h.env.is_some())?;
                unused("handler.url", h.url.is_some())?;
                HandlerKind::Simulated
            }
            "exec" => {
                unused("handler.url", h.url.is_some())?;
                let env = self.handler_env(h.env.unwrap_or_default())?;
                let mut argv = h.command.unwrap_or_default().into_iter();
                let Some(program) = argv.next().filter(|p| !p.is_empty()) else {
                    return Err(self.invalid(
                        "handler.command",
                        "expected the program and its arguments, e.g. [\"/usr/local/bin/resize\", \"--fast\"]".into(),
                    ));
                };
                let args: Vec<String> = argv.collect();
                if args.iter().any(|a| a.contains('\0')) {
                    return Err(
                        self.invalid("handler.command", "an argument holds a NUL byte".into())
                    );
                }
                let path = env
                    .iter()
                    .find(|(k, _)| k == "PATH")
                    .map_or(HANDLER_DEFAULT_PATH, |(_, v)| v.as_str());
                let program = resolve_program(&program, path)
                    .map_err(|why| self.invalid("handler.command", why))?;
                HandlerKind::Exec { program, args, env }
            }
            "http" => {
                unused("handler.command", h.command.is_some())?;
                unused("handler.env", h.env.is_some())?;
                let Some(url) = h.url.filter(|u| !u.is_empty()) else {
                    return Err(self.invalid(
                        "handler.url",
                        "expected the URL jobs are POSTed to, e.g. \"http://127.0.0.1:8080/jobs\""
                            .into(),
                    ));
                };
                let valid = url::Url::parse(&url)
                    .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host());
                if !valid {
                    return Err(self.invalid(
                        "handler.url",
                        format!(
                            "expected an http:// or https:// URL, got {:?}",
                            redact_userinfo(&url)
                        ),
                    ));
                }
                HandlerKind::Http {
                    url,
                    connect_timeout: Duration::from_millis(self.range(
                        "handler.connect_timeout_ms",
                        h.connect_timeout_ms,
                        5_000,
                        1..=600_000,
                    )?),
                }
            }
            other => {
                return Err(self.invalid(
                    "handler.kind",
                    format!("expected \"simulated\", \"exec\" or \"http\", got {other:?}"),
                ));
            }
        };
        if !matches!(kind, HandlerKind::Http { .. }) {
            unused("handler.connect_timeout_ms", h.connect_timeout_ms.is_some())?;
        }
        Ok(HandlerConfig {
            kind,
            enforce_deadline: h.enforce_deadline.unwrap_or(true),
            kill_grace: Duration::from_millis(self.range(
                "handler.kill_grace_ms",
                h.kill_grace_ms,
                2_000,
                0..=600_000,
            )?),
            output_limit_bytes: self.range(
                "handler.output_limit_bytes",
                h.output_limit_bytes,
                16 * 1024,
                0..=16 * 1024 * 1024,
            )? as usize,
            max_retries: self.range("handler.max_retries", h.max_retries, 5, 0..=1_000)? as u32,
            retry_delay: Duration::from_millis(self.range(
                "handler.retry_delay_ms",
                h.retry_delay_ms,
                1_000,
                0..=600_000,
            )?),
        })
    }

    /// The exec child's environment: `PATH` and `LANG`, then the operator's table.
    fn handler_env(
        &self,
        table: BTreeMap<String, String>,
    ) -> Result<Vec<(String, String)>, ConfigError> {
        let mut env = vec![
            ("PATH".to_owned(), HANDLER_DEFAULT_PATH.to_owned()),
            ("LANG".to_owned(), "C.UTF-8".to_owned()),
        ];
        for (name, value) in table {
            let valid_name = name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid_name {
                return Err(self.invalid(
                    "handler.env",
                    format!("{name:?} is not a variable name (letters, digits and _)"),
                ));
            }
            if name.starts_with("FLAGSHED_") {
                return Err(self.invalid(
                    "handler.env",
                    format!("{name} is reserved: FLAGSHED_* variables carry the job's facts"),
                ));
            }
            if value.contains('\0') {
                return Err(self.invalid(
                    "handler.env",
                    format!("the value of {name} holds a NUL byte"),
                ));
            }
            env.retain(|(k, _)| *k != name);
            env.push((name, value));
        }
        Ok(env)
    }

    /// A socket address to listen on (`"127.0.0.1:9464"`, `"[::1]:9464"`); absent or `""`
    /// is none. Port 0 lets the kernel pick one, which the daemon logs.
    fn listen_address(
        &self,
        key: &'static str,
        value: Option<String>,
    ) -> Result<Option<SocketAddr>, ConfigError> {
        match value.as_deref() {
            None | Some("") => Ok(None),
            Some(text) => text.parse().map(Some).map_err(|_| {
                self.invalid(
                    key,
                    format!(
                        "expected an IP address and port such as \"127.0.0.1:9464\" or \"[::1]:9464\", or \"\" for none; got {text:?}"
                    ),
                )
            }),
        }
    }

    fn http_uri(
        &self,
        key: &'static str,
        value: Option<String>,
        default: &str,
    ) -> Result<String, ConfigError> {
        let value = value.unwrap_or_else(|| default.to_owned());
        match url::Url::parse(&value) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() => {
                Ok(value.trim_end_matches('/').to_owned())
            }
            _ => Err(self.invalid(
                key,
                format!("expected an http:// or https:// URL, got {value:?}"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/flagshed/test.toml"), text)
    }

    #[test]
    fn empty_file_gives_documented_defaults() {
        let config = parse("").expect("empty config is valid");
        assert_eq!(config.worker.concurrency, 4);
        assert_eq!(config.worker.prefetch, 4);
        assert_eq!(config.worker.default_work_ms, 1_000);
        assert!(config.worker.drop_doomed);
        assert_eq!(config.broker.queue, "flagshed.jobs");
        assert_eq!(config.flags.skip_rate_key, "skip-rate");
        assert_eq!(config.log.stats_interval, Duration::from_secs(10));
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let err = parse("[worker]\nconcurency = 3\n").unwrap_err().to_string();
        assert!(err.contains("/etc/flagshed/test.toml"), "{err}");
        assert!(err.contains("concurency"), "{err}");
    }

    #[test]
    fn wrong_type_names_the_key_path() {
        let err = parse("[worker]\nconcurrency = \"four\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("worker.concurrency"), "{err}");
    }

    #[test]
    fn out_of_range_value_names_the_key() {
        let err = parse("[worker]\nconcurrency = 0\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("worker.concurrency"), "{err}");
        assert!(err.contains("got 0"), "{err}");
    }

    #[test]
    fn skip_rate_fallback_over_100_is_refused() {
        let err = parse("[flags]\nskip_rate_fallback = 150.0\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("flags.skip_rate_fallback"), "{err}");
    }

    #[test]
    fn poll_interval_below_floor_is_refused() {
        let err = parse("[launchdarkly]\npoll_interval_secs = 5\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("launchdarkly.poll_interval_secs"), "{err}");
    }

    #[test]
    fn bad_broker_url_is_refused_without_echoing_password() {
        let err = parse("[broker]\nurl = \"http://user:hunter2@host/\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("broker.url"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn debug_output_redacts_sdk_key() {
        let config = parse("[launchdarkly]\nsdk_key = \"sdk-secret-123\"\n").unwrap();
        let shown = format!("{config:?}");
        assert!(!shown.contains("sdk-secret-123"), "{shown}");
    }

    #[test]
    fn metrics_addresses_are_off_by_default_and_checked() {
        let config = parse("").unwrap();
        assert_eq!(config.metrics, MetricsConfig::default());
        let config = parse(
            "[metrics]\nworker_listen = \"127.0.0.1:9464\"\nqueuer_listen = \"[::1]:9465\"\n",
        )
        .unwrap();
        assert_eq!(
            config.metrics.worker_listen,
            Some("127.0.0.1:9464".parse().unwrap())
        );
        assert_eq!(
            config.metrics.queuer_listen,
            Some("[::1]:9465".parse().unwrap())
        );
        let err = parse("[metrics]\nworker_listen = \"localhost\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("metrics.worker_listen"), "{err}");
        let err = parse(
            "[metrics]\nworker_listen = \"127.0.0.1:9464\"\nqueuer_listen = \"127.0.0.1:9464\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("metrics.queuer_listen"), "{err}");
    }

    /// Surroundings with an SDK key and the proxy variables `vars`, nothing from the shell.
    fn with_proxy_env(vars: &[(&'static str, &str)]) -> Surroundings {
        Surroundings {
            sdk_key: Some("sdk-from-env".into()),
            proxy: ProxyEnv::from_lookup(|name| {
                vars.iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| (*v).to_owned())
            }),
            ..Surroundings::default()
        }
    }

    #[test]
    fn proxy_from_the_environment_reaches_launchdarkly_config_without_its_password() {
        let surroundings =
            with_proxy_env(&[("https_proxy", "http://svc:pr0xy-hunter2@proxy.corp:3128")]);
        let config =
            Config::parse_in(Path::new("/etc/flagshed/test.toml"), "", &surroundings).unwrap();
        let proxy = config.launchdarkly.proxy.as_ref().expect("a proxy");
        let route = proxy.route(&config.launchdarkly.stream_uri);
        assert_eq!(
            route.server().map(|s| s.address()).as_deref(),
            Some("proxy.corp:3128")
        );
        let shown = format!("{config:?}");
        assert!(!shown.contains("pr0xy-hunter2"), "{shown}");
        assert!(shown.contains("proxy.corp:3128"), "{shown}");
        assert!(config.secrets().contains(&"pr0xy-hunter2".to_owned()));
    }

    #[test]
    fn bad_proxy_variable_is_a_config_error_naming_it_not_its_password() {
        let surroundings = with_proxy_env(&[("HTTPS_PROXY", "socks5://u:pr0xy-hunter2@p:1080")]);
        let err =
            Config::parse_in(Path::new("/etc/flagshed/test.toml"), "", &surroundings).unwrap_err();
        assert!(matches!(err, ConfigError::Proxy(_)), "{err:?}");
        let err = err.to_string();
        assert!(err.contains("HTTPS_PROXY"), "{err}");
        assert!(!err.contains("pr0xy-hunter2"), "{err}");
    }

    #[test]
    fn proxy_variables_are_ignored_without_launchdarkly() {
        let surroundings = Surroundings {
            sdk_key: None,
            ..with_proxy_env(&[("https_proxy", "socks5://p:1080")])
        };
        let config =
            Config::parse_in(Path::new("/etc/flagshed/test.toml"), "", &surroundings).unwrap();
        assert_eq!(config.launchdarkly.proxy, None);
    }

    #[test]
    fn syntax_error_is_one_line() {
        let err = parse("[worker\n").unwrap_err().to_string();
        assert!(!err.contains('\n'), "{err}");
        assert!(err.starts_with("/etc/flagshed/test.toml"), "{err}");
    }
}
