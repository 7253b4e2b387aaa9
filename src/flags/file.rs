//! The local flag file, in LaunchDarkly's file data-source format: `flags` (full flag
//! objects, evaluated with LaunchDarkly's rules), `flagValues` (a key and a value that is
//! always served) and `segments`. A file that does not parse changes nothing: the caller keeps
//! the previous data.

use super::store::AllData;
use launchdarkly_server_sdk_evaluation::{Flag, Segment};
use serde::Deserialize;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// Why a flag file was not applied; names the file and, where it can, the flag.
#[derive(Debug)]
pub enum FlagFileError {
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not JSON, or not an object with the expected top-level keys.
    Parse { path: PathBuf, message: String },
    /// One flag or segment object is not valid.
    Item {
        path: PathBuf,
        key: String,
        message: String,
    },
    /// The same flag key appears in both `flags` and `flagValues`.
    Duplicate { path: PathBuf, key: String },
}

impl fmt::Display for FlagFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FlagFileError::Read { path, source } => {
                write!(f, "{}: cannot read flag file: {source}", path.display())
            }
            FlagFileError::Parse { path, message } => {
                write!(f, "{}: not a valid flag file: {message}", path.display())
            }
            FlagFileError::Item { path, key, message } => {
                write!(f, "{}: flag or segment {key:?}: {message}", path.display())
            }
            FlagFileError::Duplicate { path, key } => write!(
                f,
                "{}: flag {key:?} is defined in both \"flags\" and \"flagValues\"",
                path.display()
            ),
        }
    }
}

impl std::error::Error for FlagFileError {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlagFile {
    #[serde(default)]
    flags: HashMap<String, serde_json::Value>,
    #[serde(default, rename = "flagValues")]
    flag_values: HashMap<String, serde_json::Value>,
    #[serde(default)]
    segments: HashMap<String, serde_json::Value>,
}

/// Reads and parses a flag file.
pub fn load(path: &Path) -> Result<AllData, FlagFileError> {
    let text = std::fs::read(path).map_err(|source| FlagFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text)
}

/// Parses flag-file bytes as if read from `path`.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<AllData, FlagFileError> {
    let raw: RawFlagFile = serde_json::from_slice(bytes).map_err(|e| FlagFileError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let item_error = |key: &str, e: serde_json::Error| FlagFileError::Item {
        path: path.to_owned(),
        key: key.to_owned(),
        message: e.to_string(),
    };
    let mut data = AllData::default();
    for (key, mut value) in raw.flags {
        if let Some(object) = value.as_object_mut() {
            fill_flag_defaults(object, &key);
        }
        let flag: Flag = serde_json::from_value(value).map_err(|e| item_error(&key, e))?;
        data.flags.insert(key, flag);
    }
    for (key, value) in raw.flag_values {
        if data.flags.contains_key(&key) {
            return Err(FlagFileError::Duplicate {
                path: path.to_owned(),
                key,
            });
        }
        let flag = constant_flag(&key, value).map_err(|e| item_error(&key, e))?;
        data.flags.insert(key, flag);
    }
    for (key, mut value) in raw.segments {
        if let Some(object) = value.as_object_mut() {
            object
                .entry("key")
                .or_insert_with(|| serde_json::Value::String(key.clone()));
        }
        let segment: Segment = serde_json::from_value(value).map_err(|e| item_error(&key, e))?;
        data.segments.insert(key, segment);
    }
    Ok(data)
}

/// Flags written by hand often leave out the empty lists, the key and the rules' event flags
/// that LaunchDarkly's own JSON always carries; the evaluation library requires them, so they
/// get their obvious defaults here.
fn fill_flag_defaults(object: &mut serde_json::Map<String, serde_json::Value>, key: &str) {
    use serde_json::Value;
    object
        .entry("key")
        .or_insert_with(|| Value::String(key.to_owned()));
    object
        .entry("salt")
        .or_insert_with(|| Value::String(key.to_owned()));
    for list in ["targets", "contextTargets", "rules", "prerequisites"] {
        object
            .entry(list)
            .or_insert_with(|| Value::Array(Vec::new()));
    }
    if let Some(Value::Array(rules)) = object.get_mut("rules") {
        for rule in rules.iter_mut().filter_map(Value::as_object_mut) {
            rule.entry("trackEvents").or_insert(Value::Bool(false));
        }
    }
}

/// What a `flagValues` entry means in LaunchDarkly's file source: a flag that is on and serves
/// one value to everyone.
fn constant_flag(key: &str, value: serde_json::Value) -> Result<Flag, serde_json::Error> {
    serde_json::from_value(serde_json::json!({
        "key": key, "version": 1, "on": true, "variations": [value],
        "fallthrough": {"variation": 0}, "offVariation": 0, "salt": "",
        "targets": [], "contextTargets": [], "rules": [], "prerequisites": []
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<AllData, FlagFileError> {
        parse(Path::new("flags.json"), text.as_bytes())
    }

    #[test]
    fn flag_values_become_constant_flags() {
        let data = parse_str(r#"{"flagValues": {"skip-rate": 25, "task-rate": 0.5}}"#).unwrap();
        assert_eq!(data.flags.len(), 2);
        let flag = serde_json::to_value(&data.flags["skip-rate"]).unwrap();
        assert_eq!(flag["on"], true);
        assert_eq!(flag["variations"][0], 25.0);
    }

    #[test]
    fn duplicate_key_is_an_error() {
        let err = parse_str(
            r#"{"flags": {"a": {"on":false,"variations":[1],"offVariation":0,
                "fallthrough":{"variation":0}}}, "flagValues": {"a": 2}}"#,
        )
        .unwrap_err();
        assert!(matches!(err, FlagFileError::Duplicate { .. }), "{err}");
    }

    #[test]
    fn truncated_file_is_a_parse_error() {
        let err = parse_str(r#"{"flagValues": {"skip-rate": 2"#).unwrap_err();
        assert!(matches!(err, FlagFileError::Parse { .. }), "{err}");
    }

    #[test]
    fn bad_flag_object_names_the_flag() {
        let err = parse_str(r#"{"flags": {"skip-rate": {"on": "yes"}}}"#).unwrap_err();
        assert!(err.to_string().contains("skip-rate"), "{err}");
    }

    #[test]
    fn unknown_top_level_key_is_an_error() {
        assert!(parse_str(r#"{"flagz": {}}"#).is_err());
    }
}
