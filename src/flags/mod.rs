//! Flag values: where they live (atomics read by the hot path) and where they come from
//! (a source thread that owns all flag I/O and evaluation).
//!
//! The split is the architecture invariant: the hot path reads [`FlagValues`] with one relaxed
//! load per value and never blocks, allocates or logs because of flags; everything slow
//! (files, HTTP, JSON, rule evaluation) happens on the source thread, which stores results.

pub mod evaluate;
pub mod file;
pub mod store;
pub mod tally;

use crate::handler::estimate::Objective;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};

pub use tally::Tally;

/// Highest publish rate a flag may ask for; more is treated as a bad value, not obeyed.
pub const MAX_RATE_PER_SEC: f64 = 1_000_000.0;

/// Parts per million in one percent: the skip rate is stored as ppm so the per-job decision
/// is an integer comparison.
const PPM_PER_PERCENT: f64 = 10_000.0;

/// Where the values being served came from, worst to best; shown in the stats line so an
/// operator can tell live values from stale ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Origin {
    /// The config's fallbacks: no source has provided anything yet.
    Fallback = 0,
    /// Restored from the state file written during an earlier run.
    Cached = 1,
    /// The local flag file.
    File = 2,
    /// LaunchDarkly, live.
    Live = 3,
}

impl Origin {
    fn from_u8(value: u8) -> Origin {
        match value {
            1 => Origin::Cached,
            2 => Origin::File,
            3 => Origin::Live,
            _ => Origin::Fallback,
        }
    }

    /// The word used in logs and the stats line.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Fallback => "fallback",
            Origin::Cached => "cached",
            Origin::File => "file",
            Origin::Live => "live",
        }
    }
}

/// The state of the remote data source, as LaunchDarkly SDKs report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum SourceState {
    /// No remote source is configured (file or fallbacks only).
    None = 0,
    /// Connecting; no data received yet.
    Initializing = 1,
    /// Connected, data received.
    Valid = 2,
    /// Lost; retrying, serving the last values.
    Interrupted = 3,
    /// Given up (e.g. the SDK key was refused); serving the last values.
    Off = 4,
}

impl SourceState {
    fn from_u8(value: u8) -> SourceState {
        match value {
            1 => SourceState::Initializing,
            2 => SourceState::Valid,
            3 => SourceState::Interrupted,
            4 => SourceState::Off,
            _ => SourceState::None,
        }
    }

    /// The word used in logs and the stats line.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceState::None => "none",
            SourceState::Initializing => "initializing",
            SourceState::Valid => "valid",
            SourceState::Interrupted => "interrupted",
            SourceState::Off => "off",
        }
    }
}

/// A stored number together with the evaluation that produced it: the id (high 32 bits)
/// names the flag, variation, version and context in the source thread's records, so a
/// thread that uses the value can count the use for LaunchDarkly's summary events with the
/// same single load that gives it the value (low 32 bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamped(u64);

impl Stamped {
    /// A value from evaluation `id`.
    pub fn new(id: u32, value: u32) -> Stamped {
        Stamped((u64::from(id) << 32) | u64::from(value))
    }

    /// The evaluation that gave the value; [`FALLBACK_EVALUATION`] before any.
    #[inline]
    pub fn id(self) -> u32 {
        (self.0 >> 32) as u32
    }

    /// The value.
    #[inline]
    pub fn value(self) -> u32 {
        self.0 as u32
    }
}

/// The evaluation id of values set from the config's fallbacks before the source evaluated
/// anything.
pub const FALLBACK_EVALUATION: u32 = 0;

/// A per-type slot that holds no evaluation of its own: the service-wide value applies.
const UNSET: u64 = u64::MAX;

/// A lever flag's tri-state: set by a flag, or left to the config.
const LEVER_UNSET: u32 = u32::MAX;

/// The current flag values, shared between the source thread (the only writer) and every
/// thread that makes decisions (readers).
#[derive(Debug)]
pub struct FlagValues {
    /// The skip rate for the service context, in ppm, stamped with its evaluation.
    skip: AtomicU64,
    /// The skip rate per job type slot (see `TypeSlot`), for the multi-context of the service
    /// and the job type; [`UNSET`] until the type has been evaluated, or when its evaluation
    /// failed.
    type_skip: Box<[AtomicU64]>,
    /// The publish rate's bits (`f64`); its evaluation id separately (the queuer counts uses).
    rate_bits: AtomicU64,
    rate_evaluation: AtomicU32,
    /// Levers: `1`/`0` for pause and deadline-aware shedding, a thread count for concurrency,
    /// an [`Objective`]'s number for the shedding objective; [`LEVER_UNSET`] leaves the
    /// config's value in force.
    paused: AtomicU32,
    concurrency: AtomicU32,
    deadline_aware: AtomicU32,
    shed_objective: AtomicU32,
    origin: AtomicU8,
    state: AtomicU8,
    /// When the values were last known to be current (see [`FlagValues::age_ms`]).
    confirmed_ms: AtomicU64,
}

impl FlagValues {
    /// Starts from the config's fallbacks, with no per-type slots: the queuer's values, and
    /// tests'.
    #[cfg(any(test, feature = "internals"))]
    pub fn new(skip_rate_percent: f64, rate_per_sec: f64) -> FlagValues {
        FlagValues::with_job_types(skip_rate_percent, rate_per_sec, 0)
    }

    /// Starts from the config's fallbacks, with `slots` per-type skip slots (the worker's
    /// `max_job_types + 1`, the last being the shared `(other)`).
    pub fn with_job_types(skip_rate_percent: f64, rate_per_sec: f64, slots: usize) -> FlagValues {
        let values = FlagValues {
            skip: AtomicU64::new(0),
            type_skip: (0..slots).map(|_| AtomicU64::new(UNSET)).collect(),
            rate_bits: AtomicU64::new(0),
            rate_evaluation: AtomicU32::new(FALLBACK_EVALUATION),
            paused: AtomicU32::new(LEVER_UNSET),
            concurrency: AtomicU32::new(LEVER_UNSET),
            deadline_aware: AtomicU32::new(LEVER_UNSET),
            shed_objective: AtomicU32::new(LEVER_UNSET),
            origin: AtomicU8::new(Origin::Fallback as u8),
            state: AtomicU8::new(SourceState::None as u8),
            confirmed_ms: AtomicU64::new(crate::clock::now_ms()),
        };
        values.set_skip_rate(FALLBACK_EVALUATION, skip_rate_percent);
        values.set_rate(FALLBACK_EVALUATION, rate_per_sec);
        values
    }

    /// The service-wide skip rate in parts per million, with its evaluation.
    #[inline]
    pub fn skip(&self) -> Stamped {
        Stamped(self.skip.load(Ordering::Relaxed))
    }

    /// Skip rate in parts per million: what the hot path compares a job's hash against.
    #[inline]
    pub fn skip_ppm(&self) -> u32 {
        self.skip().value()
    }

    /// The skip rate for jobs of type slot `slot`: its own evaluation once it has one, the
    /// service-wide value until then (and for slots past the table).
    #[inline]
    pub fn skip_for(&self, slot: usize) -> Stamped {
        match self.type_skip.get(slot).map(|s| s.load(Ordering::Relaxed)) {
            Some(word) if word != UNSET => Stamped(word),
            _ => self.skip(),
        }
    }

    /// Whether slot `slot` has a value of its own (for the stats line).
    pub fn type_skip_rate(&self, slot: usize) -> Option<f64> {
        match self.type_skip.get(slot)?.load(Ordering::Relaxed) {
            UNSET => None,
            word => Some(f64::from(Stamped(word).value()) / PPM_PER_PERCENT),
        }
    }

    /// Skip rate in percent, for humans.
    pub fn skip_rate(&self) -> f64 {
        f64::from(self.skip_ppm()) / PPM_PER_PERCENT
    }

    /// Publish rate in jobs per second.
    #[inline]
    pub fn rate_per_sec(&self) -> f64 {
        f64::from_bits(self.rate_bits.load(Ordering::Relaxed))
    }

    /// The evaluation that gave the current publish rate.
    #[inline]
    pub fn rate_evaluation(&self) -> u32 {
        self.rate_evaluation.load(Ordering::Relaxed)
    }

    /// Whether a flag asks the worker to stop taking jobs; `None`: no flag says.
    pub fn paused(&self) -> Option<bool> {
        match self.paused.load(Ordering::Relaxed) {
            LEVER_UNSET => None,
            v => Some(v != 0),
        }
    }

    /// How many pool threads a flag asks to run jobs; `None`: no flag says.
    pub fn concurrency(&self) -> Option<u32> {
        match self.concurrency.load(Ordering::Relaxed) {
            LEVER_UNSET => None,
            v => Some(v),
        }
    }

    /// Whether a flag turns deadline-aware shedding (dropping doomed jobs) on or off; `None`:
    /// no flag says, the config decides.
    #[inline]
    pub fn deadline_aware(&self) -> Option<bool> {
        match self.deadline_aware.load(Ordering::Relaxed) {
            LEVER_UNSET => None,
            v => Some(v != 0),
        }
    }

    /// The shedding objective a flag asks for; `None`: no flag says, the config decides.
    pub fn shed_objective(&self) -> Option<Objective> {
        match self.shed_objective.load(Ordering::Relaxed) {
            LEVER_UNSET => None,
            v => Some(objective_from_lever(v)),
        }
    }

    /// Where the current values came from.
    pub fn origin(&self) -> Origin {
        Origin::from_u8(self.origin.load(Ordering::Relaxed))
    }

    /// The remote source's state.
    pub fn state(&self) -> SourceState {
        SourceState::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// How stale the values may be, in ms: 0 while LaunchDarkly's stream or polling is
    /// healthy (the values are current), otherwise the time since they were last known to be
    /// current: since the connection was lost, since the cached data was received in an
    /// earlier run, since the flag file was last read, or since start for fallbacks.
    pub fn age_ms(&self) -> u64 {
        if self.origin() == Origin::Live && self.state() == SourceState::Valid {
            return 0;
        }
        crate::clock::now_ms().saturating_sub(self.confirmed_ms.load(Ordering::Relaxed))
    }

    /// Stores a skip rate already checked to be within 0..=100 percent.
    pub fn set_skip_rate(&self, evaluation: u32, percent: f64) {
        self.skip.store(
            Stamped::new(evaluation, percent_to_ppm(percent)).0,
            Ordering::Relaxed,
        );
    }

    /// Stores a type's own skip rate (`None`: the service-wide value applies).
    pub fn set_type_skip_rate(&self, slot: usize, value: Option<(u32, f64)>) {
        if let Some(cell) = self.type_skip.get(slot) {
            let word = value.map_or(UNSET, |(id, percent)| {
                Stamped::new(id, percent_to_ppm(percent)).0
            });
            cell.store(word, Ordering::Relaxed);
        }
    }

    /// Stores a rate already checked to be within 0..=[`MAX_RATE_PER_SEC`].
    pub fn set_rate(&self, evaluation: u32, per_sec: f64) {
        let clamped = per_sec.clamp(0.0, MAX_RATE_PER_SEC);
        self.rate_bits.store(clamped.to_bits(), Ordering::Relaxed);
        self.rate_evaluation.store(evaluation, Ordering::Relaxed);
    }

    /// Stores a lever's value (`None`: the config's applies).
    pub fn set_lever(&self, lever: Lever, value: Option<u32>) {
        let cell = match lever {
            Lever::Pause => &self.paused,
            Lever::Concurrency => &self.concurrency,
            Lever::DeadlineAware => &self.deadline_aware,
            Lever::ShedObjective => &self.shed_objective,
        };
        cell.store(value.unwrap_or(LEVER_UNSET), Ordering::Relaxed);
    }

    /// Records where the values came from; they are current as of now.
    pub fn set_origin(&self, origin: Origin) {
        self.set_origin_as_of(origin, crate::clock::now_ms());
    }

    /// Records where the values came from and when they were last known to be current
    /// (cached data: when an earlier run received it).
    pub fn set_origin_as_of(&self, origin: Origin, confirmed_ms: u64) {
        self.origin.store(origin as u8, Ordering::Relaxed);
        self.confirmed_ms.store(confirmed_ms, Ordering::Relaxed);
    }

    /// Records that the values are current as of now (a flag file checked unchanged).
    pub fn confirm(&self) {
        self.confirmed_ms
            .store(crate::clock::now_ms(), Ordering::Relaxed);
    }

    /// Records the remote source's state; leaving the healthy state starts the age.
    pub fn set_state(&self, state: SourceState) {
        let was = self.state();
        if was == SourceState::Valid && state != SourceState::Valid {
            self.confirm();
        }
        self.state.store(state as u8, Ordering::Relaxed);
    }
}

/// An objective as a lever's number, as [`FlagValues`] stores it.
pub fn objective_lever_value(objective: Objective) -> u32 {
    match objective {
        Objective::FewestStopped => 0,
        Objective::MostOnTime => 1,
    }
}

fn objective_from_lever(value: u32) -> Objective {
    match value {
        1 => Objective::MostOnTime,
        _ => Objective::FewestStopped,
    }
}

fn percent_to_ppm(percent: f64) -> u32 {
    (percent.clamp(0.0, 100.0) * PPM_PER_PERCENT).round() as u32
}

/// The incident levers beyond the skip rate, each an optional flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Lever {
    /// Stop taking new jobs without stopping the daemon (boolean flag).
    Pause,
    /// Run at most this many jobs at once, up to `worker.max_concurrency` (number flag).
    Concurrency,
    /// Drop jobs that can no longer meet their deadline, or not (boolean flag).
    DeadlineAware,
    /// What the budget of a job without a declared work time aims at (string flag:
    /// `fewest_stopped` or `most_on_time`).
    ShedObjective,
}

impl Lever {
    /// All levers, in the order their settings are listed.
    pub const ALL: [Lever; 4] = [
        Lever::Pause,
        Lever::Concurrency,
        Lever::DeadlineAware,
        Lever::ShedObjective,
    ];

    /// The name used in logs and the stats line.
    pub fn as_str(self) -> &'static str {
        match self {
            Lever::Pause => "paused",
            Lever::Concurrency => "concurrency",
            Lever::DeadlineAware => "deadline_aware",
            Lever::ShedObjective => "shed_objective",
        }
    }
}

/// Which value a watched flag feeds, with its valid range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Watched {
    SkipRate,
    Rate,
}

impl Watched {
    /// Checks a flag's number before it reaches an atomic; `None` means reject it.
    pub fn accept(self, value: f64) -> Option<f64> {
        let max = match self {
            Watched::SkipRate => 100.0,
            Watched::Rate => MAX_RATE_PER_SEC,
        };
        (value.is_finite() && (0.0..=max).contains(&value)).then_some(value)
    }

    /// Stores an accepted value.
    pub fn store(self, values: &FlagValues, evaluation: u32, value: f64) {
        match self {
            Watched::SkipRate => values.set_skip_rate(evaluation, value),
            Watched::Rate => values.set_rate(evaluation, value),
        }
    }

    /// The value currently held, for change detection and logs.
    pub fn current(self, values: &FlagValues) -> f64 {
        match self {
            Watched::SkipRate => values.skip_rate(),
            Watched::Rate => values.rate_per_sec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_rate_round_trips_through_ppm() {
        let v = FlagValues::new(30.0, 1.0);
        assert_eq!(v.skip_ppm(), 300_000);
        v.set_skip_rate(7, 0.0001);
        assert_eq!(v.skip().id(), 7);
        assert_eq!(v.skip_ppm(), 1);
        assert!((v.skip_rate() - 0.0001).abs() < 1e-9);
    }

    #[test]
    fn a_type_uses_the_service_value_until_it_has_its_own() {
        let v = FlagValues::with_job_types(10.0, 1.0, 3);
        assert_eq!(v.skip_for(1), v.skip());
        v.set_type_skip_rate(1, Some((9, 80.0)));
        assert_eq!(v.skip_for(1), Stamped::new(9, 800_000));
        assert_eq!(v.skip_for(0).value(), 100_000);
        // Past the table (no types configured): the service value.
        assert_eq!(v.skip_for(99).value(), 100_000);
        v.set_type_skip_rate(1, None);
        assert_eq!(v.skip_for(1).value(), 100_000);
        assert_eq!(v.type_skip_rate(1), None);
    }

    #[test]
    fn a_healthy_live_source_is_fresh_and_an_interrupted_one_ages() {
        let v = FlagValues::new(0.0, 1.0);
        v.set_origin_as_of(Origin::Live, 0);
        v.set_state(SourceState::Valid);
        assert_eq!(v.age_ms(), 0);
        v.set_state(SourceState::Interrupted);
        assert!(v.age_ms() < 60_000, "the age starts at the interruption");
        v.set_origin_as_of(Origin::Cached, crate::clock::now_ms() - 3_600_000);
        assert!(v.age_ms() >= 3_600_000);
    }

    #[test]
    fn levers_are_unset_until_a_flag_sets_them() {
        let v = FlagValues::new(0.0, 1.0);
        assert_eq!(v.paused(), None);
        v.set_lever(Lever::Pause, Some(1));
        v.set_lever(Lever::Concurrency, Some(3));
        assert_eq!(v.paused(), Some(true));
        assert_eq!(v.concurrency(), Some(3));
        v.set_lever(Lever::Pause, None);
        assert_eq!(v.paused(), None);
    }

    #[test]
    fn out_of_range_values_are_not_accepted() {
        assert_eq!(Watched::SkipRate.accept(101.0), None);
        assert_eq!(Watched::SkipRate.accept(-1.0), None);
        assert_eq!(Watched::SkipRate.accept(f64::NAN), None);
        assert_eq!(Watched::Rate.accept(0.5), Some(0.5));
        assert_eq!(Watched::Rate.accept(f64::INFINITY), None);
    }
}
