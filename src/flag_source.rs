//! The flag source thread: the one owner of flag I/O and evaluation.
//!
//! It holds the [`FlagStore`], feeds it from the configured source (LaunchDarkly, else the
//! local flag file, else nothing), re-evaluates the watched flags for this daemon's context
//! after every change, and stores the results into [`FlagValues`]. Other threads reach it only
//! through [`FlagSource`] (reload, stop) and only read what it stores.

use crate::config::{FlagsConfig, LaunchDarklyConfig};
use crate::flags::evaluate::{self, Outcome, describe, evaluate_flag};
use crate::flags::file::{self, FlagFileError};
use crate::flags::store::{AllData, DataEvent, FlagStore};
use crate::flags::{
    FALLBACK_EVALUATION, FlagValues, Lever, Origin, SourceState, Watched, objective_lever_value,
};
use crate::handler::estimate::Objective;
use crate::launchdarkly::events::{Evaluation, EventProcessor, EventSettings};
use crate::launchdarkly::{self, LdMessage};
use crossbeam_channel::{Receiver, Sender, TrySendError, bounded, never, select, unbounded};
use launchdarkly_server_sdk_evaluation::{Context, ContextBuilder, FlagValue, MultiContextBuilder};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

/// The context kind of a job type in the multi-context a per-type skip rate is evaluated for.
pub const JOB_CONTEXT_KIND: &str = "job";

/// Evaluation records kept for resolving the ids of counted uses: uses are handed over within
/// seconds, and a flag changes far less often than this many times in that time.
const RECORDS_KEPT: usize = 4_096;

/// Everything the source thread needs to know; rebuilt from the config on reload.
#[derive(Clone, Debug)]
pub struct SourceSettings {
    pub flags: FlagsConfig,
    pub launchdarkly: LaunchDarklyConfig,
    /// `worker` or `queuer`: a context attribute rules can target.
    pub role: &'static str,
    /// The job queue's name: a context attribute rules can target.
    pub queue: String,
    /// The worker's configured concurrency and ceiling (the concurrency lever's default and
    /// range), whether it drops doomed jobs (the deadline-aware lever's default) and its
    /// shedding objective (the objective lever's default).
    pub concurrency: usize,
    pub max_concurrency: usize,
    pub drop_doomed: bool,
    pub shed_objective: Objective,
}

enum Control {
    Reload(Box<SourceSettings>),
    /// The worker met a job type for the first time and gave it slot `slot`.
    JobType {
        slot: usize,
        name: String,
    },
    /// How often each evaluation of `flag` was used since the last tally.
    Tally {
        flag: Watched,
        counts: Vec<(u32, u64)>,
    },
    Stop,
}

/// The handle other threads hold: tell the source to reload or stop, report job types and
/// counted uses, and learn when a lever changed.
pub struct FlagSource {
    control: Sender<Control>,
    levers_changed: Receiver<()>,
    thread: Option<JoinHandle<()>>,
}

impl FlagSource {
    /// Starts the source thread and waits until it has its first data, at most the configured
    /// startup wait (LaunchDarkly) or until the flag file has been read; after that the daemon
    /// runs on whatever it has, and the source keeps trying in the background.
    pub fn spawn(settings: SourceSettings, values: Arc<FlagValues>) -> std::io::Result<FlagSource> {
        let (control_tx, control_rx) = unbounded();
        let (ready_tx, ready_rx) = bounded(1);
        let (changed_tx, changed_rx) = bounded(1);
        let wait = if settings.launchdarkly.sdk_key.is_some() {
            settings.launchdarkly.startup_wait
        } else {
            Duration::from_secs(5)
        };
        let thread = std::thread::Builder::new()
            .name("flag-source".into())
            .spawn(move || {
                let mut worker = SourceThread::new(settings, values, ready_tx, changed_tx);
                worker.run(control_rx);
            })?;
        if ready_rx.recv_timeout(wait).is_err() {
            log::warn!(
                "flag source not ready after {} ms; running on cached or fallback values",
                wait.as_millis()
            );
        }
        Ok(FlagSource {
            control: control_tx,
            levers_changed: changed_rx,
            thread: Some(thread),
        })
    }

    /// Hands new settings to the source thread (SIGHUP).
    pub fn reload(&self, settings: SourceSettings) {
        let _ = self.control.send(Control::Reload(Box::new(settings)));
    }

    /// Tells the source about a job type the worker has given a slot, so that the skip rate
    /// is evaluated for it (a multi-context of the service and the job type).
    pub fn job_type_seen(&self, slot: usize, name: &str) {
        let _ = self.control.send(Control::JobType {
            slot,
            name: name.to_owned(),
        });
    }

    /// Hands over counted uses of `flag`'s evaluations, for LaunchDarkly's summary events.
    pub fn tally(&self, flag: Watched, counts: Vec<(u32, u64)>) {
        if !counts.is_empty() {
            let _ = self.control.send(Control::Tally { flag, counts });
        }
    }

    /// Ready (once) whenever a lever flag's value changed, so the worker's loop can wake and
    /// apply it.
    pub fn levers_changed(&self) -> &Receiver<()> {
        &self.levers_changed
    }
}

impl Drop for FlagSource {
    fn drop(&mut self) {
        let _ = self.control.send(Control::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The file's identity for change detection: a rewrite changes the modification time or the
/// length (or both).
#[derive(Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
}

fn stamp(path: &Path) -> Option<FileStamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        modified: meta.modified().ok(),
        len: meta.len(),
    })
}

/// What one evaluation id stands for, for analytics events.
#[derive(Clone, Debug)]
pub struct EvaluationRecord {
    pub flag_key: String,
    pub version: Option<u64>,
    pub variation: Option<usize>,
    pub value: FlagValue,
    pub default: FlagValue,
    pub context: Context,
}

/// Which value an evaluation feeds: a watched number (per type for the skip rate) or a lever.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Target {
    Watched(Watched),
    /// The skip rate for the job type in slot `usize`.
    TypeSkip(usize),
    Lever(Lever),
}

struct SourceThread {
    settings: SourceSettings,
    values: Arc<FlagValues>,
    store: FlagStore,
    context: Option<Context>,
    /// Job types the worker reported, by slot, with their multi-contexts.
    job_types: BTreeMap<usize, (String, Option<Context>)>,
    /// Evaluation ids in use and recently replaced, for resolving counted uses.
    records: BTreeMap<u32, EvaluationRecord>,
    /// The id serving each target now.
    current: HashMap<Target, u32>,
    next_id: u32,
    levers_changed: Sender<()>,
    ready: Option<Sender<()>>,
    /// The flag file's stamp at the last look (`Some(None)`: it did not exist); `None` before
    /// the first look or after a reload, to force a read.
    file_stamp: Option<Option<FileStamp>>,
    /// Whether the flag file's current content was taken (not refused as unreadable).
    file_loaded: bool,
    launchdarkly: Option<launchdarkly::LdHandle>,
    /// LaunchDarkly's analytics events, when LaunchDarkly is the source and events are on.
    events: Option<EventProcessor>,
    /// The last problem warned about for each target, so a bad value is warned about once
    /// rather than on every re-evaluation, and a different problem is warned about again.
    warned: HashMap<Target, String>,
    /// Watched flags found not defined at the last evaluation (serving their fallback), so
    /// that the change either way is logged once.
    undefined: HashSet<Target>,
}

impl SourceThread {
    fn new(
        settings: SourceSettings,
        values: Arc<FlagValues>,
        ready: Sender<()>,
        levers_changed: Sender<()>,
    ) -> SourceThread {
        let context = build_context(&settings);
        SourceThread {
            settings,
            values,
            store: FlagStore::default(),
            context,
            job_types: BTreeMap::new(),
            records: BTreeMap::new(),
            current: HashMap::new(),
            next_id: FALLBACK_EVALUATION + 1,
            levers_changed,
            ready: Some(ready),
            file_stamp: None,
            file_loaded: false,
            launchdarkly: None,
            events: None,
            warned: HashMap::new(),
            undefined: HashSet::new(),
        }
    }

    fn run(&mut self, control: Receiver<Control>) {
        let ld_rx = self.start();
        let mut ld_rx = ld_rx.unwrap_or_else(never);
        loop {
            let file_tick = if self.file_path().is_some() {
                crossbeam_channel::after(self.settings.flags.file_check)
            } else {
                never()
            };
            select! {
                recv(control) -> msg => match msg {
                    Ok(Control::Reload(settings)) => self.reload(*settings),
                    Ok(Control::JobType { slot, name }) => self.add_job_type(slot, name),
                    Ok(Control::Tally { flag, counts }) => self.record_uses(flag, &counts),
                    Ok(Control::Stop) | Err(_) => break,
                },
                recv(ld_rx) -> msg => match msg {
                    Ok(LdMessage::Data(event)) => self.apply_remote(event),
                    Ok(LdMessage::State { state, reason }) => self.remote_state(state, &reason),
                    // The LaunchDarkly thread ended: a closed channel is always ready, so stop
                    // selecting on it rather than spin.
                    Err(_) => ld_rx = never(),
                },
                recv(file_tick) -> _ => self.check_file(),
            }
        }
        if let Some(ld) = self.launchdarkly.take() {
            ld.stop();
        }
        if let Some(events) = self.events.take() {
            events.stop();
        }
    }

    /// Loads what exists locally (state file, flag file) and starts LaunchDarkly if configured.
    fn start(&mut self) -> Option<Receiver<LdMessage>> {
        if self.settings.launchdarkly.sdk_key.is_some() {
            if let Some(path) = self.settings.launchdarkly.state_file.clone() {
                self.load_state_file(&path);
            }
            self.values.set_state(SourceState::Initializing);
            if self.settings.flags.file.is_some() {
                log::warn!(
                    "both launchdarkly.sdk_key and flags.file are set; LaunchDarkly is the source, the flag file is ignored"
                );
            }
            self.start_events();
            let (tx, rx) = unbounded();
            match launchdarkly::spawn(
                launchdarkly::LdSettings::from_config(&self.settings.launchdarkly),
                tx,
            ) {
                Ok(handle) => {
                    self.launchdarkly = Some(handle);
                    Some(rx)
                }
                Err(e) => {
                    log::error!("cannot start the LaunchDarkly thread: {e}");
                    self.values.set_state(SourceState::Off);
                    self.signal_ready();
                    None
                }
            }
        } else {
            self.check_file();
            self.signal_ready();
            None
        }
    }

    /// Starts the analytics events thread (restart-only, like the rest of `[launchdarkly]`).
    fn start_events(&mut self) {
        let config = &self.settings.launchdarkly;
        let (true, Some(sdk_key)) = (config.events, config.sdk_key.clone()) else {
            return;
        };
        let settings = EventSettings {
            events_uri: config.events_uri.clone(),
            flush_interval: config.events_flush,
            proxy: config.proxy.clone(),
            ..EventSettings::new(sdk_key)
        };
        match EventProcessor::spawn(settings) {
            Ok(events) => self.events = Some(events),
            Err(e) => {
                log::error!("cannot start the LaunchDarkly events thread: {e}; no events are sent")
            }
        }
    }

    fn file_path(&self) -> Option<PathBuf> {
        if self.settings.launchdarkly.sdk_key.is_some() {
            None
        } else {
            self.settings.flags.file.clone()
        }
    }

    fn signal_ready(&mut self) {
        if let Some(ready) = self.ready.take() {
            let _ = ready.send(());
        }
    }

    /// Re-reads the flag file when it changed since the last look.
    fn check_file(&mut self) {
        let Some(path) = self.file_path() else {
            return;
        };
        let now = stamp(&path);
        if self.file_stamp == Some(now) {
            if now.is_some() && self.file_loaded {
                // Looked at, unchanged, and what it says was taken: the values are current.
                self.values.confirm();
            }
            return;
        }
        self.file_stamp = Some(now);
        self.load_flag_file(&path);
    }

    fn load_flag_file(&mut self, path: &Path) {
        match file::load(path) {
            Ok(data) => {
                log::info!(
                    "flag file {} loaded ({} flags)",
                    path.display(),
                    data.flags.len()
                );
                self.store.apply(DataEvent::Put(data));
                self.values.set_origin(Origin::File);
                self.file_loaded = true;
                self.evaluate();
            }
            Err(FlagFileError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound && self.store.is_empty() =>
            {
                log::warn!(
                    "flag file {} does not exist; serving fallbacks until it does",
                    path.display()
                );
            }
            Err(e) => {
                // What is served no longer matches the file: it ages from now on.
                self.file_loaded = false;
                log::warn!("{e}; keeping the previous flag values");
            }
        }
    }

    fn load_state_file(&mut self, path: &Path) {
        match std::fs::read(path) {
            Ok(bytes) => match serde_json::from_slice::<AllData>(&bytes) {
                Ok(data) => {
                    log::info!("flag state restored from {}", path.display());
                    self.store.apply(DataEvent::Put(data));
                    // The data was current when an earlier run wrote it.
                    let written_ms = std::fs::metadata(path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_millis() as u64);
                    self.values.set_origin_as_of(Origin::Cached, written_ms);
                    self.evaluate();
                }
                Err(e) => log::warn!("flag state file {} is not usable: {e}", path.display()),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("cannot read flag state file {}: {e}", path.display()),
        }
    }

    fn apply_remote(&mut self, event: DataEvent) {
        if let DataEvent::Put(all) = &event {
            warn_unusable(all);
        }
        let initial = matches!(event, DataEvent::Put(_));
        if self.store.apply(event) || initial {
            self.values.set_origin(Origin::Live);
            self.evaluate();
            self.persist();
        }
        if initial {
            self.signal_ready();
        }
    }

    fn remote_state(&mut self, state: SourceState, reason: &str) {
        let previous = self.values.state();
        if previous != state {
            match state {
                SourceState::Valid => log::info!("flag source valid"),
                SourceState::Interrupted => {
                    log::warn!("flag source interrupted: {reason}; {}", self.serving())
                }
                SourceState::Off => {
                    log::error!("flag source off: {reason}; {}", self.serving());
                    self.signal_ready();
                }
                SourceState::Initializing | SourceState::None => {}
            }
        }
        self.values.set_state(state);
    }

    /// What the daemon goes on with when the remote source fails, for the log line.
    fn serving(&self) -> &'static str {
        match self.values.origin() {
            Origin::Fallback => "serving the config's fallbacks",
            Origin::Cached => "serving the cached values",
            Origin::File | Origin::Live => "serving the last values",
        }
    }

    /// Writes the live data set to the state file: temp file, then rename, so a crash never
    /// leaves a half-written file. Owner-only, whatever the umask: flag rules can name
    /// customers and internal hosts.
    fn persist(&self) {
        let Some(path) = &self.settings.launchdarkly.state_file else {
            return;
        };
        let result = serde_json::to_vec(&self.store.snapshot())
            .map_err(std::io::Error::other)
            .and_then(|bytes| {
                // Unique per process: a worker and a queuer on one host may share the file.
                let mut tmp = path.as_os_str().to_owned();
                tmp.push(format!(".{}.tmp", std::process::id()));
                let tmp = PathBuf::from(tmp);
                write_private(&tmp, &bytes)?;
                std::fs::rename(&tmp, path)
            });
        if let Err(e) = result {
            log::warn!("cannot write flag state file {}: {e}", path.display());
        }
    }

    fn reload(&mut self, settings: SourceSettings) {
        // The LaunchDarkly connection is restart-only: `service::reload` kept its settings.
        self.settings = settings;
        self.context = build_context(&self.settings);
        // The job types' multi-contexts hold the service context: build them again.
        let types: Vec<(usize, String)> = self
            .job_types
            .iter()
            .map(|(&slot, (name, _))| (slot, name.clone()))
            .collect();
        for (slot, name) in types {
            let context = self.job_context(&name);
            self.job_types.insert(slot, (name, context));
        }
        // SIGHUP re-reads the flag file even when its stamp looks unchanged.
        if let Some(path) = self.file_path() {
            self.file_stamp = Some(stamp(&path));
            self.load_flag_file(&path);
        }
        self.evaluate();
    }

    /// Evaluates each watched flag for this daemon's context (the skip rate also for each job
    /// type's multi-context) and each lever, and stores accepted values.
    fn evaluate(&mut self) {
        let flags = self.settings.flags.clone();
        let service = self.context.clone();
        for (which, key, fallback) in [
            (
                Watched::SkipRate,
                &flags.skip_rate_key,
                flags.skip_rate_fallback,
            ),
            (Watched::Rate, &flags.rate_key, flags.rate_fallback),
        ] {
            let target = Target::Watched(which);
            let before = which.current(&self.values);
            if let Some((id, value, defined)) =
                self.evaluate_number(target, key, service.as_ref(), fallback)
            {
                which.store(&self.values, id, value);
                let was_defined = !self.undefined.contains(&target);
                if before != which.current(&self.values) || was_defined != defined {
                    if defined {
                        log::info!("flag {key:?} = {value} ({})", self.values.origin().as_str());
                        self.undefined.remove(&target);
                    } else {
                        log::info!("flag {key:?} is not defined; using the fallback {value}");
                        self.undefined.insert(target);
                    }
                }
            }
        }
        let types: Vec<(usize, Option<Context>)> = self
            .job_types
            .iter()
            .map(|(&slot, (_, context))| (slot, context.clone()))
            .collect();
        for (slot, context) in types {
            let value = self.evaluate_number(
                Target::TypeSkip(slot),
                &flags.skip_rate_key,
                context.as_ref(),
                flags.skip_rate_fallback,
            );
            let before = self.values.type_skip_rate(slot);
            // A type without a usable value of its own follows the service-wide one.
            let value = value.filter(|&(_, _, defined)| defined);
            self.values
                .set_type_skip_rate(slot, value.map(|(id, v, _)| (id, v)));
            let after = self.values.type_skip_rate(slot);
            if before != after {
                if let Some((name, _)) = self.job_types.get(&slot) {
                    match after {
                        Some(v) => log::info!(
                            "flag {:?} = {v} for job type {name:?} ({})",
                            flags.skip_rate_key,
                            self.values.origin().as_str()
                        ),
                        None => log::info!(
                            "flag {:?}: job type {name:?} follows the service-wide value",
                            flags.skip_rate_key
                        ),
                    }
                }
            }
        }
        let mut changed = false;
        // The levers steer the worker; the queuer neither evaluates nor counts them.
        let levers: &[Lever] = if self.settings.role == "worker" {
            &Lever::ALL
        } else {
            &[]
        };
        for &lever in levers {
            let key = match lever {
                Lever::Pause => &flags.pause_key,
                Lever::Concurrency => &flags.concurrency_key,
                Lever::DeadlineAware => &flags.deadline_aware_key,
                Lever::ShedObjective => &flags.shed_objective_key,
            };
            let value = match key {
                Some(key) => self.evaluate_lever(lever, key, service.as_ref()),
                None => None,
            };
            let before = lever_value(&self.values, lever);
            self.values.set_lever(lever, value);
            if before != value {
                changed = true;
                let key = key.as_deref().unwrap_or_default();
                match value {
                    Some(v) => log::info!(
                        "flag {key:?}: {} = {} ({})",
                        lever.as_str(),
                        show_lever(lever, v),
                        self.values.origin().as_str()
                    ),
                    None if !key.is_empty() => log::info!(
                        "flag {key:?}: not set; {} follows the config",
                        lever.as_str()
                    ),
                    None => {}
                }
            }
        }
        if changed {
            // Full means a wake-up is already pending; one is enough.
            if let Err(TrySendError::Disconnected(_)) = self.levers_changed.try_send(()) {}
        }
    }

    /// Evaluates a number flag for `target`; `Some((id, value, defined))` with the accepted
    /// value (the fallback when the flag is not defined), `None` when the value is unusable
    /// (warned about once; the caller keeps what it has).
    fn evaluate_number(
        &mut self,
        target: Target,
        key: &str,
        context: Option<&Context>,
        fallback: f64,
    ) -> Option<(u32, f64, bool)> {
        let watched = match target {
            Target::Watched(w) => w,
            _ => Watched::SkipRate,
        };
        let context = context?;
        let evaluation = evaluate_flag(&self.store, key, context);
        let result = match &evaluation.outcome {
            Outcome::Value(v) => match v.as_float() {
                Some(n) => watched
                    .accept(n)
                    .map(|n| (n, true))
                    .ok_or_else(|| format!("value {n} is out of range")),
                None => Err(format!("value {} is not a number", describe(v))),
            },
            Outcome::Missing => Ok((fallback, false)),
            Outcome::Bad(why) => Err(why.clone()),
        };
        let default = FlagValue::Number(fallback);
        match result {
            Ok((value, defined)) => {
                self.warned.remove(&target);
                let id = self.stamp(target, key, context, &evaluation, default);
                Some((id, value, defined))
            }
            Err(why) => {
                self.warn_once(target, key, why);
                None
            }
        }
    }

    /// Evaluates a lever flag: a boolean for pause and deadline-aware shedding, a whole number
    /// of threads (1 to `worker.max_concurrency`) for concurrency. `None`: not defined or not
    /// usable, so the config's value holds.
    fn evaluate_lever(
        &mut self,
        lever: Lever,
        key: &str,
        context: Option<&Context>,
    ) -> Option<u32> {
        let target = Target::Lever(lever);
        let context = context?;
        let evaluation = evaluate_flag(&self.store, key, context);
        let max = self.settings.max_concurrency as f64;
        let result = match (&evaluation.outcome, lever) {
            (Outcome::Missing, _) => Ok(None),
            (Outcome::Bad(why), _) => Err(why.clone()),
            (Outcome::Value(v), Lever::Pause | Lever::DeadlineAware) => match v.as_bool() {
                Some(b) => Ok(Some(u32::from(b))),
                None => Err(format!("value {} is not a boolean", describe(v))),
            },
            (Outcome::Value(v), Lever::ShedObjective) => {
                match v.as_string().as_deref().and_then(Objective::parse) {
                    Some(objective) => Ok(Some(objective_lever_value(objective))),
                    None => Err(format!(
                        "value {} is not \"fewest_stopped\" or \"most_on_time\"",
                        describe(v)
                    )),
                }
            }
            (Outcome::Value(v), Lever::Concurrency) => match v.as_float() {
                Some(n) if n.fract() == 0.0 && (1.0..=max).contains(&n) => Ok(Some(n as u32)),
                Some(n) => Err(format!(
                    "value {n} is not a whole number from 1 to worker.max_concurrency ({max})"
                )),
                None => Err(format!("value {} is not a number", describe(v))),
            },
        };
        let default = match lever {
            Lever::Concurrency => FlagValue::Number(self.settings.concurrency as f64),
            Lever::Pause => FlagValue::Bool(false),
            Lever::DeadlineAware => FlagValue::Bool(self.settings.drop_doomed),
            Lever::ShedObjective => FlagValue::Str(self.settings.shed_objective.as_str().into()),
        };
        match result {
            Ok(value) => {
                self.warned.remove(&target);
                let id = self.stamp(target, key, context, &evaluation, default);
                // Levers are read by the loop, not per job: each evaluation is one use.
                self.record_uses_of(&[(id, 1)]);
                value
            }
            Err(why) => {
                self.warn_once(target, key, why);
                None
            }
        }
    }

    fn warn_once(&mut self, target: Target, key: &str, why: String) {
        if self.warned.get(&target) != Some(&why) {
            let keeping = match target {
                Target::Watched(w) => format!("keeping {}", w.current(&self.values)),
                Target::TypeSkip(slot) => format!(
                    "job type {:?} follows the service-wide value",
                    self.job_types
                        .get(&slot)
                        .map_or("", |(name, _)| name.as_str())
                ),
                Target::Lever(lever) => format!("{} follows the config", lever.as_str()),
            };
            log::warn!("flag {key:?}: {why}; {keeping}");
            self.warned.insert(target, why);
        }
    }

    /// The evaluation id for this result: the same as before when nothing about it changed,
    /// else a new one with its record.
    fn stamp(
        &mut self,
        target: Target,
        key: &str,
        context: &Context,
        evaluation: &evaluate::Evaluation,
        default: FlagValue,
    ) -> u32 {
        let value = match &evaluation.outcome {
            Outcome::Value(v) => v.clone(),
            _ => default.clone(),
        };
        if let Some(&id) = self.current.get(&target) {
            if let Some(record) = self.records.get(&id) {
                if record.flag_key == key
                    && record.version == evaluation.version
                    && record.variation == evaluation.variation
                    && record.value == value
                    && record.default == default
                    && record.context == *context
                {
                    return id;
                }
            }
        }
        let id = self.next_id;
        self.next_id = self
            .next_id
            .checked_add(1)
            .unwrap_or(FALLBACK_EVALUATION + 1);
        self.records.insert(
            id,
            EvaluationRecord {
                flag_key: key.to_owned(),
                version: evaluation.version,
                variation: evaluation.variation,
                value,
                default,
                context: context.clone(),
            },
        );
        self.current.insert(target, id);
        while self.records.len() > RECORDS_KEPT {
            let Some((&oldest, _)) = self.records.iter().next() else {
                break;
            };
            self.records.remove(&oldest);
        }
        id
    }

    fn add_job_type(&mut self, slot: usize, name: String) {
        let context = self.job_context(&name);
        self.job_types.insert(slot, (name, context));
        self.evaluate();
    }

    /// The multi-context of this daemon's service and job type `name`.
    fn job_context(&self, name: &str) -> Option<Context> {
        self.context.as_ref().and_then(|service| {
            let job = ContextBuilder::new(name)
                .kind(JOB_CONTEXT_KIND)
                .build()
                .map_err(|e| log::warn!("job type {name:?} cannot be a context key: {e}"))
                .ok()?;
            MultiContextBuilder::new()
                .add_context(service.clone())
                .add_context(job)
                .build()
                .map_err(|e| log::warn!("no multi-context for job type {name:?}: {e}"))
                .ok()
        })
    }

    /// Counted uses of `flag`'s evaluations, resolved to what they stand for.
    fn record_uses(&mut self, flag: Watched, counts: &[(u32, u64)]) {
        let fallback_uses: u64 = counts
            .iter()
            .filter(|(id, _)| *id == FALLBACK_EVALUATION)
            .map(|(_, n)| n)
            .sum();
        if fallback_uses > 0 {
            if let Some(context) = self.context.clone() {
                let (key, fallback) = match flag {
                    Watched::SkipRate => (
                        self.settings.flags.skip_rate_key.clone(),
                        self.settings.flags.skip_rate_fallback,
                    ),
                    Watched::Rate => (
                        self.settings.flags.rate_key.clone(),
                        self.settings.flags.rate_fallback,
                    ),
                };
                self.use_records(vec![(
                    EvaluationRecord {
                        flag_key: key,
                        version: None,
                        variation: None,
                        value: FlagValue::Number(fallback),
                        default: FlagValue::Number(fallback),
                        context,
                    },
                    fallback_uses,
                )]);
            }
        }
        self.record_uses_of(counts);
    }

    fn record_uses_of(&mut self, counts: &[(u32, u64)]) {
        let resolved: Vec<(EvaluationRecord, u64)> = counts
            .iter()
            .filter(|(id, _)| *id != FALLBACK_EVALUATION)
            .filter_map(|(id, n)| self.records.get(id).map(|r| (r.clone(), *n)))
            .collect();
        self.use_records(resolved);
    }

    /// Where counted uses go: LaunchDarkly's analytics events, when they are sent.
    fn use_records(&mut self, uses: Vec<(EvaluationRecord, u64)>) {
        let Some(events) = &self.events else {
            return;
        };
        let at_ms = crate::clock::now_ms();
        let batch = uses
            .into_iter()
            .map(|(record, count)| Evaluation {
                flag_key: record.flag_key,
                flag_version: record.version,
                variation: record.variation,
                value: to_json(&record.value),
                default: to_json(&record.default),
                context: record.context,
                count,
                at_ms,
            })
            .collect();
        events.record(batch);
    }
}

/// Warns about each item of a data set that did not parse (the store keeps what it held).
fn warn_unusable(all: &AllData) {
    for (item, why) in &all.unusable {
        let why = crate::logging::shortened(why, 200);
        log::warn!("flag data: {item} is not usable ({why}); keeping what was held for it");
    }
}

fn to_json(value: &FlagValue) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}

fn lever_value(values: &FlagValues, lever: Lever) -> Option<u32> {
    match lever {
        Lever::Pause => values.paused().map(u32::from),
        Lever::Concurrency => values.concurrency(),
        Lever::DeadlineAware => values.deadline_aware().map(u32::from),
        Lever::ShedObjective => values.shed_objective().map(objective_lever_value),
    }
}

fn show_lever(lever: Lever, value: u32) -> String {
    match lever {
        Lever::Concurrency => value.to_string(),
        Lever::Pause | Lever::DeadlineAware => (value != 0).to_string(),
        Lever::ShedObjective => {
            let objective = if value == objective_lever_value(Objective::MostOnTime) {
                Objective::MostOnTime
            } else {
                Objective::FewestStopped
            };
            objective.as_str().to_owned()
        }
    }
}

/// Writes `bytes` to a new file readable by its owner only.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)
}

/// The context LaunchDarkly rules see: kind and key from the config (the key defaults to the
/// host name), and attributes an operator would target: role, queue, and the machine's host
/// name whatever the key is.
fn build_context(settings: &SourceSettings) -> Option<Context> {
    let flags = &settings.flags;
    let mut builder = ContextBuilder::new(flags.context_key.clone());
    builder
        .kind(flags.context_kind.clone())
        .set_string("role", settings.role)
        .set_string("queue", settings.queue.clone())
        .set_string("host", flags.host.clone());
    match builder.build() {
        Ok(context) => Some(context),
        Err(e) => {
            log::error!("flag context is invalid ({e}); flags fall back to defaults");
            None
        }
    }
}
