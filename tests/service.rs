//! The daemons as systemd services: sd_notify, reload on SIGHUP, journald priorities.

mod support;

use amiquip::AmqpValue;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};
use support::broker::{TestBroker, unique_name};
use support::daemon::{Bin, Daemon, TempDir, TestConfig, toml_str};

const WAIT: Duration = Duration::from_secs(60);

/// Reads datagrams until one contains `needle`; returns it. Panics after `WAIT`.
fn expect_notify(socket: &UnixDatagram, needle: &str, seen: &mut Vec<String>) -> String {
    let end = Instant::now() + WAIT;
    let mut buf = [0u8; 4096];
    while Instant::now() < end {
        match socket.recv(&mut buf) {
            Ok(n) => {
                let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                seen.push(message.clone());
                if message.contains(needle) {
                    return message;
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("recv: {e}"),
        }
    }
    panic!("no sd_notify message containing {needle:?}; got {seen:?}");
}

#[test]
fn sd_notify_ready_watchdog_reload_and_stopping() {
    let mut broker = TestBroker::connect();
    let queue = unique_name("notify");
    broker.owns_queue(&queue);
    let dir = TempDir::new("notify");
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind notify socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let config = TestConfig::new(&queue).write(&dir, "flagshed.toml");
    let mut worker = Daemon::start_with_env(
        Bin::Worker,
        &config,
        &[
            ("NOTIFY_SOCKET", &socket_path.display().to_string()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let mut seen = Vec::new();
    let ready = expect_notify(&socket, "READY=1", &mut seen);
    assert!(
        ready.contains(&format!("MAINPID={}", worker.pid())),
        "{ready}"
    );
    expect_notify(&socket, "WATCHDOG=1", &mut seen);
    expect_notify(&socket, "STATUS=stats role=worker", &mut seen);

    worker.signal(libc::SIGHUP);
    let reloading = expect_notify(&socket, "RELOADING=1", &mut seen);
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    expect_notify(&socket, "READY=1", &mut seen);

    worker.signal(libc::SIGTERM);
    expect_notify(&socket, "STOPPING=1", &mut seen);
    assert!(worker.wait_exit(WAIT).success());
}

#[test]
fn sighup_applies_a_valid_config_and_refuses_an_invalid_one() {
    let mut broker = TestBroker::connect();
    let queue = unique_name("reload");
    broker.declare(&queue, amiquip::FieldTable::new());
    let dir = TempDir::new("reload");
    let base = TestConfig::new(&queue).set("worker", "default_work_ms", "0");
    let config = base.write(&dir, "flagshed.toml");
    let mut worker = Daemon::start(Bin::Worker, &config);
    worker.wait_for_line("consuming from queue", WAIT);
    let publish = |n: usize, tag: &str| {
        for i in 0..n {
            broker.publish(
                &queue,
                Some(&format!("{tag}-{i}")),
                &[("x-work-ms", AmqpValue::LongLongInt(0))],
                b"",
            );
        }
    };
    publish(20, "before");
    worker.wait_for_stats(|s| s.get("done") == 20);

    // Valid change: skip everything.
    base.clone()
        .set("flags", "skip_rate_fallback", "100.0")
        .write(&dir, "flagshed.toml");
    worker.signal(libc::SIGHUP);
    worker.wait_for_line("configuration reloaded", WAIT);
    worker.wait_for_line("skip_rate=100", WAIT);
    publish(20, "skipped");
    worker.wait_for_stats(|s| s.get("skipped") == 20);

    // Invalid change: refused, the daemon keeps running on the previous config.
    dir.write("flagshed.toml", "[worker]\nconcurrency = \"many\"\n");
    worker.signal(libc::SIGHUP);
    let refused = worker.wait_for_line("reload refused", WAIT);
    assert!(refused.contains("worker.concurrency"), "{refused}");
    publish(5, "after");
    let stats = worker.wait_for_stats(|s| s.get("received") == 45 && s.get("in_flight") == 0);
    assert_eq!(
        stats.get("skipped"),
        25,
        "still on the valid config: {stats:?}"
    );
    worker.signal(libc::SIGTERM);
    assert!(worker.wait_exit(WAIT).success());
}

#[test]
fn journald_lines_carry_syslog_priorities_and_no_timestamp() {
    let mut broker = TestBroker::connect();
    let queue = unique_name("journal");
    broker.owns_queue(&queue);
    let dir = TempDir::new("journal");
    let missing = dir.path().join("no-such-flags.json");
    let config = TestConfig::new(&queue)
        .set("flags", "file", &toml_str(&missing.display().to_string()))
        .write(&dir, "flagshed.toml");
    let mut worker = Daemon::start_with_env(Bin::Worker, &config, &[("JOURNAL_STREAM", "8:12345")]);
    let warning = worker.wait_for_line("does not exist", WAIT);
    assert!(warning.starts_with("<4>"), "{warning}");
    let info = worker.wait_for_line("consuming from queue", WAIT);
    assert!(info.starts_with("<6>"), "{info}");
    assert!(
        !info.contains("Z INFO"),
        "journald adds its own timestamp: {info}"
    );
    worker.signal(libc::SIGTERM);
    assert!(worker.wait_exit(WAIT).success());
}

#[test]
fn second_sigterm_stops_at_once_and_running_jobs_return_to_the_queue() {
    let mut broker = TestBroker::connect();
    let queue = unique_name("hardstop");
    broker.declare(&queue, amiquip::FieldTable::new());
    for i in 0..4 {
        broker.publish(
            &queue,
            Some(&format!("slow-{i}")),
            &[("x-work-ms", AmqpValue::LongLongInt(60_000))],
            b"",
        );
    }
    let dir = TempDir::new("hardstop");
    let config = TestConfig::new(&queue)
        .set("worker", "concurrency", "2")
        .set("worker", "prefetch", "4")
        .write(&dir, "flagshed.toml");
    let mut worker = Daemon::start(Bin::Worker, &config);
    worker.wait_for_stats(|s| s.get("received") == 4);
    worker.signal(libc::SIGTERM);
    worker.wait_for_line("stopping: draining", WAIT);
    worker.signal(libc::SIGTERM);
    assert!(worker.wait_exit(WAIT).success());
    let ledger = worker.final_ledger();
    assert_eq!(
        ledger.get("requeued"),
        2,
        "the two unstarted jobs: {ledger:?}"
    );
    assert_eq!(
        ledger.get("returned_unacked"),
        2,
        "the two running jobs: {ledger:?}"
    );
    assert_eq!(ledger.text("balanced"), "true");
    // The broker has all four back once the connection is closed.
    broker.wait_for_ready(&queue, "the four jobs return to the queue", WAIT, |n| {
        n >= 4
    });
}
