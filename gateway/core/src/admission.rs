//! The admission and settlement decisions: every bucket of the key's and the agent's policy,
//! the concurrency slots and the account balance, judged and taken all together or not at
//! all. Pure functions of `(state, policy, now, cost)`; a store supplies the state and makes
//! the call atomic (a mutex in memory, one Lua script in Redis).

use crate::billing::{AccountState, Pricing};
use crate::limits::{BucketKind, BucketSpec, BucketState, Mode, Policy, Quota, Verdict};
use crate::usage::Usage;

/// Rate-limit state of one key or one agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LimiterState {
    pub requests: Option<BucketState>,
    pub tokens: Option<BucketState>,
    pub inflight: u32,
}

/// Whose limit refused a call; also the `scope` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Key,
    Agent,
}

impl Scope {
    pub const ALL: [Scope; 2] = [Scope::Key, Scope::Agent];

    pub fn label(self) -> &'static str {
        match self {
            Scope::Key => "key",
            Scope::Agent => "agent",
        }
    }
}

/// What one call asks for. Plain data, so the Redis store can ship it to its script.
#[derive(Debug, Clone, Copy)]
pub struct Admission<'a> {
    /// Unique per call, made by the gateway (a client may reuse its X-Request-Id).
    pub call_id: &'a str,
    pub key_id: &'a str,
    pub account: &'a str,
    pub agent: &'a str,
    pub key_policy: Option<&'a Policy>,
    pub agent_policy: Option<&'a Policy>,
    pub pricing: Option<&'a Pricing>,
    pub now_ms: u64,
    /// How long a networked store holds the call's slots and reservation if it is never
    /// settled (its instance died): longer than the call can last.
    pub lease_ms: u64,
}

/// What an admitted call holds until it is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reservation {
    pub reserve: i64,
    pub key_slot: bool,
    pub agent_slot: bool,
    /// The buckets this instance judged against its own slices (issue 23): the shared
    /// store neither judged them nor debits them; the instance does.
    pub sliced: Sliced,
}

/// Which of a call's buckets were judged against this instance's slices of them rather
/// than in the shared store, in which scopes it sits in this instance's block of
/// concurrency slots, and whether its reservation came from this instance's escrow of the
/// account's balance. The embedded store slices nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sliced {
    pub key_requests: bool,
    pub key_tokens: bool,
    pub agent_requests: bool,
    pub agent_tokens: bool,
    pub key_seat: bool,
    pub agent_seat: bool,
    pub escrowed: bool,
}

impl Sliced {
    pub fn requests(&self, scope: Scope) -> bool {
        match scope {
            Scope::Key => self.key_requests,
            Scope::Agent => self.agent_requests,
        }
    }

    pub fn tokens(&self, scope: Scope) -> bool {
        match scope {
            Scope::Key => self.key_tokens,
            Scope::Agent => self.agent_tokens,
        }
    }

    /// Whether the call sits in this instance's block of the scope's slots.
    pub fn seated(&self, scope: Scope) -> bool {
        match scope {
            Scope::Key => self.key_seat,
            Scope::Agent => self.agent_seat,
        }
    }

    pub fn set(&mut self, scope: Scope, bucket: BucketKind) {
        match (scope, bucket) {
            (Scope::Key, BucketKind::Requests) => self.key_requests = true,
            (Scope::Key, BucketKind::Tokens) => self.key_tokens = true,
            (Scope::Agent, BucketKind::Requests) => self.agent_requests = true,
            (Scope::Agent, BucketKind::Tokens) => self.agent_tokens = true,
            (Scope::Key, BucketKind::Concurrency) => self.key_seat = true,
            (Scope::Agent, BucketKind::Concurrency) => self.agent_seat = true,
        }
    }

    /// `policy`'s request and token buckets as the shared store is to see them: the
    /// sliced ones left out. (Its concurrency cap: [`Sliced::shared_cap`].)
    pub fn shared_buckets(
        &self,
        scope: Scope,
        policy: &Policy,
    ) -> (Option<BucketSpec>, Option<BucketSpec>) {
        (
            policy.requests.filter(|_| !self.requests(scope)),
            policy.tokens.filter(|_| !self.tokens(scope)),
        )
    }

    /// `policy`'s concurrency cap as the shared store is to judge it: none when the call
    /// sits in this instance's block.
    pub fn shared_cap(&self, scope: Scope, policy: &Policy) -> Option<u32> {
        policy.concurrency.filter(|_| !self.seated(scope))
    }
}

/// A would-be refusal by a policy in shadow mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShadowHit {
    pub scope: Scope,
    pub bucket: BucketKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    pub reservation: Reservation,
    /// The tightest enforced request bucket, after this call took its token.
    pub quota: Option<Quota>,
    pub shadow_hits: Vec<ShadowHit>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    RateLimited {
        scope: Scope,
        bucket: BucketKind,
        retry_after_ms: u64,
        /// The refusing rule, for the error message ("10 requests per 1s").
        rule: String,
        quota: Option<Quota>,
        shadow_hits: Vec<ShadowHit>,
    },
    InsufficientBalance {
        quota: Option<Quota>,
        shadow_hits: Vec<ShadowHit>,
    },
}

/// Milliseconds a concurrency refusal asks the client to wait.
const CONCURRENCY_RETRY_MS: u64 = 1000;

/// Judges and, when admitted, takes: one request token from each request bucket, a
/// concurrency slot where a policy limits it, and the reservation from the account.
/// Buckets are refilled to `now_ms` either way, which changes no decision.
pub fn admit(
    key: &mut LimiterState,
    agent: &mut LimiterState,
    account: Option<&mut AccountState>,
    call: &Admission,
) -> Result<Admitted, Refusal> {
    let now = call.now_ms;
    let mut shadow_hits = Vec::new();
    let mut refusal: Option<(Scope, BucketKind, u64, String)> = None;
    let limited = [
        (Scope::Key, call.key_policy, &mut *key),
        (Scope::Agent, call.agent_policy, &mut *agent),
    ];
    for (scope, policy, state) in limited {
        let Some(policy) = policy else { continue };
        for (bucket, spec, verdict) in verdicts(policy, state, now) {
            let Verdict::Deny { retry_after_ms } = verdict else {
                continue;
            };
            if policy.mode == Mode::Shadow {
                shadow_hits.push(ShadowHit { scope, bucket });
            } else if refusal.as_ref().is_none_or(|r| retry_after_ms > r.2) {
                let rule = describe(bucket, spec, policy);
                refusal = Some((scope, bucket, retry_after_ms, rule));
            }
        }
    }
    if let Some((scope, bucket, retry_after_ms, rule)) = refusal {
        return Err(Refusal::RateLimited {
            scope,
            bucket,
            retry_after_ms,
            rule,
            quota: tightest_quota(call, key, agent),
            shadow_hits,
        });
    }
    let reserve = call.pricing.map_or(0, |p| p.reserve);
    if let (Some(account), Some(_)) = (account.as_deref(), call.pricing) {
        if !account.can_reserve(reserve) {
            return Err(Refusal::InsufficientBalance {
                quota: tightest_quota(call, key, agent),
                shadow_hits,
            });
        }
    }
    let reservation = Reservation {
        reserve,
        key_slot: take(key, call.key_policy),
        agent_slot: take(agent, call.agent_policy),
        sliced: Sliced::default(),
    };
    if let (Some(account), Some(_)) = (account, call.pricing) {
        account.reserve(reserve);
    }
    Ok(Admitted {
        reservation,
        quota: tightest_quota(call, key, agent),
        shadow_hits,
    })
}

/// What a finished call gives back: its reservation, and the usage and cost if it was metered.
#[derive(Debug, Clone, Copy)]
pub struct Settlement<'a> {
    /// Unique per call, made by the gateway (a client may reuse its X-Request-Id).
    pub call_id: &'a str,
    pub key_id: &'a str,
    pub account: &'a str,
    pub agent: &'a str,
    pub key_policy: Option<&'a Policy>,
    pub agent_policy: Option<&'a Policy>,
    pub reservation: Reservation,
    /// `None`: the call was not metered; only the reservation is released.
    pub usage: Option<Usage>,
    pub cost: i64,
    pub now_ms: u64,
    /// For the usage log: the call's X-Request-Id, session and worker status.
    pub request_id: &'a str,
    pub session_id: &'a str,
    pub status: u16,
}

/// A running stream asking to go on (SPEC §5): that its call may hold `hold_to` of its
/// account in all (a hold extended, as a pending transfer is), and that its leases run
/// `lease_ms` from now. Plain data, like [`Admission`].
#[derive(Debug, Clone, Copy)]
pub struct Extension<'a> {
    pub call_id: &'a str,
    pub key_id: &'a str,
    pub account: &'a str,
    pub agent: &'a str,
    pub key_policy: Option<&'a Policy>,
    pub agent_policy: Option<&'a Policy>,
    /// What admission took: which slots' leases to renew, whether the account is held.
    pub reservation: Reservation,
    pub priced: bool,
    /// The hold the stream wants now, in the balance's unit.
    pub hold_to: i64,
    pub now_ms: u64,
    pub lease_ms: u64,
}

/// What an extension left the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Extended {
    /// The call's hold now: `hold_to`, or less when the account could not cover it all.
    pub held: i64,
    /// Whole tokens in the key's enforced token bucket now (below zero in debt); `None`
    /// when the key's policy has no enforced token bucket.
    pub tokens_left: Option<i64>,
}

/// Grows the call's hold (`held`) towards `call.hold_to` by what the account has free,
/// never beyond it, and reads the key's token bucket. A hold never shrinks here: what it
/// does not use goes back at settlement.
pub fn extend(
    key: &LimiterState,
    account: Option<&mut AccountState>,
    held: &mut i64,
    call: &Extension,
) -> Extended {
    if let Some(account) = account.filter(|_| call.priced) {
        let free = account.balance.saturating_sub(account.reserved).max(0);
        let grow = call.hold_to.saturating_sub(*held).clamp(0, free);
        account.reserve(grow);
        *held = held.saturating_add(grow);
    }
    let tokens_left = call
        .key_policy
        .filter(|p| p.mode == Mode::Enforce)
        .and_then(|p| p.tokens)
        .map(|spec| {
            let bucket = current(key.tokens, &spec, call.now_ms);
            bucket.level.div_euclid(spec.unit().max(1))
        });
    Extended {
        held: *held,
        tokens_left,
    }
}

/// Releases the reservation and slots, debits the cost and the token buckets.
pub fn settle(
    key: &mut LimiterState,
    agent: &mut LimiterState,
    account: Option<&mut AccountState>,
    call: &Settlement,
) {
    let tokens = call.usage.map_or(0, |u| u.total_tokens);
    for (policy, state, slot) in [
        (call.key_policy, &mut *key, call.reservation.key_slot),
        (call.agent_policy, &mut *agent, call.reservation.agent_slot),
    ] {
        if slot {
            state.inflight = state.inflight.saturating_sub(1);
        }
        if let (Some(spec), true) = (policy.and_then(|p| p.tokens), tokens > 0) {
            let mut bucket = current(state.tokens, &spec, call.now_ms);
            bucket.take(&spec, tokens);
            state.tokens = Some(bucket);
        }
    }
    if let Some(account) = account {
        account.settle(call.reservation.reserve, call.cost);
    }
}

/// Each bucket of `policy` with its verdict, refilling the stored state as it goes.
fn verdicts(
    policy: &Policy,
    state: &mut LimiterState,
    now: u64,
) -> impl Iterator<Item = (BucketKind, Option<BucketSpec>, Verdict)> {
    let mut out: [Option<(BucketKind, Option<BucketSpec>, Verdict)>; 3] = [None; 3];
    if let Some(spec) = policy.requests {
        let bucket = current(state.requests, &spec, now);
        state.requests = Some(bucket);
        out[0] = Some((BucketKind::Requests, Some(spec), bucket.verdict(&spec)));
    }
    if let Some(spec) = policy.tokens {
        let bucket = current(state.tokens, &spec, now);
        state.tokens = Some(bucket);
        out[1] = Some((BucketKind::Tokens, Some(spec), bucket.verdict(&spec)));
    }
    if let Some(limit) = policy.concurrency {
        let verdict = if state.inflight < limit {
            Verdict::Allow
        } else {
            Verdict::Deny {
                retry_after_ms: CONCURRENCY_RETRY_MS,
            }
        };
        out[2] = Some((BucketKind::Concurrency, None, verdict));
    }
    out.into_iter().flatten()
}

/// Takes a request token and a slot; returns whether a slot was taken. A shadow policy takes
/// only what is there, so trying a limit never pushes a bucket into debt.
fn take(state: &mut LimiterState, policy: Option<&Policy>) -> bool {
    let Some(policy) = policy else { return false };
    if let (Some(spec), Some(bucket)) = (policy.requests, state.requests.as_mut()) {
        if policy.mode == Mode::Enforce || bucket.verdict(&spec) == Verdict::Allow {
            bucket.take(&spec, 1);
        }
    }
    if policy.concurrency.is_some() {
        state.inflight += 1;
        return true;
    }
    false
}

fn current(state: Option<BucketState>, spec: &BucketSpec, now: u64) -> BucketState {
    state.map_or_else(|| BucketState::full(spec, now), |s| s.refilled(spec, now))
}

/// The `RateLimit-*` numbers a call would see now, changing nothing: for answers to
/// authenticated calls refused before admission. A bucket not seen yet is full.
pub fn peek_quota(
    key: Option<&LimiterState>,
    agent: Option<&LimiterState>,
    call: &Admission,
) -> Option<Quota> {
    let refreshed = |state: Option<&LimiterState>, policy: Option<&Policy>| {
        let mut state = state.copied().unwrap_or_default();
        if let Some(spec) = policy.and_then(|p| p.requests) {
            state.requests = Some(current(state.requests, &spec, call.now_ms));
        }
        state
    };
    tightest_quota(
        call,
        &refreshed(key, call.key_policy),
        &refreshed(agent, call.agent_policy),
    )
}

/// The enforced request bucket with the fewest tokens left, for the `RateLimit-*` headers.
fn tightest_quota(call: &Admission, key: &LimiterState, agent: &LimiterState) -> Option<Quota> {
    [(call.key_policy, key), (call.agent_policy, agent)]
        .into_iter()
        .filter_map(|(policy, state)| {
            let policy = policy.filter(|p| p.mode == Mode::Enforce)?;
            Some(state.requests?.quota(&policy.requests?))
        })
        .min_by_key(|q| q.remaining)
}

/// The rule a refusal names, e.g. "10 requests per 1s".
pub fn rule_text(bucket: BucketKind, policy: &Policy) -> String {
    let spec = match bucket {
        BucketKind::Requests => policy.requests,
        BucketKind::Tokens => policy.tokens,
        BucketKind::Concurrency => None,
    };
    describe(bucket, spec, policy)
}

fn describe(bucket: BucketKind, spec: Option<BucketSpec>, policy: &Policy) -> String {
    match (bucket, spec) {
        (BucketKind::Concurrency, _) | (_, None) => {
            format!("{} calls in flight", policy.concurrency.unwrap_or_default())
        }
        (bucket, Some(spec)) => format!(
            "{} {} per {}",
            spec.rate,
            bucket.label(),
            crate::units::format_duration_ms(spec.period_ms)
        ),
    }
}

#[cfg(test)]
mod tests;
