//! The flag data set held by the source thread: flags and segments with their versions,
//! including tombstones for deleted items, in the shape LaunchDarkly's protocol updates.
//!
//! Version rules follow LaunchDarkly's SDKs: a patch or delete applies only when its version
//! is newer than what is held, so a late or replayed event cannot roll a flag back, and a
//! deleted item's tombstone keeps its version so a stale patch cannot resurrect it.

use launchdarkly_server_sdk_evaluation::{Flag, Segment, Store};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// One item or its tombstone.
#[derive(Clone, Debug)]
enum Slot<T> {
    Live(T),
    Deleted { version: u64 },
}

/// A complete data set, as a LaunchDarkly `put` or a flag file delivers it.
///
/// Read item by item: one flag or segment that does not parse (a missing field, a value of
/// the wrong type) is listed in `unusable` rather than failing the whole data set, so one bad
/// flag cannot take every other flag down with it. The store keeps what it held for an
/// unusable item.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AllData {
    pub flags: HashMap<String, Flag>,
    pub segments: HashMap<String, Segment>,
    /// Items that did not parse: (`flags/key` or `segments/key`, why).
    #[serde(skip)]
    pub unusable: Vec<(String, String)>,
}

impl<'de> Deserialize<'de> for AllData {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<AllData, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            #[serde(default)]
            flags: HashMap<String, serde_json::Value>,
            #[serde(default)]
            segments: HashMap<String, serde_json::Value>,
        }
        let raw = Raw::deserialize(deserializer)?;
        let mut all = AllData::default();
        for (key, value) in raw.flags {
            match serde_json::from_value::<Flag>(value) {
                Ok(flag) => {
                    all.flags.insert(key, flag);
                }
                Err(e) => all.unusable.push((format!("flags/{key}"), e.to_string())),
            }
        }
        for (key, value) in raw.segments {
            match serde_json::from_value::<Segment>(value) {
                Ok(segment) => {
                    all.segments.insert(key, segment);
                }
                Err(e) => all
                    .unusable
                    .push((format!("segments/{key}"), e.to_string())),
            }
        }
        all.unusable.sort();
        Ok(all)
    }
}

/// One change to the data set, from any source.
#[derive(Clone, Debug)]
pub enum DataEvent {
    /// Replace everything (LaunchDarkly `put`, a poll, a re-read flag file).
    Put(AllData),
    /// Upsert one flag if its version is newer.
    PatchFlag(Box<Flag>),
    /// Upsert one segment if its version is newer.
    PatchSegment(Box<Segment>),
    /// Tombstone one flag if `version` is newer.
    DeleteFlag { key: String, version: u64 },
    /// Tombstone one segment if `version` is newer.
    DeleteSegment { key: String, version: u64 },
}

/// The flags and segments the evaluator reads.
#[derive(Debug, Default)]
pub struct FlagStore {
    flags: HashMap<String, Slot<Flag>>,
    segments: HashMap<String, Slot<Segment>>,
}

fn held_version<T>(slot: Option<&Slot<T>>, version_of: impl Fn(&T) -> u64) -> Option<u64> {
    slot.map(|s| match s {
        Slot::Live(item) => version_of(item),
        Slot::Deleted { version } => *version,
    })
}

impl FlagStore {
    /// Applies one event; returns whether anything changed (so the caller knows to
    /// re-evaluate and persist).
    pub fn apply(&mut self, event: DataEvent) -> bool {
        match event {
            DataEvent::Put(all) => {
                let mut flags: HashMap<String, Slot<Flag>> = all
                    .flags
                    .into_iter()
                    .map(|(k, f)| (k, Slot::Live(f)))
                    .collect();
                let mut segments: HashMap<String, Slot<Segment>> = all
                    .segments
                    .into_iter()
                    .map(|(k, s)| (k, Slot::Live(s)))
                    .collect();
                // What was held for an item that did not parse is kept.
                for (item, _) in &all.unusable {
                    if let Some(key) = item.strip_prefix("flags/") {
                        if let Some(held) = self.flags.remove(key) {
                            flags.insert(key.to_owned(), held);
                        }
                    } else if let Some(key) = item.strip_prefix("segments/") {
                        if let Some(held) = self.segments.remove(key) {
                            segments.insert(key.to_owned(), held);
                        }
                    }
                }
                self.flags = flags;
                self.segments = segments;
                true
            }
            DataEvent::PatchFlag(flag) => {
                let held = held_version(self.flags.get(&flag.key), |f| f.version);
                if held.is_some_and(|v| v >= flag.version) {
                    return false;
                }
                self.flags.insert(flag.key.clone(), Slot::Live(*flag));
                true
            }
            DataEvent::PatchSegment(segment) => {
                let held = held_version(self.segments.get(&segment.key), |s| s.version);
                if held.is_some_and(|v| v >= segment.version) {
                    return false;
                }
                self.segments
                    .insert(segment.key.clone(), Slot::Live(*segment));
                true
            }
            DataEvent::DeleteFlag { key, version } => {
                let held = held_version(self.flags.get(&key), |f| f.version);
                if held.is_some_and(|v| v >= version) {
                    return false;
                }
                self.flags.insert(key, Slot::Deleted { version });
                true
            }
            DataEvent::DeleteSegment { key, version } => {
                let held = held_version(self.segments.get(&key), |s| s.version);
                if held.is_some_and(|v| v >= version) {
                    return false;
                }
                self.segments.insert(key, Slot::Deleted { version });
                true
            }
        }
    }

    /// The live items, for the state file (tombstones need not survive a restart: the next
    /// `put` re-syncs everything).
    pub fn snapshot(&self) -> AllData {
        AllData {
            unusable: Vec::new(),
            flags: self
                .flags
                .iter()
                .filter_map(|(k, s)| match s {
                    Slot::Live(f) => Some((k.clone(), f.clone())),
                    Slot::Deleted { .. } => None,
                })
                .collect(),
            segments: self
                .segments
                .iter()
                .filter_map(|(k, s)| match s {
                    Slot::Live(seg) => Some((k.clone(), seg.clone())),
                    Slot::Deleted { .. } => None,
                })
                .collect(),
        }
    }

    /// Whether the store holds any data at all.
    pub fn is_empty(&self) -> bool {
        self.flags.is_empty() && self.segments.is_empty()
    }
}

impl Store for FlagStore {
    fn flag(&self, flag_key: &str) -> Option<Flag> {
        match self.flags.get(flag_key)? {
            Slot::Live(flag) => Some(flag.clone()),
            Slot::Deleted { .. } => None,
        }
    }

    fn segment(&self, segment_key: &str) -> Option<Segment> {
        match self.segments.get(segment_key)? {
            Slot::Live(segment) => Some(segment.clone()),
            Slot::Deleted { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flag(key: &str, version: u64, value: f64) -> Flag {
        serde_json::from_value(serde_json::json!({
            "key": key, "version": version, "on": true, "variations": [value],
            "fallthrough": {"variation": 0}, "offVariation": 0, "salt": "s",
            "targets": [], "rules": [], "prerequisites": []
        }))
        .expect("valid flag JSON")
    }

    fn value_of(store: &FlagStore, key: &str) -> Option<u64> {
        store.flag(key).map(|f| f.version)
    }

    #[test]
    fn stale_patch_is_ignored() {
        let mut store = FlagStore::default();
        assert!(store.apply(DataEvent::PatchFlag(Box::new(flag("a", 5, 1.0)))));
        assert!(!store.apply(DataEvent::PatchFlag(Box::new(flag("a", 4, 2.0)))));
        assert!(!store.apply(DataEvent::PatchFlag(Box::new(flag("a", 5, 2.0)))));
        assert_eq!(value_of(&store, "a"), Some(5));
    }

    #[test]
    fn tombstone_blocks_older_patch() {
        let mut store = FlagStore::default();
        store.apply(DataEvent::PatchFlag(Box::new(flag("a", 1, 1.0))));
        assert!(store.apply(DataEvent::DeleteFlag {
            key: "a".into(),
            version: 3
        }));
        assert_eq!(value_of(&store, "a"), None);
        assert!(!store.apply(DataEvent::PatchFlag(Box::new(flag("a", 2, 1.0)))));
        assert_eq!(value_of(&store, "a"), None);
        assert!(store.apply(DataEvent::PatchFlag(Box::new(flag("a", 4, 1.0)))));
        assert_eq!(value_of(&store, "a"), Some(4));
    }

    #[test]
    fn put_replaces_everything() {
        let mut store = FlagStore::default();
        store.apply(DataEvent::PatchFlag(Box::new(flag("old", 9, 1.0))));
        let mut all = AllData::default();
        all.flags.insert("new".into(), flag("new", 1, 1.0));
        store.apply(DataEvent::Put(all));
        assert_eq!(value_of(&store, "old"), None);
        assert_eq!(value_of(&store, "new"), Some(1));
        assert_eq!(store.snapshot().flags.len(), 1);
    }

    #[test]
    fn one_unusable_flag_in_a_put_keeps_its_held_version_and_spares_the_rest() {
        let mut store = FlagStore::default();
        store.apply(DataEvent::PatchFlag(Box::new(flag("bad", 3, 1.0))));
        let body = serde_json::json!({
            "flags": {
                "good": {"key": "good", "version": 2, "on": true, "variations": [5],
                         "fallthrough": {"variation": 0}, "offVariation": 0, "salt": "s",
                         "targets": [], "rules": [], "prerequisites": []},
                // A rule without `trackEvents`, which the evaluation crate requires.
                "bad": {"key": "bad", "version": 4, "on": true, "variations": [7],
                        "fallthrough": {"variation": 0}, "offVariation": 0, "salt": "s",
                        "targets": [], "prerequisites": [],
                        "rules": [{"id": "r", "variation": 0, "clauses": []}]},
                "never-held": {"key": "never-held", "version": "one"}
            }
        });
        let all: AllData = serde_json::from_value(body).expect("the data set as a whole parses");
        assert_eq!(
            all.unusable
                .iter()
                .map(|(item, _)| item.as_str())
                .collect::<Vec<_>>(),
            ["flags/bad", "flags/never-held"]
        );
        store.apply(DataEvent::Put(all));
        assert_eq!(value_of(&store, "good"), Some(2));
        assert_eq!(value_of(&store, "bad"), Some(3), "the held version stays");
        assert_eq!(value_of(&store, "never-held"), None);
    }
}
