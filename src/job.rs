//! A job's metadata on the wire, and its parsing.
//!
//! Any producer can publish a job, so its timing travels in standard AMQP properties and
//! headers, never in the body (which is the handler's opaque payload):
//!
//! | where | meaning |
//! | --- | --- |
//! | `message_id` | the job id (drives the skip decision) |
//! | header `x-created-ms` | enqueue time, Unix epoch milliseconds |
//! | header `x-deadline-ms` | absolute deadline, Unix epoch milliseconds |
//! | header `x-work-ms` | the job's work time, if the producer knows it (else the worker learns it per type) |
//!
//! A header that is present but not a non-negative integer makes the job `malformed`.
//! Parsing is on the hot path: it looks up three keys and allocates nothing.

use amiquip::{AmqpProperties, AmqpValue, FieldTable};
use std::fmt;

/// Header carrying the enqueue time.
pub const HEADER_CREATED_MS: &str = "x-created-ms";
/// Header carrying the absolute deadline.
pub const HEADER_DEADLINE_MS: &str = "x-deadline-ms";
/// Header carrying the job's work time, when the producer knows it.
pub const HEADER_WORK_MS: &str = "x-work-ms";

/// Largest `x-work-ms` accepted (one day): more is a producer bug, not a job.
pub const MAX_WORK_MS: u64 = 86_400_000;

/// The worker's defaults for jobs whose headers leave something out.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct JobDefaults {
    pub work_ms: u64,
    /// Time-to-live for a job without `x-deadline-ms`; `None`: no deadline.
    pub ttl_ms: Option<u64>,
}

/// A job's timing, resolved against the defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobMeta {
    /// A well-mixed hash of the job id: what the skip decision compares.
    pub id_hash: u64,
    /// When the job was enqueued (or received, if the producer did not say).
    pub created_ms: u64,
    /// `None`: the job can wait forever.
    pub deadline_ms: Option<u64>,
    /// The work to budget for: `x-work-ms`, or the default when the producer did not say.
    pub work_ms: u64,
    /// Whether `work_ms` came from the producer; if not, the worker budgets what it has
    /// learned of the job's type instead.
    pub work_declared: bool,
}

/// Why a job's metadata was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malformed {
    /// A timing header has a type that is not an integer.
    NotAnInteger {
        header: &'static str,
        found: &'static str,
    },
    /// A timing header is a negative integer.
    Negative { header: &'static str },
    /// `x-work-ms` is larger than [`MAX_WORK_MS`].
    WorkTooLong { work_ms: u64 },
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Malformed::NotAnInteger { header, found } => {
                write!(f, "header {header} is {found}, expected an integer")
            }
            Malformed::Negative { header } => write!(f, "header {header} is negative"),
            Malformed::WorkTooLong { work_ms } => {
                write!(
                    f,
                    "header {HEADER_WORK_MS} is {work_ms}, more than {MAX_WORK_MS}"
                )
            }
        }
    }
}

/// Reads a job's timing from its AMQP properties. `fallback_id` seeds the skip hash of a job
/// without a `message_id` (the delivery tag will do: such jobs are then skipped by arrival).
pub fn parse(
    properties: &AmqpProperties,
    received_ms: u64,
    fallback_id: u64,
    defaults: JobDefaults,
) -> Result<JobMeta, Malformed> {
    let headers = properties.headers().as_ref();
    let created_ms = header_ms(headers, HEADER_CREATED_MS)?.unwrap_or(received_ms);
    let deadline_ms = match header_ms(headers, HEADER_DEADLINE_MS)? {
        Some(deadline) => Some(deadline),
        None => defaults.ttl_ms.map(|ttl| created_ms.saturating_add(ttl)),
    };
    let declared_work_ms = match header_ms(headers, HEADER_WORK_MS)? {
        Some(work) if work > MAX_WORK_MS => return Err(Malformed::WorkTooLong { work_ms: work }),
        declared => declared,
    };
    let id_hash = match properties.message_id() {
        Some(id) => hash_id(id.as_bytes()),
        None => mix64(fallback_id),
    };
    Ok(JobMeta {
        id_hash,
        created_ms,
        deadline_ms,
        work_ms: declared_work_ms.unwrap_or(defaults.work_ms),
        work_declared: declared_work_ms.is_some(),
    })
}

/// The AMQP `expiration` property (a per-message time-to-live, milliseconds as a decimal
/// string), if it holds a number.
pub fn expiration_ms(properties: &AmqpProperties) -> Option<u64> {
    properties.expiration().as_deref()?.trim().parse().ok()
}

/// Until when the job may go back to the queue and still be worth delivering again: the
/// earlier of its deadline and the moment RabbitMQ drops it for its `expiration`. RabbitMQ
/// counts an expiration from the publish and keeps that moment across requeues, and a
/// requeued message past it is dropped (dead-lettered as `expired`) rather than delivered, so
/// a job handed back after this moment would end with no final state recorded anywhere.
///
/// The publish is taken to be `x-created-ms`, which a producer sets just before publishing;
/// without it, the `timestamp` property (whole seconds, rounded down), and failing that the
/// job's creation as [`parse`] resolved it (its receipt): then the moment may come later than
/// RabbitMQ's, so producers that set an expiration should set `x-created-ms` too.
pub fn keep_until_ms(meta: &JobMeta, properties: &AmqpProperties) -> Option<u64> {
    let expires = expiration_ms(properties).map(|ttl| {
        let created_header = properties
            .headers()
            .as_ref()
            .is_some_and(|h| h.contains_key(HEADER_CREATED_MS));
        let published = match properties.timestamp() {
            Some(secs) if !created_header => secs.saturating_mul(1000).min(meta.created_ms),
            _ => meta.created_ms,
        };
        published.saturating_add(ttl)
    });
    match (meta.deadline_ms, expires) {
        (Some(deadline), Some(expires)) => Some(deadline.min(expires)),
        (deadline, expires) => deadline.or(expires),
    }
}

/// A header's value as a non-negative integer of any AMQP integer type; `Ok(None)` when absent.
pub(crate) fn header_ms(
    headers: Option<&FieldTable>,
    name: &'static str,
) -> Result<Option<u64>, Malformed> {
    let Some(value) = headers.and_then(|h| h.get(name)) else {
        return Ok(None);
    };
    let signed: i128 = match value {
        AmqpValue::ShortShortInt(v) => i128::from(*v),
        AmqpValue::ShortShortUInt(v) => i128::from(*v),
        AmqpValue::ShortInt(v) => i128::from(*v),
        AmqpValue::ShortUInt(v) => i128::from(*v),
        AmqpValue::LongInt(v) => i128::from(*v),
        AmqpValue::LongUInt(v) => i128::from(*v),
        AmqpValue::LongLongInt(v) => i128::from(*v),
        AmqpValue::Timestamp(v) => i128::from(*v),
        other => {
            return Err(Malformed::NotAnInteger {
                header: name,
                found: type_name(other),
            });
        }
    };
    if signed < 0 {
        return Err(Malformed::Negative { header: name });
    }
    Ok(Some(u64::try_from(signed).unwrap_or(u64::MAX)))
}

fn type_name(value: &AmqpValue) -> &'static str {
    match value {
        AmqpValue::Boolean(_) => "a boolean",
        AmqpValue::Float(_) | AmqpValue::Double(_) | AmqpValue::DecimalValue(_) => {
            "a fractional number"
        }
        AmqpValue::LongString(_) => "a string",
        AmqpValue::FieldArray(_) => "an array",
        AmqpValue::FieldTable(_) => "a table",
        AmqpValue::ByteArray(_) => "a byte array",
        AmqpValue::Void => "void",
        _ => "an integer",
    }
}

/// FNV-1a over the id, then a 64-bit finalizer: FNV alone leaves the low bits of similar ids
/// (`job-1`, `job-2`, ...) correlated, and the skip decision needs them uniform.
pub fn hash_id(bytes: &[u8]) -> u64 {
    mix64(fnv1a(FNV_OFFSET, bytes))
}

/// FNV-1a's starting state.
pub(crate) const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a over `bytes`, continuing from `hash`.
#[inline]
pub(crate) fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// splitmix64's finalizer: spreads every input bit over the output.
pub(crate) fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_until_is_the_earlier_of_deadline_and_expiration() {
        let created = 1_000_000;
        let meta = |deadline_ms| JobMeta {
            id_hash: 0,
            created_ms: created,
            deadline_ms,
            work_ms: 0,
            work_declared: false,
        };
        let mut headers = FieldTable::new();
        headers.insert(
            HEADER_CREATED_MS.to_owned(),
            AmqpValue::LongLongInt(created as i64),
        );
        let expiring = AmqpProperties::default()
            .with_headers(headers)
            .with_expiration("1500".into())
            .with_timestamp(created / 1000 - 5);
        assert_eq!(keep_until_ms(&meta(Some(created + 9_000)), &expiring), Some(created + 1_500));
        assert_eq!(keep_until_ms(&meta(Some(created + 900)), &expiring), Some(created + 900));
        assert_eq!(keep_until_ms(&meta(None), &expiring), Some(created + 1_500));
        let plain = AmqpProperties::default();
        assert_eq!(keep_until_ms(&meta(None), &plain), None);
        assert_eq!(keep_until_ms(&meta(Some(7)), &plain), Some(7));
        // Without x-created-ms, the timestamp (seconds) is the earliest the publish can be.
        let stamped = AmqpProperties::default()
            .with_expiration("1500".into())
            .with_timestamp(created / 1000 - 2);
        assert_eq!(keep_until_ms(&meta(None), &stamped), Some(created - 2_000 + 1_500));
        let unusable = AmqpProperties::default().with_expiration("soon".into());
        assert_eq!(keep_until_ms(&meta(None), &unusable), None);
    }

    const DEFAULTS: JobDefaults = JobDefaults {
        work_ms: 1000,
        ttl_ms: None,
    };

    fn props(headers: &[(&str, AmqpValue)]) -> AmqpProperties {
        let mut table = FieldTable::new();
        for (k, v) in headers {
            table.insert((*k).to_owned(), v.clone());
        }
        AmqpProperties::default()
            .with_message_id("job-1".into())
            .with_headers(table)
    }

    #[test]
    fn reads_all_three_headers() {
        let p = props(&[
            (HEADER_CREATED_MS, AmqpValue::LongLongInt(1_000)),
            (HEADER_DEADLINE_MS, AmqpValue::LongLongInt(3_000)),
            (HEADER_WORK_MS, AmqpValue::LongInt(200)),
        ]);
        let meta = parse(&p, 5_000, 0, DEFAULTS).unwrap();
        assert_eq!(meta.created_ms, 1_000);
        assert_eq!(meta.deadline_ms, Some(3_000));
        assert_eq!(meta.work_ms, 200);
        assert_eq!(meta.id_hash, hash_id(b"job-1"));
    }

    #[test]
    fn missing_headers_use_defaults() {
        let meta = parse(&AmqpProperties::default(), 5_000, 7, DEFAULTS).unwrap();
        assert_eq!(meta.created_ms, 5_000);
        assert_eq!(meta.deadline_ms, None);
        assert_eq!(meta.work_ms, 1000);
        let with_ttl = JobDefaults {
            ttl_ms: Some(250),
            ..DEFAULTS
        };
        let meta = parse(&AmqpProperties::default(), 5_000, 7, with_ttl).unwrap();
        assert_eq!(meta.deadline_ms, Some(5_250));
    }

    #[test]
    fn string_header_is_malformed() {
        let p = props(&[(HEADER_DEADLINE_MS, AmqpValue::LongString("soon".into()))]);
        let err = parse(&p, 0, 0, DEFAULTS).unwrap_err();
        assert_eq!(
            err,
            Malformed::NotAnInteger {
                header: HEADER_DEADLINE_MS,
                found: "a string"
            }
        );
    }

    #[test]
    fn negative_header_is_malformed() {
        let p = props(&[(HEADER_CREATED_MS, AmqpValue::LongLongInt(-5))]);
        assert_eq!(
            parse(&p, 0, 0, DEFAULTS).unwrap_err(),
            Malformed::Negative {
                header: HEADER_CREATED_MS
            }
        );
    }

    #[test]
    fn huge_work_is_malformed_and_huge_deadline_saturates() {
        let p = props(&[(HEADER_WORK_MS, AmqpValue::LongLongInt(i64::MAX))]);
        assert!(matches!(
            parse(&p, 0, 0, DEFAULTS),
            Err(Malformed::WorkTooLong { .. })
        ));
        let p = props(&[(HEADER_CREATED_MS, AmqpValue::Timestamp(u64::MAX))]);
        let far = JobDefaults {
            ttl_ms: Some(10),
            ..DEFAULTS
        };
        assert_eq!(parse(&p, 0, 0, far).unwrap().deadline_ms, Some(u64::MAX));
    }

    #[test]
    fn similar_ids_hash_uniformly() {
        // Bucket 100,000 sequential ids into 10 buckets by the skip decision's modulus.
        let mut buckets = [0u32; 10];
        for i in 0..100_000 {
            let h = hash_id(format!("job-{i}").as_bytes());
            buckets[((h % 1_000_000) / 100_000) as usize] += 1;
        }
        for count in buckets {
            assert!((9_500..=10_500).contains(&count), "{buckets:?}");
        }
    }
}
