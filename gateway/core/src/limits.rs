//! Token buckets: the pure decision core behind every rate limit.
//!
//! No clock reads and no I/O: callers pass `now_ms`, so the same arithmetic runs in the
//! memory store, is mirrored by the Redis script, and is tested with a fake clock.
//!
//! A bucket's level is kept in *units* where one token is `period_ms` units. Refill is then
//! exactly `elapsed_ms × rate` units, an integer with no rounding, so a bucket never drifts
//! however often it is touched.

/// A named rate-limit policy, compiled from a policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    /// Bucket over calls: each admitted call takes one token.
    pub requests: Option<BucketSpec>,
    /// Bucket over usage tokens: debited by `total_tokens` when the call is metered.
    pub tokens: Option<BucketSpec>,
    /// Calls in flight at once.
    pub concurrency: Option<u32>,
    pub mode: Mode,
}

/// `enforce` refuses; `shadow` only counts what it would have refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Enforce,
    Shadow,
}

/// Which bucket of a policy refused; also the `bucket` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BucketKind {
    Requests,
    Tokens,
    Concurrency,
}

impl BucketKind {
    pub const ALL: [BucketKind; 3] = [
        BucketKind::Requests,
        BucketKind::Tokens,
        BucketKind::Concurrency,
    ];

    pub fn label(self) -> &'static str {
        match self {
            BucketKind::Requests => "requests",
            BucketKind::Tokens => "tokens",
            BucketKind::Concurrency => "concurrency",
        }
    }
}

/// How a bucket fills: `rate` tokens every `period_ms`, holding at most `burst` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BucketSpec {
    pub rate: u64,
    pub period_ms: u64,
    pub burst: u64,
}

/// A bucket's mutable state. `level` may go negative after a large token debit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketState {
    pub level: i64,
    pub updated_ms: u64,
}

/// What a bucket says about one more call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// At least one whole token is there.
    Allow,
    /// Empty: a token will be there in `retry_after_ms`.
    Deny { retry_after_ms: u64 },
}

/// The numbers behind the `RateLimit-*` headers, after the call's own token was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub limit: u64,
    pub remaining: u64,
    pub reset_secs: u64,
}

impl Quota {
    /// These numbers `elapsed_ms` later, had nothing been taken meanwhile: the bucket refills
    /// evenly until it is full `reset_secs` after they were read. An estimate from what one
    /// instance saw, for refusals that must not cost a store round trip.
    pub fn after(self, elapsed_ms: u64) -> Quota {
        let reset_ms = self.reset_secs.saturating_mul(1000);
        if elapsed_ms >= reset_ms {
            return Quota {
                remaining: self.limit,
                reset_secs: 0,
                ..self
            };
        }
        let missing = self.limit.saturating_sub(self.remaining) as u128;
        let refilled = (missing * elapsed_ms as u128 / reset_ms as u128) as u64;
        Quota {
            remaining: self.remaining + refilled,
            reset_secs: (reset_ms - elapsed_ms).div_ceil(1000),
            ..self
        }
    }
}

impl BucketSpec {
    /// Units a single token is worth.
    pub fn unit(&self) -> i64 {
        self.period_ms as i64
    }

    /// Level of a full bucket, in units.
    pub fn capacity(&self) -> i64 {
        (self.burst as i128 * self.period_ms as i128).min(i64::MAX as i128) as i64
    }

    /// Milliseconds until `deficit` units have been refilled.
    fn millis_to_refill(&self, deficit: i128) -> u64 {
        if deficit <= 0 {
            return 0;
        }
        let millis = (deficit as u128).div_ceil(self.rate.max(1) as u128);
        millis.min(u64::MAX as u128) as u64
    }
}

/// The deepest a bucket's debt goes, in units: 2^53, where the Redis scripts' doubles stop
/// counting exactly. Both stores stop there, so they agree. Climbing out takes 285,000 years
/// divided by the bucket's `rate` (104 days at a rate of a million).
pub const MAX_DEBT: i128 = 1 << 53;

impl BucketState {
    /// A bucket seen for the first time starts full.
    pub fn full(spec: &BucketSpec, now_ms: u64) -> Self {
        Self {
            level: spec.capacity(),
            updated_ms: now_ms,
        }
    }

    /// The state at `now_ms` after refilling, capped at capacity. A clock that steps back
    /// refills nothing rather than draining the bucket.
    pub fn refilled(self, spec: &BucketSpec, now_ms: u64) -> Self {
        let elapsed = now_ms.saturating_sub(self.updated_ms) as i128;
        let capacity = spec.capacity();
        let level = (self.level as i128 + elapsed * spec.rate as i128).min(capacity as i128) as i64;
        Self {
            level,
            updated_ms: now_ms.max(self.updated_ms),
        }
    }

    /// Whether one more call may pass, judged on a refilled state.
    pub fn verdict(&self, spec: &BucketSpec) -> Verdict {
        if self.level >= spec.unit() {
            Verdict::Allow
        } else {
            Verdict::Deny {
                retry_after_ms: spec.millis_to_refill(spec.unit() as i128 - self.level as i128),
            }
        }
    }

    /// Takes `tokens` whole tokens; the level may go below zero, down to [`MAX_DEBT`].
    pub fn take(&mut self, spec: &BucketSpec, tokens: u64) {
        let debit = tokens as i128 * spec.unit() as i128;
        self.level = (self.level as i128 - debit).max(-MAX_DEBT) as i64;
    }

    /// The `RateLimit-*` numbers for this state.
    pub fn quota(&self, spec: &BucketSpec) -> Quota {
        Quota {
            limit: spec.burst,
            remaining: (self.level.max(0) / spec.unit().max(1)) as u64,
            reset_secs: spec
                .millis_to_refill(spec.capacity() as i128 - self.level as i128)
                .div_ceil(1000),
        }
    }
}

/// Whole seconds for `Retry-After`, rounded up and never zero.
pub fn retry_after_secs(retry_after_ms: u64) -> u64 {
    retry_after_ms.div_ceil(1000).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEN_PER_SECOND: BucketSpec = BucketSpec {
        rate: 10,
        period_ms: 1000,
        burst: 20,
    };
    const ONE_PER_MINUTE: BucketSpec = BucketSpec {
        rate: 1,
        period_ms: 60_000,
        burst: 3,
    };

    fn drained(spec: &BucketSpec, now: u64, calls: u64) -> BucketState {
        let mut state = BucketState::full(spec, now);
        for _ in 0..calls {
            assert_eq!(state.verdict(spec), Verdict::Allow);
            state.take(spec, 1);
        }
        state
    }

    #[test]
    fn a_new_bucket_admits_exactly_its_burst() {
        for spec in [TEN_PER_SECOND, ONE_PER_MINUTE] {
            let state = drained(&spec, 0, spec.burst);
            assert!(matches!(state.verdict(&spec), Verdict::Deny { .. }));
            assert_eq!(state.quota(&spec).remaining, 0);
        }
    }

    #[test]
    fn refill_and_retry_after_table() {
        // (spec, calls taken at t=0, now, expected verdict)
        let cases = [
            (
                TEN_PER_SECOND,
                20,
                0,
                Verdict::Deny {
                    retry_after_ms: 100,
                },
            ),
            (TEN_PER_SECOND, 20, 99, Verdict::Deny { retry_after_ms: 1 }),
            (TEN_PER_SECOND, 20, 100, Verdict::Allow),
            (
                ONE_PER_MINUTE,
                3,
                0,
                Verdict::Deny {
                    retry_after_ms: 60_000,
                },
            ),
            (
                ONE_PER_MINUTE,
                3,
                59_999,
                Verdict::Deny { retry_after_ms: 1 },
            ),
            (ONE_PER_MINUTE, 3, 60_000, Verdict::Allow),
        ];
        for (spec, calls, now, expected) in cases {
            let state = drained(&spec, 0, calls).refilled(&spec, now);
            assert_eq!(state.verdict(&spec), expected, "{spec:?} {calls} {now}");
        }
    }

    #[test]
    fn frequent_touches_do_not_lose_refill() {
        // One token a minute, touched every millisecond: exactly one token after 60 s.
        let spec = ONE_PER_MINUTE;
        let mut state = drained(&spec, 0, 3);
        for now in 1..60_000 {
            state = state.refilled(&spec, now);
            assert!(matches!(state.verdict(&spec), Verdict::Deny { .. }));
        }
        assert_eq!(state.refilled(&spec, 60_000).verdict(&spec), Verdict::Allow);
    }

    #[test]
    fn refill_is_capped_at_burst() {
        let spec = TEN_PER_SECOND;
        let state = drained(&spec, 0, 5).refilled(&spec, 3_600_000);
        assert_eq!(state.level, spec.capacity());
        assert_eq!(state.quota(&spec).remaining, 20);
        assert_eq!(state.quota(&spec).reset_secs, 0);
    }

    #[test]
    fn a_large_debit_goes_negative_and_retry_after_counts_until_positive() {
        let spec = BucketSpec {
            rate: 100,
            period_ms: 60_000,
            burst: 100,
        };
        let mut state = BucketState::full(&spec, 0);
        state.take(&spec, 250); // 150 tokens in debt
        let Verdict::Deny { retry_after_ms } = state.verdict(&spec) else {
            panic!("a bucket in debt must refuse");
        };
        // 151 tokens at 100 per minute: 90.6 s.
        assert_eq!(retry_after_ms, 90_600);
        assert_eq!(retry_after_secs(retry_after_ms), 91);
        assert_eq!(state.refilled(&spec, 90_600).verdict(&spec), Verdict::Allow);
    }

    #[test]
    fn a_bucket_deep_in_debt_stops_at_max_debt() {
        let spec = BucketSpec {
            rate: 1_000_000,
            period_ms: 2_592_000_000, // 720h
            burst: 1_000_000,
        };
        let mut state = BucketState::full(&spec, 0);
        for _ in 0..100 {
            state.take(&spec, 100_000_000);
        }
        assert_eq!(state.level as i128, -MAX_DEBT);
        let Verdict::Deny { retry_after_ms } = state.verdict(&spec) else {
            panic!("a bucket in debt must refuse");
        };
        // (2^53 + one token) / 1e6 units per ms: over 100 days.
        assert_eq!(
            retry_after_ms,
            (MAX_DEBT as u64 + spec.period_ms).div_ceil(1_000_000)
        );
        assert_eq!(state.quota(&spec).remaining, 0);
    }

    #[test]
    fn a_clock_stepping_back_changes_nothing() {
        let spec = TEN_PER_SECOND;
        let state = drained(&spec, 1_000, 20);
        assert_eq!(state.refilled(&spec, 500), state);
    }

    #[test]
    fn a_quota_refills_evenly_until_its_reset() {
        let read = Quota {
            limit: 20,
            remaining: 0,
            reset_secs: 2,
        };
        assert_eq!(read.after(0), read);
        assert_eq!(
            read.after(1000),
            Quota {
                limit: 20,
                remaining: 10,
                reset_secs: 1
            }
        );
        assert_eq!(
            read.after(1500),
            Quota {
                limit: 20,
                remaining: 15,
                reset_secs: 1
            }
        );
        for later in [2000, 60_000, u64::MAX] {
            assert_eq!(
                read.after(later),
                Quota {
                    limit: 20,
                    remaining: 20,
                    reset_secs: 0
                }
            );
        }
    }

    #[test]
    fn quota_reports_seconds_until_full() {
        let spec = TEN_PER_SECOND;
        let state = drained(&spec, 0, 15);
        // 15 tokens missing at 10/s: 1.5 s, rounded up.
        assert_eq!(
            state.quota(&spec),
            Quota {
                limit: 20,
                remaining: 5,
                reset_secs: 2
            }
        );
    }

    #[test]
    fn retry_after_is_whole_seconds_and_never_zero() {
        assert_eq!(retry_after_secs(1), 1);
        assert_eq!(retry_after_secs(1000), 1);
        assert_eq!(retry_after_secs(1001), 2);
        assert_eq!(retry_after_secs(0), 1);
    }
}
