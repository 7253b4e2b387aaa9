//! A real Prometheus for a test, and the other Prometheus tools: `prometheus` started with a
//! config of its own, its data in a temporary directory and its web address on a free loopback
//! port, scraping the test's daemons every second (never the system service on 9090, which
//! may or may not run); `promtool`; and scrapes of a daemon's `/metrics` read into numbers.
//!
//! A missing `prometheus` or `promtool` fails the test loudly with how to install them: a test
//! that needs Prometheus never skips.

use crate::support::daemon::{Daemon, TempDir};
use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const INSTALL_HINT: &str = "install it with `scripts/ensure-test-tools` (Debian's package \
                            `prometheus`, which also has promtool)";

/// How long Prometheus may take to start: it opens its storage and reads its config.
const START_WAIT: Duration = Duration::from_secs(60);

/// A running Prometheus server, killed when dropped.
pub struct Prometheus {
    child: Child,
    base_url: String,
    /// Its config, log and data; removed after the process is killed.
    _dir: TempDir,
}

/// One series of a query's result: its labels and value.
#[derive(Clone, Debug)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Prometheus {
    /// Starts Prometheus scraping each `(job, address)` every second, and waits until it is
    /// ready. Panics, with its log, when it cannot start.
    pub fn start(targets: &[(&str, SocketAddr)]) -> Prometheus {
        let dir = TempDir::new("prometheus");
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nscrape_configs:\n",
        );
        for (job, address) in targets {
            config.push_str(&format!(
                "  - job_name: {job:?}\n    static_configs:\n      - targets: [\"{address}\"]\n"
            ));
        }
        let config_path = dir.write("prometheus.yml", &config);
        // A free port, found by binding and letting go: another process could take it in
        // between, so a start that fails is tried again on another.
        let mut last_log = String::new();
        for _ in 0..3 {
            let port = free_port();
            let log_path = dir.path().join(format!("prometheus-{port}.log"));
            let log = std::fs::File::create(&log_path).expect("create Prometheus log");
            let spawned = Command::new("prometheus")
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join(format!("data-{port}")).display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn();
            let mut child = match spawned {
                Ok(child) => child,
                Err(e) => panic!("cannot run prometheus ({e}); {INSTALL_HINT}"),
            };
            let base_url = format!("http://127.0.0.1:{port}");
            if wait_ready(&mut child, &base_url) {
                return Prometheus {
                    child,
                    base_url,
                    _dir: dir,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
            last_log = std::fs::read_to_string(&log_path).unwrap_or_default();
        }
        panic!("Prometheus did not start; its log:\n{last_log}");
    }

    /// The result of an instant query (`/api/v1/query`) as a vector of samples; panics on an
    /// error or a result of another type.
    pub fn query(&self, promql: &str) -> Vec<Sample> {
        let response = ureq::get(&format!("{}/api/v1/query", self.base_url))
            .query("query", promql)
            .timeout(Duration::from_secs(10))
            .call()
            .unwrap_or_else(|e| panic!("query {promql:?}: {e}"));
        let body: serde_json::Value = response
            .into_string()
            .map_err(|e| e.to_string())
            .and_then(|text| serde_json::from_str(&text).map_err(|e| e.to_string()))
            .unwrap_or_else(|e| panic!("query {promql:?}: {e}"));
        assert_eq!(body["status"], "success", "query {promql:?}: {body}");
        assert_eq!(body["data"]["resultType"], "vector", "{promql:?}: {body}");
        body["data"]["result"]
            .as_array()
            .expect("a result array")
            .iter()
            .map(|series| Sample {
                labels: series["metric"]
                    .as_object()
                    .expect("labels")
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_owned()))
                    .collect(),
                value: series["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("a sample value in {series}")),
            })
            .collect()
    }

    /// The value of a query that gives one series; `None` when it gives none.
    pub fn value(&self, promql: &str) -> Option<f64> {
        let samples = self.query(promql);
        assert!(samples.len() <= 1, "{promql:?} gave {samples:?}");
        samples.first().map(|s| s.value)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for `/-/ready`; false if the process ended or did not get ready in time.
fn wait_ready(child: &mut Child, base_url: &str) -> bool {
    let end = Instant::now() + START_WAIT;
    while Instant::now() < end {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        let ready = ureq::get(&format!("{base_url}/-/ready"))
            .timeout(Duration::from_secs(2))
            .call();
        if ready.is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address").port()
}

/// Runs `promtool ARGS`, with `stdin` on its standard input; panics when it cannot be run.
pub fn promtool(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run promtool ({e}); {INSTALL_HINT}"));
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(stdin.as_bytes())
        .expect("write to promtool");
    child.wait_with_output().expect("wait for promtool")
}

/// Requires `promtool ARGS` (reading `stdin`) to succeed with nothing to complain about.
pub fn assert_promtool_passes(args: &[&str], stdin: &str) {
    let output = promtool(args, stdin);
    assert!(
        output.status.success(),
        "promtool {args:?} failed ({}):\n{}{}\ninput:\n{stdin}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Where a daemon serves its metrics, from its log line `serving metrics on http://ADDR/metrics`.
pub fn metrics_address(daemon: &Daemon, timeout: Duration) -> SocketAddr {
    let line = daemon.wait_for_line("serving metrics on http://", timeout);
    let (_, rest) = line
        .split_once("serving metrics on http://")
        .expect("the line holds the URL");
    rest.trim_end()
        .trim_end_matches("/metrics")
        .parse()
        .unwrap_or_else(|e| panic!("no address in {line:?}: {e}"))
}

/// `GET /metrics` of a daemon, as text.
pub fn scrape(address: SocketAddr) -> String {
    ureq::get(&format!("http://{address}/metrics"))
        .timeout(Duration::from_secs(10))
        .call()
        .unwrap_or_else(|e| panic!("scrape {address}: {e}"))
        .into_string()
        .expect("a text body")
}

/// A scrape's samples by series (`name{labels}` exactly as written), and its families by name
/// with their type.
#[derive(Debug, Default)]
pub struct Scrape {
    pub samples: BTreeMap<String, f64>,
    pub families: BTreeMap<String, String>,
}

impl Scrape {
    pub fn parse(text: &str) -> Scrape {
        let mut scrape = Scrape::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
                scrape.families.insert(name.to_owned(), kind.to_owned());
            } else if !line.starts_with('#') && !line.is_empty() {
                let (series, value) = line.rsplit_once(' ').expect("series value");
                let value = match value {
                    "+Inf" => f64::INFINITY,
                    "-Inf" => f64::NEG_INFINITY,
                    v => v.parse().unwrap_or_else(|_| panic!("a number in {line:?}")),
                };
                scrape.samples.insert(series.to_owned(), value);
            }
        }
        scrape
    }

    /// The value of one series, written as the daemon writes it (`name{a="x",b="y"}`).
    pub fn get(&self, series: &str) -> f64 {
        *self
            .samples
            .get(series)
            .unwrap_or_else(|| panic!("no series {series} in {:?}", self.samples.keys()))
    }

    /// Whether `name` is a series name this scrape can have: a family, or a histogram's
    /// `_bucket`, `_sum` or `_count`.
    pub fn knows(&self, name: &str) -> bool {
        self.families.contains_key(name)
            || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
                name.strip_suffix(suffix).is_some_and(|base| {
                    self.families.get(base).map(String::as_str) == Some("histogram")
                })
            })
    }
}

/// Waits until `check` gives `Ok`; panics with its last complaint after `timeout`.
pub fn eventually<T>(timeout: Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
    let end = Instant::now() + timeout;
    loop {
        match check() {
            Ok(value) => return value,
            Err(why) if Instant::now() >= end => panic!("not within {timeout:?}: {why}"),
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}
