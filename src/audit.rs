//! The optional audit trail: one JSON object per line and per job,
//! `{"ms":<epoch ms>,"id":<job id or null>,"state":"<state>"}`, appended to a file, so that an
//! operator (or a fault-injection test) can account for every job id. JSON, because ids come
//! from producers: a newline, a NUL, a space or an empty id must not split or shift a record,
//! and `jq` or any JSON reader takes the file as it is.
//!
//! The worker writes the lines of an ack frame's jobs before it sends the frame and pushes them
//! to the kernel first, so a crash right after cannot lose a settled job from the trail (a
//! crash between the line and the ack shows up as the job appearing twice, the second time
//! from its redelivery). Failing to write it is logged once and never stops the work.

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
        let id = match id {
            Some(id) => serde_json::to_string(id).unwrap_or_else(|_| "null".to_owned()),
            None => "null".to_owned(),
        };
        let state = serde_json::to_string(state).unwrap_or_else(|_| "null".to_owned());
        let result = writeln!(
            out,
            "{{\"ms\":{},\"id\":{id},\"state\":{state}}}",
            crate::clock::now_ms()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_id_survives_the_trail_and_every_record_parses_back() {
        let dir = std::env::temp_dir().join(format!("flagshed-audit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("ledger.jsonl");
        let _ = std::fs::remove_file(&path);
        let hostile: Vec<Option<&str>> = vec![
            Some("plain-1"),
            Some("two\nlines"),
            Some("nul\0byte"),
            Some(""),
            Some("with space done"),
            Some("\"quoted\" \\ back\\slash"),
            Some("tab\tand\rreturn"),
            Some("\u{1b}[31mescape"),
            Some("ünïcödé ✓"),
            None,
        ];
        {
            let mut log = AuditLog::open(&path);
            for id in &hostile {
                log.record(*id, "done");
            }
        }
        let text = std::fs::read_to_string(&path).expect("read the trail");
        let records: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("every line is one JSON record"))
            .collect();
        assert_eq!(records.len(), hostile.len());
        for (record, id) in records.iter().zip(&hostile) {
            assert_eq!(record["id"].as_str(), *id, "{record}");
            assert_eq!(record["state"], "done");
            assert!(record["ms"].as_u64().is_some());
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
