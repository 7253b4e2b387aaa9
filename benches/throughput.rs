//! Plumbing throughput: what taskworker and taskqueuer cost against the least a program could
//! do with the same client library, and against what a Python team would use instead.
//!
//! 1. Rates, with zero-work jobs: taskworker's consume-and-ack rate against a bare amiquip
//!    consumer acking each message, both with prefetch 50; taskqueuer's confirmed publish
//!    rate against a bare amiquip publisher with the same window of outstanding confirms
//!    (1,000) and the same messages. Peak RSS (VmHWM) of each; the bare loops run in a child
//!    process (this binary re-executed with `--child`) so their RSS is a process's, like the
//!    daemons'.
//! 2. CPU at a steady 1,000 jobs/s (fed by taskqueuer): taskworker against a bare loop acking
//!    each message and one acking every 50th with `multiple`, each measured once per
//!    repetition in a rotated order; the target is taskworker at most 1.3x the batched loop.
//! 3. Python: a minimal pika consumer and Celery (no-op task, prefork, concurrency 2, no result
//!    backend) consume the same number of zero-work jobs as taskworker; jobs/s and CPU seconds
//!    per 10,000 jobs. The scripts are in `bench/python/`; a venv with pika and Celery is made
//!    under the output directory when missing.
//!
//! `cargo bench --bench throughput [-- --quick]`. `FLAGSHED_BENCH_JOBS` (100,000) sets the
//! jobs per rate measurement, `FLAGSHED_BENCH_PY_JOBS` (50,000) per Python comparison run,
//! `FLAGSHED_BENCH_SECS` (10) the CPU window, `FLAGSHED_BENCH_REPS` (5) the repetitions of the
//! rate and CPU measurements (the median is reported).

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "harness/mod.rs"]
mod harness;

use amiquip::{
    AmqpProperties, AmqpValue, Confirm, ConfirmSmoother, ConsumerMessage, ConsumerOptions,
    FieldTable, Publish,
};
use harness::rig::{DAEMON_WAIT, Rig, RigOptions};
use harness::{Settings, StatsLine, Table, fmt1, fmt2, median, proc, stats_lines};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Unacked deliveries per consumer, for every consumer here.
const PREFETCH: u16 = 50;
/// taskqueuer's default confirm window, used by the bare publisher too.
const CONFIRM_WINDOW: u64 = 1_000;
/// taskqueuer's default payload size.
const PAYLOAD_BYTES: usize = 100;
/// Deadline far enough away that no job expires during a measurement.
const TTL_MS: u64 = 600_000;
/// The steady rate for the CPU comparison.
const STEADY_RATE: f64 = 1_000.0;
/// The target ratio of flagshed's rate to the bare loop's.
const TARGET_RATIO: f64 = 0.95;
/// The most taskworker's CPU at the steady rate may be, as a multiple of the bare loop's that
/// acks every 50th delivery.
const TARGET_CPU_RATIO: f64 = 1.3;

fn rig_options(max_jobs: Option<u64>, rate_per_sec: f64) -> RigOptions {
    RigOptions {
        work_ms: 0,
        ttl_ms: TTL_MS,
        prefetch: Some(u64::from(PREFETCH)),
        rate_per_sec,
        stats_interval_ms: 100,
        max_jobs,
        dead_letters: false,
        ..RigOptions::default()
    }
}

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

/// Polls `done` every few milliseconds until it says yes or `timeout` passes.
fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// Samples a process's VmHWM and CPU time until it exits (for a daemon that stops by
/// itself): the last values seen before it was gone.
struct ProcSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(u64, f64, Threads)>,
}

/// CPU seconds per thread group (see [`proc::thread_cpu_secs`]).
type Threads = Vec<(String, f64)>;

/// `later - earlier`, group by group.
fn thread_delta(earlier: &Threads, later: &Threads) -> Threads {
    later
        .iter()
        .map(|(name, secs)| {
            let before = earlier
                .iter()
                .find(|(n, _)| n == name)
                .map_or(0.0, |(_, s)| *s);
            (name.clone(), secs - before)
        })
        .collect()
}

/// CPU seconds of one thread group; 0 when there is no such group.
fn group_secs(threads: &Threads, name: &str) -> f64 {
    threads
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, s)| *s)
        .sum()
}

/// Everything but `main`, `pool` and `amiquip-io`.
fn other_secs(threads: &Threads) -> f64 {
    threads
        .iter()
        .filter(|(n, _)| !matches!(n.as_str(), "main" | "pool" | "amiquip-io"))
        .map(|(_, s)| *s)
        .sum()
}

impl ProcSampler {
    fn start(pid: i32) -> ProcSampler {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let (mut peak, mut cpu, mut threads) = (0, 0.0, Vec::new());
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                match (proc::vm_hwm_kb(pid), proc::cpu_secs(pid)) {
                    (Some(kb), Some(secs)) => {
                        peak = peak.max(kb);
                        cpu = secs;
                        let now = proc::thread_cpu_secs(pid);
                        if !now.is_empty() {
                            threads = now;
                        }
                    }
                    _ => break,
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (peak, cpu, threads)
        });
        ProcSampler { stop, thread }
    }

    /// (peak RSS in KiB, CPU seconds, CPU seconds per thread group).
    fn finish(self) -> (u64, f64, Threads) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or((0, f64::NAN, Vec::new()))
    }
}

/// This bench binary, run as a bare amiquip loop.
fn spawn_child(args: &[String]) -> Child {
    let exe = std::env::current_exe().expect("the bench binary's path");
    Command::new(exe)
        .arg("--child")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the bench binary as a child")
}

/// What a child reported on its `RESULT` line.
#[derive(Clone, Debug, Default)]
struct ChildResult {
    count: u64,
    secs: f64,
    vm_hwm_kb: u64,
    cpu_secs: f64,
    threads: Threads,
}

fn child_result(child: Child) -> ChildResult {
    let output = child.wait_with_output().expect("wait for the child");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "child failed: {stdout}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("RESULT "))
        .unwrap_or_else(|| panic!("child printed no RESULT line: {stdout}"));
    let fields: std::collections::HashMap<&str, &str> = line
        .split_whitespace()
        .filter_map(|t| t.split_once('='))
        .collect();
    let num = |k: &str| {
        fields
            .get(k)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    ChildResult {
        count: num("count") as u64,
        secs: num("secs"),
        vm_hwm_kb: num("vmhwm_kb") as u64,
        cpu_secs: num("cpu_secs"),
        threads: fields
            .get("threads")
            .map(|t| {
                t.split(',')
                    .filter_map(|g| g.split_once(':'))
                    .filter_map(|(n, v)| Some((n.to_owned(), v.parse().ok()?)))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// A rate, a peak RSS and the process's CPU time.
#[derive(Clone, Debug)]
struct RateFigure {
    per_sec: f64,
    vm_hwm_kb: u64,
    /// User + system CPU of the whole process, start-up included.
    cpu_secs: f64,
    threads: Threads,
}

/// taskqueuer publishes `jobs` (as fast as it can); the rig keeps the full queue.
fn taskqueuer_publish(jobs: u64) -> (Rig, RateFigure) {
    let mut rig = Rig::new("tput-queuer", &rig_options(Some(jobs), 1_000_000.0));
    rig.start_queuer();
    let queuer = rig.queuer.as_mut().expect("queuer started");
    let sampler = ProcSampler::start(queuer.pid());
    let status = queuer.wait_exit(Duration::from_secs(600));
    let (vm_hwm_kb, cpu_secs, threads) = sampler.finish();
    assert!(status.success(), "taskqueuer failed: {}", queuer.log());
    let lines = stats_lines(&queuer.log(), "role=queuer");
    let published = lines.last().map_or(0, |l| l.get("published"));
    assert_eq!(published, jobs, "taskqueuer published all jobs");
    let per_sec = steady_rate(&lines, "published", jobs);
    rig.queuer = None;
    (
        rig,
        RateFigure {
            per_sec,
            vm_hwm_kb,
            cpu_secs,
            threads,
        },
    )
}

/// The bare publisher (in a child) publishes `jobs`; the rig keeps the full queue.
fn bare_publish(jobs: u64) -> (Rig, RateFigure) {
    let rig = Rig::new("tput-bare", &rig_options(None, 0.0));
    let child = spawn_child(&[
        "publish".into(),
        rig.queue.clone(),
        jobs.to_string(),
        CONFIRM_WINDOW.to_string(),
    ]);
    let result = child_result(child);
    (
        rig,
        RateFigure {
            per_sec: result.count as f64 / result.secs,
            vm_hwm_kb: result.vm_hwm_kb,
            cpu_secs: result.cpu_secs,
            threads: result.threads,
        },
    )
}

fn wait_for_depth(rig: &Rig, jobs: u64) {
    wait_for_queue_depth(rig, &rig.queue, jobs);
}

fn wait_for_queue_depth(rig: &Rig, queue: &str, jobs: u64) {
    let depth = || u64::from(rig.broker.ready_count(queue));
    assert!(
        wait_until(Duration::from_secs(60), || depth() == jobs),
        "queue {queue} never held {jobs} jobs (it has {})",
        depth()
    );
}

/// taskworker consumes the `jobs` in the rig's queue.
fn taskworker_consume(rig: &mut Rig, jobs: u64) -> RateFigure {
    wait_for_depth(rig, jobs);
    rig.start_workers(1);
    let mut worker = rig.workers.pop().expect("worker started");
    let done = || {
        worker
            .last_line("stats role=worker")
            .and_then(|l| StatsLine::parse(&l))
            .is_some_and(|l| l.get("done") >= jobs)
    };
    assert!(
        wait_until(Duration::from_secs(600), done),
        "taskworker did not finish: {}",
        worker.log()
    );
    let vm_hwm_kb = proc::vm_hwm_kb(worker.pid()).unwrap_or(0);
    let cpu_secs = proc::cpu_secs(worker.pid()).unwrap_or(f64::NAN);
    let threads = proc::thread_cpu_secs(worker.pid());
    worker.signal(libc::SIGTERM);
    worker.wait_exit(DAEMON_WAIT);
    let lines = stats_lines(&worker.log(), "stats role=worker");
    RateFigure {
        per_sec: steady_rate(&lines, "done", jobs),
        vm_hwm_kb,
        cpu_secs,
        threads,
    }
}

/// The bare consumer (in a child) consumes the `jobs` in the rig's queue.
fn bare_consume(rig: &Rig, jobs: u64) -> RateFigure {
    wait_for_depth(rig, jobs);
    let child = spawn_child(&[
        "consume".into(),
        rig.queue.clone(),
        jobs.to_string(),
        PREFETCH.to_string(),
    ]);
    let result = child_result(child);
    RateFigure {
        per_sec: (result.count - 1) as f64 / result.secs,
        vm_hwm_kb: result.vm_hwm_kb,
        cpu_secs: result.cpu_secs,
        threads: result.threads,
    }
}

/// Who consumes at the steady rate.
#[derive(Clone, Copy, Debug)]
enum SteadyConsumer {
    Taskworker,
    /// A bare amiquip loop acking every `n`th delivery (with `multiple` when n > 1).
    Bare {
        ack_every: u32,
    },
}

impl SteadyConsumer {
    fn name(self) -> String {
        match self {
            SteadyConsumer::Taskworker => "taskworker".into(),
            SteadyConsumer::Bare { ack_every: 1 } => "bare amiquip, ack each".into(),
            SteadyConsumer::Bare { ack_every } => {
                format!("bare amiquip, ack_multiple every {ack_every}")
            }
        }
    }
}

struct CpuFigure {
    cpu_pct: f64,
    /// The same, per thread group.
    threads_pct: Threads,
    /// Context switches of the consumer's threads per job consumed.
    switches_per_job: f64,
    queuer_cpu_pct: f64,
    offered_per_sec: f64,
    depth_at_end: u32,
}

fn cpu_at_steady_rate(consumer: SteadyConsumer, warmup: Duration, window: Duration) -> CpuFigure {
    let mut rig = Rig::new("tput-cpu", &rig_options(None, STEADY_RATE));
    let mut child = None;
    let pid = match consumer {
        SteadyConsumer::Taskworker => {
            rig.start_workers(1);
            rig.workers[0].pid()
        }
        SteadyConsumer::Bare { ack_every } => {
            let secs = (warmup + window + Duration::from_secs(3)).as_secs_f64();
            let mut spawned = spawn_child(&[
                "steady".into(),
                rig.queue.clone(),
                format!("{secs}"),
                PREFETCH.to_string(),
                ack_every.to_string(),
            ]);
            let mut stdout = BufReader::new(spawned.stdout.take().expect("stdout is piped"));
            let mut line = String::new();
            stdout
                .read_line(&mut line)
                .expect("read the child's READY line");
            assert_eq!(line.trim(), "READY", "the steady child started");
            // Keep reading, so the child's last line does not meet a closed pipe.
            std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
            let pid = spawned.id() as i32;
            child = Some(spawned);
            pid
        }
    };
    rig.start_queuer();
    let queuer_pid = rig.queuer.as_ref().expect("queuer started").pid();
    std::thread::sleep(warmup);
    let (t0, cpu0, qcpu0, switches0) = (
        Instant::now(),
        proc::cpu_secs(pid).unwrap_or(f64::NAN),
        proc::cpu_secs(queuer_pid).unwrap_or(f64::NAN),
        proc::context_switches(pid).unwrap_or(0),
    );
    let threads0 = proc::thread_cpu_secs(pid);
    let queuer_before = rig.snapshot().queuer;
    std::thread::sleep(window);
    let (t1, cpu1, qcpu1, switches1) = (
        Instant::now(),
        proc::cpu_secs(pid).unwrap_or(f64::NAN),
        proc::cpu_secs(queuer_pid).unwrap_or(f64::NAN),
        proc::context_switches(pid).unwrap_or(0),
    );
    let threads1 = proc::thread_cpu_secs(pid);
    let after = rig.snapshot();
    let secs = t1.duration_since(t0).as_secs_f64();
    let offered_per_sec = match (queuer_before, after.queuer) {
        (Some(a), Some(b)) if b.at_ms > a.at_ms => {
            (b.get("published") - a.get("published")) as f64 / ((b.at_ms - a.at_ms) as f64 / 1000.0)
        }
        _ => f64::NAN,
    };
    if let Some(mut queuer) = rig.queuer.take() {
        queuer.signal(libc::SIGTERM);
        queuer.wait_exit(DAEMON_WAIT);
    }
    for mut worker in rig.workers.drain(..) {
        worker.signal(libc::SIGTERM);
        worker.wait_exit(DAEMON_WAIT);
    }
    if let Some(mut child) = child {
        let _ = child.wait();
    }
    CpuFigure {
        cpu_pct: (cpu1 - cpu0) / secs * 100.0,
        threads_pct: thread_delta(&threads0, &threads1)
            .into_iter()
            .map(|(n, s)| (n, s / secs * 100.0))
            .collect(),
        switches_per_job: switches1.saturating_sub(switches0) as f64 / (offered_per_sec * secs),
        queuer_cpu_pct: (qcpu1 - qcpu0) / secs * 100.0,
        offered_per_sec,
        depth_at_end: after.depth,
    }
}

/// Consumption of a pre-filled queue, timed from the moment the queue starts to shrink until
/// `done` says the last job finished; CPU of the consumer's process tree over the same span.
struct Consumption {
    name: &'static str,
    jobs: u64,
    secs: f64,
    cpu_secs: f64,
}

impl Consumption {
    fn per_sec(&self) -> f64 {
        self.jobs as f64 / self.secs
    }

    fn cpu_per_10k(&self) -> f64 {
        self.cpu_secs / self.jobs as f64 * 10_000.0
    }
}

fn measure_consumption(
    name: &'static str,
    rig: &Rig,
    queue: &str,
    jobs: u64,
    pid: i32,
    mut done: impl FnMut() -> bool,
) -> Consumption {
    let mut start = None;
    let started = wait_until(Duration::from_secs(120), || {
        if u64::from(rig.broker.ready_count(queue)) < jobs {
            start = Some((Instant::now(), proc::tree_cpu_secs(pid)));
            true
        } else {
            false
        }
    });
    assert!(started, "{name} never started consuming from {queue}");
    let (t0, cpu0) = start.expect("set when started");
    assert!(
        wait_until(Duration::from_secs(1_200), &mut done),
        "{name} did not finish {jobs} jobs"
    );
    let secs = t0.elapsed().as_secs_f64();
    let cpu_secs = proc::tree_cpu_secs(pid) - cpu0;
    Consumption {
        name,
        jobs,
        secs,
        cpu_secs,
    }
}

/// The venv with pika and Celery, made when missing.
fn python_venv(settings: &Settings) -> Result<PathBuf, String> {
    let venv = settings.out_dir.join("venv");
    let python = venv.join("bin").join("python");
    let ready = |python: &Path| {
        Command::new(python)
            .args(["-c", "import pika, celery"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if ready(&python) {
        return Ok(venv);
    }
    println!(
        "making a Python venv with pika and Celery in {}",
        venv.display()
    );
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .map_err(|e| format!("python3 -m venv: {e}"))?;
    if !made.success() {
        return Err(format!("python3 -m venv {} failed: {made}", venv.display()));
    }
    let pip = Command::new(venv.join("bin").join("pip"))
        .args(["install", "--quiet", "pika", "celery"])
        .status()
        .map_err(|e| format!("pip install pika celery: {e}"))?;
    if !pip.success() || !ready(&python) {
        return Err(format!("pip install pika celery failed: {pip}"));
    }
    Ok(venv)
}

fn python_dir() -> PathBuf {
    harness::repo_root().join("bench").join("python")
}

/// Fills a fresh queue with `jobs` zero-work jobs, using the bare publisher.
fn filled_queue(what: &str, jobs: u64) -> Rig {
    let rig = Rig::new(what, &rig_options(None, 0.0));
    let child = spawn_child(&[
        "publish".into(),
        rig.queue.clone(),
        jobs.to_string(),
        CONFIRM_WINDOW.to_string(),
    ]);
    child_result(child);
    wait_for_depth(&rig, jobs);
    rig
}

fn taskworker_consumption(jobs: u64) -> Consumption {
    let mut rig = filled_queue("py-taskworker", jobs);
    rig.start_workers(1);
    let mut worker = rig.workers.pop().expect("worker started");
    let queue = rig.queue.clone();
    let figure = measure_consumption("taskworker", &rig, &queue, jobs, worker.pid(), || {
        worker
            .last_line("stats role=worker")
            .and_then(|l| StatsLine::parse(&l))
            .is_some_and(|l| l.get("done") >= jobs)
    });
    worker.signal(libc::SIGTERM);
    worker.wait_exit(DAEMON_WAIT);
    figure
}

fn pika_consumption(venv: &Path, jobs: u64) -> Consumption {
    let rig = filled_queue("py-pika", jobs);
    let mut child = Command::new(venv.join("bin").join("python"))
        .arg(python_dir().join("pika_consumer.py"))
        // Leave no __pycache__ beside the scripts.
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .args(["--url", &support::broker::amqp_url(), "--queue", &rig.queue])
        .args([
            "--count",
            &jobs.to_string(),
            "--prefetch",
            &PREFETCH.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start pika_consumer.py");
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = crossbeam_channel::unbounded();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let queue = rig.queue.clone();
    let figure = measure_consumption("pika", &rig, &queue, jobs, child.id() as i32, || {
        rx.try_iter().any(|l| l.starts_with("done"))
    });
    drop(child.stdin.take());
    let _ = child.wait();
    figure
}

fn celery_consumption(venv: &Path, jobs: u64, settings: &Settings) -> Result<Consumption, String> {
    let mut rig = Rig::new("py-celery", &rig_options(None, 0.0));
    // Celery declares its own queue (durable, with a direct exchange of the same name).
    let queue = support::broker::unique_name("celery");
    rig.broker.owns_queue(&queue);
    let marker = settings.out_dir.join(format!("{queue}.done"));
    let _ = std::fs::remove_file(&marker);
    let url = support::broker::amqp_url();
    let env = [
        ("BENCH_AMQP_URL", url.as_str()),
        ("BENCH_QUEUE", queue.as_str()),
        ("BENCH_JOBS", &jobs.to_string()),
        ("BENCH_MARKER", &marker.display().to_string()),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()));
    let python = venv.join("bin").join("python");
    let published = Command::new(&python)
        .arg("celery_publish.py")
        // Leave no __pycache__ beside the scripts.
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .arg(jobs.to_string())
        .current_dir(python_dir())
        .envs(env.clone())
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("running celery_publish.py: {e}"))?;
    if !published.success() {
        return Err(format!("celery_publish.py failed: {published}"));
    }
    wait_for_queue_depth(&rig, &queue, jobs);
    let mut worker = Command::new(venv.join("bin").join("celery"))
        .args([
            "-A",
            "celery_app",
            "worker",
            "--pool=prefork",
            "--concurrency=2",
        ])
        .args(["--loglevel=WARNING", "--without-gossip", "--without-mingle"])
        .args(["--without-heartbeat", "-Q", &queue])
        .arg(format!("--hostname=bench-{}@localhost", std::process::id()))
        .current_dir(python_dir())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .envs(env)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting the Celery worker: {e}"))?;
    let pid = worker.id() as i32;
    let figure = measure_consumption("Celery", &rig, &queue, jobs, pid, || marker.exists());
    // Warm shutdown; the pool processes exit with it.
    // SAFETY: kill(2) on our own child's pid has no memory effects.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let stopped = wait_until(Duration::from_secs(60), || {
        worker.try_wait().ok().flatten().is_some()
    });
    if !stopped {
        let _ = worker.kill();
        let _ = worker.wait();
    }
    let _ = std::fs::remove_file(&marker);
    if let Ok(mut connection) = amiquip::Connection::insecure_open(&url) {
        if let Ok(channel) = connection.open_channel(None) {
            let _ = channel.queue_delete(queue.clone(), amiquip::QueueDeleteOptions::default());
            let _ = channel.exchange_delete(queue.clone(), false);
        }
        let _ = connection.close();
    }
    Ok(figure)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--child") {
        child::main(&args[1..]);
        return;
    }
    let settings = Settings::from_args();
    let jobs = harness::env_count("FLAGSHED_BENCH_JOBS").unwrap_or(if settings.quick {
        10_000
    } else {
        100_000
    });
    let py_jobs = harness::env_count("FLAGSHED_BENCH_PY_JOBS").unwrap_or(if settings.quick {
        5_000
    } else {
        50_000
    });
    let reps =
        harness::env_count("FLAGSHED_BENCH_REPS").unwrap_or(if settings.quick { 1 } else { 5 });
    let window = harness::env_secs("FLAGSHED_BENCH_SECS")
        .unwrap_or(Duration::from_secs(if settings.quick { 4 } else { 10 }));
    let warmup = Duration::from_secs(3);
    let mut markdown = String::new();

    // 1. Rates.
    println!(
        "throughput: {jobs} zero-work jobs per measurement, prefetch {PREFETCH}, confirm window {CONFIRM_WINDOW}, {reps} repetitions (median)"
    );
    // Within a repetition the two sides run back to back, first one then the other, and the
    // order alternates, so drifting background load on a shared machine hits both alike.
    let mut figures: [Vec<RateFigure>; 4] = Default::default();
    let mut ratios: [Vec<f64>; 2] = Default::default();
    for rep in 1..=reps {
        let flagshed_first = rep % 2 == 1;
        let (mut flag_rig, queuer, bare_rig, bare_pub) = if flagshed_first {
            let (flag_rig, queuer) = taskqueuer_publish(jobs);
            let (bare_rig, bare_pub) = bare_publish(jobs);
            (flag_rig, queuer, bare_rig, bare_pub)
        } else {
            let (bare_rig, bare_pub) = bare_publish(jobs);
            let (flag_rig, queuer) = taskqueuer_publish(jobs);
            (flag_rig, queuer, bare_rig, bare_pub)
        };
        let (worker, bare_con) = if flagshed_first {
            let worker = taskworker_consume(&mut flag_rig, jobs);
            (worker, bare_consume(&bare_rig, jobs))
        } else {
            let bare_con = bare_consume(&bare_rig, jobs);
            (taskworker_consume(&mut flag_rig, jobs), bare_con)
        };
        drop((flag_rig, bare_rig));
        println!(
            "  rep {rep}: taskworker {:.0}/s vs bare consumer {:.0}/s ({:.2}); taskqueuer {:.0}/s vs bare publisher {:.0}/s ({:.2})",
            worker.per_sec,
            bare_con.per_sec,
            worker.per_sec / bare_con.per_sec,
            queuer.per_sec,
            bare_pub.per_sec,
            queuer.per_sec / bare_pub.per_sec
        );
        ratios[0].push(worker.per_sec / bare_con.per_sec);
        ratios[1].push(queuer.per_sec / bare_pub.per_sec);
        for (list, figure) in figures.iter_mut().zip([worker, bare_con, queuer, bare_pub]) {
            list.push(figure);
        }
    }
    let med = |i: usize| median(&figures[i].iter().map(|f| f.per_sec).collect::<Vec<_>>());
    let rss = |i: usize| figures[i].iter().map(|f| f.vm_hwm_kb).max().unwrap_or(0) as f64 / 1024.0;
    let cpu_us = |i: usize| {
        median(&figures[i].iter().map(|f| f.cpu_secs).collect::<Vec<_>>()) / jobs as f64 * 1e6
    };
    let mut rates = Table::new(&[
        "what",
        "flagshed jobs/s",
        "bare amiquip jobs/s",
        "ratio (median of reps)",
        "target",
        "flagshed CPU us/job",
        "bare CPU us/job",
        "flagshed peak RSS MiB",
        "bare peak RSS MiB",
    ]);
    let verdict = |ratio: f64| {
        if ratio >= TARGET_RATIO {
            format!(">= {TARGET_RATIO}: PASS")
        } else {
            format!(">= {TARGET_RATIO}: MISS")
        }
    };
    for (k, what, flag, bare) in [
        (0, "consume + ack (taskworker)", 0, 1),
        (1, "confirmed publish (taskqueuer)", 2, 3),
    ] {
        let ratio = median(&ratios[k]);
        rates.row(vec![
            what.to_owned(),
            format!("{:.0}", med(flag)),
            format!("{:.0}", med(bare)),
            fmt2(ratio),
            verdict(ratio),
            fmt1(cpu_us(flag)),
            fmt1(cpu_us(bare)),
            fmt1(rss(flag)),
            fmt1(rss(bare)),
        ]);
    }
    println!();
    print!("{}", rates.to_text());
    settings.write("throughput-rates.csv", &rates.to_csv());
    markdown.push_str(&rates.to_markdown());
    let mut threads = Table::new(&[
        "process (last repetition)",
        "CPU us/job",
        "main thread",
        "pool threads",
        "amiquip-io",
        "other threads",
    ]);
    for (name, i) in [
        ("taskworker", 0),
        ("bare consumer", 1),
        ("taskqueuer", 2),
        ("bare publisher", 3),
    ] {
        let Some(figure) = figures[i].last() else {
            continue;
        };
        let us = |secs: f64| fmt1(secs / jobs as f64 * 1e6);
        threads.row(vec![
            name.to_owned(),
            us(figure.cpu_secs),
            us(group_secs(&figure.threads, "main")),
            us(group_secs(&figure.threads, "pool")),
            us(group_secs(&figure.threads, "amiquip-io")),
            us(other_secs(&figure.threads)),
        ]);
    }
    println!("\nwhere the CPU goes, us per job (whole process life, start-up included):");
    print!("{}", threads.to_text());
    settings.write("throughput-threads.csv", &threads.to_csv());
    markdown.push('\n');
    markdown.push_str(&threads.to_markdown());

    // 2. CPU at a steady rate.
    println!(
        "\nCPU at a steady {STEADY_RATE} jobs/s (fed by taskqueuer), {} s window after {} s warm-up, % of one core",
        window.as_secs_f64(),
        warmup.as_secs_f64()
    );
    let mut cpu = Table::new(&[
        "consumer",
        "CPU % of one core",
        "main thread %",
        "pool threads %",
        "amiquip-io %",
        "other threads %",
        "context switches per job",
        "offered jobs/s",
        "queue depth at end",
        "taskqueuer CPU %",
    ]);
    // Each repetition measures the three consumers in a rotated order; each figure is the
    // median over repetitions, and the ratio the median of the repetitions' ratios.
    let consumers = [
        SteadyConsumer::Taskworker,
        SteadyConsumer::Bare { ack_every: 1 },
        SteadyConsumer::Bare {
            ack_every: u32::from(PREFETCH),
        },
    ];
    let mut steady: Vec<Vec<CpuFigure>> = consumers.iter().map(|_| Vec::new()).collect();
    let mut cpu_ratios = Vec::new();
    for rep in 0..reps as usize {
        for k in 0..consumers.len() {
            let i = (k + rep) % consumers.len();
            steady[i].push(cpu_at_steady_rate(consumers[i], warmup, window));
        }
        let last = |i: usize| steady[i].last().map_or(f64::NAN, |f| f.cpu_pct);
        let ratio = last(0) / last(2);
        println!(
            "  rep {}: taskworker {:.2}%, bare ack each {:.2}%, bare batched {:.2}% ({ratio:.2}x)",
            rep + 1,
            last(0),
            last(1),
            last(2)
        );
        cpu_ratios.push(ratio);
    }
    for (consumer, figures) in consumers.iter().zip(&steady) {
        let med =
            |f: &dyn Fn(&CpuFigure) -> f64| median(&figures.iter().map(f).collect::<Vec<_>>());
        cpu.row(vec![
            consumer.name(),
            fmt2(med(&|f| f.cpu_pct)),
            fmt2(med(&|f| group_secs(&f.threads_pct, "main"))),
            fmt2(med(&|f| group_secs(&f.threads_pct, "pool"))),
            fmt2(med(&|f| group_secs(&f.threads_pct, "amiquip-io"))),
            fmt2(med(&|f| other_secs(&f.threads_pct))),
            fmt1(med(&|f| f.switches_per_job)),
            fmt1(med(&|f| f.offered_per_sec)),
            figures
                .iter()
                .map(|f| f.depth_at_end)
                .max()
                .unwrap_or(0)
                .to_string(),
            fmt2(med(&|f| f.queuer_cpu_pct)),
        ]);
    }
    print!("{}", cpu.to_text());
    let cpu_ratio = median(&cpu_ratios);
    println!(
        "  {} taskworker CPU at {STEADY_RATE} jobs/s: {cpu_ratio:.2}x the bare loop acking every {PREFETCH}th (median of {reps}; target <= {TARGET_CPU_RATIO}x)",
        if cpu_ratio <= TARGET_CPU_RATIO {
            "PASS"
        } else {
            "MISS"
        },
    );
    settings.write("throughput-cpu.csv", &cpu.to_csv());
    markdown.push('\n');
    markdown.push_str(&cpu.to_markdown());

    // 3. Python.
    println!("\nwhy not Celery: {py_jobs} zero-work jobs each, prefetch {PREFETCH}");
    let mut consumptions = vec![taskworker_consumption(py_jobs)];
    let mut python_note = String::new();
    match python_venv(&settings) {
        Ok(venv) => {
            consumptions.push(pika_consumption(&venv, py_jobs));
            match celery_consumption(&venv, py_jobs, &settings) {
                Ok(c) => consumptions.push(c),
                Err(why) => python_note = format!("Celery could not be measured: {why}"),
            }
        }
        Err(why) => python_note = format!("no Python comparison: {why}"),
    }
    let base = &consumptions[0];
    let mut py = Table::new(&[
        "consumer",
        "jobs",
        "jobs/s",
        "x taskworker",
        "CPU s per 10k jobs",
        "x taskworker",
    ]);
    for c in &consumptions {
        py.row(vec![
            c.name.to_owned(),
            c.jobs.to_string(),
            format!("{:.0}", c.per_sec()),
            fmt2(c.per_sec() / base.per_sec()),
            fmt2(c.cpu_per_10k()),
            fmt1(c.cpu_per_10k() / base.cpu_per_10k()),
        ]);
    }
    print!("{}", py.to_text());
    if !python_note.is_empty() {
        println!("{python_note}");
    }
    println!(
        "  (jobs/s from the first job taken to the last one finished; CPU = user + system of the \
         consumer's process tree over the same span)"
    );
    settings.write("throughput-python.csv", &py.to_csv());
    markdown.push('\n');
    markdown.push_str(&py.to_markdown());
    settings.write("throughput.md", &markdown);
    println!("CSV and markdown files in {}", settings.out_dir.display());
}

/// The bare amiquip loops, run in a child process: `--child publish|consume|steady ...`.
mod child {
    use super::*;
    use flagshed::config::Config;

    fn session(queue: &str) -> flagshed::broker::Session {
        let text = format!(
            "[broker]\nurl = {}\nqueue = {}\ndurable = false\n",
            support::daemon::toml_str(&support::broker::amqp_url()),
            support::daemon::toml_str(queue)
        );
        let config = Config::parse(Path::new("bench.toml"), &text).expect("a valid bench config");
        flagshed::broker::connect(&config.broker, &config.broker.addresses[0], "bench-bare")
            .expect("connect to RabbitMQ")
    }

    fn report(count: u64, secs: f64) {
        let pid = std::process::id() as i32;
        let hwm = proc::vm_hwm_kb(pid).unwrap_or(0);
        let cpu = proc::cpu_secs(pid).unwrap_or(f64::NAN);
        let threads: Vec<String> = proc::thread_cpu_secs(pid)
            .iter()
            .map(|(name, secs)| format!("{}:{secs:.3}", name.replace([' ', ',', ':'], "_")))
            .collect();
        println!(
            "RESULT count={count} secs={secs:.6} vmhwm_kb={hwm} cpu_secs={cpu:.3} threads={}",
            threads.join(",")
        );
    }

    fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> T {
        args.get(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("child argument {i} ({what}) missing or invalid: {args:?}"))
    }

    pub fn main(args: &[String]) {
        match args.first().map(String::as_str) {
            Some("publish") => publish(
                &arg::<String>(args, 1, "queue"),
                arg(args, 2, "jobs"),
                arg(args, 3, "window"),
            ),
            Some("consume") => consume(
                &arg::<String>(args, 1, "queue"),
                arg(args, 2, "jobs"),
                arg(args, 3, "prefetch"),
            ),
            Some("steady") => steady(
                &arg::<String>(args, 1, "queue"),
                arg(args, 2, "seconds"),
                arg(args, 3, "prefetch"),
                arg(args, 4, "ack every"),
            ),
            _ => panic!("unknown child mode: {args:?}"),
        }
    }

    /// Publishes `jobs` messages shaped as taskqueuer's, with up to `window` awaiting a confirm.
    fn publish(queue: &str, jobs: u64, window: u64) {
        let session = session(queue);
        let confirms = session
            .channel
            .listen_for_publisher_confirms()
            .expect("listen for confirms");
        session
            .channel
            .enable_publisher_confirms()
            .expect("enable confirms");
        let body = vec![b'.'; PAYLOAD_BYTES];
        let expiration = TTL_MS.to_string();
        let prefix = format!("bench-{}", std::process::id());
        let mut smoother = ConfirmSmoother::new();
        let (mut sent, mut confirmed) = (0u64, 0u64);
        let start = Instant::now();
        while confirmed < jobs {
            while sent < jobs && sent - confirmed < window {
                sent += 1;
                let created = flagshed::clock::now_ms();
                let mut headers = FieldTable::new();
                headers.insert(
                    "x-created-ms".into(),
                    AmqpValue::LongLongInt(created as i64),
                );
                headers.insert(
                    "x-deadline-ms".into(),
                    AmqpValue::LongLongInt((created + TTL_MS) as i64),
                );
                headers.insert("x-work-ms".into(), AmqpValue::LongLongInt(0));
                let properties = AmqpProperties::default()
                    .with_message_id(format!("{prefix}-{sent}"))
                    .with_headers(headers)
                    .with_expiration(expiration.clone())
                    .with_delivery_mode(2)
                    .with_content_type("application/octet-stream".into())
                    .with_timestamp(created / 1000);
                session
                    .channel
                    .basic_publish("", Publish::with_properties(&body, queue, properties))
                    .expect("publish");
            }
            let confirm = confirms.recv().expect("confirm channel open");
            for one in std::iter::once(confirm).chain(confirms.try_iter()) {
                for c in smoother.process(one) {
                    assert!(matches!(c, Confirm::Ack(_)), "the broker refused a publish");
                    confirmed += 1;
                }
            }
        }
        let secs = start.elapsed().as_secs_f64();
        report(confirmed, secs);
        session.close();
    }

    /// Consumes and acks `jobs` messages; times the first delivery to the last.
    fn consume(queue: &str, jobs: u64, prefetch: u16) {
        let session = session(queue);
        session
            .channel
            .qos(0, prefetch, false)
            .expect("set prefetch");
        let consumer = session
            .channel
            .basic_consume(queue, ConsumerOptions::default())
            .expect("start consuming");
        let mut count = 0u64;
        let mut first = None;
        for message in consumer.receiver().iter() {
            let ConsumerMessage::Delivery(delivery) = message else {
                panic!("consumer ended early: {message:?}");
            };
            first.get_or_insert_with(Instant::now);
            consumer.ack(delivery).expect("ack");
            count += 1;
            if count == jobs {
                break;
            }
        }
        let secs = first.map_or(0.0, |t| t.elapsed().as_secs_f64());
        report(count, secs);
        drop(consumer);
        session.close();
    }

    /// Consumes for `secs`, acking every `ack_every`th delivery (with `multiple`).
    fn steady(queue: &str, secs: f64, prefetch: u16, ack_every: u32) {
        let session = session(queue);
        session
            .channel
            .qos(0, prefetch, false)
            .expect("set prefetch");
        let consumer = session
            .channel
            .basic_consume(queue, ConsumerOptions::default())
            .expect("start consuming");
        println!("READY");
        let end = Instant::now() + Duration::from_secs_f64(secs);
        let mut count = 0u64;
        let mut unacked = 0u32;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match consumer.receiver().recv_timeout(left) {
                Ok(ConsumerMessage::Delivery(delivery)) => {
                    count += 1;
                    unacked += 1;
                    if ack_every <= 1 {
                        consumer.ack(delivery).expect("ack");
                        unacked = 0;
                    } else if unacked >= ack_every {
                        consumer.ack_multiple(delivery).expect("ack multiple");
                        unacked = 0;
                    }
                }
                Ok(other) => panic!("consumer ended early: {other:?}"),
                Err(_) => break,
            }
        }
        report(count, secs);
        drop(consumer);
        session.close();
    }
}
