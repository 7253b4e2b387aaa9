//! The standard `process_*` metrics, read at scrape time from `/proc/self` and the kernel.
//!
//! Only `/proc/self` is read: the shipped units set `ProcSubset=pid`, which hides `/proc/stat`
//! and `/proc/uptime`, so the start time is worked out from `CLOCK_BOOTTIME` instead of the
//! boot time in `/proc/stat`. A value that cannot be read is left out of the scrape, never
//! shown as 0.

use super::text::{Kind, Text};

/// Appends the `process_*` families that can be read now.
pub fn render(text: &mut Text) {
    let stat = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| Stat::parse(&s));
    let ticks_per_sec = sysconf(libc::_SC_CLK_TCK);
    let page_size = sysconf(libc::_SC_PAGESIZE);
    if let (Some(stat), Some(ticks)) = (&stat, ticks_per_sec) {
        text.family(
            "process_cpu_seconds_total",
            Kind::Counter,
            "Total user and system CPU time spent in seconds.",
        );
        text.float(
            "process_cpu_seconds_total",
            &[],
            (stat.utime + stat.stime) as f64 / ticks as f64,
        );
    }
    if let Some(open) = open_fds() {
        text.family(
            "process_open_fds",
            Kind::Gauge,
            "Number of open file descriptors.",
        );
        text.int("process_open_fds", &[], open);
    }
    if let Some(max) = max_fds() {
        text.family(
            "process_max_fds",
            Kind::Gauge,
            "Maximum number of open file descriptors.",
        );
        text.int("process_max_fds", &[], max);
    }
    if let Some(stat) = &stat {
        text.family(
            "process_virtual_memory_bytes",
            Kind::Gauge,
            "Virtual memory size in bytes.",
        );
        text.int("process_virtual_memory_bytes", &[], stat.vsize);
        if let Some(page) = page_size {
            text.family(
                "process_resident_memory_bytes",
                Kind::Gauge,
                "Resident memory size in bytes.",
            );
            text.int(
                "process_resident_memory_bytes",
                &[],
                stat.rss_pages.saturating_mul(page),
            );
        }
    }
    if let (Some(stat), Some(ticks)) = (&stat, ticks_per_sec) {
        if let Some(start) = start_time_seconds(stat.start_ticks, ticks) {
            text.family(
                "process_start_time_seconds",
                Kind::Gauge,
                "Start time of the process since unix epoch in seconds.",
            );
            text.float("process_start_time_seconds", &[], start);
        }
    }
}

/// The fields of `/proc/self/stat` used here.
#[derive(Debug, PartialEq, Eq)]
struct Stat {
    utime: u64,
    stime: u64,
    /// Clock ticks after boot.
    start_ticks: u64,
    vsize: u64,
    rss_pages: u64,
}

impl Stat {
    /// Parses proc(5)'s `/proc/pid/stat`. The command name (field 2) may hold spaces and
    /// parentheses, so fields are counted from the last `)`.
    fn parse(text: &str) -> Option<Stat> {
        let (_, rest) = text.rsplit_once(')')?;
        // `rest` starts at field 3 (state): field n is at index n - 3.
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        Some(Stat {
            utime: field(14)?,
            stime: field(15)?,
            start_ticks: field(22)?,
            vsize: field(23)?,
            rss_pages: field(24)?,
        })
    }
}

fn sysconf(name: libc::c_int) -> Option<u64> {
    // SAFETY: sysconf(3) only reads a system setting.
    let value = unsafe { libc::sysconf(name) };
    u64::try_from(value).ok().filter(|&v| v > 0)
}

fn open_fds() -> Option<u64> {
    let entries = std::fs::read_dir("/proc/self/fd").ok()?;
    Some(entries.count() as u64)
}

fn max_fds() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) writes into a struct we own.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (rc == 0).then_some(limit.rlim_cur)
}

/// Now (wall clock) minus the time since the process started (the boot clock now minus the
/// start tick count): no `/proc/stat` needed.
fn start_time_seconds(start_ticks: u64, ticks_per_sec: u64) -> Option<f64> {
    let since_boot = clock_seconds(libc::CLOCK_BOOTTIME)?;
    let now = clock_seconds(libc::CLOCK_REALTIME)?;
    let started_after_boot = start_ticks as f64 / ticks_per_sec as f64;
    // Whole milliseconds: the tick count is only good to 10 ms anyway.
    Some(((now - (since_boot - started_after_boot)) * 1_000.0).round() / 1_000.0)
}

fn clock_seconds(clock: libc::clockid_t) -> Option<f64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime(2) writes into a struct we own.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    (rc == 0).then(|| ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let line = "4242 (a b) c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 75 0 0 20 0 9 0 123456 987654321 2048 18446744073709551615";
        assert_eq!(
            Stat::parse(line),
            Some(Stat {
                utime: 250,
                stime: 75,
                start_ticks: 123456,
                vsize: 987654321,
                rss_pages: 2048,
            })
        );
        assert_eq!(Stat::parse("4242 (x) S 1"), None);
    }

    #[test]
    fn this_process_is_readable_and_started_recently() {
        let mut text = Text::new();
        render(&mut text);
        let text = text.into_string();
        for name in [
            "process_cpu_seconds_total",
            "process_open_fds",
            "process_max_fds",
            "process_virtual_memory_bytes",
            "process_resident_memory_bytes",
            "process_start_time_seconds",
        ] {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name}:\n{text}");
        }
        let start: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("process_start_time_seconds "))
            .and_then(|v| v.parse().ok())
            .expect("a start time");
        let now = clock_seconds(libc::CLOCK_REALTIME).expect("clock");
        assert!(
            start <= now + 1.0 && start > now - 3_600.0,
            "{start} vs {now}"
        );
    }
}
