//! The ledger at the edge, its first part (issue 23): this instance's slices of the shared
//! request and usage-token buckets. A call whose bucket this instance holds a slice of is
//! judged and debited here, without Redis; the script the call still needs (for a balance or
//! concurrency slots, or a bucket whose slice ran dry) leaves that bucket out
//! (`Reservation::sliced`). A slice is asked for before it runs dry (one sync at a time per
//! slice, in the background), and what an idle slice holds goes back within a second. The
//! arithmetic is `turnpike_core::slices`; the shared side is slice.lua.
//!
//! Only enforced buckets large and fast enough to slice are (`SIZING`: a quarter of the
//! burst holds at least four tokens, and four refill a second); the others, and shadow
//! policies, are judged call by call, as before.

use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::sync::Arc;

use turnpike_core::admission::{Admission, Extension, Scope, Settlement, Sliced};
use turnpike_core::limits::{BucketKind, BucketSpec, BucketState, Mode, Policy, Quota};
use turnpike_core::slices::{RateMeter, Slice, SIZING};

use super::names::Limiter;
use super::protocol::{SliceReply, SLICE_LEASE_MS};

/// Which bucket a slice is of: its limiter hash (and the hash's slice leases), which of its
/// buckets, and the spec it was taken under (a reload that changes the spec starts a new
/// slice; the old one goes back when idle).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SliceOf {
    pub keys: [String; 2],
    pub bucket: BucketKind,
    pub spec: BucketSpec,
}

/// One slice as this instance holds it.
#[derive(Debug, Default)]
pub struct Held {
    slice: Slice,
    meter: RateMeter,
    /// Calls judged against this slice, per second: a slice is taken only for a bucket this
    /// instance calls on often enough.
    calls: RateMeter,
    /// The shared bucket's level (units) after the last sync, and when that was.
    shared_level: i64,
    synced_ms: Option<u64>,
    /// A sync of this slice is under way: no second one is sent.
    syncing: bool,
    /// The last sync found the bucket empty: no refill is asked before it has a token again.
    no_refill_before_ms: u64,
    /// When the store may stop counting this slice as held (its lease, renewed by every
    /// sync), as this instance reckons it: never later than the store does.
    lease_until_ms: u64,
}

/// A sync to send: `give_units` back (below zero: debt owed), `keep_units` still held here,
/// then `ask_tokens` out.
pub struct Sync {
    pub of: SliceOf,
    pub held: Arc<Mutex<Held>>,
    pub ask_tokens: u64,
    pub give_units: i64,
    pub keep_units: i64,
}

/// A bucket (or a concurrency limit, `seats`) is sliced only while this instance judges at
/// least this many calls a second against it.
pub const MIN_CALLS_PER_SEC: u64 = 8;
/// A slice still in use is synced when its lease has less than this left.
const RENEW_WITHIN_MS: u64 = 1_000;
/// Taken off the lease here: the store starts it when the sync runs, a little after it was
/// sent.
const LEASE_MARGIN_MS: u64 = 100;
/// After a sync that got less than half of what it asked (the bucket is at its limit), the
/// next waits this long.
const CONTENDED_WAIT_MS: u64 = 250;

/// What the ledger decided for one admission.
#[derive(Debug, Default)]
pub struct Taken {
    pub sliced: Sliced,
    /// The tightest sliced request bucket's `RateLimit-*` numbers, as this instance sees it.
    pub quota: Option<Quota>,
    /// A bucket that has no token here nor, as of this instance's last sync and the refill
    /// since, in the store: the call is refused here, without a round trip. The longest wait.
    pub refusal: Option<Dry>,
}

/// A bucket with no token for the call, and how long until it has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dry {
    pub scope: Scope,
    pub bucket: BucketKind,
    pub retry_after_ms: u64,
}

/// How long an empty, idle slice is kept before it is forgotten.
const FORGET_AFTER_MS: u64 = 10_000;

#[derive(Default)]
pub struct Ledger {
    slices: RwLock<HashMap<SliceOf, Arc<Mutex<Held>>>>,
}

/// The enforced, sliceable buckets of one scope's policy.
fn sliceable(policy: Option<&Policy>) -> impl Iterator<Item = (BucketKind, BucketSpec)> + '_ {
    policy
        .filter(|p| p.mode == Mode::Enforce)
        .into_iter()
        .flat_map(|p| {
            [
                (BucketKind::Requests, p.requests),
                (BucketKind::Tokens, p.tokens),
            ]
        })
        .filter_map(|(bucket, spec)| Some((bucket, spec?)))
        .filter(|(_, spec)| SIZING.slices(spec))
}

fn limiter<'a>(scope: Scope, account: &'a str, key_id: &'a str, agent: &'a str) -> Limiter<'a> {
    match scope {
        Scope::Key => Limiter::Key { account, key_id },
        Scope::Agent => Limiter::Agent(agent),
    }
}

impl Ledger {
    /// The slice of `of`, made (empty) on first use.
    fn held(&self, of: &SliceOf) -> Arc<Mutex<Held>> {
        if let Some(held) = self.slices.read().get(of) {
            return Arc::clone(held);
        }
        Arc::clone(self.slices.write().entry(of.clone()).or_default())
    }

    /// Judges `call`'s sliceable buckets against this instance's slices: a request token
    /// taken from each request slice that has one, and each token slice that holds a whole
    /// token passed; `syncs` gets the refills now due. A bucket whose slice cannot decide is
    /// left to the store.
    pub fn take(&self, call: &Admission<'_>, now: u64, syncs: &mut Vec<Sync>) -> Taken {
        let mut taken = Taken::default();
        for (scope, policy) in [
            (Scope::Key, call.key_policy),
            (Scope::Agent, call.agent_policy),
        ] {
            let mut keys = None;
            for (bucket, spec) in sliceable(policy) {
                let keys = keys.get_or_insert_with(|| {
                    limiter(scope, call.account, call.key_id, call.agent).sliced()
                });
                let of = SliceOf {
                    keys: keys.clone(),
                    bucket,
                    spec,
                };
                let held = self.held(&of);
                let mut h = held.lock();
                h.expire(now);
                h.calls.record(1, now);
                let decided = match bucket {
                    BucketKind::Requests => {
                        h.meter.record(1, now);
                        h.slice.take(&spec, now)
                    }
                    _ => {
                        h.slice.used_ms = now;
                        h.slice.units >= spec.unit()
                    }
                };
                if decided {
                    taken.sliced.set(scope, bucket);
                } else if let Some(retry_after_ms) = h.dry_for(&spec, now) {
                    if taken
                        .refusal
                        .is_none_or(|r| retry_after_ms > r.retry_after_ms)
                    {
                        taken.refusal = Some(Dry {
                            scope,
                            bucket,
                            retry_after_ms,
                        });
                    }
                }
                if bucket == BucketKind::Requests && h.synced_ms.is_some() {
                    let quota = h.quota(&spec, now);
                    if quota.remaining < taken.quota.map_or(u64::MAX, |q| q.remaining) {
                        taken.quota = Some(quota);
                    }
                }
                h.refill_if_due(&of, &held, &spec, now, syncs);
            }
        }
        taken
    }

    /// Gives back the request tokens `take` took for a call that was not admitted after all.
    pub fn untake(&self, call: &Admission<'_>, sliced: Sliced) {
        for (scope, policy) in [
            (Scope::Key, call.key_policy),
            (Scope::Agent, call.agent_policy),
        ] {
            let Some(spec) = policy.and_then(|p| p.requests) else {
                continue;
            };
            if sliced.requests(scope) {
                let of = SliceOf {
                    keys: limiter(scope, call.account, call.key_id, call.agent).sliced(),
                    bucket: BucketKind::Requests,
                    spec,
                };
                self.held(&of).lock().slice.credit(spec.unit());
            }
        }
    }

    /// Debits a settled call's usage tokens from the slices it was judged against.
    pub fn settle(&self, call: &Settlement<'_>, now: u64, syncs: &mut Vec<Sync>) {
        let Some(usage) = call.usage.filter(|u| u.total_tokens > 0) else {
            return;
        };
        let sliced = call.reservation.sliced;
        for (scope, policy) in [
            (Scope::Key, call.key_policy),
            (Scope::Agent, call.agent_policy),
        ] {
            let Some(spec) = policy.and_then(|p| p.tokens) else {
                continue;
            };
            if !sliced.tokens(scope) {
                continue;
            }
            let of = SliceOf {
                keys: limiter(scope, call.account, call.key_id, call.agent).sliced(),
                bucket: BucketKind::Tokens,
                spec,
            };
            let held = self.held(&of);
            let mut h = held.lock();
            h.expire(now);
            h.slice.debit(&spec, usage.total_tokens, now);
            h.meter.record(usage.total_tokens, now);
            h.refill_if_due(&of, &held, &spec, now, syncs);
        }
    }

    /// Whole tokens in the key's token bucket as this instance sees it (its slice and the
    /// shared bucket at the last sync), for a stream whose key's tokens are sliced.
    pub fn tokens_left(&self, call: &Extension<'_>, now: u64) -> Option<i64> {
        let policy = call.key_policy.filter(|p| p.mode == Mode::Enforce)?;
        let spec = policy.tokens?;
        if !call.reservation.sliced.key_tokens {
            return None;
        }
        let of = SliceOf {
            keys: limiter(Scope::Key, call.account, call.key_id, call.agent).sliced(),
            bucket: BucketKind::Tokens,
            spec,
        };
        let held = self.held(&of);
        let h = held.lock();
        Some(h.level(&spec, now).div_euclid(spec.unit()))
    }

    /// Slices no call has used for a second: what they hold goes back (debt too: it is owed
    /// to the shared bucket). Empty ones idle for longer are forgotten.
    pub fn idle(&self, now_ms: u64, syncs: &mut Vec<Sync>) {
        let mut forget = Vec::new();
        let slices = self.slices.read();
        // A slice of a bucket whose spec changed (a reload) is replaced by one under the new
        // spec: its tokens, in the old spec's units, are dropped rather than given back (the
        // store stops counting them when their lease runs out).
        let mut latest: HashMap<(&[String; 2], BucketKind), u64> = HashMap::new();
        for (of, held) in slices.iter() {
            let used = held.lock().slice.used_ms;
            let at = latest.entry((&of.keys, of.bucket)).or_default();
            *at = (*at).max(used);
        }
        for (of, held) in slices.iter() {
            let mut h = held.lock();
            if h.syncing {
                continue;
            }
            h.expire(now_ms);
            if latest[&(&of.keys, of.bucket)] > h.slice.used_ms {
                h.slice.units = 0;
            }
            if let Some(units) = h.slice.give_back_due(&SIZING, now_ms) {
                h.syncing = true;
                syncs.push(Sync {
                    of: of.clone(),
                    held: Arc::clone(held),
                    ask_tokens: 0,
                    give_units: units,
                    keep_units: 0,
                });
            } else if now_ms.saturating_sub(h.slice.used_ms) >= FORGET_AFTER_MS {
                forget.push(of.clone());
            }
        }
        drop(slices);
        if !forget.is_empty() {
            let mut slices = self.slices.write();
            for of in forget {
                // Only if still idle and empty: a call may have come meanwhile.
                let unused = slices.get(&of).is_some_and(|held| {
                    let h = held.lock();
                    !h.syncing && h.slice.units == 0 && Arc::strong_count(held) == 1
                });
                if unused {
                    slices.remove(&of);
                }
            }
        }
    }
}

impl Held {
    /// The bucket as this instance sees it at `now_ms`: the shared level at the last sync,
    /// refilled since, with this slice on top.
    fn level(&self, spec: &BucketSpec, now_ms: u64) -> i64 {
        let shared = self.shared_at(spec, now_ms).unwrap_or(0).max(0);
        shared.saturating_add(self.slice.units).min(spec.capacity())
    }

    /// The store's bucket as of the last sync, refilled since; `None` before any sync.
    fn shared_at(&self, spec: &BucketSpec, now_ms: u64) -> Option<i64> {
        let at = self.synced_ms?;
        let state = BucketState {
            level: self.shared_level,
            updated_ms: at,
        };
        Some(state.refilled(spec, now_ms).level)
    }

    /// When neither this slice nor the store's bucket (as of the last sync, refilled since)
    /// holds a whole token: how long until one refills. `None` when one may be there, or
    /// nothing is known yet: the store decides.
    fn dry_for(&self, spec: &BucketSpec, now_ms: u64) -> Option<u64> {
        let here = self
            .shared_at(spec, now_ms)?
            .saturating_add(self.slice.units.min(0));
        let missing = spec.unit().saturating_sub(here);
        (missing > 0).then(|| (missing as u64).div_ceil(spec.rate.max(1)))
    }

    fn quota(&self, spec: &BucketSpec, now_ms: u64) -> Quota {
        BucketState {
            level: self.level(spec, now_ms),
            updated_ms: now_ms,
        }
        .quota(spec)
    }

    fn refill_if_due(
        &mut self,
        of: &SliceOf,
        held: &Arc<Mutex<Held>>,
        spec: &BucketSpec,
        now_ms: u64,
        syncs: &mut Vec<Sync>,
    ) {
        let ask = SIZING.ask(spec, self.meter.per_sec(now_ms));
        // A bucket this instance calls on less than a few times a second is judged call by
        // call: a slice of it would be taken and given back for every few calls.
        let busy = self.calls.per_sec(now_ms) >= MIN_CALLS_PER_SEC;
        let refill = busy && self.slice.refill_due(spec, ask) && now_ms >= self.no_refill_before_ms;
        let renew =
            self.slice.units > 0 && self.lease_until_ms.saturating_sub(now_ms) <= RENEW_WITHIN_MS;
        if self.syncing || !(refill || renew) {
            return;
        }
        // A renewal alone asks for nothing: a slice grows only as it is used.
        let ask = if refill { ask } else { 0 };
        self.syncing = true;
        // A debt is paid with the sync; what is held is kept, and counted as held.
        let give = self.slice.units.min(0);
        self.slice.units -= give;
        syncs.push(Sync {
            of: of.clone(),
            held: Arc::clone(held),
            ask_tokens: ask,
            give_units: give,
            keep_units: self.slice.units,
        });
    }

    /// A slice whose lease may have run out holds nothing: the store may have handed its
    /// tokens out again. (A debt stays: it is still owed.)
    fn expire(&mut self, now_ms: u64) {
        if now_ms >= self.lease_until_ms && self.slice.units > 0 {
            self.slice.units = 0;
        }
    }

    /// The store's answer to `sync`, sent at `asked_ms`: `granted` units, the shared level
    /// after, and what this instance is recorded keeping (less than it said it kept when its
    /// holding had expired meanwhile: the difference was never its to use, and is owed). A
    /// bucket that could not give half of what was asked is at its limit: the next refill
    /// waits `CONTENDED_WAIT_MS`, and calls this slice cannot take meanwhile are judged one by
    /// one in the store (exactly), so that contending instances do not sync once per call.
    pub fn synced(&mut self, sync: &Sync, reply: SliceReply, asked_ms: u64) {
        let (spec, asked) = (&sync.of.spec, sync.ask_tokens);
        let SliceReply {
            granted,
            level: shared_level,
            kept,
        } = reply;
        self.slice.units = self
            .slice
            .units
            .saturating_sub((sync.keep_units - kept).max(0));
        self.slice.credit(granted);
        self.shared_level = shared_level;
        self.synced_ms = Some(asked_ms);
        self.lease_until_ms = asked_ms + SLICE_LEASE_MS - LEASE_MARGIN_MS;
        let short = (granted as i128) * 2 < asked as i128 * spec.unit() as i128;
        self.no_refill_before_ms = if short {
            asked_ms + CONTENDED_WAIT_MS
        } else {
            0
        };
        self.syncing = false;
    }

    /// A sync that got no answer: `give_units` come back to the slice only when the store
    /// surely did not apply it; otherwise they are lost to this slice (tokens unused, never
    /// tokens twice).
    pub fn unsynced(&mut self, give_units: i64, surely_not_applied: bool) {
        if surely_not_applied {
            self.slice.units = self.slice.units.saturating_add(give_units);
        }
        self.syncing = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use turnpike_core::admission::Reservation;
    use turnpike_core::usage::Usage;

    fn policy(burst: u64) -> Policy {
        let spec = BucketSpec {
            rate: 100,
            period_ms: 1000,
            burst,
        };
        Policy {
            name: "p".into(),
            requests: Some(spec),
            tokens: Some(BucketSpec {
                rate: 10_000,
                period_ms: 1000,
                burst: 10_000,
            }),
            concurrency: None,
            mode: Mode::Enforce,
        }
    }

    fn admission(key: &Policy) -> Admission<'_> {
        Admission {
            call_id: "call_1",
            key_id: "key_1",
            account: "acct",
            agent: "ag",
            key_policy: Some(key),
            agent_policy: None,
            pricing: None,
            now_ms: 0,
            lease_ms: 1000,
        }
    }

    /// Seven calls at `now` that no slice decides: the eighth finds the bucket busy enough to
    /// slice (`MIN_CALLS_PER_SEC`).
    fn busy(ledger: &Ledger, policy: &Policy, now: u64) {
        let mut syncs = Vec::new();
        for _ in 1..MIN_CALLS_PER_SEC {
            ledger.take(&admission(policy), now, &mut syncs);
        }
        assert!(syncs.is_empty(), "a quiet bucket is judged call by call");
    }

    fn answer(syncs: Vec<Sync>, granted_tokens: i64, level: i64) {
        for sync in syncs {
            let unit = sync.of.spec.unit();
            let reply = SliceReply {
                granted: granted_tokens * unit,
                level: level * unit,
                kept: sync.keep_units,
            };
            sync.held.lock().synced(&sync, reply, 0);
        }
    }

    #[test]
    fn a_bucket_is_judged_here_once_a_slice_arrives_and_small_ones_never_are() {
        let ledger = Ledger::default();
        let big = policy(100);
        let mut syncs = Vec::new();
        busy(&ledger, &big, 0);
        let first = ledger.take(&admission(&big), 0, &mut syncs);
        assert_eq!(first.sliced, Sliced::default(), "no slice yet");
        assert_eq!(syncs.len(), 2, "a refill asked for each bucket");
        assert_eq!(syncs[0].ask_tokens, 8, "a second of eight calls a second");
        answer(std::mem::take(&mut syncs), 8, 90);
        let second = ledger.take(&admission(&big), 1, &mut syncs);
        assert!(second.sliced.key_requests && second.sliced.key_tokens);
        assert_eq!(
            second.quota.map(|q| q.remaining),
            Some(97),
            "90 shared + 7 here"
        );
        assert!(syncs.is_empty(), "seven left of eight: no refill yet");
        // Little used, a slice is renewed before its lease runs out, asking for nothing
        // more, and dropped once its lease may be over.
        let ledger = Ledger::default();
        busy(&ledger, &big, 0);
        ledger.take(&admission(&big), 0, &mut syncs);
        answer(std::mem::take(&mut syncs), 8, 90);
        ledger.take(&admission(&big), 1, &mut syncs);
        assert!(syncs.is_empty());
        ledger.take(&admission(&big), 1_000, &mut syncs);
        assert_eq!(
            syncs.len(),
            2,
            "renewed with under a second of its lease left"
        );
        assert!(
            syncs.iter().all(|s| s.ask_tokens == 0),
            "asking for nothing more"
        );
        assert_eq!(syncs[0].keep_units, 6 * big.requests.unwrap().unit());
        drop(syncs);
        let late = ledger.take(&admission(&big), SLICE_LEASE_MS, &mut Vec::new());
        assert_eq!(late.sliced, Sliced::default(), "its lease may be over");

        let small = policy(15);
        let mut small = small.clone();
        small.tokens = None;
        let mut syncs = Vec::new();
        let taken = ledger.take(&admission(&small), 0, &mut syncs);
        assert_eq!(taken.sliced, Sliced::default());
        assert!(syncs.is_empty(), "a burst of 15 is judged call by call");
    }

    #[test]
    fn a_refused_call_gives_its_token_back_and_usage_is_debited_here() {
        let ledger = Ledger::default();
        let big = policy(100);
        let mut syncs = Vec::new();
        busy(&ledger, &big, 0);
        ledger.take(&admission(&big), 0, &mut syncs);
        answer(std::mem::take(&mut syncs), 4, 90);
        let call = admission(&big);
        let taken = ledger.take(&call, 1, &mut syncs);
        ledger.untake(&call, taken.sliced);
        let taken = ledger.take(&call, 1, &mut syncs);
        assert_eq!(
            taken.quota.map(|q| q.remaining),
            Some(93),
            "the same token again"
        );

        let settlement = Settlement {
            call_id: "call_1",
            key_id: "key_1",
            account: "acct",
            agent: "ag",
            key_policy: Some(&big),
            agent_policy: None,
            reservation: Reservation {
                sliced: taken.sliced,
                ..Reservation::default()
            },
            usage: Some(Usage {
                input_tokens: 3,
                output_tokens: 3,
                total_tokens: 6,
            }),
            cost: 0,
            now_ms: 2,
            request_id: "",
            session_id: "",
            status: 200,
        };
        ledger.settle(&settlement, 2, &mut syncs);
        let of = SliceOf {
            keys: Limiter::Key {
                account: "acct",
                key_id: "key_1",
            }
            .sliced(),
            bucket: BucketKind::Tokens,
            spec: big.tokens.unwrap(),
        };
        let unit = big.tokens.unwrap().unit();
        // 4 held, 6 used: 2 owed, paid with the refill now due.
        let tokens: Vec<&Sync> = syncs
            .iter()
            .filter(|s| s.of.bucket == BucketKind::Tokens)
            .collect();
        assert_eq!(tokens.len(), 1);
        assert_eq!((tokens[0].give_units, tokens[0].keep_units), (-2 * unit, 0));
        assert_eq!(ledger.held(&of).lock().slice.units, 0);
    }

    #[test]
    fn a_slice_under_a_spec_a_reload_replaced_is_dropped_not_given_back() {
        let ledger = Ledger::default();
        let old = policy(100);
        let mut new = policy(100);
        new.requests = Some(BucketSpec {
            rate: 50,
            period_ms: 500,
            burst: 100,
        });
        new.tokens = None;
        let mut old_only = old.clone();
        old_only.tokens = None;
        let mut syncs = Vec::new();
        busy(&ledger, &old_only, 0);
        ledger.take(&admission(&old_only), 0, &mut syncs);
        answer(std::mem::take(&mut syncs), 4, 90);
        busy(&ledger, &new, 5);
        ledger.take(&admission(&new), 5, &mut syncs);
        answer(std::mem::take(&mut syncs), 4, 90);
        ledger.take(&admission(&new), 10, &mut syncs);
        ledger.idle(1_500, &mut syncs);
        let back: Vec<(BucketSpec, i64)> =
            syncs.iter().map(|s| (s.of.spec, s.give_units)).collect();
        assert_eq!(back.len(), 1, "{back:?}");
        assert_eq!(
            back[0].0,
            new.requests.unwrap(),
            "only the new spec's slice goes back"
        );
    }

    #[test]
    fn an_idle_slice_goes_back_debt_included_and_is_then_forgotten() {
        let ledger = Ledger::default();
        let big = policy(100);
        let mut syncs = Vec::new();
        busy(&ledger, &big, 0);
        ledger.take(&admission(&big), 0, &mut syncs);
        answer(std::mem::take(&mut syncs), 4, 90);
        ledger.take(&admission(&big), 10, &mut syncs);
        // (The refills that call asked for find the bucket as it was.)
        answer(std::mem::take(&mut syncs), 0, 90);
        ledger.idle(759, &mut syncs);
        assert!(syncs.is_empty(), "used 749 ms ago");
        ledger.idle(760, &mut syncs);
        let unit = big.requests.unwrap().unit();
        let back: Vec<(BucketKind, i64)> = syncs
            .iter()
            .map(|s| (s.of.bucket, s.give_units / unit))
            .collect();
        assert!(back.contains(&(BucketKind::Requests, 3)), "{back:?}");
        for sync in std::mem::take(&mut syncs) {
            let reply = SliceReply {
                granted: 0,
                level: 93 * unit,
                kept: 0,
            };
            sync.held.lock().synced(&sync, reply, 760);
        }
        ledger.idle(760 + FORGET_AFTER_MS, &mut syncs);
        assert!(syncs.is_empty());
        assert!(ledger.slices.read().is_empty(), "forgotten");
    }
}
