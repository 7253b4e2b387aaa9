//! Logging in to RabbitMQ as an operator configures it: refusals that no retry can heal stop
//! the daemons with EX_CONFIG (78) and one clear line; the broker password may come from a
//! systemd credential; and no secret reaches any output at any log level.

mod support;

use std::process::Command;
use std::time::Duration;
use support::broker::{TestBroker, TestUser, unique_name};
use support::daemon::{Bin, Daemon, TempDir, TestConfig, toml_str};

const WAIT: Duration = Duration::from_secs(60);
const PASSWORD: &str = "pw-Zq81-never-logged";
const CREDENTIAL_PASSWORD: &str = "pw-Cred-77-never-logged";
const SDK_KEY: &str = "sdk-test-key-never-logged";

/// Runs `bin` on a config whose broker URL is `url` and requires it to stop by itself with
/// EX_CONFIG, saying `expected`; returns its log.
fn refused(bin: Bin, url: &str, expected: &str) -> String {
    let queue = unique_name("refused");
    let dir = TempDir::new("refused");
    let config = TestConfig::new(&queue)
        .set("broker", "url", &toml_str(url))
        .write(&dir, "flagshed.toml");
    let mut daemon = Daemon::start(bin, &config);
    let status = daemon.wait_exit(WAIT);
    let log = daemon.log();
    assert_eq!(status.code(), Some(78), "{log}");
    assert!(log.contains(expected), "expected {expected:?} in:\n{log}");
    assert!(log.contains("127.0.0.1:5672"), "names the broker: {log}");
    assert!(!log.contains(PASSWORD), "{log}");
    log
}

#[test]
fn wrong_credentials_stop_both_daemons_with_ex_config() {
    let user = TestUser::create("wrongpw", PASSWORD, [".*", ".*", ".*"]);
    let url = user.url(Some("not-the-password"), "%2f");
    for bin in [Bin::Worker, Bin::Queuer] {
        let log = refused(bin, &url, "the user name or password is wrong");
        // Once more to be sure (a login cut short reads as bad credentials), then stop.
        assert_eq!(
            log.lines().filter(|l| l.contains("refused:")).count(),
            2,
            "{log}"
        );
        assert_eq!(
            log.lines()
                .filter(|l| l.contains("retrying cannot help"))
                .count(),
            1,
            "{log}"
        );
    }
}

#[test]
fn a_missing_vhost_stops_the_daemon_with_ex_config() {
    let user = TestUser::create("novhost", PASSWORD, [".*", ".*", ".*"]);
    refused(
        Bin::Worker,
        &user.url(Some(PASSWORD), "no-such-vhost"),
        "the virtual host does not exist",
    );
}

#[test]
fn no_permission_on_the_queue_stops_the_daemon_with_ex_config() {
    let user = TestUser::create("noperm", PASSWORD, ["^$", "^$", "^$"]);
    refused(
        Bin::Worker,
        &user.url(Some(PASSWORD), "%2f"),
        "no permission on the queue",
    );
}

#[test]
fn an_unreachable_broker_is_retried_not_refused() {
    let dir = TempDir::new("unreachable");
    // A port that was just free: connections are refused, which heals when a broker starts.
    let port = support::daemon::free_port();
    let config = TestConfig::new(&unique_name("unreachable"))
        .set(
            "broker",
            "url",
            &toml_str(&format!("amqp://guest:guest@127.0.0.1:{port}/%2f")),
        )
        .write(&dir, "flagshed.toml");
    let mut worker = Daemon::start(Bin::Worker, &config);
    worker.wait_for_line("retrying", WAIT);
    let stats = worker.wait_for_stats(|s| s.text("broker") == "down");
    assert_eq!(stats.text("broker_node"), "-");
    let ledger = worker.stop();
    ledger.assert_balanced();
}

#[test]
fn the_broker_password_can_come_from_a_credential() {
    let mut broker = TestBroker::connect();
    let queue = unique_name("credential");
    broker.owns_queue(&queue);
    let user = TestUser::create("cred", CREDENTIAL_PASSWORD, [".*", ".*", ".*"]);
    let dir = TempDir::new("credential");
    let credentials = dir.path().join("credentials");
    std::fs::create_dir_all(&credentials).expect("credentials dir");
    std::fs::write(
        credentials.join("broker-password"),
        format!("{CREDENTIAL_PASSWORD}\n"),
    )
    .expect("write the credential");
    let config = TestConfig::new(&queue)
        .set("broker", "url", &toml_str(&user.url(None, "%2f")))
        .set("queuer", "max_jobs", "20")
        .set("queuer", "work_ms", "0")
        .flag_file(
            &dir,
            r#"{"flagValues": {"task-rate": 200, "skip-rate": 0}}"#,
        )
        .write(&dir, "flagshed.toml");
    let env = [(
        "CREDENTIALS_DIRECTORY",
        credentials.to_str().expect("utf-8 path"),
    )];
    let mut worker = Daemon::start_with_env(Bin::Worker, &config, &env);
    worker.wait_for_line("consuming from queue", WAIT);
    let mut queuer = Daemon::start_with_env(Bin::Queuer, &config, &env);
    assert!(queuer.wait_exit(WAIT).success(), "{}", queuer.log());
    let stats = worker.wait_settled(20);
    assert_eq!(stats.text("broker_node"), "127.0.0.1:5672", "{stats:?}");
    let ledger = worker.stop();
    ledger.assert_balanced();
    assert_eq!(ledger.get("done"), 20, "{ledger:?}");
}

#[test]
fn no_log_level_shows_a_secret() {
    let mut broker = TestBroker::connect();
    let queue = unique_name("trace");
    broker.owns_queue(&queue);
    let user = TestUser::create("trace", PASSWORD, [".*", ".*", ".*"]);
    let dir = TempDir::new("trace");
    let config = TestConfig::new(&queue)
        .set("broker", "url", &toml_str(&user.url(Some(PASSWORD), "%2f")))
        .set("log", "level", "\"trace\"")
        .set("launchdarkly", "sdk_key", &toml_str(SDK_KEY))
        .set("launchdarkly", "startup_wait_ms", "0")
        .set("launchdarkly", "stream_uri", "\"http://127.0.0.1:9\"")
        .set("launchdarkly", "base_uri", "\"http://127.0.0.1:9\"")
        .set("launchdarkly", "events_uri", "\"http://127.0.0.1:9\"")
        .set("flags", "rate_fallback", "200")
        .set("queuer", "max_jobs", "50")
        .set("queuer", "work_ms", "0")
        .write(&dir, "flagshed.toml");
    let mut worker = Daemon::start(Bin::Worker, &config);
    worker.wait_for_line("consuming from queue", WAIT);
    let mut queuer = Daemon::start(Bin::Queuer, &config);
    assert!(queuer.wait_exit(WAIT).success(), "{}", queuer.log());
    worker.wait_settled(50);
    worker.stop().assert_balanced();
    for log in [worker.log(), queuer.log()] {
        assert!(log.contains("TRACE"), "ran at trace: {log}");
        // The daemons' own checks on exit (wait_exit) have looked for the secrets themselves.
        assert!(!log.contains("StartOk"), "no handshake record: {log}");
    }
}

/// A config line holding `secret`, broken in ways the parser reports: each must be refused
/// without the secret in the message.
#[test]
fn config_errors_on_secret_keys_never_quote_the_secret() {
    let dir = TempDir::new("config-secrets");
    let url = format!("amqp://user:{PASSWORD}@127.0.0.1:5672/%2f");
    let broken = [
        format!("[launchdarkly]\nsdk_key = {SDK_KEY}\n"),
        format!("[launchdarkly]\nsdk_key = \"{SDK_KEY}\n"),
        format!("[launchdarkly]\nsdk_key = [\"{SDK_KEY}\"]\n"),
        format!("[launchdarkly]\nsdk_key = {{ key = \"{SDK_KEY}\" }}\n"),
        format!("[launchdarkly]\nsdk_key = \"{SDK_KEY}\" \"{SDK_KEY}\"\n"),
        format!("[broker]\nurl = {url}\n"),
        format!("[broker]\nurl = \"{url}\n"),
        format!("[broker]\nurl = [\"{url}\"]\n"),
        format!("[broker]\nurls = \"{url}\"\n"),
        format!("[broker]\nurls = [\"{url}\", 5]\n"),
        format!("[broker]\nurl = \"{url}\"\nurl = \"{url}\"\n"),
        format!("[broker]\nurl = \"{}\"\n", url.replace("amqp", "http")),
        format!("[broker]\nurl = \"{url}\"\nurls = [\"{url}\"]\n"),
        format!("[handler]\nkind = \"http\"\nurl = \"ftp://u:{PASSWORD}@h/\"\n"),
        format!("[handler]\nkind = \"http\"\nurl = {PASSWORD}\n"),
    ];
    for (i, text) in broken.iter().enumerate() {
        let path = dir.write(&format!("broken-{i}.toml"), text);
        let out = Command::new(Bin::Worker.path())
            .arg("--check-config")
            .arg("--config")
            .arg(&path)
            .output()
            .expect("run taskworker");
        let shown = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(78), "{text}\n{shown}");
        assert!(
            shown.contains(&path.display().to_string()),
            "names the file: {shown}"
        );
        for secret in [PASSWORD, SDK_KEY] {
            assert!(!shown.contains(secret), "{text}\nleaked: {shown}");
        }
    }
}
