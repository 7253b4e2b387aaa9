//! The local flag file through the flag source thread: it is re-read when it changes, a
//! percentage rollout in it is evaluated with LaunchDarkly's rules, and a bad value or a
//! broken file leaves the previous values in place with a warning naming the flag.

mod support;

use flagshed::config::Config;
use flagshed::flag_source::FlagSource;
use flagshed::flags::{FlagValues, Origin};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use support::capture::{capture_logs, captured, wait_until};
use support::daemon::TempDir;

const TIMEOUT: Duration = Duration::from_secs(10);

fn start(file: &Path, context_key: &str) -> (FlagSource, Arc<FlagValues>) {
    let text = format!(
        "[flags]\nfile = {:?}\nfile_check_ms = 20\nskip_rate_fallback = 1.0\ncontext_key = {context_key:?}\n",
        file.display().to_string()
    );
    let config = Config::parse(Path::new("flag-file-test.toml"), &text).expect("valid config");
    let values = Arc::new(FlagValues::with_job_types(1.0, 1.0, 4));
    let mut settings = flagshed::service::source_settings(&config, flagshed::service::Role::Worker);
    settings.queue = "jobs".into();
    let source = FlagSource::spawn(settings, Arc::clone(&values)).expect("spawn flag source");
    (source, values)
}

fn warned(needle: &str) -> bool {
    captured()
        .iter()
        .any(|l| l.starts_with("WARN") && l.contains(needle))
}

#[test]
fn changes_to_the_file_are_picked_up_and_bad_values_keep_the_previous_one() {
    capture_logs();
    let dir = TempDir::new("flagfile");
    let file = dir.write("flags.json", r#"{"flagValues": {"skip-rate": 20}}"#);
    let (_source, values) = start(&file, "host-a");
    assert_eq!(values.skip_rate(), 20.0);
    assert_eq!(values.origin(), Origin::File);

    dir.write("flags.json", r#"{"flagValues": {"skip-rate": 35.5}}"#);
    wait_until("skip rate 35.5", TIMEOUT, || values.skip_rate() == 35.5);

    // Out of range: ignored, with a warning naming the flag and the value.
    dir.write("flags.json", r#"{"flagValues": {"skip-rate": 150}}"#);
    wait_until("out-of-range warning", TIMEOUT, || {
        warned("\"skip-rate\": value 150 is out of range")
    });
    assert_eq!(values.skip_rate(), 35.5);

    // Wrong type: ignored, with a warning.
    dir.write("flags.json", r#"{"flagValues": {"skip-rate": "lots"}}"#);
    wait_until("wrong-type warning", TIMEOUT, || warned("is not a number"));
    assert_eq!(values.skip_rate(), 35.5);

    // Truncated mid-write (a writer that does not rename): the file is refused whole.
    std::fs::write(&file, r#"{"flagValues": {"skip-rate": 9"#).expect("write");
    wait_until("parse warning", TIMEOUT, || warned("not a valid flag file"));
    assert_eq!(values.skip_rate(), 35.5);

    // Fixed again: applied.
    dir.write("flags.json", r#"{"flagValues": {"skip-rate": 5}}"#);
    wait_until("skip rate 5", TIMEOUT, || values.skip_rate() == 5.0);
}

#[test]
fn a_missing_flag_uses_the_fallback() {
    capture_logs();
    let dir = TempDir::new("flagfile-missing");
    let file = dir.write("flags.json", r#"{"flagValues": {"task-rate": 3}}"#);
    let (_source, values) = start(&file, "host-a");
    assert_eq!(values.rate_per_sec(), 3.0);
    assert_eq!(values.skip_rate(), 1.0, "skip-rate is not in the file");
}

/// A 50/50 rollout in the flag file splits hosts as LaunchDarkly would: the bucket of
/// `skip-rate.salt.host` decides. host-a buckets to 0.9220 and host-b to 0.3273, computed
/// independently with
/// `python3 -c "import hashlib;h=hashlib.sha1(b'skip-rate.salt.host-a').hexdigest()[:15];print(int(h,16)/0xFFFFFFFFFFFFFFF)"`.
#[test]
fn a_rollout_in_the_file_is_evaluated_per_host() {
    capture_logs();
    let dir = TempDir::new("flagfile-rollout");
    let rollout = r#"{"flags": {"skip-rate": {
        "key": "skip-rate", "version": 1, "on": true, "variations": [0, 50],
        "offVariation": 0, "salt": "salt",
        "fallthrough": {"rollout": {"contextKind": "service", "bucketBy": "key",
            "variations": [{"variation": 0, "weight": 50000}, {"variation": 1, "weight": 50000}]}}
    }}}"#;
    let file = dir.write("flags.json", rollout);
    let (_a, host_a) = start(&file, "host-a");
    let (_b, host_b) = start(&file, "host-b");
    assert_eq!(host_a.skip_rate(), 50.0, "host-a is in the upper half");
    assert_eq!(host_b.skip_rate(), 0.0, "host-b is in the lower half");
}
