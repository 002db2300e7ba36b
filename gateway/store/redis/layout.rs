//! Where each piece of state lives in Redis, and how a call is put to the two scripts.
//! Pure: names, arguments and reply decoding, with no connection in sight.
//!
//! Everything an admission touches for a key lives under its account's hash tag
//! (`turnpike:{account:acct_jane}:...`), so one script in one Cluster slot judges the key's buckets
//! and the balance together. An agent's own buckets are shared by every account, so they
//! live under the agent's tag; on a single server one script covers both, on a Cluster they
//! are a second script sent concurrently (see [`Plan`]).

use crate::admission::{Admission, Admitted, Refusal, Reservation, Scope, Settlement, ShadowHit};
use crate::auth::KeyHash;
use crate::limits::{BucketKind, BucketSpec, Mode, Policy, Quota};

/// The usage log billing pipelines read (SPEC §2).
pub const USAGE_STREAM: &str = "turnpike:usage";
/// Every account that has a key or a balance, for usage queries over all accounts.
pub const ACCOUNTS: &str = "turnpike:accounts";
/// Ids of the keys the config file seeded, so a key deleted from the file goes away.
pub const CONFIG_KEYS: &str = "turnpike:config_keys";
/// Pub/sub channel announcing a changed key (its hash in hex, or `*` for all).
pub const KEY_EVENTS: &str = "turnpike:keys";

/// How long a settled call's id is remembered, so a settlement retried later is not applied
/// twice. Longer than any outage the settlement queue rides out in practice.
pub const SETTLED_MARKER_MS: u64 = 3_600_000;

/// Everything of one account shares this hash tag. The fixed `account:` inside the braces
/// keeps the tag non-empty and apart from agents' whatever the id holds (even a `}`).
pub fn account_tag(account: &str) -> String {
    format!("turnpike:{{account:{account}}}")
}

fn agent_tag(agent: &str) -> String {
    format!("turnpike:{{agent:{agent}}}")
}

/// `balance`, `reserved`, and `held:<call id>` for each reservation outstanding.
pub fn account_hash(account: &str) -> String {
    format!("{}:account", account_tag(account))
}

/// Per account: usage counters by key and agent, `<field>\x1f<key id>\x1f<agent>`.
pub fn usage_hash(account: &str) -> String {
    format!("{}:usage", account_tag(account))
}

pub fn key_record(hash: &KeyHash) -> String {
    format!("turnpike:key:{}", hash.to_hex())
}

pub fn key_index(id: &str) -> String {
    format!("turnpike:keyid:{id}")
}

/// One script call: its keys and arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub keys: Vec<String>,
    pub args: Vec<String>,
}

/// Whose limits a script judges, in the order it judges them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Limited<'a> {
    scope: Scope,
    policy: &'a Policy,
    limiter: Limiter<'a>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Limiter<'a> {
    Key { account: &'a str, key_id: &'a str },
    Agent(&'a str),
}

impl Limiter<'_> {
    /// The limiter hash and the in-flight lease set.
    fn keys(self) -> [String; 2] {
        let base = match self {
            Limiter::Key { account, key_id } => format!("{}:key:{key_id}", account_tag(account)),
            Limiter::Agent(agent) => agent_tag(agent),
        };
        // Fixed, different endings: no key id can make one key's name another's.
        [format!("{base}:limits"), format!("{base}:inflight")]
    }
}

/// A script run of one admission: which scopes it judged, whether it held the balance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Side<'a> {
    pub invocation: Invocation,
    scopes: Vec<Limited<'a>>,
    priced: bool,
}

/// How a deployment splits a call across scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// One server: one script per operation, whatever it touches.
    Single,
    /// Redis Cluster: the agent's buckets are a second script in the agent's slot.
    Cluster,
}

fn limited<'a>(
    call_key: (&'a str, &'a str),
    agent: &'a str,
    key_policy: Option<&'a Policy>,
    agent_policy: Option<&'a Policy>,
) -> [Option<Limited<'a>>; 2] {
    let (account, key_id) = call_key;
    [
        key_policy.map(|policy| Limited {
            scope: Scope::Key,
            policy,
            limiter: Limiter::Key { account, key_id },
        }),
        agent_policy.map(|policy| Limited {
            scope: Scope::Agent,
            policy,
            limiter: Limiter::Agent(agent),
        }),
    ]
}

fn push_spec(args: &mut Vec<String>, spec: Option<BucketSpec>) {
    let (rate, period, burst) = spec.map_or((0, 0, 0), |s| (s.rate, s.period_ms, s.burst));
    args.extend([rate.to_string(), period.to_string(), burst.to_string()]);
}

/// The admission scripts for `call` (`peek`: read the quota only), one per side; a side
/// with nothing to judge is left out, so a call with no limits and no price costs no round
/// trip at all.
pub fn admit_sides<'a>(call: &Admission<'a>, plan: Plan, peek: bool) -> Vec<Side<'a>> {
    let [key, agent] = limited(
        (call.account, call.key_id),
        call.agent,
        call.key_policy,
        call.agent_policy,
    );
    let priced = call.pricing.is_some() && !peek;
    let groups: Vec<(bool, Vec<Limited>)> = match plan {
        Plan::Single => vec![(priced, key.into_iter().chain(agent).collect())],
        Plan::Cluster => vec![
            (priced, key.into_iter().collect()),
            (false, agent.into_iter().collect()),
        ],
    };
    groups
        .into_iter()
        .filter(|(priced, scopes)| *priced || !scopes.is_empty())
        .map(|(priced, scopes)| {
            let mut keys = Vec::new();
            let reserve = if priced {
                keys.push(account_hash(call.account));
                keys.push(format!("{}:leases", account_tag(call.account)));
                call.pricing.map_or(0, |p| p.reserve)
            } else {
                -1
            };
            let mut args = vec![
                if peek { "peek" } else { "admit" }.to_owned(),
                call.call_id.to_owned(),
                call.lease_ms.to_string(),
                reserve.to_string(),
                scopes.len().to_string(),
            ];
            for s in &scopes {
                keys.extend(s.limiter.keys());
                args.push(u8::from(s.policy.mode == Mode::Enforce).to_string());
                push_spec(&mut args, s.policy.requests);
                push_spec(&mut args, s.policy.tokens);
                args.push(s.policy.concurrency.unwrap_or(0).to_string());
            }
            Side {
                invocation: Invocation { keys, args },
                scopes,
                priced,
            }
        })
        .collect()
}

/// What one side's script answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SideOutcome {
    Admitted {
        key_slot: bool,
        agent_slot: bool,
    },
    RateLimited {
        scope: Scope,
        bucket: BucketKind,
        retry_after_ms: u64,
    },
    InsufficientBalance,
    Peeked,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SideReply {
    pub outcome: SideOutcome,
    pub quota: Option<Quota>,
    pub shadow_hits: Vec<ShadowHit>,
}

/// Decodes the admission script's reply; `None` if it is not one.
pub fn decode_admit(side: &Side, reply: &[i64]) -> Option<SideReply> {
    let scope_at = |index: i64| {
        side.scopes
            .get(usize::try_from(index).ok()?.checked_sub(1)?)
    };
    let bucket = |code: i64| match code {
        1 => Some(BucketKind::Requests),
        2 => Some(BucketKind::Tokens),
        3 => Some(BucketKind::Concurrency),
        _ => None,
    };
    let [outcome, a, b, c, has_quota, limit, remaining, reset, shadow_count, ..] = *reply else {
        return None;
    };
    let outcome = match outcome {
        1 => {
            let holds = |scope| {
                side.scopes
                    .iter()
                    .enumerate()
                    .any(|(i, s)| s.scope == scope && a & (1 << i) != 0)
            };
            SideOutcome::Admitted {
                key_slot: holds(Scope::Key),
                agent_slot: holds(Scope::Agent),
            }
        }
        0 => SideOutcome::RateLimited {
            scope: scope_at(a)?.scope,
            bucket: bucket(b)?,
            retry_after_ms: u64::try_from(c).ok()?,
        },
        2 => SideOutcome::InsufficientBalance,
        3 => SideOutcome::Peeked,
        _ => return None,
    };
    let quota = (has_quota == 1).then(|| Quota {
        limit: limit.max(0) as u64,
        remaining: remaining.max(0) as u64,
        reset_secs: reset.max(0) as u64,
    });
    let hits = reply.get(9..)?;
    if hits.len() != 2 * usize::try_from(shadow_count).ok()? {
        return None;
    }
    let shadow_hits = hits
        .chunks(2)
        .map(|hit| {
            Some(ShadowHit {
                scope: scope_at(hit[0])?.scope,
                bucket: bucket(hit[1])?,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some(SideReply {
        outcome,
        quota,
        shadow_hits,
    })
}

/// The tightest of the sides' quotas: the one with the fewest requests left.
pub fn tightest(replies: &[SideReply]) -> Option<Quota> {
    replies
        .iter()
        .filter_map(|r| r.quota)
        .min_by_key(|q| q.remaining)
}

/// One decision from every side's answer, in the order the embedded store decides: a rate
/// limit refuses before the balance does; the longest wait wins, the key's on a tie.
pub fn combine(call: &Admission, replies: &[SideReply]) -> Result<Admitted, Refusal> {
    let quota = tightest(replies);
    let shadow_hits: Vec<ShadowHit> = replies
        .iter()
        .flat_map(|r| r.shadow_hits.iter().copied())
        .collect();
    let mut refusal: Option<(Scope, BucketKind, u64)> = None;
    let mut broke = false;
    let mut reservation = Reservation::default();
    for reply in replies {
        match reply.outcome {
            SideOutcome::RateLimited {
                scope,
                bucket,
                retry_after_ms,
            } => {
                if refusal.is_none_or(|r| retry_after_ms > r.2) {
                    refusal = Some((scope, bucket, retry_after_ms));
                }
            }
            SideOutcome::InsufficientBalance => broke = true,
            SideOutcome::Admitted {
                key_slot,
                agent_slot,
            } => {
                reservation.key_slot |= key_slot;
                reservation.agent_slot |= agent_slot;
            }
            SideOutcome::Peeked => {}
        }
    }
    if let Some((scope, bucket, retry_after_ms)) = refusal {
        let policy = match scope {
            Scope::Key => call.key_policy,
            Scope::Agent => call.agent_policy,
        };
        return Err(Refusal::RateLimited {
            scope,
            bucket,
            retry_after_ms,
            rule: policy.map_or_else(String::new, |p| crate::admission::rule_text(bucket, p)),
            quota,
            shadow_hits,
        });
    }
    if broke {
        return Err(Refusal::InsufficientBalance { quota, shadow_hits });
    }
    reservation.reserve = call.pricing.map_or(0, |p| p.reserve);
    Ok(Admitted {
        reservation,
        quota,
        shadow_hits,
    })
}

/// What a settlement script run gives back and records.
pub struct SettleSide {
    pub invocation: Invocation,
    /// Whether this run writes the usage log entry itself (one server) or the caller must
    /// append it after the run applied (Cluster: the stream is in its own slot).
    pub writes_stream: bool,
    pub account_side: bool,
}

/// The settlement scripts for `call`; empty when there is nothing to give back or record.
pub fn settle_sides(
    call: &Settlement,
    plan: Plan,
    stream_maxlen: u64,
    purpose: Purpose,
) -> Vec<SettleSide> {
    let metered = call.usage.is_some();
    let tokens_debited =
        |policy: Option<&Policy>| metered && policy.is_some_and(|p| p.tokens.is_some());
    let held = call.reservation.reserve != 0 || call.cost != 0 || metered;
    let [key, agent] = limited(
        (call.account, call.key_id),
        call.agent,
        call.key_policy,
        call.agent_policy,
    );
    let key_work = call.reservation.key_slot || tokens_debited(call.key_policy);
    let agent_work = call.reservation.agent_slot || tokens_debited(call.agent_policy);
    let refunds = |scope: Scope| match purpose {
        Purpose::Settle | Purpose::Release => false,
        Purpose::Refund { key, agent } => match scope {
            Scope::Key => key,
            Scope::Agent => agent,
        },
    };
    let key = key.filter(|_| key_work || refunds(Scope::Key));
    let agent = agent.filter(|_| agent_work || refunds(Scope::Agent));
    let groups: Vec<(bool, Vec<Limited>)> = match plan {
        Plan::Single => vec![(held, key.into_iter().chain(agent).collect())],
        Plan::Cluster => vec![
            (held, key.into_iter().collect()),
            (false, agent.into_iter().collect()),
        ],
    };
    let usage = call.usage.unwrap_or_default();
    groups
        .into_iter()
        .filter(|(account_side, scopes)| *account_side || !scopes.is_empty())
        .map(|(account_side, scopes)| {
            let tag = if account_side || scopes.iter().any(|s| s.scope == Scope::Key) {
                account_tag(call.account)
            } else {
                agent_tag(call.agent)
            };
            let writes_stream = plan == Plan::Single && account_side && metered;
            // Each purpose has a marker of its own: a call refunded or released here may
            // still be settled later (admitted on local buckets under `fail_open`).
            let marker = match purpose {
                Purpose::Settle => "settled",
                Purpose::Refund { .. } => "refunded",
                Purpose::Release => "released",
            };
            let mut keys = vec![format!("{tag}:{marker}:{}", call.call_id)];
            if account_side {
                keys.push(account_hash(call.account));
                keys.push(format!("{}:leases", account_tag(call.account)));
                keys.push(usage_hash(call.account));
            }
            if writes_stream {
                keys.push(USAGE_STREAM.to_owned());
            }
            let mut args = vec![
                call.call_id.to_owned(),
                SETTLED_MARKER_MS.to_string(),
                u8::from(matches!(purpose, Purpose::Refund { .. })).to_string(),
                u8::from(account_side).to_string(),
                call.cost.to_string(),
                u8::from(metered).to_string(),
                usage.input_tokens.to_string(),
                usage.output_tokens.to_string(),
                usage.total_tokens.to_string(),
                call.key_id.to_owned(),
                call.agent.to_owned(),
                call.account.to_owned(),
                u8::from(writes_stream).to_string(),
                stream_maxlen.to_string(),
                call.request_id.to_owned(),
                call.session_id.to_owned(),
                call.status.to_string(),
                scopes.len().to_string(),
            ];
            for s in &scopes {
                keys.extend(s.limiter.keys());
                let slot = match s.scope {
                    Scope::Key => call.reservation.key_slot,
                    Scope::Agent => call.reservation.agent_slot,
                };
                args.push(u8::from(slot).to_string());
                push_spec(&mut args, s.policy.tokens);
                let refunded = refunds(s.scope) && s.policy.mode == Mode::Enforce;
                push_spec(&mut args, s.policy.requests.filter(|_| refunded));
            }
            SettleSide {
                invocation: Invocation { keys, args },
                writes_stream,
                account_side,
            }
        })
        .collect()
}

/// Why a settlement script runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// The call ended: release what it holds, charge it, record its usage.
    Settle,
    /// Another side refused the call: these scopes give back what they took, request
    /// tokens included.
    Refund { key: bool, agent: bool },
    /// The admission's answer was lost: release any reservation and slots it may hold.
    Release,
}

/// The `XADD` of a metered call, for a Cluster where the stream lives in its own slot.
pub fn stream_entry(call: &Settlement, stream_maxlen: u64, time_ms: u64) -> redis::Cmd {
    let usage = call.usage.unwrap_or_default();
    let mut cmd = redis::cmd("XADD");
    cmd.arg(USAGE_STREAM)
        .arg("MAXLEN")
        .arg("~")
        .arg(stream_maxlen)
        .arg("*")
        .arg("request_id")
        .arg(call.request_id)
        .arg("time_ms")
        .arg(time_ms)
        .arg("account")
        .arg(call.account)
        .arg("key_id")
        .arg(call.key_id)
        .arg("agent")
        .arg(call.agent)
        .arg("session_id")
        .arg(call.session_id)
        .arg("status")
        .arg(call.status)
        .arg("input_tokens")
        .arg(usage.input_tokens)
        .arg("output_tokens")
        .arg(usage.output_tokens)
        .arg("total_tokens")
        .arg(usage.total_tokens)
        .arg("cost")
        .arg(call.cost);
    cmd
}

impl Side<'_> {
    /// Whether this side judged the scope's buckets.
    pub fn judges(&self, scope: Scope) -> bool {
        self.scopes.iter().any(|s| s.scope == scope)
    }

    /// Whether this side reserved from the balance.
    pub fn priced(&self) -> bool {
        self.priced
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::Pricing;

    fn limited_policy(concurrency: Option<u32>) -> Policy {
        Policy {
            name: "p".into(),
            requests: Some(BucketSpec {
                rate: 1,
                period_ms: 1000,
                burst: 2,
            }),
            tokens: None,
            concurrency,
            mode: Mode::Enforce,
        }
    }

    const PRICING: Pricing = Pricing {
        input_per_mtok: 1,
        output_per_mtok: 1,
        reserve: 10,
    };

    fn admission<'a>(
        key: Option<&'a Policy>,
        agent: Option<&'a Policy>,
        priced: bool,
    ) -> Admission<'a> {
        Admission {
            call_id: "c1",
            key_id: "k1",
            account: "acct",
            agent: "ag_x",
            key_policy: key,
            agent_policy: agent,
            pricing: priced.then_some(&PRICING),
            now_ms: 0,
            lease_ms: 1000,
        }
    }

    /// Call `c1` of key `k1` ending unmetered, holding nothing.
    fn released<'a>(key: &'a Policy, agent: Option<&'a Policy>) -> Settlement<'a> {
        Settlement {
            call_id: "c1",
            key_id: "k1",
            account: "acct",
            agent: "ag_x",
            key_policy: Some(key),
            agent_policy: agent,
            reservation: Reservation::default(),
            usage: None,
            cost: 0,
            now_ms: 0,
            request_id: "r",
            session_id: "s",
            status: 0,
        }
    }

    /// The hash tag of a Redis key: what decides its Cluster slot.
    fn tag(key: &str) -> &str {
        let open = key.find('{').unwrap();
        let close = open + key[open..].find('}').unwrap();
        &key[open + 1..close]
    }

    #[test]
    fn a_call_with_no_limits_and_no_price_needs_no_round_trip() {
        for plan in [Plan::Single, Plan::Cluster] {
            assert!(admit_sides(&admission(None, None, false), plan, false).is_empty());
        }
    }

    #[test]
    fn on_a_cluster_each_script_stays_in_one_slot() {
        let policy = limited_policy(Some(1));
        let call = admission(Some(&policy), Some(&policy), true);
        let single = admit_sides(&call, Plan::Single, false);
        assert_eq!(single.len(), 1);
        let sides = admit_sides(&call, Plan::Cluster, false);
        assert_eq!(sides.len(), 2);
        for (side, expected) in sides.iter().zip(["account:acct", "agent:ag_x"]) {
            for key in &side.invocation.keys {
                assert_eq!(tag(key), expected, "{key}");
            }
        }
        let settlement = Settlement {
            reservation: Reservation {
                reserve: 10,
                key_slot: true,
                agent_slot: true,
            },
            usage: Some(crate::metering::Usage::default()),
            cost: 3,
            ..released(&policy, Some(&policy))
        };
        let sides = settle_sides(&settlement, Plan::Cluster, 100, Purpose::Settle);
        assert_eq!(sides.len(), 2);
        assert!(
            sides.iter().all(|s| !s.writes_stream),
            "the stream is its own slot"
        );
        for (side, expected) in sides.iter().zip(["account:acct", "agent:ag_x"]) {
            for key in &side.invocation.keys {
                assert_eq!(tag(key), expected, "{key}");
            }
        }
        let single = settle_sides(&settlement, Plan::Single, 100, Purpose::Settle);
        assert_eq!(single.len(), 1);
        assert!(single[0].writes_stream);
    }

    #[test]
    fn settling_refunding_and_releasing_a_call_each_have_their_own_marker() {
        let policy = limited_policy(Some(1));
        let settlement = Settlement {
            reservation: Reservation {
                reserve: 10,
                key_slot: true,
                agent_slot: false,
            },
            ..released(&policy, None)
        };
        let marker = |purpose| {
            settle_sides(&settlement, Plan::Cluster, 100, purpose)[0]
                .invocation
                .keys[0]
                .clone()
        };
        let refund = Purpose::Refund {
            key: true,
            agent: false,
        };
        let markers = [
            marker(Purpose::Settle),
            marker(refund),
            marker(Purpose::Release),
        ];
        assert_eq!(markers[0], "turnpike:{account:acct}:settled:c1");
        assert_ne!(markers[0], markers[1]);
        assert_ne!(markers[0], markers[2]);
        assert_ne!(markers[1], markers[2]);
    }

    #[test]
    fn a_release_with_nothing_held_needs_no_round_trip() {
        let policy = limited_policy(None);
        let settlement = released(&policy, None);
        assert!(settle_sides(&settlement, Plan::Single, 100, Purpose::Settle).is_empty());
    }

    #[test]
    fn replies_decode_and_malformed_ones_are_refused() {
        let policy = limited_policy(Some(1));
        let call = admission(Some(&policy), Some(&policy), false);
        let side = &admit_sides(&call, Plan::Single, false)[0];
        let admitted = decode_admit(side, &[1, 0b10, 0, 0, 1, 2, 1, 1, 1, 1, 1]).unwrap();
        assert_eq!(
            admitted.outcome,
            SideOutcome::Admitted {
                key_slot: false,
                agent_slot: true
            }
        );
        assert_eq!(
            admitted.shadow_hits,
            vec![ShadowHit {
                scope: Scope::Key,
                bucket: BucketKind::Requests
            }]
        );
        let limited = decode_admit(side, &[0, 2, 3, 1000, 0, 0, 0, 0, 0]).unwrap();
        assert_eq!(
            limited.outcome,
            SideOutcome::RateLimited {
                scope: Scope::Agent,
                bucket: BucketKind::Concurrency,
                retry_after_ms: 1000
            }
        );
        assert_eq!(limited.quota, None);
        for bad in [
            &[][..],
            &[9, 0, 0, 0, 0, 0, 0, 0, 0],
            &[0, 3, 1, 10, 0, 0, 0, 0, 0],
            &[0, 1, 7, 10, 0, 0, 0, 0, 0],
            &[1, 0, 0, 0, 0, 0, 0, 0, 2, 1, 1],
        ] {
            assert_eq!(decode_admit(side, bad), None, "{bad:?}");
        }
    }

    #[test]
    fn combining_sides_decides_as_one_store_would() {
        let policy = limited_policy(None);
        let call = admission(Some(&policy), Some(&policy), true);
        let reply = |outcome, remaining| SideReply {
            outcome,
            quota: Some(Quota {
                limit: 2,
                remaining,
                reset_secs: 1,
            }),
            shadow_hits: Vec::new(),
        };
        let limited = |scope, retry_after_ms| SideOutcome::RateLimited {
            scope,
            bucket: BucketKind::Requests,
            retry_after_ms,
        };
        let admitted = SideOutcome::Admitted {
            key_slot: false,
            agent_slot: false,
        };
        // A rate limit on one side wins over a low balance on the other.
        let refused = combine(
            &call,
            &[
                reply(SideOutcome::InsufficientBalance, 1),
                reply(limited(Scope::Agent, 500), 0),
            ],
        );
        assert!(matches!(
            refused,
            Err(Refusal::RateLimited {
                scope: Scope::Agent,
                quota: Some(Quota { remaining: 0, .. }),
                ..
            })
        ));
        // The longer wait wins; on a tie, the key's.
        for (key_wait, agent_wait, scope) in [
            (900, 500, Scope::Key),
            (500, 900, Scope::Agent),
            (500, 500, Scope::Key),
        ] {
            let refused = combine(
                &call,
                &[
                    reply(limited(Scope::Key, key_wait), 0),
                    reply(limited(Scope::Agent, agent_wait), 0),
                ],
            );
            assert!(
                matches!(&refused, Err(Refusal::RateLimited { scope: s, .. }) if *s == scope),
                "{refused:?}"
            );
        }
        let ok = combine(&call, &[reply(admitted.clone(), 1), reply(admitted, 0)]).unwrap();
        assert_eq!(ok.reservation.reserve, 10);
        assert_eq!(ok.quota.unwrap().remaining, 0, "the tightest quota");
    }
}
