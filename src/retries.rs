//! How many times each job has asked to be retried, so that a job whose handler always says
//! "later" (exit 75, HTTP 429 or 503) ends `failed` after `handler.max_retries` instead of
//! looping through the queue forever.
//!
//! The count lives in this process, keyed by the job id's hash, in two generations of bounded
//! size: when the current one fills up it becomes the previous one and the oldest is dropped,
//! so memory stays bounded whatever the traffic, and a job that keeps retrying is never
//! forgotten (each retry moves it to the current generation). A quorum queue's
//! `x-delivery-count` is taken into account when it is higher, which also covers retries seen
//! by other workers; for a limit that survives restarts use `broker.delivery_limit`.

use std::collections::HashMap;

/// Retries per job, bounded in memory.
#[derive(Debug)]
pub struct RetryCounts {
    current: HashMap<u64, u32>,
    previous: HashMap<u64, u32>,
    /// Entries per generation.
    capacity: usize,
}

impl RetryCounts {
    pub fn new(capacity: usize) -> RetryCounts {
        RetryCounts {
            current: HashMap::new(),
            previous: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// Counts one more retry of the job `key`, at least `delivery_count` (a quorum queue's
    /// count of earlier deliveries); returns its retries so far, this one included.
    pub fn bump(&mut self, key: u64, delivery_count: u32) -> u32 {
        let before = self
            .current
            .remove(&key)
            .or_else(|| self.previous.remove(&key))
            .unwrap_or(0);
        let retries = before.max(delivery_count).saturating_add(1);
        if self.current.len() >= self.capacity {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(key, retries);
        retries
    }

    /// The job ended for good; its count is no longer needed.
    #[inline]
    pub fn forget(&mut self, key: u64) {
        if !self.current.is_empty() || !self.previous.is_empty() {
            self.current.remove(&key);
            self.previous.remove(&key);
        }
    }

    /// Jobs whose count is kept, for the test that checks the bound.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_grow_per_job_and_forget_clears() {
        let mut counts = RetryCounts::new(10);
        assert_eq!(counts.bump(1, 0), 1);
        assert_eq!(counts.bump(1, 0), 2);
        assert_eq!(counts.bump(2, 0), 1);
        counts.forget(1);
        assert_eq!(counts.bump(1, 0), 1);
    }

    #[test]
    fn a_higher_delivery_count_wins() {
        let mut counts = RetryCounts::new(10);
        assert_eq!(counts.bump(1, 4), 5);
        assert_eq!(counts.bump(1, 0), 6);
    }

    #[test]
    fn memory_is_bounded_and_a_retrying_job_is_kept() {
        let mut counts = RetryCounts::new(100);
        for key in 0..10_000 {
            counts.bump(key, 0);
            counts.bump(u64::MAX, 0);
        }
        assert!(counts.len() <= 200, "{}", counts.len());
        assert_eq!(counts.bump(u64::MAX, 0), 10_001);
    }
}
