//! taskqueuer's run loop: publishes jobs at the rate the rate flag asks for.
//!
//! One thread owns the AMQP channel. Pacing is [`Pacer`]'s credit scheme, at the current rate
//! (re-read from the atomics on every pass), so a pause or a slow broker never turns into a
//! burst. With
//! publisher confirms (the default) a job counts as published only once the broker confirms
//! it, and up to `confirm_window` publishes may await their confirm at once.
//!
//! When the connection is lost, the publishes still awaiting a confirm are counted as `lost`
//! (they may or may not have reached the queue; they are not counted as published and not
//! sent again), and the loop reconnects with backoff.

use crate::audit::AuditLog;
use crate::broker::{self, Session, SessionEnd, Supervised};
use crate::clock::now_ms;
use crate::config::{Config, Overflow};
use crate::flag_source::FlagSource;
use crate::flags::{FlagValues, Tally, Watched};
use crate::job::{HEADER_CREATED_MS, HEADER_DEADLINE_MS, HEADER_WORK_MS};
use crate::ledger::QueuerLedger;
use crate::metrics::QueuerMetrics;
use crate::notify::Notifier;
use crate::pacer::{MAX_PACING_SLEEP, Pacer};
use crate::service::{FAST_PATH_RUN, self, DaemonError, Link, Role, StatsTicker, watchdog_ticker};
use crate::signals::Signal;
use amiquip::{AmqpProperties, AmqpValue, Confirm, ConfirmSmoother, FieldTable, Publish};
use crossbeam_channel::{Receiver, never, select};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the queuer needs from the daemon around it.
pub struct QueuerEnv<'a> {
    pub values: Arc<FlagValues>,
    pub signals: Receiver<Signal>,
    pub flags: &'a FlagSource,
    pub notifier: &'a Notifier,
    /// Where the publisher thread records what a scrape shows, when metrics are served.
    pub metrics: Option<QueuerMetrics>,
}

/// Publishes until stopped (or `max_jobs`), reconnecting as needed; waits for outstanding
/// confirms; returns the ledger.
pub fn run(config: Config, env: QueuerEnv<'_>) -> Result<QueuerLedger, DaemonError> {
    let audit = config.queuer.ledger_file.as_deref().map(AuditLog::open);
    let mut queuer = Queuer {
        publisher: Publisher::new(&config),
        audit,
        awaiting_confirm: std::collections::VecDeque::new(),
        sent_at: std::collections::VecDeque::new(),
        stats: StatsTicker::new(config.log.stats_interval),
        config,
        env: &env,
        ledger: QueuerLedger::default(),
        stopping: None,
        link: Link::default(),
        last_stats: (Instant::now(), 0),
        rate_uses: Tally::default(),
        tally_sent: Instant::now(),
    };
    let broker_config = queuer.config.broker.clone();
    let refused = broker::supervise(&broker_config, "taskqueuer", &mut queuer).err();
    queuer.hand_over_tally();
    log::info!("final role=queuer {}", queuer.ledger);
    match refused {
        Some(e) => Err(DaemonError::Broker(e)),
        None => Ok(queuer.ledger),
    }
}

/// How long every publish may be refused before the connection is replaced.
const REFUSED_FOR: Duration = Duration::from_secs(2);
/// The fewest refusals in a row that count, so a slow trickle of publishes is not judged on
/// one or two.
const REFUSED_AT_LEAST: u64 = 10;

/// How often counted flag uses are handed to the flag source thread.
const TALLY_INTERVAL: Duration = Duration::from_secs(1);

/// The publisher thread's state, across connections.
struct Queuer<'e, 'a> {
    /// Uses of each publish-rate evaluation, one per job sent, for LaunchDarkly's events.
    rate_uses: Tally,
    tally_sent: Instant,
    config: Config,
    env: &'e QueuerEnv<'a>,
    publisher: Publisher,
    ledger: QueuerLedger,
    stats: StatsTicker,
    /// When stopping, the moment the wait for confirms ends.
    stopping: Option<Instant>,
    /// The connection as systemd and the logs see it: node in use, outage, READY sent.
    link: Link,
    last_stats: (Instant, u64),
    audit: Option<AuditLog>,
    /// With an audit trail: the sequence numbers of publishes awaiting a confirm, in publish
    /// (= delivery tag) order, so each confirm can be written down under its job id.
    awaiting_confirm: std::collections::VecDeque<u64>,
    /// With metrics: when each publish awaiting a confirm was sent, in publish order, for the
    /// confirm latency.
    sent_at: std::collections::VecDeque<Instant>,
}

impl Supervised for Queuer<'_, '_> {
    /// Enables confirms on a new connection and publishes on it.
    fn use_session(&mut self, session: &Session) -> SessionEnd {
        let confirms = if self.config.queuer.confirms {
            let setup = session
                .channel
                .listen_for_publisher_confirms()
                .map_err(|e| session.error("listening for confirms", e))
                .and_then(|rx| {
                    session
                        .channel
                        .enable_publisher_confirms()
                        .map_err(|e| session.error("enabling publisher confirms", e))
                        .map(|()| rx)
                });
            match setup {
                Ok(rx) => rx,
                Err(e) => return SessionEnd::Failed(e),
            }
        } else {
            never()
        };
        if let Some(metrics) = &self.env.metrics {
            metrics.broker(Some(&session.node));
        }
        let config = &self.config;
        self.link.connected(
            &session.node,
            &session.endpoint.to_string(),
            self.env.notifier,
            || {
                format!(
                    "publishing to queue {:?} at {} (confirms {})",
                    config.broker.queue,
                    session.endpoint,
                    if config.queuer.confirms { "on" } else { "off" }
                )
            },
            &format!("publishing to {}", config.broker.queue),
        );
        self.pass(Some(session), Some(&confirms), None)
    }

    /// Publishes awaiting a confirm on a dead connection will never be confirmed.
    fn session_lost(&mut self, reason: &str) {
        let unconfirmed = self.ledger.unconfirmed();
        self.ledger.lost += unconfirmed;
        self.awaiting_confirm.clear();
        self.sent_at.clear();
        if let Some(metrics) = &self.env.metrics {
            metrics.lost(unconfirmed);
            metrics.broker(None);
        }
        self.link.lost(reason, self.env.notifier, || {
            format!("{unconfirmed} unconfirmed publishes are not counted as published")
        });
    }

    fn stop_after_loss(&self) -> bool {
        self.stopping.is_some() || self.limit_reached()
    }

    fn wait_to_reconnect(&mut self, retry_at: Instant) -> SessionEnd {
        self.pass(None, None, Some(retry_at))
    }
}

impl Queuer<'_, '_> {
    /// Whether the connection should be given up because RabbitMQ has refused (nacked) every
    /// publish on it for [`REFUSED_FOR`]: seen on a quorum queue whose leader moved while the
    /// channel was opened, where the channel kept being refused until it was replaced. A
    /// queue that refuses because it is full (`overflow = "reject-publish"`) is left alone.
    fn refused_too_long(&self, refused: Option<(Instant, u64)>) -> Option<String> {
        let (since, count) = refused?;
        let full_by_design = matches!(
            self.config.broker.overflow,
            Overflow::RejectPublish | Overflow::RejectPublishDlx
        );
        (!full_by_design && count >= REFUSED_AT_LEAST && since.elapsed() >= REFUSED_FOR).then(
            || {
                format!(
                    "RabbitMQ refused all {count} publishes for {} ms; opening a new connection",
                    since.elapsed().as_millis()
                )
            },
        )
    }

    /// Hands the publish-rate uses counted since the last time to the flag source thread.
    fn hand_over_tally(&mut self) {
        self.tally_sent = Instant::now();
        if !self.rate_uses.is_empty() {
            self.env.flags.tally(Watched::Rate, self.rate_uses.take());
        }
    }

    fn limit_reached(&self) -> bool {
        self.config
            .queuer
            .max_jobs
            .is_some_and(|max| self.ledger.sent >= max)
    }

    /// One run of the loop: publishing on `session`, or (with `None`) waiting to reconnect
    /// until `retry_at`.
    fn pass(
        &mut self,
        session: Option<&Session>,
        confirms: Option<&Receiver<Confirm>>,
        retry_at: Option<Instant>,
    ) -> SessionEnd {
        let mut smoother = ConfirmSmoother::new();
        let watchdog = watchdog_ticker(self.env.notifier);
        let retry = retry_at.map_or_else(never, crossbeam_channel::at);
        let no_confirms = never();
        let confirms = confirms.unwrap_or(&no_confirms);
        // Owned, so the select below does not borrow `self`, which its arms mutate.
        let signals = self.env.signals.clone();
        let mut pacer = Pacer::new(Instant::now());
        // Since when every confirm on this connection has been a nack, and how many.
        let mut refused: Option<(Instant, u64)> = None;
        // Confirms taken by the fast path since the last full select.
        let mut fast_run = 0;
        loop {
            if self.tally_sent.elapsed() >= TALLY_INTERVAL {
                self.hand_over_tally();
            }
            if let Some(session) = session {
                if self.stopping.is_none() {
                    pacer.accrue(self.env.values.rate_per_sec(), Instant::now());
                    while self.window_open() && !self.limit_reached() && pacer.take() {
                        if let Err(e) = self.publisher.publish(session, &self.config) {
                            return SessionEnd::Lost(e.to_string());
                        }
                        self.ledger.sent += 1;
                        self.rate_uses.count(self.env.values.rate_evaluation());
                        if let Some(metrics) = &self.env.metrics {
                            metrics.sent();
                            if self.config.queuer.confirms {
                                self.sent_at.push_back(Instant::now());
                            } else {
                                metrics.published();
                            }
                        }
                        if !self.config.queuer.confirms {
                            self.ledger.published += 1;
                            self.audit_confirm(Some(self.publisher.seq), "published");
                        } else if self.audit.is_some() {
                            self.awaiting_confirm.push_back(self.publisher.seq);
                        }
                    }
                }
                let done_publishing = self.stopping.is_some() || self.limit_reached();
                if done_publishing && self.ledger.unconfirmed() == 0 {
                    return SessionEnd::Stop;
                }
            }
            if self.stopping.is_some_and(|end| Instant::now() >= end) {
                log::warn!(
                    "stop grace over; {} publishes were never confirmed",
                    self.ledger.unconfirmed()
                );
                return SessionEnd::Stop;
            }
            // The fast path (see FAST_PATH_RUN): a waiting confirm.
            if fast_run < FAST_PATH_RUN {
                if let Ok(confirm) = confirms.try_recv() {
                    fast_run += 1;
                    if let Some(end) = self.on_confirm(confirm, &mut smoother, &mut refused) {
                        return end;
                    }
                    continue;
                }
            }
            fast_run = 0;
            let wait = self.pacing_wait(&pacer);
            // A reload may replace the stats ticker, so it is taken afresh each time round.
            let stats = self.stats.receiver();
            select! {
                recv(confirms) -> confirm => match confirm {
                    Ok(confirm) => {
                        if let Some(end) = self.on_confirm(confirm, &mut smoother, &mut refused) {
                            return end;
                        }
                    }
                    Err(_) => return SessionEnd::Lost("confirm channel closed".into()),
                },
                recv(signals) -> signal => match signal {
                    Ok(Signal::Stop) if self.stopping.is_some() || session.is_none() => {
                        return SessionEnd::Stop;
                    }
                    Ok(Signal::Stop) => {
                        self.env.notifier.stopping();
                        log::info!("stopping: waiting for {} confirms", self.ledger.unconfirmed());
                        self.stopping = Some(Instant::now() + self.config.queuer.drain_grace);
                    }
                    Ok(Signal::Reload) => self.reload(),
                    Err(_) => {}
                },
                recv(stats) -> _ => {
                    if let Some(audit) = &mut self.audit {
                        audit.flush();
                    }
                    let line = self.stats_line();
                    log::info!("{line}");
                    self.env.notifier.status(&line);
                    self.last_stats = (Instant::now(), self.ledger.published);
                },
                recv(watchdog) -> _ => self.env.notifier.watchdog(),
                recv(retry) -> _ => return SessionEnd::Retry,
                default(wait) => {}
            }
        }
    }

    /// One confirm from the broker, which may cover many publishes; `Some` when it ends the
    /// pass (every publish refused for too long).
    fn on_confirm(
        &mut self,
        confirm: Confirm,
        smoother: &mut ConfirmSmoother,
        refused: &mut Option<(Instant, u64)>,
    ) -> Option<SessionEnd> {
        for one in smoother.process(confirm) {
            let seq = self.awaiting_confirm.pop_front();
            if let Some(metrics) = &self.env.metrics {
                if let Some(sent) = self.sent_at.pop_front() {
                    metrics.confirmed_after(sent.elapsed());
                }
                match one {
                    Confirm::Ack(_) => metrics.published(),
                    Confirm::Nack(_) => metrics.nacked(),
                }
            }
            match one {
                Confirm::Ack(_) => {
                    self.ledger.published += 1;
                    self.audit_confirm(seq, "published");
                    *refused = None;
                }
                Confirm::Nack(_) => {
                    self.ledger.nacked += 1;
                    self.audit_confirm(seq, "nacked");
                    let (_, n) = refused.get_or_insert((Instant::now(), 0));
                    *n += 1;
                }
            }
        }
        self.refused_too_long(*refused).map(SessionEnd::Lost)
    }

    fn audit_confirm(&mut self, seq: Option<u64>, state: &str) {
        if let (Some(audit), Some(seq)) = (&mut self.audit, seq) {
            audit.record(Some(&self.publisher.job_id(seq)), state);
        }
    }

    fn window_open(&self) -> bool {
        !self.config.queuer.confirms
            || self.ledger.unconfirmed() < self.config.queuer.confirm_window as u64
    }

    /// How long to sleep: until the next job is due, but never past [`MAX_PACING_SLEEP`]. With
    /// the confirm window full, nothing can be sent before a confirm arrives, and the confirm
    /// wakes the loop: sleeping 0 there would spin, taking a core from the broker.
    fn pacing_wait(&self, pacer: &Pacer) -> Duration {
        if let Some(end) = self.stopping {
            return end.saturating_duration_since(Instant::now());
        }
        if !self.limit_reached() && self.window_open() {
            pacer.wait(self.env.values.rate_per_sec())
        } else {
            MAX_PACING_SLEEP
        }
    }

    fn reload(&mut self) {
        if let Some(new) = service::reload(
            &self.config,
            Role::Queuer,
            self.env.flags,
            self.env.notifier,
        ) {
            self.stats.set_interval(new.log.stats_interval);
            self.publisher.reconfigure(&new);
            self.config = new;
            self.env.notifier.ready("reloaded");
        }
    }

    fn stats_line(&self) -> String {
        let elapsed = self.last_stats.0.elapsed().as_secs_f64().max(1e-3);
        let per_sec = (self.ledger.published - self.last_stats.1) as f64 / elapsed;
        format!(
            "stats role=queuer {} published_per_sec={per_sec:.1} {} {}",
            self.ledger,
            self.link.broker_fields(),
            service::flag_fields(&self.env.values)
        )
    }
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
        let mut publisher = Publisher {
            id_prefix: format!(
                "{}-{}-{:x}",
                config.flags.context_key,
                std::process::id(),
                now_ms()
            ),
            seq: 0,
            body: Vec::new(),
            ttl_ms: 0,
            work_ms: 0,
            delivery_mode: 2,
            expiration: String::new(),
        };
        publisher.reconfigure(config);
        publisher
    }

    /// Applies the job shape from a (re)loaded config; ids keep counting.
    fn reconfigure(&mut self, config: &Config) {
        self.body = vec![b'.'; config.queuer.payload_bytes];
        self.ttl_ms = config.queuer.ttl_ms;
        self.work_ms = config.queuer.work_ms;
        self.delivery_mode = if config.queuer.persistent { 2 } else { 1 };
        self.expiration = config.queuer.ttl_ms.to_string();
    }

    /// The id of the job published with sequence number `seq`.
    fn job_id(&self, seq: u64) -> String {
        format!("{}-{seq}", self.id_prefix)
    }

    fn publish(&mut self, session: &Session, config: &Config) -> Result<(), broker::BrokerError> {
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
            .with_message_id(self.job_id(self.seq))
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
            .map_err(|e| session.error("publishing", e))
    }
}

fn ms_i64(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}
