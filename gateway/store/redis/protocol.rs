//! How Rust and the Lua scripts talk: the scripts, their arguments by name and in order, and
//! their replies decoded by name. Each script declares the same names in tables at its top
//! (`ARGS`, `SCOPE_ARGS`, `REPLY`, ...) and reads its arguments through them; a test holds
//! the two copies to each other, so a field added on one side only fails the build's tests.

use turnpike_core::limits::{BucketKind, BucketSpec, Quota};
use turnpike_core::usage::Usage;

pub const ADMIT_LUA: &str = concat!(include_str!("prelude.lua"), include_str!("admit.lua"));
pub const SETTLE_LUA: &str = concat!(include_str!("prelude.lua"), include_str!("settle.lua"));
pub const CHANGE_BALANCE_LUA: &str = include_str!("change_balance.lua");

/// admit.lua's arguments, then [`ADMIT_SCOPE_ARGS`] once per scope.
pub const ADMIT_ARGS: [&str; 5] = ["mode", "call_id", "lease_ms", "reserve", "scope_count"];
pub const ADMIT_SCOPE_ARGS: [&str; 8] = [
    "enforce",
    "requests_rate",
    "requests_period",
    "requests_burst",
    "tokens_rate",
    "tokens_period",
    "tokens_burst",
    "concurrency",
];
/// admit.lua's reply, then `shadow_count` pairs of (scope, bucket).
pub const ADMIT_REPLY: [&str; 10] = [
    "outcome",
    "slots",
    "scope",
    "bucket",
    "retry_ms",
    "has_quota",
    "limit",
    "remaining",
    "reset",
    "shadow_count",
];
/// admit.lua's `OUTCOME` codes.
pub const OUTCOMES: [(&str, i64); 4] = [
    ("rate_limited", 0),
    ("admitted", 1),
    ("broke", 2),
    ("peeked", 3),
];
/// admit.lua's `BUCKET` codes.
pub const BUCKETS: [(&str, i64); 3] = [("requests", 1), ("tokens", 2), ("concurrency", 3)];

/// settle.lua's arguments, then [`SETTLE_SCOPE_ARGS`] once per scope.
pub const SETTLE_ARGS: [&str; 18] = [
    "call_id",
    "marker_ttl_ms",
    "refund",
    "account_side",
    "cost",
    "metered",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "key_id",
    "agent",
    "account",
    "stream",
    "stream_maxlen",
    "request_id",
    "session_id",
    "status",
    "scope_count",
];
pub const SETTLE_SCOPE_ARGS: [&str; 7] = [
    "holds_slot",
    "tokens_rate",
    "tokens_period",
    "tokens_burst",
    "requests_rate",
    "requests_period",
    "requests_burst",
];
/// settle.lua's `SETTLED` codes: what its reply means.
pub const SETTLED: [(&str, i64); 2] = [("already", 0), ("applied", 1)];
pub const SETTLED_APPLIED: i64 = SETTLED[1].1;

/// One script call: its keys and arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub keys: Vec<String>,
    pub args: Vec<String>,
}

/// One scope's limits as admit.lua reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScopeLimits {
    pub enforce: bool,
    pub requests: Option<BucketSpec>,
    pub tokens: Option<BucketSpec>,
    pub concurrency: Option<u32>,
}

/// admit.lua's arguments.
#[derive(Debug, Clone)]
pub struct AdmitArgs<'a> {
    /// Read the quota only, taking nothing.
    pub peek: bool,
    pub call_id: &'a str,
    pub lease_ms: u64,
    /// `None`: this script does not touch the balance.
    pub reserve: Option<i64>,
    pub scopes: Vec<ScopeLimits>,
}

impl AdmitArgs<'_> {
    /// The arguments in [`ADMIT_ARGS`] and [`ADMIT_SCOPE_ARGS`] order.
    pub fn encode(&self) -> Vec<String> {
        let mut args =
            Vec::with_capacity(ADMIT_ARGS.len() + self.scopes.len() * ADMIT_SCOPE_ARGS.len());
        args.extend([
            if self.peek { "peek" } else { "admit" }.to_owned(),
            self.call_id.to_owned(),
            self.lease_ms.to_string(),
            self.reserve.unwrap_or(-1).to_string(),
            self.scopes.len().to_string(),
        ]);
        for scope in &self.scopes {
            args.push(flag(scope.enforce));
            push_bucket(&mut args, scope.requests);
            push_bucket(&mut args, scope.tokens);
            args.push(scope.concurrency.unwrap_or(0).to_string());
        }
        args
    }
}

/// What admit.lua decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `slots`: bit `i` set when scope `i` (0-based) holds a slot.
    Admitted {
        slots: u64,
    },
    /// `scope`: the index (0-based) of the refusing scope.
    RateLimited {
        scope: usize,
        bucket: BucketKind,
        retry_after_ms: u64,
    },
    Broke,
    Peeked,
}

/// admit.lua's reply, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmitReply {
    pub outcome: Outcome,
    pub quota: Option<Quota>,
    /// (scope index, bucket) of every would-be refusal by a shadow policy.
    pub shadow: Vec<(usize, BucketKind)>,
}

impl AdmitReply {
    /// `None` when `reply` is not one admit.lua gives.
    pub fn decode(reply: &[i64]) -> Option<Self> {
        let [outcome, slots, scope, bucket, retry_ms, has_quota, limit, remaining, reset, shadow_count] =
            *reply.get(..ADMIT_REPLY.len())?
        else {
            return None;
        };
        let scope_index = |n: i64| usize::try_from(n).ok()?.checked_sub(1);
        let outcome = match code_name(&OUTCOMES, outcome)? {
            "admitted" => Outcome::Admitted {
                slots: u64::try_from(slots).ok()?,
            },
            "rate_limited" => Outcome::RateLimited {
                scope: scope_index(scope)?,
                bucket: bucket_kind(bucket)?,
                retry_after_ms: u64::try_from(retry_ms).ok()?,
            },
            "broke" => Outcome::Broke,
            _ => Outcome::Peeked,
        };
        let quota = (has_quota == 1).then(|| Quota {
            limit: limit.max(0) as u64,
            remaining: remaining.max(0) as u64,
            reset_secs: reset.max(0) as u64,
        });
        let hits = &reply[ADMIT_REPLY.len()..];
        if hits.len() != 2 * usize::try_from(shadow_count).ok()? {
            return None;
        }
        let shadow = hits
            .chunks(2)
            .map(|hit| Some((scope_index(hit[0])?, bucket_kind(hit[1])?)))
            .collect::<Option<Vec<_>>>()?;
        Some(Self {
            outcome,
            quota,
            shadow,
        })
    }
}

/// One scope as settle.lua reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SettleScope {
    pub holds_slot: bool,
    pub tokens: Option<BucketSpec>,
    /// Sent only to give back the request token of a refused admission.
    pub refund_requests: Option<BucketSpec>,
}

/// settle.lua's arguments.
#[derive(Debug, Clone)]
pub struct SettleArgs<'a> {
    pub call_id: &'a str,
    pub marker_ttl_ms: u64,
    pub refund: bool,
    /// This run holds the account's hashes: the reservation, the balance, the usage rows.
    pub account_side: bool,
    pub cost: i64,
    /// `None`: not metered.
    pub usage: Option<Usage>,
    pub key_id: &'a str,
    pub agent: &'a str,
    pub account: &'a str,
    /// This run appends the usage log entry itself.
    pub stream: bool,
    pub stream_maxlen: u64,
    pub request_id: &'a str,
    pub session_id: &'a str,
    pub status: u16,
    pub scopes: Vec<SettleScope>,
}

impl SettleArgs<'_> {
    /// The arguments in [`SETTLE_ARGS`] and [`SETTLE_SCOPE_ARGS`] order.
    pub fn encode(&self) -> Vec<String> {
        let usage = self.usage.unwrap_or_default();
        let mut args =
            Vec::with_capacity(SETTLE_ARGS.len() + self.scopes.len() * SETTLE_SCOPE_ARGS.len());
        args.extend([
            self.call_id.to_owned(),
            self.marker_ttl_ms.to_string(),
            flag(self.refund),
            flag(self.account_side),
            self.cost.to_string(),
            flag(self.usage.is_some()),
            usage.input_tokens.to_string(),
            usage.output_tokens.to_string(),
            usage.total_tokens.to_string(),
            self.key_id.to_owned(),
            self.agent.to_owned(),
            self.account.to_owned(),
            flag(self.stream),
            self.stream_maxlen.to_string(),
            self.request_id.to_owned(),
            self.session_id.to_owned(),
            self.status.to_string(),
            self.scopes.len().to_string(),
        ]);
        for scope in &self.scopes {
            args.push(flag(scope.holds_slot));
            push_bucket(&mut args, scope.tokens);
            push_bucket(&mut args, scope.refund_requests);
        }
        args
    }
}

fn flag(on: bool) -> String {
    if on { "1" } else { "0" }.to_owned()
}

/// `rate`, `period`, `burst`; a rate of 0 means no such bucket.
fn push_bucket(args: &mut Vec<String>, spec: Option<BucketSpec>) {
    let (rate, period, burst) = spec.map_or((0, 0, 0), |s| (s.rate, s.period_ms, s.burst));
    args.extend([rate.to_string(), period.to_string(), burst.to_string()]);
}

fn code_name(codes: &[(&'static str, i64)], code: i64) -> Option<&'static str> {
    codes
        .iter()
        .find(|(_, c)| *c == code)
        .map(|(name, _)| *name)
}

fn bucket_kind(code: i64) -> Option<BucketKind> {
    match code_name(&BUCKETS, code)? {
        "requests" => Some(BucketKind::Requests),
        "tokens" => Some(BucketKind::Tokens),
        _ => Some(BucketKind::Concurrency),
    }
}

#[cfg(test)]
mod tests {
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
}
