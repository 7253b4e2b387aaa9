//! Counting how often each flag evaluation was used, on the thread that uses it.
//!
//! LaunchDarkly's dashboard counts evaluations, and a LaunchDarkly SDK would have been asked
//! for the skip rate once per job. Here the hot path reads a stored value instead, so it
//! counts its uses by the evaluation id stamped on the value ([`super::Stamped`]): a compare
//! and an increment on memory only that thread touches. Now and then the counts are handed
//! to the flag source thread, which knows what each id stands for.

/// Uses per evaluation id since the last [`Tally::take`].
#[derive(Debug, Default)]
pub struct Tally {
    counts: Vec<(u32, u64)>,
    /// Index of the entry counted last: the same evaluation serves long runs of jobs.
    last: usize,
}

impl Tally {
    /// Counts one use of evaluation `id`.
    #[inline]
    pub fn count(&mut self, id: u32) {
        if let Some((last_id, n)) = self.counts.get_mut(self.last) {
            if *last_id == id {
                *n += 1;
                return;
            }
        }
        self.count_other(id);
    }

    #[cold]
    fn count_other(&mut self, id: u32) {
        match self.counts.iter().position(|&(i, _)| i == id) {
            Some(index) => {
                self.counts[index].1 += 1;
                self.last = index;
            }
            None => {
                self.counts.push((id, 1));
                self.last = self.counts.len() - 1;
            }
        }
    }

    /// Whether nothing has been counted since the last take.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// The counts so far, leaving the tally empty.
    pub fn take(&mut self) -> Vec<(u32, u64)> {
        self.last = 0;
        std::mem::take(&mut self.counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_each_evaluation_apart() {
        let mut tally = Tally::default();
        for id in [3, 3, 3, 5, 3, 5, 0] {
            tally.count(id);
        }
        let mut counts = tally.take();
        counts.sort_unstable();
        assert_eq!(counts, vec![(0, 1), (3, 4), (5, 2)]);
        assert!(tally.is_empty());
        tally.count(5);
        assert_eq!(tally.take(), vec![(5, 1)]);
    }
}
