//! The protocol held to the scripts' own tables, and each argument and reply field to its name.

use super::*;
use std::collections::HashMap;

/// The prelude, where the holdings' lease is written down for the scripts.
const PRELUDE_HOLDINGS_LEASE: &str = include_str!("../prelude.lua");

/// The text of `script` from `start` to the first `end` after it, both included.
fn statement<'a>(script: &'a str, start: &str, end: &str) -> &'a str {
    let at = script
        .find(start)
        .unwrap_or_else(|| panic!("no `{start}` in the script"));
    let rest = &script[at..];
    &rest[..rest.find(end).expect("the statement's end") + end.len()]
}

/// The names `local a, b, c = unpack(ARGV, FROM, TO)` binds, and its `FROM, TO`.
fn unpacked(script: &str, first: &str) -> (Vec<String>, String) {
    let text = statement(script, &format!("local {first}, "), ")");
    let (names, call) = text.split_once('=').unwrap();
    let names = names["local".len()..]
        .split(',')
        .map(|n| n.trim().to_owned())
        .collect();
    let range = call
        .trim()
        .strip_prefix("unpack(ARGV, ")
        .unwrap()
        .trim_end_matches(')');
    (names, range.to_owned())
}

/// `local A, B = 0, 1` as `[("a", 0), ("b", 1)]`.
fn constants(script: &str, first: &str) -> Vec<(String, i64)> {
    let text = statement(script, &format!("local {first}, "), "\n");
    let (names, values) = text["local".len()..].split_once('=').unwrap();
    names
        .split(',')
        .zip(values.split(','))
        .map(|(n, v)| (n.trim().to_lowercase(), v.trim().parse().expect("a code")))
        .collect()
}

fn owned<const N: usize>(names: [&str; N]) -> Vec<String> {
    names.iter().map(|n| n.to_string()).collect()
}

fn owned_codes<const N: usize>(codes: [(&str, i64); N]) -> Vec<(String, i64)> {
    codes.iter().map(|(n, c)| (n.to_string(), *c)).collect()
}

#[test]
fn the_scripts_declare_the_same_protocol_as_rust() {
    let (names, range) = unpacked(ADMIT_LUA, "call_id");
    assert_eq!(
        (names, range),
        (owned(ADMIT_ARGS), format!("1, {}", ADMIT_ARGS.len()))
    );
    let (names, range) = unpacked(ADMIT_LUA, "enforce");
    assert_eq!(
        (names, range.as_str()),
        (owned(ADMIT_SCOPE_ARGS), "at + 1, at + SCOPE_ARGS")
    );
    assert!(ADMIT_LUA.contains(&format!("local SCOPE_ARGS = {}\n", ADMIT_SCOPE_ARGS.len())));
    assert!(ADMIT_LUA.contains(&format!(
        "local at = {} + (i - 1) * SCOPE_ARGS",
        ADMIT_ARGS.len()
    )));
    let reply = statement(ADMIT_LUA, "local out = {", "}");
    let fields: Vec<String> = reply[reply.find('{').unwrap() + 1..reply.find('}').unwrap()]
        .split(',')
        .map(|f| f.trim().to_owned())
        .collect();
    assert_eq!(fields, owned(ADMIT_REPLY));
    assert_eq!(constants(ADMIT_LUA, "RATE_LIMITED"), owned_codes(OUTCOMES));
    assert_eq!(constants(ADMIT_LUA, "REQUESTS"), owned_codes(BUCKETS));

    let (names, range) = unpacked(SETTLE_LUA, "call_id");
    assert_eq!(
        (names, range),
        (owned(SETTLE_ARGS), format!("1, {}", SETTLE_ARGS.len()))
    );
    let (names, range) = unpacked(SETTLE_LUA, "holds_slot");
    assert_eq!(
        (names, range.as_str()),
        (owned(SETTLE_SCOPE_ARGS), "at + 1, at + SCOPE_ARGS")
    );
    assert!(SETTLE_LUA.contains(&format!("local SCOPE_ARGS = {}\n", SETTLE_SCOPE_ARGS.len())));
    assert!(SETTLE_LUA.contains(&format!(
        "local at = {} + (i - 1) * SCOPE_ARGS",
        SETTLE_ARGS.len()
    )));
    assert_eq!(constants(SETTLE_LUA, "ALREADY"), owned_codes(SETTLED));

    let (names, range) = unpacked(LOG_USAGE_LUA, "call_id");
    assert_eq!(
        (names, range),
        (
            owned(LOG_USAGE_ARGS),
            format!("1, {}", LOG_USAGE_ARGS.len())
        )
    );
    assert!(LOG_USAGE_LUA.contains(&format!("local FIELDS_AT = {}\n", LOG_USAGE_ARGS.len() + 1)));
    assert_eq!(constants(LOG_USAGE_LUA, "ALREADY"), owned_codes(SETTLED));
    let forget = format!(
        "local {} = unpack(ARGV, 1, {})",
        FORGET_ARGS.join(", "),
        FORGET_ARGS.len()
    );
    assert!(BATCH_LUA.contains(&forget), "batch.lua's forget: {forget}");
    let (names, range) = unpacked(SLICE_LUA, "bucket");
    assert_eq!(
        (names, range),
        (owned(SLICE_ARGS), format!("1, {}", SLICE_ARGS.len()))
    );
    let slice = SliceArgs {
        bucket: BucketKind::Tokens,
        instance: "i1",
        spec: BucketSpec {
            rate: 5,
            period_ms: 1000,
            burst: 20,
        },
        ask_tokens: 4,
        give_units: -3,
        keep_units: 0,
        lease_ms: 2000,
    };
    assert_eq!(
        slice.encode(),
        ["t", "i1", "5", "1000", "20", "4", "-3", "0", "2000"]
    );
    assert!(SLICE_LUA.contains(&format!("return {{ {} }}", SLICE_REPLY.join(", "))));
    assert_eq!(
        decode_slice(&[4000, 12, 2000]),
        Some(SliceReply {
            granted: 4000,
            level: 12,
            kept: 2000
        })
    );
    assert_eq!(decode_slice(&[4000, 12]), None);
    let (names, range) = unpacked(BLOCK_LUA, "instance");
    assert_eq!(
        (names, range),
        (owned(BLOCK_ARGS), format!("1, {}", BLOCK_ARGS.len()))
    );
    let block = BlockArgs {
        instance: "i1",
        cap: 20,
        target: 5,
        upper: 4,
        lease_ms: 10_000,
        min_slots: 4,
    };
    assert_eq!(block.encode(), ["i1", "20", "5", "4", "10000", "4"]);
    assert!(BLOCK_LUA.contains(&format!("return {{ {} }}", BLOCK_REPLY.join(", "))));
    assert_eq!(decode_block(&[5, 3]), Some(BlockReply { held: 5, free: 3 }));
    assert_eq!(decode_block(&[-1, 3]), None);
    let record_lua = include_str!("../record.lua")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let tally = format!(
        "local {} = unpack(ARGV, 1, {})",
        TALLY_ARGS.join(", "),
        TALLY_ARGS.len()
    );
    assert!(record_lua.contains(&tally), "record.lua's tally: {tally}");
    let (names, range) = unpacked(ESCROW_LUA, "id");
    assert_eq!(
        (names, range),
        (owned(ESCROW_ARGS), format!("1, {}", ESCROW_ARGS.len()))
    );
    let escrow = EscrowArgs {
        id: "escrow:i1",
        ask: 1000,
        released: 30,
        reserve: 100,
        lease_ms: 10_000,
        sizing: turnpike_core::escrow::ESCROW_SIZING,
    };
    assert_eq!(
        escrow.encode(),
        ["escrow:i1", "1000", "30", "100", "10000", "4", "4"]
    );
    assert!(ESCROW_LUA.contains(&format!("return {{ {} }}", ESCROW_REPLY.join(", "))));
    assert_eq!(
        decode_escrow(&[400, 500, -3]),
        Some(EscrowReply {
            granted: 400,
            held: 500,
            free: -3
        })
    );
    assert_eq!(decode_escrow(&[400, 500]), None);
    assert!(
        PRELUDE_HOLDINGS_LEASE.contains(&format!("local HOLDINGS_LEASE_MS = {}\n", SLICE_LEASE_MS))
    );
    assert_eq!(
        ForgetArgs { grace_ms: 60_000 }.encode().len(),
        FORGET_ARGS.len()
    );
}

#[test]
fn both_scripts_that_log_usage_write_the_same_fields_in_the_same_order() {
    let xadd = statement(SETTLE_LUA, "redis.call('XADD'", "'cost', cost)");
    let fields: Vec<String> = xadd
        .split(',')
        .skip(6) // 'XADD', the stream, MAXLEN, ~, the length, *
        .step_by(2)
        .map(|f| f.trim().trim_matches('\'').to_owned())
        .collect();
    assert_eq!(fields, owned(USAGE_FIELDS));
    let values = USAGE_FIELDS.map(|f| format!("<{f}>"));
    let args = log_usage_args("call_1", 9, 7, values);
    let pairs: Vec<(String, String)> = args[LOG_USAGE_ARGS.len()..]
        .chunks(2)
        .map(|p| (p[0].clone(), p[1].clone()))
        .collect();
    assert_eq!(
        pairs,
        USAGE_FIELDS
            .map(|f| (f.to_owned(), format!("<{f}>")))
            .to_vec()
    );
}

#[test]
fn the_scripts_read_arguments_only_through_their_named_locals() {
    for script in [ADMIT_LUA, SETTLE_LUA, LOG_USAGE_LUA] {
        let reads: Vec<&str> = script
            .lines()
            // A call's whole argument table, handed to the function that reads it.
            .filter(|l| !l.contains("(KEYS, ARGV"))
            .filter(|l| l.contains("ARGV") && !l.trim_start().starts_with("--"))
            .map(|l| l.split("unpack(ARGV, ").nth(1).unwrap_or(l))
            .collect();
        assert_eq!(reads.len(), 2, "{reads:?}");
        // `#ARGV`: log_usage.lua's field and value pairs run to the end.
        assert!(
            reads
                .iter()
                .all(|r| !r.replace("#ARGV", "").contains("ARGV")),
            "{reads:?}"
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
