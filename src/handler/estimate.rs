//! What the worker has learned about how long jobs take, per job type: the budget the doomed
//! check uses for a job whose producer declared no `x-work-ms`.
//!
//! **What is observed.** A job that finishes shows its work time. A job stopped at its
//! deadline shows only that it needed *more* than it ran: a right-censored observation. Counting
//! it as the time it ran pulls the estimate below the truth (under overload every long job is
//! cut off near the budget, so the estimate chases itself down); counting it as anything longer
//! (twice what it ran, say) can run away past the deadline, and then every job of the type is
//! dropped and nothing new is learned. So each type keeps two histograms, of finished times and
//! of stopped times, and the budget is read off the product-limit (Kaplan–Meier) estimate of
//! the work-time distribution, which is correct under that censoring: a stopped job counts as
//! "still running" for every time below the one it was stopped at, and no more.
//!
//! **Forgetting.** The histograms use log-spaced buckets (4 % wide, 1 ms to one day: about
//! 470 buckets), and their weights decay both with every job of the type (`half_life_jobs`)
//! and with time (`half_life_ms`), so a drift in work time is followed, and what was learned
//! in a slow spell loses its weight even when few jobs run.
//!
//! **The budget, by objective.** `FewestStopped` (the default) budgets the `quantile` of the
//! work time (0.99: at most about 1 % of the jobs started with just the budget left are cut off).
//! When the data do not reach that quantile (more than 1 - quantile of the weight was stopped
//! before it finished), the budget is the longest time observed: nothing shorter is known to
//! be enough. `MostOnTime` budgets the time B that maximises F(B) / E[min(W, B)] on the same
//! curve, the jobs finished per second of work when every started job has about B left, as
//! under overload; never more than the quantile. With heavy-tailed or bimodal work it is far
//! shorter than the quantile: more jobs are started and finished, and more are cut off.
//!
//! **Probes.** A type whose estimate dooms every job learns nothing, since nothing of it runs.
//! So when no job of a type has started for `probe_interval_ms` and another is doomed by its
//! estimate, that one runs anyway as a probe (it still stops at its deadline). A probe that
//! finishes in time t makes the type's next doomed jobs probes too while they have at least
//! 2t left, until one is stopped or the estimate lets jobs through on its own: once the work
//! is quick again, the type is back within about one probe interval, while its estimate
//! catches up with the new observations. A type is *shut out* from the first probe after an
//! interval with no job run until jobs of it run again (probes after a quick one, or a job its
//! estimate lets through); the caller logs both changes.
//!
//! The set of types is bounded: past `max_types`, new types share one estimate, shown as
//! `(other)`. Only the consumer thread touches this; an observation costs a pass over the
//! buckets up to the longest time seen.

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

/// Past this, weights are scaled down so they stay finite.
const RESCALE_AT: f64 = 1e150;

/// What the budget of a job without a declared work time is chosen to achieve; set by
/// `worker.shed_objective`, switchable live by the flag `flags.shed_objective_key`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Objective {
    /// Start a job only when it almost surely finishes (the `quantile` of the work time):
    /// few jobs are cut off at their deadline. For work with side effects, where a job
    /// stopped half-way costs more than a job not started.
    #[default]
    FewestStopped,
    /// Start jobs so that the most finish on time per second of work: with heavy-tailed or
    /// bimodal work, many more short jobs finish, at the price of more jobs cut off. For pure,
    /// idempotent work.
    MostOnTime,
}

impl Objective {
    /// The word used in the config, the flag's values, logs and the stats line.
    pub fn as_str(self) -> &'static str {
        match self {
            Objective::FewestStopped => "fewest_stopped",
            Objective::MostOnTime => "most_on_time",
        }
    }

    /// Reads the config's or the flag's word; `None` for anything else.
    pub fn parse(word: &str) -> Option<Objective> {
        match word {
            "fewest_stopped" => Some(Objective::FewestStopped),
            "most_on_time" => Some(Objective::MostOnTime),
            _ => None,
        }
    }
}

/// How the estimate is formed; changed by a reload.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EstimateSettings {
    /// The quantile of the work time budgeted for a job under `FewestStopped` (0.5 to 0.999).
    pub quantile: f64,
    /// After this many jobs of a type, an observation weighs half.
    pub half_life_jobs: u32,
    /// After this long, an observation weighs half, however few jobs ran meanwhile.
    pub half_life_ms: u64,
    /// Observations a type needs before its estimate replaces the default.
    pub min_jobs: u32,
    /// The longest a type whose jobs are all doomed by its estimate goes without a probe.
    pub probe_interval_ms: u64,
    /// The objective in force while no flag says otherwise.
    pub objective: Objective,
}

/// The config's defaults: with the work-time mixes of the README's shedding bench, these keep
/// wasted work near what the quantile allows while following a doubling of the work time
/// within seconds.
pub const DEFAULT_SETTINGS: EstimateSettings = EstimateSettings {
    quantile: 0.99,
    half_life_jobs: 300,
    half_life_ms: 20_000,
    min_jobs: 20,
    probe_interval_ms: 1_000,
    objective: Objective::FewestStopped,
};

/// What a job's run showed about its type's work time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observed {
    /// It finished after this many ms: an exact observation.
    Finished(u64),
    /// It was stopped (at its deadline) after running this many ms: it needed more.
    Stopped(u64),
}

/// What to do with a job its estimate dooms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Doomed {
    /// Drop it: the estimate holds.
    Drop,
    /// Run it as a probe, with no budget; with the change this makes to whether the type is
    /// shut out, for the caller to log once.
    Probe(Option<ShutOut>),
}

/// A change in whether a type is shut out by its estimate: no job of it has run for a probe
/// interval but probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShutOut {
    /// This probe is the first after a probe interval in which no job of the type ran.
    Began,
    /// The type runs jobs again: probes let through after a quick one, or a job its estimate
    /// lets through.
    Ended,
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
    /// The objective in force: the config's, or the flag's while it serves one.
    objective: Objective,
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
            objective: settings.objective,
            max_types: max_types.max(1),
            slots: HashMap::default(),
            names: Vec::new(),
            estimators: Vec::new(),
            other: None,
        }
    }

    /// Applies reloaded settings; what was learned is kept. The objective is set apart, by
    /// [`WorkEstimates::set_objective`], since a flag may override the config's.
    pub fn set_settings(&mut self, settings: EstimateSettings) {
        self.settings = settings;
        for estimator in &mut self.estimators {
            estimator.refresh(&settings);
        }
    }

    /// Puts an objective in force; returns whether it changed.
    pub fn set_objective(&mut self, objective: Objective) -> bool {
        let changed = self.objective != objective;
        self.objective = objective;
        changed
    }

    /// The objective in force.
    pub fn objective(&self) -> Objective {
        self.objective
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

    /// The work to budget for a job of this slot, in ms, under the objective in force.
    #[inline]
    pub fn budget_ms(&self, slot: TypeSlot, default_ms: u64) -> u64 {
        let estimator = &self.estimators[slot.0];
        if estimator.seen < u64::from(self.settings.min_jobs) {
            return default_ms;
        }
        match self.objective {
            Objective::FewestStopped => estimator.quantile_ms,
            Objective::MostOnTime => estimator.most_on_time_ms,
        }
    }

    /// Learns from a job of this slot that ran; `probe` says it ran as one.
    pub fn observe(&mut self, slot: TypeSlot, observed: Observed, probe: bool, now_ms: u64) {
        let settings = self.settings;
        let estimator = &mut self.estimators[slot.0];
        let (bucket_ms, stopped) = match observed {
            Observed::Finished(ms) => (ms, false),
            Observed::Stopped(ms) => (ms, true),
        };
        estimator.observe(bucket(bucket_ms), stopped, now_ms, &settings);
        if probe {
            // A quick finish lets the type's next doomed jobs through while they have room
            // for twice that; a stop ends it.
            estimator.probe_room_ms = match observed {
                Observed::Finished(ms) => Some(ms.saturating_mul(2).max(1)),
                Observed::Stopped(_) => None,
            };
        }
    }

    /// A job of this slot, not a probe, goes to the pool at `now_ms`. Returns
    /// `Some(ShutOut::Ended)` when the type had been shut out by its estimate.
    pub fn started(&mut self, slot: TypeSlot, now_ms: u64) -> Option<ShutOut> {
        let estimator = &mut self.estimators[slot.0];
        estimator.last_run_ms = Some(now_ms);
        estimator.probe_room_ms = None;
        std::mem::replace(&mut estimator.shut_out, false).then_some(ShutOut::Ended)
    }

    /// A job of this slot, with `left_ms` before its deadline, is doomed by its estimate:
    /// drop it, or run it as a probe (see the module's doc).
    pub fn doomed_by_estimate(&mut self, slot: TypeSlot, now_ms: u64, left_ms: u64) -> Doomed {
        let interval = self.settings.probe_interval_ms;
        let estimator = &mut self.estimators[slot.0];
        if estimator.probe_room_ms.is_some_and(|room| left_ms >= room) {
            estimator.last_run_ms = Some(now_ms);
            let ended = std::mem::replace(&mut estimator.shut_out, false);
            return Doomed::Probe(ended.then_some(ShutOut::Ended));
        }
        match estimator.last_run_ms {
            // A type's first doomed job starts the clock: a type just seen is not shut out.
            None => {
                estimator.last_run_ms = Some(now_ms);
                Doomed::Drop
            }
            Some(last) if now_ms.saturating_sub(last) >= interval => {
                estimator.last_run_ms = Some(now_ms);
                let began = !std::mem::replace(&mut estimator.shut_out, true);
                Doomed::Probe(began.then_some(ShutOut::Began))
            }
            Some(_) => Doomed::Drop,
        }
    }

    /// Whether no job of this slot but probes has run for a probe interval.
    #[cfg(test)]
    pub fn is_shut_out(&self, slot: TypeSlot) -> bool {
        self.estimators[slot.0].shut_out
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

    /// Appends ` work_estimate_ms=type:ms,...` (types in the order first seen) and
    /// ` shut_out=type,...` for the types shut out by their estimate; nothing before the first
    /// job.
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
        let mut shut_out = self
            .names
            .iter()
            .zip(&self.estimators)
            .filter(|(_, e)| e.shut_out)
            .map(|(name, _)| name.as_str());
        if let Some(first) = shut_out.next() {
            let _ = write!(line, " shut_out={first}");
            for name in shut_out {
                let _ = write!(line, ",{name}");
            }
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

/// One type's decaying histograms, and its probe state.
#[derive(Debug)]
struct Estimator {
    /// Weights of finished jobs by bucket of their work time.
    finished: Box<[f64; BUCKETS]>,
    /// Weights of stopped jobs by bucket of the time they ran.
    stopped: Box<[f64; BUCKETS]>,
    /// The highest bucket with any weight: the refresh stops there.
    top: usize,
    /// The weight the next observation adds; grows with every job and with time, so that
    /// older ones weigh less.
    increment: f64,
    /// When `increment` was last grown.
    grown_ms: Option<u64>,
    seen: u64,
    /// The budgets for each objective, recomputed after each observation.
    quantile_ms: u64,
    most_on_time_ms: u64,
    /// When a job of the type last went to the pool (probes included); `None` before its
    /// first doomed job.
    last_run_ms: Option<u64>,
    /// Set while no job but probes runs; cleared by the first job its estimate lets through.
    shut_out: bool,
    /// After a probe that finished: the time left a doomed job needs to run as a probe too.
    probe_room_ms: Option<u64>,
}

impl Estimator {
    fn new() -> Estimator {
        Estimator {
            finished: Box::new([0.0; BUCKETS]),
            stopped: Box::new([0.0; BUCKETS]),
            top: 0,
            increment: 1.0,
            grown_ms: None,
            seen: 0,
            quantile_ms: 0,
            most_on_time_ms: 0,
            last_run_ms: None,
            shut_out: false,
            probe_room_ms: None,
        }
    }

    fn observe(&mut self, bucket: usize, stopped: bool, now_ms: u64, settings: &EstimateSettings) {
        let elapsed_ms = self.grown_ms.map_or(0, |t| now_ms.saturating_sub(t));
        self.grown_ms = Some(now_ms);
        let halvings = 1.0 / f64::from(settings.half_life_jobs.max(1))
            + elapsed_ms as f64 / settings.half_life_ms.max(1) as f64;
        let grown = self.increment * halvings.exp2();
        if grown.is_finite() && grown <= RESCALE_AT {
            self.increment = grown;
        } else {
            // Scale everything down so the new weight is 1; after a long idle spell the old
            // weights may round to nothing, which is what they are worth.
            let scale = (-(self.increment.log2() + halvings)).exp2();
            self.finished.iter_mut().for_each(|w| *w *= scale);
            self.stopped.iter_mut().for_each(|w| *w *= scale);
            self.increment = 1.0;
        }
        let weights = if stopped {
            &mut self.stopped
        } else {
            &mut self.finished
        };
        weights[bucket] += self.increment;
        self.top = self.top.max(bucket);
        self.seen += 1;
        self.refresh(settings);
    }

    /// Recomputes both budgets from the product-limit curve: going up the buckets, the share
    /// still running drops at each bucket by the finished weight there over the weight still
    /// at risk (finished or stopped at that time or later).
    fn refresh(&mut self, settings: &EstimateSettings) {
        let top = self.top;
        let mut at_risk: f64 = self.finished[..=top].iter().sum::<f64>()
            + self.stopped[..=top].iter().sum::<f64>();
        let mut running = 1.0;
        // Work spent per started job up to the bucket's edge: the area under the curve.
        let mut work = 0.0;
        let mut edge_below = 0.0;
        let mut quantile = None;
        let mut best = (0.0, None);
        for i in 0..=top {
            let edge = upper_edge(i) as f64;
            work += running * (edge - edge_below);
            edge_below = edge;
            let finished = self.finished[i];
            if finished > 0.0 && at_risk > 0.0 {
                running *= (1.0 - finished / at_risk).max(0.0);
                let on_time_per_work = (1.0 - running) / work;
                if on_time_per_work > best.0 {
                    best = (on_time_per_work, Some(i));
                }
                if quantile.is_none() && running <= 1.0 - settings.quantile + 1e-12 {
                    quantile = Some(i);
                }
            }
            at_risk -= finished + self.stopped[i];
        }
        // Beyond what the data reach, nothing shorter than the longest time seen is known to
        // be enough.
        self.quantile_ms = upper_edge(quantile.unwrap_or(top));
        self.most_on_time_ms = best
            .1
            .map_or(self.quantile_ms, |i| upper_edge(i).min(self.quantile_ms));
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

    /// No decay worth the name: the tests that check the estimator against a known
    /// distribution want all of it.
    const STILL: EstimateSettings = EstimateSettings {
        quantile: 0.99,
        half_life_jobs: 1_000_000_000,
        half_life_ms: u64::MAX / 4,
        min_jobs: 10,
        probe_interval_ms: 1_000,
        objective: Objective::FewestStopped,
    };

    /// A small deterministic generator (splitmix64), so the synthetic work times are the same
    /// on every run.
    struct Draws(u64);

    impl Draws {
        fn uniform(&mut self) -> f64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        }

        fn normal(&mut self) -> f64 {
            let (u, v) = (self.uniform(), self.uniform());
            (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
        }

        /// Lognormal work in ms with the given mean and coefficient of variation.
        fn lognormal(&mut self, mean: f64, cv: f64) -> f64 {
            let s2 = (1.0 + cv * cv).ln();
            (mean.ln() - s2 / 2.0 + s2.sqrt() * self.normal()).exp()
        }
    }

    /// The true quantile `q` of a lognormal with this mean and CV.
    fn lognormal_quantile(mean: f64, cv: f64, q: f64) -> f64 {
        // z for q = 0.99 (the only one these tests ask for).
        assert!((q - 0.99).abs() < 1e-9);
        let z = 2.326_347_874;
        let s2 = (1.0 + cv * cv).ln();
        (mean.ln() - s2 / 2.0 + s2.sqrt() * z).exp()
    }

    /// Feeds `n` jobs of work `draw()`, each stopped at `censor()` if it needs more.
    fn feed(
        estimates: &mut WorkEstimates,
        slot: TypeSlot,
        n: usize,
        mut draw: impl FnMut() -> f64,
        mut censor: impl FnMut() -> f64,
    ) -> usize {
        let mut stopped = 0;
        for i in 0..n {
            let (work, limit) = (draw(), censor());
            let observed = if work > limit {
                stopped += 1;
                Observed::Stopped(limit as u64)
            } else {
                Observed::Finished(work.round() as u64)
            };
            estimates.observe(slot, observed, false, i as u64);
        }
        stopped
    }

    /// Within a bucket and a half of `truth` (buckets are 4 % wide) and 6 % for sampling.
    fn assert_near(budget: u64, truth: f64, what: &str) {
        let ratio = budget as f64 / truth;
        assert!(
            (0.94..=1.10).contains(&ratio),
            "{what}: budget {budget} ms, true quantile {truth:.0} ms"
        );
    }

    #[test]
    fn censored_lognormal_work_gives_the_true_quantile_where_the_data_reach_it() {
        for cv in [0.3, 1.0, 2.0] {
            let truth = lognormal_quantile(200.0, cv, 0.99);
            // Stopped at a fixed point past the quantile, and at points spread from half of it
            // to three times it (as jobs start with different times left): then a fifth of the
            // long jobs are stopped below the quantile, and only an estimator that counts them
            // as "longer than they ran" still finds it.
            for spread in [false, true] {
                let mut draws = Draws(7);
                let mut limits = Draws(11);
                let mut estimates = WorkEstimates::new(STILL, 1);
                let slot = estimates.slot("x");
                let stopped = feed(
                    &mut estimates,
                    slot,
                    60_000,
                    || draws.lognormal(200.0, cv),
                    || {
                        if spread {
                            truth * (0.5 + 2.5 * limits.uniform())
                        } else {
                            truth * 1.2
                        }
                    },
                );
                assert!(stopped > 0, "CV {cv}: the data must be censored");
                let what = format!("CV {cv}, spread {spread}, {stopped} stopped");
                assert_near(estimates.budget_ms(slot, 0), truth, &what);
            }
        }
    }

    #[test]
    fn counting_stopped_jobs_as_finished_or_as_twice_would_miss_where_this_does_not() {
        // Under overload every long job is cut off near the budget: here at 80 % of the true
        // quantile, for 5 % of the jobs. The quantile is past every finished time, so the data
        // do not reach it, and the budget must not fall below what was seen.
        let cv = 1.0;
        let truth = lognormal_quantile(200.0, cv, 0.99);
        let mut draws = Draws(3);
        let mut estimates = WorkEstimates::new(STILL, 1);
        let slot = estimates.slot("x");
        let limit = truth * 0.8;
        feed(
            &mut estimates,
            slot,
            20_000,
            || draws.lognormal(200.0, cv),
            || limit,
        );
        let budget = estimates.budget_ms(slot, 0);
        assert!(budget as f64 >= limit, "{budget} below the {limit:.0} seen");
        assert!(budget as f64 <= limit * 1.05, "{budget} past the {limit:.0} seen");
    }

    #[test]
    fn bimodal_work_gives_the_long_mode_when_reached_and_most_on_time_the_short_one() {
        let mut draws = Draws(5);
        let mut estimates = WorkEstimates::new(STILL, 1);
        let slot = estimates.slot("x");
        feed(
            &mut estimates,
            slot,
            20_000,
            || if draws.uniform() < 0.1 { 1_100.0 } else { 100.0 },
            || 1_500.0,
        );
        assert_near(estimates.budget_ms(slot, 0), 1_100.0, "quantile");
        estimates.set_objective(Objective::MostOnTime);
        // 0.9 finished per 0.1 s of work at 100 ms, against 1.0 per 0.2 s at 1,100 ms.
        assert_near(estimates.budget_ms(slot, 0), 100.0, "most on time");
    }

    #[test]
    fn most_on_time_is_never_longer_than_the_quantile() {
        for cv in [0.3, 1.0, 2.0] {
            let mut draws = Draws(9);
            let mut estimates = WorkEstimates::new(STILL, 1);
            let slot = estimates.slot("x");
            for i in 0..5_000u64 {
                let work = draws.lognormal(200.0, cv);
                let observed = if work > 2_000.0 {
                    Observed::Stopped(2_000)
                } else {
                    Observed::Finished(work as u64)
                };
                estimates.observe(slot, observed, false, i);
                let quantile = estimates.budget_ms(slot, 0);
                estimates.set_objective(Objective::MostOnTime);
                let most_on_time = estimates.budget_ms(slot, 0);
                estimates.set_objective(Objective::FewestStopped);
                assert!(most_on_time <= quantile, "CV {cv}: {most_on_time} > {quantile}");
            }
        }
    }

    #[test]
    fn one_job_stopped_at_its_deadline_leaves_a_quick_type_its_estimate() {
        // The failure this estimator exists to prevent: jobs of about 100 ms, and one that
        // was stopped at its 2 s deadline after 1.5 s.
        let mut draws = Draws(1);
        let mut estimates = WorkEstimates::new(
            EstimateSettings {
                half_life_jobs: 300,
                half_life_ms: 20_000,
                ..STILL
            },
            1,
        );
        let slot = estimates.slot("resize");
        for i in 0..200u64 {
            let ms = draws.lognormal(100.0, 0.3) as u64;
            estimates.observe(slot, Observed::Finished(ms), false, i * 50);
        }
        let before = estimates.budget_ms(slot, 0);
        estimates.observe(slot, Observed::Stopped(1_500), false, 10_000);
        let after = estimates.budget_ms(slot, 0);
        assert!(after < 300, "{before} ms became {after} ms");
        assert_eq!(after, before, "a stopped job is not an observation of 1.5 s");
    }

    #[test]
    fn default_until_enough_jobs_then_the_quantile() {
        let mut estimates = WorkEstimates::new(
            EstimateSettings {
                quantile: 0.9,
                ..STILL
            },
            4,
        );
        let slot = estimates.slot("resize");
        for i in 0..9 {
            estimates.observe(slot, Observed::Finished(100 + i), false, 0);
            assert_eq!(estimates.budget_ms(slot, 1_000), 1_000);
        }
        // 1..=100 ms evenly, after nine of 100-108: the 90th percentile is about 98 ms.
        for ms in 1..=100 {
            estimates.observe(slot, Observed::Finished(ms), false, 0);
        }
        let budget = estimates.budget_ms(slot, 1_000);
        assert!((95..=106).contains(&budget), "{budget}");
    }

    #[test]
    fn a_doubling_of_work_is_followed_within_a_few_half_lives() {
        let settings = EstimateSettings {
            quantile: 0.9,
            half_life_jobs: 50,
            ..STILL
        };
        let mut estimates = WorkEstimates::new(settings, 4);
        let slot = estimates.slot("");
        for _ in 0..500 {
            estimates.observe(slot, Observed::Finished(200), false, 0);
        }
        assert!((200..=208).contains(&estimates.budget_ms(slot, 0)));
        let mut jobs_to_follow = None;
        for n in 1..=500 {
            estimates.observe(slot, Observed::Finished(400), false, 0);
            if estimates.budget_ms(slot, 0) >= 400 && jobs_to_follow.is_none() {
                jobs_to_follow = Some(n);
            }
        }
        let n = jobs_to_follow.expect("followed");
        // The 90th percentile moves once 10 % of the weight is new: 0.15 half-lives.
        assert!(n <= 3 * settings.half_life_jobs as usize, "{n}");
    }

    #[test]
    fn old_observations_lose_weight_with_time_however_few_jobs_ran() {
        let mut estimates = WorkEstimates::new(
            EstimateSettings {
                half_life_jobs: 1_000_000,
                half_life_ms: 1_000,
                ..STILL
            },
            1,
        );
        let slot = estimates.slot("x");
        for i in 0..1_000 {
            estimates.observe(slot, Observed::Stopped(1_900), false, i);
        }
        // Twenty seconds later (twenty half-lives: the old thousand weigh a thousandth of one
        // new job), a handful of quick jobs are all that counts.
        for i in 0..20 {
            estimates.observe(slot, Observed::Finished(100), false, 21_000 + i);
        }
        let budget = estimates.budget_ms(slot, 0);
        assert!((100..=104).contains(&budget), "{budget}");
    }

    #[test]
    fn a_shut_out_type_gets_a_probe_every_interval_whatever_the_job_count() {
        let mut estimates = WorkEstimates::new(STILL, 1);
        let slot = estimates.slot("x");
        // The first doomed job starts the clock.
        assert_eq!(estimates.doomed_by_estimate(slot, 10_000, 500), Doomed::Drop);
        for t in (10_001..11_000).step_by(7) {
            assert_eq!(estimates.doomed_by_estimate(slot, t, 500), Doomed::Drop);
        }
        assert_eq!(
            estimates.doomed_by_estimate(slot, 11_000, 500),
            Doomed::Probe(Some(ShutOut::Began))
        );
        assert!(estimates.is_shut_out(slot));
        assert_eq!(estimates.doomed_by_estimate(slot, 11_500, 500), Doomed::Drop);
        // One more interval, one more probe; the shut-out was already reported.
        assert_eq!(
            estimates.doomed_by_estimate(slot, 12_000, 500),
            Doomed::Probe(None)
        );
        // A job the estimate lets through ends the shut-out, once.
        assert_eq!(estimates.started(slot, 12_100), Some(ShutOut::Ended));
        assert_eq!(estimates.started(slot, 12_200), None);
        assert!(!estimates.is_shut_out(slot));
    }

    #[test]
    fn a_probe_that_finishes_lets_jobs_with_room_for_twice_its_time_through() {
        let mut estimates = WorkEstimates::new(STILL, 1);
        let slot = estimates.slot("x");
        estimates.doomed_by_estimate(slot, 0, 500);
        assert_eq!(
            estimates.doomed_by_estimate(slot, 1_000, 1_900),
            Doomed::Probe(Some(ShutOut::Began))
        );
        estimates.observe(slot, Observed::Finished(120), true, 1_120);
        // The type runs again, as probes.
        assert_eq!(
            estimates.doomed_by_estimate(slot, 1_130, 240),
            Doomed::Probe(Some(ShutOut::Ended))
        );
        assert!(!estimates.is_shut_out(slot));
        assert_eq!(estimates.doomed_by_estimate(slot, 1_140, 239), Doomed::Drop);
        // A probe that is stopped ends it: back to one an interval, and shut out again once
        // an interval passes with no job run.
        estimates.observe(slot, Observed::Stopped(240), true, 1_400);
        assert_eq!(estimates.doomed_by_estimate(slot, 1_500, 1_900), Doomed::Drop);
        assert_eq!(
            estimates.doomed_by_estimate(slot, 2_130, 1_900),
            Doomed::Probe(Some(ShutOut::Began))
        );
    }

    #[test]
    fn objectives_read_and_print_as_the_config_writes_them() {
        for objective in [Objective::FewestStopped, Objective::MostOnTime] {
            assert_eq!(Objective::parse(objective.as_str()), Some(objective));
        }
        assert_eq!(Objective::parse("fastest"), None);
        assert_eq!(Objective::default(), Objective::FewestStopped);
    }

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
    fn types_are_bounded_and_the_rest_share_one_estimate() {
        let mut estimates = WorkEstimates::new(STILL, 2);
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
        estimates.doomed_by_estimate(b, 0, 1);
        estimates.doomed_by_estimate(b, 1_000, 1);
        line.clear();
        estimates.write_fields(&mut line, 7);
        assert_eq!(line, " work_estimate_ms=a:7,b_b:7,(other):7 shut_out=b_b");
    }

    #[test]
    fn weights_stay_finite_over_millions_of_jobs_and_long_idle_spells() {
        let mut estimates = WorkEstimates::new(
            EstimateSettings {
                half_life_jobs: 10,
                half_life_ms: 1,
                ..STILL
            },
            1,
        );
        let slot = estimates.slot("x");
        let mut now = 0u64;
        for i in 0..200_000u64 {
            now += if i % 1_000 == 0 { 1 << 40 } else { 3 };
            estimates.observe(slot, Observed::Finished(50 + i % 3), false, now);
        }
        let budget = estimates.budget_ms(slot, 0);
        assert!((50..=56).contains(&budget), "{budget}");
    }
}
