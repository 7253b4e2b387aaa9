//! A job's properties and headers as one JSON object, for handlers that want more than the
//! `FLAGSHED_*` variables carry (the exec handler passes it in `FLAGSHED_JOB_JSON`).
//!
//! AMQP values map to plain JSON: integers and floats to numbers, strings to strings, tables
//! to objects, arrays to arrays, byte arrays to lowercase hex strings, void to null, and a
//! decimal to a number (`value / 10^scale`). Absent properties are left out.

use super::Job;
use amiquip::{AmqpValue, FieldTable};
use serde_json::{Map, Value, json};

/// Past this size the headers are left out (`"headers_omitted": true`): one environment
/// variable may hold at most 128 KiB on Linux, and a job must not fail for being described.
pub const MAX_JOB_JSON_BYTES: usize = 96 * 1024;

/// `{"id":..,"type":..,"created_ms":..,"deadline_ms":..,"redelivered":..,
/// "properties":{..},"headers":{..}}`, at most [`MAX_JOB_JSON_BYTES`] long.
pub fn job_json(job: &Job<'_>) -> String {
    let full = describe(job, true);
    if full.len() <= MAX_JOB_JSON_BYTES {
        return full;
    }
    describe(job, false)
}

fn describe(job: &Job<'_>, with_headers: bool) -> String {
    let p = job.properties;
    let mut properties = Map::new();
    let mut put = |name: &str, value: Option<Value>| {
        if let Some(value) = value {
            properties.insert(name.to_owned(), value);
        }
    };
    put("content_type", p.content_type().clone().map(Value::String));
    put(
        "content_encoding",
        p.content_encoding().clone().map(Value::String),
    );
    put("delivery_mode", p.delivery_mode().map(Value::from));
    put("priority", p.priority().map(Value::from));
    put(
        "correlation_id",
        p.correlation_id().clone().map(Value::String),
    );
    put("reply_to", p.reply_to().clone().map(Value::String));
    put("expiration", p.expiration().clone().map(Value::String));
    put("message_id", p.message_id().clone().map(Value::String));
    put("timestamp", p.timestamp().map(Value::from));
    put("type", p.type_().clone().map(Value::String));
    put("user_id", p.user_id().clone().map(Value::String));
    put("app_id", p.app_id().clone().map(Value::String));
    let headers = match job.headers() {
        Some(headers) if with_headers => table(headers),
        _ => Value::Object(Map::new()),
    };
    let mut described = json!({
        "id": job.id,
        "type": job.job_type,
        "created_ms": job.created_ms,
        "deadline_ms": job.deadline_ms,
        "redelivered": job.redelivered,
        "properties": properties,
        "headers": headers,
    });
    if !with_headers {
        described["headers_omitted"] = Value::Bool(true);
    }
    described.to_string()
}

fn table(t: &FieldTable) -> Value {
    Value::Object(t.iter().map(|(k, v)| (k.clone(), value(v))).collect())
}

fn value(v: &AmqpValue) -> Value {
    match v {
        AmqpValue::Boolean(b) => Value::Bool(*b),
        AmqpValue::ShortShortInt(n) => Value::from(*n),
        AmqpValue::ShortShortUInt(n) => Value::from(*n),
        AmqpValue::ShortInt(n) => Value::from(*n),
        AmqpValue::ShortUInt(n) => Value::from(*n),
        AmqpValue::LongInt(n) => Value::from(*n),
        AmqpValue::LongUInt(n) => Value::from(*n),
        AmqpValue::LongLongInt(n) => Value::from(*n),
        AmqpValue::Timestamp(n) => Value::from(*n),
        AmqpValue::Float(x) => Value::from(f64::from(*x)),
        AmqpValue::Double(x) => Value::from(*x),
        AmqpValue::DecimalValue(d) => {
            Value::from(f64::from(d.value) / 10f64.powi(i32::from(d.scale)))
        }
        AmqpValue::LongString(s) => Value::String(s.clone()),
        AmqpValue::FieldArray(items) => Value::Array(items.iter().map(value).collect()),
        AmqpValue::FieldTable(t) => table(t),
        AmqpValue::ByteArray(bytes) => {
            Value::String(bytes.iter().map(|b| format!("{b:02x}")).collect())
        }
        AmqpValue::Void => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amiquip::AmqpProperties;

    #[test]
    fn headers_and_properties_become_plain_json() {
        let mut headers = FieldTable::new();
        headers.insert("x-tenant".into(), AmqpValue::LongString("acme".into()));
        headers.insert("x-n".into(), AmqpValue::LongLongInt(-3));
        headers.insert("x-raw".into(), AmqpValue::ByteArray(vec![0, 255]));
        let properties = AmqpProperties::default()
            .with_message_id("job-1".into())
            .with_type_("thumbnail".into())
            .with_headers(headers);
        let job = Job {
            id: Some("job-1"),
            job_type: "thumbnail",
            properties: &properties,
            body: b"",
            created_ms: 10,
            deadline_ms: Some(20),
            stop_at_ms: Some(20),
            work_ms: 0,
            redelivered: true,
        };
        let parsed: Value = serde_json::from_str(&job_json(&job)).expect("valid JSON");
        assert_eq!(parsed["id"], "job-1");
        assert_eq!(parsed["type"], "thumbnail");
        assert_eq!(parsed["deadline_ms"], 20);
        assert_eq!(parsed["redelivered"], true);
        assert_eq!(parsed["properties"]["message_id"], "job-1");
        assert_eq!(parsed["headers"]["x-tenant"], "acme");
        assert_eq!(parsed["headers"]["x-n"], -3);
        assert_eq!(parsed["headers"]["x-raw"], "00ff");
        assert_eq!(parsed.get("headers_omitted"), None);
    }

    #[test]
    fn huge_headers_are_left_out_so_the_variable_fits() {
        let mut headers = FieldTable::new();
        headers.insert(
            "x-big".into(),
            AmqpValue::LongString("\u{1}".repeat(60_000)),
        );
        let properties = AmqpProperties::default().with_headers(headers);
        let job = Job {
            id: None,
            job_type: "",
            properties: &properties,
            body: b"",
            created_ms: 0,
            deadline_ms: None,
            stop_at_ms: None,
            work_ms: 0,
            redelivered: false,
        };
        let text = job_json(&job);
        assert!(text.len() <= MAX_JOB_JSON_BYTES, "{}", text.len());
        let parsed: Value = serde_json::from_str(&text).expect("valid JSON");
        assert_eq!(parsed["headers_omitted"], true);
    }
}
