//! How many pool threads may run jobs at once, changed while they run.
//!
//! The pool has `worker.max_concurrency` threads; the concurrency lever flag lets an operator
//! run fewer of them during an incident (a downstream service is struggling) and more again
//! afterwards, without a restart. A thread passes the gate before it takes a task and leaves
//! it when the task is done, so lowering the limit lets running jobs finish and holds the
//! next ones back; raising it wakes waiting threads at once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};

/// The limit and how many threads are past it. Entering and leaving are one atomic operation
/// each while there is room (every job passes the gate twice); the lock and condition variable
/// are only for threads that must wait. The counters are sequentially consistent: a leaving
/// thread that reads no waiter and a waiting thread that reads no room cannot both be right.
#[derive(Debug)]
pub struct Gate {
    limit: AtomicUsize,
    inside: AtomicUsize,
    /// Threads waiting (or about to) for room.
    waiting: AtomicUsize,
    lock: Mutex<()>,
    changed: Condvar,
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
            limit: AtomicUsize::new(limit.max(1)),
            inside: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            lock: Mutex::new(()),
            changed: Condvar::new(),
        }
    }

    /// Takes a place if there is room.
    fn try_enter(&self) -> bool {
        let mut inside = self.inside.load(Ordering::SeqCst);
        loop {
            if inside >= self.limit.load(Ordering::SeqCst) {
                return false;
            }
            match self.inside.compare_exchange_weak(
                inside,
                inside + 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return true,
                Err(now) => inside = now,
            }
        }
    }

    /// Waits until fewer than the limit are inside, then enters.
    pub fn enter(&self) -> Pass<'_> {
        if self.try_enter() {
            return Pass { gate: self };
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let mut guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        // Checked under the lock: a thread leaving, or a raised limit, notifies under it too,
        // so no wake-up is missed between the check and the wait.
        while !self.try_enter() {
            guard = self
                .changed
                .wait(guard)
                .unwrap_or_else(PoisonError::into_inner);
        }
        drop(guard);
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        Pass { gate: self }
    }

    /// Changes the limit (at least one); threads waiting are woken if there is room now.
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit.max(1), Ordering::SeqCst);
        self.wake(true);
    }

    /// The limit in force.
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::SeqCst)
    }

    fn wake(&self, all: bool) {
        if self.waiting.load(Ordering::SeqCst) == 0 {
            return;
        }
        let _guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        if all {
            self.changed.notify_all();
        } else {
            self.changed.notify_one();
        }
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        self.gate.inside.fetch_sub(1, Ordering::SeqCst);
        self.gate.wake(false);
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
        assert_eq!(gate.inside.load(Ordering::SeqCst), 0);
    }
}
