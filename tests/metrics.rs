//! The metrics endpoints against the real RabbitMQ and a real Prometheus: what Prometheus
//! scrapes from a worker adds up to the worker's own ledger, outcome by outcome; the queuer's
//! counters are its ledger; every scrape passes `promtool check metrics`; the dashboard and the
//! alerting rules in contrib/ use only metrics the daemons expose, and pass promtool; and the
//! address is checked at start and kept across reloads.

mod support;
// Only this test needs Prometheus, so its helper is not one of every test's support modules.
#[path = "support/prometheus.rs"]
mod prometheus;

use amiquip::{AmqpProperties, AmqpValue, FieldTable};
use flagshed::ledger::Outcome;
use prometheus::{Prometheus, Scrape, assert_promtool_passes, eventually, metrics_address, scrape};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use support::broker::{TestBroker, now_ms, unique_name};
use support::daemon::{Bin, Daemon, Ledger, TempDir, TestConfig, toml_str};

const WAIT: Duration = Duration::from_secs(60);

/// Jobs of a type of their own, published beside the queuer's untyped ones.
const TYPED_JOBS: u64 = 20;
/// Jobs with an unreadable header.
const MALFORMED_JOBS: u64 = 5;

/// What Prometheus holds now of the worker's ledger: each outcome, `received` and `returned`.
fn scraped_ledger(prometheus: &Prometheus) -> BTreeMap<String, u64> {
    let mut ledger: BTreeMap<String, u64> = prometheus
        .query("sum by (outcome) (flagshed_jobs_total{job=\"worker\"})")
        .into_iter()
        .map(|s| (s.labels["outcome"].clone(), s.value as u64))
        .collect();
    for (field, metric) in [
        ("received", "flagshed_jobs_received_total"),
        ("returned", "flagshed_jobs_returned_total"),
    ] {
        if let Some(value) = prometheus.value(&format!("{metric}{{job=\"worker\"}}")) {
            ledger.insert(field.to_owned(), value as u64);
        }
    }
    ledger
}

/// The same fields of a stats or final line.
fn logged_ledger(line: &Ledger) -> BTreeMap<String, u64> {
    Outcome::ALL
        .iter()
        .map(|o| o.as_str())
        .chain(["received", "returned"])
        .map(|field| (field.to_owned(), line.get(field)))
        .collect()
}

/// A worker under overload with a skip rate, typed and malformed jobs among the queuer's: once
/// it is idle, Prometheus's last scrape holds exactly the worker's ledger, and the worker's
/// final line, written after that scrape, shows the same numbers. (Nothing changes while the
/// worker is idle, so the final line is what Prometheus saw; the test checks that too.)
#[test]
fn prometheus_scrapes_add_up_to_the_worker_ledger() {
    let mut broker = TestBroker::connect();
    let queue = unique_name("metrics");
    broker.owns_queue(&queue);
    let dir = TempDir::new("metrics");
    // Capacity: 2 threads x 20 ms = 100 jobs/s; offered 250 jobs/s, 30 % skipped, each with
    // 300 ms to live: some run on time, some are skipped, some expire or are doomed.
    let config = TestConfig::new(&queue)
        .flag_file(
            &dir,
            r#"{"flagValues": {"task-rate": 250, "skip-rate": 30}}"#,
        )
        .set("queuer", "max_jobs", "400")
        .set("queuer", "work_ms", "20")
        .set("queuer", "ttl_ms", "300")
        .set("worker", "concurrency", "2")
        .set("worker", "prefetch", "4")
        .set("metrics", "worker_listen", &toml_str("127.0.0.1:0"))
        .write(&dir, "flagshed.toml");

    let mut worker = Daemon::start(Bin::Worker, &config);
    let address = metrics_address(&worker, WAIT);
    worker.wait_for_line("consuming from queue", WAIT);
    let prometheus = Prometheus::start(&[("worker", address)]);

    let created = now_ms();
    for i in 0..TYPED_JOBS {
        let properties = AmqpProperties::default()
            .with_message_id(format!("resize-{i}"))
            .with_type_("resize".into())
            .with_headers(headers(&[
                ("x-created-ms", AmqpValue::LongLongInt(created as i64)),
                (
                    "x-deadline-ms",
                    AmqpValue::LongLongInt(created as i64 + 600_000),
                ),
                ("x-work-ms", AmqpValue::LongLongInt(1)),
            ]));
        broker.publish_properties(&queue, properties, b"{}");
    }
    for i in 0..MALFORMED_JOBS {
        broker.publish(
            &queue,
            Some(&format!("bad-{i}")),
            &[("x-work-ms", AmqpValue::LongString("soon".into()))],
            b"",
        );
    }
    let mut queuer = Daemon::start(Bin::Queuer, &config);
    assert!(queuer.wait_exit(WAIT * 2).success(), "{}", queuer.log());
    assert_eq!(queuer.final_ledger().get("published"), 400);

    // Idle: nothing left in the queue (served, or expired by the broker) and nothing held.
    broker.wait_for_ready(&queue, "the queue empties", WAIT, |n| n == 0);
    worker.wait_for_new_stats(|s| s.get("in_flight") == 0);
    let logged = eventually(WAIT, || {
        let line = worker.last_line("stats role=").expect("a stats line");
        let logged = logged_ledger(&Ledger::parse(&line));
        let scraped = scraped_ledger(&prometheus);
        if scraped == logged {
            Ok(logged)
        } else {
            Err(format!(
                "Prometheus has {scraped:?}\nthe worker logged {logged:?}"
            ))
        }
    });

    let at = |outcome: &str| logged[outcome] as f64;
    let value = |promql: &str| {
        prometheus
            .value(promql)
            .unwrap_or_else(|| panic!("no series for {promql}"))
    };
    assert_eq!(
        value("sum(flagshed_jobs_total{job=\"worker\",type=\"resize\"})"),
        TYPED_JOBS as f64
    );
    assert_eq!(at("malformed"), MALFORMED_JOBS as f64);
    assert!(at("done") > 0.0 && at("skipped") > 0.0, "{logged:?}");
    assert!(at("expired") + at("doomed") > 0.0, "{logged:?}");
    // Every job with a deadline that finished on time has a slack, every late one a lateness,
    // and every one that ran a queue wait and a handler time.
    assert_eq!(value("flagshed_job_slack_seconds_count"), at("done"));
    assert_eq!(value("flagshed_job_lateness_seconds_count"), at("late"));
    let ran = at("done") + at("late") + at("timed_out") + at("failed") + at("retried");
    assert_eq!(value("flagshed_job_queue_wait_seconds_count"), ran);
    assert_eq!(value("flagshed_job_handler_seconds_count"), ran);
    assert_eq!(value("flagshed_jobs_in_flight"), 0.0);
    assert_eq!(value("flagshed_skip_rate_ratio"), 0.3);
    assert_eq!(value("flagshed_flags_origin{origin=\"file\"}"), 1.0);
    assert_eq!(value("max(flagshed_broker_connected)"), 1.0);

    assert_promtool_passes(&["check", "metrics"], &scrape(address));

    let last = worker.stop();
    last.assert_balanced();
    assert_eq!(
        logged_ledger(&last),
        logged,
        "the final line is what Prometheus scraped"
    );
}

fn headers(entries: &[(&str, AmqpValue)]) -> FieldTable {
    let mut table = FieldTable::new();
    for (name, value) in entries {
        table.insert((*name).to_owned(), value.clone());
    }
    table
}

/// The queuer's counters are its ledger: published, sent, nacked and lost, and a confirm
/// latency for every confirm. Its rate is then set to 0 through the flag file, so that it goes
/// idle and its final line is what the last scrape showed.
#[test]
fn queuer_counters_are_its_ledger() {
    let mut broker = TestBroker::connect();
    let queue = unique_name("metrics-queuer");
    broker.owns_queue(&queue);
    let dir = TempDir::new("metrics-queuer");
    let config = TestConfig::new(&queue)
        .flag_file(&dir, r#"{"flagValues": {"task-rate": 300}}"#)
        .set("flags", "file_check_ms", "50")
        .set("queuer", "ttl_ms", "5000")
        .set("metrics", "queuer_listen", &toml_str("127.0.0.1:0"))
        .write(&dir, "flagshed.toml");
    let mut queuer = Daemon::start(Bin::Queuer, &config);
    let address = metrics_address(&queuer, WAIT);
    queuer.wait_for_stats(|s| s.get("published") >= 100);
    dir.write("flags.json", r#"{"flagValues": {"task-rate": 0}}"#);
    let idle = queuer.wait_for_new_stats(|s| s.text("rate") == "0" && s.get("unconfirmed") == 0);
    let metrics = Scrape::parse(&scrape(address));
    for field in ["sent", "published", "nacked", "lost"] {
        assert_eq!(
            metrics.get(&format!("flagshed_jobs_{field}_total")),
            idle.get(field) as f64,
            "{field}"
        );
    }
    assert_eq!(
        metrics.get("flagshed_confirm_latency_seconds_count"),
        (idle.get("published") + idle.get("nacked")) as f64
    );
    assert_eq!(metrics.get("flagshed_jobs_unconfirmed"), 0.0);
    assert_eq!(metrics.get("flagshed_task_rate_jobs_per_second"), 0.0);
    let last = queuer.stop();
    for field in ["sent", "published", "nacked", "lost"] {
        assert_eq!(last.get(field), idle.get(field), "{field}");
    }
}

/// The names the shipped dashboard and alerting rules use, in `text`: every word that starts
/// like one of the daemons' metrics.
fn metric_names_in(text: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with("flagshed_") || word.starts_with("process_"))
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    names
}

fn repo_file(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Each daemon's scrape passes `promtool check metrics`, and contrib/'s dashboard and alerting
/// rules name only metrics the daemons expose, in PromQL that promtool accepts.
#[test]
fn scrapes_pass_promtool_and_contrib_uses_only_exposed_metrics() {
    let mut broker = TestBroker::connect();
    let queue = unique_name("metrics-names");
    broker.owns_queue(&queue);
    let dir = TempDir::new("metrics-names");
    // A rate of 0: the queuer stays up, publishing nothing, until it is stopped.
    let config = TestConfig::new(&queue)
        .flag_file(&dir, r#"{"flagValues": {"task-rate": 0, "skip-rate": 0}}"#)
        .set("metrics", "worker_listen", &toml_str("127.0.0.1:0"))
        .set("metrics", "queuer_listen", &toml_str("127.0.0.1:0"))
        .write(&dir, "flagshed.toml");
    let mut worker = Daemon::start(Bin::Worker, &config);
    let mut queuer = Daemon::start(Bin::Queuer, &config);
    let worker_text = scrape(metrics_address(&worker, WAIT));
    let queuer_text = scrape(metrics_address(&queuer, WAIT));
    assert_promtool_passes(&["check", "metrics"], &worker_text);
    assert_promtool_passes(&["check", "metrics"], &queuer_text);
    let mut exposed = Scrape::parse(&worker_text);
    exposed
        .families
        .extend(Scrape::parse(&queuer_text).families);

    let dashboard = repo_file("contrib/grafana/flagshed.json");
    let alerts = repo_file("contrib/prometheus/flagshed-alerts.yml");
    for (file, text) in [("dashboard", &dashboard), ("alerting rules", &alerts)] {
        let unknown: Vec<String> = metric_names_in(text)
            .into_iter()
            .filter(|name| !exposed.knows(name))
            .collect();
        assert!(
            unknown.is_empty(),
            "the {file} use unknown metrics {unknown:?}"
        );
    }

    assert_promtool_passes(
        &[
            "check",
            "rules",
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("contrib/prometheus/flagshed-alerts.yml")
                .display()
                .to_string(),
        ],
        "",
    );
    // The dashboard's queries, with Grafana's variables filled in, as recording rules.
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).expect("JSON");
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 6, "{exprs:?}");
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in exprs.iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "1m")
            .replace("$instance", ".+");
        let quoted = serde_json::to_string(&expr).expect("a JSON string");
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {quoted}\n"
        ));
    }
    let rules_path = dir.write("dashboard-rules.yml", &rules);
    assert_promtool_passes(&["check", "rules", &rules_path.display().to_string()], "");

    queuer.stop();
    worker.stop();
}

/// Every `"expr"` string in a Grafana dashboard.
fn collect_exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", serde_json::Value::String(expr)) => out.push(expr.clone()),
                    _ => collect_exprs(value, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// An address another process holds stops the worker at start with exit status 78 (a
/// configuration error), naming the key and the address.
#[test]
fn an_address_in_use_stops_the_daemon_with_78() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = taken.local_addr().expect("address").to_string();
    let dir = TempDir::new("metrics-taken");
    let config = TestConfig::new(&unique_name("metrics-taken"))
        .set("metrics", "worker_listen", &toml_str(&address))
        .write(&dir, "flagshed.toml");
    let mut worker = Daemon::start(Bin::Worker, &config);
    let status = worker.wait_exit(WAIT);
    assert_eq!(status.code(), Some(78), "{}", worker.log());
    let log = worker.log();
    assert!(
        log.contains("metrics.worker_listen") && log.contains(&address),
        "{log}"
    );
    assert!(!log.contains("consuming from"), "{log}");
}

/// A reload with another address keeps serving on the first, with a warning: the socket is
/// bound once, at start.
#[test]
fn a_reload_keeps_the_metrics_address() {
    let mut broker = TestBroker::connect();
    let queue = unique_name("metrics-reload");
    broker.owns_queue(&queue);
    let dir = TempDir::new("metrics-reload");
    let config = TestConfig::new(&queue).set("metrics", "worker_listen", &toml_str("127.0.0.1:0"));
    let path = config.write(&dir, "flagshed.toml");
    let mut worker = Daemon::start(Bin::Worker, &path);
    let address = metrics_address(&worker, WAIT);
    worker.wait_for_line("consuming from queue", WAIT);
    config
        .set("metrics", "worker_listen", &toml_str("127.0.0.1:1"))
        .write(&dir, "flagshed.toml");
    worker.signal(libc::SIGHUP);
    worker.wait_for_line(
        "metrics.worker_listen changed; it takes effect at the next restart",
        WAIT,
    );
    worker.wait_for_line("configuration reloaded", WAIT);
    assert!(scrape(address).contains("flagshed_jobs_received_total 0\n"));
    worker.stop();
}
