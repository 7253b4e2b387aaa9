//! The shipped documentation and examples agree with the code.
//!
//! The keys the configuration accepts are taken from the code itself: `RawConfig` refuses
//! unknown keys, and serde's error for an unknown key lists every key the section accepts
//! ("expected one of `a`, `b`, ..."). Each of those keys must be documented in
//! man/flagshed.toml.5 and present in etc/flagshed.toml, and the man page must show the default
//! and type the example file gives. The example files must also load.

use flagshed::config::Config;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A (section, key) pair, such as ("worker", "concurrency").
type Key = (String, String);

fn repo_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn read(relative: &str) -> String {
    let path = repo_file(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The names serde lists in its unknown-field error for `text`: "expected one of `a`, `b`",
/// or "expected `a` or `b`" when there are two.
fn names_accepted_where(text: &str) -> Vec<String> {
    let error = Config::parse(Path::new("x.toml"), text)
        .expect_err("an unknown key must be refused")
        .to_string();
    let (_, expected) = error
        .split_once("expected")
        .unwrap_or_else(|| panic!("no list of expected fields in {error:?}"));
    let names: Vec<String> = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    assert!(!names.is_empty(), "no field names in {error:?}");
    names
}

/// Every (section, key) the configuration accepts, according to the code.
fn accepted_keys() -> BTreeSet<Key> {
    let sections = names_accepted_where("zz_unknown = 1\n");
    let mut keys = BTreeSet::new();
    for section in sections {
        for key in names_accepted_where(&format!("[{section}]\nzz_unknown = 1\n")) {
            keys.insert((section.clone(), key));
        }
    }
    keys
}

/// One key as man/flagshed.toml.5 documents it: `.BR key " = " default " (type; ...)"`.
#[derive(Debug)]
struct DocumentedKey {
    /// The default as written, with roff escapes resolved: TOML value syntax.
    default: String,
    /// "string", "path", "integer", "number" or "boolean".
    kind: String,
}

/// The arguments of a roff macro line, with double-quoted arguments kept whole.
fn macro_arguments(line: &str) -> Vec<String> {
    let mut arguments = Vec::new();
    let mut rest = line.trim_start();
    while !rest.is_empty() {
        if let Some(quoted) = rest.strip_prefix('"') {
            let end = quoted.find('"').unwrap_or(quoted.len());
            arguments.push(quoted[..end].to_owned());
            rest = quoted.get(end + 1..).unwrap_or("").trim_start();
        } else {
            let end = rest.find(' ').unwrap_or(rest.len());
            arguments.push(rest[..end].to_owned());
            rest = rest[end..].trim_start();
        }
    }
    arguments
}

/// Resolves the roff escapes the man page uses inside key lines.
fn unescape(roff: &str) -> String {
    roff.replace("\\(dq", "\"")
        .replace("\\(aq", "'")
        .replace("\\-", "-")
        .replace("\\&", "")
        .replace("\\e", "\\")
}

/// The keys documented in man/flagshed.toml.5, by (section, key). A section is a `.SH` heading
/// naming it in brackets ("[broker] SECTION"); a key is a `.TP` tag of the form
/// `.BR key " = " default " (type...)"`.
fn documented_keys() -> BTreeMap<Key, DocumentedKey> {
    let page = read("man/flagshed.toml.5");
    let mut keys = BTreeMap::new();
    let mut section: Option<String> = None;
    let mut lines = page.lines();
    while let Some(line) = lines.next() {
        if let Some(heading) = line.strip_prefix(".SH") {
            section = heading
                .split_once('[')
                .and_then(|(_, rest)| rest.split_once(']'))
                .map(|(name, _)| name.to_owned());
            continue;
        }
        let (Some(section), ".TP") = (&section, line.trim_end()) else {
            continue;
        };
        let Some(tag) = lines.next().and_then(|l| l.strip_prefix(".BR ")) else {
            continue;
        };
        let arguments = macro_arguments(tag);
        if arguments.len() != 4 || arguments[1] != " = " {
            continue;
        }
        let kind = arguments[3]
            .trim()
            .trim_start_matches('(')
            .trim_end_matches(')')
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_owned();
        let documented = DocumentedKey {
            default: unescape(&arguments[2]),
            kind,
        };
        let key = (section.clone(), arguments[0].clone());
        assert!(
            keys.insert(key.clone(), documented).is_none(),
            "{key:?} is documented twice"
        );
    }
    keys
}

/// etc/flagshed.toml as TOML values, by (section, key). A key that cannot be set with its
/// default (`handler.command` must name a program; `broker.urls` replaces `broker.url`) is
/// shown commented out as `#key = value` in its section, and counts as shown with that value.
fn example_config_values() -> BTreeMap<Key, toml::Value> {
    let text = read("etc/flagshed.toml");
    let table: toml::Table = text.parse().expect("etc/flagshed.toml is TOML");
    let mut values = BTreeMap::new();
    let mut section = None;
    for line in text.lines() {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(name.to_owned());
            continue;
        }
        let (Some(section), Some(commented)) = (&section, line.strip_prefix('#')) else {
            continue;
        };
        let Some((key, _)) = commented.split_once(" = ") else {
            continue;
        };
        let is_key = !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_');
        if let (true, Ok(mut parsed)) = (is_key, commented.parse::<toml::Table>()) {
            if let Some(value) = parsed.remove(key) {
                values.insert((section.clone(), key.to_owned()), value);
            }
        }
    }
    for (section, body) in table {
        let toml::Value::Table(body) = body else {
            panic!("etc/flagshed.toml: top-level key {section:?} is not a section");
        };
        for (key, value) in body {
            values.insert((section.clone(), key), value);
        }
    }
    values
}

fn dotted(keys: impl IntoIterator<Item = Key>) -> Vec<String> {
    keys.into_iter().map(|(s, k)| format!("{s}.{k}")).collect()
}

#[test]
fn accepted_keys_are_read_from_the_code() {
    let keys = accepted_keys();
    let sections: BTreeSet<&str> = keys.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(
        sections,
        BTreeSet::from([
            "broker",
            "flags",
            "handler",
            "launchdarkly",
            "log",
            "metrics",
            "queuer",
            "worker"
        ])
    );
    assert!(keys.contains(&("log".into(), "stats_interval_ms".into())));
}

#[test]
fn every_accepted_key_is_documented_in_the_man_page() {
    let documented = documented_keys();
    let missing: Vec<Key> = accepted_keys()
        .into_iter()
        .filter(|key| !documented.contains_key(key))
        .collect();
    assert!(
        missing.is_empty(),
        "man/flagshed.toml.5 does not document {:?}",
        dotted(missing)
    );
}

#[test]
fn man_page_documents_only_accepted_keys() {
    let accepted = accepted_keys();
    let unknown: Vec<Key> = documented_keys()
        .into_keys()
        .filter(|key| !accepted.contains(key))
        .collect();
    assert!(
        unknown.is_empty(),
        "man/flagshed.toml.5 documents keys the code refuses: {:?}",
        dotted(unknown)
    );
}

#[test]
fn every_accepted_key_is_in_the_example_config() {
    let example = example_config_values();
    let missing: Vec<Key> = accepted_keys()
        .into_iter()
        .filter(|key| !example.contains_key(key))
        .collect();
    assert!(
        missing.is_empty(),
        "etc/flagshed.toml does not show {:?}",
        dotted(missing)
    );
}

#[test]
fn man_page_defaults_and_types_match_the_example_config() {
    let example = example_config_values();
    let mut wrong = Vec::new();
    for ((section, key), documented) in documented_keys() {
        let name = format!("{section}.{key}");
        let Some(value) = example.get(&(section, key)) else {
            wrong.push(format!("{name}: not in etc/flagshed.toml"));
            continue;
        };
        let shown: Option<toml::Value> = format!("v = {}", documented.default)
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"));
        // "(none)": no default; the example shows a value of the right type.
        if documented.default != "(none)" && shown.as_ref() != Some(value) {
            wrong.push(format!(
                "{name}: man page default {} but etc/flagshed.toml has {value}",
                documented.default
            ));
        }
        let type_fits = match documented.kind.as_str() {
            "string" | "path" => value.is_str(),
            "integer" => value.is_integer(),
            "number" => value.is_float() || value.is_integer(),
            "boolean" => value.is_bool(),
            "array of strings" => value
                .as_array()
                .is_some_and(|items| items.iter().all(toml::Value::is_str)),
            "table of strings" => value
                .as_table()
                .is_some_and(|t| t.values().all(toml::Value::is_str)),
            _ => false,
        };
        if !type_fits {
            wrong.push(format!(
                "{name}: man page type {:?} does not fit {value}",
                documented.kind
            ));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn example_config_loads() {
    let path = repo_file("etc/flagshed.toml");
    if let Err(e) = Config::load(&path) {
        panic!("{e}");
    }
}

/// etc/flagshed.toml says "the value shown is the default": loading it must give the same
/// configuration as an empty file.
#[test]
fn example_config_values_are_the_code_defaults() {
    let path = repo_file("etc/flagshed.toml");
    let example = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let defaults = Config::parse(&path, "").unwrap_or_else(|e| panic!("{e}"));
    let differing: Vec<String> = [
        (
            "broker",
            format!("{:?}", example.broker),
            format!("{:?}", defaults.broker),
        ),
        (
            "worker",
            format!("{:?}", example.worker),
            format!("{:?}", defaults.worker),
        ),
        (
            "handler",
            format!("{:?}", example.handler),
            format!("{:?}", defaults.handler),
        ),
        (
            "queuer",
            format!("{:?}", example.queuer),
            format!("{:?}", defaults.queuer),
        ),
        (
            "flags",
            format!("{:?}", example.flags),
            format!("{:?}", defaults.flags),
        ),
        (
            "launchdarkly",
            format!("{:?}", example.launchdarkly),
            format!("{:?}", defaults.launchdarkly),
        ),
        (
            "log",
            format!("{:?}", example.log),
            format!("{:?}", defaults.log),
        ),
        (
            "metrics",
            format!("{:?}", example.metrics),
            format!("{:?}", defaults.metrics),
        ),
    ]
    .into_iter()
    .filter(|(_, shown, default)| shown != default)
    .map(|(section, shown, default)| {
        format!("[{section}]\n  etc/flagshed.toml: {shown}\n  empty file:        {default}")
    })
    .collect();
    assert!(
        differing.is_empty(),
        "etc/flagshed.toml differs from the code's defaults:\n{}",
        differing.join("\n")
    );
}

#[test]
fn example_flag_file_parses_and_defines_the_default_flags() {
    let path = repo_file("etc/flags.json");
    let data = flagshed::flags::file::load(&path).unwrap_or_else(|e| panic!("{e}"));
    for key in ["skip-rate", "task-rate"] {
        assert!(
            data.flags.contains_key(key),
            "etc/flags.json does not define {key:?}"
        );
    }
}
