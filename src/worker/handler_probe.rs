//! The handler probe thread (not to be confused with the work estimates' probe jobs): while
//! intake is held because the handler found its service unavailable, it asks the handler
//! ([`Handler::probe`]) with backoff whether the service answers, and tells the consumer
//! thread when it does. The consumer thread never waits on a probe, and a service that never
//! comes back costs one probe per backoff period (at most every 5 s), not a busy loop.
//!
//! The schedule carries over from one hold to the next unless the service stayed available
//! for [`RESET_AFTER`]: a service that accepts connections but fails every job is probed
//! less and less often rather than flapping at the first delay.

use crate::backoff::Backoff;
use crate::handler::Handler;
use crate::service::DaemonError;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The first wait before a probe: a restarting service is usually back within a second.
const FIRST_DELAY: Duration = Duration::from_millis(100);
/// The longest wait between probes.
const MAX_DELAY: Duration = Duration::from_secs(5);
/// How long the service must stay available for the next hold to start from the first delay.
const RESET_AFTER: Duration = Duration::from_secs(30);

/// The consumer thread's side of the probe thread, which ends when this is dropped.
pub(super) struct HandlerProbe {
    start: Sender<()>,
    answers: Receiver<()>,
}

impl HandlerProbe {
    /// Starts the probe thread for `handler`; it sleeps until asked to probe.
    pub(super) fn start(handler: &Arc<dyn Handler>) -> Result<HandlerProbe, DaemonError> {
        let (start, requests) = bounded(1);
        let (answered, answers) = bounded(1);
        let handler = Arc::clone(handler);
        std::thread::Builder::new()
            .name("handler-probe".into())
            .spawn(move || probe_thread(handler.as_ref(), &requests, &answered))
            .map_err(|e| DaemonError::Io {
                what: "starting the handler probe thread",
                source: e,
            })?;
        Ok(HandlerProbe { start, answers })
    }

    /// Starts probing (if it is not already); [`HandlerProbe::answers`] receives once the handler
    /// answers.
    pub(super) fn probe(&self) {
        // Full: a request is already waiting, which is as good.
        let _ = self.start.try_send(());
    }

    /// Receives `()` each time a round of probing ends with the handler answering.
    pub(super) fn answers(&self) -> &Receiver<()> {
        &self.answers
    }
}

fn probe_thread(handler: &dyn Handler, requests: &Receiver<()>, answered: &Sender<()>) {
    let mut backoff = Backoff::new(FIRST_DELAY, MAX_DELAY, RESET_AFTER);
    let mut answered_at: Option<Instant> = None;
    while requests.recv().is_ok() {
        if let Some(at) = answered_at {
            backoff.connection_ended(at.elapsed());
        }
        loop {
            match requests.recv_timeout(backoff.next_delay()) {
                // Asked again while waiting: the same round goes on.
                Ok(()) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => {}
            }
            match handler.probe() {
                Ok(()) => {
                    answered_at = Some(Instant::now());
                    if answered.send(()).is_err() {
                        return;
                    }
                    break;
                }
                Err(why) => log::debug!("handler probe: {why}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::{HandlerError, Job};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    struct Flaky {
        up: AtomicBool,
        probes: AtomicUsize,
    }

    impl Handler for Flaky {
        fn handle(&self, _: &Job<'_>) -> Result<(), HandlerError> {
            Ok(())
        }

        fn probe(&self) -> Result<(), HandlerError> {
            self.probes.fetch_add(1, Ordering::SeqCst);
            if self.up.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err(HandlerError::Unavailable("down".into()))
            }
        }
    }

    #[test]
    fn probing_goes_on_with_backoff_until_the_handler_answers() {
        let flaky = Arc::new(Flaky {
            up: AtomicBool::new(false),
            probes: AtomicUsize::new(0),
        });
        let handler: Arc<dyn Handler> = flaky.clone();
        let probe = HandlerProbe::start(&handler).expect("probe thread");
        assert!(
            probe
                .answers()
                .recv_timeout(Duration::from_millis(300))
                .is_err(),
            "no answer before anyone asked"
        );
        assert_eq!(flaky.probes.load(Ordering::SeqCst), 0, "idle until asked");
        probe.probe();
        // Three failed probes (about 100, 200 and 400 ms apart, less jitter), then it is up.
        while flaky.probes.load(Ordering::SeqCst) < 3 {
            assert!(
                probe
                    .answers()
                    .recv_timeout(Duration::from_millis(20))
                    .is_err(),
                "answered while down"
            );
        }
        flaky.up.store(true, Ordering::SeqCst);
        probe
            .answers()
            .recv_timeout(Duration::from_secs(30))
            .expect("answered once up");
        let probes = flaky.probes.load(Ordering::SeqCst);
        assert!(
            probe
                .answers()
                .recv_timeout(Duration::from_millis(300))
                .is_err(),
            "one answer per round"
        );
        assert_eq!(flaky.probes.load(Ordering::SeqCst), probes, "idle again");
    }
}
