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

use crate::broker::{self, BrokerError, Session};
use crate::clock::now_ms;
use crate::config::{Config, ShedAction};
use crate::daemon::{self, DaemonError, Role};
use crate::flags::FlagValues;
use crate::flags::source::FlagSource;
use crate::handler::Handler;
use crate::job::{self, JobDefaults, JobMeta};
use crate::ledger::{Outcome, WorkerLedger};
use crate::notify::Notifier;
use crate::shed::{self, Verdict};
use crate::signals::Signal;
use amiquip::{Consumer, ConsumerMessage, ConsumerOptions, Delivery};
use crossbeam_channel::{Receiver, Sender, bounded, never, select, tick, unbounded};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A job handed to the pool.
struct Task {
    tag: u64,
    meta: JobMeta,
    drop_doomed: bool,
    body: Vec<u8>,
}

/// A pool thread's report on one task.
struct Completion {
    tag: u64,
    outcome: Outcome,
    /// Handler time spent, for the late-work counter.
    worked_ms: u64,
}

/// The parts of the config the consumer thread applies per delivery; replaced on reload.
#[derive(Clone, Copy)]
struct Policy {
    defaults: JobDefaults,
    drop_doomed: bool,
    shed_action: ShedAction,
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
}

/// Connects, consumes until told to stop, drains, and returns the final ledger.
pub fn run(config: Config, env: WorkerEnv<'_>) -> Result<WorkerLedger, DaemonError> {
    let session = broker::connect(&config.broker, "taskworker")?;
    let result = consume(&session, config, &env);
    session.close();
    result
}

fn consume(
    session: &Session,
    config: Config,
    env: &WorkerEnv<'_>,
) -> Result<WorkerLedger, DaemonError> {
    let prefetch = config.worker.prefetch;
    session
        .channel
        .qos(0, prefetch, false)
        .map_err(|e| session.error("setting prefetch", e))?;
    let consumer = session
        .channel
        .basic_consume(config.broker.queue.clone(), ConsumerOptions::default())
        .map_err(|e| session.error("starting the consumer", e))?;

    let (task_tx, task_rx) = bounded::<Task>(usize::from(prefetch));
    let (done_tx, done_rx) = unbounded::<Completion>();
    let pool = start_pool(config.worker.concurrency, &task_rx, &done_tx, &env.handler)?;
    drop(done_tx);

    log::info!(
        "consuming from queue {:?} at {} (concurrency {}, prefetch {})",
        config.broker.queue,
        session.endpoint,
        config.worker.concurrency,
        prefetch
    );
    env.notifier
        .ready(&format!("consuming from {}", config.broker.queue));

    let mut state = ConsumerLoop {
        policy: Policy::from_config(&config),
        config,
        consumer: &consumer,
        values: &env.values,
        pending: HashMap::with_capacity(usize::from(prefetch)),
        ledger: WorkerLedger::default(),
        draining: None,
        cancelled: false,
        malformed_warned_at: None,
        malformed_unwarned: 0,
    };
    let result = state.run(env, &task_tx, &task_rx, &done_rx);
    drop(task_tx);
    let abandoned = state.pending.len();
    let ledger = state.ledger.clone();
    if result.is_ok() && abandoned == 0 {
        for thread in pool {
            let _ = thread.join();
        }
    }
    let mut line = String::from("final role=worker ");
    ledger.write_fields(&mut line);
    line.push_str(&format!(
        " returned_unacked={abandoned} balanced={}",
        ledger.received == ledger.settled() + abandoned as u64
    ));
    log::info!("{line}");
    result.map(|()| ledger)
}

fn start_pool(
    concurrency: usize,
    tasks: &Receiver<Task>,
    done: &Sender<Completion>,
    handler: &Arc<dyn Handler>,
) -> Result<Vec<std::thread::JoinHandle<()>>, DaemonError> {
    (0..concurrency)
        .map(|i| {
            let tasks = tasks.clone();
            let done = done.clone();
            let handler = Arc::clone(handler);
            std::thread::Builder::new()
                .name(format!("pool-{i}"))
                .spawn(move || pool_thread(&tasks, &done, handler.as_ref()))
                .map_err(|e| DaemonError::Io {
                    what: "starting a pool thread",
                    source: e,
                })
        })
        .collect()
}

/// Takes tasks until the consumer thread drops the sender.
fn pool_thread(tasks: &Receiver<Task>, done: &Sender<Completion>, handler: &dyn Handler) {
    for task in tasks {
        let started_ms = now_ms();
        let (outcome, worked_ms) = match shed::at_start(&task.meta, started_ms, task.drop_doomed) {
            Verdict::Expired => (Outcome::Expired, 0),
            Verdict::Doomed => (Outcome::Doomed, 0),
            Verdict::Run | Verdict::Skipped => {
                let result = handler.handle(&task.meta, &task.body);
                let finished_ms = now_ms();
                let worked = finished_ms.saturating_sub(started_ms);
                let outcome = match result {
                    Err(e) => {
                        log::warn!("job failed: {e}");
                        Outcome::Failed
                    }
                    Ok(()) if task.meta.deadline_ms.is_some_and(|d| finished_ms > d) => {
                        Outcome::Late
                    }
                    Ok(()) => Outcome::Done,
                };
                (outcome, worked)
            }
        };
        let completion = Completion {
            tag: task.tag,
            outcome,
            worked_ms,
        };
        if done.send(completion).is_err() {
            break;
        }
    }
}

struct ConsumerLoop<'c, 'a> {
    config: Config,
    policy: Policy,
    consumer: &'c Consumer<'a>,
    values: &'c FlagValues,
    /// Deliveries handed to the pool and not yet settled, by delivery tag.
    pending: HashMap<u64, Delivery>,
    ledger: WorkerLedger,
    /// When draining, the moment the grace period ends.
    draining: Option<Instant>,
    /// Whether the broker confirmed our cancel: no delivery can arrive after that.
    cancelled: bool,
    malformed_warned_at: Option<Instant>,
    malformed_unwarned: u64,
}

impl ConsumerLoop<'_, '_> {
    fn run(
        &mut self,
        env: &WorkerEnv<'_>,
        task_tx: &Sender<Task>,
        task_rx: &Receiver<Task>,
        done_rx: &Receiver<Completion>,
    ) -> Result<(), DaemonError> {
        let open_deliveries = self.consumer.receiver();
        let closed_deliveries = never();
        let mut stats = tick(self.config.log.stats_interval);
        let watchdog = env.notifier.watchdog_interval().map_or_else(never, tick);
        let mut last_stats = (Instant::now(), self.ledger.clone());
        loop {
            // Once the broker confirmed the cancel, amiquip closes the delivery channel.
            let deliveries = if self.cancelled {
                &closed_deliveries
            } else {
                open_deliveries
            };
            let grace_end = self.draining.map_or_else(never, crossbeam_channel::at);
            select! {
                recv(deliveries) -> message => match message {
                    Ok(ConsumerMessage::Delivery(delivery)) => self.on_delivery(delivery, task_tx)?,
                    Ok(ConsumerMessage::ClientCancelled) => self.cancelled = true,
                    Ok(other) => return Err(lost(format!("consumer ended: {other:?}"))),
                    Err(_) => return Err(lost("consumer channel closed".into())),
                },
                recv(done_rx) -> completion => {
                    if let Ok(completion) = completion {
                        self.on_completion(completion)?;
                    }
                }
                recv(env.signals) -> signal => match signal {
                    Ok(Signal::Stop) if self.draining.is_some() => {
                        log::warn!("second stop signal: stopping now; {} running jobs return to the queue", self.pending.len());
                        return Ok(());
                    }
                    Ok(Signal::Stop) => self.start_drain(env.notifier, task_rx)?,
                    Ok(Signal::Reload) => {
                        if let Some(new) = daemon::reload(&self.config, Role::Worker, env.flags, env.notifier) {
                            self.apply_reload(new);
                            stats = tick(self.config.log.stats_interval);
                            env.notifier.ready("reloaded");
                        }
                    }
                    Err(_) => {}
                },
                recv(stats) -> _ => {
                    let line = self.stats_line(&last_stats);
                    log::info!("{line}");
                    env.notifier.status(&line);
                    last_stats = (Instant::now(), self.ledger.clone());
                },
                recv(watchdog) -> _ => env.notifier.watchdog(),
                recv(grace_end) -> _ => {
                    log::warn!(
                        "drain grace period over; {} running jobs return to the queue",
                        self.pending.len()
                    );
                    return Ok(());
                },
            }
            if self.draining.is_some() && self.cancelled && self.pending.is_empty() {
                return Ok(());
            }
        }
    }

    fn on_delivery(
        &mut self,
        mut delivery: Delivery,
        task_tx: &Sender<Task>,
    ) -> Result<(), DaemonError> {
        self.ledger.received += 1;
        if self.draining.is_some() {
            return self.settle(delivery, Outcome::Requeued);
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
                return self.settle(delivery, Outcome::Malformed);
            }
        };
        match shed::at_receipt(&meta, now, self.values.skip_ppm(), self.policy.drop_doomed) {
            Verdict::Run => {
                let tag = delivery.delivery_tag();
                let body = std::mem::take(&mut delivery.body);
                self.pending.insert(tag, delivery);
                let task = Task {
                    tag,
                    meta,
                    drop_doomed: self.policy.drop_doomed,
                    body,
                };
                // Never blocks: the channel holds `prefetch` tasks and the broker sends no more
                // than `prefetch` unacked deliveries.
                task_tx
                    .send(task)
                    .map_err(|_| lost("pool threads are gone".into()))
            }
            Verdict::Expired => self.settle(delivery, Outcome::Expired),
            Verdict::Doomed => self.settle(delivery, Outcome::Doomed),
            Verdict::Skipped => self.settle(delivery, Outcome::Skipped),
        }
    }

    fn on_completion(&mut self, completion: Completion) -> Result<(), DaemonError> {
        if completion.outcome == Outcome::Late {
            self.ledger.late_work_ms += completion.worked_ms;
        }
        match self.pending.remove(&completion.tag) {
            Some(delivery) => self.settle(delivery, completion.outcome),
            None => {
                // Only possible if a tag were settled twice: a bug, never input.
                log::error!("completion for unknown delivery tag {}", completion.tag);
                Ok(())
            }
        }
    }

    /// Acks, rejects or requeues one delivery, then records its outcome.
    fn settle(&mut self, delivery: Delivery, outcome: Outcome) -> Result<(), DaemonError> {
        let result = match outcome {
            Outcome::Done | Outcome::Late => self.consumer.ack(delivery),
            Outcome::Failed | Outcome::Malformed => self.consumer.reject(delivery, false),
            Outcome::Skipped | Outcome::Expired | Outcome::Doomed => {
                match self.policy.shed_action {
                    ShedAction::Ack => self.consumer.ack(delivery),
                    ShedAction::Reject => self.consumer.reject(delivery, false),
                }
            }
            Outcome::Requeued => self.consumer.reject(delivery, true),
        };
        result.map_err(|e| lost(format!("settling a delivery: {e}")))?;
        self.ledger.record(outcome);
        Ok(())
    }

    /// One warning per second at most: a producer sending garbage must not flood the journal.
    fn warn_malformed(&mut self, delivery: &Delivery, why: &job::Malformed) {
        let now = Instant::now();
        if self
            .malformed_warned_at
            .is_some_and(|at| now.duration_since(at) < Duration::from_secs(1))
        {
            self.malformed_unwarned += 1;
            return;
        }
        let id = delivery
            .properties
            .message_id()
            .as_deref()
            .unwrap_or("(no message_id)");
        let also = std::mem::take(&mut self.malformed_unwarned);
        if also > 0 {
            log::warn!("malformed job {id:?}: {why} (and {also} more since the last warning)");
        } else {
            log::warn!("malformed job {id:?}: {why}");
        }
        self.malformed_warned_at = Some(now);
    }

    /// Stops taking jobs: cancels the consumer and hands unstarted jobs back to the queue.
    fn start_drain(
        &mut self,
        notifier: &Notifier,
        task_rx: &Receiver<Task>,
    ) -> Result<(), DaemonError> {
        notifier.stopping();
        let grace = self.config.worker.drain_grace;
        log::info!(
            "stopping: draining {} jobs (grace {} ms)",
            self.pending.len(),
            grace.as_millis()
        );
        self.draining = Some(Instant::now() + grace);
        self.consumer
            .cancel()
            .map_err(|e| lost(format!("cancelling the consumer: {e}")))?;
        while let Ok(task) = task_rx.try_recv() {
            if let Some(delivery) = self.pending.remove(&task.tag) {
                self.settle(delivery, Outcome::Requeued)?;
            }
        }
        Ok(())
    }

    fn apply_reload(&mut self, new: Config) {
        for (changed, key) in [
            (
                new.worker.concurrency != self.config.worker.concurrency,
                "worker.concurrency",
            ),
            (
                new.worker.prefetch != self.config.worker.prefetch,
                "worker.prefetch",
            ),
        ] {
            if changed {
                log::warn!("{key} changed; it takes effect at the next restart");
            }
        }
        self.policy = Policy::from_config(&new);
        let (concurrency, prefetch) = (self.config.worker.concurrency, self.config.worker.prefetch);
        self.config = new;
        self.config.worker.concurrency = concurrency;
        self.config.worker.prefetch = prefetch;
    }

    fn stats_line(&self, last: &(Instant, WorkerLedger)) -> String {
        let elapsed = last.0.elapsed().as_secs_f64().max(1e-3);
        let done_per_sec =
            (self.ledger.count(Outcome::Done) - last.1.count(Outcome::Done)) as f64 / elapsed;
        let mut line = String::from("stats role=worker ");
        self.ledger.write_fields(&mut line);
        line.push_str(&format!(
            " done_per_sec={done_per_sec:.1} {}",
            daemon::flag_fields(self.values)
        ));
        line
    }
}

fn lost(reason: String) -> DaemonError {
    DaemonError::Broker(BrokerError::Lost(reason))
}
