//! The daemons as real processes: a temporary config, a spawned binary whose log lines the
//! test can wait for, signals, and the final ledger line parsed into numbers.

use crossbeam_channel::{Receiver, unbounded};
use flagshed::ledger::Outcome;
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a test waits for a stats line it expects: generous, since a loaded CI machine
/// stalls, and a test that waits this long has failed anyway.
pub const STATS_WAIT: Duration = Duration::from_secs(90);

/// An exclusive lock on a file, held across test processes until dropped (flock(2)).
pub struct FileLock(std::fs::File);

impl FileLock {
    pub fn take(path: &str) -> FileLock {
        use std::os::fd::AsRawFd;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("open lock file {path}: {e}"));
        // SAFETY: flock on a descriptor we own; blocks until the lock is ours.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock {path}: {}", std::io::Error::last_os_error());
        FileLock(file)
    }
}

/// A directory removed when the test ends.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(what: &str) -> TempDir {
        let path = std::env::temp_dir().join(super::broker::unique_name(what));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `contents` to `name` in this directory atomically (temp file + rename), as an
    /// operator's editor or a deploy tool would.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        let tmp = self.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, contents).expect("write temp file");
        std::fs::rename(&tmp, &path).expect("rename into place");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A config file under construction: sections of `key = value` (values as TOML literals).
#[derive(Clone, Debug, Default)]
pub struct TestConfig {
    sections: BTreeMap<String, Vec<(String, String)>>,
}

impl TestConfig {
    /// A config for `queue` on the test broker, logging stats every 200 ms, with no flag file
    /// and no state file (whatever the machine has installed in /etc or /var/lib).
    pub fn new(queue: &str) -> TestConfig {
        TestConfig::default()
            .set("broker", "url", &toml_str(&super::broker::amqp_url()))
            .set("broker", "queue", &toml_str(queue))
            .set("broker", "durable", "false")
            .set("flags", "file", "\"\"")
            .set("launchdarkly", "state_file", "\"\"")
            .set("log", "stats_interval_ms", "200")
    }

    /// Sets `[section] key = value`; `value` is a TOML literal (`"text"`, `3`, `true`).
    pub fn set(mut self, section: &str, key: &str, value: &str) -> TestConfig {
        let entries = self.sections.entry(section.to_owned()).or_default();
        entries.retain(|(k, _)| k != key);
        entries.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Removes `[section] key`, leaving the daemon's default.
    pub fn without(mut self, section: &str, key: &str) -> TestConfig {
        if let Some(entries) = self.sections.get_mut(section) {
            entries.retain(|(k, _)| k != key);
        }
        self
    }

    /// Writes `json` as the flag file `flags.json` in `dir` and points `flags.file` at it; a
    /// test changes the flags later by writing that file again.
    pub fn flag_file(self, dir: &TempDir, json: &str) -> TestConfig {
        let path = dir.write("flags.json", json);
        self.set("flags", "file", &toml_str(&path.display().to_string()))
    }

    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        for (section, entries) in &self.sections {
            out.push_str(&format!("[{section}]\n"));
            for (k, v) in entries {
                out.push_str(&format!("{k} = {v}\n"));
            }
        }
        out
    }

    /// Writes the config as `name` in `dir`.
    pub fn write(&self, dir: &TempDir, name: &str) -> PathBuf {
        dir.write(name, &self.to_toml())
    }
}

/// A string as a TOML literal.
pub fn toml_str(s: &str) -> String {
    format!("{s:?}")
}

/// Which binary.
#[derive(Clone, Copy, Debug)]
pub enum Bin {
    Worker,
    Queuer,
}

impl Bin {
    /// Cargo names the binaries for tests and benches at compile time; examples (the demo)
    /// find them beside their own directory, `target/<profile>/`.
    pub fn path(self) -> PathBuf {
        let (built, name) = match self {
            Bin::Worker => (option_env!("CARGO_BIN_EXE_taskworker"), "taskworker"),
            Bin::Queuer => (option_env!("CARGO_BIN_EXE_taskqueuer"), "taskqueuer"),
        };
        if let Some(path) = built {
            return PathBuf::from(path);
        }
        let exe = std::env::current_exe().expect("current executable");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("examples live in target/<profile>/examples");
        profile_dir.join(name)
    }
}

/// The secrets tests give daemons (SDK keys, broker passwords): none may ever be logged.
pub const TEST_SECRETS: &[&str] = &[
    "sdk-test-secret-never-in-a-child",
    "sdk-test-key-never-logged",
    "pw-Zq81-never-logged",
    "pw-Cred-77-never-logged",
];

/// A running daemon whose stderr is collected line by line.
pub struct Daemon {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    new_line: Receiver<()>,
    status: Option<ExitStatus>,
}

impl Daemon {
    pub fn start(bin: Bin, config: &Path) -> Daemon {
        Daemon::start_with_env(bin, config, &[])
    }

    pub fn start_with_env(bin: Bin, config: &Path, env: &[(&str, &str)]) -> Daemon {
        Daemon::start_program(&bin.path(), config, env)
    }

    /// Starts any daemon binary built on flagshed's library (an example's, a user's) with
    /// `--config config`, as [`Daemon::start_with_env`] does for the two shipped ones.
    pub fn start_program(program: &Path, config: &Path, env: &[(&str, &str)]) -> Daemon {
        let mut command = Command::new(program);
        command
            .arg("--config")
            .arg(config)
            .env_remove("RUST_LOG")
            .env_remove("JOURNAL_STREAM")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LAUNCHDARKLY_SDK_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("spawn daemon");
        let stderr = child.stderr.take().expect("stderr is piped");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, new_line) = unbounded();
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().expect("log lock").push(line);
                let _ = tx.send(());
            }
        });
        Daemon {
            child,
            lines,
            new_line,
            status: None,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        self.lines.lock().expect("log lock").join("\n")
    }

    /// The last `n` lines of the log, for a failure message that stays readable.
    pub fn log_tail(&self, n: usize) -> String {
        let lines = self.lines.lock().expect("log lock");
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    pub fn line_count(&self) -> usize {
        self.lines.lock().expect("log lock").len()
    }

    /// Waits for a line, at or after index `from`, containing `needle`; returns (index, line).
    /// Panics with the whole log when it does not come within `timeout`.
    pub fn wait_for_line_from(
        &self,
        from: usize,
        needle: &str,
        timeout: Duration,
    ) -> (usize, String) {
        let end = Instant::now() + timeout;
        loop {
            {
                let lines = self.lines.lock().expect("log lock");
                if let Some((i, line)) = lines
                    .iter()
                    .enumerate()
                    .skip(from)
                    .find(|(_, l)| l.contains(needle))
                {
                    return (i, line.clone());
                }
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!(
                    "no log line containing {needle:?} within {timeout:?}; last lines:\n{}",
                    self.log_tail(400)
                );
            }
            let _ = self
                .new_line
                .recv_timeout(left.min(Duration::from_millis(100)));
        }
    }

    /// The most recent line containing `needle`, if any.
    pub fn last_line(&self, needle: &str) -> Option<String> {
        let lines = self.lines.lock().expect("log lock");
        lines.iter().rev().find(|l| l.contains(needle)).cloned()
    }

    /// Waits for the first line containing `needle`.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> String {
        self.wait_for_line_from(0, needle, timeout).1
    }

    /// Waits for a stats line, at or after line `from`, whose fields satisfy `done`; returns
    /// its index and fields. Panics with the log after [`STATS_WAIT`].
    pub fn wait_for_stats_from(
        &self,
        from: usize,
        done: impl Fn(&Ledger) -> bool,
    ) -> (usize, Ledger) {
        // One deadline for the whole wait: a daemon that keeps logging stats lines that never
        // satisfy `done` must fail the test, not hold it forever.
        let end = Instant::now() + STATS_WAIT;
        let mut from = from;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!(
                    "no stats line met the condition within {STATS_WAIT:?}; last lines:\n{}",
                    self.log_tail(200)
                );
            }
            let (i, line) = self.wait_for_line_from(from, "stats role=", left);
            let stats = Ledger::parse(&line);
            if done(&stats) {
                return (i, stats);
            }
            from = i + 1;
        }
    }

    /// Waits for a stats line, anywhere in the log, whose fields satisfy `done`.
    pub fn wait_for_stats(&self, done: impl Fn(&Ledger) -> bool) -> Ledger {
        self.wait_for_stats_from(0, done).1
    }

    /// Waits for a stats line logged from now on whose fields satisfy `done`.
    pub fn wait_for_new_stats(&self, done: impl Fn(&Ledger) -> bool) -> Ledger {
        self.wait_for_stats_from(self.line_count(), done).1
    }

    /// Sends a signal (`libc::SIGTERM`, `libc::SIGHUP`, ...).
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(rc, 0, "kill({}, {signal})", self.pid());
    }

    /// Waits for the process to exit; panics with the log if it does not within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let end = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.status = Some(status);
                // Let the reader thread collect the last lines.
                let _ = self.new_line.recv_timeout(Duration::from_millis(200));
                while self.new_line.try_recv().is_ok() {}
                self.assert_no_test_secret();
                return status;
            }
            if Instant::now() >= end {
                panic!(
                    "daemon did not exit within {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every daemon the suite runs is checked when it exits: none of the tests' secrets may
    /// appear in anything it logged, at any level.
    pub fn assert_no_test_secret(&self) {
        let log = self.log();
        for secret in TEST_SECRETS {
            assert!(
                !log.contains(secret),
                "a secret reached the log: {secret:?}\n{log}"
            );
        }
    }

    /// Waits until a worker has received at least `received` deliveries and settled them all.
    pub fn wait_settled(&self, received: u64) -> Ledger {
        self.wait_for_stats(|s| s.get("received") >= received && s.get("in_flight") == 0)
    }

    /// Stops the daemon as systemd would (SIGTERM), requires a clean exit, and returns its final
    /// ledger line.
    pub fn stop(&mut self) -> Ledger {
        self.signal(libc::SIGTERM);
        let status = self.wait_exit(STATS_WAIT);
        assert!(status.success(), "exit {status:?}; log:\n{}", self.log());
        self.final_ledger()
    }

    /// The numbers of the `final role=...` line: every `key=value` whose value is an integer.
    pub fn final_ledger(&self) -> Ledger {
        let line = self.wait_for_line("final role=", Duration::from_secs(5));
        Ledger::parse(&line)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `key=value` fields of a stats or final line.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    pub fields: HashMap<String, String>,
}

impl Ledger {
    pub fn parse(line: &str) -> Ledger {
        let fields = line
            .split_whitespace()
            .filter_map(|token| token.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Ledger { fields }
    }

    /// An integer field; panics naming it when absent.
    pub fn get(&self, key: &str) -> u64 {
        self.fields
            .get(key)
            .unwrap_or_else(|| panic!("no field {key} in {:?}", self.fields))
            .parse()
            .unwrap_or_else(|_| panic!("field {key} is not an integer: {:?}", self.fields))
    }

    pub fn text(&self, key: &str) -> &str {
        self.fields.get(key).map(String::as_str).unwrap_or("")
    }

    /// A worker stats line's budget for `job_type`, from `work_estimate_ms=type:ms,...`.
    pub fn work_estimate_ms(&self, job_type: &str) -> Option<u64> {
        self.text("work_estimate_ms")
            .split(',')
            .filter_map(|entry| entry.split_once(':'))
            .find(|(name, _)| *name == job_type)
            .and_then(|(_, ms)| ms.parse().ok())
    }

    /// Asserts a worker's final line accounts for every delivery: each received job is in
    /// exactly one outcome or went back to the broker with its channel.
    pub fn assert_balanced(&self) {
        assert_eq!(self.text("balanced"), "true", "{:?}", self.fields);
        assert_eq!(
            self.get("received"),
            self.settled() + self.get("returned") + self.get("returned_unacked"),
            "{:?}",
            self.fields
        );
    }

    /// The worker's settled outcomes, summed.
    pub fn settled(&self) -> u64 {
        Outcome::ALL.iter().map(|o| self.get(o.as_str())).sum()
    }
}

/// The words of the outcomes that end a job for good (not handed back to the queue), as the
/// ledger files and stats lines write them.
pub fn final_states() -> Vec<&'static str> {
    Outcome::ALL
        .iter()
        .filter(|o| o.is_final())
        .map(|o| o.as_str())
        .collect()
}

/// A `ledger_file` (JSON lines) as (job id, state) pairs, in the order written; a job without
/// an id reads as `-`. Panics on a line that is not a record: the format must hold for any id.
pub fn ledger_lines(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let record: serde_json::Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("ledger line {l:?} is not JSON: {e}"));
            let id = record["id"].as_str().unwrap_or("-").to_owned();
            let state = record["state"].as_str().expect("a state").to_owned();
            (id, state)
        })
        .collect()
}

/// A port on 127.0.0.1 that was free a moment ago: nothing listens there.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}
