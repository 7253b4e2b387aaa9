//! Properties of everything that reads outside input: job metadata, the shedding decision, the
//! SSE stream, LaunchDarkly's data messages, the flag file and the config file. For arbitrary
//! input none of them panics and each returns a clear `Ok` or `Err` that follows its
//! documented rules.

use amiquip::{AmqpProperties, AmqpValue, FieldTable};
use flagshed::config::{Config, ConfigError};
use flagshed::flags::evaluate::evaluate_flag;
use flagshed::flags::file::{self, FlagFileError};
use flagshed::flags::store::{DataEvent, FlagStore};
use flagshed::job::{
    self, HEADER_CREATED_MS, HEADER_DEADLINE_MS, HEADER_WORK_MS, JobDefaults, JobMeta, MAX_WORK_MS,
    Malformed,
};
use flagshed::launchdarkly::protocol::{self, ProtocolError};
use flagshed::launchdarkly::sse::{SseItem, SseParser};
use flagshed::shed::{self, AtStart, PPM, Verdict};
use launchdarkly_server_sdk_evaluation::ContextBuilder;
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{Value, json};
use std::io::Cursor;
use std::path::Path;

const TIMING_HEADERS: [&str; 3] = [HEADER_CREATED_MS, HEADER_DEADLINE_MS, HEADER_WORK_MS];

// ---------------------------------------------------------------------------------------------
// Job metadata

/// A decimal value; amiquip does not re-export its type, so it is built through serde.
fn decimal(scale: u8, value: u32) -> AmqpValue {
    serde_json::from_value(json!({"DecimalValue": {"scale": scale, "value": value}}))
        .expect("a decimal AMQP value")
}

/// Integers with their edges (zero, one, the extremes, the sign change) much more likely than
/// a uniform draw would make them.
fn edgy_i64() -> impl Strategy<Value = i64> {
    prop_oneof![
        3 => any::<i64>(),
        1 => select(vec![i64::MIN, i64::MIN + 1, -1, 0, 1, i64::MAX - 1, i64::MAX]),
        1 => 0..=MAX_WORK_MS as i64 + 1,
    ]
}

fn edgy_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => any::<u64>(),
        1 => select(vec![0, 1, MAX_WORK_MS, MAX_WORK_MS + 1, i64::MAX as u64, u64::MAX - 1, u64::MAX]),
        1 => 0..=2 * MAX_WORK_MS,
    ]
}

/// Integer-typed AMQP values, negative ones included.
fn integer_value() -> impl Strategy<Value = AmqpValue> {
    prop_oneof![
        any::<i8>().prop_map(AmqpValue::ShortShortInt),
        any::<u8>().prop_map(AmqpValue::ShortShortUInt),
        any::<i16>().prop_map(AmqpValue::ShortInt),
        any::<u16>().prop_map(AmqpValue::ShortUInt),
        any::<i32>().prop_map(AmqpValue::LongInt),
        any::<u32>().prop_map(AmqpValue::LongUInt),
        edgy_i64().prop_map(AmqpValue::LongLongInt),
        edgy_u64().prop_map(AmqpValue::Timestamp),
    ]
}

/// Every other AMQP type, nested tables and arrays included.
fn non_integer_value() -> impl Strategy<Value = AmqpValue> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(AmqpValue::Boolean),
        any::<f32>().prop_map(AmqpValue::Float),
        any::<f64>().prop_map(AmqpValue::Double),
        (any::<u8>(), any::<u32>()).prop_map(|(scale, value)| decimal(scale, value)),
        any::<String>().prop_map(AmqpValue::LongString),
        vec(any::<u8>(), 0..16).prop_map(AmqpValue::ByteArray),
        Just(AmqpValue::Void),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        let any_value = prop_oneof![inner, integer_value()];
        prop_oneof![
            vec(any_value.clone(), 0..4).prop_map(AmqpValue::FieldArray),
            btree_map(any::<String>(), any_value, 0..4).prop_map(AmqpValue::FieldTable),
        ]
    })
}

fn amqp_value() -> impl Strategy<Value = AmqpValue> {
    prop_oneof![integer_value(), non_integer_value()]
}

/// Header names: mostly the timing ones, sometimes near misses or anything at all.
fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => select(TIMING_HEADERS.to_vec()).prop_map(str::to_owned),
        1 => select(vec!["X-Deadline-Ms", "x-deadline-ms ", "x-deadline", ""]).prop_map(str::to_owned),
        1 => any::<String>(),
    ]
}

fn properties() -> impl Strategy<Value = AmqpProperties> {
    (
        proptest::option::of(btree_map(header_name(), amqp_value(), 0..6)),
        proptest::option::of(any::<String>()),
    )
        .prop_map(|(headers, id)| {
            let mut properties = AmqpProperties::default();
            if let Some(headers) = headers {
                properties = properties.with_headers(headers.into_iter().collect());
            }
            if let Some(id) = id {
                properties = properties.with_message_id(id);
            }
            properties
        })
}

fn defaults() -> impl Strategy<Value = JobDefaults> {
    (edgy_u64(), proptest::option::of(edgy_u64()))
        .prop_map(|(work_ms, ttl_ms)| JobDefaults { work_ms, ttl_ms })
}

/// What one timing header says, by the rules in the `job` module's documentation.
#[derive(Debug, PartialEq)]
enum Reading {
    Absent,
    Ms(u64),
    NotAnInteger(&'static str),
    Negative,
}

fn read(value: Option<&AmqpValue>) -> Reading {
    let integer: i128 = match value {
        None => return Reading::Absent,
        Some(AmqpValue::ShortShortInt(v)) => (*v).into(),
        Some(AmqpValue::ShortShortUInt(v)) => (*v).into(),
        Some(AmqpValue::ShortInt(v)) => (*v).into(),
        Some(AmqpValue::ShortUInt(v)) => (*v).into(),
        Some(AmqpValue::LongInt(v)) => (*v).into(),
        Some(AmqpValue::LongUInt(v)) => (*v).into(),
        Some(AmqpValue::LongLongInt(v)) => (*v).into(),
        Some(AmqpValue::Timestamp(v)) => (*v).into(),
        Some(AmqpValue::Boolean(_)) => return Reading::NotAnInteger("a boolean"),
        Some(AmqpValue::Float(_) | AmqpValue::Double(_) | AmqpValue::DecimalValue(_)) => {
            return Reading::NotAnInteger("a fractional number");
        }
        Some(AmqpValue::LongString(_)) => return Reading::NotAnInteger("a string"),
        Some(AmqpValue::FieldArray(_)) => return Reading::NotAnInteger("an array"),
        Some(AmqpValue::FieldTable(_)) => return Reading::NotAnInteger("a table"),
        Some(AmqpValue::ByteArray(_)) => return Reading::NotAnInteger("a byte array"),
        Some(AmqpValue::Void) => return Reading::NotAnInteger("void"),
    };
    if integer < 0 {
        Reading::Negative
    } else {
        Reading::Ms(integer as u64)
    }
}

/// The documented outcome of parsing, header by header in the order the docs list them; the
/// id hash is left to the caller.
fn expected_parse(
    properties: &AmqpProperties,
    received_ms: u64,
    defaults: JobDefaults,
) -> Result<(u64, Option<u64>, u64), Malformed> {
    let headers = properties.headers().as_ref();
    let mut readings = Vec::new();
    for header in TIMING_HEADERS {
        let reading = read(headers.and_then(|h| h.get(header)));
        match reading {
            Reading::NotAnInteger(found) => return Err(Malformed::NotAnInteger { header, found }),
            Reading::Negative => return Err(Malformed::Negative { header }),
            Reading::Ms(work_ms) if header == HEADER_WORK_MS && work_ms > MAX_WORK_MS => {
                return Err(Malformed::WorkTooLong { work_ms });
            }
            _ => readings.push(reading),
        }
    }
    let ms = |reading: &Reading| match reading {
        Reading::Ms(ms) => Some(*ms),
        _ => None,
    };
    let created_ms = ms(&readings[0]).unwrap_or(received_ms);
    let deadline_ms = ms(&readings[1]).or(defaults.ttl_ms.map(|t| created_ms.saturating_add(t)));
    let work_ms = ms(&readings[2]).unwrap_or(defaults.work_ms);
    Ok((created_ms, deadline_ms, work_ms))
}

fn one_header(header: &str, value: AmqpValue) -> AmqpProperties {
    let mut table = FieldTable::new();
    table.insert(header.to_owned(), value);
    AmqpProperties::default().with_headers(table)
}

const NO_DEFAULTS: JobDefaults = JobDefaults {
    work_ms: 7,
    ttl_ms: None,
};

proptest! {
    #[test]
    fn job_parse_follows_the_documented_rules(
        properties in properties(),
        received_ms in edgy_u64(),
        fallback_id in any::<u64>(),
        defaults in defaults(),
    ) {
        let parsed = job::parse(&properties, received_ms, fallback_id, defaults);
        match (parsed, expected_parse(&properties, received_ms, defaults)) {
            (Ok(meta), Ok((created_ms, deadline_ms, work_ms))) => {
                prop_assert_eq!((meta.created_ms, meta.deadline_ms, meta.work_ms), (created_ms, deadline_ms, work_ms));
                if let Some(id) = properties.message_id() {
                    prop_assert_eq!(meta.id_hash, job::hash_id(id.as_bytes()));
                }
            }
            (Err(got), Err(want)) => {
                prop_assert_eq!(got, want);
                let message = got.to_string();
                prop_assert!(TIMING_HEADERS.iter().any(|h| message.contains(h)), "{}", message);
            }
            (got, want) => prop_assert!(false, "parse gave {:?}, the rules say {:?}", got, want),
        }
    }

    #[test]
    fn job_without_message_id_hashes_its_fallback_id_alone(
        properties in properties(),
        other_headers in properties(),
        fallback_id in any::<u64>(),
    ) {
        let strip = |p: &AmqpProperties| {
            let mut stripped = AmqpProperties::default();
            if let Some(headers) = p.headers() {
                stripped = stripped.with_headers(headers.clone());
            }
            stripped
        };
        let a = job::parse(&strip(&properties), 0, fallback_id, NO_DEFAULTS);
        let b = job::parse(&strip(&other_headers), 1, fallback_id, NO_DEFAULTS);
        if let (Ok(a), Ok(b)) = (a, b) {
            prop_assert_eq!(a.id_hash, b.id_hash);
        }
    }

    #[test]
    fn integer_header_in_range_round_trips(
        header in select(TIMING_HEADERS.to_vec()),
        (value, ms) in prop_oneof![
            (0..=i8::MAX).prop_map(|v| (AmqpValue::ShortShortInt(v), v as u64)),
            any::<u8>().prop_map(|v| (AmqpValue::ShortShortUInt(v), u64::from(v))),
            (0..=i16::MAX).prop_map(|v| (AmqpValue::ShortInt(v), v as u64)),
            any::<u16>().prop_map(|v| (AmqpValue::ShortUInt(v), u64::from(v))),
            (0..=i32::MAX).prop_map(|v| (AmqpValue::LongInt(v), v as u64)),
            any::<u32>().prop_map(|v| (AmqpValue::LongUInt(v), u64::from(v))),
            (0..=i64::MAX).prop_map(|v| (AmqpValue::LongLongInt(v), v as u64)),
            any::<u64>().prop_map(|v| (AmqpValue::Timestamp(v), v)),
        ],
    ) {
        let parsed = job::parse(&one_header(header, value), 5, 0, NO_DEFAULTS);
        match header {
            HEADER_CREATED_MS => prop_assert_eq!(parsed.map(|m| m.created_ms), Ok(ms)),
            HEADER_DEADLINE_MS => prop_assert_eq!(parsed.map(|m| m.deadline_ms), Ok(Some(ms))),
            _ if ms <= MAX_WORK_MS => prop_assert_eq!(parsed.map(|m| m.work_ms), Ok(ms)),
            _ => prop_assert_eq!(parsed, Err(Malformed::WorkTooLong { work_ms: ms })),
        }
    }

    #[test]
    fn non_integer_header_is_not_an_integer(
        header in select(TIMING_HEADERS.to_vec()),
        value in non_integer_value(),
    ) {
        let parsed = job::parse(&one_header(header, value), 0, 0, NO_DEFAULTS);
        prop_assert!(
            matches!(parsed, Err(Malformed::NotAnInteger { header: h, .. }) if h == header),
            "{:?}", parsed
        );
    }

    #[test]
    fn negative_header_is_negative(
        header in select(TIMING_HEADERS.to_vec()),
        value in prop_oneof![
            (i8::MIN..0).prop_map(AmqpValue::ShortShortInt),
            (i16::MIN..0).prop_map(AmqpValue::ShortInt),
            (i32::MIN..0).prop_map(AmqpValue::LongInt),
            (i64::MIN..0).prop_map(AmqpValue::LongLongInt),
        ],
    ) {
        let parsed = job::parse(&one_header(header, value), 0, 0, NO_DEFAULTS);
        prop_assert_eq!(parsed, Err(Malformed::Negative { header }));
    }
}

// ---------------------------------------------------------------------------------------------
// The shedding decision

fn job_meta() -> impl Strategy<Value = JobMeta> {
    (
        any::<u64>(),
        edgy_u64(),
        proptest::option::of(edgy_u64()),
        edgy_u64(),
    )
        .prop_map(|(id_hash, created_ms, deadline_ms, work_ms)| JobMeta {
            id_hash,
            created_ms,
            deadline_ms,
            work_ms,
            work_declared: true,
        })
}

/// A clock near the deadline half of the time, so every boundary gets its share.
fn meta_and_now() -> impl Strategy<Value = (JobMeta, u64)> {
    (job_meta(), edgy_u64(), -3i64..=3, any::<bool>()).prop_map(|(meta, now, offset, near)| {
        let now = match meta.deadline_ms {
            Some(deadline) if near => deadline
                .saturating_sub(meta.work_ms)
                .saturating_add_signed(offset),
            _ => now,
        };
        (meta, now)
    })
}

fn skip_ppm() -> impl Strategy<Value = u32> {
    prop_oneof![Just(0), Just(PPM as u32), 0..=PPM as u32, any::<u32>(),]
}

fn is_expired(meta: &JobMeta, now_ms: u64) -> bool {
    meta.deadline_ms.is_some_and(|deadline| now_ms >= deadline)
}

/// The sum saturates: a deadline at `u64::MAX` means "never", and never dooms a job.
fn is_doomed(meta: &JobMeta, now_ms: u64, drop_doomed: bool) -> bool {
    !is_expired(meta, now_ms)
        && drop_doomed
        && meta
            .deadline_ms
            .is_some_and(|deadline| now_ms.saturating_add(meta.work_ms) > deadline)
}

proptest! {
    #[test]
    fn verdict_follows_the_documented_order(
        (meta, now_ms) in meta_and_now(),
        skip_ppm in skip_ppm(),
        drop_doomed in any::<bool>(),
    ) {
        let expected = if is_expired(&meta, now_ms) {
            Verdict::Expired
        } else if is_doomed(&meta, now_ms, drop_doomed) {
            Verdict::Doomed
        } else if u128::from(meta.id_hash % 1_000_000) < u128::from(skip_ppm) {
            Verdict::Skipped
        } else {
            Verdict::Run
        };
        prop_assert_eq!(shed::at_receipt(&meta, now_ms, skip_ppm, drop_doomed), expected);
        let at_start = match expected {
            Verdict::Expired => AtStart::Expired,
            Verdict::Doomed => AtStart::Doomed,
            Verdict::Run | Verdict::Skipped => AtStart::Run,
        };
        prop_assert_eq!(shed::at_start(&meta, now_ms, drop_doomed), at_start);
    }

    #[test]
    fn expired_iff_now_is_at_or_past_the_deadline(
        (meta, now_ms) in meta_and_now(),
        skip_ppm in skip_ppm(),
        drop_doomed in any::<bool>(),
    ) {
        let verdict = shed::at_receipt(&meta, now_ms, skip_ppm, drop_doomed);
        prop_assert_eq!(verdict == Verdict::Expired, meta.deadline_ms.is_some_and(|d| now_ms >= d));
    }

    #[test]
    fn skip_rate_zero_never_skips(
        (meta, now_ms) in meta_and_now(),
        drop_doomed in any::<bool>(),
    ) {
        prop_assert_ne!(shed::at_receipt(&meta, now_ms, 0, drop_doomed), Verdict::Skipped);
    }

    #[test]
    fn full_skip_rate_skips_every_viable_job(
        (meta, now_ms) in meta_and_now(),
        skip_ppm in (PPM as u32)..=u32::MAX,
        drop_doomed in any::<bool>(),
    ) {
        let verdict = shed::at_receipt(&meta, now_ms, skip_ppm, drop_doomed);
        if shed::at_start(&meta, now_ms, drop_doomed) == AtStart::Run {
            prop_assert_eq!(verdict, Verdict::Skipped);
        } else {
            prop_assert_ne!(verdict, Verdict::Skipped);
        }
    }

    #[test]
    fn a_higher_skip_rate_never_skips_less(
        id_hash in any::<u64>(),
        low in skip_ppm(),
        high in skip_ppm(),
    ) {
        let (low, high) = (low.min(high), low.max(high));
        if shed::is_skipped(id_hash, low) {
            prop_assert!(shed::is_skipped(id_hash, high));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The SSE stream

#[path = "support/sse_model.rs"]
mod sse_model;

use sse_model::{Chunked, sse_items, sse_reference};

/// Streams built from the pieces that matter to the parser, and arbitrary bytes between them.
fn sse_stream() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        3 => select(vec![
            &b"\r"[..], b"\n", b"\r\n", b"\n\n", b"\r\r", b":", b" ", b"data", b"event", b"id",
            b"retry", b"data: ", b"data:", b"event: put", b"event: patch", b": ping",
            b"\xEF\xBB\xBF", b"{\"path\":\"/flags/a\",\"version\":1}",
        ])
        .prop_map(<[u8]>::to_vec),
        1 => vec(any::<u8>(), 0..6),
    ];
    vec(piece, 0..48).prop_map(|pieces| pieces.concat())
}

fn sse_limit() -> impl Strategy<Value = usize> {
    prop_oneof![Just(1 << 20), 0..160usize]
}

proptest! {
    #[test]
    fn sse_follows_the_rules_in_any_chunking(
        stream in sse_stream(),
        sizes in vec(1..17usize, 0..8),
        limit in sse_limit(),
    ) {
        let whole = sse_items(SseParser::new(Cursor::new(stream.clone()), limit));
        let chunked = sse_items(SseParser::new(Chunked::new(&stream, &sizes), limit));
        prop_assert_eq!(&whole, &chunked, "chunk sizes {:?}", sizes);
        prop_assert_eq!(&whole, &sse_reference(&stream, limit));
        for item in &whole.0 {
            if let SseItem::Event(event) = item {
                prop_assert!(!event.name.is_empty() && !event.name.contains(['\r', '\n']));
                prop_assert!(!event.data.contains('\r'));
            }
        }
    }

    #[test]
    fn sse_arbitrary_bytes_follow_the_rules_in_any_chunking(
        stream in vec(any::<u8>(), 0..512),
        sizes in vec(1..64usize, 0..8),
        limit in sse_limit(),
    ) {
        let whole = sse_items(SseParser::new(Cursor::new(stream.clone()), limit));
        let chunked = sse_items(SseParser::new(Chunked::new(&stream, &sizes), limit));
        prop_assert_eq!(&whole, &chunked, "chunk sizes {:?}", sizes);
        prop_assert_eq!(&whole, &sse_reference(&stream, limit));
    }

    #[test]
    fn sse_line_endings_are_interchangeable(
        lines in vec(select(vec!["event: put", "event: patch", "data: 1", "data:2", ": hi", "id: 3", ""]), 0..24),
        endings in vec(select(vec!["\n", "\r", "\r\n"]), 1..8),
    ) {
        let with = |choose: &dyn Fn(usize) -> &'static str| {
            let mut text = String::new();
            for (i, line) in lines.iter().enumerate() {
                let mut ending = choose(i);
                // `\r` then a blank line ended by `\n` would read as one `\r\n`.
                if line.is_empty() && ending == "\n" && text.ends_with('\r') {
                    ending = "\r\n";
                }
                text.push_str(line);
                text.push_str(ending);
            }
            // Blank lines so that the last event is dispatched.
            text.push_str("\r\n\r\n");
            sse_items(SseParser::new(Cursor::new(text.into_bytes()), 1 << 20))
        };
        let mixed = with(&|i| endings[i % endings.len()]);
        let plain = with(&|_| "\n");
        prop_assert_eq!(mixed, plain);
    }
}

// ---------------------------------------------------------------------------------------------
// LaunchDarkly data: stream events, polling responses, the flag file

/// Object keys LaunchDarkly's messages and flags use, so that random JSON reaches past the
/// first field check.
const JSON_KEYS: &[&str] = &[
    "path",
    "data",
    "version",
    "flags",
    "segments",
    "flagValues",
    "key",
    "on",
    "variations",
    "fallthrough",
    "variation",
    "rollout",
    "weight",
    "bucketBy",
    "offVariation",
    "salt",
    "targets",
    "contextTargets",
    "values",
    "contextKind",
    "rules",
    "id",
    "clauses",
    "attribute",
    "op",
    "negate",
    "prerequisites",
    "included",
    "excluded",
    "deleted",
    "seed",
    "kind",
];

fn json_string() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => select(JSON_KEYS.to_vec()).prop_map(str::to_owned),
        1 => select(vec!["/", "/flags/", "/flags/a", "/segments/s", "/other/x", "in", "segmentMatch", "service", ""]).prop_map(str::to_owned),
        1 => any::<String>(),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        edgy_i64().prop_map(Value::from),
        edgy_u64().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        json_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Array),
            vec((json_string(), inner), 0..6)
                .prop_map(|fields| Value::Object(fields.into_iter().collect())),
        ]
    })
}

fn flag_json(key: &str) -> Value {
    json!({
        "key": key, "version": 3, "on": true, "variations": [0, 25, 50],
        "offVariation": 0, "salt": "s", "targets": [], "contextTargets": [],
        "fallthrough": {"rollout": {"variations": [{"variation": 1, "weight": 60000},
                                                   {"variation": 2, "weight": 40000}],
                                    "bucketBy": "host"}},
        "rules": [{"id": "r", "variation": 2, "trackEvents": false, "clauses": [
            {"contextKind": "service", "attribute": "queue", "op": "in",
             "values": ["billing"], "negate": false},
            {"attribute": "key", "op": "segmentMatch", "values": ["s"], "negate": false}]}],
        "prerequisites": [{"key": "other", "variation": 0}]
    })
}

fn segment_json(key: &str) -> Value {
    json!({"key": key, "version": 2, "included": ["a"], "excluded": [], "salt": "s",
           "rules": [{"id": "r", "clauses": [{"attribute": "role", "op": "in",
                                               "values": ["worker"], "negate": false}]}]})
}

/// Replaces what `path` leads to in `value` (adding object keys on the way; `index` picks
/// array items; a path through a scalar replaces the scalar).
fn replace_at(value: &mut Value, path: &[String], index: usize, replacement: Value) {
    let Some((key, rest)) = path.split_first() else {
        *value = replacement;
        return;
    };
    match value {
        Value::Object(map) => {
            let slot = map.entry(key.clone()).or_insert(Value::Null);
            replace_at(slot, rest, index, replacement);
        }
        Value::Array(items) if !items.is_empty() => {
            let i = index % items.len();
            replace_at(&mut items[i], rest, index, replacement);
        }
        other => *other = replacement,
    }
}

/// A valid object with one thing replaced by anything: the value at one of `prefixes`, or
/// something (possibly new) a few keys below it.
fn mutated(base: Value, prefixes: &[&[&str]]) -> impl Strategy<Value = Value> + use<> {
    let prefixes: Vec<Vec<String>> = prefixes
        .iter()
        .map(|p| p.iter().map(|k| (*k).to_owned()).collect())
        .collect();
    (
        select(prefixes),
        vec(json_string(), 0..3),
        json_value(),
        any::<usize>(),
    )
        .prop_map(move |(mut path, tail, replacement, index)| {
            path.extend(tail);
            let mut value = base.clone();
            replace_at(&mut value, &path, index, replacement);
            value
        })
}

fn flag_prefixes(at: &[&'static str]) -> Vec<Vec<&'static str>> {
    let mut prefixes = vec![at.to_vec()];
    for field in [
        "on",
        "variations",
        "fallthrough",
        "offVariation",
        "rules",
        "prerequisites",
        "targets",
        "contextTargets",
        "salt",
        "version",
    ] {
        let mut path = at.to_vec();
        path.push(field);
        prefixes.push(path);
    }
    prefixes
}

/// Applies the data to a store and evaluates every flag for a daemon's context, as the flag
/// source thread does after each change.
fn evaluate_everything(event: DataEvent) {
    let mut store = FlagStore::default();
    store.apply(event);
    let mut builder = ContextBuilder::new("worker-host-1");
    builder
        .kind("service")
        .set_string("role", "worker")
        .set_string("queue", "billing")
        .set_string("host", "worker-host-1");
    let context = builder.build().expect("a valid context");
    for key in store.snapshot().flags.keys() {
        // What the flag source thread calls: it guards the evaluator against data that
        // would overflow its stack or never finish.
        let _ = evaluate_flag(&store, key, &context);
    }
}

fn event_name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => select(vec!["put", "patch", "delete"]).prop_map(str::to_owned),
        1 => any::<String>(),
    ]
}

/// A data message: an event name and its body, mostly a well-formed body for that name with
/// one thing changed, sometimes random JSON or a name LaunchDarkly never sends; a quarter of
/// the bodies are cut short.
fn data_message() -> impl Strategy<Value = (String, String)> {
    let patch_paths = flag_prefixes(&["data"]);
    let patch_paths: Vec<&[&str]> = patch_paths.iter().map(Vec::as_slice).collect();
    let flag_patch = mutated(
        json!({"path": "/flags/skip-rate", "data": flag_json("skip-rate")}),
        &[&patch_paths[..], &[&["path"]]].concat(),
    );
    let segment_patch = mutated(
        json!({"path": "/segments/s", "data": segment_json("s")}),
        &[
            &["path"],
            &["data"],
            &["data", "rules"],
            &["data", "included"],
        ],
    );
    let put_paths = flag_prefixes(&["data", "flags", "skip-rate"]);
    let put_paths: Vec<&[&str]> = put_paths.iter().map(Vec::as_slice).collect();
    let put = mutated(
        json!({"path": "/", "data": {
            "flags": {"skip-rate": flag_json("skip-rate"), "other": flag_json("other")},
            "segments": {"s": segment_json("s")}}}),
        &[
            &put_paths[..],
            &[&["path"], &["data", "segments", "s"], &["data", "flags"]],
        ]
        .concat(),
    );
    let delete = mutated(
        json!({"path": "/flags/skip-rate", "version": 4}),
        &[&["path"], &["version"]],
    );
    let message = prop_oneof![
        flag_patch.prop_map(|body| ("patch".to_owned(), body)),
        segment_patch.prop_map(|body| ("patch".to_owned(), body)),
        put.prop_map(|body| ("put".to_owned(), body)),
        delete.prop_map(|body| ("delete".to_owned(), body)),
        (event_name(), json_value()),
    ];
    (message, any::<prop::sample::Index>(), 0..4).prop_map(|((name, value), cut, truncate)| {
        let text = value.to_string();
        if truncate == 0 {
            let mut end = cut.index(text.len() + 1);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            (name, text[..end].to_owned())
        } else {
            (name, text)
        }
    })
}

/// A polling response: the whole data set, with one thing changed.
fn poll_body_json() -> impl Strategy<Value = Value> {
    let paths = flag_prefixes(&["flags", "skip-rate"]);
    let mut paths: Vec<&[&str]> = paths.iter().map(Vec::as_slice).collect();
    paths.extend_from_slice(&[&[], &["flags"], &["segments"], &["segments", "s"]]);
    mutated(
        json!({"flags": {"skip-rate": flag_json("skip-rate"), "other": flag_json("other")},
               "segments": {"s": segment_json("s")}}),
        &paths,
    )
}

fn check_data_event(name: &str, body: &str, result: Result<Option<DataEvent>, ProtocolError>) {
    let path = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v.get("path").and_then(Value::as_str).map(str::to_owned));
    match result {
        Ok(Some(event)) => {
            match (&event, path.as_deref()) {
                (DataEvent::Put(_), _) => assert_eq!(name, "put"),
                (DataEvent::PatchFlag(flag), Some(path)) => {
                    assert_eq!(name, "patch");
                    assert_eq!(path, format!("/flags/{}", flag.key));
                }
                (DataEvent::PatchSegment(segment), Some(path)) => {
                    assert_eq!(name, "patch");
                    assert_eq!(path, format!("/segments/{}", segment.key));
                }
                (DataEvent::DeleteFlag { key, .. }, Some(path)) => {
                    assert_eq!(name, "delete");
                    assert_eq!(path, format!("/flags/{key}"));
                }
                (DataEvent::DeleteSegment { key, .. }, Some(path)) => {
                    assert_eq!(name, "delete");
                    assert_eq!(path, format!("/segments/{key}"));
                }
                (other, None) => panic!("{other:?} from a body without a path: {body}"),
            }
            evaluate_everything(event);
        }
        Ok(None) => {}
        Err(e) => assert!(e.to_string().contains(&format!("{name:?}")), "{e}"),
    }
}

const EXAMPLE_FLAGS: &[u8] = include_bytes!("../etc/flags.json");

proptest! {
    #[test]
    fn stream_events_decode_cleanly((name, body) in data_message()) {
        let result = protocol::stream_event(&name, &body);
        if !matches!(name.as_str(), "put" | "patch" | "delete") {
            prop_assert!(matches!(result, Ok(None)), "{:?}", result);
        }
        check_data_event(&name, &body, result);
    }

    #[test]
    fn stream_events_from_arbitrary_text_decode_cleanly(name in event_name(), body in any::<String>()) {
        let result = protocol::stream_event(&name, &body);
        check_data_event(&name, &body, result);
    }

    #[test]
    fn poll_bodies_decode_cleanly(body in prop_oneof![
        poll_body_json().prop_map(|body| body.to_string().into_bytes()),
        data_message().prop_map(|(_, body)| body.into_bytes()),
        vec(any::<u8>(), 0..256),
    ]) {
        match protocol::poll_body(&body) {
            Ok(event) => evaluate_everything(event),
            Err(e) => prop_assert!(e.to_string().contains("latest-all"), "{}", e),
        }
    }

    #[test]
    fn flag_file_of_arbitrary_bytes_is_ok_or_a_clean_error(bytes in vec(any::<u8>(), 0..256)) {
        check_flag_file(&bytes);
    }

    #[test]
    fn flag_file_of_json_is_ok_or_a_clean_error(
        file in flag_file_json(),
    ) {
        check_flag_file(file.to_string().as_bytes());
    }

    #[test]
    fn example_flag_file_with_a_byte_changed_is_ok_or_a_clean_error(
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let mut bytes = EXAMPLE_FLAGS.to_vec();
        let i = at.index(bytes.len());
        bytes[i] = byte;
        check_flag_file(&bytes);
    }
}

fn example_flag_file_json() -> Value {
    json!({
        "flags": {"skip-rate": flag_json("skip-rate"), "other": flag_json("other")},
        "flagValues": {"task-rate": 2},
        "segments": {"s": segment_json("s")}
    })
}

fn flag_file_json() -> impl Strategy<Value = Value> {
    let paths = flag_prefixes(&["flags", "skip-rate"]);
    let mut paths: Vec<&[&str]> = paths.iter().map(Vec::as_slice).collect();
    paths.extend_from_slice(&[
        &[],
        &["flags"],
        &["flagValues"],
        &["flagValues", "task-rate"],
        &["segments", "s"],
    ]);
    mutated(example_flag_file_json(), &paths)
}

fn check_flag_file(bytes: &[u8]) {
    match file::parse(Path::new("flags.json"), bytes) {
        Ok(data) => evaluate_everything(DataEvent::Put(data)),
        Err(e) => assert!(e.to_string().starts_with("flags.json: "), "{e}"),
    }
}

/// The starting points of the generated messages are valid, so that one change to them
/// explores the edge of what is accepted.
#[test]
fn unchanged_messages_and_files_are_accepted() {
    let patch = json!({"path": "/flags/skip-rate", "data": flag_json("skip-rate")});
    assert!(matches!(
        protocol::stream_event("patch", &patch.to_string()),
        Ok(Some(DataEvent::PatchFlag(_)))
    ));
    let put = json!({"path": "/", "data": {"flags": {"skip-rate": flag_json("skip-rate")},
                                           "segments": {"s": segment_json("s")}}});
    assert!(matches!(
        protocol::stream_event("put", &put.to_string()),
        Ok(Some(DataEvent::Put(data))) if data.flags.len() == 1 && data.segments.len() == 1
    ));
    let file = example_flag_file_json().to_string();
    let data = file::parse(Path::new("flags.json"), file.as_bytes()).expect("valid flag file");
    assert_eq!(data.flags.len(), 3);
}

#[test]
fn every_prefix_of_the_example_flag_file_is_a_clean_parse_error() {
    let whole = EXAMPLE_FLAGS.trim_ascii_end();
    assert!(file::parse(Path::new("flags.json"), EXAMPLE_FLAGS).is_ok());
    assert!(file::parse(Path::new("flags.json"), whole).is_ok());
    for end in 0..whole.len() {
        match file::parse(Path::new("flags.json"), &whole[..end]) {
            Err(FlagFileError::Parse { message, .. }) => assert!(!message.is_empty()),
            other => panic!("prefix of {end} bytes gave {other:?}"),
        }
    }
}

/// A flag file where `skip-rate` needs `f1`, which needs `f2`, and so on for `links` flags.
fn prerequisite_chain(links: usize) -> Vec<u8> {
    let mut flags = serde_json::Map::new();
    let names: Vec<String> = std::iter::once("skip-rate".to_owned())
        .chain((1..=links).map(|i| format!("f{i}")))
        .collect();
    for (i, name) in names.iter().enumerate() {
        let prerequisites = match names.get(i + 1) {
            Some(next) => json!([{"key": next, "variation": 1}]),
            None => json!([]),
        };
        flags.insert(
            name.clone(),
            json!({"on": true, "variations": [0, 25], "offVariation": 0,
                   "fallthrough": {"variation": 1}, "prerequisites": prerequisites}),
        );
    }
    json!({ "flags": flags }).to_string().into_bytes()
}

/// A flag file where `skip-rate` matches segment `s0`, whose rule matches `s1`, and so on.
fn segment_chain(links: usize) -> Vec<u8> {
    let mut segments = serde_json::Map::new();
    for i in 0..links {
        segments.insert(
            format!("s{i}"),
            json!({"version": 1, "included": [], "excluded": [], "salt": "s",
                   "rules": [{"id": "r", "clauses": [{"attribute": "key", "op": "segmentMatch",
                                                       "values": [format!("s{}", i + 1)],
                                                       "negate": false}]}]}),
        );
    }
    let flag = json!({"on": true, "variations": [0, 25], "offVariation": 0,
                      "fallthrough": {"variation": 0},
                      "rules": [{"id": "r", "variation": 1, "clauses": [
                          {"attribute": "key", "op": "segmentMatch", "values": ["s0"],
                           "negate": false}]}]});
    json!({"flags": {"skip-rate": flag}, "segments": segments})
        .to_string()
        .into_bytes()
}

/// Set in the child process that evaluates the chains.
const CHAIN_CHILD: &str = "FLAGSHED_PROPERTIES_CHAIN_CHILD";

/// LaunchDarkly's evaluator recurses once per prerequisite and per nested segment. On a
/// thread with the default 2 MiB stack, like the flag source thread, a chain of about 700
/// prerequisites (or a few thousand nested segments) used to overflow the stack, aborting the
/// whole daemon: at start, on a reload, or when such data arrived from LaunchDarkly. Such a
/// file must be refused or evaluated, never crash. A stack overflow cannot be caught, so the
/// evaluation runs in a child process.
#[test]
fn long_prerequisite_and_segment_chains_do_not_crash() {
    if std::env::var_os(CHAIN_CHILD).is_some() {
        for file in [prerequisite_chain(1_000), segment_chain(5_000)] {
            std::thread::spawn(move || check_flag_file(&file))
                .join()
                .expect("the evaluation thread");
        }
        return;
    }
    let output = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "long_prerequisite_and_segment_chains_do_not_crash",
            "--include-ignored",
            "--nocapture",
        ])
        .env(CHAIN_CHILD, "1")
        .output()
        .expect("run the test binary");
    assert!(
        output.status.success(),
        "evaluating the chains crashed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    // A renamed test would make the child run nothing and pass: it must have run this one.
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("test result: ok. 1 passed"),
        "the child ran something else than this one test:\n{stdout}"
    );
}

// ---------------------------------------------------------------------------------------------
// The config file

const EXAMPLE_CONFIG: &str = include_str!("../etc/flagshed.toml");
const CONFIG_PATH: &str = "/etc/flagshed/test.toml";

/// Any refusal names the file, fits on one line, and names the key when it is about one.
fn check_config(text: &str) -> Result<Config, ConfigError> {
    let result = Config::parse(Path::new(CONFIG_PATH), text);
    if let Err(e) = &result {
        let message = e.to_string();
        assert!(
            message.starts_with(&format!("{CONFIG_PATH}: ")),
            "{message}"
        );
        assert!(!message.contains('\n'), "{message}");
        if let ConfigError::Invalid { key, .. } = e {
            assert!(message.contains(key), "{message}");
        }
    }
    result
}

/// Every `(section, key)` of the example config, with its value.
fn example_entries() -> Vec<(String, String, toml::Value)> {
    let table: toml::Table = toml::from_str(EXAMPLE_CONFIG).expect("the example config is TOML");
    let mut entries = Vec::new();
    for (section, keys) in table {
        let toml::Value::Table(keys) = keys else {
            panic!("top-level key {section} is not a section");
        };
        for (key, value) in keys {
            entries.push((section.clone(), key, value));
        }
    }
    entries
}

/// Values of every TOML type but the one `original` has (and, for a float, but an integer,
/// which TOML readers may take as a float).
fn wrong_type_for(original: &toml::Value) -> Vec<toml::Value> {
    let mut inline = toml::Table::new();
    inline.insert("x".into(), toml::Value::Integer(1));
    let candidates = [
        toml::Value::String("text".into()),
        toml::Value::Integer(7),
        toml::Value::Float(2.5),
        toml::Value::Boolean(true),
        toml::Value::Array(vec![toml::Value::Integer(1)]),
        toml::Value::Table(inline),
        "1979-05-27T07:32:00Z"
            .parse::<toml::value::Datetime>()
            .map(toml::Value::Datetime)
            .expect("a TOML datetime"),
    ];
    candidates
        .into_iter()
        .filter(|c| c.type_str() != original.type_str())
        .filter(|c| !(original.is_float() && c.is_integer()))
        .collect()
}

/// TOML-looking text: section headers, the real keys, values of every type, and noise.
fn toml_ish() -> impl Strategy<Value = String> {
    let keys: Vec<String> = example_entries().into_iter().map(|(_, k, _)| k).collect();
    let piece = prop_oneof![
        2 => select(vec!["[broker]", "[worker]", "[queuer]", "[flags]", "[launchdarkly]", "[log]", "[[worker]]", "[x.y]"]).prop_map(str::to_owned),
        4 => (select(keys), select(vec![
            "1", "0", "-1", "65536", "18446744073709551615", "99999999999999999999", "1.5", "nan",
            "-inf", "true", "\"\"", "\"quorum\"", "\"ack\"", "\"amqp://h/%2f\"", "\"http://x\"",
            "[]", "{}", "1979-05-27", "\"\\u0000\"", "'''a\nb'''",
        ])).prop_map(|(k, v)| format!("{k} = {v}")),
        1 => any::<String>(),
    ];
    vec(piece, 0..12).prop_map(|lines| lines.join("\n"))
}

proptest! {
    #[test]
    fn config_of_arbitrary_text_is_ok_or_a_one_line_error(text in any::<String>()) {
        let _ = check_config(&text);
    }

    #[test]
    fn config_of_toml_ish_text_is_ok_or_a_one_line_error(text in toml_ish()) {
        let _ = check_config(&text);
    }

    #[test]
    fn config_value_of_the_wrong_type_is_refused_naming_the_key(
        entry in any::<prop::sample::Index>(),
        replacement in any::<prop::sample::Index>(),
    ) {
        let entries = example_entries();
        let (section, key, original) = &entries[entry.index(entries.len())];
        let choices = wrong_type_for(original);
        let wrong = choices[replacement.index(choices.len())].clone();
        let mut table: toml::Table = toml::from_str(EXAMPLE_CONFIG).expect("TOML");
        if let Some(toml::Value::Table(keys)) = table.get_mut(section) {
            keys.insert(key.clone(), wrong.clone());
        }
        let text = toml::to_string(&table).expect("serialize the config");
        match check_config(&text) {
            Err(ConfigError::Parse { key: named, message, .. }) => {
                prop_assert_eq!(named, format!("{section}.{key}"), "{}", message);
            }
            other => prop_assert!(false, "{}.{} = {} gave {:?}", section, key, wrong, other),
        }
    }
}

#[test]
fn example_config_is_valid() {
    check_config(EXAMPLE_CONFIG).expect("etc/flagshed.toml loads");
}
