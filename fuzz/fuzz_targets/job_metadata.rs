//! A job's AMQP properties, built from the input: headers of every AMQP type (nested tables
//! and arrays included) under the three timing names and others, any message id, any clock and
//! defaults. Parsing must return a clear result, and the shedding decision on a parsed job must
//! keep its documented meaning.

#![no_main]

use amiquip::{AmqpProperties, AmqpValue, FieldTable};
use arbitrary::{Result, Unstructured};
use flagshed::job::{self, HEADER_CREATED_MS, HEADER_DEADLINE_MS, HEADER_WORK_MS, JobDefaults};
use flagshed::shed::{self, PPM, Verdict};
use libfuzzer_sys::fuzz_target;

const NAMES: [&str; 3] = [HEADER_CREATED_MS, HEADER_DEADLINE_MS, HEADER_WORK_MS];

fn value(u: &mut Unstructured<'_>, depth: u32) -> Result<AmqpValue> {
    let kinds = if depth >= 3 { 14 } else { 16 };
    Ok(match u.int_in_range(0..=kinds)? {
        0 => AmqpValue::Boolean(u.arbitrary()?),
        1 => AmqpValue::ShortShortInt(u.arbitrary()?),
        2 => AmqpValue::ShortShortUInt(u.arbitrary()?),
        3 => AmqpValue::ShortInt(u.arbitrary()?),
        4 => AmqpValue::ShortUInt(u.arbitrary()?),
        5 => AmqpValue::LongInt(u.arbitrary()?),
        6 => AmqpValue::LongUInt(u.arbitrary()?),
        7 => AmqpValue::LongLongInt(u.arbitrary()?),
        8 => AmqpValue::Float(u.arbitrary()?),
        9 => AmqpValue::Double(u.arbitrary()?),
        10 => AmqpValue::LongString(u.arbitrary()?),
        11 => AmqpValue::Timestamp(u.arbitrary()?),
        12 => AmqpValue::ByteArray(u.arbitrary()?),
        13 => AmqpValue::Void,
        14 => {
            // amiquip does not re-export its decimal type; serde builds one.
            let (scale, value): (u8, u32) = (u.arbitrary()?, u.arbitrary()?);
            serde_json::from_value(
                serde_json::json!({"DecimalValue": {"scale": scale, "value": value}}),
            )
            .expect("a decimal AMQP value")
        }
        15 => {
            let mut items = Vec::new();
            for _ in 0..u.int_in_range(0..=4)? {
                items.push(value(u, depth + 1)?);
            }
            AmqpValue::FieldArray(items)
        }
        _ => AmqpValue::FieldTable(table(u, depth + 1)?),
    })
}

fn table(u: &mut Unstructured<'_>, depth: u32) -> Result<FieldTable> {
    let mut table = FieldTable::new();
    for _ in 0..u.int_in_range(0..=5)? {
        let key = if u.ratio(3, 4)? {
            NAMES[u.choose_index(NAMES.len())?].to_owned()
        } else {
            u.arbitrary()?
        };
        table.insert(key, value(u, depth)?);
    }
    Ok(table)
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let mut properties = AmqpProperties::default();
    if u.arbitrary()? {
        properties = properties.with_headers(table(u, 0)?);
    }
    let id: Option<String> = u.arbitrary()?;
    if let Some(id) = id.clone() {
        properties = properties.with_message_id(id);
    }
    let received_ms: u64 = u.arbitrary()?;
    let fallback_id: u64 = u.arbitrary()?;
    let defaults = JobDefaults {
        work_ms: u.arbitrary()?,
        ttl_ms: u.arbitrary()?,
    };
    let now_ms: u64 = u.arbitrary()?;
    let skip_ppm: u32 = u.arbitrary()?;
    let drop_doomed: bool = u.arbitrary()?;

    let meta = match job::parse(&properties, received_ms, fallback_id, defaults) {
        Ok(meta) => meta,
        Err(why) => {
            assert!(!why.to_string().is_empty());
            return Ok(());
        }
    };
    if let Some(id) = &id {
        assert_eq!(meta.id_hash, job::hash_id(id.as_bytes()));
    }
    let verdict = shed::at_receipt(&meta, now_ms, skip_ppm, drop_doomed);
    let expired = meta.deadline_ms.is_some_and(|d| now_ms >= d);
    let doomed = !expired
        && drop_doomed
        && meta
            .deadline_ms
            .is_some_and(|d| now_ms.saturating_add(meta.work_ms) > d);
    let expected = if expired {
        Verdict::Expired
    } else if doomed {
        Verdict::Doomed
    } else if meta.id_hash % PPM < u64::from(skip_ppm) {
        Verdict::Skipped
    } else {
        Verdict::Run
    };
    assert_eq!(verdict, expected, "{meta:?} now {now_ms} ppm {skip_ppm}");
    if skip_ppm == 0 {
        assert_ne!(verdict, Verdict::Skipped);
    }
    if u64::from(skip_ppm) >= PPM {
        assert_ne!(verdict, Verdict::Run);
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
