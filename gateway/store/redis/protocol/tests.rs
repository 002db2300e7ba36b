//! The protocol held to the scripts' own tables, and each argument and reply field to its name.

use super::*;
use std::collections::HashMap;

/// The items of `local <name> = { ... }` in a script: quoted names, or `name = number`.
fn lua_table(script: &str, name: &str) -> Vec<(String, Option<i64>)> {
    let start = script
        .find(&format!("local {name} = {{"))
        .unwrap_or_else(|| panic!("no table {name}"));
    let body = &script[start..];
    let body = &body[body.find('{').unwrap() + 1..body.find('}').unwrap()];
    body.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| match item.split_once('=') {
            Some((key, value)) => (key.trim().to_owned(), value.trim().parse().ok()),
            None => (item.trim_matches('\'').to_owned(), None),
        })
        .collect()
}

fn names(script: &str, table: &str) -> Vec<String> {
    lua_table(script, table)
        .into_iter()
        .map(|(n, _)| n)
        .collect()
}

fn codes(script: &str, table: &str) -> Vec<(String, i64)> {
    let mut codes: Vec<(String, i64)> = lua_table(script, table)
        .into_iter()
        .map(|(n, c)| (n, c.expect("a code")))
        .collect();
    codes.sort_by_key(|(_, c)| *c);
    codes
}

fn owned<const N: usize>(names: [&str; N]) -> Vec<String> {
    names.iter().map(|n| n.to_string()).collect()
}

fn owned_codes<const N: usize>(codes: [(&str, i64); N]) -> Vec<(String, i64)> {
    codes.iter().map(|(n, c)| (n.to_string(), *c)).collect()
}

#[test]
fn the_scripts_declare_the_same_protocol_as_rust() {
    assert_eq!(names(ADMIT_LUA, "ARGS"), owned(ADMIT_ARGS));
    assert_eq!(names(ADMIT_LUA, "SCOPE_ARGS"), owned(ADMIT_SCOPE_ARGS));
    assert_eq!(names(ADMIT_LUA, "REPLY"), owned(ADMIT_REPLY));
    assert_eq!(codes(ADMIT_LUA, "OUTCOME"), owned_codes(OUTCOMES));
    assert_eq!(codes(ADMIT_LUA, "BUCKET"), owned_codes(BUCKETS));
    assert_eq!(names(SETTLE_LUA, "ARGS"), owned(SETTLE_ARGS));
    assert_eq!(names(SETTLE_LUA, "SCOPE_ARGS"), owned(SETTLE_SCOPE_ARGS));
    assert_eq!(codes(SETTLE_LUA, "SETTLED"), owned_codes(SETTLED));
    assert_eq!(code_name(&SETTLED, SETTLED_APPLIED), Some("applied"));
}

#[test]
fn the_scripts_read_arguments_only_by_name() {
    for script in [ADMIT_LUA, SETTLE_LUA] {
        let positional: Vec<&str> = script
            .lines()
            .filter(|l| l.contains("ARGV[") && !l.trim_start().starts_with("--"))
            .collect();
        assert_eq!(
            positional,
            ["  for i, name in ipairs(names) do args[name] = ARGV[offset + i] end"]
        );
    }
}

/// `args` read the way the scripts read them: fixed names, then per-scope names.
fn as_lua_sees(
    args: &[String],
    fixed: &[&str],
    per_scope: &[&str],
) -> (HashMap<String, String>, Vec<HashMap<String, String>>) {
    let named = |names: &[&str], offset: usize| {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.to_string(), args[offset + i].clone()))
            .collect::<HashMap<_, _>>()
    };
    let head = named(fixed, 0);
    let scopes: usize = head["scope_count"].parse().unwrap();
    assert_eq!(args.len(), fixed.len() + scopes * per_scope.len());
    let scopes = (0..scopes)
        .map(|i| named(per_scope, fixed.len() + i * per_scope.len()))
        .collect();
    (head, scopes)
}

const BUCKET: BucketSpec = BucketSpec {
    rate: 7,
    period_ms: 60_000,
    burst: 9,
};

#[test]
fn admission_arguments_arrive_under_their_names() {
    let args = AdmitArgs {
        peek: false,
        call_id: "call_1",
        lease_ms: 1234,
        reserve: Some(50),
        scopes: vec![ScopeLimits {
            enforce: false,
            requests: None,
            tokens: Some(BUCKET),
            concurrency: Some(3),
        }],
    };
    let (head, scopes) = as_lua_sees(&args.encode(), &ADMIT_ARGS, &ADMIT_SCOPE_ARGS);
    let expected_head = [
        ("mode", "admit"),
        ("call_id", "call_1"),
        ("lease_ms", "1234"),
        ("reserve", "50"),
        ("scope_count", "1"),
    ];
    for (name, value) in expected_head {
        assert_eq!(head[name], value, "{name}");
    }
    let expected_scope = [
        ("enforce", "0"),
        ("requests_rate", "0"),
        ("tokens_rate", "7"),
        ("tokens_period", "60000"),
        ("tokens_burst", "9"),
        ("concurrency", "3"),
    ];
    for (name, value) in expected_scope {
        assert_eq!(scopes[0][name], value, "{name}");
    }
}

#[test]
fn settlement_arguments_arrive_under_their_names() {
    let args = SettleArgs {
        call_id: "call_1",
        marker_ttl_ms: 99,
        refund: true,
        account_side: true,
        cost: 12,
        usage: Some(Usage {
            input_tokens: 3,
            output_tokens: 4,
            total_tokens: 7,
        }),
        key_id: "key_1",
        agent: "ag_1",
        account: "acct_1",
        stream: false,
        stream_maxlen: 1000,
        request_id: "req_1",
        session_id: "sess_1",
        status: 201,
        scopes: vec![SettleScope {
            holds_slot: true,
            tokens: None,
            refund_requests: Some(BUCKET),
        }],
    };
    let (head, scopes) = as_lua_sees(&args.encode(), &SETTLE_ARGS, &SETTLE_SCOPE_ARGS);
    let expected_head = [
        ("call_id", "call_1"),
        ("marker_ttl_ms", "99"),
        ("refund", "1"),
        ("account_side", "1"),
        ("cost", "12"),
        ("metered", "1"),
        ("input_tokens", "3"),
        ("output_tokens", "4"),
        ("total_tokens", "7"),
        ("key_id", "key_1"),
        ("agent", "ag_1"),
        ("account", "acct_1"),
        ("stream", "0"),
        ("stream_maxlen", "1000"),
        ("request_id", "req_1"),
        ("session_id", "sess_1"),
        ("status", "201"),
    ];
    for (name, value) in expected_head {
        assert_eq!(head[name], value, "{name}");
    }
    let expected_scope = [
        ("holds_slot", "1"),
        ("tokens_rate", "0"),
        ("requests_rate", "7"),
        ("requests_period", "60000"),
        ("requests_burst", "9"),
    ];
    for (name, value) in expected_scope {
        assert_eq!(scopes[0][name], value, "{name}");
    }
}

/// A reply laid out by field name, as admit.lua lays it out.
fn reply(fields: &[(&str, i64)], shadow: &[i64]) -> Vec<i64> {
    let mut out: Vec<i64> = ADMIT_REPLY
        .iter()
        .map(|name| {
            fields
                .iter()
                .find(|(n, _)| n == name)
                .map_or(0, |(_, v)| *v)
        })
        .collect();
    out.extend(shadow);
    out
}

#[test]
fn replies_decode_by_name_and_malformed_ones_are_refused() {
    let admitted = reply(
        &[
            ("outcome", 1),
            ("slots", 0b10),
            ("has_quota", 1),
            ("limit", 2),
            ("remaining", 1),
            ("reset", 1),
            ("shadow_count", 1),
        ],
        &[1, 1],
    );
    assert_eq!(
        AdmitReply::decode(&admitted),
        Some(AdmitReply {
            outcome: Outcome::Admitted { slots: 0b10 },
            quota: Some(Quota {
                limit: 2,
                remaining: 1,
                reset_secs: 1
            }),
            shadow: vec![(0, BucketKind::Requests)],
        })
    );
    let limited = reply(
        &[
            ("outcome", 0),
            ("scope", 2),
            ("bucket", 3),
            ("retry_ms", 1000),
        ],
        &[],
    );
    assert_eq!(
        AdmitReply::decode(&limited).map(|r| r.outcome),
        Some(Outcome::RateLimited {
            scope: 1,
            bucket: BucketKind::Concurrency,
            retry_after_ms: 1000
        })
    );
    let bad = [
        vec![],
        reply(&[("outcome", 9)], &[]),
        reply(&[("outcome", 0), ("scope", 0), ("bucket", 1)], &[]),
        reply(&[("outcome", 0), ("scope", 1), ("bucket", 7)], &[]),
        reply(&[("outcome", 1), ("shadow_count", 2)], &[1, 1]),
    ];
    for reply in bad {
        assert_eq!(AdmitReply::decode(&reply), None, "{reply:?}");
    }
}
