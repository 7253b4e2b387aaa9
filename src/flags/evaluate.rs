//! Evaluating one watched flag to a number, with LaunchDarkly's rules, safely.
//!
//! LaunchDarkly's evaluator recurses once per prerequisite and per nested segment. Flag data
//! comes from outside (a flag file, the LaunchDarkly service), and a chain a few hundred links
//! long overflows a thread's stack, which no error handling can catch: the daemon would abort.
//! It also evaluates a prerequisite once per path that reaches it, so a lattice of flags that
//! each depend twice on the next level costs 2^levels evaluations and would hang the flag
//! source thread. So before evaluating, the dependencies of the flag are walked without
//! recursion, visiting each once, and a flag whose chain is deeper than
//! [`MAX_DEPENDENCY_DEPTH`], whose evaluation would take more than [`MAX_EVALUATION_STEPS`]
//! steps, or that depends on itself, is refused like any other bad value. Real flags nest a
//! handful of levels.

use super::store::FlagStore;
use launchdarkly_server_sdk_evaluation::{Context, FlagValue, Store, evaluate};
use std::collections::HashMap;

/// The longest chain of prerequisites and nested segments accepted below a flag.
pub const MAX_DEPENDENCY_DEPTH: usize = 64;

/// The most flag and segment visits one evaluation may make (paths through the dependencies).
pub const MAX_EVALUATION_STEPS: u64 = 10_000;

/// What evaluating a flag gave, before it is read as a number or a boolean.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Value(FlagValue),
    /// The flag does not exist (never defined, or deleted): the fallback applies.
    Missing,
    /// The flag exists but gives no value; says why, for a warning.
    Bad(String),
}

/// A flag's evaluation for one context, with what LaunchDarkly's analytics events report
/// about it (which variation of which version of the flag).
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluation {
    pub outcome: Outcome,
    pub variation: Option<usize>,
    pub version: Option<u64>,
}

/// Evaluates flag `key` for `context`.
pub fn evaluate_flag(store: &FlagStore, key: &str, context: &Context) -> Evaluation {
    let Some(flag) = store.flag(key) else {
        return Evaluation {
            outcome: Outcome::Missing,
            variation: None,
            version: None,
        };
    };
    let version = Some(flag.version);
    if let Err(why) = check_depth(store, key) {
        return Evaluation {
            outcome: Outcome::Bad(why),
            variation: None,
            version,
        };
    }
    let detail = evaluate(store, &flag, context, None);
    Evaluation {
        outcome: match detail.value {
            Some(value) => Outcome::Value(value.clone()),
            None => Outcome::Bad(format!("evaluation gave no value ({:?})", detail.reason)),
        },
        variation: detail.variation_index.and_then(|i| usize::try_from(i).ok()),
        version,
    }
}

/// The longest description of a flag value put in a log line: a value of the wrong type can
/// be megabytes of JSON.
const DESCRIBE_MAX: usize = 80;

/// A flag value as JSON for a log line, cut short when long.
pub fn describe(value: &FlagValue) -> String {
    let text = serde_json::to_string(value).unwrap_or_else(|_| "(unprintable)".to_owned());
    crate::logging::shortened(&text, DESCRIBE_MAX).into_owned()
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum Node {
    Flag(String),
    Segment(String),
}

enum Mark {
    /// On the current path: meeting it again is a cycle.
    Open,
    /// Finished: the depth of the chain below it and the number of visits evaluating it takes,
    /// itself included.
    Done { depth: usize, steps: u64 },
}

/// What a flag or segment depends on: a flag's prerequisites, and the segments named by
/// `segmentMatch` clauses in its rules (a segment's own rules may name further segments).
fn dependencies(store: &FlagStore, node: &Node) -> Vec<Node> {
    let json = match node {
        Node::Flag(key) => store.flag(key).and_then(|f| serde_json::to_value(f).ok()),
        Node::Segment(key) => store
            .segment(key)
            .and_then(|s| serde_json::to_value(s).ok()),
    };
    let Some(json) = json else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if let Some(prerequisites) = json["prerequisites"].as_array() {
        for prerequisite in prerequisites {
            if let Some(key) = prerequisite["key"].as_str() {
                out.push(Node::Flag(key.to_owned()));
            }
        }
    }
    for rule in json["rules"].as_array().into_iter().flatten() {
        for clause in rule["clauses"].as_array().into_iter().flatten() {
            if clause["op"] == "segmentMatch" {
                for value in clause["values"].as_array().into_iter().flatten() {
                    if let Some(key) = value.as_str() {
                        out.push(Node::Segment(key.to_owned()));
                    }
                }
            }
        }
    }
    out
}

/// Walks everything `key` depends on, iteratively and visiting each node once, and refuses a
/// chain deeper than [`MAX_DEPENDENCY_DEPTH`], more than [`MAX_EVALUATION_STEPS`] steps, or a
/// cycle.
fn check_depth(store: &FlagStore, key: &str) -> Result<(), String> {
    let mut marks: HashMap<Node, Mark> = HashMap::new();
    let mut children: HashMap<Node, Vec<Node>> = HashMap::new();
    // (node, whether its dependencies have been pushed already)
    let mut stack = vec![(Node::Flag(key.to_owned()), false)];
    while let Some((node, expanded)) = stack.pop() {
        if expanded {
            let (mut depth, mut steps) = (0, 1u64);
            for child in children.remove(&node).unwrap_or_default() {
                if let Some(Mark::Done { depth: d, steps: s }) = marks.get(&child) {
                    depth = depth.max(*d);
                    steps = steps.saturating_add(*s);
                }
            }
            let depth = depth + 1;
            if depth > MAX_DEPENDENCY_DEPTH {
                return Err(format!(
                    "depends on a chain of prerequisites or segments deeper than {MAX_DEPENDENCY_DEPTH}"
                ));
            }
            if steps > MAX_EVALUATION_STEPS {
                return Err(format!(
                    "its prerequisites and segments would take more than {MAX_EVALUATION_STEPS} evaluation steps"
                ));
            }
            marks.insert(node, Mark::Done { depth, steps });
            continue;
        }
        match marks.get(&node) {
            Some(Mark::Done { .. }) => continue,
            Some(Mark::Open) => {
                return Err("depends on itself through its prerequisites or segments".into());
            }
            None => {}
        }
        marks.insert(node.clone(), Mark::Open);
        let deps = dependencies(store, &node);
        stack.push((node.clone(), true));
        for dep in &deps {
            match marks.get(dep) {
                Some(Mark::Open) => {
                    return Err("depends on itself through its prerequisites or segments".into());
                }
                Some(Mark::Done { .. }) => {}
                None => stack.push((dep.clone(), false)),
            }
        }
        children.insert(node, deps);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A watched flag's value for one context.
    #[derive(Clone, Debug, PartialEq)]
    enum Evaluated {
        Number(f64),
        /// The flag does not exist (never defined, or deleted): the fallback applies.
        Missing,
        /// The flag exists but gives no usable number; says why, for a warning.
        Bad(String),
    }

    /// Evaluates flag `key` for `context` as a number.
    fn evaluate_number(store: &FlagStore, key: &str, context: &Context) -> Evaluated {
        match evaluate_flag(store, key, context).outcome {
            Outcome::Value(value) => match value.as_float() {
                Some(number) => Evaluated::Number(number),
                None => Evaluated::Bad(format!("value {} is not a number", describe(&value))),
            },
            Outcome::Missing => Evaluated::Missing,
            Outcome::Bad(why) => Evaluated::Bad(why),
        }
    }

    use crate::flags::store::{AllData, DataEvent};
    use launchdarkly_server_sdk_evaluation::ContextBuilder;
    use serde_json::json;

    #[test]
    fn a_long_value_is_described_short() {
        let value = FlagValue::Str("x".repeat(1_000_000));
        let text = describe(&value);
        assert!(text.len() < 120, "{}", text.len());
        assert!(text.ends_with("(1000002 bytes)"), "{text}");
        assert_eq!(describe(&FlagValue::Bool(true)), "true");
    }

    fn flag(key: &str, prerequisites: &[&str]) -> serde_json::Value {
        json!({"key": key, "version": 1, "on": true, "variations": [0, 7], "offVariation": 0,
               "fallthrough": {"variation": 1}, "salt": "s", "targets": [], "rules": [],
               "prerequisites": prerequisites.iter().map(|p| json!({"key": p, "variation": 1}))
                   .collect::<Vec<_>>()})
    }

    fn store_of(flags: Vec<serde_json::Value>) -> FlagStore {
        let mut data = AllData::default();
        for f in flags {
            let key = f["key"].as_str().unwrap().to_owned();
            data.flags.insert(key, serde_json::from_value(f).unwrap());
        }
        let mut store = FlagStore::default();
        store.apply(DataEvent::Put(data));
        store
    }

    fn context() -> Context {
        ContextBuilder::new("host").kind("service").build().unwrap()
    }

    fn chain(links: usize) -> FlagStore {
        let mut flags = vec![flag("skip-rate", &["f0"])];
        for i in 0..links {
            let next = format!("f{}", i + 1);
            let prerequisites: Vec<&str> = if i + 1 < links { vec![&next] } else { vec![] };
            flags.push(flag(&format!("f{i}"), &prerequisites));
        }
        store_of(flags)
    }

    #[test]
    fn a_short_chain_evaluates() {
        assert_eq!(
            evaluate_number(&chain(5), "skip-rate", &context()),
            Evaluated::Number(7.0)
        );
    }

    #[test]
    fn a_chain_that_would_overflow_the_stack_is_refused_on_a_small_stack() {
        // 256 KiB would not survive a few hundred levels of the evaluator's recursion.
        let result = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(|| evaluate_number(&chain(5_000), "skip-rate", &context()))
            .unwrap()
            .join()
            .unwrap();
        assert!(matches!(result, Evaluated::Bad(why) if why.contains("deeper than")));
    }

    #[test]
    fn a_cycle_is_refused() {
        let store = store_of(vec![
            flag("skip-rate", &["a"]),
            flag("a", &["b"]),
            flag("b", &["a"]),
        ]);
        assert!(matches!(
            evaluate_number(&store, "skip-rate", &context()),
            Evaluated::Bad(why) if why.contains("itself")
        ));
    }

    /// Each level depends twice on the next: 2^levels paths for the evaluator.
    fn lattice(levels: usize) -> FlagStore {
        let mut flags = vec![flag("skip-rate", &["a0", "b0"])];
        for i in 0..levels {
            let (a, b) = (format!("a{}", i + 1), format!("b{}", i + 1));
            let next: Vec<&str> = if i + 1 < levels { vec![&a, &b] } else { vec![] };
            flags.push(flag(&format!("a{i}"), &next));
            flags.push(flag(&format!("b{i}"), &next));
        }
        store_of(flags)
    }

    #[test]
    fn a_small_lattice_evaluates() {
        assert_eq!(
            evaluate_number(&lattice(6), "skip-rate", &context()),
            Evaluated::Number(7.0)
        );
    }

    #[test]
    fn a_lattice_that_would_take_forever_is_refused_at_once() {
        // 2^60 evaluations would never end; the walk visits each of the 121 flags once.
        let result = evaluate_number(&lattice(60), "skip-rate", &context());
        assert!(matches!(result, Evaluated::Bad(why) if why.contains("evaluation steps")));
    }

    #[test]
    fn a_missing_flag_is_missing() {
        assert_eq!(
            evaluate_number(&chain(1), "nope", &context()),
            Evaluated::Missing
        );
    }
}
