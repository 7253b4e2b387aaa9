//! The deliveries a worker holds, in delivery-tag order, and the batching of their acks.
//!
//! Acking every job with its own frame costs a wake-up of amiquip's I/O thread and a socket
//! write per job, which is most of what a consumer spends at a steady rate. AMQP lets one
//! frame with `multiple` settle every delivery up to a tag, but only if all of them are
//! settled the same way and none is still running. So decisions wait here briefly; a flush
//! settles the longest decided prefix with one frame per run of equal decisions, and anything
//! decided beyond a still-running job one by one.
//!
//! Delivery tags on a channel are consecutive from 1, which makes the window a ring indexed
//! by `tag - first tag`: no allocation once it has grown to the prefetch size.
//!
//! A decision carries the caller's own value (the worker's outcome); the caller says how it
//! maps to a [`Disposition`] and is told, at flush time, of each delivery settled, so that
//! what it records is exactly what the broker was told.

use std::collections::VecDeque;

/// How a delivery is settled with the broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    Ack,
    /// Reject without requeue (dead-lettered if the queue has a dead-letter exchange).
    Reject,
    /// Back to the queue.
    Requeue,
}

enum Slot<D, K> {
    Running(D),
    Decided(D, K),
    /// Already settled by an earlier flush, out of order.
    Sent,
}

/// One connection's held deliveries, by tag.
pub struct AckWindow<D, K> {
    first_tag: u64,
    slots: VecDeque<Slot<D, K>>,
    decided: usize,
    held: usize,
}

impl<D, K: Copy> AckWindow<D, K> {
    /// An empty window for a new channel, sized for `prefetch` deliveries.
    pub fn new(prefetch: usize) -> AckWindow<D, K> {
        AckWindow {
            first_tag: 1,
            slots: VecDeque::with_capacity(prefetch),
            decided: 0,
            held: 0,
        }
    }

    /// Holds a new delivery. Tags arrive in increasing order; a gap (which a single consumer
    /// per channel never sees) is filled with already-settled slots.
    pub fn hold(&mut self, tag: u64, delivery: D) {
        if self.slots.is_empty() {
            self.first_tag = tag;
        }
        while self.first_tag + (self.slots.len() as u64) < tag {
            self.slots.push_back(Slot::Sent);
        }
        self.slots.push_back(Slot::Running(delivery));
        self.held += 1;
    }

    /// The held delivery with `tag`, running or decided.
    pub fn get(&self, tag: u64) -> Option<&D> {
        let index = tag.checked_sub(self.first_tag)?;
        match self.slots.get(usize::try_from(index).ok()?)? {
            Slot::Running(d) | Slot::Decided(d, _) => Some(d),
            Slot::Sent => None,
        }
    }

    /// Records how a held delivery is to be settled. Returns false for an unknown tag.
    pub fn decide(&mut self, tag: u64, decision: K) -> bool {
        let Some(index) = tag.checked_sub(self.first_tag) else {
            return false;
        };
        let Some(slot) = self.slots.get_mut(index as usize) else {
            return false;
        };
        match std::mem::replace(slot, Slot::Sent) {
            Slot::Running(delivery) => {
                *slot = Slot::Decided(delivery, decision);
                self.decided += 1;
                true
            }
            other => {
                *slot = other;
                false
            }
        }
    }

    /// Decisions waiting for a flush.
    pub fn decided(&self) -> usize {
        self.decided
    }

    /// Deliveries held, running or decided.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.held == 0
    }

    /// Sends every decision. `disposition` maps a decision to how the broker settles it;
    /// `settled(delivery, decision)` is told of each delivery just before its frame goes out;
    /// `send(delivery, disposition, multiple)` is called once per run of equal dispositions at
    /// the front (`multiple = true`, with the run's last delivery) and once per decision
    /// behind a running delivery (`multiple = false`). Stops at the first error, which leaves
    /// the connection unusable anyway.
    pub fn flush<E>(
        &mut self,
        disposition: impl Fn(K) -> Disposition,
        mut settled: impl FnMut(&D, K),
        mut send: impl FnMut(D, Disposition, bool) -> Result<(), E>,
    ) -> Result<(), E> {
        // The decided prefix, in runs.
        while let Some(Slot::Decided(_, first)) = self.slots.front() {
            let run = disposition(*first);
            let mut last = None;
            while let Some(Slot::Decided(_, k)) = self.slots.front() {
                if disposition(*k) != run {
                    break;
                }
                if let Some(Slot::Decided(delivery, k)) = self.slots.pop_front() {
                    settled(&delivery, k);
                    last = Some(delivery);
                }
                self.first_tag += 1;
                self.decided -= 1;
                self.held -= 1;
            }
            while let Some(Slot::Sent) = self.slots.front() {
                self.slots.pop_front();
                self.first_tag += 1;
            }
            if let Some(delivery) = last {
                send(delivery, run, true)?;
            }
        }
        // Decisions behind a running delivery, one by one.
        for slot in self.slots.iter_mut() {
            if let Slot::Decided(..) = slot {
                if let Slot::Decided(delivery, k) = std::mem::replace(slot, Slot::Sent) {
                    self.decided -= 1;
                    self.held -= 1;
                    settled(&delivery, k);
                    send(delivery, disposition(k), false)?;
                }
            }
        }
        while let Some(Slot::Sent) = self.slots.front() {
            self.slots.pop_front();
            self.first_tag += 1;
        }
        Ok(())
    }

    /// Changes decisions not yet sent: `revise(delivery, decision)` gives each its final
    /// form just before a flush (the worker turns a hand-back that came too late into
    /// `expired` there, where every frame passes).
    pub fn revise(&mut self, mut revise: impl FnMut(&D, K) -> K) {
        for slot in self.slots.iter_mut() {
            if let Slot::Decided(delivery, k) = slot {
                *k = revise(delivery, *k);
            }
        }
    }

    /// Empties the window (the channel died, or the worker stops without waiting): each held
    /// delivery is given to `each` with its decision if it had one that was never sent.
    /// Returns how many were decided but never sent, and how many were still running.
    pub fn abandon(&mut self, mut each: impl FnMut(D, Option<K>)) -> (usize, usize) {
        let unsent = self.decided;
        let running = self.held - self.decided;
        for slot in self.slots.drain(..) {
            match slot {
                Slot::Running(d) => each(d, None),
                Slot::Decided(d, k) => each(d, Some(k)),
                Slot::Sent => {}
            }
        }
        self.decided = 0;
        self.held = 0;
        (unsent, running)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Disposition::*;

    fn flushed(window: &mut AckWindow<u64, Disposition>) -> Vec<(u64, Disposition, bool)> {
        let mut sent = Vec::new();
        let mut settled = 0;
        let decided = window.decided();
        window
            .flush(
                |d| d,
                |_, _| settled += 1,
                |tag, d, multiple| -> Result<(), ()> {
                    sent.push((tag, d, multiple));
                    Ok(())
                },
            )
            .unwrap();
        assert_eq!(settled, decided, "every decision is reported once");
        sent
    }

    fn window_of(tags: std::ops::RangeInclusive<u64>) -> AckWindow<u64, Disposition> {
        let mut w = AckWindow::new(8);
        for tag in tags {
            w.hold(tag, tag);
        }
        w
    }

    #[test]
    fn a_decided_prefix_is_one_frame_per_run() {
        let mut w = window_of(1..=6);
        for tag in 1..=3 {
            w.decide(tag, Ack);
        }
        w.decide(4, Reject);
        w.decide(5, Ack);
        assert_eq!(
            flushed(&mut w),
            vec![(3, Ack, true), (4, Reject, true), (5, Ack, true)]
        );
        assert_eq!(w.held(), 1);
        assert_eq!(w.decided(), 0);
    }

    #[test]
    fn decisions_behind_a_running_job_go_one_by_one_and_never_multiple() {
        let mut w = window_of(1..=4);
        w.decide(2, Ack);
        w.decide(4, Requeue);
        assert_eq!(flushed(&mut w), vec![(2, Ack, false), (4, Requeue, false)]);
        // Tag 1 finishes later: now it is the prefix, and 3 still runs.
        w.decide(1, Ack);
        assert_eq!(flushed(&mut w), vec![(1, Ack, true)]);
        w.decide(3, Ack);
        assert_eq!(flushed(&mut w), vec![(3, Ack, true)]);
        assert!(w.is_empty());
    }

    #[test]
    fn the_window_slides_without_growing() {
        let mut w: AckWindow<u64, Disposition> = AckWindow::new(4);
        for tag in 1..=10_000u64 {
            w.hold(tag, tag);
            w.decide(tag, Ack);
            if tag % 4 == 0 {
                assert_eq!(flushed(&mut w), vec![(tag, Ack, true)]);
            }
        }
        assert!(w.slots.capacity() < 64);
    }

    #[test]
    fn unknown_or_repeated_tags_are_refused() {
        let mut w = window_of(5..=6);
        assert!(!w.decide(4, Ack));
        assert!(!w.decide(7, Ack));
        assert!(w.decide(5, Ack));
        assert!(!w.decide(5, Reject));
    }

    #[test]
    fn abandon_reports_unsent_decisions_and_running_jobs() {
        let mut w = window_of(1..=3);
        w.decide(2, Reject);
        let mut seen = Vec::new();
        assert_eq!(w.abandon(|d, k| seen.push((d, k))), (1, 2));
        assert_eq!(seen, vec![(1, None), (2, Some(Reject)), (3, None)]);
        assert!(w.is_empty());
    }

    #[test]
    fn revised_decisions_are_what_is_sent() {
        let mut w = window_of(1..=3);
        w.decide(1, Requeue);
        w.decide(3, Requeue);
        w.revise(|&tag, k| if tag == 1 { Ack } else { k });
        assert_eq!(flushed(&mut w), vec![(1, Ack, true), (3, Requeue, false)]);
    }
}
