//! The exec handler with real programs on the real broker: exit statuses, deadlines enforced on
//! whole process groups, bodies and output of any size, a clean environment, and work times
//! learned per job type. Every test checks the worker's ledger.

mod support;

use amiquip::{AmqpProperties, AmqpValue};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use support::broker::{TestBroker, now_ms, timing_headers, unique_name};
use support::daemon::{Bin, Daemon, Ledger, TempDir, TestConfig, toml_str};

const WAIT: Duration = Duration::from_secs(60);

/// Writes an executable `/bin/sh` script.
fn script(dir: &TempDir, name: &str, body: &str) -> PathBuf {
    let path = dir.write(name, &format!("#!/bin/sh\n{body}\n"));
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

/// A worker config running `command` as its exec handler.
fn exec_config(queue: &str, command: &[&str]) -> TestConfig {
    let argv: Vec<String> = command.iter().map(|a| toml_str(a)).collect();
    TestConfig::new(queue)
        .set("handler", "kind", "\"exec\"")
        .set("handler", "command", &format!("[{}]", argv.join(", ")))
}

fn job(id: &str) -> AmqpProperties {
    AmqpProperties::default().with_message_id(id.to_owned())
}

/// A job whose deadline is `in_ms` from now.
fn job_due(id: &str, in_ms: u64) -> AmqpProperties {
    job(id).with_headers(timing_headers(now_ms(), in_ms))
}

fn start(config: &Path) -> Daemon {
    let worker = Daemon::start(Bin::Worker, config);
    worker.wait_for_line("consuming from queue", WAIT);
    worker
}

#[test]
fn exit_statuses_map_to_outcomes_and_retries_are_bounded() {
    let mut broker = TestBroker::connect();
    let queue = unique_name("exec-exit");
    broker.owns_queue(&queue);
    let dir = TempDir::new("exec-exit");
    let exit_with = script(
        &dir,
        "exit-with.sh",
        r#"read what
case "$what" in
  kill) kill -KILL $$ ;;
  *) exit "$what" ;;
esac"#,
    );
    let audit = dir.path().join("audit");
    let config = exec_config(&queue, &[exit_with.to_str().expect("utf-8 path")])
        .set("handler", "max_retries", "2")
        .set("handler", "retry_delay_ms", "300")
        .set(
            "worker",
            "ledger_file",
            &toml_str(&audit.display().to_string()),
        )
        .write(&dir, "flagshed.toml");
    let mut worker = start(&config);
    for (id, body) in [
        ("ok", "0"),
        ("bad", "3"),
        ("later", "75"),
        ("killed", "kill"),
    ] {
        broker.publish_properties(&queue, job(id), body.as_bytes());
    }
    // Without an id, its retries are counted by its body.
    broker.publish_properties(&queue, AmqpProperties::default(), b"75");
    // "later" and the job without an id run three times each: two retries, then they fail.
    worker.wait_settled(9);
    let ledger = worker.stop();
    ledger.assert_balanced();
    assert_eq!(ledger.get("received"), 9, "{ledger:?}");
    assert_eq!(ledger.get("done"), 1, "{ledger:?}");
    assert_eq!(ledger.get("retried"), 4, "{ledger:?}");
    assert_eq!(ledger.get("failed"), 4, "{ledger:?}");
    assert_eq!(broker.ready_count(&queue), 0, "every job settled");
    let trail = std::fs::read_to_string(&audit).expect("audit trail");
    let records: Vec<(u64, String, String)> = trail
        .lines()
        .filter_map(|l| {
            let record: serde_json::Value = serde_json::from_str(l).ok()?;
            Some((
                record["ms"].as_u64()?,
                // A job without a message_id has a null id.
                record["id"].as_str().unwrap_or("-").to_owned(),
                record["state"].as_str()?.to_owned(),
            ))
        })
        .collect();
    // A retried job goes back to the queue (its line is written) only after the retry delay
    // that follows each run.
    let later: Vec<u64> = records
        .iter()
        .filter(|(_, id, state)| id == "later" && state == "retried")
        .map(|(at, _, _)| *at)
        .collect();
    assert_eq!(later.len(), 2, "{trail}");
    assert!(later.windows(2).all(|w| w[1] >= w[0] + 300), "{trail}");
    let mut states: Vec<(String, String)> = records
        .into_iter()
        .map(|(_, id, state)| (id, state))
        .collect();
    states.sort();
    let expected = [
        ("-", "failed"),
        ("-", "retried"),
        ("-", "retried"),
        ("bad", "failed"),
        ("killed", "failed"),
        ("later", "failed"),
        ("later", "retried"),
        ("later", "retried"),
        ("ok", "done"),
    ];
    assert_eq!(
        states,
        expected.map(|(id, state)| (id.to_owned(), state.to_owned())),
        "{trail}"
    );
}

/// Whether `pid` has ended (gone, or a zombie nobody has reaped yet).
fn has_ended(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// What became of the job's processes.
struct Stopped {
    /// From the deadline to the moment both processes had ended; `None` if either ended
    /// before it.
    ended_after: Option<Duration>,
    /// A line per process that received SIGTERM and ended by itself.
    terms: usize,
    ledger: Ledger,
    log: String,
}

/// Runs one job of a script that starts a grandchild and sleeps past the deadline. Both
/// processes note a SIGTERM in a file and end, unless `ignore_term`, when both ignore it.
fn stop_at_deadline(what: &str, ignore_term: bool, kill_grace_ms: u64) -> Stopped {
    let mut broker = TestBroker::connect();
    let queue = unique_name(what);
    broker.owns_queue(&queue);
    let dir = TempDir::new(what);
    let pids = dir.path().join("pids");
    let signals = dir.path().join("signals");
    let body = if ignore_term {
        // An ignored signal stays ignored across fork and exec: the grandchild ignores it too.
        "trap '' TERM\nsleep 60 &\necho \"$$ $!\" > \"$PIDS_FILE\"\nwait\nsleep 60".to_owned()
    } else {
        let note = r#"trap 'echo term >> "$SIGNALS_FILE"; exit 143' TERM"#;
        let child = script(&dir, "child.sh", &format!("{note}\nsleep 60 &\nwait"));
        format!(
            "{note}\n'{}' &\necho \"$$ $!\" > \"$PIDS_FILE\"\nwait\nsleep 60",
            child.display()
        )
    };
    let sleeper = script(&dir, "sleeper.sh", &body);
    let config = exec_config(&queue, &[sleeper.to_str().expect("utf-8 path")])
        .set(
            "handler",
            "env",
            &format!(
                "{{ PIDS_FILE = {}, SIGNALS_FILE = {} }}",
                toml_str(&pids.display().to_string()),
                toml_str(&signals.display().to_string())
            ),
        )
        .set("handler", "kill_grace_ms", &kill_grace_ms.to_string())
        // Budget little work for it, so that it starts rather than being dropped as doomed.
        .set("worker", "default_work_ms", "10")
        .write(&dir, "flagshed.toml");
    let mut worker = start(&config);
    // Room for both scripts to set their traps on a busy machine before the deadline.
    let deadline_in = 2_000;
    // Taken before the job's own deadline is: never later than it.
    let deadline = Instant::now() + Duration::from_millis(deadline_in);
    let properties = job_due("sleeper", deadline_in);
    broker.publish_properties(&queue, properties, b"");

    let started = Instant::now();
    let text = loop {
        match std::fs::read_to_string(&pids) {
            Ok(text) if text.ends_with('\n') => break text,
            _ if started.elapsed() > WAIT => panic!("no pids file; log:\n{}", worker.log()),
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let pids: Vec<i32> = text
        .split_whitespace()
        .map(|p| p.parse().expect("a pid"))
        .collect();
    assert_eq!(pids.len(), 2, "{text}");
    while !pids.iter().all(|&pid| has_ended(pid)) {
        assert!(started.elapsed() < WAIT, "processes still running");
        std::thread::sleep(Duration::from_millis(2));
    }
    let ended_after = Instant::now().checked_duration_since(deadline);
    worker.wait_settled(1);
    let ledger = worker.stop();
    ledger.assert_balanced();
    let terms = std::fs::read_to_string(&signals)
        .unwrap_or_default()
        .lines()
        .count();
    Stopped {
        ended_after,
        terms,
        ledger,
        log: worker.log(),
    }
}

#[test]
fn a_job_past_its_deadline_is_stopped_with_its_grandchildren() {
    let stopped = stop_at_deadline("exec-deadline", false, 60_000);
    assert_eq!(stopped.ledger.get("timed_out"), 1, "{:?}", stopped.ledger);
    // Both got SIGTERM and ended by themselves: SIGKILL, a minute later, was not needed.
    assert_eq!(stopped.terms, 2, "processes that noted SIGTERM");
    assert!(stopped.ended_after.is_some(), "stopped before the deadline");
    assert!(
        stopped
            .log
            .contains("job \"sleeper\" timed_out: stopped at its deadline after"),
        "{}",
        stopped.log
    );
}

#[test]
fn a_job_that_ignores_sigterm_is_killed_after_the_grace_period() {
    let grace_ms = 300;
    let stopped = stop_at_deadline("exec-ignores-term", true, grace_ms);
    assert_eq!(stopped.ledger.get("timed_out"), 1, "{:?}", stopped.ledger);
    assert_eq!(stopped.terms, 0);
    let ended_after = stopped.ended_after.expect("ended after the deadline");
    assert!(
        ended_after >= Duration::from_millis(grace_ms),
        "ended {ended_after:?} after the deadline: before SIGKILL was due"
    );
    // Without SIGKILL they would sleep for a minute: ending within seconds is its doing.
    assert!(
        ended_after < Duration::from_secs(30),
        "ended {ended_after:?} after the deadline"
    );
}

#[test]
fn large_bodies_reach_readers_and_do_not_block_on_children_that_never_read() {
    let mut broker = TestBroker::connect();
    let queue = unique_name("exec-body");
    broker.owns_queue(&queue);
    let dir = TempDir::new("exec-body");
    // Reads nothing, writes 1 MB: the worker must read the output while stdin is still full.
    let ignores = script(
        &dir,
        "ignores-stdin.sh",
        "if [ \"$FLAGSHED_JOB_ID\" = count ]; then exec wc -c; fi\nhead -c 1000000 /dev/zero",
    );
    let config = exec_config(&queue, &[ignores.to_str().expect("utf-8 path")])
        .set("handler", "output_limit_bytes", "100")
        .write(&dir, "flagshed.toml");
    let mut worker = start(&config);
    let body = vec![b'x'; 5 * 1024 * 1024];
    broker.publish_properties(&queue, job("ignore"), &body);
    broker.publish_properties(&queue, job("count"), &body);
    worker.wait_settled(2);
    let ledger = worker.stop();
    ledger.assert_balanced();
    assert_eq!(ledger.get("done"), 2, "{ledger:?}\n{}", worker.log());
    let log = worker.log();
    assert!(
        log.contains("job count stdout: 5242880"),
        "the whole body reached wc: {log}"
    );
}

#[test]
fn a_flood_of_output_is_logged_up_to_the_limit_and_counted() {
    let mut broker = TestBroker::connect();
    let queue = unique_name("exec-flood");
    broker.owns_queue(&queue);
    let dir = TempDir::new("exec-flood");
    let flood = script(
        &dir,
        "flood.sh",
        "yes flood | head -n 200000\necho oops >&2",
    );
    let config = exec_config(&queue, &[flood.to_str().expect("utf-8 path")])
        .set("handler", "output_limit_bytes", "1000")
        .set("handler", "output_limit_lines", "1000")
        .write(&dir, "flagshed.toml");
    let mut worker = start(&config);
    broker.publish_properties(&queue, job("flood"), b"");
    worker.wait_settled(1);
    let ledger = worker.stop();
    ledger.assert_balanced();
    assert_eq!(ledger.get("done"), 1, "{ledger:?}");
    let log = worker.log();
    // 1,000 bytes, newlines counted, are 166 lines of "flood" and the "flo" of the next; the
    // rest of the 1,200,000 bytes and stderr's "oops" are counted, not logged.
    assert_eq!(log.matches("job flood stdout: flood").count(), 166);
    assert!(log.contains("job flood stdout: flo\n"), "{log}");
    assert!(!log.contains("oops"), "{log}");
    assert!(
        log.contains("job flood: 1199005 more bytes of output not logged"),
        "{log}"
    );
}

#[test]
fn many_short_lines_are_bounded_in_number() {
    let mut broker = TestBroker::connect();
    let queue = unique_name("exec-lines");
    broker.owns_queue(&queue);
    let dir = TempDir::new("exec-lines");
    let lines = script(&dir, "lines.sh", "yes x | head -n 8192");
    // The defaults: 16 KiB and 100 lines.
    let config =
        exec_config(&queue, &[lines.to_str().expect("utf-8 path")]).write(&dir, "flagshed.toml");
    let mut worker = start(&config);
    broker.publish_properties(&queue, job("lines"), b"");
    worker.wait_settled(1);
    let ledger = worker.stop();
    ledger.assert_balanced();
    assert_eq!(ledger.get("done"), 1, "{ledger:?}");
    let log = worker.log();
    assert_eq!(log.matches("job lines stdout: x").count(), 100);
    assert!(
        log.contains("job lines: 16184 more bytes of output not logged"),
        "{log}"
    );
}

#[test]
fn a_command_that_cannot_run_is_a_config_error() {
    let dir = TempDir::new("exec-missing");
    let not_executable = dir.write("plain.txt", "echo hi\n");
    for program in [
        "/nonexistent/handler".to_owned(),
        "no-such-handler-anywhere".to_owned(),
        not_executable.display().to_string(),
    ] {
        let config = exec_config("q", &[&program]).write(&dir, "flagshed.toml");
        let out = Command::new(Bin::Worker.path())
            .arg("--check-config")
            .arg("--config")
            .arg(&config)
            .output()
            .expect("run taskworker");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{program}: {stderr}");
        assert!(stderr.contains("handler.command"), "{stderr}");
        assert!(stderr.contains(&config.display().to_string()), "{stderr}");
    }
}

#[test]
fn a_command_gone_at_run_time_fails_the_job_when_told_to_and_the_worker_goes_on() {
    let mut broker = TestBroker::connect();
    let queue = unique_name("exec-gone");
    broker.owns_queue(&queue);
    let dir = TempDir::new("exec-gone");
    let ok = script(&dir, "ok.sh", "exit 0");
    let config = exec_config(&queue, &[ok.to_str().expect("utf-8 path")])
        .set("handler", "when_unavailable", "\"fail\"")
        .write(&dir, "flagshed.toml");
    let mut worker = start(&config);
    std::fs::remove_file(&ok).expect("remove the handler");
    broker.publish_properties(&queue, job("first"), b"");
    worker.wait_settled(1);
    script(&dir, "ok.sh", "exit 0");
    broker.publish_properties(&queue, job("second"), b"");
    worker.wait_settled(2);
    let ledger = worker.stop();
    ledger.assert_balanced();
    assert_eq!(ledger.get("failed"), 1, "{ledger:?}");
    assert_eq!(ledger.get("done"), 1, "{ledger:?}");
    assert!(worker.log().contains("cannot run"), "{}", worker.log());
}

#[test]
fn a_script_whose_interpreter_is_missing_holds_intake_until_it_can_start() {
    let mut broker = TestBroker::connect();
    let queue = unique_name("exec-no-interpreter");
    broker.owns_queue(&queue);
    let dir = TempDir::new("exec-no-interpreter");
    // It passes the config check (an executable file) and then cannot be started.
    let handler = dir.write("handler.sh", "#!/nonexistent/interpreter\nexit 0\n");
    std::fs::set_permissions(&handler, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let config = exec_config(&queue, &[handler.to_str().expect("utf-8 path")])
        .set("worker", "concurrency", "2")
        .write(&dir, "flagshed.toml");
    let mut worker = start(&config);
    for i in 0..10 {
        broker.publish_properties(&queue, job(&format!("job-{i}")), b"");
    }
    let line = worker.wait_for_line("handler unavailable", WAIT);
    assert!(line.contains("cannot run"), "{line}");
    let held = worker.wait_for_new_stats(|s| s.get("in_flight") == 0);
    assert_eq!(held.get("failed"), 0, "{held:?}");
    assert_eq!(held.text("handler_unavailable"), "1", "{held:?}");
    // Deployed again, fixed: the probe finds it startable and intake resumes.
    script(&dir, "handler.sh", "exit 0");
    worker.wait_for_line("handler answers again", WAIT);
    worker.wait_for_stats(|s| s.get("done") == 10 && s.get("in_flight") == 0);
    let ledger = worker.stop();
    ledger.assert_balanced();
    assert_eq!(ledger.get("done"), 10, "{ledger:?}");
    assert_eq!(ledger.get("failed"), 0, "{ledger:?}");
    assert!(ledger.get("requeued") >= 1, "{ledger:?}");
    assert_eq!(broker.ready_count(&queue), 0);
}

/// How many failures of `cause` the log accounts for: lines logged one by one, and the
/// counts of those that were not.
fn failures_accounted(log: &str, cause: &str) -> u64 {
    let count_after = |line: &str, marker: &str| -> u64 {
        line.split_once(marker)
            .and_then(|(before, _)| before.rsplit(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let mut total = 0;
    for line in log.lines() {
        if line.contains(&format!("failed: {cause}")) {
            total += 1 + count_after(line, " more of this cause");
        }
        if line.contains(&format!("more failed jobs ({cause}) were not logged")) {
            total += count_after(line, " more failed jobs");
        }
    }
    total
}

#[test]
fn each_distinct_failure_is_logged_with_its_count() {
    let mut broker = TestBroker::connect();
    let queue = unique_name("exec-causes");
    broker.owns_queue(&queue);
    let dir = TempDir::new("exec-causes");
    let fail_with = script(
        &dir,
        "fail-with.sh",
        r#"read what
case "$what" in
  kill) kill -KILL $$ ;;
  segv) kill -SEGV $$ ;;
  *) exit "$what" ;;
esac"#,
    );
    let config = exec_config(&queue, &[fail_with.to_str().expect("utf-8 path")])
        .set("worker", "concurrency", "4")
        .write(&dir, "flagshed.toml");
    let mut worker = start(&config);
    let causes = [
        ("2", "exit status 2"),
        ("3", "exit status 3"),
        ("kill", "killed by signal 9"),
        ("segv", "killed by signal 11"),
    ];
    for round in 0..3 {
        for (body, _) in causes {
            let id = format!("{body}-{round}");
            broker.publish_properties(&queue, job(&id), body.as_bytes());
        }
    }
    worker.wait_settled(12);
    let ledger = worker.stop();
    ledger.assert_balanced();
    assert_eq!(ledger.get("failed"), 12, "{ledger:?}");
    let log = worker.log();
    for (_, cause) in causes {
        assert_eq!(failures_accounted(&log, cause), 3, "{cause}:\n{log}");
    }
}

#[test]
fn the_child_sees_the_jobs_facts_and_none_of_the_daemons_environment() {
    let mut broker = TestBroker::connect();
    let queue = unique_name("exec-env");
    broker.owns_queue(&queue);
    let dir = TempDir::new("exec-env");
    let env_file = dir.path().join("env");
    let dump = script(
        &dir,
        "dump.sh",
        "env > \"$ENV_FILE.tmp\" && mv \"$ENV_FILE.tmp\" \"$ENV_FILE\"",
    );
    let config = exec_config(&queue, &[dump.to_str().expect("utf-8 path")])
        .set(
            "handler",
            "env",
            &format!(
                "{{ ENV_FILE = {}, TENANT = \"acme\" }}",
                toml_str(&env_file.display().to_string())
            ),
        )
        .set("launchdarkly", "startup_wait_ms", "0")
        .set("launchdarkly", "stream_uri", "\"http://127.0.0.1:9\"")
        .set("launchdarkly", "base_uri", "\"http://127.0.0.1:9\"")
        .set("launchdarkly", "events_uri", "\"http://127.0.0.1:9\"")
        .write(&dir, "flagshed.toml");
    let secret = "sdk-test-secret-never-in-a-child";
    let creds = dir.path().join("creds");
    std::fs::create_dir_all(&creds).expect("credentials dir");
    let mut worker = Daemon::start_with_env(
        Bin::Worker,
        &config,
        &[
            ("LAUNCHDARKLY_SDK_KEY", secret),
            ("CREDENTIALS_DIRECTORY", creds.to_str().expect("utf-8")),
            ("FLAGSHED_TEST_MARKER", "daemon-only"),
        ],
    );
    worker.wait_for_line("consuming from queue", WAIT);
    let created = now_ms();
    let mut headers = timing_headers(created, 60_000);
    headers.insert("x-tenant".into(), AmqpValue::LongString("acme".into()));
    let properties = job("env-1")
        .with_type_("thumbnail".into())
        .with_headers(headers);
    broker.publish_properties(&queue, properties, b"");
    worker.wait_settled(1);
    let ledger = worker.stop();
    ledger.assert_balanced();
    assert_eq!(ledger.get("done"), 1, "{ledger:?}");

    let text = std::fs::read_to_string(&env_file).expect("the child wrote its environment");
    assert!(!text.contains(secret), "{text}");
    let vars: std::collections::BTreeMap<&str, &str> =
        text.lines().filter_map(|l| l.split_once('=')).collect();
    let mut names: Vec<&str> = vars.keys().copied().collect();
    // /bin/sh adds PWD (and may add SHLVL or OLDPWD) to what `env` prints.
    names.retain(|n| !matches!(*n, "PWD" | "SHLVL" | "OLDPWD" | "_"));
    assert_eq!(
        names,
        [
            "ENV_FILE",
            "FLAGSHED_CREATED_MS",
            "FLAGSHED_DEADLINE_MS",
            "FLAGSHED_JOB_ID",
            "FLAGSHED_JOB_JSON",
            "FLAGSHED_JOB_TYPE",
            "FLAGSHED_REDELIVERED",
            "FLAGSHED_TIME_LEFT_MS",
            "LANG",
            "PATH",
            "TENANT",
        ],
        "{text}"
    );
    assert_eq!(vars["FLAGSHED_JOB_ID"], "env-1");
    assert_eq!(vars["FLAGSHED_JOB_TYPE"], "thumbnail");
    assert_eq!(vars["FLAGSHED_CREATED_MS"], created.to_string());
    assert_eq!(vars["FLAGSHED_DEADLINE_MS"], (created + 60_000).to_string());
    assert_eq!(vars["FLAGSHED_REDELIVERED"], "0");
    assert_eq!(vars["TENANT"], "acme");
    let left: u64 = vars["FLAGSHED_TIME_LEFT_MS"].parse().expect("a number");
    assert!(left <= 60_000 && left > 0, "{left}");
    let meta: serde_json::Value = serde_json::from_str(vars["FLAGSHED_JOB_JSON"]).expect("JSON");
    assert_eq!(meta["headers"]["x-tenant"], "acme", "{meta}");
    assert_eq!(meta["properties"]["type"], "thumbnail", "{meta}");
}

#[test]
fn the_work_estimate_per_type_follows_a_change_in_work_time() {
    let mut broker = TestBroker::connect();
    let queue = unique_name("exec-estimate");
    broker.owns_queue(&queue);
    let dir = TempDir::new("exec-estimate");
    let sleeper = sleeper_script(&dir);
    let config = exec_config(&queue, &[sleeper.to_str().expect("utf-8 path")])
        .set("worker", "concurrency", "4")
        .set("worker", "estimate_quantile", "0.9")
        .set("worker", "estimate_min_jobs", "5")
        .set("worker", "estimate_half_life_jobs", "10")
        .write(&dir, "flagshed.toml");
    let mut worker = start(&config);
    let publish = |job_type: &str, ms: u64, count: usize| {
        for i in 0..count {
            let properties = job(&format!("{job_type}-{ms}-{i}")).with_type_(job_type.into());
            broker.publish_properties(&queue, properties, ms.to_string().as_bytes());
        }
    };
    publish("resize", 50, 20);
    publish("report", 300, 8);
    let stats = worker.wait_settled(28);
    let resize = stats.work_estimate_ms("resize").expect("resize estimated");
    let report = stats.work_estimate_ms("report").expect("report estimated");
    assert!((50..150).contains(&resize), "{stats:?}");
    assert!(report >= 300, "{stats:?}");
    publish("resize", 250, 20);
    let stats = worker.wait_settled(48);
    let resize_after = stats.work_estimate_ms("resize").expect("resize estimated");
    assert!(resize_after >= 250, "did not follow: {stats:?}");
    assert_eq!(
        stats.work_estimate_ms("report"),
        Some(report),
        "another type is not touched"
    );
    let ledger = worker.stop();
    ledger.assert_balanced();
    assert_eq!(ledger.get("done"), 48, "{ledger:?}");
}

/// A script that sleeps for the milliseconds in the job's body: work only the job knows.
fn sleeper_script(dir: &TempDir) -> PathBuf {
    script(
        dir,
        "sleep-ms.sh",
        r#"read ms
exec sleep "$(printf '%d.%03d' $((ms / 1000)) $((ms % 1000)))""#,
    )
}

/// A worker config that runs the sleeper script, learning work times quickly.
fn sleeper_worker(dir: &TempDir, queue: &str) -> TestConfig {
    let sleeper = sleeper_script(dir);
    exec_config(queue, &[sleeper.to_str().expect("utf-8 path")])
        .set("worker", "concurrency", "2")
        .set("worker", "default_work_ms", "100")
        .set("worker", "estimate_min_jobs", "5")
}

/// A job of `job_type` that sleeps `work_ms` and is due `ttl_ms` after now.
fn sleep_job(id: &str, job_type: &str, ttl_ms: u64) -> AmqpProperties {
    job_due(id, ttl_ms).with_type_(job_type.into())
}

#[test]
fn one_job_stopped_at_its_deadline_does_not_shut_its_type_out() {
    let mut broker = TestBroker::connect();
    let queue = unique_name("exec-censored");
    broker.owns_queue(&queue);
    let dir = TempDir::new("exec-censored");
    let config = sleeper_worker(&dir, &queue).write(&dir, "flagshed.toml");
    let mut worker = start(&config);
    // Jobs of 20 to 45 ms, in rounds of 20, each due 2 s after it is published.
    let mut published = 0;
    let mut publish_quick = |rounds: usize| {
        for _ in 0..rounds {
            for _ in 0..20 {
                let ms = 20 + (published * 7) % 25;
                let properties = sleep_job(&format!("quick-{published}"), "resize", 2_000);
                broker.publish_properties(&queue, properties, ms.to_string().as_bytes());
                published += 1;
            }
            worker.wait_settled(published as u64);
        }
    };
    publish_quick(3);
    // One that would take 5 s, stopped at its deadline after 1.5 s. All it shows is that it
    // needed more than 1.5 s: counted as twice that, it would put the estimate past the 2 s
    // deadline, and every later job would be doomed.
    broker.publish_properties(&queue, sleep_job("slow", "resize", 1_500), b"5000");
    let stats = worker.wait_for_stats(|s| s.get("timed_out") == 1 && s.get("in_flight") == 0);
    let estimate = stats.work_estimate_ms("resize").expect("resize estimated");
    assert!(
        estimate < 2_000,
        "one stopped job pushed the estimate past the deadline, to {estimate} ms: {stats:?}"
    );
    // The jobs after it still run, none doomed.
    publish_quick(1);
    let stats = worker.wait_settled(81);
    let estimate = stats.work_estimate_ms("resize").expect("resize estimated");
    assert!(estimate < 2_000, "estimate {estimate} ms: {stats:?}");
    let ledger = worker.stop();
    ledger.assert_balanced();
    assert_eq!(ledger.get("done"), 80, "{ledger:?}");
    assert_eq!(ledger.get("timed_out"), 1, "{ledger:?}");
    assert_eq!(ledger.get("doomed"), 0, "{ledger:?}");
}

#[test]
fn a_type_shut_out_by_a_slow_spell_runs_again_soon_after_the_work_is_quick() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    let mut broker = TestBroker::connect();
    let queue = unique_name("exec-shut-out");
    broker.owns_queue(&queue);
    let dir = TempDir::new("exec-shut-out");
    let config = sleeper_worker(&dir, &queue).write(&dir, "flagshed.toml");
    let mut worker = start(&config);
    // A steady 20 jobs/s due 1.5 s after creation, whose work the test switches.
    let work_ms = Arc::new(AtomicU64::new(3_000));
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (work_ms, stop, queue) = (Arc::clone(&work_ms), Arc::clone(&stop), queue.clone());
        std::thread::spawn(move || {
            let broker = TestBroker::connect();
            let mut published = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let ms = work_ms.load(Ordering::Relaxed);
                let properties = sleep_job(&format!("job-{published}"), "render", 1_500);
                broker.publish_properties(&queue, properties, ms.to_string().as_bytes());
                published += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            published
        })
    };
    // Every job needs 3 s: each is stopped at its deadline until the estimate, which counts
    // them as "longer than they ran", dooms them all, and only probes run.
    worker.wait_for_line("is shut out by its work estimate", WAIT);
    let shut_out = worker.wait_for_stats(|s| s.text("shut_out") == "render");
    assert!(shut_out.get("doomed") > 0, "{shut_out:?}");
    let from = worker.line_count();
    let quick_since = Instant::now();
    work_ms.store(100, Ordering::Relaxed);
    let (_, line) = worker.wait_for_line_from(from, "runs jobs again", WAIT);
    let back_after = quick_since.elapsed();
    assert!(
        back_after <= Duration::from_secs(10),
        "back after {back_after:?}: {line}"
    );
    // And it does run them: more jobs done, in time.
    let before = worker.wait_for_new_stats(|_| true).get("done");
    worker.wait_for_new_stats(|s| s.get("done") >= before + 20);
    stop.store(true, Ordering::Relaxed);
    let published = publisher.join().expect("publisher");
    let ledger = worker.wait_settled(published);
    assert_eq!(ledger.get("received"), published, "{ledger:?}");
    let ledger = worker.stop();
    ledger.assert_balanced();
}
