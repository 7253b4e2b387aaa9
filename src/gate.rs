//! How many pool threads may run jobs at once, changed while they run.
//!
//! The pool has `worker.max_concurrency` threads; the concurrency lever flag lets an operator
//! run fewer of them during an incident (a downstream service is struggling) and more again
//! afterwards, without a restart. A thread passes the gate before it takes a task and leaves
//! it when the task is done, so lowering the limit lets running jobs finish and holds the
//! next ones back; raising it wakes waiting threads at once.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

/// The limit and how many threads are past it.
#[derive(Debug)]
pub struct Gate {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug)]
struct State {
    limit: usize,
    inside: usize,
}

/// A thread's place past the gate; dropping it lets the next one in.
#[derive(Debug)]
pub struct Pass<'g> {
    gate: &'g Gate,
}

impl Gate {
    /// A gate that lets `limit` threads in.
    pub fn new(limit: usize) -> Gate {
        Gate {
            state: Mutex::new(State {
                limit: limit.max(1),
                inside: 0,
            }),
            changed: Condvar::new(),
        }
    }

    /// Waits until fewer than the limit are inside, then enters.
    pub fn enter(&self) -> Pass<'_> {
        let mut state = self.lock();
        while state.inside >= state.limit {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        state.inside += 1;
        Pass { gate: self }
    }

    /// Changes the limit (at least one); threads waiting are woken if there is room now.
    pub fn set_limit(&self, limit: usize) {
        self.lock().limit = limit.max(1);
        self.changed.notify_all();
    }

    /// The limit in force.
    pub fn limit(&self) -> usize {
        self.lock().limit
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is two counters, consistent after every statement: a panic elsewhere
        // cannot leave it half-changed.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        self.gate.lock().inside -= 1;
        self.gate.changed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn no_more_than_the_limit_are_inside_and_raising_it_lets_more_in() {
        let gate = Arc::new(Gate::new(2));
        let inside = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let (release_tx, release_rx) = crossbeam_channel::unbounded::<()>();
        let (entered_tx, entered_rx) = crossbeam_channel::unbounded::<()>();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (gate, inside, most) = (gate.clone(), inside.clone(), most.clone());
                let (release, entered) = (release_rx.clone(), entered_tx.clone());
                std::thread::spawn(move || {
                    let _pass = gate.enter();
                    let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    entered.send(()).expect("test alive");
                    release.recv().expect("released");
                    inside.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        entered_rx.recv().expect("first in");
        entered_rx.recv().expect("second in");
        assert!(
            entered_rx
                .recv_timeout(std::time::Duration::from_millis(200))
                .is_err(),
            "a third thread got past a limit of 2"
        );
        gate.set_limit(4);
        entered_rx.recv().expect("third in once raised");
        entered_rx.recv().expect("fourth in once raised");
        assert_eq!(most.load(Ordering::SeqCst), 4);
        for _ in 0..4 {
            release_tx.send(()).expect("threads alive");
        }
        for t in threads {
            t.join().expect("thread");
        }
        assert_eq!(gate.lock().inside, 0);
    }
}
