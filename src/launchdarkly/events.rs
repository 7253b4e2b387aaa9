//! LaunchDarkly analytics events, sent from a thread of their own so that the dashboard shows
//! which flags flagshed uses, which values they served, and to which contexts.
//!
//! What is sent is what LaunchDarkly's server-side SDKs send for plain evaluations: once per
//! flush interval a `summary` event (per flag: the caller's default, the context kinds seen, and
//! one counter per variation and flag version), preceded by an `index` event for every context
//! not seen lately. Feature events (`"kind":"feature"`) are never sent: SDKs send them only for
//! flags with `trackEvents`, experiments or debugging turned on, and flagshed's flags are
//! control values, not experiments. Each payload is a JSON array posted to
//! `{events_uri}/bulk` with event schema 4 and a fresh payload ID, retried once with the same ID
//! after a recoverable failure, and dropped after that.
//!
//! The invariants: [`EventProcessor::record`] never blocks and never does I/O (a bounded
//! channel, a full one drops and counts); everything else, the summariser included, belongs to
//! the `ld-events` thread; memory is bounded everywhere (the channel, the held index events,
//! the summary's counters, the context-key cache); and the SDK key is only ever a header value,
//! never formatted into a URL, a log line, an error or `Debug` output.

use super::http;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError, bounded, select, tick};
use launchdarkly_server_sdk_evaluation::{Context, ContextAttributes};
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// LaunchDarkly's analytics events service, for settings that do not name another (a Relay
/// Proxy, a test server).
pub const DEFAULT_EVENTS_URI: &str = "https://events.launchdarkly.com";

/// How often held events are sent; LaunchDarkly's SDKs default to 5 s.
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_secs(5);

/// How many events a payload may hold; LaunchDarkly's SDKs hold 500 between flushes.
pub const DEFAULT_CAPACITY: usize = 500;

/// The pause before the one retry of a failed post, as LaunchDarkly's SDKs wait.
pub const DEFAULT_RETRY_DELAY: Duration = Duration::from_secs(1);

/// How many context keys are remembered, so that a context seen again gets no new index
/// event; LaunchDarkly's SDKs default to 1000.
pub const CONTEXT_KEYS_CAPACITY: usize = 1000;

/// How often the remembered context keys are forgotten, so that LaunchDarkly sees every
/// context again now and then (its SDKs use 5 minutes).
pub const CONTEXT_KEYS_RESET_INTERVAL: Duration = Duration::from_secs(5 * 60);

/// How long one post may take, connection included. Short, because while it lasts the thread
/// summarises nothing (evaluations wait in the channel) and a stopping daemon waits for it.
pub const POST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long [`EventProcessor::stop`] waits for the last post before leaving the thread to
/// finish on its own: a daemon's shutdown must not hang on the events service.
pub const STOP_WAIT: Duration = Duration::from_secs(5);

/// The event schema flagshed's payloads follow (the one LaunchDarkly's current SDKs send).
const EVENT_SCHEMA: &str = "4";

/// The version sent in `User-Agent` and `X-LaunchDarkly-Tags`.
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The shortest flush interval honoured: a zero interval would make the timer fire without
/// pause and keep a core busy.
const MIN_FLUSH_INTERVAL: Duration = Duration::from_millis(1);

/// The most (flag, variation, version) counters a summary holds. LaunchDarkly's SDKs set no
/// limit; flagshed's flags are few, so this only stops a caller that invents flag keys from
/// growing the summary without end.
const MAX_SUMMARY_COUNTERS: usize = 10_000;

/// The most context kinds listed for one flag, for the same reason.
const MAX_KINDS_PER_FLAG: usize = 64;

/// The most bytes of a response body read (and thrown away) so the connection closes cleanly.
const MAX_RESPONSE_BYTES: u64 = 64 * 1024;

/// Settings for the events thread.
#[derive(Clone)]
pub struct EventSettings {
    /// Sent as `Authorization`; never formatted anywhere (see the `Debug` implementation).
    pub sdk_key: String,
    /// Where events go, e.g. [`DEFAULT_EVENTS_URI`] or a Relay Proxy, without a trailing `/`
    /// (one is trimmed anyway); payloads are posted to `{events_uri}/bulk`.
    pub events_uri: String,
    /// How often held events are sent; [`DEFAULT_FLUSH_INTERVAL`] in production.
    pub flush_interval: Duration,
    /// The most events one payload holds: index events plus the one summary. Index events
    /// beyond it are dropped and counted until the next flush, with one warning, so that an
    /// unreachable or slow events service never costs more than this much memory. It also
    /// bounds the channel to the thread, in batches (each as long as its caller makes it).
    /// Values below 1 count as 1.
    pub capacity: usize,
    /// The pause before the one retry of a failed post; [`DEFAULT_RETRY_DELAY`] in production,
    /// shorter in tests so they do not wait for seconds.
    pub retry_delay: Duration,
    /// The proxy rules read from the environment at start, as for streaming and polling;
    /// `None`: posts go directly.
    pub proxy: Option<crate::proxy::ProxyRules>,
}

impl EventSettings {
    /// Settings as LaunchDarkly's SDKs default them, for `sdk_key`.
    pub fn new(sdk_key: String) -> EventSettings {
        EventSettings {
            sdk_key,
            events_uri: DEFAULT_EVENTS_URI.into(),
            flush_interval: DEFAULT_FLUSH_INTERVAL,
            capacity: DEFAULT_CAPACITY,
            retry_delay: DEFAULT_RETRY_DELAY,
            proxy: None,
        }
    }
}

/// Shows everything but the key, so settings can be logged or asserted on safely.
impl fmt::Debug for EventSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventSettings")
            .field("sdk_key", &"<redacted>")
            .field("events_uri", &self.events_uri)
            .field("flush_interval", &self.flush_interval)
            .field("capacity", &self.capacity)
            .field("retry_delay", &self.retry_delay)
            .field("proxy", &self.proxy)
            .finish()
    }
}

/// One batch of identical evaluations: `count` times, flag `flag_key` gave `value` for
/// `context`. Callers count on their hot path and hand over batches, so that a million
/// evaluations cost one message, not a million.
#[derive(Clone, Debug)]
pub struct Evaluation {
    /// The flag evaluated.
    pub flag_key: String,
    /// The flag's version; `None` when the flag does not exist, which LaunchDarkly counts as
    /// `"unknown": true`.
    pub flag_version: Option<u64>,
    /// The index of the variation served, if one was (not for an unknown flag or an error).
    pub variation: Option<usize>,
    /// The value served.
    pub value: Value,
    /// The fallback the caller would have used, which the dashboard shows next to the values.
    pub default: Value,
    /// The context the flag was evaluated for; its kinds are listed in the summary, and it gets
    /// an index event the first time it is seen.
    pub context: Context,
    /// How many evaluations this batch stands for; a batch of 0 is ignored.
    pub count: u64,
    /// Unix time in milliseconds of (the last of) these evaluations: it places them between the
    /// summary's `startDate` and `endDate`, and dates the context's index event.
    pub at_ms: u64,
}

/// The running events thread. [`EventProcessor::stop`] sends what is held and waits (a bounded
/// time) for it; dropping the processor asks the thread to do the same without waiting.
pub struct EventProcessor {
    inbox: Sender<Vec<Evaluation>>,
    /// Capacity 1: a flush already asked for covers any asked for after it. Only tests ask for
    /// one; the daemons' flushes come from the interval and `stop`.
    #[cfg(any(test, feature = "internals"))]
    flush: Sender<()>,
    /// Never sent on: dropping it disconnects the thread's receiver, which tells it to stop.
    stop: Option<Sender<()>>,
    /// Disconnected when the thread ends, so `stop` can wait for it with a timeout.
    done: Receiver<()>,
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
}

/// What the caller's side and the thread both see.
#[derive(Default)]
struct Shared {
    posted_payloads: AtomicU64,
    dropped_events: AtomicU64,
    /// The part of `dropped_events` dropped by `record` on a full channel, so the thread can
    /// log it (the caller's side never logs).
    dropped_at_inbox: AtomicU64,
    /// Set for good once LaunchDarkly refused the key (or there is no usable key or URL).
    disabled: AtomicBool,
}

impl EventProcessor {
    /// Starts the `ld-events` thread. Fails only if the thread cannot be created: a key or URL
    /// that cannot be used is logged once, and events are then discarded, so that a daemon
    /// never stops over analytics.
    pub fn spawn(settings: EventSettings) -> std::io::Result<EventProcessor> {
        let capacity = settings.capacity.max(1);
        let (inbox_tx, inbox_rx) = bounded(capacity);
        #[cfg(any(test, feature = "internals"))]
        let (flush_tx, flush_rx) = bounded(1);
        #[cfg(not(any(test, feature = "internals")))]
        let flush_rx = crossbeam_channel::never();
        let (stop_tx, stop_rx) = bounded::<()>(0);
        let (done_tx, done_rx) = bounded::<()>(0);
        let shared = Arc::new(Shared::default());
        let mut dispatcher = Dispatcher::new(&settings, Arc::clone(&shared));
        let thread = std::thread::Builder::new()
            .name("ld-events".into())
            .spawn(move || {
                dispatcher.run(&inbox_rx, &flush_rx, &stop_rx);
                drop(done_tx);
            })?;
        Ok(EventProcessor {
            inbox: inbox_tx,
            #[cfg(any(test, feature = "internals"))]
            flush: flush_tx,
            stop: Some(stop_tx),
            done: done_rx,
            thread: Some(thread),
            shared,
        })
    }

    /// Hands evaluations to the thread. Never blocks and never does I/O, so it can be called
    /// from any thread, hot paths included: when the channel is full (the thread is busy
    /// posting), the batch is dropped and counted in [`EventProcessor::dropped_events`]. Once
    /// LaunchDarkly has refused the key, batches are discarded without being counted.
    pub fn record(&self, evaluations: Vec<Evaluation>) {
        if evaluations.is_empty() || self.shared.disabled.load(Ordering::Relaxed) {
            return;
        }
        let batch = match self.inbox.try_send(evaluations) {
            Ok(()) => return,
            Err(TrySendError::Full(batch) | TrySendError::Disconnected(batch)) => batch,
        };
        let lost = batch
            .iter()
            .fold(0u64, |sum, e| sum.saturating_add(e.count));
        self.shared
            .dropped_events
            .fetch_add(lost, Ordering::Relaxed);
        self.shared
            .dropped_at_inbox
            .fetch_add(lost, Ordering::Relaxed);
    }

    /// Asks for a flush now instead of at the next interval, so tests need not wait for one;
    /// does not wait for it. Evaluations recorded before the call are in it.
    #[cfg(any(test, feature = "internals"))]
    pub fn flush(&self) {
        // Full means a flush is already asked for, and it will see these evaluations too.
        let _ = self.flush.try_send(());
    }

    /// Sends what is held, waits for that post (at most [`STOP_WAIT`]), and stops the thread.
    /// Evaluations recorded before the call are in that post.
    pub fn stop(mut self) {
        self.stop.take();
        match self.done.recv_timeout(STOP_WAIT) {
            Err(RecvTimeoutError::Disconnected) | Ok(()) => {
                if let Some(thread) = self.thread.take() {
                    let _ = thread.join();
                }
                // What the run cost in analytics, once, where an operator reads the exit.
                match self.dropped_events() {
                    0 => log::info!(
                        "LaunchDarkly events: {} payloads posted, none dropped",
                        self.posted_payloads()
                    ),
                    dropped => log::warn!(
                        "LaunchDarkly events: {} payloads posted, {dropped} events dropped",
                        self.posted_payloads()
                    ),
                }
            }
            Err(RecvTimeoutError::Timeout) => log::warn!(
                "LaunchDarkly events: the last post did not finish within {STOP_WAIT:?}; \
                 stopping without waiting for it"
            ),
        }
    }

    /// How many payloads LaunchDarkly has accepted so far (logged at stop).
    pub fn posted_payloads(&self) -> u64 {
        self.shared.posted_payloads.load(Ordering::Relaxed)
    }

    /// How many events will never reach LaunchDarkly: evaluations dropped on a full channel or
    /// in a payload that failed twice, and index events beyond the capacity or in such a
    /// payload (logged at stop). Many means the events service was unreachable or the capacity
    /// too small.
    pub fn dropped_events(&self) -> u64 {
        self.shared.dropped_events.load(Ordering::Relaxed)
    }
}

/// Asks the thread to send what it holds and end, without waiting: dropping must never hang.
impl Drop for EventProcessor {
    fn drop(&mut self) {
        self.stop.take();
    }
}

/// The thread's state: what is held between flushes, and how posting goes.
struct Dispatcher {
    outbox: Outbox,
    poster: Option<Poster>,
    shared: Arc<Shared>,
    flush_interval: Duration,
    retry_delay: Duration,
    /// Whether the last payload was dropped after its retry: the warning is logged once per
    /// outage, and its end once.
    failing: bool,
    /// `Shared::dropped_at_inbox` at the last flush tick, to notice new drops.
    inbox_drops_seen: u64,
    /// Whether drops (channel or capacity) have been warned about and not ended yet.
    dropping: bool,
}

impl Dispatcher {
    fn new(settings: &EventSettings, shared: Arc<Shared>) -> Dispatcher {
        let poster = Poster::new(settings);
        if poster.is_none() {
            shared.disabled.store(true, Ordering::Relaxed);
        }
        Dispatcher {
            outbox: Outbox::new(settings.capacity, CONTEXT_KEYS_CAPACITY),
            poster,
            shared,
            flush_interval: settings.flush_interval.max(MIN_FLUSH_INTERVAL),
            retry_delay: settings.retry_delay,
            failing: false,
            inbox_drops_seen: 0,
            dropping: false,
        }
    }

    fn run(
        &mut self,
        inbox: &Receiver<Vec<Evaluation>>,
        flush: &Receiver<()>,
        stop: &Receiver<()>,
    ) {
        let flush_tick = tick(self.flush_interval);
        let reset_tick = tick(CONTEXT_KEYS_RESET_INTERVAL);
        loop {
            select! {
                recv(inbox) -> batch => match batch {
                    Ok(batch) => self.accept(batch),
                    Err(_) => break,
                },
                recv(flush) -> asked => {
                    if asked.is_err() {
                        break;
                    }
                    self.drain(inbox);
                    self.flush();
                }
                recv(flush_tick) -> _ => {
                    self.flush();
                    self.report_drops();
                }
                recv(reset_tick) -> _ => self.outbox.contexts.clear(),
                recv(stop) -> _ => break,
            }
        }
        self.drain(inbox);
        self.flush();
    }

    /// Summarises a batch, unless events are off for good.
    fn accept(&mut self, batch: Vec<Evaluation>) {
        if self.shared.disabled.load(Ordering::Relaxed) {
            return;
        }
        for evaluation in batch {
            let dropped = self.outbox.add(&evaluation);
            if dropped > 0 {
                self.shared
                    .dropped_events
                    .fetch_add(dropped, Ordering::Relaxed);
                if !self.dropping {
                    self.dropping = true;
                    log::warn!(
                        "LaunchDarkly events: no room for more events before the next flush \
                         (capacity {}); dropping the rest, counted in the dropped events",
                        self.outbox.capacity
                    );
                }
            }
        }
    }

    /// Takes in whatever is already in the channel, so a flush includes every evaluation
    /// recorded before it was asked for.
    fn drain(&mut self, inbox: &Receiver<Vec<Evaluation>>) {
        while let Ok(batch) = inbox.try_recv() {
            self.accept(batch);
        }
    }

    /// Warns once when `record` starts dropping on a full channel, and clears the warned state
    /// after a quiet interval so that the next episode is logged too.
    fn report_drops(&mut self) {
        let inbox_drops = self.shared.dropped_at_inbox.load(Ordering::Relaxed);
        let new_drops = inbox_drops.saturating_sub(self.inbox_drops_seen);
        self.inbox_drops_seen = inbox_drops;
        let capacity_drops = std::mem::take(&mut self.outbox.dropped_since_flush);
        if new_drops > 0 && !self.dropping {
            self.dropping = true;
            log::warn!(
                "LaunchDarkly events: {new_drops} evaluations dropped because they were recorded \
                 faster than they could be summarised"
            );
        } else if new_drops == 0 && capacity_drops == 0 {
            self.dropping = false;
        }
    }

    /// Sends what is held, if anything.
    fn flush(&mut self) {
        if self.shared.disabled.load(Ordering::Relaxed) {
            self.outbox.clear();
            return;
        }
        let Some(payload) = self.outbox.take_payload() else {
            return;
        };
        let body = match serde_json::to_vec(&payload.events) {
            Ok(body) => body,
            Err(e) => {
                log::error!("LaunchDarkly events: payload not serialisable, dropped: {e}");
                self.drop_payload(&payload);
                return;
            }
        };
        let Some(poster) = &self.poster else {
            return;
        };
        let payload_id = payload_id();
        let mut failure = match poster.post(&body, &payload_id) {
            Ok(()) => return self.posted(),
            Err(failure) => failure,
        };
        if let http::Failure::Recoverable(_) = failure {
            log::debug!("LaunchDarkly events: post failed, retrying once: {failure:?}");
            std::thread::sleep(self.retry_delay);
            failure = match poster.post(&body, &payload_id) {
                Ok(()) => return self.posted(),
                Err(failure) => failure,
            };
        }
        match failure {
            http::Failure::Recoverable(message) => {
                self.drop_payload(&payload);
                if self.failing {
                    log::debug!("LaunchDarkly events: payload dropped: {message}");
                } else {
                    self.failing = true;
                    log::warn!(
                        "LaunchDarkly events: payload of {} events dropped after a retry: \
                         {message}",
                        payload.events.len()
                    );
                }
            }
            http::Failure::Unrecoverable(message) => {
                self.drop_payload(&payload);
                self.shared.disabled.store(true, Ordering::Relaxed);
                self.outbox.clear();
                log::error!(
                    "LaunchDarkly events: refused ({message}); no more events will be sent \
                     until restart"
                );
            }
        }
    }

    fn posted(&mut self) {
        self.shared.posted_payloads.fetch_add(1, Ordering::Relaxed);
        if self.failing {
            self.failing = false;
            log::info!("LaunchDarkly events: delivered again");
        }
    }

    fn drop_payload(&self, payload: &Payload) {
        self.shared
            .dropped_events
            .fetch_add(payload.event_count, Ordering::Relaxed);
    }
}

/// Posts payloads to `{events_uri}/bulk`: the URL, the key and a configured agent.
struct Poster {
    url: String,
    sdk_key: String,
    agent: ureq::Agent,
}

impl Poster {
    /// `None`, after one logged error, if the key cannot be a header value or the URL is not
    /// one: then nothing can ever be sent.
    fn new(settings: &EventSettings) -> Option<Poster> {
        if !http::key_is_sendable(&settings.sdk_key) {
            log::error!(
                "LaunchDarkly events are off: the SDK key is empty or holds characters not \
                 allowed in an HTTP header"
            );
            return None;
        }
        let url = format!("{}/bulk", settings.events_uri.trim_end_matches('/'));
        if let Err(e) = url::Url::parse(&url) {
            log::error!("LaunchDarkly events are off: {url:?} is not a URL ({e})");
            return None;
        }
        let agent = http::agent_for(
            "events",
            &url,
            settings.proxy.as_ref(),
            POST_TIMEOUT,
            Some(POST_TIMEOUT),
        );
        Some(Poster {
            url,
            sdk_key: settings.sdk_key.clone(),
            agent,
        })
    }

    /// One post of `body`, with the headers LaunchDarkly's SDKs send. The key is only a header
    /// value (checked sendable in `new`), and the failure's message names the URL, never it.
    fn post(&self, body: &[u8], payload_id: &str) -> Result<(), http::Failure> {
        let result = self
            .agent
            .post(&self.url)
            .set("Authorization", &self.sdk_key)
            .set("User-Agent", &format!("flagshed/{VERSION}"))
            .set("Content-Type", "application/json")
            .set("X-LaunchDarkly-Event-Schema", EVENT_SCHEMA)
            .set("X-LaunchDarkly-Payload-ID", payload_id)
            .set(
                "X-LaunchDarkly-Tags",
                &format!("application-id/flagshed application-version/{VERSION}"),
            )
            .send_bytes(body);
        match result {
            Ok(response) => {
                // Read what little the service answers, so the connection ends cleanly.
                let mut reader = response.into_reader().take(MAX_RESPONSE_BYTES);
                let _ = std::io::copy(&mut reader, &mut std::io::sink());
                Ok(())
            }
            Err(error) => Err(http::failure(&self.url, error)),
        }
    }
}

/// A payload ready to post, and how many events it stands for (to count them if dropped).
struct Payload {
    events: Vec<Value>,
    event_count: u64,
}

/// What is held between flushes: index events, the summary, and the context keys seen.
struct Outbox {
    /// The most events a payload holds, the summary included.
    capacity: usize,
    index_events: Vec<Value>,
    summary: Summary,
    contexts: ContextKeys,
    /// Events dropped for lack of room since the last flush tick.
    dropped_since_flush: u64,
}

impl Outbox {
    fn new(capacity: usize, context_keys: usize) -> Outbox {
        Outbox {
            capacity: capacity.max(1),
            index_events: Vec::new(),
            summary: Summary::default(),
            contexts: ContextKeys::new(context_keys),
            dropped_since_flush: 0,
        }
    }

    /// Adds an evaluation to the summary, and an index event if its context is new; returns
    /// how many events were dropped for lack of room.
    fn add(&mut self, evaluation: &Evaluation) -> u64 {
        if evaluation.count == 0 {
            return 0;
        }
        let mut dropped = 0;
        if !self.summary.add(evaluation) {
            dropped += evaluation.count;
        }
        // As the SDKs do, the context counts as seen even when its index event finds no room,
        // so a full outbox does not turn into one attempt per evaluation.
        if self.contexts.notice(evaluation.context.canonical_key()) {
            // One place stays free for the summary.
            if self.index_events.len() + 1 < self.capacity {
                match index_event(&evaluation.context, evaluation.at_ms) {
                    Ok(event) => self.index_events.push(event),
                    Err(e) => log::debug!("LaunchDarkly events: context not serialisable: {e}"),
                }
            } else {
                dropped += 1;
            }
        }
        self.dropped_since_flush += dropped;
        dropped
    }

    /// The index events then the summary, in the order the SDKs send them; `None` when there
    /// is nothing to send.
    fn take_payload(&mut self) -> Option<Payload> {
        let mut events = std::mem::take(&mut self.index_events);
        let mut event_count = events.len() as u64;
        let summary = std::mem::take(&mut self.summary);
        if !summary.is_empty() {
            event_count += summary.evaluations;
            events.push(summary.to_json());
        }
        (!events.is_empty()).then_some(Payload {
            events,
            event_count,
        })
    }

    fn clear(&mut self) {
        self.index_events.clear();
        self.summary = Summary::default();
    }
}

/// An index event: the context as the SDKs put it in events. `ContextAttributes` is the
/// evaluation crate's own event serialisation (the Rust SDK's), which redacts private
/// attributes into `_meta.redactedAttributes` and writes a multi-context as
/// `{"kind":"multi","<kind>":{…}}`; flagshed configures no private attributes, so only those
/// the context itself marks private are redacted.
fn index_event(context: &Context, at_ms: u64) -> serde_json::Result<Value> {
    let attributes = ContextAttributes::from_context(context.clone(), false, HashSet::new());
    Ok(json!({
        "kind": "index",
        "creationDate": at_ms,
        "context": serde_json::to_value(attributes)?,
    }))
}

/// The evaluations of one flush interval, counted per flag, variation and version.
#[derive(Default)]
struct Summary {
    start_ms: Option<u64>,
    end_ms: u64,
    flags: BTreeMap<String, FlagSummary>,
    /// Counters over all flags, against [`MAX_SUMMARY_COUNTERS`].
    counters: usize,
    /// Evaluations summarised, to count them if the payload is dropped.
    evaluations: u64,
}

struct FlagSummary {
    default: Value,
    context_kinds: BTreeSet<String>,
    /// Keyed by (version, variation): one counter per version and variation, as the SDKs group
    /// them; a `None` version is an unknown flag.
    counters: BTreeMap<(Option<u64>, Option<usize>), Counter>,
}

struct Counter {
    value: Value,
    count: u64,
}

impl Summary {
    fn is_empty(&self) -> bool {
        self.flags.is_empty()
    }

    /// Counts `evaluation`; `false` if it needed a new counter beyond the limit.
    fn add(&mut self, evaluation: &Evaluation) -> bool {
        let counter_key = (evaluation.flag_version, evaluation.variation);
        let known = self
            .flags
            .get(&evaluation.flag_key)
            .is_some_and(|flag| flag.counters.contains_key(&counter_key));
        if !known && self.counters >= MAX_SUMMARY_COUNTERS {
            return false;
        }
        self.start_ms = Some(
            self.start_ms
                .map_or(evaluation.at_ms, |start| start.min(evaluation.at_ms)),
        );
        self.end_ms = self.end_ms.max(evaluation.at_ms);
        self.evaluations = self.evaluations.saturating_add(evaluation.count);
        // The first evaluation of a flag in the interval gives its default, as in the SDKs.
        let flag = self
            .flags
            .entry(evaluation.flag_key.clone())
            .or_insert_with(|| FlagSummary {
                default: evaluation.default.clone(),
                context_kinds: BTreeSet::new(),
                counters: BTreeMap::new(),
            });
        for kind in evaluation.context.kinds() {
            if flag.context_kinds.len() < MAX_KINDS_PER_FLAG
                || flag.context_kinds.contains(kind.as_ref())
            {
                flag.context_kinds.insert(kind.as_ref().to_owned());
            }
        }
        let counter = flag.counters.entry(counter_key).or_insert_with(|| {
            self.counters += 1;
            // And the first evaluation of a counter gives its value.
            Counter {
                value: evaluation.value.clone(),
                count: 0,
            }
        });
        counter.count = counter.count.saturating_add(evaluation.count);
        true
    }

    /// The summary event, shaped as the SDKs send it: `unknown` instead of `version` for a
    /// flag that does not exist, `variation` only when one was served.
    fn to_json(&self) -> Value {
        let mut features = Map::new();
        for (key, flag) in &self.flags {
            let counters: Vec<Value> = flag
                .counters
                .iter()
                .map(|(&(version, variation), counter)| {
                    let mut out = Map::new();
                    out.insert("value".into(), counter.value.clone());
                    match version {
                        Some(version) => out.insert("version".into(), json!(version)),
                        None => out.insert("unknown".into(), json!(true)),
                    };
                    if let Some(variation) = variation {
                        out.insert("variation".into(), json!(variation));
                    }
                    out.insert("count".into(), json!(counter.count));
                    Value::Object(out)
                })
                .collect();
            features.insert(
                key.clone(),
                json!({
                    "default": flag.default,
                    "contextKinds": flag.context_kinds,
                    "counters": counters,
                }),
            );
        }
        json!({
            "kind": "summary",
            "startDate": self.start_ms.unwrap_or(self.end_ms),
            "endDate": self.end_ms,
            "features": features,
        })
    }
}

/// The context keys seen lately, least recently seen evicted first: a context gets an index
/// event only when it is not here, as in the SDKs' LRU cache.
struct ContextKeys {
    capacity: usize,
    /// Key to the tick it was last seen at.
    last_seen: HashMap<String, u64>,
    /// Tick to key, oldest first, to find what to evict.
    by_age: BTreeMap<u64, String>,
    next_tick: u64,
}

impl ContextKeys {
    fn new(capacity: usize) -> ContextKeys {
        ContextKeys {
            capacity: capacity.max(1),
            last_seen: HashMap::new(),
            by_age: BTreeMap::new(),
            next_tick: 0,
        }
    }

    /// Marks `key` as seen now; `true` if it was not remembered (a new context).
    fn notice(&mut self, key: &str) -> bool {
        let tick = self.next_tick;
        self.next_tick += 1;
        if let Some(seen) = self.last_seen.get_mut(key) {
            self.by_age.remove(seen);
            *seen = tick;
            self.by_age.insert(tick, key.to_owned());
            return false;
        }
        if self.last_seen.len() >= self.capacity {
            if let Some((_, oldest)) = self.by_age.pop_first() {
                self.last_seen.remove(&oldest);
            }
        }
        self.last_seen.insert(key.to_owned(), tick);
        self.by_age.insert(tick, key.to_owned());
        true
    }

    fn clear(&mut self) {
        self.last_seen.clear();
        self.by_age.clear();
    }
}

/// A fresh random (version 4) UUID, the payload ID LaunchDarkly uses to drop a payload it
/// receives twice (a retry of one whose answer was lost). Taken from the kernel's random
/// source; should that fail, from std's randomly keyed hasher, which is unique enough for this.
fn payload_id() -> String {
    let mut bytes = [0u8; 16];
    let from_kernel =
        std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if from_kernel.is_err() {
        use std::hash::BuildHasher;
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let count = COUNTER.fetch_add(1, Ordering::Relaxed);
        let state = std::collections::hash_map::RandomState::new();
        let high = state.hash_one((nanos, count, std::process::id(), 1u8));
        let low = state.hash_one((nanos, count, std::process::id(), 2u8));
        bytes[..8].copy_from_slice(&high.to_le_bytes());
        bytes[8..].copy_from_slice(&low.to_le_bytes());
    }
    format_uuid_v4(bytes)
}

/// Formats 16 random bytes as a version 4, RFC 4122 variant UUID.
fn format_uuid_v4(mut bytes: [u8; 16]) -> String {
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use launchdarkly_server_sdk_evaluation::{ContextBuilder, MultiContextBuilder};

    fn service(key: &str) -> Context {
        ContextBuilder::new(key)
            .kind("service")
            .set_string("role", "worker")
            .build()
            .expect("valid context")
    }

    fn eval(
        flag: &str,
        version: Option<u64>,
        variation: Option<usize>,
        value: Value,
    ) -> Evaluation {
        Evaluation {
            flag_key: flag.into(),
            flag_version: version,
            variation,
            value,
            default: json!(0),
            context: service("host-1"),
            count: 1,
            at_ms: 1_000,
        }
    }

    fn summary_of(outbox: &mut Outbox) -> Value {
        let payload = outbox.take_payload().expect("something to send");
        payload
            .events
            .into_iter()
            .find(|e| e["kind"] == "summary")
            .expect("a summary")
    }

    #[test]
    fn counters_are_grouped_by_variation_and_version() {
        let mut outbox = Outbox::new(100, 100);
        for (version, variation, value, count) in [
            (Some(3), Some(1), json!(25), 4),
            (Some(3), Some(1), json!(25), 6),
            (Some(3), Some(2), json!(50), 1),
            (Some(4), Some(1), json!(25), 2),
        ] {
            outbox.add(&Evaluation {
                count,
                ..eval("skip-rate", version, variation, value)
            });
        }
        let summary = summary_of(&mut outbox);
        assert_eq!(
            summary["features"]["skip-rate"]["counters"],
            json!([
                {"version": 3, "variation": 1, "value": 25, "count": 10},
                {"version": 3, "variation": 2, "value": 50, "count": 1},
                {"version": 4, "variation": 1, "value": 25, "count": 2},
            ])
        );
        assert_eq!(summary["features"]["skip-rate"]["default"], json!(0));
    }

    #[test]
    fn unknown_flag_is_counted_as_unknown_without_version() {
        let mut outbox = Outbox::new(100, 100);
        outbox.add(&Evaluation {
            default: json!(7.5),
            count: 3,
            ..eval("missing", None, None, json!(7.5))
        });
        let summary = summary_of(&mut outbox);
        assert_eq!(
            summary["features"]["missing"],
            json!({
                "default": 7.5,
                "contextKinds": ["service"],
                "counters": [{"unknown": true, "value": 7.5, "count": 3}],
            })
        );
    }

    /// The multi-context of a service and a job type, as the worker evaluates the skip rate.
    fn service_and_job(host: &str, job_type: &str) -> Context {
        let job = ContextBuilder::new(job_type)
            .kind("job")
            .build()
            .expect("valid context");
        MultiContextBuilder::new()
            .add_context(service(host))
            .add_context(job)
            .build()
            .expect("valid multi-context")
    }

    #[test]
    fn context_kinds_list_every_kind_of_a_multi_context_once() {
        let multi = service_and_job("host-1", "resize");
        let mut outbox = Outbox::new(100, 100);
        outbox.add(&eval("rate", Some(1), Some(0), json!(1)));
        outbox.add(&Evaluation {
            context: multi,
            ..eval("rate", Some(1), Some(0), json!(1))
        });
        let summary = summary_of(&mut outbox);
        assert_eq!(
            summary["features"]["rate"]["contextKinds"],
            json!(["job", "service"])
        );
    }

    #[test]
    fn dates_span_the_evaluations() {
        let mut outbox = Outbox::new(100, 100);
        for at_ms in [5_000, 2_000, 9_000] {
            outbox.add(&Evaluation {
                at_ms,
                ..eval("rate", Some(1), Some(0), json!(1))
            });
        }
        let summary = summary_of(&mut outbox);
        assert_eq!(summary["startDate"], json!(2_000));
        assert_eq!(summary["endDate"], json!(9_000));
        assert!(outbox.take_payload().is_none(), "the summary starts over");
    }

    #[test]
    fn empty_batches_and_zero_counts_send_nothing() {
        let mut outbox = Outbox::new(100, 100);
        assert!(outbox.take_payload().is_none());
        outbox.add(&Evaluation {
            count: 0,
            ..eval("rate", Some(1), Some(0), json!(1))
        });
        assert!(outbox.take_payload().is_none());
    }

    #[test]
    fn a_context_is_indexed_once_until_forgotten() {
        let mut outbox = Outbox::new(100, 100);
        outbox.add(&eval("rate", Some(1), Some(0), json!(1)));
        outbox.add(&eval("skip-rate", Some(1), Some(0), json!(1)));
        let events = outbox.take_payload().expect("payload").events;
        assert_eq!(events.len(), 2);
        assert_eq!(
            events[0],
            json!({"kind": "index", "creationDate": 1_000,
                   "context": {"kind": "service", "key": "host-1", "role": "worker"}})
        );
        outbox.add(&eval("rate", Some(1), Some(0), json!(1)));
        let events = outbox.take_payload().expect("payload").events;
        assert_eq!(events.len(), 1, "seen in the last interval: {events:?}");
        outbox.contexts.clear();
        outbox.add(&eval("rate", Some(1), Some(0), json!(1)));
        assert_eq!(outbox.take_payload().expect("payload").events.len(), 2);
    }

    #[test]
    fn private_attributes_are_redacted_in_index_events() {
        let context = ContextBuilder::new("host-1")
            .kind("service")
            .set_string("secret", "x")
            .add_private_attribute("secret")
            .build()
            .expect("valid context");
        let event = index_event(&context, 1).expect("serialisable");
        assert_eq!(
            event["context"],
            json!({"kind": "service", "key": "host-1",
                   "_meta": {"redactedAttributes": ["secret"]}})
        );
    }

    #[test]
    fn multi_context_index_event_has_the_multi_shape() {
        let multi = service_and_job("host-1", "resize");
        let event = index_event(&multi, 1).expect("serialisable");
        assert_eq!(
            event["context"],
            json!({"kind": "multi",
                   "service": {"key": "host-1", "role": "worker"},
                   "job": {"key": "resize"}})
        );
    }

    #[test]
    fn least_recently_seen_context_is_evicted_first() {
        let mut keys = ContextKeys::new(2);
        assert!(keys.notice("a"));
        assert!(keys.notice("b"));
        assert!(!keys.notice("a"), "a is now the most recent");
        assert!(keys.notice("c"), "evicts b");
        assert!(!keys.notice("a"));
        assert!(keys.notice("b"), "b was evicted");
        assert_eq!(keys.last_seen.len(), 2);
        assert_eq!(keys.by_age.len(), 2);
    }

    #[test]
    fn index_events_beyond_capacity_are_dropped_and_counted() {
        // Capacity 3: two index events and the summary.
        let mut outbox = Outbox::new(3, 100);
        let mut dropped = 0;
        for host in ["h1", "h2", "h3", "h4"] {
            dropped += outbox.add(&Evaluation {
                context: service(host),
                ..eval("rate", Some(1), Some(0), json!(1))
            });
        }
        assert_eq!(dropped, 2);
        assert_eq!(outbox.dropped_since_flush, 2);
        let payload = outbox.take_payload().expect("payload");
        assert_eq!(payload.events.len(), 3);
        assert_eq!(
            payload.event_count,
            2 + 4,
            "two index events, four evaluations"
        );
        let summary = &payload.events[2];
        assert_eq!(
            summary["features"]["rate"]["counters"][0]["count"],
            json!(4)
        );
    }

    #[test]
    fn summary_counters_are_bounded() {
        let mut summary = Summary::default();
        for i in 0..MAX_SUMMARY_COUNTERS {
            assert!(summary.add(&eval(&format!("flag-{i}"), Some(1), Some(0), json!(1))));
        }
        assert!(!summary.add(&eval("one-too-many", Some(1), Some(0), json!(1))));
        assert!(
            summary.add(&eval("flag-0", Some(1), Some(0), json!(1))),
            "existing counter"
        );
    }

    #[test]
    fn payload_ids_are_distinct_v4_uuids() {
        let a = payload_id();
        let b = payload_id();
        assert_ne!(a, b);
        for id in [&a, &b] {
            assert_eq!(id.len(), 36, "{id}");
            let groups: Vec<&str> = id.split('-').collect();
            assert_eq!(
                groups.iter().map(|g| g.len()).collect::<Vec<_>>(),
                [8, 4, 4, 4, 12]
            );
            assert!(groups[2].starts_with('4'), "{id}");
            assert!(
                matches!(groups[3].as_bytes()[0], b'8' | b'9' | b'a' | b'b'),
                "{id}"
            );
        }
        assert_eq!(
            format_uuid_v4([0xff; 16]),
            "ffffffff-ffff-4fff-bfff-ffffffffffff"
        );
    }

    #[test]
    fn processor_can_be_shared_between_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<EventProcessor>();
    }

    #[test]
    fn debug_output_hides_the_key() {
        let text = format!("{:?}", EventSettings::new("sdk-very-secret".into()));
        assert!(!text.contains("sdk-very-secret"), "{text}");
        assert!(text.contains("<redacted>"));
    }

    #[test]
    fn unusable_key_turns_events_off_without_blocking_record() {
        let settings = EventSettings {
            events_uri: "http://127.0.0.1:1".into(),
            ..EventSettings::new("sdk-bad\nkey".into())
        };
        let processor = EventProcessor::spawn(settings).expect("spawn");
        processor.record(vec![eval("rate", Some(1), Some(0), json!(1))]);
        processor.stop();
    }
}
