//! What an exec handler's child writes, turned into journal lines: one log record per line,
//! tagged with the job id and the stream (stdout at `info`, stderr at `warn`), up to a byte
//! budget and a line budget per job. A child that floods its output costs the journal at most
//! those budgets; the rest is read (so the child never blocks on a full pipe), counted, and
//! reported once.
//!
//! Both budgets count what the child wrote, not what the journal stores: every byte read
//! counts, newlines included, and a line that is not logged (an empty one, or one past a
//! budget) is counted as not logged. The line budget is there because a journal record costs
//! far more than its text: 16 KiB of one-character lines would otherwise be 16,384 records.

/// Which of the child's streams a chunk came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Stream {
    Stdout,
    Stderr,
}

/// How much of one job's output may reach the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct OutputLimits {
    /// Bytes of output, newlines included (`handler.output_limit_bytes`).
    pub(super) bytes: usize,
    /// Log lines (`handler.output_limit_lines`).
    pub(super) lines: usize,
}

/// One job's output on its way to the log.
pub(super) struct JobOutput<'a> {
    job_id: &'a str,
    limits: OutputLimits,
    /// Bytes read from the child, in all.
    read: u64,
    /// Bytes of the lines logged, each with its newline.
    logged: usize,
    /// Lines logged.
    lines: usize,
    /// Each stream's unfinished last line, as much of it as the budget lets through.
    partial: [Vec<u8>; 2],
}

impl<'a> JobOutput<'a> {
    pub(super) fn new(job_id: &'a str, limits: OutputLimits) -> JobOutput<'a> {
        JobOutput {
            job_id,
            limits,
            read: 0,
            logged: 0,
            lines: 0,
            partial: [Vec::new(), Vec::new()],
        }
    }

    /// Takes a chunk as read from `stream`; logs every line it completes.
    pub(super) fn feed(&mut self, stream: Stream, mut bytes: &[u8]) {
        self.read += bytes.len() as u64;
        while !bytes.is_empty() {
            let (piece, rest, complete) = match bytes.iter().position(|&b| b == b'\n') {
                Some(at) => (&bytes[..at], &bytes[at + 1..], true),
                None => (bytes, &[][..], false),
            };
            bytes = rest;
            let kept = piece.len().min(self.room());
            self.partial[stream as usize].extend_from_slice(&piece[..kept]);
            if complete {
                self.emit(stream, true);
            }
        }
    }

    /// Bytes the budgets still let into a partial line: none once the line budget is spent,
    /// and one byte is kept back for each buffered line's newline.
    fn room(&self) -> usize {
        let buffered: usize = self.partial.iter().map(Vec::len).sum();
        let pending_lines = self.partial.iter().filter(|p| !p.is_empty()).count();
        if self.lines + pending_lines.max(1) > self.limits.lines {
            return 0;
        }
        self.limits
            .bytes
            .saturating_sub(self.logged + buffered + pending_lines.max(1))
    }

    /// Logs unfinished lines and, if a budget ran out, how much was not logged.
    pub(super) fn finish(&mut self) {
        self.emit(Stream::Stdout, false);
        self.emit(Stream::Stderr, false);
        let not_logged = self.not_logged();
        if not_logged > 0 {
            log::warn!(
                "job {}: {not_logged} more bytes of output not logged ({} lines and {} bytes \
                 logged; handler.output_limit_lines, handler.output_limit_bytes)",
                self.job_id,
                self.lines,
                self.logged,
            );
        }
    }

    /// Bytes read but not logged.
    fn not_logged(&self) -> u64 {
        let buffered: usize = self.partial.iter().map(Vec::len).sum();
        self.read - (self.logged + buffered) as u64
    }

    fn emit(&mut self, stream: Stream, newline: bool) {
        let line = std::mem::take(&mut self.partial[stream as usize]);
        if line.is_empty() || self.lines >= self.limits.lines {
            return;
        }
        self.lines += 1;
        // A line cut short by the budget has lost its newline with the rest of it.
        let newline_fits = newline && self.logged + line.len() < self.limits.bytes;
        self.logged += line.len() + usize::from(newline_fits);
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

    fn limits(bytes: usize, lines: usize) -> OutputLimits {
        OutputLimits { bytes, lines }
    }

    #[test]
    fn lines_split_across_chunks_are_joined_and_newlines_count() {
        let mut out = JobOutput::new("j", limits(10, 100));
        out.feed(Stream::Stdout, b"abc");
        out.feed(Stream::Stdout, b"de\nfghij");
        assert_eq!(out.logged, 6, "abcde and its newline");
        assert_eq!(out.partial[0], b"fgh", "one byte kept back for its newline");
        out.feed(Stream::Stdout, b"klm\nxyz\n");
        assert_eq!(out.logged, 10, "abcde\\n fgh\\n");
        assert_eq!(out.lines, 2);
        out.feed(Stream::Stderr, &[b'x'; 100]);
        out.finish();
        assert_eq!(out.read, 119);
        assert_eq!(out.not_logged(), 109, "everything read but the 10 bytes logged");
    }

    #[test]
    fn the_line_budget_bounds_one_character_lines() {
        let mut out = JobOutput::new("j", limits(16 * 1024, 100));
        out.feed(Stream::Stdout, &b"x\n".repeat(8 * 1024));
        out.finish();
        assert_eq!(out.lines, 100);
        assert_eq!(out.logged, 200);
        assert_eq!(out.not_logged(), 16 * 1024 - 200);
    }

    #[test]
    fn empty_lines_are_counted_not_logged() {
        let mut out = JobOutput::new("j", limits(1000, 10));
        out.feed(Stream::Stdout, b"\n\n\nok\n");
        out.finish();
        assert_eq!(out.lines, 1);
        assert_eq!(out.not_logged(), 3);
    }

    #[test]
    fn a_flood_is_counted_whole() {
        let mut out = JobOutput::new("j", limits(1000, 1_000_000));
        let flood = b"flood\n".repeat(200_000);
        for chunk in flood.chunks(16 * 1024) {
            out.feed(Stream::Stdout, chunk);
        }
        out.finish();
        // 166 lines of 6 bytes, then what is left of the budget: "flo".
        assert_eq!(out.lines, 167);
        assert_eq!(out.logged, 1000);
        assert_eq!(out.read, 1_200_000);
        assert_eq!(out.not_logged(), 1_200_000 - 1000);
    }
}
