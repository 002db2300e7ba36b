//! Policies as data an operator reads: the JSON `GET /admin/policies` serves, a one-line
//! description, and what a proposed set would change against another (`turnpike check
//! --policies DIR`). Pure: no files, no network.

use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::fmt;

use turnpike_core::limits::{BucketSpec, Mode, Policy};
use turnpike_core::units::format_duration_ms;

/// A policy as JSON: `{"requests": {"rate", "per", "burst"}, "tokens": ..., "concurrency",
/// "mode"}`, absent buckets left out.
pub fn policy_json(policy: &Policy) -> Value {
    let bucket = |spec: &BucketSpec| json!({"rate": spec.rate, "per": format_duration_ms(spec.period_ms), "burst": spec.burst});
    let mut out = Map::new();
    if let Some(spec) = &policy.requests {
        out.insert("requests".into(), bucket(spec));
    }
    if let Some(spec) = &policy.tokens {
        out.insert("tokens".into(), bucket(spec));
    }
    if let Some(limit) = policy.concurrency {
        out.insert("concurrency".into(), json!(limit));
    }
    let mode = match policy.mode {
        Mode::Enforce => "enforce",
        Mode::Shadow => "shadow",
    };
    out.insert("mode".into(), json!(mode));
    Value::Object(out)
}

/// Every policy of a set as JSON, by name.
pub fn set_json<'a>(
    policies: impl IntoIterator<Item = (&'a String, &'a Policy)>,
) -> BTreeMap<String, Value> {
    policies
        .into_iter()
        .map(|(name, policy)| (name.clone(), policy_json(policy)))
        .collect()
}

/// One line for a person: "requests 10/1s burst 20, tokens 200000/1m burst 200000,
/// concurrency 4, shadow".
pub fn describe(policy: &Value) -> String {
    let mut parts = Vec::new();
    for kind in ["requests", "tokens"] {
        let bucket = &policy[kind];
        if bucket.is_object() {
            parts.push(format!(
                "{kind} {}/{} burst {}",
                bucket["rate"],
                bucket["per"].as_str().unwrap_or("?"),
                bucket["burst"]
            ));
        }
    }
    if let Some(limit) = policy["concurrency"].as_u64() {
        parts.push(format!("concurrency {limit}"));
    }
    if policy["mode"] == "shadow" {
        parts.push("shadow".into());
    }
    if parts.is_empty() {
        "no limits".into()
    } else {
        parts.join(", ")
    }
}

/// How one policy differs between two sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Added {
        name: String,
        now: String,
    },
    Removed {
        name: String,
        was: String,
    },
    Changed {
        name: String,
        was: String,
        now: String,
    },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Added { name, now } => write!(f, "+ {name}: {now}"),
            Change::Removed { name, was } => write!(f, "- {name}: {was}"),
            Change::Changed { name, was, now } => write!(f, "~ {name}: {was}\n    -> {now}"),
        }
    }
}

/// What putting `proposed` in force instead of `running` would change, by name.
pub fn diff(running: &BTreeMap<String, Value>, proposed: &BTreeMap<String, Value>) -> Vec<Change> {
    let mut changes = Vec::new();
    for (name, was) in running {
        match proposed.get(name) {
            None => changes.push(Change::Removed {
                name: name.clone(),
                was: describe(was),
            }),
            Some(now) if now != was => changes.push(Change::Changed {
                name: name.clone(),
                was: describe(was),
                now: describe(now),
            }),
            Some(_) => {}
        }
    }
    for (name, now) in proposed {
        if !running.contains_key(name) {
            changes.push(Change::Added {
                name: name.clone(),
                now: describe(now),
            });
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(rate: u64, concurrency: Option<u32>, mode: Mode) -> Policy {
        Policy {
            name: "p".into(),
            requests: Some(BucketSpec {
                rate,
                period_ms: 1000,
                burst: rate * 2,
            }),
            tokens: None,
            concurrency,
            mode,
        }
    }

    #[test]
    fn describes_and_diffs_by_name() {
        let running = set_json([
            (&"free".to_string(), &policy(1, Some(1), Mode::Enforce)),
            (&"standard".to_string(), &policy(10, Some(4), Mode::Enforce)),
            (&"legacy".to_string(), &policy(5, None, Mode::Enforce)),
        ]);
        let proposed = set_json([
            (&"free".to_string(), &policy(1, Some(1), Mode::Enforce)),
            (&"standard".to_string(), &policy(20, Some(4), Mode::Enforce)),
            (&"trial".to_string(), &policy(3, None, Mode::Shadow)),
        ]);
        let lines: Vec<String> = diff(&running, &proposed)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            lines,
            vec![
                "- legacy: requests 5/1s burst 10",
                "~ standard: requests 10/1s burst 20, concurrency 4\n    -> requests 20/1s burst 40, concurrency 4",
                "+ trial: requests 3/1s burst 6, shadow",
            ]
        );
        assert!(diff(&running, &running).is_empty());
    }
}
