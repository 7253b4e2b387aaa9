//! Counting how often each flag evaluation was used, on the thread that uses it.
//!
//! LaunchDarkly's dashboard counts evaluations, and a LaunchDarkly SDK would have been asked
//! for the skip rate once per job. Here the hot path reads a stored value instead, so it
//! counts its uses by the evaluation id stamped on the value ([`super::Stamped`]): a compare
//! and an increment on memory only that thread touches. Now and then the counts are handed
//! to the flag source thread, which knows what each id stands for.

/// Ids below this are counted in a plain array indexed by id; ids are handed out one by one
/// as flag values change, so a daemon stays below it unless its flags change thousands of
/// times.
const DENSE_IDS: usize = 4_096;

/// Uses per evaluation id since the last [`Tally::take`].
#[derive(Debug, Default)]
pub struct Tally {
    /// Counts by id, for ids below [`DENSE_IDS`]; grown to the highest id seen.
    dense: Vec<u64>,
    /// Counts for higher ids.
    sparse: Vec<(u32, u64)>,
}

impl Tally {
    /// Counts one use of evaluation `id`.
    #[inline]
    pub fn count(&mut self, id: u32) {
        match self.dense.get_mut(id as usize) {
            Some(n) => *n += 1,
            None => self.count_other(id),
        }
    }

    #[cold]
    fn count_other(&mut self, id: u32) {
        let index = id as usize;
        if index < DENSE_IDS {
            self.dense.resize(index + 1, 0);
            self.dense[index] += 1;
            return;
        }
        match self.sparse.iter_mut().find(|(i, _)| *i == id) {
            Some((_, n)) => *n += 1,
            None => self.sparse.push((id, 1)),
        }
    }

    /// Whether nothing has been counted since the last take.
    pub fn is_empty(&self) -> bool {
        self.sparse.is_empty() && self.dense.iter().all(|&n| n == 0)
    }

    /// The counts so far, leaving the tally empty.
    pub fn take(&mut self) -> Vec<(u32, u64)> {
        let mut counts: Vec<(u32, u64)> = self
            .dense
            .iter_mut()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(id, n)| (id as u32, std::mem::take(n)))
            .collect();
        counts.append(&mut self.sparse);
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_each_evaluation_apart() {
        let mut tally = Tally::default();
        for id in [3, 3, 3, 5, 3, 5, 0, 9_000, 9_000] {
            tally.count(id);
        }
        let mut counts = tally.take();
        counts.sort_unstable();
        assert_eq!(counts, vec![(0, 1), (3, 4), (5, 2), (9_000, 2)]);
        assert!(tally.is_empty());
        tally.count(5);
        assert_eq!(tally.take(), vec![(5, 1)]);
    }
}
