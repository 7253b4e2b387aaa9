//! The configuration file: raw TOML in, a validated [`Config`] out.
//!
//! Loading has two stages. [`RawConfig`] mirrors the file (every key optional, unknown keys
//! refused); [`Config::from_raw`] checks every value and fills in defaults. Everything past
//! loading trusts `Config`, and a reload builds a whole new one before anything changes, so a
//! bad edit can never leave a daemon half-reconfigured.
//!
//! By step: [`raw`] is the file as written, `validate` turns it into a `Config`, and
//! [`surroundings`] is what comes from outside the file (environment, credentials, host
//! name), read once at startup so that parsing never does I/O beyond the file itself.

pub mod raw;
pub mod surroundings;
mod validate;

pub use raw::RawConfig;
pub use surroundings::Surroundings;

use crate::broker_address::BrokerAddress;
pub use crate::handler::estimate::{EstimateSettings, Objective};
use crate::proxy::{ProxyError, ProxyRules};
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
    /// Bytes of an exec job's stdout and stderr logged per job, newlines included.
    pub output_limit_bytes: usize,
    /// Lines of an exec job's stdout and stderr logged per job.
    pub output_limit_lines: usize,
    /// Times a job may ask to be retried before it ends `failed`.
    pub max_retries: u32,
    /// How long a job that asked to be retried is held before it goes back to the queue.
    pub retry_delay: Duration,
    /// What a job meets when the handler finds its service unavailable.
    pub when_unavailable: WhenUnavailable,
}

/// What the worker does when the handler finds its service unavailable (an http service
/// refusing or resetting connections before any response, an exec program that cannot be
/// started).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhenUnavailable {
    /// The job goes back to the queue and intake stops until the service answers a probe: a
    /// restart of the service costs no job.
    Hold,
    /// The job ends `failed` at once, as every other failure does.
    Fail,
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
    /// worker, resize its pool, turn deadline-aware shedding on or off, choose the shedding
    /// objective.
    pub pause_key: Option<String>,
    pub concurrency_key: Option<String>,
    pub deadline_aware_key: Option<String>,
    pub shed_objective_key: Option<String>,
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
    /// names the file and the key. For tests, which must not depend on the environment.
    #[cfg(any(test, feature = "internals"))]
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_in(path, &Surroundings::default())
    }

    /// Validates TOML text as if it had been read from `path`, with empty surroundings (no
    /// SDK key or broker password from outside the file, host name `localhost`). For tests.
    #[cfg(any(test, feature = "internals"))]
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
}

/// How work estimates are formed when the config does not say.
pub(crate) const ESTIMATE_DEFAULTS: EstimateSettings = crate::handler::estimate::DEFAULT_SETTINGS;

/// Turns a multi-line parser message into one log-friendly line.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::ProxyEnv;

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
    fn shed_objective_is_one_of_two_words() {
        let config = parse("[worker]\nshed_objective = \"most_on_time\"\n").expect("valid");
        assert_eq!(config.worker.estimate.objective, Objective::MostOnTime);
        let err = parse("[worker]\nshed_objective = \"fastest\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("worker.shed_objective"), "{err}");
        assert!(err.contains("\"fastest\""), "{err}");
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
