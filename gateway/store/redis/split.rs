//! How one admission or settlement is split across scripts. On a single server one script
//! covers everything a call touches; on a Redis Cluster the agent's buckets live in the
//! agent's slot, so they are a second script (a second *side*), and the sides' answers are
//! combined into the one decision the embedded store would have made. Pure: no connection.

use turnpike_core::admission::{
    rule_text, Admission, Admitted, Extension, Refusal, Reservation, Scope, Settlement, ShadowHit,
    Sliced,
};
use turnpike_core::limits::{BucketKind, BucketSpec, Mode, Policy, Quota};

use super::names::{
    account_hash, account_leases, account_tag, agent_tag, usage_hash, Limiter, SETTLED_MARKER_MS,
    USAGE_STREAM,
};
use super::protocol::{
    flag, push_bucket, AdmitArgs, AdmitReply, Invocation, Outcome, ScopeLimits, SettleArgs,
    SettleScope, TALLY_ARGS,
};

/// How a deployment splits a call across scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// One server: one script per operation, whatever it touches.
    Single,
    /// Redis Cluster: the agent's buckets are a second script in the agent's slot.
    Cluster,
}

/// A scope a script judges: its policy, the buckets of it the shared store keeps (not
/// those this instance judged against its slices), and where its state lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Limited<'a> {
    scope: Scope,
    policy: &'a Policy,
    requests: Option<BucketSpec>,
    tokens: Option<BucketSpec>,
    /// The cap the store judges: none for a call seated in this instance's block.
    concurrency: Option<u32>,
    limiter: Limiter<'a>,
}

/// One script run of an admission: which scopes it judges, whether it holds the balance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Side<'a> {
    pub invocation: Invocation,
    scopes: Vec<Limited<'a>>,
    priced: bool,
}

impl Side<'_> {
    /// Whether this side judges the scope's buckets.
    pub fn judges(&self, scope: Scope) -> bool {
        self.scopes.iter().any(|s| s.scope == scope)
    }

    /// Whether this side reserves from the balance.
    pub fn priced(&self) -> bool {
        self.priced
    }
}

fn limited<'a>(
    account: &'a str,
    key_id: &'a str,
    agent: &'a str,
    key_policy: Option<&'a Policy>,
    agent_policy: Option<&'a Policy>,
    sliced: Sliced,
) -> [Option<Limited<'a>>; 2] {
    let limited = |scope, policy: &'a Policy, limiter| {
        let (requests, tokens) = sliced.shared_buckets(scope, policy);
        Limited {
            scope,
            policy,
            requests,
            tokens,
            concurrency: sliced.shared_cap(scope, policy),
            limiter,
        }
    };
    [
        key_policy.map(|policy| limited(Scope::Key, policy, Limiter::Key { account, key_id })),
        agent_policy.map(|policy| limited(Scope::Agent, policy, Limiter::Agent(agent))),
    ]
}

/// The scopes of each side, and whether the side holds the account.
fn group<'a>(
    plan: Plan,
    account_side: bool,
    [key, agent]: [Option<Limited<'a>>; 2],
) -> Vec<(bool, Vec<Limited<'a>>)> {
    let groups = match plan {
        Plan::Single => vec![(account_side, key.into_iter().chain(agent).collect())],
        Plan::Cluster => vec![
            (account_side, key.into_iter().collect()),
            (false, agent.into_iter().collect()),
        ],
    };
    groups
        .into_iter()
        .filter(|(account_side, scopes): &(bool, Vec<Limited>)| *account_side || !scopes.is_empty())
        .collect()
}

/// The extension scripts (extend.lua) for a running stream, one per side: the hold and the
/// key's scope with the account, the agent's slot in its own slot on a Cluster. A scope that
/// holds no slot and whose tokens are not read, and a side left with nothing to do, are
/// left out.
pub fn extend_sides(call: &Extension<'_>, plan: Plan) -> Vec<Invocation> {
    let scopes = limited(
        call.account,
        call.key_id,
        call.agent,
        call.key_policy,
        call.agent_policy,
        call.reservation.sliced,
    );
    let holds_slot = |scope: Scope| match scope {
        Scope::Key => call.reservation.key_slot,
        Scope::Agent => call.reservation.agent_slot,
    };
    let reads_tokens =
        |s: &Limited| s.scope == Scope::Key && s.policy.mode == Mode::Enforce && s.tokens.is_some();
    group(plan, call.priced, scopes)
        .into_iter()
        .map(|(priced, scopes)| {
            let scopes: Vec<Limited> = scopes
                .into_iter()
                .filter(|s| holds_slot(s.scope) || reads_tokens(s))
                .collect();
            (priced, scopes)
        })
        .filter(|(priced, scopes)| *priced || !scopes.is_empty())
        .map(|(priced, scopes)| {
            let mut keys = Vec::with_capacity(2 + 2 * scopes.len());
            let mut args = vec![
                call.call_id.to_owned(),
                call.lease_ms.to_string(),
                call.hold_to.to_string(),
                flag(priced),
                scopes.len().to_string(),
            ];
            if priced {
                keys.push(account_hash(call.account));
                keys.push(account_leases(call.account));
                keys.push(settled_marker(call.account, call.call_id));
            }
            for s in &scopes {
                keys.extend(s.limiter.keys());
                args.extend([flag(holds_slot(s.scope)), flag(reads_tokens(s))]);
                push_bucket(&mut args, s.tokens);
            }
            Invocation { keys, args }
        })
        .collect()
}

/// Whether Redis must judge some scope of `call` (a bucket without a slice here, a slot
/// no block had, a shadow policy), the `sliced` ones left out, as `admit_sides` decides.
pub fn judges_a_scope(call: &Admission<'_>, sliced: Sliced) -> bool {
    limited(
        call.account,
        call.key_id,
        call.agent,
        call.key_policy,
        call.agent_policy,
        sliced,
    )
    .iter()
    .flatten()
    .any(judged)
}

/// Whether a scope leaves the store anything to judge.
fn judged(s: &Limited) -> bool {
    s.requests.is_some()
        || s.tokens.is_some()
        || s.concurrency.is_some()
        || s.policy.mode == Mode::Shadow
}

/// The admission scripts for `call`, one per side; a side
/// with nothing to judge is left out, so a call with no limits and no price costs no round
/// trip at all.
pub fn admit_sides<'a>(call: &Admission<'a>, plan: Plan, sliced: Sliced) -> Vec<Side<'a>> {
    let scopes = limited(
        call.account,
        call.key_id,
        call.agent,
        call.key_policy,
        call.agent_policy,
        sliced,
    );
    // A scope left with nothing for the store to judge asks it nothing.
    let scopes = scopes.map(|s| s.filter(judged));
    // A reservation taken from this instance's escrow asks the store nothing.
    let priced = call.pricing.is_some() && !sliced.escrowed;
    group(plan, priced, scopes)
        .into_iter()
        .map(|(priced, scopes)| {
            let mut keys = Vec::with_capacity(2 + 2 * scopes.len());
            if priced {
                keys.push(account_hash(call.account));
                keys.push(account_leases(call.account));
            }
            for s in &scopes {
                keys.extend(s.limiter.keys());
            }
            let args = AdmitArgs {
                call_id: call.call_id,
                lease_ms: call.lease_ms,
                reserve: priced.then(|| call.pricing.map_or(0, |p| p.reserve)),
                scopes: scopes
                    .iter()
                    .map(|s| ScopeLimits {
                        enforce: s.policy.mode == Mode::Enforce,
                        requests: s.requests,
                        tokens: s.tokens,
                        concurrency: s.concurrency,
                    })
                    .collect(),
            };
            Side {
                invocation: Invocation {
                    keys,
                    args: args.encode(),
                },
                scopes,
                priced,
            }
        })
        .collect()
}

/// What one side's script answered, in the scopes' own terms.
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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SideReply {
    pub outcome: SideOutcome,
    pub quota: Option<Quota>,
    pub shadow_hits: Vec<ShadowHit>,
}

impl SideReply {
    /// Whether Redis refused the call on this side (a refusal that stands whatever else
    /// happened).
    pub fn refused(&self) -> bool {
        matches!(
            self.outcome,
            SideOutcome::RateLimited { .. } | SideOutcome::InsufficientBalance
        )
    }
}

/// Decodes a side's admission reply; `None` if it is not one for this side.
pub fn decode_admit(side: &Side, reply: &[i64]) -> Option<SideReply> {
    let reply = AdmitReply::decode(reply)?;
    let scope_at = |index: usize| side.scopes.get(index).map(|s| s.scope);
    let outcome = match reply.outcome {
        Outcome::Admitted { slots } => {
            let holds = |scope| {
                side.scopes
                    .iter()
                    .enumerate()
                    .any(|(i, s)| s.scope == scope && slots & (1 << i) != 0)
            };
            SideOutcome::Admitted {
                key_slot: holds(Scope::Key),
                agent_slot: holds(Scope::Agent),
            }
        }
        Outcome::RateLimited {
            scope,
            bucket,
            retry_after_ms,
        } => SideOutcome::RateLimited {
            scope: scope_at(scope)?,
            bucket,
            retry_after_ms,
        },
        Outcome::Broke => SideOutcome::InsufficientBalance,
    };
    let shadow_hits = reply
        .shadow
        .iter()
        .map(|&(scope, bucket)| {
            Some(ShadowHit {
                scope: scope_at(scope)?,
                bucket,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some(SideReply {
        outcome,
        quota: reply.quota,
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
            rule: policy.map_or_else(String::new, |p| rule_text(bucket, p)),
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

impl Purpose {
    fn refunds(self, scope: Scope) -> bool {
        match (self, scope) {
            (Purpose::Settle | Purpose::Release, _) => false,
            (Purpose::Refund { key, .. }, Scope::Key) => key,
            (Purpose::Refund { agent, .. }, Scope::Agent) => agent,
        }
    }

    /// Each purpose has a marker of its own: a call refunded or released may still be
    /// settled later (admitted on local buckets under `fail_open`).
    fn marker(self) -> &'static str {
        match self {
            Purpose::Settle => "settled",
            Purpose::Refund { .. } => "refunded",
            Purpose::Release => "released",
        }
    }
}

/// The marker a settlement of `call_id` for `purpose` leaves under `tag`.
fn marker(tag: &str, purpose: Purpose, call_id: &str) -> String {
    format!("{tag}:{}:{call_id}", purpose.marker())
}

/// The marker a call's settlement leaves on its account's side.
fn settled_marker(account: &str, call_id: &str) -> String {
    marker(&account_tag(account), Purpose::Settle, call_id)
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
    let held = call.reservation.reserve != 0 || call.cost != 0 || metered;
    let [key, agent] = limited(
        call.account,
        call.key_id,
        call.agent,
        call.key_policy,
        call.agent_policy,
        call.reservation.sliced,
    );
    let tokens_debited = |s: &Option<Limited>| metered && s.is_some_and(|s| s.tokens.is_some());
    let key_work = call.reservation.key_slot || tokens_debited(&key);
    let agent_work = call.reservation.agent_slot || tokens_debited(&agent);
    let key = key.filter(|_| key_work || purpose.refunds(Scope::Key));
    let agent = agent.filter(|_| agent_work || purpose.refunds(Scope::Agent));
    group(plan, held, [key, agent])
        .into_iter()
        .map(|(account_side, scopes)| {
            let tag = if account_side || scopes.iter().any(|s| s.scope == Scope::Key) {
                account_tag(call.account)
            } else {
                agent_tag(call.agent)
            };
            let writes_stream = plan == Plan::Single && account_side && metered;
            let mut keys = vec![marker(&tag, purpose, call.call_id)];
            if account_side {
                keys.push(account_hash(call.account));
                keys.push(account_leases(call.account));
                keys.push(usage_hash(call.account));
            }
            if writes_stream {
                keys.push(USAGE_STREAM.to_owned());
            }
            for s in &scopes {
                keys.extend(s.limiter.keys());
            }
            let args = SettleArgs {
                call_id: call.call_id,
                marker_ttl_ms: SETTLED_MARKER_MS,
                refund: matches!(purpose, Purpose::Refund { .. }),
                account_side,
                cost: call.cost,
                usage: call.usage,
                key_id: call.key_id,
                agent: call.agent,
                account: call.account,
                stream: writes_stream,
                stream_maxlen,
                request_id: call.request_id,
                session_id: call.session_id,
                status: call.status,
                scopes: scopes
                    .iter()
                    .map(|s| {
                        let refunded = purpose.refunds(s.scope) && s.policy.mode == Mode::Enforce;
                        SettleScope {
                            holds_slot: match s.scope {
                                Scope::Key => call.reservation.key_slot,
                                Scope::Agent => call.reservation.agent_slot,
                            },
                            tokens: s.tokens,
                            refund_requests: s.requests.filter(|_| refunded),
                        }
                    })
                    .collect(),
            };
            SettleSide {
                invocation: Invocation {
                    keys,
                    args: args.encode(),
                },
                writes_stream,
                account_side,
            }
        })
        .collect()
}

/// The tally (record.lua) for `call` on one server, when it holds nothing in Redis: no slot,
/// no hold (its reservation from this instance's escrow, or none), no token bucket Redis
/// debits. `None` for any other: it is settled by settle.lua.
pub fn tally(call: &Settlement, stream_maxlen: u64) -> Option<Invocation> {
    let reservation = &call.reservation;
    let holds = reservation.reserve != 0 && !reservation.sliced.escrowed;
    if reservation.key_slot || reservation.agent_slot || holds {
        return None;
    }
    let usage = call.usage;
    let debits = usage.is_some_and(|u| u.total_tokens > 0);
    let scopes = limited(
        call.account,
        call.key_id,
        call.agent,
        call.key_policy,
        call.agent_policy,
        reservation.sliced,
    );
    if debits && scopes.iter().flatten().any(|s| s.tokens.is_some()) {
        return None;
    }
    let u = usage.unwrap_or_default();
    let args = vec![
        call.call_id.to_owned(),
        call.cost.to_string(),
        flag(usage.is_some()),
        u.input_tokens.to_string(),
        u.output_tokens.to_string(),
        u.total_tokens.to_string(),
        call.key_id.to_owned(),
        call.agent.to_owned(),
        call.account.to_owned(),
        call.request_id.to_owned(),
        call.session_id.to_owned(),
        call.status.to_string(),
        stream_maxlen.to_string(),
    ];
    debug_assert_eq!(args.len(), TALLY_ARGS.len());
    Some(Invocation {
        keys: vec![
            account_hash(call.account),
            usage_hash(call.account),
            USAGE_STREAM.to_owned(),
        ],
        args,
    })
}

#[cfg(test)]
mod tests;
