//! What the benches share: run settings, tables (printed, CSV and markdown), the daemons'
//! timestamped stats lines, and process figures read from /proc.
//!
//! The benches are plain programs (`harness = false`) that print figures; nothing here
//! asserts a timing. They include this module with `#[path]`, beside `tests/support`, and use
//! the real RabbitMQ and the real daemon binaries.
#![allow(dead_code)]

pub mod feed;
pub mod httpd;
pub mod lab;
pub mod random;
pub mod rig;
pub mod svg;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long and where a bench runs, from its arguments and environment.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `--quick`: shorter runs, fewer repetitions; figures are rougher.
    pub quick: bool,
    /// `--ci`: the smallest run that still exercises everything it checks.
    pub ci: bool,
    /// Arguments other than the flags above (and cargo's `--bench`).
    pub rest: Vec<String>,
    /// Where CSV, markdown and SVG files go.
    pub out_dir: PathBuf,
}

impl Settings {
    pub fn from_args() -> Settings {
        let mut settings = Settings {
            quick: false,
            ci: false,
            rest: Vec::new(),
            out_dir: std::env::var_os("FLAGSHED_BENCH_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| repo_root().join("target").join("bench")),
        };
        for arg in std::env::args().skip(1) {
            match arg.as_str() {
                "--quick" => settings.quick = true,
                "--ci" => settings.ci = true,
                // cargo bench passes --bench to every bench binary.
                "--bench" => {}
                _ => settings.rest.push(arg),
            }
        }
        settings
    }

    /// Writes `contents` to `name` in the output directory; returns the path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.out_dir.join(name);
        write_file(&path, contents);
        path
    }
}

/// The repository root (where Cargo.toml is).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Writes a file, creating its directory; a bench that cannot write its output should stop.
pub fn write_file(path: &Path, contents: &str) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    }
    std::fs::write(path, contents)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// A duration in seconds from the environment, if set and valid.
pub fn env_secs(name: &str) -> Option<Duration> {
    let text = std::env::var(name).ok()?;
    match text.trim().parse::<f64>() {
        Ok(secs) if secs > 0.0 && secs.is_finite() => Some(Duration::from_secs_f64(secs)),
        _ => {
            eprintln!("ignoring {name}={text:?}: expected a positive number of seconds");
            None
        }
    }
}

/// A count from the environment, if set and valid.
pub fn env_count(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    match text.trim().parse::<u64>() {
        Ok(n) if n > 0 => Some(n),
        _ => {
            eprintln!("ignoring {name}={text:?}: expected a positive whole number");
            None
        }
    }
}

/// Rows of text under a header, shown three ways: aligned text, CSV and markdown.
#[derive(Clone, Debug, Default)]
pub struct Table {
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.header.len());
        self.rows.push(cells);
    }

    fn widths(&self) -> Vec<usize> {
        (0..self.header.len())
            .map(|i| {
                self.rows
                    .iter()
                    .map(|r| r[i].len())
                    .chain([self.header[i].len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect()
    }

    /// Aligned columns: the first left-aligned, the rest right-aligned.
    pub fn to_text(&self) -> String {
        let widths = self.widths();
        let mut out = String::new();
        for cells in std::iter::once(&self.header).chain(&self.rows) {
            for (i, cell) in cells.iter().enumerate() {
                let sep = if i == 0 { "" } else { "  " };
                if i == 0 {
                    let _ = write!(out, "{cell:<w$}", w = widths[i]);
                } else {
                    let _ = write!(out, "{sep}{cell:>w$}", w = widths[i]);
                }
            }
            out.push('\n');
        }
        out
    }

    pub fn to_csv(&self) -> String {
        let mut out = String::new();
        for cells in std::iter::once(&self.header).chain(&self.rows) {
            let quoted: Vec<String> = cells.iter().map(|c| csv_cell(c)).collect();
            out.push_str(&quoted.join(","));
            out.push('\n');
        }
        out
    }

    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "| {} |", self.header.join(" | "));
        let aligns: Vec<&str> = (0..self.header.len())
            .map(|i| if i == 0 { "---" } else { "---:" })
            .collect();
        let _ = writeln!(out, "| {} |", aligns.join(" | "));
        for row in &self.rows {
            let _ = writeln!(out, "| {} |", row.join(" | "));
        }
        out
    }
}

fn csv_cell(cell: &str) -> String {
    if cell.contains([',', '"', '\n']) {
        format!("\"{}\"", cell.replace('"', "\"\""))
    } else {
        cell.to_owned()
    }
}

/// The median of some measurements (the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

/// A daemon's `stats` or `final` line with the time it was logged.
#[derive(Clone, Debug)]
pub struct StatsLine {
    /// Unix epoch milliseconds, from the line's RFC 3339 timestamp.
    pub at_ms: u64,
    pub fields: std::collections::HashMap<String, String>,
}

impl StatsLine {
    /// Parses `2025-01-31T12:00:00.123Z INFO  stats role=worker received=...`.
    pub fn parse(line: &str) -> Option<StatsLine> {
        let at_ms = rfc3339_ms(line.split_whitespace().next()?)?;
        let fields = line
            .split_whitespace()
            .filter_map(|token| token.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Some(StatsLine { at_ms, fields })
    }

    /// An integer field; 0 when absent (fields differ between versions of the daemons).
    pub fn get(&self, key: &str) -> u64 {
        self.fields
            .get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// A numeric field that may have a fraction; 0.0 when absent.
    pub fn float(&self, key: &str) -> f64 {
        self.fields
            .get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    pub fn text(&self, key: &str) -> &str {
        self.fields.get(key).map(String::as_str).unwrap_or("")
    }
}

/// Every line of `log` containing `needle`, parsed, in order.
pub fn stats_lines(log: &str, needle: &str) -> Vec<StatsLine> {
    log.lines()
        .filter(|l| l.contains(needle))
        .filter_map(StatsLine::parse)
        .collect()
}

/// `YYYY-MM-DDTHH:MM:SS[.mmm]Z` as Unix epoch milliseconds.
pub fn rfc3339_ms(text: &str) -> Option<u64> {
    let text = text.strip_suffix('Z')?;
    let (date, time) = text.split_once('T')?;
    let mut date_parts = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, d) = (
        date_parts.next()??,
        date_parts.next()??,
        date_parts.next()??,
    );
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut time_parts = hms.split(':').map(|p| p.parse::<i64>().ok());
    let (hh, mm, ss) = (
        time_parts.next()??,
        time_parts.next()??,
        time_parts.next()??,
    );
    let millis: i64 = format!("{frac:0<3}")[..3].parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let ms = ((days * 86_400 + hh * 3_600 + mm * 60 + ss) * 1_000) + millis;
    u64::try_from(ms).ok()
}

/// Figures the kernel keeps about a process.
pub mod proc {
    use std::collections::HashMap;

    /// Clock ticks per second, the unit of utime and stime.
    pub fn ticks_per_sec() -> f64 {
        // SAFETY: sysconf has no memory effects.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if ticks > 0 { ticks as f64 } else { 100.0 }
    }

    /// Peak resident set size (VmHWM) in KiB.
    pub fn vm_hwm_kb(pid: i32) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    }

    /// (parent pid, utime + stime in ticks) from /proc/<pid>/stat.
    fn stat(pid: i32) -> Option<(i32, u64)> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name may hold spaces and parentheses; fields resume after the last ')'.
        let rest = &text[text.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // rest starts at field 3 (state): ppid is field 4, utime 14, stime 15.
        let ppid = fields.get(1)?.parse().ok()?;
        let utime: u64 = fields.get(11)?.parse().ok()?;
        let stime: u64 = fields.get(12)?.parse().ok()?;
        Some((ppid, utime + stime))
    }

    /// CPU time (user + system) of one process, in seconds.
    pub fn cpu_secs(pid: i32) -> Option<f64> {
        stat(pid).map(|(_, ticks)| ticks as f64 / ticks_per_sec())
    }

    /// CPU time per group of a process's threads, in seconds: `main` (the thread the process
    /// started with), `pool` (threads named `pool-N`), and the others by name (`amiquip-io`,
    /// `flag-source`, ...). Sorted by group name.
    pub fn thread_cpu_secs(pid: i32) -> Vec<(String, f64)> {
        let mut groups: std::collections::BTreeMap<String, u64> = Default::default();
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return Vec::new();
        };
        for entry in tasks.flatten() {
            let Ok(text) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let (Some(open), Some(close)) = (text.find('('), text.rfind(')')) else {
                continue;
            };
            let tid: i32 = text[..open].trim().parse().unwrap_or(0);
            let name = &text[open + 1..close];
            let fields: Vec<&str> = text[close + 2..].split_whitespace().collect();
            let ticks = fields
                .get(11)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                + fields
                    .get(12)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            let group = if tid == pid {
                "main".to_owned()
            } else if name.starts_with("pool-") {
                "pool".to_owned()
            } else {
                name.to_owned()
            };
            *groups.entry(group).or_default() += ticks;
        }
        groups
            .into_iter()
            .map(|(name, ticks)| (name, ticks as f64 / ticks_per_sec()))
            .collect()
    }

    /// Context switches (voluntary and not) of all of a process's threads: roughly how often
    /// its threads went to sleep and were woken.
    pub fn context_switches(pid: i32) -> Option<u64> {
        let mut total = 0;
        for entry in std::fs::read_dir(format!("/proc/{pid}/task"))
            .ok()?
            .flatten()
        {
            let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
                continue;
            };
            total += status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        }
        Some(total)
    }

    /// CPU time of a process and all its living descendants, in seconds.
    pub fn tree_cpu_secs(root: i32) -> f64 {
        let mut parent_of = HashMap::new();
        let mut ticks_of = HashMap::new();
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<i32>().ok())
                else {
                    continue;
                };
                if let Some((ppid, ticks)) = stat(pid) {
                    parent_of.insert(pid, ppid);
                    ticks_of.insert(pid, ticks);
                }
            }
        }
        let in_tree = |mut pid: i32| {
            for _ in 0..64 {
                if pid == root {
                    return true;
                }
                match parent_of.get(&pid) {
                    Some(&ppid) if ppid > 0 => pid = ppid,
                    _ => return false,
                }
            }
            false
        };
        let ticks: u64 = ticks_of
            .iter()
            .filter(|(pid, _)| in_tree(**pid))
            .map(|(_, t)| *t)
            .sum();
        ticks as f64 / ticks_per_sec()
    }
}

/// A rate or share for a table cell (`-` when unknown; never `-0.0`).
pub fn fmt1(value: f64) -> String {
    let value = value + 0.0;
    if value.is_finite() {
        format!("{value:.1}")
    } else {
        "-".to_owned()
    }
}

pub fn fmt2(value: f64) -> String {
    let value = value + 0.0;
    if value.is_finite() {
        format!("{value:.2}")
    } else {
        "-".to_owned()
    }
}

pub fn pct(value: f64) -> String {
    let value = value + 0.0;
    if value.is_finite() {
        format!("{:.0}%", value * 100.0)
    } else {
        "-".to_owned()
    }
}
