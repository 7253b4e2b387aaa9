//! Starting either daemon: arguments, config, logging, signals, the metrics endpoint, the flag
//! source and the handler, then the role's loop (`worker` or `queuer`); what the loops share
//! while they run is in [`crate::service`].
//!
//! `main` in each binary is one call to [`run_taskworker`] or [`run_taskqueuer`], which turn
//! every failure into a message and an exit code in one place: 0 clean stop, 78 (EX_CONFIG)
//! bad configuration, 1 anything else.

use crate::cli::{self, Command};
use crate::config::{Config, ConfigError, HandlerConfig, HandlerKind, Surroundings};
use crate::flag_source::FlagSource;
use crate::flags::FlagValues;
use crate::handler::{ExecHandler, Handler, HttpHandler, SimulatedHandler};
use crate::metrics::{MetricsServer, QueuerMetrics, Scrape, WorkerMetrics};
use crate::notify::Notifier;
use crate::service::{DaemonError, EXIT_CONFIG, Role, source_settings};
use crate::{logging, queuer, signals, worker};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

/// The whole of taskworker's `main`: one call, so the binary holds no logic of its own.
pub fn run_taskworker() -> ExitCode {
    main_with(Role::Worker, None)
}

/// The whole of taskqueuer's `main`: one call, so the binary holds no logic of its own.
pub fn run_taskqueuer() -> ExitCode {
    main_with(Role::Queuer, None)
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
    let server = MetricsServer::start(address, metrics).map_err(|e| {
        DaemonError::Config(ConfigError::Invalid {
            path: config.path.clone(),
            key,
            message: format!("cannot listen on {address}: {e}"),
        })
    })?;
    log::info!("serving metrics on http://{}/metrics", server.address());
    Ok(server)
}

/// The handler `[handler]` asks for; `pool_threads` sizes the http handler's idle connections.
pub fn handler_for(config: &HandlerConfig, pool_threads: usize) -> Arc<dyn Handler> {
    match &config.kind {
        HandlerKind::Simulated => Arc::new(SimulatedHandler),
        HandlerKind::Exec { program, args, env } => Arc::new(
            ExecHandler::new(
                program.clone(),
                args.iter().map(Into::into).collect(),
                env.iter().map(|(k, v)| (k.into(), v.into())).collect(),
                config.kill_grace,
                config.output_limit_bytes,
            )
            .with_output_limit_lines(config.output_limit_lines),
        ),
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
