//! Fault injection: real daemons, the real broker, steady load, one fault at a time, then an
//! audit of every job id the queuer had confirmed.
//!
//! These tests restart the broker and kill processes, which would disturb any other test
//! sharing the broker, so they are `#[ignore]`d in the ordinary run and run one at a time by
//! `make chaos` (`cargo test --test chaos -- --ignored --test-threads=1`), which CI runs after
//! `make test`.
//!
//! The audit: the queuer's ledger file lists every confirmed job id; the workers' ledger files
//! list every job they settled and how; whatever is neither was expired by RabbitMQ (it is in
//! the dead-letter queue) or is still in the queue. Zero may be lost, and a job may appear
//! twice in the workers' ledgers only if it was in flight at the fault: held by a worker that
//! was killed, or acked while the broker was stopping, which drops acks it has not processed
//! and puts those jobs back in the queue. Either way at most a prefetch's worth (8).

mod support;

use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::broker::{TestBroker, death_reason, unique_name};
use support::daemon::{
    Bin, Daemon, Ledger, TempDir, TestConfig, final_states, ledger_lines, toml_str,
};
use support::fake_ld::{FakeLd, number_flag};

const WAIT: Duration = Duration::from_secs(90);

/// Where a scenario's daemons get their flags.
enum Flags<'a> {
    /// A local flag file: task-rate 60, skip-rate 10.
    File,
    /// LaunchDarkly at `uri`, optionally with a state file written by an earlier run.
    LaunchDarkly {
        uri: &'a str,
        state: Option<serde_json::Value>,
    },
}

/// One fault-injection scenario's world: a durable queue with a dead-letter queue, a flag
/// source, a config with ledger files, and the daemons.
struct Scenario {
    /// Holds the config, flag and ledger files; removed when the scenario ends.
    _dir: TempDir,
    queue: String,
    dlx: String,
    dead: String,
    config: PathBuf,
    worker_ledger: PathBuf,
    queuer_ledger: PathBuf,
}

impl Scenario {
    fn new(what: &str, flags: Flags<'_>) -> Scenario {
        let mut broker = TestBroker::connect();
        let queue = unique_name(what);
        let (dlx, dead) = broker.dead_letter_pair_with(what, true);
        // The queue and the dead-letter pair outlive this connection (a broker restart kills
        // it); `Drop` for Scenario deletes them through a fresh one.
        broker.close_keeping_topology();
        let dir = TempDir::new(what);
        let worker_ledger = dir.path().join("worker-ledger.txt");
        let queuer_ledger = dir.path().join("queuer-ledger.txt");
        let config = TestConfig::new(&queue);
        let config = match flags {
            Flags::File => {
                let file = dir.write(
                    "flags.json",
                    r#"{"flagValues": {"task-rate": 60, "skip-rate": 10}}"#,
                );
                config.set("flags", "file", &toml_str(&file.display().to_string()))
            }
            Flags::LaunchDarkly { uri, state } => {
                let state_file = dir.path().join("flags-state.json");
                if let Some(state) = state {
                    dir.write("flags-state.json", &state.to_string());
                }
                config
                    .set("launchdarkly", "sdk_key", "\"sdk-chaos-key\"")
                    .set("launchdarkly", "stream_uri", &toml_str(uri))
                    .set("launchdarkly", "base_uri", &toml_str(uri))
                    .set("launchdarkly", "events_uri", &toml_str(uri))
                    .set("launchdarkly", "startup_wait_ms", "2000")
                    .set(
                        "launchdarkly",
                        "state_file",
                        &toml_str(&state_file.display().to_string()),
                    )
                    .set("flags", "rate_fallback", "60.0")
                    .set("flags", "skip_rate_fallback", "10.0")
            }
        };
        let config = config
            .set("broker", "durable", "true")
            .set("broker", "dead_letter_exchange", &toml_str(&dlx))
            .set("broker", "heartbeat_secs", "5")
            .set("queuer", "ttl_ms", "20000")
            .set("queuer", "work_ms", "40")
            .set("queuer", "persistent", "true")
            .set("worker", "concurrency", "4")
            .set("worker", "prefetch", "8")
            .set("worker", "drain_grace_ms", "10000")
            .set(
                "worker",
                "ledger_file",
                &toml_str(&worker_ledger.display().to_string()),
            )
            .set(
                "queuer",
                "ledger_file",
                &toml_str(&queuer_ledger.display().to_string()),
            )
            .set("log", "stats_interval_ms", "250")
            .write(&dir, "flagshed.toml");
        Scenario {
            _dir: dir,
            queue,
            dlx,
            dead,
            config,
            worker_ledger,
            queuer_ledger,
        }
    }

    fn worker(&self) -> Daemon {
        let worker = Daemon::start(Bin::Worker, &self.config);
        worker.wait_for_line("consuming from queue", WAIT);
        worker
    }

    fn queuer(&self) -> Daemon {
        let queuer = Daemon::start(Bin::Queuer, &self.config);
        queuer.wait_for_line("publishing to queue", WAIT);
        queuer
    }

    /// Stops the queuer, lets the workers empty the queue, stops them, and audits.
    fn finish(&self, mut queuer: Daemon, mut workers: Vec<Daemon>, allowed_twice: u64) -> Audit {
        queuer.stop();
        let broker = TestBroker::connect();
        broker.wait_for_ready(&self.queue, "the queue empties", WAIT, |n| n == 0);
        for worker in &mut workers {
            worker.stop();
        }
        let dead_letters = broker.drain(&self.dead);
        let left = broker.drain(&self.queue);
        let audit = Audit::new(
            &self.queuer_ledger,
            &self.worker_ledger,
            &dead_letters,
            &left,
        );
        audit.print(&self.queue);
        assert_eq!(audit.lost, 0, "jobs lost: {audit:?}");
        assert!(
            audit.twice <= allowed_twice,
            "{} jobs ran twice; at most {allowed_twice} were in flight at the fault",
            audit.twice
        );
        assert!(audit.confirmed >= 50, "load was running: {audit:?}");
        audit
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        if let Ok(mut broker) = std::panic::catch_unwind(TestBroker::connect) {
            broker.owns_queue(&self.queue);
            broker.owns_queue(&self.dead);
            broker.owns_exchange(&self.dlx);
        }
    }
}

/// Waits until the worker has settled at least `n` more jobs than it had at log line `from`.
fn wait_progress(worker: &Daemon, n: u64) {
    let start = worker
        .last_line("stats role=worker")
        .map(|l| Ledger::parse(&l).get("received"))
        .unwrap_or(0);
    worker.wait_for_new_stats(|s| s.get("received") >= start + n);
}

/// What happened to every confirmed job.
#[derive(Debug, Default)]
struct Audit {
    confirmed: u64,
    by_state: HashMap<String, u64>,
    expired_in_broker: u64,
    still_queued: u64,
    twice: u64,
    lost: u64,
}

impl Audit {
    fn new(
        queuer_ledger: &Path,
        worker_ledger: &Path,
        dead_letters: &[amiquip::AmqpProperties],
        left: &[amiquip::AmqpProperties],
    ) -> Audit {
        let confirmed: HashSet<String> = ledger_lines(queuer_ledger)
            .into_iter()
            .filter(|(_, state)| state == "published")
            .map(|(id, _)| id)
            .collect();
        let final_states = final_states();
        let mut finals: HashMap<String, Vec<String>> = HashMap::new();
        for (id, state) in ledger_lines(worker_ledger) {
            if final_states.contains(&state.as_str()) {
                finals.entry(id).or_default().push(state);
            }
        }
        let ids = |props: &[amiquip::AmqpProperties], reason: Option<&str>| -> HashSet<String> {
            props
                .iter()
                .filter(|p| reason.is_none() || death_reason(p).as_deref() == reason)
                .filter_map(|p| p.message_id().clone())
                .collect()
        };
        let expired_in_broker = ids(dead_letters, Some("expired"));
        let queued = ids(left, None);
        let mut audit = Audit {
            confirmed: confirmed.len() as u64,
            ..Audit::default()
        };
        for id in &confirmed {
            match finals.get(id) {
                Some(states) => {
                    *audit.by_state.entry(states[0].clone()).or_default() += 1;
                    if states.len() > 1 {
                        audit.twice += 1;
                    }
                }
                None if expired_in_broker.contains(id) => audit.expired_in_broker += 1,
                None if queued.contains(id) => audit.still_queued += 1,
                None => audit.lost += 1,
            }
        }
        audit
    }

    fn print(&self, what: &str) {
        let mut states: Vec<_> = self.by_state.iter().collect();
        states.sort();
        println!(
            "audit {what}: confirmed={} {} expired_in_broker={} still_queued={} ran_twice={} lost={}",
            self.confirmed,
            states
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" "),
            self.expired_in_broker,
            self.still_queued,
            self.twice,
            self.lost
        );
    }
}

fn rabbitmqctl(args: &[&str]) {
    let status = std::process::Command::new("rabbitmqctl")
        .args(args)
        .status()
        .expect("rabbitmqctl (comes with rabbitmq-server)");
    assert!(status.success(), "rabbitmqctl {args:?}");
}

#[test]
#[ignore = "restarts the shared broker: run by `make chaos`"]
fn broker_restart_loses_nothing() {
    let scenario = Scenario::new("chaos-restart", Flags::File);
    let worker = scenario.worker();
    let queuer = scenario.queuer();
    wait_progress(&worker, 100);
    rabbitmqctl(&["stop_app"]);
    rabbitmqctl(&["start_app"]);
    worker.wait_for_line("reconnected to RabbitMQ", WAIT);
    queuer.wait_for_line("reconnected to RabbitMQ", WAIT);
    wait_progress(&worker, 100);
    // Acks the worker sent while the broker was stopping are dropped with the connection, and
    // those jobs come back: at most the prefetch window.
    scenario.finish(queuer, vec![worker], 8);
}

#[test]
#[ignore = "kills processes under load: run by `make chaos`"]
fn kill_9_of_a_worker_mid_job_loses_nothing() {
    let scenario = Scenario::new("chaos-kill", Flags::File);
    let mut worker = scenario.worker();
    let queuer = scenario.queuer();
    wait_progress(&worker, 100);
    worker.signal(libc::SIGKILL);
    worker.wait_exit(WAIT);
    let replacement = scenario.worker();
    wait_progress(&replacement, 100);
    // At most a prefetch's worth of jobs was in flight when the worker died.
    scenario.finish(queuer, vec![replacement], 8);
}

#[test]
#[ignore = "stops processes under load: run by `make chaos`"]
fn sigterm_of_a_worker_under_load_then_restart_loses_nothing() {
    let scenario = Scenario::new("chaos-term", Flags::File);
    let mut worker = scenario.worker();
    let queuer = scenario.queuer();
    wait_progress(&worker, 100);
    worker.stop();
    assert_eq!(worker.final_ledger().text("balanced"), "true");
    let replacement = scenario.worker();
    wait_progress(&replacement, 100);
    scenario.finish(queuer, vec![replacement], 0);
}

fn launchdarkly_with(skip_rate: f64, version: u64) -> FakeLd {
    let fake = FakeLd::start();
    fake.set_flag(number_flag("task-rate", 1, 60.0));
    fake.set_flag(number_flag("skip-rate", version, skip_rate));
    fake
}

#[test]
#[ignore = "long fault scenario: run by `make chaos`"]
fn flag_service_outage_keeps_the_last_values_and_picks_up_a_change_after() {
    let fake = launchdarkly_with(10.0, 1);
    let uri = fake.uri();
    let scenario = Scenario::new(
        "chaos-flags",
        Flags::LaunchDarkly {
            uri: &uri,
            state: None,
        },
    );
    let worker = scenario.worker();
    let queuer = scenario.queuer();
    worker.wait_for_new_stats(|s| s.text("flag_source") == "valid");
    wait_progress(&worker, 60);
    // The service fails: streams cut, then 500s for the next attempts.
    fake.fail_next(4, 500);
    fake.drop_streams();
    let stats = worker.wait_for_new_stats(|s| s.text("flag_source") == "interrupted");
    assert_eq!(
        stats.text("skip_rate"),
        "10",
        "the last values stay: {stats:?}"
    );
    wait_progress(&worker, 60);
    // It comes back with a changed value.
    fake.set_flag(number_flag("skip-rate", 2, 20.0));
    let stats = worker.wait_for_new_stats(|s| s.text("skip_rate") == "20");
    assert_eq!(stats.text("flags"), "live");
    queuer.wait_for_new_stats(|s| s.text("flag_source") == "valid");
    wait_progress(&worker, 60);
    assert_eq!(
        worker.log().matches("flag source interrupted").count(),
        1,
        "the outage is logged once, not once per retry"
    );
    scenario.finish(queuer, vec![worker], 0);
}

/// LaunchDarkly is never reachable: the daemons start anyway (after the startup wait) and
/// run on the config's fallbacks, or on the persisted state when there is one.
#[test]
#[ignore = "long fault scenario: run by `make chaos`"]
fn flag_service_never_reachable_runs_on_fallbacks_or_the_state_file() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let uri = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);

    let scenario = Scenario::new(
        "chaos-noflags",
        Flags::LaunchDarkly {
            uri: &uri,
            state: None,
        },
    );
    let worker = scenario.worker();
    let queuer = scenario.queuer();
    let stats = worker.wait_for_new_stats(|s| s.text("flags") == "fallback");
    assert_eq!(stats.text("skip_rate"), "10", "{stats:?}");
    assert_eq!(stats.text("flag_source"), "interrupted", "{stats:?}");
    wait_progress(&worker, 100);
    scenario.finish(queuer, vec![worker], 0);

    let state = json!({
        "flags": {
            "task-rate": number_flag("task-rate", 7, 60.0),
            "skip-rate": number_flag("skip-rate", 7, 40.0),
        },
        "segments": {}
    });
    let scenario = Scenario::new(
        "chaos-cached",
        Flags::LaunchDarkly {
            uri: &uri,
            state: Some(state),
        },
    );
    let worker = scenario.worker();
    let queuer = scenario.queuer();
    let stats = worker.wait_for_new_stats(|s| s.text("flags") == "cached");
    assert_eq!(stats.text("skip_rate"), "40", "{stats:?}");
    wait_progress(&worker, 100);
    let audit = scenario.finish(queuer, vec![worker], 0);
    let skipped = audit.by_state.get("skipped").copied().unwrap_or(0) as f64;
    assert!(
        skipped / audit.confirmed as f64 > 0.25,
        "the cached skip rate (40) is in force: {audit:?}"
    );
}
