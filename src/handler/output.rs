//! What an exec handler's child writes, turned into journal lines: one log record per line,
//! tagged with the job id and the stream (stdout at `info`, stderr at `warn`), up to a byte
//! budget per job. A child that floods its output costs the journal at most the budget; the
//! rest is read (so the child never blocks on a full pipe), counted, and reported once.

/// Which of the child's streams a chunk came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Stream {
    Stdout,
    Stderr,
}

/// One job's output on its way to the log.
pub(super) struct JobOutput<'a> {
    job_id: &'a str,
    /// Bytes that may still be logged for this job.
    budget: usize,
    /// Bytes read but not logged, once the budget ran out.
    dropped: u64,
    /// Each stream's unfinished last line.
    partial: [Vec<u8>; 2],
}

impl<'a> JobOutput<'a> {
    pub(super) fn new(job_id: &'a str, limit_bytes: usize) -> JobOutput<'a> {
        JobOutput {
            job_id,
            budget: limit_bytes,
            dropped: 0,
            partial: [Vec::new(), Vec::new()],
        }
    }

    /// Takes a chunk as read from `stream`; logs every line it completes.
    pub(super) fn feed(&mut self, stream: Stream, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let (piece, rest, complete) = match bytes.iter().position(|&b| b == b'\n') {
                Some(at) => (&bytes[..at], &bytes[at + 1..], true),
                None => (bytes, &[][..], false),
            };
            bytes = rest;
            let buffered = self.partial[stream as usize].len();
            let room = self.budget.saturating_sub(buffered);
            let kept = piece.len().min(room);
            self.partial[stream as usize].extend_from_slice(&piece[..kept]);
            self.dropped += (piece.len() - kept) as u64;
            if complete {
                self.emit(stream);
            }
        }
    }

    /// Logs unfinished lines and, if the budget ran out, how much was dropped.
    pub(super) fn finish(&mut self) {
        self.emit(Stream::Stdout);
        self.emit(Stream::Stderr);
        if self.dropped > 0 {
            log::warn!(
                "job {}: {} more bytes of output not logged (handler.output_limit_bytes)",
                self.job_id,
                self.dropped
            );
        }
    }

    fn emit(&mut self, stream: Stream) {
        let line = std::mem::take(&mut self.partial[stream as usize]);
        if line.is_empty() {
            return;
        }
        self.budget = self.budget.saturating_sub(line.len());
        let text = String::from_utf8_lossy(&line);
        match stream {
            Stream::Stdout => log::info!("job {} stdout: {text}", self.job_id),
            Stream::Stderr => log::warn!("job {} stderr: {text}", self.job_id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_across_chunks_are_joined_and_the_budget_counts_the_rest() {
        let mut out = JobOutput::new("j", 10);
        out.feed(Stream::Stdout, b"abc");
        out.feed(Stream::Stdout, b"de\nfghij");
        assert_eq!(out.budget, 5, "abcde logged");
        assert_eq!(out.partial[0], b"fghij");
        out.feed(Stream::Stdout, b"klm\nxyz\n");
        assert_eq!(out.budget, 0);
        assert_eq!(out.dropped, 6, "klm and xyz");
        out.feed(Stream::Stderr, &[b'x'; 100]);
        assert_eq!(out.dropped, 106);
    }
}
