//! The optional audit trail: one line per job, `<epoch ms> <job id> <state>`, appended to a
//! file, so that an operator (or a fault-injection test) can account for every job id.
//!
//! The worker writes a job's line before it acks it and pushes it to the kernel at once, so a
//! crash right after cannot lose a settled job from the trail (a crash between the line and
//! the ack shows up as the job appearing twice, the second time from its redelivery). That is
//! one write per job: the trail is off unless configured. Failing to write it is logged once
//! and never stops the work.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// An append-only audit file.
pub struct AuditLog {
    path: PathBuf,
    out: Option<BufWriter<File>>,
}

impl AuditLog {
    /// Opens (creating) `path` for appending; on failure logs why and records nothing.
    pub fn open(path: &Path) -> AuditLog {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map(BufWriter::new);
        let out = match out {
            Ok(out) => Some(out),
            Err(e) => {
                log::error!(
                    "cannot open ledger file {}: {e}; not recording it",
                    path.display()
                );
                None
            }
        };
        AuditLog {
            path: path.to_owned(),
            out,
        }
    }

    /// Adds one line (buffered).
    pub fn record(&mut self, id: Option<&str>, state: &str) {
        let Some(out) = &mut self.out else { return };
        let result = writeln!(
            out,
            "{} {} {state}",
            crate::clock::now_ms(),
            id.unwrap_or("-")
        );
        if let Err(e) = result {
            self.fail(&e);
        }
    }

    /// Hands buffered lines to the kernel, where they survive the process being killed.
    pub fn flush(&mut self) {
        let Some(out) = &mut self.out else { return };
        if let Err(e) = out.flush() {
            self.fail(&e);
        }
    }

    fn fail(&mut self, e: &std::io::Error) {
        log::error!(
            "cannot write ledger file {}: {e}; no longer recording it",
            self.path.display()
        );
        self.out = None;
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        self.flush();
    }
}
