//! How fast a flag change reaches the hot path, and what the hot path pays to read it.
//!
//! Propagation: a fake LaunchDarkly streams `patch` events to a real flag source; each sample
//! is the time from writing the event to the socket until [`FlagValues::skip_ppm`] returns
//! the new value (parse, version check, evaluation, store). Read cost: `skip_ppm()` in a tight
//! loop, the one load each job does. Run with `cargo bench --bench flag_propagation`; it is a
//! plain program (`harness = false`), printing a small table.

#[path = "../tests/support/accept.rs"]
mod accept;
#[path = "../tests/support/fake_ld.rs"]
mod fake_ld;

use fake_ld::{FakeLd, number_flag};
use flagshed::config::Config;
use flagshed::flag_source::FlagSource;
use flagshed::flags::FlagValues;
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Patches sent; the first few warm up connections and caches and are not counted.
const UPDATES: usize = 2_000;
const WARMUP: usize = 50;
/// Reads timed for the hot-path cost.
const READS: u64 = 200_000_000;

fn main() {
    let fake = FakeLd::start();
    fake.set_flag(number_flag("skip-rate", 1, 0.0));
    let text = format!(
        "[flags]\ncontext_key = \"bench-host\"\n\
         [launchdarkly]\nsdk_key = \"sdk-bench\"\nstream_uri = \"{uri}\"\nbase_uri = \"{uri}\"\nevents_uri = \"{uri}\"\n",
        uri = fake.uri()
    );
    let config = Config::parse(Path::new("bench.toml"), &text).expect("valid bench config");
    let mut settings = flagshed::service::source_settings(&config, flagshed::service::Role::Worker);
    settings.queue = "bench".into();
    let values = Arc::new(FlagValues::new(0.0, 1.0));
    let _source = FlagSource::spawn(settings, Arc::clone(&values)).expect("start the flag source");
    assert!(
        fake.wait_for_streams(1, Duration::from_secs(10)),
        "the flag source connected"
    );

    let mut samples = Vec::with_capacity(UPDATES);
    for i in 0..UPDATES + WARMUP {
        // Steps of 0.1 % (1,000 ppm), so every patch changes the value.
        let percent = ((i + 1) % 1_000) as f64 / 10.0;
        let want = (percent * 10_000.0).round() as u32;
        let flag = number_flag("skip-rate", 2 + i as u64, percent);
        let deadline = Instant::now() + Duration::from_secs(10);
        let start = Instant::now();
        fake.push_patch_flag(flag);
        while values.skip_ppm() != want {
            assert!(Instant::now() < deadline, "patch {i} never arrived");
            // Yield rather than spin: on a small machine a spinning reader would compete with
            // the very threads it is waiting for.
            std::thread::yield_now();
        }
        if i >= WARMUP {
            samples.push(start.elapsed());
        }
    }
    samples.sort();

    let read_start = Instant::now();
    let mut sum = 0u64;
    for _ in 0..READS {
        sum = sum.wrapping_add(u64::from(black_box(&*values).skip_ppm()));
    }
    let read_elapsed = read_start.elapsed();
    black_box(sum);

    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    println!("flag propagation, patch written -> FlagValues updated ({UPDATES} updates)");
    println!("  {:<6} {:>12}", "", "time");
    for (name, value) in [
        ("min", samples[0]),
        ("p50", at(0.50)),
        ("p90", at(0.90)),
        ("p99", at(0.99)),
        ("max", samples[samples.len() - 1]),
        ("mean", mean),
    ] {
        println!("  {name:<6} {:>9.1} us", value.as_secs_f64() * 1e6);
    }
    println!(
        "hot-path read, FlagValues::skip_ppm(): {:.2} ns per read ({READS} reads)",
        read_elapsed.as_secs_f64() * 1e9 / READS as f64
    );
}
