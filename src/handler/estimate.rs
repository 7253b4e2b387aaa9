//! What the worker has learned about how long jobs take, per job type: the budget the doomed
//! check uses for a job whose producer declared no `x-work-ms`.
//!
//! Each type has a histogram of observed handler times in log-spaced buckets (4 % wide, 1 ms
//! to one day: about 470 buckets, 4 KiB), whose weights decay exponentially by job count, so
//! that after `half_life_jobs` jobs an observation counts half as much and a drift in work time
//! is followed within a few half-lives. The budget is a high quantile of that histogram (the
//! bucket's upper edge, so it errs long): with oldest-first service and unknown, variable work
//! times, budgeting the median starts jobs that cannot finish and wastes most of the worker's
//! time on them, while a high quantile drops those jobs before any work is spent (see the
//! README's measurements). Until a type has `min_jobs` observations, its budget is
//! `worker.default_work_ms`.
//!
//! A job that was stopped at its deadline ran for less than it needed, by an amount nobody
//! knows: it is observed as having needed twice the time it ran. Recording the time it ran
//! pulls the estimate below the true quantile, since under overload every job starts with
//! about the budget left, so every longer job is cut off near the budget (measured: a 757 ms
//! estimate of a 988 ms 99th percentile, and 12 % of worker time wasted). Recording it as
//! longer than anything runs away instead: while more than 1 - quantile of the jobs are cut
//! off the budget jumps to a day and every job is dropped (measured too). Twice lifts the
//! budget quickly to where few jobs are cut off, and stays bounded by twice the deadline.
//!
//! Once the estimate makes every job of a type doomed, no job of it runs and nothing new is
//! learned, so a slow spell could shut a type out for good. After [`PROBE_AFTER`] jobs of a
//! type in a row are doomed by the estimate, one is let through as a probe (it still stops at
//! its deadline): when the work is quick again, the probes say so.
//!
//! The set of types is bounded: past `max_types`, new types share one estimate,
//! shown as `(other)`. Only the consumer thread touches this; an observation costs one
//! logarithm and a pass over the buckets.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::{BuildHasherDefault, Hasher};

/// Hashes a job type for the slot lookup done on every delivery: FNV-1a and a finalizer, as
/// `job::hash_id` does, rather than the standard SipHash, at a fraction of the cost for short
/// strings. Flooding is no concern here: the map never holds more than `max_types` entries.
struct TypeHasher(u64);

impl Default for TypeHasher {
    fn default() -> TypeHasher {
        TypeHasher(crate::job::FNV_OFFSET)
    }
}

impl Hasher for TypeHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0 = crate::job::fnv1a(self.0, bytes);
    }

    fn finish(&self) -> u64 {
        crate::job::mix64(self.0)
    }
}

/// Bucket `i` holds times up to `GROWTH^i` ms.
const GROWTH: f64 = 1.04;
/// Enough buckets to reach one day (86,400,000 ms).
const BUCKETS: usize = 467;
/// Jobs of a type doomed in a row by its estimate before one runs anyway, to learn whether
/// the estimate still holds.
pub const PROBE_AFTER: u32 = 100;

/// Past this, weights are scaled down so they stay finite.
const RESCALE_AT: f64 = 1e150;

/// How the estimate is formed; changed by a reload.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EstimateSettings {
    /// The quantile of recent work times budgeted for a job (0.5 to 0.999).
    pub quantile: f64,
    /// After this many jobs of a type, an observation weighs half.
    pub half_life_jobs: u32,
    /// Observations a type needs before its estimate replaces the default.
    pub min_jobs: u32,
}

/// Which estimate a job's type uses: an index, resolved once at receipt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TypeSlot(usize);

impl TypeSlot {
    /// The slot's number: types are numbered from 0 in the order first seen, and stay below
    /// `max_types + 1` (the last being `(other)`), so metrics can keep a counter per slot.
    pub fn index(self) -> usize {
        self.0
    }
}

/// Per-type work-time estimates, bounded in number.
#[derive(Debug)]
pub struct WorkEstimates {
    settings: EstimateSettings,
    max_types: usize,
    slots: HashMap<String, TypeSlot, BuildHasherDefault<TypeHasher>>,
    /// `names[i]` and `estimators[i]` belong to slot `i`; the last slot past `max_types` is
    /// the shared `(other)`.
    names: Vec<String>,
    estimators: Vec<Estimator>,
    other: Option<TypeSlot>,
}

impl WorkEstimates {
    pub fn new(settings: EstimateSettings, max_types: usize) -> WorkEstimates {
        WorkEstimates {
            settings,
            max_types: max_types.max(1),
            slots: HashMap::default(),
            names: Vec::new(),
            estimators: Vec::new(),
            other: None,
        }
    }

    /// Applies reloaded settings; what was learned is kept.
    pub fn set_settings(&mut self, settings: EstimateSettings) {
        self.settings = settings;
        for estimator in &mut self.estimators {
            estimator.refresh(&settings);
        }
    }

    /// The slot for `job_type`, learning it if there is room.
    pub fn slot(&mut self, job_type: &str) -> TypeSlot {
        if let Some(&slot) = self.slots.get(job_type) {
            return slot;
        }
        if self.slots.len() < self.max_types {
            let slot = self.push(display_name(job_type));
            self.slots.insert(job_type.to_owned(), slot);
            return slot;
        }
        match self.other {
            Some(slot) => slot,
            None => {
                let slot = self.push("(other)".to_owned());
                self.other = Some(slot);
                slot
            }
        }
    }

    /// Whether `slot` is the one shared by the types past `max_types`.
    pub fn is_shared(&self, slot: TypeSlot) -> bool {
        self.other == Some(slot)
    }

    fn push(&mut self, name: String) -> TypeSlot {
        self.names.push(name);
        self.estimators.push(Estimator::new());
        TypeSlot(self.estimators.len() - 1)
    }

    /// The work to budget for a job of this slot, in ms.
    #[inline]
    pub fn budget_ms(&self, slot: TypeSlot, default_ms: u64) -> u64 {
        let estimator = &self.estimators[slot.0];
        if estimator.seen < u64::from(self.settings.min_jobs) {
            default_ms
        } else {
            estimator.estimate_ms
        }
    }

    /// Learns that a job of this slot took `ms`.
    pub fn observe(&mut self, slot: TypeSlot, ms: u64) {
        let settings = self.settings;
        self.estimators[slot.0].observe(bucket(ms), &settings);
    }

    /// Learns that a job of this slot was stopped after `ran_ms`, before it finished.
    pub fn observe_stopped(&mut self, slot: TypeSlot, ran_ms: u64) {
        let settings = self.settings;
        self.estimators[slot.0].observe(bucket(ran_ms.saturating_mul(2)), &settings);
    }

    /// A job of this slot is doomed by its estimate; returns whether to run it anyway as a
    /// probe (one after [`PROBE_AFTER`] in a row).
    pub fn doomed_by_estimate(&mut self, slot: TypeSlot) -> bool {
        let estimator = &mut self.estimators[slot.0];
        estimator.doomed_in_a_row += 1;
        if estimator.doomed_in_a_row >= PROBE_AFTER {
            estimator.doomed_in_a_row = 0;
            return true;
        }
        false
    }

    /// Slots learned so far.
    pub fn type_count(&self) -> usize {
        self.names.len()
    }

    /// The types by slot index and display name, in the order they were first seen.
    pub fn names(&self) -> impl Iterator<Item = (usize, &str)> + '_ {
        self.names.iter().enumerate().map(|(i, n)| (i, n.as_str()))
    }

    /// Each slot's type, as the stats line shows it, and its budget in ms, by slot number.
    pub fn budgets(&self, default_ms: u64) -> impl Iterator<Item = (&str, u64)> + '_ {
        self.names
            .iter()
            .enumerate()
            .map(move |(i, name)| (name.as_str(), self.budget_ms(TypeSlot(i), default_ms)))
    }

    /// Appends ` work_estimate_ms=type:ms,...` (types in the order first seen); nothing before
    /// the first job.
    pub fn write_fields(&self, line: &mut String, default_ms: u64) {
        if self.names.is_empty() {
            return;
        }
        line.push_str(" work_estimate_ms=");
        for (i, name) in self.names.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            let _ = write!(
                line,
                "{sep}{name}:{}",
                self.budget_ms(TypeSlot(i), default_ms)
            );
        }
    }
}

/// A type as the stats line shows it: `(none)` for no type, and only `[A-Za-z0-9._-]`, so the
/// field stays one token for grep and awk.
fn display_name(job_type: &str) -> String {
    if job_type.is_empty() {
        return "(none)".to_owned();
    }
    job_type
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// One type's decaying histogram.
#[derive(Debug)]
struct Estimator {
    weights: Box<[f64; BUCKETS]>,
    total: f64,
    /// The weight the next observation adds; grows so that older ones weigh less.
    increment: f64,
    seen: u64,
    /// Jobs doomed by the estimate since the last observation.
    doomed_in_a_row: u32,
    /// The quantile, recomputed after each observation.
    estimate_ms: u64,
}

impl Estimator {
    fn new() -> Estimator {
        Estimator {
            weights: Box::new([0.0; BUCKETS]),
            total: 0.0,
            increment: 1.0,
            seen: 0,
            doomed_in_a_row: 0,
            estimate_ms: 0,
        }
    }

    fn observe(&mut self, bucket: usize, settings: &EstimateSettings) {
        self.increment *= 2f64.powf(1.0 / f64::from(settings.half_life_jobs.max(1)));
        if self.increment > RESCALE_AT {
            let scale = 1.0 / self.increment;
            self.weights.iter_mut().for_each(|w| *w *= scale);
            self.total *= scale;
            self.increment = 1.0;
        }
        self.weights[bucket] += self.increment;
        self.total += self.increment;
        self.seen += 1;
        self.doomed_in_a_row = 0;
        self.refresh(settings);
    }

    fn refresh(&mut self, settings: &EstimateSettings) {
        let target = settings.quantile * self.total;
        let mut sum = 0.0;
        for (i, w) in self.weights.iter().enumerate() {
            sum += w;
            if sum >= target && sum > 0.0 {
                self.estimate_ms = upper_edge(i);
                return;
            }
        }
        self.estimate_ms = upper_edge(BUCKETS - 1);
    }
}

fn bucket(ms: u64) -> usize {
    if ms <= 1 {
        return 0;
    }
    let i = ((ms as f64).ln() / GROWTH.ln()).ceil() as usize;
    i.min(BUCKETS - 1)
}

fn upper_edge(bucket: usize) -> u64 {
    GROWTH.powi(bucket as i32).ceil() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: EstimateSettings = EstimateSettings {
        quantile: 0.9,
        half_life_jobs: 50,
        min_jobs: 10,
    };

    #[test]
    fn buckets_cover_a_day_and_err_long_by_at_most_one_bucket() {
        assert_eq!(bucket(0), 0);
        assert!(upper_edge(BUCKETS - 1) >= 86_400_000);
        for ms in [2, 17, 200, 999, 1_000, 123_456, 86_400_000] {
            let edge = upper_edge(bucket(ms));
            assert!(edge >= ms, "{ms} -> {edge}");
            assert!(edge as f64 <= ms as f64 * GROWTH + 1.0, "{ms} -> {edge}");
        }
    }

    #[test]
    fn default_until_enough_jobs_then_the_quantile() {
        let mut estimates = WorkEstimates::new(
            EstimateSettings {
                half_life_jobs: 1_000_000,
                ..SETTINGS
            },
            4,
        );
        let slot = estimates.slot("resize");
        for i in 0..9 {
            estimates.observe(slot, 100 + i);
            assert_eq!(estimates.budget_ms(slot, 1_000), 1_000);
        }
        // 1..=100 ms evenly, after nine of 100-108: the 90th percentile is about 98 ms.
        for ms in 1..=100 {
            estimates.observe(slot, ms);
        }
        let budget = estimates.budget_ms(slot, 1_000);
        assert!((95..=106).contains(&budget), "{budget}");
    }

    #[test]
    fn a_doubling_of_work_is_followed_within_a_few_half_lives() {
        let mut estimates = WorkEstimates::new(SETTINGS, 4);
        let slot = estimates.slot("");
        for _ in 0..500 {
            estimates.observe(slot, 200);
        }
        assert!((200..=208).contains(&estimates.budget_ms(slot, 0)));
        let mut jobs_to_follow = None;
        for n in 1..=500 {
            estimates.observe(slot, 400);
            if estimates.budget_ms(slot, 0) >= 400 && jobs_to_follow.is_none() {
                jobs_to_follow = Some(n);
            }
        }
        let n = jobs_to_follow.expect("followed");
        // The 90th percentile moves once 10 % of the weight is new: 0.15 half-lives.
        assert!(n <= 3 * SETTINGS.half_life_jobs as usize, "{n}");
    }

    #[test]
    fn stopped_jobs_count_as_longer_than_the_budget() {
        let mut estimates = WorkEstimates::new(SETTINGS, 1);
        let slot = estimates.slot("x");
        for _ in 0..100 {
            estimates.observe(slot, 100);
        }
        // 20 % stopped after 100 ms: the 90th percentile is among them, at twice that.
        for _ in 0..25 {
            estimates.observe_stopped(slot, 100);
        }
        let budget = estimates.budget_ms(slot, 0);
        assert!((200..=210).contains(&budget), "{budget}");
    }

    #[test]
    fn a_type_shut_out_by_its_estimate_gets_a_probe_now_and_then() {
        let mut estimates = WorkEstimates::new(SETTINGS, 1);
        let slot = estimates.slot("x");
        let probes = (0..1_000)
            .filter(|_| estimates.doomed_by_estimate(slot))
            .count();
        assert_eq!(probes, 1_000 / PROBE_AFTER as usize);
        estimates.doomed_by_estimate(slot);
        estimates.observe(slot, 5);
        let until_probe = (1..).find(|_| estimates.doomed_by_estimate(slot));
        assert_eq!(
            until_probe,
            Some(PROBE_AFTER as usize),
            "an observation starts over"
        );
    }

    #[test]
    fn types_are_bounded_and_the_rest_share_one_estimate() {
        let mut estimates = WorkEstimates::new(SETTINGS, 2);
        let a = estimates.slot("a");
        let b = estimates.slot("b b");
        let c = estimates.slot("c");
        let d = estimates.slot("d");
        assert_ne!(a, b);
        assert_eq!(c, d);
        assert_eq!(estimates.slot("a"), a);
        let mut line = String::new();
        estimates.write_fields(&mut line, 7);
        assert_eq!(line, " work_estimate_ms=a:7,b_b:7,(other):7");
    }

    #[test]
    fn weights_stay_finite_over_millions_of_jobs() {
        let mut estimates = WorkEstimates::new(
            EstimateSettings {
                half_life_jobs: 10,
                ..SETTINGS
            },
            1,
        );
        let slot = estimates.slot("x");
        for i in 0..200_000u64 {
            estimates.observe(slot, 50 + i % 3);
        }
        let budget = estimates.budget_ms(slot, 0);
        assert!((50..=56).contains(&budget), "{budget}");
    }
}
