//! A taskworker whose jobs are Rust code: the whole daemon (config, signals, flags, systemd,
//! shedding, acks, drain) around a handler of your own.
//!
//! This one treats each job's body as text and counts its words. An empty body cannot succeed
//! (`failed`); a body that says `later` is not ready yet (back to the queue, up to
//! `handler.max_retries`); a long text is counted a chunk at a time, checking the job's stop
//! time between chunks, so a job that cannot finish in time gives up at its deadline
//! (`timed_out`) instead of holding a pool thread.
//!
//! Build and run it like taskworker: `cargo build --release --example custom_handler`, then
//! `target/release/examples/custom_handler --config /etc/flagshed/flagshed.toml`.

use flagshed::{Handler, HandlerError, Job, now_ms};
use std::process::ExitCode;
use std::sync::Arc;

/// Counts the words of each job's body.
struct WordCount;

/// Words counted between two looks at the clock.
const CHUNK_BYTES: usize = 64 * 1024;

impl Handler for WordCount {
    fn handle(&self, job: &Job<'_>) -> Result<(), HandlerError> {
        if job.body.is_empty() {
            return Err(HandlerError::Failed("empty body".into()));
        }
        if job.body == b"later" {
            return Err(HandlerError::Retry("not ready yet".into()));
        }
        let mut words = 0;
        let mut in_word = false;
        for chunk in job.body.chunks(CHUNK_BYTES) {
            if job.stop_at_ms.is_some_and(|at| now_ms() >= at) {
                return Err(HandlerError::TimedOut);
            }
            for &b in chunk {
                let space = b.is_ascii_whitespace();
                words += usize::from(in_word && space);
                in_word = !space;
            }
            // Stands for real work on each chunk.
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        words += usize::from(in_word);
        log::info!("job {} has {words} words", job.display_id());
        Ok(())
    }
}

fn main() -> ExitCode {
    flagshed::run_worker_with(Arc::new(WordCount))
}
