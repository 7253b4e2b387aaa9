//! taskqueuer's run loop: publishes jobs at the rate the rate flag asks for.
//!
//! One thread owns the AMQP channel. Pacing is a credit scheme: credit accrues at the current
//! rate (re-read from the atomics on every pass), each publish spends one, and credit is capped
//! at a few milliseconds' worth so a pause or a slow broker never turns into a burst. With
//! publisher confirms (the default) a job counts as published only once the broker confirms
//! it, and up to `confirm_window` publishes may await their confirm at once.

use crate::broker::{self, Session};
use crate::clock::now_ms;
use crate::config::Config;
use crate::daemon::{self, DaemonError, Role};
use crate::flags::FlagValues;
use crate::flags::source::FlagSource;
use crate::job::{HEADER_CREATED_MS, HEADER_DEADLINE_MS, HEADER_WORK_MS};
use crate::ledger::QueuerLedger;
use crate::notify::Notifier;
use crate::signals::Signal;
use amiquip::{AmqpProperties, AmqpValue, Confirm, ConfirmSmoother, FieldTable, Publish};
use crossbeam_channel::{Receiver, never, select, tick};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The longest the loop sleeps between looks at the rate flag, so a changed rate (or a rate
/// leaving 0) takes effect promptly.
const MAX_PACING_SLEEP: Duration = Duration::from_millis(50);

/// Credit may build up to this much time's worth of jobs, and no more.
const MAX_BURST: Duration = Duration::from_millis(10);

/// What the queuer needs from the daemon around it.
pub struct QueuerEnv<'a> {
    pub values: Arc<FlagValues>,
    pub signals: Receiver<Signal>,
    pub flags: &'a FlagSource,
    pub notifier: &'a Notifier,
}

/// Connects, publishes until stopped (or `max_jobs`), waits for confirms, returns the ledger.
pub fn run(config: Config, env: QueuerEnv<'_>) -> Result<QueuerLedger, DaemonError> {
    let session = broker::connect(&config.broker, "taskqueuer")?;
    let result = publish_loop(&session, config, &env);
    session.close();
    result
}

fn publish_loop(
    session: &Session,
    mut config: Config,
    env: &QueuerEnv<'_>,
) -> Result<QueuerLedger, DaemonError> {
    let confirms = if config.queuer.confirms {
        let rx = session
            .channel
            .listen_for_publisher_confirms()
            .map_err(|e| session.error("listening for confirms", e))?;
        session
            .channel
            .enable_publisher_confirms()
            .map_err(|e| session.error("enabling publisher confirms", e))?;
        rx
    } else {
        never()
    };
    log::info!(
        "publishing to queue {:?} at {} (confirms {})",
        config.broker.queue,
        session.endpoint,
        if config.queuer.confirms { "on" } else { "off" }
    );
    env.notifier
        .ready(&format!("publishing to {}", config.broker.queue));

    let mut publisher = Publisher::new(&config);
    let mut ledger = QueuerLedger::default();
    let mut smoother = ConfirmSmoother::new();
    let mut stats = tick(config.log.stats_interval);
    let watchdog = env.notifier.watchdog_interval().map_or_else(never, tick);
    let mut stopping: Option<Instant> = None;
    let mut credit = 0.0_f64;
    let mut last = Instant::now();
    let mut last_stats = (Instant::now(), 0_u64);

    loop {
        let window = config.queuer.confirm_window as u64;
        let max_jobs = config.queuer.max_jobs;
        let under_limit = |sent: u64| max_jobs.is_none_or(|max| sent < max);
        if stopping.is_none() && under_limit(ledger.sent) {
            let rate = env.values.rate_per_sec();
            let now = Instant::now();
            let burst = (rate * MAX_BURST.as_secs_f64()).max(1.0);
            credit = (credit + rate * now.duration_since(last).as_secs_f64()).min(burst);
            last = now;
            while credit >= 1.0
                && (!config.queuer.confirms || ledger.unconfirmed() < window)
                && under_limit(ledger.sent)
            {
                publisher.publish(session, &config)?;
                ledger.sent += 1;
                if !config.queuer.confirms {
                    ledger.published += 1;
                }
                credit -= 1.0;
            }
        }
        let done_publishing =
            stopping.is_some() || config.queuer.max_jobs.is_some_and(|max| ledger.sent >= max);
        if done_publishing && ledger.unconfirmed() == 0 {
            break;
        }
        let wait = if done_publishing {
            stopping.map_or(MAX_PACING_SLEEP, |end| {
                end.saturating_duration_since(Instant::now())
            })
        } else {
            let rate = env.values.rate_per_sec();
            if rate > 0.0 {
                Duration::from_secs_f64(((1.0 - credit) / rate).max(0.0)).min(MAX_PACING_SLEEP)
            } else {
                MAX_PACING_SLEEP
            }
        };
        if stopping.is_some_and(|end| Instant::now() >= end) {
            log::warn!(
                "stop grace over; {} publishes were never confirmed",
                ledger.unconfirmed()
            );
            break;
        }
        select! {
            recv(confirms) -> confirm => match confirm {
                Ok(confirm) => {
                    for one in smoother.process(confirm) {
                        match one {
                            Confirm::Ack(_) => ledger.published += 1,
                            Confirm::Nack(_) => ledger.nacked += 1,
                        }
                    }
                }
                Err(_) => return Err(DaemonError::Broker(broker::BrokerError::Lost("confirm channel closed".into()))),
            },
            recv(env.signals) -> signal => match signal {
                Ok(Signal::Stop) if stopping.is_some() => {
                    log::warn!("second stop signal: stopping now");
                    break;
                }
                Ok(Signal::Stop) => {
                    env.notifier.stopping();
                    log::info!("stopping: waiting for {} confirms", ledger.unconfirmed());
                    stopping = Some(Instant::now() + config.queuer.drain_grace);
                }
                Ok(Signal::Reload) => {
                    if let Some(new) = daemon::reload(&config, Role::Queuer, env.flags, env.notifier) {
                        config = new;
                        publisher = Publisher::new(&config);
                        stats = tick(config.log.stats_interval);
                        env.notifier.ready("reloaded");
                    }
                }
                Err(_) => {}
            },
            recv(stats) -> _ => {
                let elapsed = last_stats.0.elapsed().as_secs_f64().max(1e-3);
                let per_sec = (ledger.published - last_stats.1) as f64 / elapsed;
                let line = format!(
                    "stats role=queuer {ledger} published_per_sec={per_sec:.1} {}",
                    daemon::flag_fields(&env.values)
                );
                log::info!("{line}");
                env.notifier.status(&line);
                last_stats = (Instant::now(), ledger.published);
            },
            recv(watchdog) -> _ => env.notifier.watchdog(),
            default(wait) => {}
        }
    }
    log::info!("final role=queuer {ledger}");
    Ok(ledger)
}

/// Builds and sends jobs; holds what does not change between jobs.
struct Publisher {
    id_prefix: String,
    seq: u64,
    body: Vec<u8>,
    ttl_ms: u64,
    work_ms: u64,
    delivery_mode: u8,
    expiration: String,
}

impl Publisher {
    fn new(config: &Config) -> Publisher {
        Publisher {
            id_prefix: format!(
                "{}-{}-{:x}",
                config.flags.context_key,
                std::process::id(),
                now_ms()
            ),
            seq: 0,
            body: vec![b'.'; config.queuer.payload_bytes],
            ttl_ms: config.queuer.ttl_ms,
            work_ms: config.queuer.work_ms,
            delivery_mode: if config.queuer.persistent { 2 } else { 1 },
            expiration: config.queuer.ttl_ms.to_string(),
        }
    }

    fn publish(&mut self, session: &Session, config: &Config) -> Result<(), DaemonError> {
        self.seq += 1;
        let created = now_ms();
        let mut headers = FieldTable::new();
        headers.insert(
            HEADER_CREATED_MS.into(),
            AmqpValue::LongLongInt(ms_i64(created)),
        );
        headers.insert(
            HEADER_DEADLINE_MS.into(),
            AmqpValue::LongLongInt(ms_i64(created.saturating_add(self.ttl_ms))),
        );
        headers.insert(
            HEADER_WORK_MS.into(),
            AmqpValue::LongLongInt(ms_i64(self.work_ms)),
        );
        let properties = AmqpProperties::default()
            .with_message_id(format!("{}-{}", self.id_prefix, self.seq))
            .with_headers(headers)
            .with_expiration(self.expiration.clone())
            .with_delivery_mode(self.delivery_mode)
            .with_content_type("application/octet-stream".into())
            .with_timestamp(created / 1000);
        session
            .channel
            .basic_publish(
                "",
                Publish::with_properties(&self.body, config.broker.queue.clone(), properties),
            )
            .map_err(|e| session.error("publishing", e).into())
    }
}

fn ms_i64(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}
