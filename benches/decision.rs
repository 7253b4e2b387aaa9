//! The per-job hot path, in nanoseconds: what the consumer thread spends deciding a job's fate.
//!
//! - decision: hash the job id ([`job::hash_id`]), load the skip rate
//!   ([`FlagValues::skip_ppm`]) and decide ([`shed::at_receipt`]);
//! - parse: read a job's timing from typical AMQP properties ([`job::parse`]; it hashes the id
//!   too);
//! - parse + decide: both, as the consumer thread runs them per delivery;
//! - per job type: the decision as the worker makes it when jobs carry types and the skip
//!   rate has a value per type: find the type's slot ([`WorkEstimates::slot`], a hash map
//!   lookup of the `type` property), load the type's skip rate ([`FlagValues::skip_for`]),
//!   count the use for LaunchDarkly's events ([`Tally::count`]) and decide. Against the first
//!   row, the ratio says what per-type flags add.
//!
//! Each is timed in several runs of many iterations; the median run is reported, with the
//! fastest and slowest. Inputs go through `black_box` and vary per iteration (1,024 ids and
//! property sets, cycled), so nothing is computed once and reused.
//!
//! `cargo bench --bench decision [-- --quick]`.

use amiquip::{AmqpProperties, AmqpValue, FieldTable};
use flagshed::flags::{FlagValues, Tally};
use flagshed::handler::estimate::WorkEstimates;
use flagshed::job::{self, JobDefaults, JobMeta};
use flagshed::shed::{self, Verdict};
use std::hint::black_box;
use std::time::Instant;

/// Distinct inputs, cycled (a power of two, so the index is a mask).
const INPUTS: usize = 1_024;

/// A job id as taskqueuer writes them: `<host>-<pid>-<start time hex>-<sequence>`.
fn job_id(i: usize) -> String {
    format!("worker-host-7-48213-19a3c5e6f01-{}", 1_000_000 + i)
}

/// Properties as taskqueuer sets them.
fn properties(i: usize, now_ms: u64) -> AmqpProperties {
    let created = now_ms - (i as u64 % 500);
    let mut headers = FieldTable::new();
    headers.insert(
        job::HEADER_CREATED_MS.into(),
        AmqpValue::LongLongInt(created as i64),
    );
    headers.insert(
        job::HEADER_DEADLINE_MS.into(),
        AmqpValue::LongLongInt((created + 2_000) as i64),
    );
    headers.insert(job::HEADER_WORK_MS.into(), AmqpValue::LongLongInt(200));
    AmqpProperties::default()
        .with_message_id(job_id(i))
        .with_headers(headers)
        .with_expiration("2000".into())
        .with_delivery_mode(2)
        .with_content_type("application/octet-stream".into())
        .with_timestamp(created / 1000)
}

/// Runs `body` `iterations` times per run, `runs` times; returns ns per iteration, sorted.
fn time_runs(runs: usize, iterations: u64, mut body: impl FnMut(u64) -> u64) -> Vec<f64> {
    let mut per_iteration = Vec::with_capacity(runs);
    // One untimed run warms caches and the branch predictor.
    let mut sink = 0u64;
    for i in 0..iterations / 10 {
        sink = sink.wrapping_add(body(i));
    }
    for _ in 0..runs {
        let start = Instant::now();
        for i in 0..iterations {
            sink = sink.wrapping_add(body(i));
        }
        per_iteration.push(start.elapsed().as_secs_f64() * 1e9 / iterations as f64);
    }
    black_box(sink);
    per_iteration.sort_by(f64::total_cmp);
    per_iteration
}

fn verdict_code(verdict: Verdict) -> u64 {
    match verdict {
        Verdict::Run => 0,
        Verdict::Expired => 1,
        Verdict::Doomed => 2,
        Verdict::Skipped => 3,
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (runs, iterations) = if quick {
        (5, 2_000_000)
    } else {
        (9, 20_000_000)
    };
    let now_ms = flagshed::clock::now_ms();
    let ids: Vec<String> = (0..INPUTS).map(job_id).collect();
    let props: Vec<AmqpProperties> = (0..INPUTS).map(|i| properties(i, now_ms)).collect();
    let defaults = JobDefaults {
        work_ms: 1_000,
        ttl_ms: None,
    };
    let metas: Vec<JobMeta> = props
        .iter()
        .enumerate()
        .map(|(i, p)| job::parse(p, now_ms, i as u64, defaults).expect("a well-formed job"))
        .collect();
    // 30 % skipped: every branch of the decision is taken.
    let values = FlagValues::new(30.0, 1.0);
    let mask = INPUTS as u64 - 1;

    let decision = time_runs(runs, iterations, |i| {
        let k = (i & mask) as usize;
        let meta = JobMeta {
            id_hash: job::hash_id(black_box(ids[k].as_bytes())),
            ..metas[k]
        };
        let skip_ppm = black_box(&values).skip_ppm();
        verdict_code(shed::at_receipt(
            black_box(&meta),
            black_box(now_ms + (i & 1023)),
            skip_ppm,
            black_box(true),
        ))
    });
    let parse = time_runs(runs, iterations / 4, |i| {
        let k = (i & mask) as usize;
        match job::parse(black_box(&props[k]), black_box(now_ms), i, defaults) {
            Ok(meta) => meta.id_hash,
            Err(_) => 0,
        }
    });
    // Four types, three with a skip rate of their own (as a rule on the job context gives).
    let typed = FlagValues::with_job_types(30.0, 1.0, 33);
    let type_names = ["thumbnail", "payment", "report", "email"];
    let mut estimates = WorkEstimates::new(flagshed::handler::estimate::DEFAULT_SETTINGS, 32);
    for (n, name) in type_names.iter().enumerate().take(3) {
        let slot = estimates.slot(name);
        typed.set_type_skip_rate(slot.index(), Some((n as u32 + 1, 10.0 * n as f64)));
    }
    let job_types: Vec<&str> = (0..INPUTS).map(|i| type_names[i % 4]).collect();
    let mut tally = Tally::default();
    let per_type = time_runs(runs, iterations, |i| {
        let k = (i & mask) as usize;
        let meta = JobMeta {
            id_hash: job::hash_id(black_box(ids[k].as_bytes())),
            ..metas[k]
        };
        let slot = estimates.slot(black_box(job_types[k]));
        let skip = black_box(&typed).skip_for(slot.index());
        tally.count(skip.id());
        verdict_code(shed::at_receipt(
            black_box(&meta),
            black_box(now_ms + (i & 1023)),
            skip.value(),
            black_box(true),
        ))
    });
    black_box(tally.take());
    // The same with the slot found beforehand: what the per-type value and the count add on
    // their own (the worker finds the slot per delivery anyway, for its work estimates).
    let slots: Vec<usize> = job_types
        .iter()
        .map(|t| estimates.slot(t).index())
        .collect();
    let per_type_value = time_runs(runs, iterations, |i| {
        let k = (i & mask) as usize;
        let meta = JobMeta {
            id_hash: job::hash_id(black_box(ids[k].as_bytes())),
            ..metas[k]
        };
        let skip = black_box(&typed).skip_for(black_box(slots[k]));
        tally.count(skip.id());
        verdict_code(shed::at_receipt(
            black_box(&meta),
            black_box(now_ms + (i & 1023)),
            skip.value(),
            black_box(true),
        ))
    });
    black_box(tally.take());
    let both = time_runs(runs, iterations / 4, |i| {
        let k = (i & mask) as usize;
        let now = black_box(now_ms + (i & 1023));
        match job::parse(black_box(&props[k]), now, i, defaults) {
            Ok(meta) => verdict_code(shed::at_receipt(
                &meta,
                now,
                black_box(&values).skip_ppm(),
                black_box(true),
            )),
            Err(_) => 9,
        }
    });

    println!(
        "per-job hot path, ns per job: median of {runs} runs ({iterations} decisions, {} parses per run)",
        iterations / 4
    );
    println!(
        "{:<48} {:>8} {:>8} {:>8}",
        "what", "median", "fastest", "slowest"
    );
    for (what, ns) in [
        ("decision: hash_id + skip_ppm + at_receipt", &decision),
        ("job::parse (typical taskqueuer properties)", &parse),
        ("parse + decision (per delivery)", &both),
        ("decision per job type: slot + skip_for + tally", &per_type),
        ("  the same, slot found beforehand", &per_type_value),
    ] {
        println!(
            "{what:<48} {:>8.1} {:>8.1} {:>8.1}",
            ns[ns.len() / 2],
            ns[0],
            ns[ns.len() - 1]
        );
    }
    let median = |ns: &[f64]| ns[ns.len() / 2];
    println!(
        "per-type decision / service-wide decision: {:.2} (slot found beforehand: {:.2})",
        median(&per_type) / median(&decision),
        median(&per_type_value) / median(&decision)
    );
}
