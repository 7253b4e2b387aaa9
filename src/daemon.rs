//! What both daemons share around their run loops: startup (arguments, config, logging,
//! signals, the metrics endpoint, flag source), reload, exit codes, and the flag fields of the
//! stats line.
//!
//! `main` in each binary is one call to [`main`], which turns every failure into a message and
//! an exit code in one place: 0 clean stop, 78 (EX_CONFIG) bad configuration, 1 anything else.

use crate::broker::BrokerError;
use crate::cli::{self, Command};
use crate::config::{Config, ConfigError, HandlerConfig, HandlerKind, Surroundings};
use crate::flags::FlagValues;
use crate::flags::source::{FlagSource, SourceSettings};
use crate::handler::{ExecHandler, Handler, HttpHandler, SimulatedHandler};
use crate::metrics::{MetricsServer, QueuerMetrics, Scrape, WorkerMetrics};
use crate::notify::Notifier;
use crate::{logging, queuer, signals, worker};
use std::fmt;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

/// sysexits' EX_CONFIG: systemd units list it in `RestartPreventExitStatus=` so a bad config
/// does not cause a restart loop.
pub const EXIT_CONFIG: u8 = 78;

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

    fn program(self) -> &'static str {
        match self {
            Role::Worker => "taskworker",
            Role::Queuer => "taskqueuer",
        }
    }

    fn summary(self) -> &'static str {
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

/// The whole of each binary's `main`.
pub fn main(role: Role) -> ExitCode {
    main_with(role, None)
}

/// The whole taskworker daemon (arguments, config, signals, flags, systemd, drain) around a
/// handler of your own: the `main` of a worker binary whose jobs are Rust code. The config's
/// `[handler]` section is then not used, except for `enforce_deadline`, `max_retries` and
/// `retry_delay_ms`.
pub fn run_worker_with(handler: Arc<dyn Handler>) -> ExitCode {
    main_with(Role::Worker, Some(handler))
}

fn main_with(role: Role, custom_handler: Option<Arc<dyn Handler>>) -> ExitCode {
    let command = match cli::parse(std::env::args_os().skip(1)) {
        Ok(command) => command,
        Err(e) => {
            eprintln!("{}: {e}\nTry '{} --help'.", role.program(), role.program());
            return ExitCode::from(2);
        }
    };
    match command {
        Command::Help => {
            print!("{}", cli::usage(role.program(), role.summary()));
            ExitCode::SUCCESS
        }
        Command::Version => {
            println!("{} {}", role.program(), env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::CheckConfig { config } => match Config::load_in(&config, &Surroundings::read()) {
            Ok(_) => {
                println!("{}: configuration OK", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", role.program());
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Run { config } => match Config::load_in(&config, &Surroundings::read()) {
            Err(e) => {
                eprintln!("{}: {e}", role.program());
                ExitCode::from(EXIT_CONFIG)
            }
            Ok(config) => {
                logging::init(config.log.level, config.secrets());
                match run(role, config, custom_handler) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(DaemonError::Broker(e)) if e.is_refusal() => {
                        log::error!("{e}; it refused twice, retrying cannot help: stopping");
                        ExitCode::from(EXIT_CONFIG)
                    }
                    Err(e) => {
                        log::error!("{e}");
                        ExitCode::from(match &e {
                            DaemonError::Config(_) => EXIT_CONFIG,
                            _ => 1,
                        })
                    }
                }
            }
        },
    }
}

fn run(
    role: Role,
    config: Config,
    custom_handler: Option<Arc<dyn Handler>>,
) -> Result<(), DaemonError> {
    log::info!(
        "{} {} starting with {}",
        role.program(),
        env!("CARGO_PKG_VERSION"),
        config.path.display()
    );
    let signals = signals::spawn().map_err(|source| DaemonError::Io {
        what: "installing signal handlers",
        source,
    })?;
    let values = Arc::new(FlagValues::with_job_types(
        config.flags.skip_rate_fallback,
        config.flags.rate_fallback,
        // One slot per job type the worker learns, and the shared `(other)`.
        config.worker.max_job_types + 1,
    ));
    // Listening comes before anything slow (flags, the broker), so that an address that cannot
    // be used stops the daemon at once.
    let (worker_metrics, queuer_metrics, _metrics_server) = match role {
        Role::Worker => match config.metrics.worker_listen {
            Some(address) => {
                let metrics = WorkerMetrics::new(
                    Arc::clone(&values),
                    config.worker.concurrency,
                    config.worker.max_job_types,
                );
                let server =
                    serve_metrics(&config, "metrics.worker_listen", address, metrics.scrape())?;
                (Some(metrics), None, Some(server))
            }
            None => (None, None, None),
        },
        Role::Queuer => match config.metrics.queuer_listen {
            Some(address) => {
                let metrics = QueuerMetrics::new(Arc::clone(&values));
                let server =
                    serve_metrics(&config, "metrics.queuer_listen", address, metrics.scrape())?;
                (None, Some(metrics), Some(server))
            }
            None => (None, None, None),
        },
    };
    let flags = FlagSource::spawn(source_settings(&config, role), Arc::clone(&values)).map_err(
        |source| DaemonError::Io {
            what: "starting the flag source thread",
            source,
        },
    )?;
    let notifier = Notifier::from_env();
    match role {
        Role::Worker => {
            let handler = match custom_handler {
                Some(handler) => {
                    if config.handler.kind != HandlerKind::Simulated {
                        log::warn!(
                            "handler.kind = {:?} is not used: this taskworker runs its own handler",
                            config.handler.kind.as_str()
                        );
                    }
                    handler
                }
                None => handler_for(&config.handler, config.worker.max_concurrency),
            };
            if matches!(config.handler.kind, HandlerKind::Exec { .. }) {
                keep_children_out_of_our_memory();
            }
            worker::run(
                config,
                worker::WorkerEnv {
                    values,
                    signals,
                    flags: &flags,
                    notifier: &notifier,
                    handler,
                    metrics: worker_metrics,
                },
            )
            .map(drop)
        }
        Role::Queuer => queuer::run(
            config,
            queuer::QueuerEnv {
                values,
                signals,
                flags: &flags,
                notifier: &notifier,
                metrics: queuer_metrics,
            },
        )
        .map(drop),
    }
}

/// Starts the `/metrics` endpoint for `metrics` on `address`, the value of `key`. An address
/// that cannot be listened on is a configuration error (exit status 78): another process holds
/// the port (often the other daemon, configured with the same address) or the address is not
/// this host's, and restarting cannot change either; the standard library's listener sets
/// `SO_REUSEADDR`, so the previous run's connections never hold the port.
fn serve_metrics(
    config: &Config,
    key: &'static str,
    address: SocketAddr,
    metrics: Arc<dyn Scrape>,
) -> Result<MetricsServer, DaemonError> {
    MetricsServer::start(address, metrics).map_err(|e| {
        DaemonError::Config(ConfigError::Invalid {
            path: config.path.clone(),
            key,
            message: format!("cannot listen on {address}: {e}"),
        })
    })
}

/// The handler `[handler]` asks for; `pool_threads` sizes the http handler's idle connections.
pub fn handler_for(config: &HandlerConfig, pool_threads: usize) -> Arc<dyn Handler> {
    match &config.kind {
        HandlerKind::Simulated => Arc::new(SimulatedHandler),
        HandlerKind::Exec { program, args, env } => Arc::new(ExecHandler::new(
            program.clone(),
            args.iter().map(Into::into).collect(),
            env.iter().map(|(k, v)| (k.into(), v.into())).collect(),
            config.kill_grace,
            config.output_limit_bytes,
        )),
        HandlerKind::Http {
            url,
            connect_timeout,
        } => Arc::new(HttpHandler::new(
            url.clone(),
            *connect_timeout,
            pool_threads,
        )),
    }
}

/// Exec children run as the daemon's user, so they could read its memory and environment
/// through `/proc/<pid>/` (the SDK key, the broker password). A process that is not dumpable
/// keeps those files root's; it also writes no core dump.
fn keep_children_out_of_our_memory() {
    // SAFETY: PR_SET_DUMPABLE takes an integer and touches nothing of ours.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        log::warn!(
            "cannot make the daemon undumpable ({}); exec handlers may read its memory",
            std::io::Error::last_os_error()
        );
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
