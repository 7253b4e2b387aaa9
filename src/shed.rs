//! The shedding decision: which jobs are not worth starting.
//!
//! This runs once per job and is the product's hot path: integer comparisons on values already
//! parsed and one relaxed atomic load for the skip rate. A job is dropped, before any work is
//! spent on it, when it is
//! - `expired`: its deadline has passed;
//! - `doomed`: it has not expired, but the time left is less than the work it needs (declared
//!   by the producer, or learned by the worker for the job's type);
//! - `skipped`: its id falls in the share the skip-rate flag asks to drop.
//!
//! Expired and doomed jobs are checked first so that the skip rate applies to jobs that could
//! still succeed, and the skip share an operator sets is the share they get.

use crate::job::JobMeta;

/// The skip rate's unit: parts per million.
pub const PPM: u64 = 1_000_000;

/// What to do with a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Run,
    Expired,
    Doomed,
    Skipped,
}

/// What the deadline checks alone decide, when a pool thread is about to start a job: a job
/// cannot be skipped there, so this type has no such case to handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AtStart {
    Run,
    Expired,
    Doomed,
}

/// The decision when a job arrives: deadline checks, then the skip rate.
#[inline]
pub fn at_receipt(meta: &JobMeta, now_ms: u64, skip_ppm: u32, drop_doomed: bool) -> Verdict {
    match at_start(meta, now_ms, drop_doomed) {
        AtStart::Expired => Verdict::Expired,
        AtStart::Doomed => Verdict::Doomed,
        AtStart::Run if is_skipped(meta.id_hash, skip_ppm) => Verdict::Skipped,
        AtStart::Run => Verdict::Run,
    }
}

/// The decision when a pool thread is about to start a job: time has passed since receipt,
/// so the deadline checks run again (the skip decision is not repeated).
#[inline]
pub fn at_start(meta: &JobMeta, now_ms: u64, drop_doomed: bool) -> AtStart {
    match meta.deadline_ms {
        Some(deadline) if now_ms >= deadline => AtStart::Expired,
        Some(deadline) if drop_doomed && now_ms.saturating_add(meta.work_ms) > deadline => {
            AtStart::Doomed
        }
        _ => AtStart::Run,
    }
}

/// Whether the job with this id hash is in the skipped share.
#[inline]
pub fn is_skipped(id_hash: u64, skip_ppm: u32) -> bool {
    id_hash % PPM < u64::from(skip_ppm)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(deadline_ms: Option<u64>, work_ms: u64) -> JobMeta {
        JobMeta {
            id_hash: 12_345_678,
            created_ms: 0,
            deadline_ms,
            work_ms,
            work_declared: true,
        }
    }

    #[test]
    fn past_deadline_is_expired() {
        assert_eq!(at_start(&meta(Some(100), 0), 100, true), AtStart::Expired);
    }

    #[test]
    fn too_little_time_left_is_doomed_only_when_enabled() {
        let m = meta(Some(1_000), 500);
        assert_eq!(at_start(&m, 600, true), AtStart::Doomed);
        assert_eq!(at_start(&m, 600, false), AtStart::Run);
        assert_eq!(at_start(&m, 500, true), AtStart::Run);
    }

    #[test]
    fn no_deadline_always_runs() {
        assert_eq!(at_start(&meta(None, 5_000), u64::MAX, true), AtStart::Run);
    }

    #[test]
    fn skip_rate_bounds() {
        assert!(!is_skipped(0, 0));
        assert!(is_skipped(u64::MAX, PPM as u32));
        assert_eq!(
            at_receipt(&meta(None, 0), 0, PPM as u32, true),
            Verdict::Skipped
        );
        assert_eq!(at_receipt(&meta(None, 0), 0, 0, true), Verdict::Run);
    }

    #[test]
    fn deadline_checks_come_before_skipping() {
        assert_eq!(
            at_receipt(&meta(Some(10), 0), 20, PPM as u32, true),
            Verdict::Expired
        );
    }
}
