//! The pool: threads that take tasks (as many at once as the gate lets through), check the
//! deadline once more, run the handler and report each job's outcome to the consumer thread.
//! *Invariant:* a handler runs only here, and a panicking handler fails its job, not its
//! thread.

use crate::clock::now_ms;
use crate::gate::Gate;
use crate::handler::estimate::TypeSlot;
use crate::handler::{Handler, HandlerError, Job};
use crate::job::{self, JobMeta};
use crate::ledger::Outcome;
use crate::service::DaemonError;
use crate::shed::{self, AtStart};
use amiquip::AmqpProperties;
use super::tasks::TaskQueue;
use crossbeam_channel::Sender;
use std::sync::Arc;

/// A job handed to the pool.
pub(super) struct Task {
    pub(super) generation: u64,
    pub(super) tag: u64,
    pub(super) meta: JobMeta,
    /// The work the doomed check budgets: declared, or learned for the job's type.
    pub(super) budget_ms: u64,
    /// Run although its estimate dooms it, to learn whether the estimate still holds.
    pub(super) probe: bool,
    pub(super) slot: TypeSlot,
    pub(super) drop_doomed: bool,
    pub(super) enforce_deadline: bool,
    pub(super) properties: AmqpProperties,
    pub(super) redelivered: bool,
    pub(super) body: Vec<u8>,
}

/// A pool thread's report on one task.
pub(super) struct Completion {
    pub(super) generation: u64,
    pub(super) tag: u64,
    /// What identifies the job across redeliveries, for counting its retries: its id's hash,
    /// or for a job without a `message_id`, a hash of its body.
    pub(super) retry_key: u64,
    pub(super) slot: TypeSlot,
    /// The task was a probe (see [`Task::probe`]).
    pub(super) probe: bool,
    pub(super) outcome: Outcome,
    /// Handler time spent, for the late-work counter.
    pub(super) worked_ms: u64,
    /// The job started with at least nine tenths of its deadline ahead (created to deadline):
    /// if it was stopped, it needs more than its deadline gives.
    pub(super) had_whole_deadline: bool,
    /// Enqueue to start, for jobs that ran.
    pub(super) wait_ms: Option<u64>,
    /// Deadline minus finish, for jobs that finished on time with a deadline.
    pub(super) slack_ms: Option<u64>,
    /// Finish minus deadline, for jobs that finished late.
    pub(super) lateness_ms: Option<u64>,
    /// Why the handler failed, timed out, asked for a retry or found its service
    /// unavailable, for the consumer thread's (throttled) warning and its hold of intake.
    pub(super) failure: Option<HandlerError>,
    /// Until when the job may go back to the queue ([`job::keep_until_ms`]), for deciding
    /// whether a retry can still come in time.
    pub(super) keep_until_ms: Option<u64>,
}

pub(super) fn start_pool(
    threads: usize,
    gate: &Arc<Gate>,
    tasks: &Arc<TaskQueue>,
    done: &Sender<Completion>,
    handler: &Arc<dyn Handler>,
) -> Result<Vec<std::thread::JoinHandle<()>>, DaemonError> {
    (0..threads)
        .map(|i| {
            let tasks = Arc::clone(tasks);
            let done = done.clone();
            let handler = Arc::clone(handler);
            let gate = Arc::clone(gate);
            std::thread::Builder::new()
                .name(format!("pool-{i}"))
                .spawn(move || pool_thread(&gate, &tasks, &done, handler.as_ref()))
                .map_err(|e| DaemonError::Io {
                    what: "starting a pool thread",
                    source: e,
                })
        })
        .collect()
}

/// Takes tasks, as many threads at once as the gate lets through, until the consumer thread
/// closes the queue.
fn pool_thread(
    gate: &Gate,
    tasks: &TaskQueue,
    done: &Sender<Completion>,
    handler: &dyn Handler,
) {
    loop {
        let _pass = gate.enter();
        let Some(task) = tasks.pop() else {
            break;
        };
        let completion = run_task(&task, handler);
        if done.send(completion).is_err() {
            break;
        }
    }
}

/// Checks the deadline once more, then runs the handler.
fn run_task(task: &Task, handler: &dyn Handler) -> Completion {
    let started_ms = now_ms();
    let mut completion = Completion {
        generation: task.generation,
        tag: task.tag,
        retry_key: task.meta.id_hash,
        slot: task.slot,
        probe: task.probe,
        outcome: Outcome::Done,
        worked_ms: 0,
        had_whole_deadline: false,
        wait_ms: None,
        slack_ms: None,
        lateness_ms: None,
        failure: None,
        keep_until_ms: job::keep_until_ms(&task.meta, &task.properties),
    };
    let budgeted = JobMeta {
        work_ms: task.budget_ms,
        ..task.meta
    };
    match shed::at_start(&budgeted, started_ms, task.drop_doomed) {
        AtStart::Expired => completion.outcome = Outcome::Expired,
        AtStart::Doomed => completion.outcome = Outcome::Doomed,
        AtStart::Run => {
            let job = Job {
                id: task.properties.message_id().as_deref(),
                job_type: task.properties.type_().as_deref().unwrap_or(""),
                properties: &task.properties,
                body: &task.body,
                created_ms: task.meta.created_ms,
                deadline_ms: task.meta.deadline_ms,
                stop_at_ms: task.meta.deadline_ms.filter(|_| task.enforce_deadline),
                work_ms: task.meta.work_ms,
                redelivered: task.redelivered,
            };
            // A panicking handler fails its job; it must not take a pool thread with it.
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler.handle(&job)))
                    .unwrap_or_else(|panic| {
                        let why = panic
                            .downcast_ref::<&str>()
                            .map(|s| (*s).to_owned())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "(no message)".to_owned());
                        Err(HandlerError::Failed(format!("handler panicked: {why}")))
                    });
            let finished_ms = now_ms();
            completion.worked_ms = finished_ms.saturating_sub(started_ms);
            completion.had_whole_deadline = task.meta.deadline_ms.is_some_and(|deadline| {
                let ahead = deadline.saturating_sub(started_ms);
                let whole = deadline.saturating_sub(task.meta.created_ms);
                ahead.saturating_mul(10) >= whole.saturating_mul(9)
            });
            completion.wait_ms = Some(started_ms.saturating_sub(task.meta.created_ms));
            completion.outcome = match result {
                Err(e @ HandlerError::TimedOut) => {
                    completion.failure = Some(e);
                    Outcome::TimedOut
                }
                Err(e @ HandlerError::Unavailable(_)) => {
                    // Nothing ran: the job goes back (or fails, as the consumer thread's
                    // policy says), and counts as no work and no wait.
                    completion.failure = Some(e);
                    completion.worked_ms = 0;
                    completion.wait_ms = None;
                    Outcome::Requeued
                }
                Err(e @ HandlerError::Retry(_)) => {
                    completion.failure = Some(e);
                    if task.properties.message_id().is_none() {
                        // The fallback id hash comes from the delivery tag, which changes
                        // with every redelivery.
                        completion.retry_key = job::hash_id(&task.body);
                    }
                    Outcome::Retried
                }
                Err(e @ HandlerError::Failed(_)) => {
                    completion.failure = Some(e);
                    Outcome::Failed
                }
                Ok(()) => match task.meta.deadline_ms {
                    Some(deadline) if finished_ms > deadline => {
                        completion.lateness_ms = Some(finished_ms - deadline);
                        Outcome::Late
                    }
                    Some(deadline) => {
                        completion.slack_ms = Some(deadline - finished_ms);
                        Outcome::Done
                    }
                    None => Outcome::Done,
                },
            };
        }
    }
    completion
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::SimulatedHandler;
    use crate::handler::estimate::WorkEstimates;
    use std::time::Duration;

    struct Failing;

    impl Handler for Failing {
        fn handle(&self, _: &Job<'_>) -> Result<(), HandlerError> {
            Err(HandlerError::Failed("downstream refused".into()))
        }
    }

    struct Panicking;

    impl Handler for Panicking {
        fn handle(&self, _: &Job<'_>) -> Result<(), HandlerError> {
            panic!("bad input");
        }
    }

    fn task(deadline_in_ms: Option<u64>, work_ms: u64) -> Task {
        let now = now_ms();
        Task {
            generation: 1,
            tag: 7,
            meta: JobMeta {
                id_hash: 0,
                created_ms: now,
                deadline_ms: deadline_in_ms.map(|d| now + d),
                work_ms,
                work_declared: true,
            },
            budget_ms: work_ms,
            probe: false,
            slot: WorkEstimates::new(
                crate::handler::estimate::EstimateSettings {
                    quantile: 0.9,
                    half_life_jobs: 10,
                    min_jobs: 1,
                    ..crate::handler::estimate::DEFAULT_SETTINGS
                },
                1,
            )
            .slot(""),
            drop_doomed: true,
            enforce_deadline: false,
            properties: AmqpProperties::default(),
            redelivered: false,
            body: Vec::new(),
        }
    }

    #[test]
    fn the_pool_runs_every_task_handed_over_then_ends_when_the_queue_closes() {
        let queue = Arc::new(TaskQueue::new(4));
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let handler: Arc<dyn Handler> = Arc::new(SimulatedHandler);
        let threads = start_pool(3, &Arc::new(Gate::new(3)), &queue, &done_tx, &handler)
            .expect("pool started");
        // One task to threads that are (or are about to be) asleep: it must wake one.
        let mut first = task(None, 0);
        first.tag = 1_000;
        queue.push(first);
        let completion = done_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("an idle thread woke for the task");
        assert_eq!(completion.tag, 1_000);
        // Many more than the queue's room, pushed without waiting; the last ones are still
        // queued when the queue closes, and run before the threads end.
        for tag in 0..200 {
            let mut t = task(None, 0);
            t.tag = tag;
            queue.push(t);
        }
        queue.close();
        for thread in threads {
            thread.join().expect("pool thread ended");
        }
        drop(done_tx);
        let mut tags: Vec<u64> = done_rx.iter().map(|c| c.tag).collect();
        tags.sort_unstable();
        assert_eq!(tags, (0..200).collect::<Vec<_>>());
        assert!(queue.try_pop().is_none());
    }

    #[test]
    fn unstarted_tasks_can_be_taken_back() {
        let queue = TaskQueue::new(2);
        for tag in [5, 6] {
            let mut t = task(None, 0);
            t.tag = tag;
            queue.push(t);
        }
        assert_eq!(queue.try_pop().map(|t| t.tag), Some(5));
        assert_eq!(queue.try_pop().map(|t| t.tag), Some(6));
        assert!(queue.try_pop().is_none());
        queue.close();
        assert!(queue.pop().is_none(), "closed and empty: a pool thread ends");
    }

    #[test]
    fn a_handler_error_is_a_failed_job_with_its_reason() {
        let completion = run_task(&task(Some(60_000), 0), &Failing);
        assert_eq!(completion.outcome, Outcome::Failed);
        assert_eq!(
            completion.failure.map(|e| e.to_string()).as_deref(),
            Some("downstream refused")
        );
    }

    #[test]
    fn an_unavailable_service_hands_the_job_back_as_not_run() {
        struct Down;
        impl Handler for Down {
            fn handle(&self, _: &Job<'_>) -> Result<(), HandlerError> {
                Err(HandlerError::Unavailable("Connection Failed: refused".into()))
            }
        }
        let completion = run_task(&task(Some(60_000), 0), &Down);
        assert_eq!(completion.outcome, Outcome::Requeued);
        assert_eq!(completion.wait_ms, None, "not counted as run");
        assert!(matches!(
            completion.failure,
            Some(HandlerError::Unavailable(_))
        ));
    }

    #[test]
    fn a_panicking_handler_fails_its_job_and_keeps_the_thread() {
        let completion = run_task(&task(Some(60_000), 0), &Panicking);
        assert_eq!(completion.outcome, Outcome::Failed);
        let why = completion
            .failure
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(why.contains("bad input"), "{why}");
    }

    #[test]
    fn deadline_is_checked_again_at_start() {
        let expired = task(Some(0), 0);
        assert_eq!(
            run_task(&expired, &SimulatedHandler).outcome,
            Outcome::Expired
        );
        let doomed = task(Some(60_000), 120_000);
        let completion = run_task(&doomed, &SimulatedHandler);
        assert_eq!(completion.outcome, Outcome::Doomed);
        assert_eq!(completion.worked_ms, 0, "no work spent");
    }

    #[test]
    fn the_budget_not_the_declared_work_decides_doomed_at_start() {
        let mut learned_long = task(Some(60_000), 0);
        learned_long.budget_ms = 120_000;
        assert_eq!(
            run_task(&learned_long, &SimulatedHandler).outcome,
            Outcome::Doomed
        );
    }

    #[test]
    fn past_the_deadline_is_late_unless_enforced_then_timed_out() {
        // A job already past its deadline when the handler returns: no timing involved.
        struct PastDeadline;
        impl Handler for PastDeadline {
            fn handle(&self, job: &Job<'_>) -> Result<(), HandlerError> {
                let deadline = job.deadline_ms.expect("has a deadline");
                while now_ms() <= deadline {
                    std::thread::sleep(Duration::from_millis(1));
                }
                match job.stop_at_ms {
                    Some(_) => Err(HandlerError::TimedOut),
                    None => Ok(()),
                }
            }
        }
        // A second of deadline: the job must still be on time when it starts, however busy
        // the machine; the handler then waits for the deadline to pass, not for a duration.
        let mut late = task(Some(1_000), 0);
        late.drop_doomed = false;
        assert_eq!(run_task(&late, &PastDeadline).outcome, Outcome::Late);
        let mut stopped = task(Some(1_000), 0);
        stopped.enforce_deadline = true;
        assert_eq!(run_task(&stopped, &PastDeadline).outcome, Outcome::TimedOut);
        let on_time = run_task(&task(Some(60_000), 0), &SimulatedHandler);
        assert_eq!(on_time.outcome, Outcome::Done);
        assert!(on_time.slack_ms.is_some_and(|s| s > 50_000));
    }
}
