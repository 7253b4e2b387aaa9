//! The hand-off of tasks from the consumer thread to the pool: a queue under a lock, and a
//! condition variable for idle pool threads. A pool thread that finds the queue empty sleeps
//! at once, where a channel's receiver first spins and yields the processor several times; with
//! short jobs a pool thread goes idle after nearly every one, and that spinning cost more CPU
//! than the jobs. *Invariant:* pushing never blocks (the broker sends at most `prefetch`
//! unacked deliveries, and the queue holds that many without growing).

use super::pool::Task;
use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

/// Tasks waiting for a pool thread.
pub(super) struct TaskQueue {
    state: Mutex<State>,
    ready: Condvar,
}

struct State {
    tasks: VecDeque<Task>,
    /// Pool threads asleep on `ready`: a push wakes one only if there is one to wake.
    idle: usize,
    /// No more tasks will come: pool threads end once the queue is empty.
    closed: bool,
}

impl TaskQueue {
    /// A queue with room for `capacity` tasks before it has to grow.
    pub(super) fn new(capacity: usize) -> TaskQueue {
        TaskQueue {
            state: Mutex::new(State {
                tasks: VecDeque::with_capacity(capacity),
                idle: 0,
                closed: false,
            }),
            ready: Condvar::new(),
        }
    }

    /// A poisoned lock only means a thread panicked while holding it; the queue itself is
    /// always consistent (every change is one push or pop).
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Hands a task to the pool, waking an idle thread if there is one.
    pub(super) fn push(&self, task: Task) {
        let mut state = self.state();
        state.tasks.push_back(task);
        let wake = state.idle > 0;
        drop(state);
        if wake {
            self.ready.notify_one();
        }
    }

    /// The next task, waiting for one; `None` once the queue is closed and empty.
    pub(super) fn pop(&self) -> Option<Task> {
        let mut state = self.state();
        loop {
            if let Some(task) = state.tasks.pop_front() {
                return Some(task);
            }
            if state.closed {
                return None;
            }
            state.idle += 1;
            state = self
                .ready
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
            state.idle -= 1;
        }
    }

    /// The next task if one is waiting: the consumer thread takes back unstarted tasks this
    /// way (drain, pause, a lost connection).
    pub(super) fn try_pop(&self) -> Option<Task> {
        self.state().tasks.pop_front()
    }

    /// No more tasks: pool threads finish what is queued, then end.
    pub(super) fn close(&self) {
        self.state().closed = true;
        self.ready.notify_all();
    }
}
