//! What both daemons' loops share while they run: which daemon this is, the fatal errors and
//! their exit status, SIGHUP (reload the config, keep restart-only settings, hand the flag
//! settings on), and the flag fields of the stats line. The loops (`worker`, `queuer`) use
//! it; `daemon` starts them. Nothing here depends on either loop.

use crate::broker::BrokerError;
use crate::config::{Config, ConfigError};
use crate::flag_source::{FlagSource, SourceSettings};
use crate::flags::FlagValues;
use crate::logging;
use crate::notify::Notifier;
use std::fmt;

/// sysexits' EX_CONFIG: systemd units list it in `RestartPreventExitStatus=` so a bad config
/// does not cause a restart loop.
pub const EXIT_CONFIG: u8 = 78;

/// The most events (deliveries, completions, confirms) a loop takes one after another with a
/// `try_recv` before it runs its full select again. Under load an event is usually waiting,
/// and taking it costs one channel operation instead of a select over every timer; the bound
/// keeps timers and signals from starving.
pub const FAST_PATH_RUN: u32 = 16;

/// Which daemon this is; also the `role` context attribute flags can target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Worker,
    Queuer,
}

impl Role {
    /// The name used in logs and the flag context.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Worker => "worker",
            Role::Queuer => "queuer",
        }
    }

    /// The binary's name, for the version line and usage.
    pub fn program(self) -> &'static str {
        match self {
            Role::Worker => "taskworker",
            Role::Queuer => "taskqueuer",
        }
    }

    /// What the daemon does, in one line, for `--help`.
    pub fn summary(self) -> &'static str {
        match self {
            Role::Worker => {
                "consume time-sensitive jobs from RabbitMQ, shedding what cannot finish in time"
            }
            Role::Queuer => "publish time-sensitive jobs to RabbitMQ at the rate a flag sets",
        }
    }
}

/// A fatal error in a daemon.
#[derive(Debug)]
pub enum DaemonError {
    Config(ConfigError),
    Broker(BrokerError),
    /// A local resource (a thread, a signal handler) could not be set up.
    Io {
        what: &'static str,
        source: std::io::Error,
    },
}

impl fmt::Display for DaemonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DaemonError::Config(e) => e.fmt(f),
            DaemonError::Broker(e) => e.fmt(f),
            DaemonError::Io { what, source } => write!(f, "{what}: {source}"),
        }
    }
}

impl std::error::Error for DaemonError {}

impl From<BrokerError> for DaemonError {
    fn from(e: BrokerError) -> Self {
        DaemonError::Broker(e)
    }
}

impl From<ConfigError> for DaemonError {
    fn from(e: ConfigError) -> Self {
        DaemonError::Config(e)
    }
}

/// The flag source's view of the config.
pub fn source_settings(config: &Config, role: Role) -> SourceSettings {
    SourceSettings {
        flags: config.flags.clone(),
        launchdarkly: config.launchdarkly.clone(),
        role: role.as_str(),
        queue: config.broker.queue.clone(),
        concurrency: config.worker.concurrency,
        max_concurrency: config.worker.max_concurrency,
        drop_doomed: config.worker.drop_doomed,
        shed_objective: config.worker.estimate.objective,
    }
}

/// SIGHUP: loads and validates the whole config file again. If it is invalid, logs why and
/// returns `None` (the caller keeps the old one). If valid, applies what is common to both
/// daemons (log level, flag settings), warns about settings that need a restart, and returns
/// it for the caller to apply its own part.
pub fn reload(
    current: &Config,
    role: Role,
    flags: &FlagSource,
    notifier: &Notifier,
) -> Option<Config> {
    notifier.reloading();
    let new = match Config::load_in(&current.path, &current.surroundings) {
        Ok(new) => new,
        Err(e) => {
            log::error!("reload refused, still running on the previous configuration: {e}");
            notifier.ready("reload refused; see log");
            return None;
        }
    };
    let new = keep_restart_only_settings(current, new);
    logging::set_level(new.log.level);
    flags.reload(source_settings(&new, role));
    log::info!("configuration reloaded from {}", new.path.display());
    Some(new)
}

/// Settings that only take effect at a restart: the new config gets the running values back,
/// with one warning per setting that was changed in the file.
fn keep_restart_only_settings(current: &Config, mut new: Config) -> Config {
    macro_rules! keep {
        ($($name:literal => $section:ident . $key:ident),* $(,)?) => {$(
            if new.$section.$key != current.$section.$key {
                log::warn!("{} changed; it takes effect at the next restart", $name);
                new.$section.$key = current.$section.$key.clone();
            }
        )*};
    }
    if new.broker != current.broker {
        log::warn!("[broker] settings changed; they take effect at the next restart");
        new.broker = current.broker.clone();
    }
    if new.launchdarkly != current.launchdarkly {
        log::warn!("[launchdarkly] settings changed; they take effect at the next restart");
        new.launchdarkly = current.launchdarkly.clone();
    }
    keep!(
        "worker.concurrency" => worker.concurrency,
        "worker.max_concurrency" => worker.max_concurrency,
        "worker.prefetch" => worker.prefetch,
        "worker.ledger_file" => worker.ledger_file,
        "worker.max_job_types" => worker.max_job_types,
        "handler.kind, command, env, url or connect_timeout_ms" => handler.kind,
        "handler.kill_grace_ms" => handler.kill_grace,
        "handler.output_limit_bytes" => handler.output_limit_bytes,
        "handler.output_limit_lines" => handler.output_limit_lines,
        "queuer.confirms" => queuer.confirms,
        "queuer.ledger_file" => queuer.ledger_file,
        "metrics.worker_listen" => metrics.worker_listen,
        "metrics.queuer_listen" => metrics.queuer_listen,
    );
    new
}

/// The flag part of the stats line: current values, their origin, the source state and age.
pub fn flag_fields(values: &FlagValues) -> String {
    format!(
        "skip_rate={} rate={} flags={} flag_source={} flags_age_ms={}",
        values.skip_rate(),
        values.rate_per_sec(),
        values.origin().as_str(),
        values.state().as_str(),
        values.age_ms()
    )
}

/// Where a daemon's loop stands with RabbitMQ and systemd: the node in use, since when the
/// broker is unreachable, whether READY was sent. Both loops keep one and log connections
/// and outages through it, so the two daemons say the same things the same way.
#[derive(Debug, Default)]
pub struct Link {
    ready_sent: bool,
    down_since: Option<std::time::Instant>,
    node: Option<String>,
}

impl Link {
    /// A new connection to `node` at `endpoint`: logs `first` on the first one, how long the
    /// outage lasted on a reconnection (with `resumed`), and tells systemd READY once.
    pub fn connected(
        &mut self,
        node: &str,
        endpoint: &str,
        notifier: &Notifier,
        first: impl FnOnce() -> String,
        resumed: &str,
    ) {
        self.node = Some(node.to_owned());
        match self.down_since.take() {
            Some(since) => log::info!(
                "reconnected to RabbitMQ at {endpoint} after {} ms; {resumed}",
                since.elapsed().as_millis()
            ),
            None => log::info!("{}", first()),
        }
        if !self.ready_sent {
            notifier.ready(resumed);
            self.ready_sent = true;
        }
    }

    /// The connection (or an attempt) failed: logs the outage once, with `lost` (what was
    /// given up) once the daemon had been connected, and tells systemd.
    pub fn lost(&mut self, reason: &str, notifier: &Notifier, lost: impl FnOnce() -> String) {
        if self.down_since.is_none() {
            if self.ready_sent {
                let lost = lost();
                log::error!("lost RabbitMQ: {reason}; {lost}; reconnecting");
            } else {
                log::error!("{reason}; retrying");
            }
            notifier.status(&format!("broker unreachable: {reason}; reconnecting"));
            self.down_since = Some(std::time::Instant::now());
        }
        self.node = None;
    }

    /// The stats line's `broker=up broker_node=host:port` (or `down broker_node=-`).
    pub fn broker_fields(&self) -> String {
        match &self.node {
            Some(node) => format!("broker=up broker_node={node}"),
            None => "broker=down broker_node=-".to_owned(),
        }
    }
}

/// A loop's stats ticker, remade when a reload changes the interval.
pub struct StatsTicker {
    interval: std::time::Duration,
    rx: crossbeam_channel::Receiver<std::time::Instant>,
}

impl StatsTicker {
    /// Ticks every `interval`.
    pub fn new(interval: std::time::Duration) -> StatsTicker {
        StatsTicker {
            interval,
            rx: crossbeam_channel::tick(interval),
        }
    }

    /// The receiver to select on; taken afresh each time round, since a reload may replace it.
    pub fn receiver(&self) -> crossbeam_channel::Receiver<std::time::Instant> {
        self.rx.clone()
    }

    /// Applies a reloaded interval.
    pub fn set_interval(&mut self, interval: std::time::Duration) {
        if interval != self.interval {
            *self = StatsTicker::new(interval);
        }
    }
}

/// The ticker for systemd's watchdog, at half its interval; never, without one.
pub fn watchdog_ticker(notifier: &Notifier) -> crossbeam_channel::Receiver<std::time::Instant> {
    notifier
        .watchdog_interval()
        .map_or_else(crossbeam_channel::never, crossbeam_channel::tick)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_link_tells_which_node_is_in_use_and_logs_an_outage_once() {
        let notifier = Notifier::disabled();
        let mut link = Link::default();
        assert_eq!(link.broker_fields(), "broker=down broker_node=-");
        link.connected(
            "10.0.0.1:5672",
            "amqp://10.0.0.1:5672",
            &notifier,
            || "first".into(),
            "x",
        );
        assert_eq!(link.broker_fields(), "broker=up broker_node=10.0.0.1:5672");
        let mut described = 0;
        for _ in 0..3 {
            link.lost("refused", &notifier, || {
                described += 1;
                "nothing lost".into()
            });
        }
        assert_eq!(described, 1, "one outage, one line");
        assert_eq!(link.broker_fields(), "broker=down broker_node=-");
        link.connected(
            "10.0.0.2:5672",
            "amqp://10.0.0.2:5672",
            &notifier,
            || unreachable!(),
            "x",
        );
        assert_eq!(link.broker_fields(), "broker=up broker_node=10.0.0.2:5672");
    }
}
