//! The handlers' cost: jobs per second draining a pre-filled queue, 4 at a time, for
//! taskworker running `/bin/true` and `/bin/cat` against a bare Rust loop spawning the same
//! program with 4 threads, and against 4 `amqp-consume` processes (amqp-tools) running
//! `/bin/cat`; and the http handler against a bare ureq keep-alive client with 4 threads, both
//! posting to a keep-alive server inside this bench. (What shedding is worth when the work
//! per job is unknown is the `shedding` bench's story.)
//!
//! Every run ends with the worker's ledger balanced and every job done.
//!
//! `cargo bench --bench handlers [-- --quick | --ci]`: `--quick` fewer jobs, `--ci` a few
//! hundred jobs and a non-zero exit unless every run completed (no timing claims).
//! `FLAGSHED_BENCH_EXEC_JOBS`, `FLAGSHED_BENCH_HTTP_JOBS` and `FLAGSHED_BENCH_REPS` set the
//! sizes, `FLAGSHED_BENCH_DIR` where CSV and markdown files go (`target/bench`).

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "harness/mod.rs"]
mod harness;

use harness::feed::prefill;
use harness::httpd::HttpServer;
use harness::lab::{Lab, LabOptions, toml_array};
use harness::{Settings, StatsLine, Table, fmt2, median};
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use support::daemon::{TestConfig, toml_str};

const CONCURRENCY: u64 = 4;
const TARGET_OVERHEAD_RATIO: f64 = 0.8;
/// The overhead runs' job body, the same for every consumer.
const BODY: &[u8] = b"{\"invoice\": 42}\n";

// ---------------------------------------------------------------------------------------
// Overhead
// ---------------------------------------------------------------------------------------

/// The rate of `key` between the first stats line where it moved and the last where it had
/// not yet reached `total`: the steady part of a run, without start-up or tail.
fn steady_rate(lines: &[StatsLine], key: &str, total: u64) -> f64 {
    let Some(first) = lines.iter().find(|l| l.get(key) > 0) else {
        return f64::NAN;
    };
    let last = lines
        .iter()
        .rev()
        .find(|l| l.get(key) < total && l.at_ms > first.at_ms)
        .or_else(|| lines.iter().rev().find(|l| l.at_ms > first.at_ms));
    match last {
        Some(last) if last.get(key) > first.get(key) => {
            (last.get(key) - first.get(key)) as f64 / ((last.at_ms - first.at_ms) as f64 / 1000.0)
        }
        _ => f64::NAN,
    }
}

/// One overhead measurement: a rate, or why there is none.
type Measured = Result<f64, String>;

/// taskworker drains `jobs` pre-filled jobs with the handler `configure` sets up.
fn taskworker_drain(
    jobs: u64,
    prefetch: Option<u64>,
    configure: impl FnOnce(TestConfig) -> TestConfig,
) -> Measured {
    let mut lab = Lab::new(
        "overhead",
        LabOptions {
            concurrency: CONCURRENCY,
            dead_letters: false,
            audit: false,
            stats_ms: 100,
        },
        |config, _| {
            let config = configure(config);
            match prefetch {
                Some(n) => config.set("worker", "prefetch", &n.to_string()),
                None => config,
            }
        },
    );
    let published = prefill(&lab.target, "job", jobs, BODY);
    if published != jobs {
        return Err(format!("only {published} of {jobs} jobs confirmed"));
    }
    lab.start_worker();
    let end = Instant::now() + Duration::from_secs(600);
    while Instant::now() < end && lab.last_stats().is_none_or(|l| l.get("done") < jobs) {
        if lab.last_stats().is_some_and(|l| l.get("failed") > 0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let final_line = lab.stop_worker();
    let stats = lab.stats();
    let mut problems = Vec::new();
    match &final_line {
        None => problems.push("no final line".to_owned()),
        Some(line) => {
            if line.text("balanced") != "true" {
                problems.push(format!("balanced={}", line.text("balanced")));
            }
            if line.get("done") != jobs || line.get("received") != jobs {
                problems.push(format!(
                    "received {} done {} failed {} of {jobs}",
                    line.get("received"),
                    line.get("done"),
                    line.get("failed")
                ));
            }
        }
    }
    let queued = lab.depth();
    if queued > 0 {
        problems.push(format!("{queued} jobs left in the queue"));
    }
    if problems.is_empty() {
        Ok(steady_rate(&stats, "done", jobs))
    } else {
        Err(format!("ledger: {}", problems.join("; ")))
    }
}

fn exec_config(program: &str) -> impl FnOnce(TestConfig) -> TestConfig + '_ {
    move |config| {
        config
            .set("handler", "kind", "\"exec\"")
            .set("handler", "command", &toml_array(&[program]))
    }
}

fn http_config(url: &str) -> impl FnOnce(TestConfig) -> TestConfig + '_ {
    move |config| {
        config
            .set("handler", "kind", "\"http\"")
            .set("handler", "url", &toml_str(url))
    }
}

/// Runs `one` `jobs` times on `threads` threads; jobs per second.
fn bare_loop(jobs: u64, threads: u64, one: impl Fn() -> Result<(), String> + Sync) -> Measured {
    let next = AtomicU64::new(0);
    let failures = AtomicU64::new(0);
    let first_failure = std::sync::Mutex::new(None);
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                while next.fetch_add(1, Ordering::Relaxed) < jobs {
                    if let Err(why) = one() {
                        failures.fetch_add(1, Ordering::Relaxed);
                        first_failure
                            .lock()
                            .expect("failure lock")
                            .get_or_insert(why);
                    }
                }
            });
        }
    });
    let secs = start.elapsed().as_secs_f64();
    match failures.load(Ordering::Relaxed) {
        0 => Ok(jobs as f64 / secs),
        n => Err(format!(
            "{n} of {jobs} failed, first: {}",
            first_failure
                .lock()
                .expect("failure lock")
                .take()
                .unwrap_or_default()
        )),
    }
}

/// Spawns `program` and waits for it; with `body`, writes it to stdin and reads stdout to
/// the end, as a handler would.
fn spawn_once(program: &str, body: Option<&[u8]>) -> Result<(), String> {
    let mut command = Command::new(program);
    command.stderr(Stdio::null());
    let status = match body {
        None => command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .map_err(|e| e.to_string())?,
        Some(body) => {
            let mut child = command
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .map_err(|e| e.to_string())?;
            let mut stdin = child.stdin.take().expect("stdin is piped");
            let _ = stdin.write_all(body);
            drop(stdin);
            let mut out = Vec::new();
            let _ = child
                .stdout
                .take()
                .expect("stdout is piped")
                .read_to_end(&mut out);
            child.wait().map_err(|e| e.to_string())?
        }
    };
    if status.success() {
        Ok(())
    } else {
        Err(format!("{program}: {status}"))
    }
}

/// `processes` amqp-consume processes (prefetch 1 each) run `/bin/cat` on `jobs` pre-filled
/// jobs between them; jobs per second from their start to the last one's exit.
fn amqp_consume(jobs: u64, processes: u64) -> Measured {
    let available = Command::new("amqp-consume")
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !available {
        return Err("amqp-consume is not installed (apt-get install amqp-tools)".into());
    }
    let lab = Lab::new(
        "amqp-consume",
        LabOptions {
            concurrency: CONCURRENCY,
            dead_letters: false,
            audit: false,
            stats_ms: 100,
        },
        |config, _| config,
    );
    let published = prefill(&lab.target, "job", jobs, BODY);
    if published != jobs {
        return Err(format!("only {published} of {jobs} jobs confirmed"));
    }
    let url = support::broker::amqp_url();
    let start = Instant::now();
    let children: Vec<_> = (0..processes)
        .map(|i| {
            let count = jobs / processes + u64::from(i < jobs % processes);
            Command::new("amqp-consume")
                .args(["-u", &url, "-q", &lab.queue, "-p", "1", "-c"])
                .arg(count.to_string())
                .arg("/bin/cat")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
        })
        .collect();
    let mut problems = Vec::new();
    for child in children {
        match child.map(|c| c.wait_with_output()) {
            Ok(Ok(output)) if output.status.success() => {}
            Ok(Ok(output)) => problems.push(format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )),
            Ok(Err(e)) | Err(e) => problems.push(e.to_string()),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let left = lab.depth();
    if left > 0 {
        problems.push(format!("{left} jobs left in the queue"));
    }
    if problems.is_empty() {
        Ok(jobs as f64 / secs)
    } else {
        Err(problems.join("; "))
    }
}

/// A bare ureq 2 client: `threads` threads sharing one keep-alive agent post `BODY` `jobs`
/// times.
fn bare_http(url: &str, jobs: u64, threads: u64) -> Measured {
    let agent = http_agent(threads);
    bare_loop(jobs, threads, || post_once(&agent, url))
}

/// A keep-alive agent with an idle connection per thread, as the http handler keeps.
fn http_agent(threads: u64) -> ureq::Agent {
    ureq::AgentBuilder::new()
        .redirects(0)
        .max_idle_connections(threads as usize)
        .max_idle_connections_per_host(threads as usize)
        .build()
}

/// One POST of [`BODY`], its answer read to the end so the connection can be reused.
fn post_once(agent: &ureq::Agent, url: &str) -> Result<(), String> {
    let response = agent
        .post(url)
        .set("Content-Type", "text/plain")
        .send_bytes(BODY)
        .map_err(|e| e.to_string())?;
    let _ = std::io::copy(&mut response.into_reader(), &mut std::io::sink());
    Ok(())
}

/// The least an AMQP-fed handler can cost: `threads` threads, each with its own connection
/// and channel (prefetch 1 each, so as many deliveries are held as taskworker holds by
/// default), consume the `jobs` pre-filled jobs, run `one` per delivery and ack it. Jobs per
/// second from when every thread is consuming to the last ack.
fn bare_amqp(jobs: u64, threads: u64, one: impl Fn() -> Result<(), String> + Sync) -> Measured {
    let lab = Lab::new(
        "bare-amqp",
        LabOptions {
            concurrency: CONCURRENCY,
            dead_letters: false,
            audit: false,
            stats_ms: 100,
        },
        |config, _| config,
    );
    let published = prefill(&lab.target, "job", jobs, BODY);
    if published != jobs {
        return Err(format!("only {published} of {jobs} jobs confirmed"));
    }
    let target = &lab.target;
    let done = AtomicU64::new(0);
    let failures = AtomicU64::new(0);
    let barrier = std::sync::Barrier::new(threads as usize + 1);
    let mut secs = f64::NAN;
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let (connection, channel) = target.open();
                channel.qos(0, 1, false).expect("set prefetch");
                let consumer = channel
                    .basic_consume(target.queue.clone(), amiquip::ConsumerOptions::default())
                    .expect("start consuming");
                barrier.wait();
                while done.load(Ordering::Relaxed) < jobs {
                    match consumer.receiver().recv_timeout(Duration::from_millis(50)) {
                        Ok(amiquip::ConsumerMessage::Delivery(delivery)) => {
                            if one().is_err() {
                                failures.fetch_add(1, Ordering::Relaxed);
                            }
                            consumer.ack(delivery).expect("ack");
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => break,
                        Err(_) => {}
                    }
                }
                drop(consumer);
                harness::feed::close(connection, channel);
            });
        }
        barrier.wait();
        let start = Instant::now();
        let end = start + Duration::from_secs(600);
        while done.load(Ordering::Relaxed) < jobs && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(1));
        }
        secs = start.elapsed().as_secs_f64();
    });
    let (done, failures) = (done.into_inner(), failures.into_inner());
    let left = lab.depth();
    if done != jobs || failures > 0 || left > 0 {
        return Err(format!(
            "{done} of {jobs} done, {failures} failed, {left} left in the queue"
        ));
    }
    Ok(jobs as f64 / secs)
}

/// One overhead row: what consumes, and its rates over the repetitions.
struct OverheadRow {
    group: &'static str,
    name: String,
    jobs: u64,
    rates: Vec<f64>,
    problems: Vec<String>,
    /// Checked in CI (taskworker's ledgers).
    checked: bool,
}

impl OverheadRow {
    fn median(&self) -> f64 {
        median(&self.rates)
    }
}

/// What one overhead row runs.
#[derive(Clone, Copy, Debug)]
enum Consumer {
    BareExec {
        program: &'static str,
        body: bool,
    },
    BareAmqpExec {
        program: &'static str,
        body: bool,
    },
    BareAmqpHttp,
    TaskworkerExec {
        program: &'static str,
        prefetch: Option<u64>,
    },
    AmqpConsume,
    BareHttp,
    TaskworkerHttp {
        prefetch: Option<u64>,
    },
}

impl Consumer {
    fn group(self) -> &'static str {
        match self {
            Consumer::BareExec { program, .. }
            | Consumer::BareAmqpExec { program, .. }
            | Consumer::TaskworkerExec { program, .. } => {
                if program.ends_with("true") {
                    "exec /bin/true"
                } else {
                    "exec /bin/cat"
                }
            }
            Consumer::AmqpConsume => "exec /bin/cat",
            Consumer::BareHttp | Consumer::BareAmqpHttp | Consumer::TaskworkerHttp { .. } => {
                "http POST"
            }
        }
    }

    fn name(self) -> String {
        let prefetch = |p: Option<u64>| match p {
            None => format!("prefetch {CONCURRENCY} (default)"),
            Some(n) => format!("prefetch {n}"),
        };
        match self {
            Consumer::BareExec { body: false, .. } => {
                format!("bare Rust loop, {CONCURRENCY} threads")
            }
            Consumer::BareExec { body: true, .. } => {
                format!("bare Rust loop, {CONCURRENCY} threads, body in, output read")
            }
            Consumer::BareAmqpExec { .. } => format!(
                "bare amiquip consumer, {CONCURRENCY} threads, prefetch 1 each, runs it inline"
            ),
            Consumer::BareAmqpHttp => format!(
                "bare amiquip consumer, {CONCURRENCY} threads, prefetch 1 each, posts inline"
            ),
            Consumer::TaskworkerExec { prefetch: p, .. } => format!("taskworker, {}", prefetch(p)),
            Consumer::AmqpConsume => {
                format!("amqp-consume x {CONCURRENCY} processes, prefetch 1 each")
            }
            Consumer::BareHttp => format!("bare ureq 2 keep-alive client, {CONCURRENCY} threads"),
            Consumer::TaskworkerHttp { prefetch: p } => {
                format!("taskworker kind=http, {}", prefetch(p))
            }
        }
    }

    fn is_taskworker(self) -> bool {
        matches!(
            self,
            Consumer::TaskworkerExec { .. } | Consumer::TaskworkerHttp { .. }
        )
    }

    fn run(self, jobs: u64, url: &str) -> Measured {
        match self {
            Consumer::BareExec { program, body } => bare_loop(jobs, CONCURRENCY, || {
                spawn_once(program, body.then_some(BODY))
            }),
            Consumer::BareAmqpExec { program, body } => bare_amqp(jobs, CONCURRENCY, || {
                spawn_once(program, body.then_some(BODY))
            }),
            Consumer::BareAmqpHttp => {
                let agent = http_agent(CONCURRENCY);
                bare_amqp(jobs, CONCURRENCY, || post_once(&agent, url))
            }
            Consumer::TaskworkerExec { program, prefetch } => {
                taskworker_drain(jobs, prefetch, exec_config(program))
            }
            Consumer::AmqpConsume => amqp_consume(jobs, CONCURRENCY),
            Consumer::BareHttp => bare_http(url, jobs, CONCURRENCY),
            Consumer::TaskworkerHttp { prefetch } => {
                taskworker_drain(jobs, prefetch, http_config(url))
            }
        }
    }
}

/// (comparison, numerator row, denominator row, target: at least this; `None`: for
/// information).
type RatioSpec = (&'static str, Option<usize>, Option<usize>, Option<f64>);

fn run_overhead(settings: &Settings, markdown: &mut String) -> bool {
    let (exec_jobs, http_jobs, reps) = if settings.ci {
        (200, 500, 1)
    } else if settings.quick {
        (1_000, 4_000, 1)
    } else {
        (4_000, 20_000, 3)
    };
    let exec_jobs = harness::env_count("FLAGSHED_BENCH_EXEC_JOBS").unwrap_or(exec_jobs);
    let http_jobs = harness::env_count("FLAGSHED_BENCH_HTTP_JOBS").unwrap_or(http_jobs);
    let consumers: Vec<Consumer> = if settings.ci {
        vec![
            Consumer::TaskworkerExec {
                program: "/bin/true",
                prefetch: None,
            },
            Consumer::TaskworkerExec {
                program: "/bin/cat",
                prefetch: None,
            },
            Consumer::TaskworkerHttp { prefetch: None },
        ]
    } else {
        vec![
            Consumer::BareExec {
                program: "/bin/true",
                body: false,
            },
            Consumer::BareAmqpExec {
                program: "/bin/true",
                body: false,
            },
            Consumer::TaskworkerExec {
                program: "/bin/true",
                prefetch: None,
            },
            Consumer::TaskworkerExec {
                program: "/bin/true",
                prefetch: Some(16),
            },
            Consumer::BareExec {
                program: "/bin/cat",
                body: true,
            },
            Consumer::BareAmqpExec {
                program: "/bin/cat",
                body: true,
            },
            Consumer::TaskworkerExec {
                program: "/bin/cat",
                prefetch: None,
            },
            Consumer::AmqpConsume,
            Consumer::BareHttp,
            Consumer::BareAmqpHttp,
            Consumer::TaskworkerHttp { prefetch: None },
            Consumer::TaskworkerHttp { prefetch: Some(16) },
        ]
    };
    println!(
        "\n2. overhead: draining pre-filled queues, {CONCURRENCY} at a time; exec {exec_jobs} jobs, \
         http {http_jobs} jobs, {reps} repetition(s), median shown"
    );
    let server = HttpServer::start(200);
    let url = server.url("/jobs");
    let mut rows: Vec<OverheadRow> = consumers
        .iter()
        .map(|c| OverheadRow {
            group: c.group(),
            name: c.name(),
            jobs: if c.group() == "http POST" {
                http_jobs
            } else {
                exec_jobs
            },
            rates: Vec::new(),
            problems: Vec::new(),
            checked: c.is_taskworker(),
        })
        .collect();
    for rep in 1..=reps {
        for (consumer, row) in consumers.iter().zip(rows.iter_mut()) {
            match consumer.run(row.jobs, &url) {
                Ok(rate) => {
                    println!(
                        "  rep {rep}: {:<15} {:<55} {:>8.0} jobs/s",
                        row.group, row.name, rate
                    );
                    row.rates.push(rate);
                }
                Err(why) => {
                    println!("  rep {rep}: {:<15} {:<55} {why}", row.group, row.name);
                    row.problems.push(why);
                }
            }
        }
    }
    let served = server.requests();
    drop(server);
    let mut table = Table::new(&["handler", "consumer", "jobs", "jobs/s", "each repetition"]);
    for row in &rows {
        table.row(vec![
            row.group.to_owned(),
            row.name.clone(),
            row.jobs.to_string(),
            if row.rates.is_empty() {
                "-".to_owned()
            } else {
                format!("{:.0}", row.median())
            },
            if row.problems.is_empty() {
                row.rates
                    .iter()
                    .map(|r| format!("{r:.0}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            } else {
                row.problems.join("; ")
            },
        ]);
    }
    println!();
    print!("{}", table.to_text());
    println!("  (http server answered {served} requests in all)");
    settings.write("handlers-overhead.csv", &table.to_csv());
    markdown.push_str("\n## Overhead\n\n");
    markdown.push_str(&table.to_markdown());
    let ok = rows
        .iter()
        .filter(|r| r.checked)
        .all(|r| r.problems.is_empty());
    if settings.ci {
        return ok;
    }
    let find = |c: Consumer| {
        consumers
            .iter()
            .position(|x| x.name() == c.name() && x.group() == c.group())
    };
    let exec = |program: &'static str, prefetch: Option<u64>| {
        find(Consumer::TaskworkerExec { program, prefetch })
    };
    let bare = |program: &'static str| {
        find(Consumer::BareExec {
            program,
            body: program == "/bin/cat",
        })
    };
    let bare_amqp = |program: &'static str| {
        find(Consumer::BareAmqpExec {
            program,
            body: program == "/bin/cat",
        })
    };
    let http = |prefetch: Option<u64>| find(Consumer::TaskworkerHttp { prefetch });
    let specs: Vec<RatioSpec> = vec![
        (
            "taskworker /bin/true vs bare loop",
            exec("/bin/true", None),
            bare("/bin/true"),
            Some(TARGET_OVERHEAD_RATIO),
        ),
        (
            "taskworker /bin/true (prefetch 16) vs bare loop",
            exec("/bin/true", Some(16)),
            bare("/bin/true"),
            None,
        ),
        (
            "taskworker /bin/true vs bare amiquip consumer",
            exec("/bin/true", None),
            bare_amqp("/bin/true"),
            None,
        ),
        (
            "taskworker /bin/cat vs bare loop",
            exec("/bin/cat", None),
            bare("/bin/cat"),
            Some(TARGET_OVERHEAD_RATIO),
        ),
        (
            "taskworker /bin/cat vs bare amiquip consumer",
            exec("/bin/cat", None),
            bare_amqp("/bin/cat"),
            None,
        ),
        (
            "taskworker /bin/cat vs amqp-consume",
            exec("/bin/cat", None),
            find(Consumer::AmqpConsume),
            Some(1.0),
        ),
        (
            "taskworker http vs bare ureq",
            http(None),
            find(Consumer::BareHttp),
            Some(TARGET_OVERHEAD_RATIO),
        ),
        (
            "taskworker http (prefetch 16) vs bare ureq",
            http(Some(16)),
            find(Consumer::BareHttp),
            None,
        ),
        (
            "taskworker http vs bare amiquip consumer + ureq",
            http(None),
            find(Consumer::BareAmqpHttp),
            None,
        ),
    ];
    let mut ratios = Table::new(&["comparison", "ratio", "target", "verdict"]);
    for (name, a, b, target) in specs {
        let (Some(a), Some(b)) = (a, b) else { continue };
        let ratio = rows[a].median() / rows[b].median();
        ratios.row(vec![
            name.to_owned(),
            fmt2(ratio),
            match target {
                None => "-".to_owned(),
                Some(1.0) => "> 1 (ahead)".to_owned(),
                Some(t) => format!(">= {t}"),
            },
            match target {
                _ if !ratio.is_finite() => "-".to_owned(),
                None => "(for information)".to_owned(),
                Some(t) if ratio >= t => "PASS".to_owned(),
                Some(_) => "MISS".to_owned(),
            },
        ]);
    }
    println!();
    print!("{}", ratios.to_text());
    println!(
        "  (taskworker: steady rate from its stats lines, start-up and tail excluded; bare loops \
         and amqp-consume: jobs / wall time)"
    );
    settings.write("handlers-overhead-ratios.csv", &ratios.to_csv());
    markdown.push('\n');
    markdown.push_str(&ratios.to_markdown());
    ok
}

// ---------------------------------------------------------------------------------------

fn main() {
    let settings = Settings::from_args();
    let mut markdown = String::from("# Handlers\n");
    let began = Instant::now();
    let ok = run_overhead(&settings, &mut markdown);
    println!("  (overhead took {:.0} s)", began.elapsed().as_secs_f64());
    if settings.ci {
        if !ok {
            eprintln!("bench-ci: some handler runs did not complete (see above)");
            std::process::exit(1);
        }
        println!("\nbench-ci: every handler run completed and every ledger balanced");
        return;
    }
    settings.write("handlers.md", &markdown);
    println!("\nCSV and markdown files in {}", settings.out_dir.display());
    if !ok {
        println!("NOTE: some runs did not complete (see the tables above)");
        std::process::exit(1);
    }
}
