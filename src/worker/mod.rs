//! taskworker's run loop: one consumer thread that owns the AMQP channel, and a pool of
//! handler threads.
//!
//! The consumer thread selects over deliveries, completions from the pool, signals and timer
//! ticks. It parses each delivery, sheds what is not worth starting (acking or rejecting it at
//! once), and hands the rest to the pool over a bounded channel. Pool threads check the
//! deadline again just before starting (time has passed), run the handler, and report back;
//! only the consumer thread acks, so the ledger it keeps is exactly what the broker saw.
//!
//! Prefetch bounds the deliveries held here, so a backlog stays in the broker, where
//! operators can see it, not in this process's memory.
//!
//! When the connection is lost the loop reconnects with backoff and resumes consuming. The
//! deliveries it held belong to the dead channel: their tags mean nothing on a new one, so
//! they are never acked; the broker puts them back in the queue and the ledger counts them as
//! `returned`. Each connection has a generation number that tasks carry, so a job that was
//! running across a reconnect is recognised when it completes.
//!
//! No job leaves without a recorded final state: a job is never handed back to the queue
//! (a retry, a drain, a pause, a held intake, a lost connection) past its deadline or its
//! AMQP expiration, where RabbitMQ would drop it unseen; it is recorded `expired` instead
//! ([`settle::in_time`]), and acked or rejected as the shed action says when the channel
//! still lives.
//!
//! When the handler says the service it needs is unavailable, the job goes back to the queue
//! and intake stops as a pause stops it (unless `handler.when_unavailable = "fail"`): the
//! consumer is cancelled, unstarted jobs go back, running ones finish; the [`handler_probe`]
//! thread asks the handler with backoff whether the service answers, and intake resumes when
//! it does.
//!
//! By thread: this module is the consumer thread's loop; [`pool`] is what the pool threads
//! run; [`settle`] maps outcomes to acks, rejects and requeues; [`handler_probe`] is the
//! thread that probes an unavailable handler.

mod pool;
mod handler_probe;
mod settle;
mod tasks;

use crate::ack_window::AckWindow;
use crate::audit::AuditLog;
use crate::broker::{self, BrokerError, Session, SessionEnd, Supervised};
use crate::clock::now_ms;
use crate::config::{Config, ShedAction, WhenUnavailable};
use crate::flag_source::FlagSource;
use crate::flags::{FlagValues, Tally, Watched};
use crate::gate::Gate;
use crate::handler::estimate::{Doomed, Observed, ShutOut, TypeSlot, WorkEstimates};
use crate::handler::{Handler, HandlerError};
use crate::job::{self, JobDefaults, JobMeta};
use crate::ledger::{Outcome, WorkerLedger};
use crate::metrics::WorkerMetrics;
use crate::notify::Notifier;
use crate::retries::RetryCounts;
use crate::service::{FAST_PATH_RUN, self, DaemonError, Link, Role, StatsTicker, watchdog_ticker};
use crate::shed::{self, Verdict};
use crate::signals::Signal;
use crate::throttle::Throttle;
use amiquip::{Consumer, ConsumerMessage, ConsumerOptions, Delivery};
use crossbeam_channel::{Receiver, bounded, never, select, tick};
use pool::{Completion, Task, start_pool};
use handler_probe::HandlerProbe;
use settle::{Held, delivery_count, disposition, in_time, past, send_frame};
use std::collections::{HashSet, VecDeque};
use tasks::TaskQueue;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a decision may wait to be batched with others into one ack frame. Short enough
/// that a job's ack is not noticeably late; a quarter of the prefetch window flushes at once,
/// so acks never hold the broker back, and no more than that many finished jobs are unacked
/// when a connection drops (they come back and run again). Long enough that at a thousand
/// jobs/s that quarter fills before the timer fires (at 10 ms, one bench run measured 6.3%
/// of a core there against 5.5% at 20 ms).
const ACK_DELAY: Duration = Duration::from_millis(20);

/// Jobs whose retries are counted, per generation (see [`RetryCounts`]).
const RETRY_COUNTS_KEPT: usize = 65_536;

/// How often counted flag uses are handed to the flag source thread.
const TALLY_INTERVAL: Duration = Duration::from_secs(1);

/// The parts of the config the consumer thread applies per delivery; replaced on reload.
#[derive(Clone, Copy)]
struct Policy {
    defaults: JobDefaults,
    drop_doomed: bool,
    shed_action: ShedAction,
    enforce_deadline: bool,
    max_retries: u32,
    retry_delay: Duration,
    /// Hold intake when the handler is unavailable (else fail the job).
    hold_when_unavailable: bool,
}

impl Policy {
    fn from_config(config: &Config) -> Policy {
        Policy {
            defaults: JobDefaults {
                work_ms: config.worker.default_work_ms,
                ttl_ms: config.worker.default_ttl_ms,
            },
            drop_doomed: config.worker.drop_doomed,
            shed_action: config.worker.shed_action,
            enforce_deadline: config.handler.enforce_deadline,
            max_retries: config.handler.max_retries,
            retry_delay: config.handler.retry_delay,
            hold_when_unavailable: config.handler.when_unavailable == WhenUnavailable::Hold,
        }
    }
}

/// What the worker needs from the daemon around it.
pub struct WorkerEnv<'a> {
    pub values: Arc<FlagValues>,
    pub signals: Receiver<Signal>,
    pub flags: &'a FlagSource,
    pub notifier: &'a Notifier,
    pub handler: Arc<dyn Handler>,
    /// Where the consumer thread records what a scrape shows, when metrics are served.
    pub metrics: Option<WorkerMetrics>,
}

/// Consumes until told to stop, reconnecting as needed; drains; returns the final ledger.
pub fn run(config: Config, env: WorkerEnv<'_>) -> Result<WorkerLedger, DaemonError> {
    let prefetch = config.worker.prefetch;
    let tasks = Arc::new(TaskQueue::new(usize::from(prefetch)));
    // Bounded, so a completion costs no allocation: at most `prefetch` tasks of the current
    // connection and the few still running from an old one are ever outstanding, and only the
    // consumer thread, which never blocks on the pool, receives.
    let (done_tx, done_rx) =
        bounded::<Completion>(usize::from(prefetch) + config.worker.max_concurrency);
    let gate = Arc::new(Gate::new(
        env.values
            .concurrency()
            .map_or(config.worker.concurrency, |n| n as usize),
    ));
    let pool = start_pool(
        config.worker.max_concurrency,
        &gate,
        &tasks,
        &done_tx,
        &env.handler,
    )?;
    drop(done_tx);
    let handler_probe = HandlerProbe::start(&env.handler)?;

    let audit = config.worker.ledger_file.as_deref().map(AuditLog::open);
    let estimates = WorkEstimates::new(config.worker.estimate, config.worker.max_job_types);
    let mut worker = Worker {
        policy: Policy::from_config(&config),
        stats: StatsTicker::new(config.log.stats_interval),
        config,
        env: &env,
        tasks,
        done_rx,
        generation: 0,
        window: AckWindow::new(usize::from(prefetch)),
        ack_batch: usize::from(prefetch / 4).max(1),
        flush_at: None,
        stale_running: 0,
        settled_at_loss: HashSet::new(),
        handed_back_late: 0,
        ledger: WorkerLedger::default(),
        draining: None,
        cancelled: false,
        link: Link::default(),
        last_stats: (Instant::now(), 0),
        malformed_warnings: Throttle::new("malformed jobs"),
        failure_warnings: Throttle::new("failed jobs"),
        audit,
        handler_probe,
        unavailable: None,
        estimates,
        retries: RetryCounts::new(RETRY_COUNTS_KEPT),
        retry_later: VecDeque::new(),
        gate,
        paused: false,
        skip_uses: Tally::default(),
        tally_tick: tick(TALLY_INTERVAL),
    };
    let broker_config = worker.config.broker.clone();
    let refused = broker::supervise(&broker_config, "taskworker", &mut worker).err();

    worker.hand_over_tally();
    worker.malformed_warnings.finish();
    worker.failure_warnings.finish();
    // What is still held goes back to the queue when the connection closes.
    let unsettled = worker.let_go(now_ms());
    let Worker {
        ledger,
        stale_running,
        tasks,
        handed_back_late,
        ..
    } = worker;
    tasks.close();
    let abandoned = unsettled + stale_running;
    if abandoned == 0 {
        for thread in pool {
            let _ = thread.join();
        }
    } else {
        // Not waiting for them: what they run must not outlive the daemon.
        env.handler.abort_running();
    }
    let mut line = String::from("final role=worker ");
    ledger.write_fields(&mut line);
    line.push_str(&format!(
        " returned_unacked={abandoned} handed_back_late={handed_back_late} balanced={}",
        ledger.received == ledger.settled() + ledger.returned + abandoned
            && handed_back_late == 0
    ));
    log::info!("{line}");
    match refused {
        Some(e) => Err(DaemonError::Broker(e)),
        None => Ok(ledger),
    }
}

/// The consumer thread's state, across connections.
struct Worker<'e, 'a> {
    config: Config,
    policy: Policy,
    env: &'e WorkerEnv<'a>,
    tasks: Arc<TaskQueue>,
    done_rx: Receiver<Completion>,
    stats: StatsTicker,
    /// Counts connections; tasks carry it so completions from a dead channel are recognised.
    generation: u64,
    /// Deliveries held on this connection, running or decided, and the batching of their
    /// acks.
    window: AckWindow<Held, Outcome>,
    /// Decisions waiting for a flush that make one worth doing at once.
    ack_batch: usize,
    /// When waiting decisions must be flushed at the latest.
    flush_at: Option<Instant>,
    /// Tasks of earlier generations still running in the pool.
    stale_running: u64,
    /// Running jobs of a lost connection that were recorded when it was lost (by generation
    /// and tag), because RabbitMQ drops them: their completions count nothing more.
    settled_at_loss: HashSet<(u64, u64)>,
    /// Hand-backs sent for jobs already past their deadline or expiration: none, unless a
    /// path to the broker skips [`settle::in_time`]. Any makes the final line unbalanced, so
    /// tests catch such a path.
    handed_back_late: u64,
    ledger: WorkerLedger,
    /// When draining, the moment the grace period ends.
    draining: Option<Instant>,
    /// Whether the broker confirmed our cancel: no delivery can arrive after that.
    cancelled: bool,

    /// The connection as systemd and the logs see it: node in use, outage, READY sent.
    link: Link,
    /// When the last stats line was logged, and the `done` count then.
    last_stats: (Instant, u64),
    malformed_warnings: Throttle,
    failure_warnings: Throttle,
    audit: Option<AuditLog>,
    /// Asks an unavailable handler, with backoff, whether it answers again.
    handler_probe: HandlerProbe,
    /// Since when, and why, the handler is unavailable and intake held.
    unavailable: Option<(Instant, String)>,
    /// What has been learned of work times, per job type.
    estimates: WorkEstimates,
    retries: RetryCounts,
    /// Jobs to hand back to the queue once their retry delay is over, by delivery tag, in
    /// the order they are due.
    retry_later: VecDeque<(Instant, u64)>,
    /// How many pool threads run jobs at once (the concurrency lever).
    gate: Arc<Gate>,
    /// Whether intake is stopped (by the pause lever, or because the handler is unavailable)
    /// and the consumer cancelled; deliveries still arriving go back.
    paused: bool,
    /// Uses of each skip-rate evaluation, one per job decided, for LaunchDarkly's events.
    skip_uses: Tally,
    tally_tick: Receiver<Instant>,
}

/// Where a settled delivery is counted: the ledger, the audit trail and the metrics, which
/// must always agree.
struct Recorder<'r> {
    ledger: &'r mut WorkerLedger,
    audit: Option<&'r mut AuditLog>,
    metrics: Option<&'r WorkerMetrics>,
    estimates: &'r WorkEstimates,
    default_work_ms: u64,
}

impl Recorder<'_> {
    /// Counts `held` as settled in `outcome`.
    fn record(self, held: &Held, outcome: Outcome) {
        if let Some(audit) = self.audit {
            audit.record(
                held.delivery.properties.message_id().as_deref(),
                outcome.as_str(),
            );
        }
        self.ledger.record(outcome);
        if let Some(metrics) = self.metrics {
            metrics.settled(self.estimates, held.slot, outcome, self.default_work_ms);
        }
    }
}

/// A one-shot timer for the select loop, remade only when its moment changes: a fresh
/// `crossbeam_channel::at` allocates, and the loop runs once per delivery.
struct Timer {
    at: Option<Instant>,
    rx: Receiver<Instant>,
}

impl Default for Timer {
    fn default() -> Timer {
        Timer {
            at: None,
            rx: never(),
        }
    }
}

impl Timer {
    /// The receiver that fires at `at` (never, for `None`), borrowed: no handle is cloned
    /// per pass either.
    fn at(&mut self, at: Option<Instant>) -> &Receiver<Instant> {
        if at != self.at {
            self.at = at;
            self.rx = at.map_or_else(never, crossbeam_channel::at);
        }
        &self.rx
    }
}

/// How a run of the loop on a live consumer ends.
enum PassEnd {
    Session(SessionEnd),
    /// The pause lever was lifted after the consumer was cancelled: consume again.
    Resume,
}

impl From<SessionEnd> for PassEnd {
    fn from(end: SessionEnd) -> PassEnd {
        PassEnd::Session(end)
    }
}

impl Supervised for Worker<'_, '_> {
    /// Sets up one connection's consumer and runs the loop on it.
    fn use_session(&mut self, session: &Session) -> SessionEnd {
        let setup = session
            .channel
            .qos(0, self.config.worker.prefetch, false)
            .map_err(|e| session.error("setting prefetch", e))
            .and_then(|()| self.consume(session));
        let mut consumer = match setup {
            Ok(consumer) => consumer,
            Err(e) => return SessionEnd::Failed(e),
        };
        self.generation += 1;
        self.cancelled = false;
        self.paused = false;
        self.window = AckWindow::new(usize::from(self.config.worker.prefetch));
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
                    "consuming from queue {:?} at {} (concurrency {}, prefetch {})",
                    config.broker.queue,
                    session.endpoint,
                    config.worker.concurrency,
                    config.worker.prefetch
                )
            },
            &format!("consuming from {}", config.broker.queue),
        );
        loop {
            match self.pass(Some(&consumer), None) {
                PassEnd::Session(end) => return end,
                PassEnd::Resume => {
                    consumer = match self.consume(session) {
                        Ok(consumer) => consumer,
                        Err(e) => return SessionEnd::Failed(e),
                    };
                    self.cancelled = false;
                    self.paused = false;
                    log::info!("resumed: consuming from {:?}", self.config.broker.queue);
                    self.env
                        .notifier
                        .status(&format!("consuming from {}", self.config.broker.queue));
                }
            }
        }
    }

    /// The deliveries of a dead connection can no longer be settled; the broker requeues
    /// them, and drops those past their deadline or expiration, whose final state is
    /// therefore recorded here and now.
    fn session_lost(&mut self, reason: &str) {
        let now = now_ms();
        // Jobs not started, or waiting for their retry: nothing of theirs will complete.
        let mut idle: HashSet<u64> = std::iter::from_fn(|| self.tasks.try_pop())
            .map(|task| task.tag)
            .collect();
        idle.extend(self.retry_later.drain(..).map(|(_, tag)| tag));
        let generation = self.generation;
        let (mut returned, mut running, mut dropped) = (0, 0, Vec::new());
        let settled_at_loss = &mut self.settled_at_loss;
        self.window.abandon(|held, decision| {
            let tag = held.delivery.delivery_tag();
            let is_running = decision.is_none() && !idle.contains(&tag);
            if is_running {
                running += 1;
            }
            if past(held.keep_until_ms, now) {
                let handed_back = decision.unwrap_or(Outcome::Requeued);
                let outcome = in_time(handed_back, held.keep_until_ms, now);
                if is_running {
                    settled_at_loss.insert((generation, tag));
                }
                dropped.push((held, outcome));
            } else if !is_running {
                returned += 1;
            }
        });
        for (held, outcome) in &dropped {
            self.record_without_frame(held, *outcome);
        }
        self.ledger.returned += returned;
        if let Some(metrics) = &self.env.metrics {
            metrics.returned(returned);
        }
        self.stale_running += running;
        self.flush_at = None;
        self.link.lost(reason, self.env.notifier, || {
            let mut why = format!("{} unsettled jobs go back to the queue", returned + running);
            if !dropped.is_empty() {
                why.push_str(&format!(
                    "; {} past their deadline or expiration are recorded as RabbitMQ drops them",
                    dropped.len()
                ));
            }
            why
        });
        if let Some(metrics) = &self.env.metrics {
            metrics.broker(None);
        }
    }

    /// Stopping anyway: the broker has the unsettled jobs back.
    fn stop_after_loss(&self) -> bool {
        self.draining.is_some()
    }

    fn wait_to_reconnect(&mut self, retry_at: Instant) -> SessionEnd {
        match self.pass(None, Some(retry_at)) {
            PassEnd::Session(end) => end,
            // Only a live consumer is resumed.
            PassEnd::Resume => SessionEnd::Retry,
        }
    }
}

impl Worker<'_, '_> {
    /// One run of the select loop: on a live consumer, or (with `None`) while waiting to
    /// reconnect until `retry_at`.
    fn pass(&mut self, consumer: Option<&Consumer<'_>>, retry_at: Option<Instant>) -> PassEnd {
        let closed = never();
        let unheard = never();
        let watchdog = watchdog_ticker(self.env.notifier);
        let retry = retry_at.map_or_else(never, crossbeam_channel::at);
        // Owned handles, so the select below does not borrow `self`, which its arms mutate.
        // Taken once per pass, not per event: these two never change while the pass runs.
        let done_rx = self.done_rx.clone();
        let signals = self.env.signals.clone();
        let levers = self.env.flags.levers_changed().clone();
        let answers = self.handler_probe.answers().clone();
        let (mut grace_timer, mut flush_timer, mut retry_timer) =
            (Timer::default(), Timer::default(), Timer::default());
        let tally_tick = self.tally_tick.clone();
        if let Some(end) = self.apply_levers(consumer) {
            return end;
        }
        // Events taken by the fast path since the last full select.
        let mut fast_run = 0;
        loop {
            // Once the broker confirmed the cancel, amiquip closes the delivery channel.
            let deliveries = match consumer {
                Some(c) if !self.cancelled => c.receiver(),
                _ => &closed,
            };
            // The fast path (see FAST_PATH_RUN): a waiting delivery or completion.
            if fast_run < FAST_PATH_RUN {
                let ready = match deliveries.try_recv() {
                    Ok(message) => Some(self.on_consumer_message(message)),
                    Err(_) => done_rx.try_recv().ok().map(|completion| {
                        self.on_completion(consumer.is_some(), completion);
                        None
                    }),
                };
                if let Some(end) = ready {
                    fast_run += 1;
                    if let Some(end) = end.or_else(|| self.after_event(consumer)) {
                        return end;
                    }
                    continue;
                }
            }
            fast_run = 0;
            // Timers are made anew only when their moment changes, not on every pass.
            let grace_end = grace_timer.at(self.draining);
            let flush_timer = flush_timer.at(self.flush_at);
            let retry_due = retry_timer.at(self.retry_later.front().map(|&(at, _)| at));
            let completions = if self.completion_wakes_wanted(consumer.is_some()) {
                &done_rx
            } else {
                &unheard
            };
            // A reload may replace the stats ticker, so it is taken afresh each time round.
            let stats = self.stats.receiver();
            select! {
                recv(deliveries) -> message => match message {
                    Ok(message) => {
                        if let Some(end) = self.on_consumer_message(message) {
                            return end;
                        }
                    }
                    Err(_) => return SessionEnd::Lost("consumer channel closed".into()).into(),
                },
                recv(completions) -> completion => {
                    if let Ok(completion) = completion {
                        self.on_completion(consumer.is_some(), completion);
                    }
                }
                recv(signals) -> signal => match signal {
                    Ok(Signal::Stop) if self.draining.is_some() || consumer.is_none() => {
                        return self.stop_now(consumer, "stopping now").into();
                    }
                    Ok(Signal::Stop) => {
                        if let Some(consumer) = consumer {
                            if let Err(reason) = self.start_drain(consumer) {
                                return SessionEnd::Lost(reason).into();
                            }
                        }
                    }
                    Ok(Signal::Reload) => self.reload(),
                    Err(_) => {}
                },
                recv(stats) -> _ => {
                    let line = self.stats_line();
                    log::info!("{line}");
                    self.env.notifier.status(&line);
                    self.last_stats = (Instant::now(), self.ledger.count(Outcome::Done));
                    self.malformed_warnings.tick();
                    self.failure_warnings.tick();
                },
                recv(watchdog) -> _ => self.env.notifier.watchdog(),
                recv(grace_end) -> _ => {
                    return self.stop_now(consumer, "drain grace period over").into();
                },
                recv(flush_timer) -> _ => self.take_completions(consumer.is_some()),
                recv(retry_due) -> _ => self.hand_back_due_retries(false),
                recv(retry) -> _ => return SessionEnd::Retry.into(),
                recv(levers) -> _ => {
                    if let Some(end) = self.apply_levers(consumer) {
                        return end;
                    }
                }
                recv(tally_tick) -> _ => self.hand_over_tally(),
                recv(answers) -> _ => self.handler_answers(),
            }
            if let Some(end) = self.after_event(consumer) {
                return end;
            }
        }
    }

    /// Whether a finished job should wake the loop. Not while a flush is already scheduled and
    /// the window has room: the flush timer (at most [`ACK_DELAY`] away) or the next delivery
    /// collects it, so a steady stream of short jobs costs a wake-up per ack frame rather than
    /// one per job. With the window half full the broker may be waiting for acks before it
    /// sends more, and a drain, a pause or a reconnection waits for the jobs still running:
    /// then every finished job wakes the loop.
    fn completion_wakes_wanted(&self, connected: bool) -> bool {
        self.flush_at.is_none()
            || !connected
            || self.draining.is_some()
            || self.paused
            || self.window.held() * 2 >= usize::from(self.config.worker.prefetch)
    }

    /// Every finished job waiting in the channel, before a flush, so it joins that ack frame.
    fn take_completions(&mut self, connected: bool) {
        while let Ok(completion) = self.done_rx.try_recv() {
            self.on_completion(connected, completion);
        }
    }

    /// One message from the consumer; `Some` when it ends the pass.
    fn on_consumer_message(&mut self, message: ConsumerMessage) -> Option<PassEnd> {
        match message {
            ConsumerMessage::Delivery(delivery) => {
                self.on_delivery(delivery);
                None
            }
            ConsumerMessage::ClientCancelled => {
                self.cancelled = true;
                None
            }
            other => Some(SessionEnd::Lost(format!("consumer ended: {other:?}")).into()),
        }
    }

    /// After every event: send what is due to the broker, and end the pass when a drain is
    /// complete or a pause is lifted.
    fn after_event(&mut self, consumer: Option<&Consumer<'_>>) -> Option<PassEnd> {
        if self.unavailable.is_some() && !self.paused && self.draining.is_none() {
            // The handler just became unavailable: intake stops as a pause stops it.
            if let Some(end) = self.apply_levers(consumer) {
                return Some(end);
            }
        }
        if let Some(consumer) = consumer {
            if let Err(reason) = self.maybe_flush(consumer) {
                return Some(SessionEnd::Lost(reason).into());
            }
        }
        if self.draining.is_some() && self.cancelled && self.window.is_empty() {
            return Some(SessionEnd::Stop.into());
        }
        if self.paused
            && self.cancelled
            && self.draining.is_none()
            && self.unavailable.is_none()
            && !self.env.values.paused().unwrap_or(false)
        {
            return Some(PassEnd::Resume);
        }
        None
    }

    /// Applies the lever flags: the pool's concurrency, and pausing (cancel the consumer,
    /// hand unstarted jobs back, let running ones finish and be acked), which an unavailable
    /// handler asks for too. Lifting a pause is done by the loop once the broker has
    /// confirmed the cancel.
    fn apply_levers(&mut self, consumer: Option<&Consumer<'_>>) -> Option<PassEnd> {
        let limit = self
            .env
            .values
            .concurrency()
            .map_or(self.config.worker.concurrency, |n| n as usize);
        if limit != self.gate.limit() {
            log::info!("running up to {limit} jobs at once");
            self.gate.set_limit(limit);
        }
        self.apply_objective();
        let consumer = consumer?;
        let lever = self.env.values.paused() == Some(true);
        if (lever || self.unavailable.is_some()) && !self.paused && self.draining.is_none() {
            self.paused = true;
            if lever {
                log::info!(
                    "paused by flag: taking no new jobs; {} held jobs are finished or handed back",
                    self.window.held()
                );
                self.env.notifier.status("paused by flag");
            }
            if let Err(e) = consumer.cancel() {
                return Some(SessionEnd::Lost(format!("cancelling the consumer: {e}")).into());
            }
            self.hand_back_unstarted();
            if let Err(reason) = self.flush(consumer) {
                return Some(SessionEnd::Lost(reason).into());
            }
        }
        None
    }

    /// Puts in force the shedding objective the flag asks for, or the config's.
    fn apply_objective(&mut self) {
        let objective = self
            .env
            .values
            .shed_objective()
            .unwrap_or(self.config.worker.estimate.objective);
        if self.estimates.set_objective(objective) {
            log::info!("shedding objective: {}", objective.as_str());
            if let Some(metrics) = &self.env.metrics {
                metrics.refresh_work_estimates(&self.estimates, self.policy.defaults.work_ms);
            }
        }
    }

    /// Unstarted jobs go back to the queue (drain, pause).
    fn hand_back_unstarted(&mut self) {
        while let Some(task) = self.tasks.try_pop() {
            self.window.decide(task.tag, Outcome::Requeued);
        }
    }

    /// Hands the skip-rate uses counted since the last time to the flag source thread.
    fn hand_over_tally(&mut self) {
        if !self.skip_uses.is_empty() {
            self.env
                .flags
                .tally(Watched::SkipRate, self.skip_uses.take());
        }
    }

    fn consume<'s>(&self, session: &'s Session) -> Result<Consumer<'s>, BrokerError> {
        session
            .channel
            .basic_consume(self.config.broker.queue.clone(), ConsumerOptions::default())
            .map_err(|e| session.error("starting the consumer", e))
    }

    fn on_delivery(&mut self, mut delivery: Delivery) {
        self.ledger.received += 1;
        if let Some(metrics) = &self.env.metrics {
            metrics.received();
        }
        let tag = delivery.delivery_tag();
        // Resolved for every delivery, so that metrics count it under its type when settled.
        let job_type = delivery.properties.type_().as_deref().unwrap_or("");
        let known = self.estimates.type_count();
        let slot = self.estimates.slot(job_type);
        if self.estimates.type_count() > known && !self.estimates.is_shared(slot) {
            // A new type with a slot of its own: its skip rate can now be evaluated.
            if !job_type.is_empty() {
                self.env.flags.job_type_seen(slot.index(), job_type);
            }
        }
        if self.draining.is_some() || self.paused {
            let defaults = self.policy.defaults;
            let keep_until_ms = job::parse(&delivery.properties, now_ms(), tag, defaults)
                .ok()
                .and_then(|meta| job::keep_until_ms(&meta, &delivery.properties));
            self.window.hold(tag, Held::new(delivery, slot, keep_until_ms));
            self.window.decide(tag, Outcome::Requeued);
            return;
        }
        let now = now_ms();
        let meta = match job::parse(
            &delivery.properties,
            now,
            delivery.delivery_tag(),
            self.policy.defaults,
        ) {
            Ok(meta) => meta,
            Err(why) => {
                self.warn_malformed(&delivery, &why);
                self.window.hold(tag, Held::new(delivery, slot, None));
                self.window.decide(tag, Outcome::Malformed);
                return;
            }
        };
        let mut budget_ms = if meta.work_declared {
            meta.work_ms
        } else {
            self.estimates.budget_ms(slot, self.policy.defaults.work_ms)
        };
        let skip = self.env.values.skip_for(slot.index());
        self.skip_uses.count(skip.id());
        let skip_ppm = skip.value();
        let drop_doomed = self
            .env
            .values
            .deadline_aware()
            .unwrap_or(self.policy.drop_doomed);
        let mut verdict = shed::at_receipt(
            &JobMeta {
                work_ms: budget_ms,
                ..meta
            },
            now,
            skip_ppm,
            drop_doomed,
        );
        let mut probe = false;
        let mut shut_out = None;
        if verdict == Verdict::Doomed && !meta.work_declared {
            let left_ms = meta.deadline_ms.map_or(0, |d| d.saturating_sub(now));
            if let Doomed::Probe(change) = self.estimates.doomed_by_estimate(slot, now, left_ms) {
                // A probe: the estimate keeps this type out; see whether it still holds.
                probe = true;
                shut_out = change;
                budget_ms = 0;
                let unbudgeted = JobMeta { work_ms: 0, ..meta };
                verdict = shed::at_receipt(&unbudgeted, now, skip_ppm, drop_doomed);
                if let Some(metrics) = &self.env.metrics {
                    metrics.probe();
                }
            }
        } else if verdict == Verdict::Run && !meta.work_declared {
            shut_out = self.estimates.started(slot, now);
        }
        if let Some(change) = shut_out {
            self.log_shut_out(slot, change);
        }
        match verdict {
            Verdict::Run => {
                let body = std::mem::take(&mut delivery.body);
                // The task takes the properties; the delivery keeps only what settling it
                // reads (the id, for the audit trail and warnings; the delivery count, for
                // retries), rather than a copy of every header per job.
                let properties = std::mem::take(&mut delivery.properties);
                delivery.properties = settle::kept_for_settling(&properties);
                let redelivered = delivery.redelivered;
                let keep_until_ms = job::keep_until_ms(&meta, &properties);
                self.window
                    .hold(tag, Held::new(delivery, slot, keep_until_ms));
                let task = Task {
                    generation: self.generation,
                    tag,
                    meta,
                    budget_ms,
                    probe,
                    slot,
                    drop_doomed,
                    enforce_deadline: self.policy.enforce_deadline,
                    properties,
                    redelivered,
                    body,
                };
                self.tasks.push(task);
            }
            shed => {
                let outcome = match shed {
                    Verdict::Expired => Outcome::Expired,
                    Verdict::Doomed => Outcome::Doomed,
                    _ => Outcome::Skipped,
                };
                self.window.hold(tag, Held::new(delivery, slot, None));
                self.window.decide(tag, outcome);
            }
        }
    }

    fn on_completion(&mut self, connected: bool, completion: Completion) {
        if completion.generation != self.generation || !connected {
            // Its channel is gone; the broker has already put the job back in the queue, or
            // dropped it, and then it was recorded when the connection was lost.
            self.stale_running = self.stale_running.saturating_sub(1);
            let recorded = self
                .settled_at_loss
                .remove(&(completion.generation, completion.tag));
            if self.stale_running == 0 {
                self.settled_at_loss.clear();
            }
            if recorded {
                return;
            }
            self.ledger.returned += 1;
            if let Some(metrics) = &self.env.metrics {
                metrics.returned(1);
            }
            return;
        }
        if let Some(metrics) = &self.env.metrics {
            metrics.completed(
                completion.wait_ms,
                completion.worked_ms,
                completion.slack_ms,
                completion.lateness_ms,
            );
        }
        let mut outcome = completion.outcome;
        match outcome {
            Outcome::Late => {
                self.ledger.late_work_ms += completion.worked_ms;
                self.ledger.wasted_work_ms += completion.worked_ms;
            }
            Outcome::TimedOut => self.ledger.wasted_work_ms += completion.worked_ms,
            Outcome::Done => {
                if let Some(slack) = completion.slack_ms {
                    self.ledger.slack_ms.record(slack);
                }
            }
            _ => {}
        }
        self.ledger.work_ms += completion.worked_ms;
        if matches!(outcome, Outcome::Done | Outcome::Late | Outcome::TimedOut) {
            let observed = match outcome {
                Outcome::TimedOut if completion.had_whole_deadline => {
                    Observed::Overran(completion.worked_ms)
                }
                Outcome::TimedOut => Observed::Stopped(completion.worked_ms),
                _ => Observed::Finished(completion.worked_ms),
            };
            self.estimates
                .observe(completion.slot, observed, completion.probe, now_ms());
            if let Some(metrics) = &self.env.metrics {
                let budget = self
                    .estimates
                    .budget_ms(completion.slot, self.policy.defaults.work_ms);
                metrics.work_estimate(completion.slot, budget);
            }
        }
        if let Some(wait) = completion.wait_ms {
            self.ledger.wait_ms.record(wait);
        }
        let mut gave_up = None;
        if outcome == Outcome::Retried {
            let earlier = self
                .window
                .get(completion.tag)
                .map_or(0, |held| delivery_count(&held.delivery.properties));
            let retries = self.retries.bump(completion.retry_key, earlier);
            if retries > self.policy.max_retries {
                outcome = Outcome::Failed;
                gave_up = Some(retries - 1);
            }
        }
        if outcome != Outcome::Retried {
            self.retries.forget(completion.retry_key);
        }
        if let Some(HandlerError::Unavailable(why)) = &completion.failure {
            if !self.policy.hold_when_unavailable {
                outcome = Outcome::Failed;
            } else if self.unavailable.is_none() && self.draining.is_none() {
                self.hold_intake(why);
            }
        }
        // The retry would come after the job's deadline or expiration: it ends now.
        let retry_ms = u64::try_from(self.policy.retry_delay.as_millis()).unwrap_or(u64::MAX);
        let too_late_to_retry = outcome == Outcome::Retried
            && past(completion.keep_until_ms, now_ms().saturating_add(retry_ms));
        if too_late_to_retry {
            outcome = Outcome::Expired;
            self.retries.forget(completion.retry_key);
        }
        if let Some(why) = completion.failure.as_ref().filter(|_| outcome != Outcome::Requeued) {
            let window = &self.window;
            let cause = match (gave_up, too_late_to_retry) {
                (Some(_), _) => format!("{} (retries used up)", why.cause()),
                (None, true) => format!("{} (too late to retry)", why.cause()),
                (None, false) => why.cause().to_owned(),
            };
            let worked_ms = completion.worked_ms;
            let id = window
                .get(completion.tag)
                .and_then(|held| held.delivery.properties.message_id().as_deref())
                .unwrap_or("(no message_id)");
            self.failure_warnings.warn_about(&cause, id, || {
                match (gave_up, outcome) {
                    (Some(n), _) => format!("job {id:?} failed: {why}, after {n} retries"),
                    (None, Outcome::Expired) => format!(
                        "job {id:?} expired: {why}, but its deadline or expiration comes \
                         before handler.retry_delay_ms is over"
                    ),
                    (None, Outcome::Retried) => format!("job {id:?} {why}"),
                    (None, Outcome::TimedOut) => {
                        format!("job {id:?} timed_out: {why} after {worked_ms} ms")
                    }
                    (None, _) => format!("job {id:?} failed: {why}"),
                }
            });
        }
        if outcome == Outcome::Retried && !self.policy.retry_delay.is_zero() {
            // Held back, so the job is not handed straight back to a worker (and a service
            // that said 429 is not asked again at once); its prefetch slot stays taken.
            self.retry_later
                .push_back((Instant::now() + self.policy.retry_delay, completion.tag));
            return;
        }
        if !self.window.decide(completion.tag, outcome) {
            // Only possible if a tag were decided twice: a bug, never input.
            log::error!("completion for unknown delivery tag {}", completion.tag);
        }
    }

    /// The handler said the service it needs is unavailable: intake stops (the consumer is
    /// cancelled after this event, as a pause does) and the probe thread starts asking.
    fn hold_intake(&mut self, why: &str) {
        log::warn!(
            "handler unavailable ({why}): taking no new jobs until it answers; unstarted jobs \
             go back to the queue, running ones finish (handler.when_unavailable)"
        );
        self.env
            .notifier
            .status("holding intake: the handler is unavailable");
        self.unavailable = Some((Instant::now(), why.to_owned()));
        self.handler_probe.probe();
        if let Some(metrics) = &self.env.metrics {
            metrics.handler_unavailable(true);
        }
    }

    /// The probe found the handler's service answering: intake resumes once the broker has
    /// confirmed the cancel (and unless the pause lever holds it).
    fn handler_answers(&mut self) {
        let Some((since, _)) = self.unavailable.take() else {
            return;
        };
        log::warn!(
            "handler answers again after {:.1} s: taking jobs again",
            since.elapsed().as_secs_f64()
        );
        if let Some(metrics) = &self.env.metrics {
            metrics.handler_unavailable(false);
        }
    }

    /// Flushes waiting decisions when there are enough of them, when the oldest has waited
    /// [`ACK_DELAY`], or at once while draining; otherwise makes sure a flush is scheduled.
    fn maybe_flush(&mut self, consumer: &Consumer<'_>) -> Result<(), String> {
        let waiting = self.window.decided();
        if waiting == 0 {
            self.flush_at = None;
            return Ok(());
        }
        let now = Instant::now();
        if waiting >= self.ack_batch
            || self.draining.is_some()
            || self.flush_at.is_some_and(|at| now >= at)
        {
            self.flush(consumer)
        } else {
            self.flush_at.get_or_insert(now + ACK_DELAY);
            Ok(())
        }
    }

    /// Sends every waiting decision to the broker, recording each in the ledger (and the
    /// audit trail) just before its frame goes out. If the connection fails midway, what was
    /// recorded but not received by the broker comes back as a redelivery.
    fn flush(&mut self, consumer: &Consumer<'_>) -> Result<(), String> {
        self.flush_at = None;
        let shed_action = self.policy.shed_action;
        let default_work_ms = self.policy.defaults.work_ms;
        // Every frame passes here: a hand-back that would come too late becomes `expired`.
        let now = now_ms();
        self.window
            .revise(|held, outcome| in_time(outcome, held.keep_until_ms, now));
        let Worker {
            window,
            ledger,
            audit,
            estimates,
            env,
            handed_back_late,
            ..
        } = self;
        // Both closures below write to the audit trail: lines as jobs settle, and a flush to
        // the kernel before each frame, so a job's line is safe before its ack goes out.
        let audit = std::cell::RefCell::new(audit.as_mut());
        window
            .flush(
                |outcome| disposition(outcome, shed_action),
                |held, outcome| {
                    if !outcome.is_final() && past(held.keep_until_ms, now) {
                        *handed_back_late += 1;
                    }
                    let mut audit = audit.borrow_mut();
                    let recorder = Recorder {
                        ledger: &mut *ledger,
                        audit: audit.as_deref_mut(),
                        metrics: env.metrics.as_ref(),
                        estimates,
                        default_work_ms,
                    };
                    recorder.record(held, outcome);
                },
                |held, disposition, multiple| {
                    if let Some(audit) = audit.borrow_mut().as_mut() {
                        audit.flush();
                    }
                    send_frame(consumer, held.delivery, disposition, multiple)
                },
            )
            .map_err(|e| format!("settling deliveries: {e}"))
    }

    /// Records a final state the broker is not told of (its channel is gone, and it drops
    /// the job): the ledger, the audit trail (flushed at once) and the metrics.
    fn record_without_frame(&mut self, held: &Held, outcome: Outcome) {
        let recorder = Recorder {
            ledger: &mut self.ledger,
            audit: self.audit.as_mut(),
            metrics: self.env.metrics.as_ref(),
            estimates: &self.estimates,
            default_work_ms: self.policy.defaults.work_ms,
        };
        recorder.record(held, outcome);
        if let Some(audit) = self.audit.as_mut() {
            audit.flush();
        }
    }

    /// Lets go of every delivery still held as the worker stops without waiting for them:
    /// those past their deadline or expiration are recorded (RabbitMQ drops them when the
    /// connection closes); returns how many others go back to the queue unsettled.
    fn let_go(&mut self, now: u64) -> u64 {
        let mut unsettled = 0;
        let mut dropped = Vec::new();
        self.window.abandon(|held, decision| {
            if past(held.keep_until_ms, now) {
                let handed_back = decision.unwrap_or(Outcome::Requeued);
                let outcome = in_time(handed_back, held.keep_until_ms, now);
                dropped.push((held, outcome));
            } else {
                unsettled += 1;
            }
        });
        for (held, outcome) in &dropped {
            self.record_without_frame(held, *outcome);
        }
        unsettled
    }

    /// Stops without waiting for running jobs: what is decided is sent, what runs goes back to
    /// the queue when the connection closes.
    fn stop_now(&mut self, consumer: Option<&Consumer<'_>>, why: &str) -> SessionEnd {
        if let Some(consumer) = consumer {
            if let Err(e) = self.flush(consumer) {
                log::warn!("{e}");
            }
        }
        if self.window.held() > 0 {
            log::warn!(
                "{why}; {} running jobs return to the queue",
                self.window.held()
            );
        }
        SessionEnd::Stop
    }

    fn warn_malformed(&mut self, delivery: &Delivery, why: &job::Malformed) {
        let id = delivery
            .properties
            .message_id()
            .as_deref()
            .unwrap_or("(no message_id)");
        self.malformed_warnings
            .warn_about(&why.to_string(), id, || format!("malformed job {id:?}: {why}"));
    }

    /// Stops taking jobs: cancels the consumer and hands unstarted jobs back to the queue.
    fn start_drain(&mut self, consumer: &Consumer<'_>) -> Result<(), String> {
        self.env.notifier.stopping();
        let grace = self.config.worker.drain_grace;
        log::info!(
            "stopping: draining {} jobs (grace {} ms)",
            self.window.held(),
            grace.as_millis()
        );
        self.draining = Some(Instant::now() + grace);
        if !self.paused {
            // A paused consumer is already cancelled.
            consumer
                .cancel()
                .map_err(|e| format!("cancelling the consumer: {e}"))?;
        }
        self.hand_back_due_retries(true);
        self.hand_back_unstarted();
        self.flush(consumer)
    }

    /// Says once that a type's estimate dooms all its jobs, so that only probes run, and once
    /// that it runs jobs again.
    fn log_shut_out(&self, slot: TypeSlot, change: ShutOut) {
        let name = self
            .estimates
            .names()
            .nth(slot.index())
            .map_or("", |(_, n)| n);
        let estimate_ms = self
            .estimates
            .budget_ms(slot, self.policy.defaults.work_ms);
        let interval_ms = self.config.worker.estimate.probe_interval_ms;
        match change {
            ShutOut::Began => log::warn!(
                "job type {name:?} is shut out by its work estimate ({estimate_ms} ms, more \
                 than its jobs have left): none ran for {interval_ms} ms; one every \
                 {interval_ms} ms runs as a probe until the work is quick again"
            ),
            ShutOut::Ended => log::warn!(
                "job type {name:?} runs jobs again (work estimate {estimate_ms} ms)"
            ),
        }
        if let Some(metrics) = &self.env.metrics {
            metrics.shut_out(slot, change == ShutOut::Began);
        }
    }

    /// Decides the jobs whose retry delay is over (or all of them) as `retried`.
    fn hand_back_due_retries(&mut self, all: bool) {
        let now = Instant::now();
        while let Some(&(at, tag)) = self.retry_later.front() {
            if !all && at > now {
                break;
            }
            self.retry_later.pop_front();
            self.window.decide(tag, Outcome::Retried);
        }
    }

    fn reload(&mut self) {
        let Some(new) = service::reload(
            &self.config,
            Role::Worker,
            self.env.flags,
            self.env.notifier,
        ) else {
            return;
        };
        self.policy = Policy::from_config(&new);
        self.estimates.set_settings(new.worker.estimate);
        self.stats.set_interval(new.log.stats_interval);
        self.config = new;
        self.apply_objective();
        if let Some(metrics) = &self.env.metrics {
            metrics.refresh_work_estimates(&self.estimates, self.policy.defaults.work_ms);
        }
        self.env.notifier.ready("reloaded");
    }

    fn stats_line(&self) -> String {
        let (since, done_before) = self.last_stats;
        let elapsed = since.elapsed().as_secs_f64().max(1e-3);
        let done_per_sec = (self.ledger.count(Outcome::Done) - done_before) as f64 / elapsed;
        let mut line = String::from("stats role=worker ");
        self.ledger.write_fields(&mut line);
        line.push_str(&format!(
            " done_per_sec={done_per_sec:.1} {} {}",
            self.link.broker_fields(),
            service::flag_fields(&self.env.values)
        ));
        self.estimates
            .write_fields(&mut line, self.policy.defaults.work_ms);
        // The types whose skip rate is their own (a flag rule on the job context).
        let own: Vec<String> = self
            .estimates
            .names()
            .filter_map(|(slot, name)| {
                let rate = self.env.values.type_skip_rate(slot)?;
                Some(format!("{name}:{rate}"))
            })
            .collect();
        if !own.is_empty() {
            line.push_str(&format!(" skip_rate_by_type={}", own.join(",")));
        }
        line.push_str(&format!(
            " paused={} handler_unavailable={} concurrency={} deadline_aware={} shed_objective={}",
            u8::from(self.paused),
            u8::from(self.unavailable.is_some()),
            self.gate.limit(),
            u8::from(
                self.env
                    .values
                    .deadline_aware()
                    .unwrap_or(self.policy.drop_doomed)
            ),
            self.estimates.objective().as_str()
        ));
        line
    }
}
