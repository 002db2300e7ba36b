//! How Rust and the Lua scripts talk: the scripts, their arguments by name and in order, and
//! their replies decoded by name. Each script binds its arguments to locals of the same names
//! in one `unpack(ARGV, ...)` at its top, and declares its reply and codes by the same names;
//! a test holds the two copies to each other, so a field added on one side only fails it.

use turnpike_core::limits::{BucketKind, BucketSpec, Quota};
use turnpike_core::usage::Usage;

/// admit.lua alone, as a test reads it (admissions always go in a `batch`).
#[cfg(test)]
pub const ADMIT_LUA: &str = concat!(
    include_str!("prelude.lua"),
    include_str!("admit.lua"),
    "local reply = admit(KEYS, ARGV)\nflush()\nreturn reply\n"
);
/// settle.lua alone, as a test reads it (settlements always go in a `batch`).
#[cfg(test)]
pub const SETTLE_LUA: &str = concat!(
    include_str!("prelude.lua"),
    include_str!("settle.lua"),
    "local reply = settle(KEYS, ARGV)\nflush()\nreturn reply\n"
);
/// Admissions and settlements as one run (`batch`, the group commit). The shebang has Redis
/// (7 and later) check `maxmemory` before the run rather than at its first write: out of
/// memory, no call of it is half-applied.
pub const BATCH_LUA: &str = concat!(
    "#!lua\n",
    include_str!("prelude.lua"),
    include_str!("admit.lua"),
    include_str!("settle.lua"),
    include_str!("log_usage.lua"),
    include_str!("record.lua"),
    include_str!("batch.lua")
);
/// A slice taken or given back; not batched: a slice's sync happens a few times a second,
/// not per call.
pub const SLICE_LUA: &str = concat!(
    "#!lua\n",
    include_str!("prelude.lua"),
    include_str!("slice.lua"),
    "local reply = slice(KEYS, ARGV)\nflush()\nreturn reply\n"
);
/// A block of concurrency slots taken, renewed or given back; not batched, like a slice's.
pub const BLOCK_LUA: &str = concat!(
    "#!lua\n",
    include_str!("prelude.lua"),
    include_str!("block.lua"),
    "return block(KEYS, ARGV)\n"
);
/// An escrow of an account's balance synced; not batched, like a slice's.
pub const ESCROW_LUA: &str = concat!(
    "#!lua\n",
    include_str!("prelude.lua"),
    include_str!("escrow.lua"),
    "local reply = escrow(KEYS, ARGV)\nflush()\nreturn reply\n"
);
pub const CHANGE_BALANCE_LUA: &str = include_str!("change_balance.lua");
/// log_usage.lua alone, as a test reads it (log entries always go in a `batch`).
#[cfg(test)]
pub const LOG_USAGE_LUA: &str = concat!(
    include_str!("log_usage.lua"),
    "return log_usage(KEYS, ARGV)\n"
);
pub const SEED_ACCOUNT_LUA: &str = include_str!("seed_account.lua");
/// A running stream's extension; not batched (a stream asks rarely).
pub const EXTEND_LUA: &str = concat!(
    "#!lua\n",
    include_str!("prelude.lua"),
    include_str!("extend.lua")
);

/// admit.lua's arguments, then [`ADMIT_SCOPE_ARGS`] once per scope.
pub const ADMIT_ARGS: [&str; 4] = ["call_id", "lease_ms", "reserve", "scope_count"];
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
/// admit.lua's outcome codes (`RATE_LIMITED`, ...).
pub const OUTCOMES: [(&str, i64); 3] = [("rate_limited", 0), ("admitted", 1), ("broke", 2)];
/// admit.lua's bucket codes (`REQUESTS`, ...).
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
/// settle.lua's and log_usage.lua's reply codes (`ALREADY`, `APPLIED`). Either way the write
/// is done, so the gateway reads nothing from them; a test holds them to the scripts.
#[cfg(test)]
pub const SETTLED: [(&str, i64); 2] = [("already", 0), ("applied", 1)];

/// record.lua's `tally`: a settlement that only records.
pub const TALLY_ARGS: [&str; 13] = [
    "call_id",
    "cost",
    "metered",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "key_id",
    "agent",
    "account",
    "request_id",
    "session_id",
    "status",
    "stream_maxlen",
];

/// batch.lua's `forget`: a settled call's marker given its last grace.
pub const FORGET_ARGS: [&str; 1] = ["grace_ms"];

/// batch.lua's `forget` arguments.
pub struct ForgetArgs {
    pub grace_ms: u64,
}

impl ForgetArgs {
    /// The arguments in [`FORGET_ARGS`] order.
    pub fn encode(&self) -> Vec<String> {
        let mut args = Vec::with_capacity(FORGET_ARGS.len());
        args.push(self.grace_ms.to_string());
        args
    }
}

/// How long the store counts a slice as held without a sync: a stopped instance's slices
/// are the bucket's again this long after its last sync (prelude.lua's
/// `HOLDINGS_LEASE_MS`, held to this in a test).
pub const SLICE_LEASE_MS: u64 = 2_000;

/// slice.lua's arguments, and its reply.
pub const SLICE_ARGS: [&str; 9] = [
    "bucket",
    "instance",
    "rate",
    "period",
    "burst",
    "ask_tokens",
    "give_units",
    "keep_units",
    "lease_ms",
];
#[cfg(test)]
pub const SLICE_REPLY: [&str; 3] = ["granted", "level", "keep"];

/// slice.lua's arguments: `give_units` back into the bucket (below zero: a debt paid), then
/// up to `ask_tokens` whole tokens out; `keep_units`, what `instance` still holds, and what
/// it is granted, held for it for `lease_ms`.
pub struct SliceArgs<'a> {
    pub bucket: BucketKind,
    pub instance: &'a str,
    pub spec: BucketSpec,
    pub ask_tokens: u64,
    pub give_units: i64,
    pub keep_units: i64,
    pub lease_ms: u64,
}

impl SliceArgs<'_> {
    /// The arguments in [`SLICE_ARGS`] order.
    pub fn encode(&self) -> Vec<String> {
        let mut args = Vec::with_capacity(SLICE_ARGS.len());
        let bucket = match self.bucket {
            BucketKind::Tokens => "t",
            _ => "r",
        };
        args.push(bucket.to_owned());
        args.push(self.instance.to_owned());
        push_bucket(&mut args, Some(self.spec));
        args.push(self.ask_tokens.to_string());
        args.push(self.give_units.to_string());
        args.push(self.keep_units.to_string());
        args.push(self.lease_ms.to_string());
        args
    }
}

/// slice.lua's reply: units granted, the bucket's level after, and the units the instance
/// is recorded keeping.
pub fn decode_slice(reply: &[i64]) -> Option<SliceReply> {
    match *reply {
        [granted, level, kept] if granted >= 0 && kept >= 0 => Some(SliceReply {
            granted,
            level,
            kept,
        }),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SliceReply {
    pub granted: i64,
    pub level: i64,
    pub kept: i64,
}

/// block.lua's arguments, and its reply.
pub const BLOCK_ARGS: [&str; 6] = [
    "instance",
    "cap",
    "target",
    "upper",
    "lease_ms",
    "min_slots",
];
#[cfg(test)]
pub const BLOCK_REPLY: [&str; 2] = ["new", "free"];

/// block.lua's arguments: `instance`'s block of a limit of `cap` slots to go to `target`
/// slots (more only while `min_slots` are free), leased for `lease_ms`; `upper`, the most
/// it may hold now.
pub struct BlockArgs<'a> {
    pub instance: &'a str,
    pub cap: u32,
    pub target: u32,
    pub upper: u32,
    pub lease_ms: u64,
    pub min_slots: u32,
}

impl BlockArgs<'_> {
    /// The arguments in [`BLOCK_ARGS`] order.
    pub fn encode(&self) -> Vec<String> {
        let mut args = Vec::with_capacity(BLOCK_ARGS.len());
        args.push(self.instance.to_owned());
        for number in [self.cap, self.target, self.upper] {
            args.push(number.to_string());
        }
        args.push(self.lease_ms.to_string());
        args.push(self.min_slots.to_string());
        args
    }
}

/// block.lua's reply: the slots the instance now holds, and those of the cap still free.
pub fn decode_block(reply: &[i64]) -> Option<BlockReply> {
    match *reply {
        [held, free] if held >= 0 => Some(BlockReply {
            held: u32::try_from(held).ok()?,
            free,
        }),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockReply {
    pub held: u32,
    pub free: i64,
}

/// escrow.lua's arguments, and its reply.
pub const ESCROW_ARGS: [&str; 7] = [
    "id",
    "ask",
    "released",
    "reserve",
    "lease_ms",
    "free_divisor",
    "min_reserves",
];
#[cfg(test)]
pub const ESCROW_REPLY: [&str; 3] = ["granted", "held", "free"];

/// escrow.lua's arguments: the escrow `id` (its lease's member) releases `released` units,
/// then is granted up to `ask` more (sized by the account's free balance and `reserve`,
/// `turnpike_core::escrow::EscrowSizing`), leased for `lease_ms`.
pub struct EscrowArgs<'a> {
    pub id: &'a str,
    pub ask: i64,
    pub released: i64,
    pub reserve: i64,
    pub lease_ms: u64,
    pub sizing: turnpike_core::escrow::EscrowSizing,
}

impl EscrowArgs<'_> {
    /// The arguments in [`ESCROW_ARGS`] order.
    pub fn encode(&self) -> Vec<String> {
        let mut args = Vec::with_capacity(ESCROW_ARGS.len());
        args.push(self.id.to_owned());
        for number in [self.ask, self.released, self.reserve] {
            args.push(number.to_string());
        }
        args.push(self.lease_ms.to_string());
        args.push(self.sizing.free_divisor.to_string());
        args.push(self.sizing.min_reserves.to_string());
        args
    }
}

/// escrow.lua's reply: units granted, the escrow after, the account's free balance after.
pub fn decode_escrow(reply: &[i64]) -> Option<EscrowReply> {
    match *reply {
        [granted, held, free] if granted >= 0 && held >= 0 => Some(EscrowReply {
            granted,
            held,
            free,
        }),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EscrowReply {
    pub granted: i64,
    pub held: i64,
    pub free: i64,
}

/// log_usage.lua's arguments, then the entry's [`USAGE_FIELDS`] as field and value pairs.
pub const LOG_USAGE_ARGS: [&str; 3] = ["call_id", "marker_ttl_ms", "stream_maxlen"];
/// A usage log entry's fields, in order, as settle.lua and log_usage.lua write them.
pub const USAGE_FIELDS: [&str; 12] = [
    "call_id",
    "request_id",
    "time_ms",
    "account",
    "key_id",
    "agent",
    "session_id",
    "status",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "cost",
];

/// One script call: its keys and arguments. Held settlements are journalled as these.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
            _ => Outcome::Broke,
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

/// log_usage.lua's arguments for one metered call: the fields' values in
/// [`USAGE_FIELDS`] order, each after its name.
pub fn log_usage_args(
    call_id: &str,
    marker_ttl_ms: u64,
    stream_maxlen: u64,
    values: [String; USAGE_FIELDS.len()],
) -> Vec<String> {
    let mut args = Vec::with_capacity(LOG_USAGE_ARGS.len() + 2 * USAGE_FIELDS.len());
    args.extend([
        call_id.to_owned(),
        marker_ttl_ms.to_string(),
        stream_maxlen.to_string(),
    ]);
    for (field, value) in USAGE_FIELDS.iter().zip(values) {
        args.push((*field).to_owned());
        args.push(value);
    }
    args
}

pub fn flag(on: bool) -> String {
    if on { "1" } else { "0" }.to_owned()
}

/// `rate`, `period`, `burst`; a rate of 0 means no such bucket.
pub fn push_bucket(args: &mut Vec<String>, spec: Option<BucketSpec>) {
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
mod tests;
