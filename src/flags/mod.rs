//! Flag values: where they live (atomics read by the hot path) and where they come from
//! (a source thread that owns all flag I/O and evaluation).
//!
//! The split is the architecture invariant: the hot path reads [`FlagValues`] with one relaxed
//! load per value and never blocks, allocates or logs because of flags; everything slow
//! (files, HTTP, JSON, rule evaluation) happens on the source thread, which stores results.

pub mod evaluate;
pub mod file;
pub mod source;
pub mod store;

use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};

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

/// The current flag values, shared between the source thread (the only writer) and every
/// thread that makes decisions (readers).
#[derive(Debug)]
pub struct FlagValues {
    skip_ppm: AtomicU32,
    rate_bits: AtomicU64,
    origin: AtomicU8,
    state: AtomicU8,
    updated_ms: AtomicU64,
}

impl FlagValues {
    /// Starts from the config's fallbacks.
    pub fn new(skip_rate_percent: f64, rate_per_sec: f64) -> FlagValues {
        let values = FlagValues {
            skip_ppm: AtomicU32::new(0),
            rate_bits: AtomicU64::new(0),
            origin: AtomicU8::new(Origin::Fallback as u8),
            state: AtomicU8::new(SourceState::None as u8),
            updated_ms: AtomicU64::new(crate::clock::now_ms()),
        };
        values.set_skip_rate(skip_rate_percent);
        values.set_rate(rate_per_sec);
        values
    }

    /// Skip rate in parts per million: what the hot path compares a job's hash against.
    #[inline]
    pub fn skip_ppm(&self) -> u32 {
        self.skip_ppm.load(Ordering::Relaxed)
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

    /// Where the current values came from.
    pub fn origin(&self) -> Origin {
        Origin::from_u8(self.origin.load(Ordering::Relaxed))
    }

    /// The remote source's state.
    pub fn state(&self) -> SourceState {
        SourceState::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// Milliseconds since the values last changed source or value.
    pub fn age_ms(&self) -> u64 {
        crate::clock::now_ms().saturating_sub(self.updated_ms.load(Ordering::Relaxed))
    }

    /// Stores a skip rate already checked to be within 0..=100 percent.
    pub fn set_skip_rate(&self, percent: f64) {
        let ppm = (percent.clamp(0.0, 100.0) * PPM_PER_PERCENT).round() as u32;
        self.skip_ppm.store(ppm, Ordering::Relaxed);
    }

    /// Stores a rate already checked to be within 0..=[`MAX_RATE_PER_SEC`].
    pub fn set_rate(&self, per_sec: f64) {
        let clamped = per_sec.clamp(0.0, MAX_RATE_PER_SEC);
        self.rate_bits.store(clamped.to_bits(), Ordering::Relaxed);
    }

    /// Records where the values came from and when.
    pub fn set_origin(&self, origin: Origin) {
        self.origin.store(origin as u8, Ordering::Relaxed);
        self.updated_ms
            .store(crate::clock::now_ms(), Ordering::Relaxed);
    }

    /// Records the remote source's state.
    pub fn set_state(&self, state: SourceState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }
}

/// Which value a watched flag feeds, with its valid range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    pub fn store(self, values: &FlagValues, value: f64) {
        match self {
            Watched::SkipRate => values.set_skip_rate(value),
            Watched::Rate => values.set_rate(value),
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
        v.set_skip_rate(0.0001);
        assert_eq!(v.skip_ppm(), 1);
        assert!((v.skip_rate() - 0.0001).abs() < 1e-9);
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
