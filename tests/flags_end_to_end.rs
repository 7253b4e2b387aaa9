//! Flags from LaunchDarkly reaching a real worker on the real broker: a `patch` sent by the
//! (fake) LaunchDarkly service changes the share of jobs the worker skips, and a restart while
//! LaunchDarkly is unreachable starts from the persisted state, not from the fallbacks.

mod support;

use amiquip::AmqpValue;
use std::time::Duration;
use support::broker::{TestBroker, unique_name};
use support::daemon::{Bin, Daemon, TempDir, TestConfig, toml_str};
use support::fake_ld::{FakeLd, number_flag};

const WAIT: Duration = Duration::from_secs(60);
const SDK_KEY: &str = "sdk-e2e-0123456789-secret";

fn publish(broker: &TestBroker, queue: &str, batch: &str, n: usize) {
    for i in 0..n {
        broker.publish(
            queue,
            Some(&format!("{batch}-{i}")),
            &[("x-work-ms", AmqpValue::LongLongInt(0))],
            b"",
        );
    }
}

#[test]
fn a_patch_from_launchdarkly_changes_the_skip_share_and_survives_a_restart() {
    let mut broker = TestBroker::connect();
    let queue = unique_name("ld-e2e");
    broker.declare(&queue, amiquip::FieldTable::new());
    let fake = FakeLd::start();
    fake.set_flag(number_flag("skip-rate", 1, 0.0));
    let dir = TempDir::new("ld-e2e");
    let state_file = dir.path().join("flags-state.json");
    let config = TestConfig::new(&queue)
        .set("worker", "prefetch", "50")
        .set("launchdarkly", "stream_uri", &toml_str(&fake.uri()))
        .set("launchdarkly", "base_uri", &toml_str(&fake.uri()))
        .set("launchdarkly", "events_uri", &toml_str(&fake.uri()))
        .set("launchdarkly", "startup_wait_ms", "1500")
        .set(
            "launchdarkly",
            "state_file",
            &toml_str(&state_file.display().to_string()),
        )
        .write(&dir, "flagshed.toml");
    let env = [("LAUNCHDARKLY_SDK_KEY", SDK_KEY), ("RUST_LOG", "debug")];
    let mut worker = Daemon::start_with_env(Bin::Worker, &config, &env);
    worker.wait_for_line("consuming from queue", WAIT);
    let stats = worker.wait_for_stats(|s| s.text("flags") == "live");
    assert_eq!(stats.text("skip_rate"), "0", "{stats:?}");

    publish(&broker, &queue, "before", 1000);
    let stats = worker.wait_for_stats(|s| s.get("received") == 1000 && s.get("in_flight") == 0);
    assert_eq!(stats.get("skipped"), 0);

    fake.push_patch_flag(number_flag("skip-rate", 2, 50.0));
    worker.wait_for_line("skip_rate=50", WAIT);
    publish(&broker, &queue, "after", 2000);
    let stats = worker.wait_for_stats(|s| s.get("received") == 3000 && s.get("in_flight") == 0);
    let share = stats.get("skipped") as f64 / 2000.0;
    assert!(
        (0.45..=0.55).contains(&share),
        "skipped {share:.3} of 2000 at skip-rate 50"
    );
    worker.signal(libc::SIGTERM);
    assert!(worker.wait_exit(WAIT).success());
    assert!(
        !worker.log().contains(SDK_KEY),
        "the SDK key leaked into the log"
    );
    assert!(state_file.exists(), "the last good flags were persisted");

    // LaunchDarkly goes away; the restarted worker serves the persisted value, not the
    // fallback (0).
    drop(fake);
    let mut restarted = Daemon::start_with_env(Bin::Worker, &config, &env);
    restarted.wait_for_line("flag state restored", WAIT);
    let stats = restarted.wait_for_stats(|s| s.text("flags") == "cached");
    assert_eq!(stats.text("skip_rate"), "50", "{stats:?}");
    assert_ne!(stats.text("flag_source"), "valid", "{stats:?}");
    restarted.signal(libc::SIGTERM);
    assert!(restarted.wait_exit(WAIT).success());
    assert!(
        !restarted.log().contains(SDK_KEY),
        "the SDK key leaked into the log"
    );
}
