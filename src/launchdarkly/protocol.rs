//! LaunchDarkly's data messages: the bodies of the stream's `put`, `patch` and `delete`
//! events and of a polling response, turned into [`DataEvent`]s for the flag store.
//!
//! Each body is parsed completely before anything is returned, so a message that does not
//! parse changes nothing (the caller then restarts the stream and the next `put` re-syncs).
//! Unknown event names and item kinds are ignored rather than refused, because LaunchDarkly
//! adds them over time and an older client must keep working when it does.

use crate::flags::store::{AllData, DataEvent};
use launchdarkly_server_sdk_evaluation::{Flag, Segment};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use std::fmt;

/// A data message that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// The body is not the JSON the event name promises.
    Body {
        /// The event's name (`latest-all` for a polling response).
        event: String,
        /// The JSON parser's complaint, with line and column.
        message: String,
    },
    /// The path names a known kind of item but no key (`/flags/`).
    Path {
        /// The event's name.
        event: String,
        /// The path as sent.
        path: String,
    },
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::Body { event, message } => {
                write!(f, "malformed {event:?} event: {message}")
            }
            ProtocolError::Path { event, path } => {
                write!(f, "{event:?} event has an unusable path {path:?}")
            }
        }
    }
}

impl std::error::Error for ProtocolError {}

#[derive(Deserialize)]
struct PutBody {
    #[serde(default)]
    path: String,
    data: AllData,
}

#[derive(Deserialize)]
struct PatchBody {
    path: String,
    data: serde_json::Value,
}

#[derive(Deserialize)]
struct DeleteBody {
    path: String,
    version: u64,
}

/// Which item a path names.
enum Target<'a> {
    Flag(&'a str),
    Segment(&'a str),
    /// A kind this client does not know; ignored.
    Other,
}

fn target<'a>(event: &str, path: &'a str) -> Result<Target<'a>, ProtocolError> {
    let (kind, key) = if let Some(key) = path.strip_prefix("/flags/") {
        (Target::Flag(key), key)
    } else if let Some(key) = path.strip_prefix("/segments/") {
        (Target::Segment(key), key)
    } else {
        return Ok(Target::Other);
    };
    if key.is_empty() {
        return Err(ProtocolError::Path {
            event: event.to_owned(),
            path: path.to_owned(),
        });
    }
    Ok(kind)
}

fn parse<T: DeserializeOwned>(event: &str, text: &str) -> Result<T, ProtocolError> {
    serde_json::from_str(text).map_err(|e| ProtocolError::Body {
        event: event.to_owned(),
        message: e.to_string(),
    })
}

fn item<T: DeserializeOwned>(event: &str, value: serde_json::Value) -> Result<T, ProtocolError> {
    serde_json::from_value(value).map_err(|e| ProtocolError::Body {
        event: event.to_owned(),
        message: e.to_string(),
    })
}

/// Turns one stream event into a change for the store; `Ok(None)` for events and paths this
/// client does not use.
pub fn stream_event(name: &str, data: &str) -> Result<Option<DataEvent>, ProtocolError> {
    match name {
        "put" => {
            let body: PutBody = parse(name, data)?;
            if body.path.is_empty() || body.path == "/" {
                Ok(Some(DataEvent::Put(body.data)))
            } else {
                // Only the whole data set is ever sent this way; a partial `put` would need
                // merging rules the protocol does not define, so it is not applied.
                Ok(None)
            }
        }
        "patch" => {
            let body: PatchBody = parse(name, data)?;
            match target(name, &body.path)? {
                Target::Flag(key) => {
                    let mut flag: Flag = item(name, body.data)?;
                    // The path names the item, as in LaunchDarkly's SDKs; the body's own key
                    // is redundant.
                    flag.key = key.to_owned();
                    Ok(Some(DataEvent::PatchFlag(Box::new(flag))))
                }
                Target::Segment(key) => {
                    let mut segment: Segment = item(name, body.data)?;
                    segment.key = key.to_owned();
                    Ok(Some(DataEvent::PatchSegment(Box::new(segment))))
                }
                Target::Other => Ok(None),
            }
        }
        "delete" => {
            let body: DeleteBody = parse(name, data)?;
            let version = body.version;
            match target(name, &body.path)? {
                Target::Flag(key) => Ok(Some(DataEvent::DeleteFlag {
                    key: key.to_owned(),
                    version,
                })),
                Target::Segment(key) => Ok(Some(DataEvent::DeleteSegment {
                    key: key.to_owned(),
                    version,
                })),
                Target::Other => Ok(None),
            }
        }
        _ => Ok(None),
    }
}

/// Turns a polling response (`GET /sdk/latest-all`) into a whole-data-set change.
pub fn poll_body(body: &[u8]) -> Result<DataEvent, ProtocolError> {
    serde_json::from_slice::<AllData>(body)
        .map(DataEvent::Put)
        .map_err(|e| ProtocolError::Body {
            event: "latest-all".to_owned(),
            message: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn flag_json(key: &str, version: u64) -> serde_json::Value {
        json!({
            "key": key, "version": version, "on": true, "variations": [0, 50],
            "fallthrough": {"variation": 1}, "offVariation": 0, "salt": "s",
            "targets": [], "rules": [], "prerequisites": []
        })
    }

    fn segment_json(key: &str, version: u64) -> serde_json::Value {
        json!({"key": key, "version": version, "included": [], "excluded": [],
               "rules": [], "salt": "s"})
    }

    #[test]
    fn put_gives_the_whole_data_set() {
        let body = json!({"path": "/", "data": {
            "flags": {"a": flag_json("a", 1)}, "segments": {"s": segment_json("s", 2)}}});
        match stream_event("put", &body.to_string()) {
            Ok(Some(DataEvent::Put(all))) => {
                assert_eq!(all.flags["a"].version, 1);
                assert_eq!(all.segments["s"].version, 2);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn put_with_empty_or_missing_path_is_the_root() {
        for body in [
            json!({"path": "", "data": {"flags": {}}}),
            json!({"data": {"segments": {}}}),
        ] {
            assert!(matches!(
                stream_event("put", &body.to_string()),
                Ok(Some(DataEvent::Put(_)))
            ));
        }
    }

    #[test]
    fn patch_flag_and_segment() {
        let body = json!({"path": "/flags/a", "data": flag_json("a", 3)});
        match stream_event("patch", &body.to_string()) {
            Ok(Some(DataEvent::PatchFlag(flag))) => {
                assert_eq!((flag.key.as_str(), flag.version), ("a", 3));
            }
            other => panic!("unexpected {other:?}"),
        }
        let body = json!({"path": "/segments/s", "data": segment_json("s", 4)});
        assert!(matches!(
            stream_event("patch", &body.to_string()),
            Ok(Some(DataEvent::PatchSegment(s))) if s.key == "s" && s.version == 4
        ));
    }

    #[test]
    fn patch_path_names_the_item() {
        let body = json!({"path": "/flags/b", "data": flag_json("a", 3)});
        assert!(matches!(
            stream_event("patch", &body.to_string()),
            Ok(Some(DataEvent::PatchFlag(f))) if f.key == "b"
        ));
    }

    #[test]
    fn delete_flag_and_segment() {
        let body = json!({"path": "/flags/a", "version": 9});
        assert!(matches!(
            stream_event("delete", &body.to_string()),
            Ok(Some(DataEvent::DeleteFlag { key, version: 9 })) if key == "a"
        ));
        let body = json!({"path": "/segments/s", "version": 2});
        assert!(matches!(
            stream_event("delete", &body.to_string()),
            Ok(Some(DataEvent::DeleteSegment { key, version: 2 })) if key == "s"
        ));
    }

    #[test]
    fn unknown_events_and_kinds_are_ignored() {
        assert!(matches!(stream_event("message", "not json"), Ok(None)));
        assert!(matches!(stream_event("reconnect", ""), Ok(None)));
        let body = json!({"path": "/configs/x", "data": {}});
        assert!(matches!(stream_event("patch", &body.to_string()), Ok(None)));
        let body = json!({"path": "/other/x", "version": 1});
        assert!(matches!(
            stream_event("delete", &body.to_string()),
            Ok(None)
        ));
    }

    #[test]
    fn bodies_that_do_not_parse_are_errors() {
        for (name, data) in [
            ("put", "{"),
            ("put", "{\"path\":\"/\"}"),
            ("patch", "[]"),
            (
                "patch",
                "{\"path\":\"/flags/a\",\"data\":{\"version\":\"x\"}}",
            ),
            ("delete", "{\"path\":\"/flags/a\"}"),
            ("delete", "{\"path\":\"/flags/a\",\"version\":-1}"),
            ("delete", ""),
        ] {
            assert!(
                matches!(stream_event(name, data), Err(ProtocolError::Body { .. })),
                "{name} {data}"
            );
        }
    }

    #[test]
    fn a_put_with_an_unusable_flag_is_applied_without_it() {
        let data = "{\"path\":\"/\",\"data\":{\"flags\":{\"a\":{\"key\":1}}}}";
        match stream_event("put", data) {
            Ok(Some(DataEvent::Put(all))) => {
                assert!(all.flags.is_empty());
                assert_eq!(all.unusable.len(), 1);
                assert_eq!(all.unusable[0].0, "flags/a");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn path_without_key_is_an_error() {
        let body = json!({"path": "/flags/", "version": 1});
        assert!(matches!(
            stream_event("delete", &body.to_string()),
            Err(ProtocolError::Path { .. })
        ));
    }

    #[test]
    fn poll_body_is_a_put() {
        let body = json!({"flags": {"a": flag_json("a", 1)}, "segments": {}});
        assert!(matches!(
            poll_body(body.to_string().as_bytes()),
            Ok(DataEvent::Put(all)) if all.flags.len() == 1
        ));
        assert!(poll_body(b"<html>").is_err());
    }
}
