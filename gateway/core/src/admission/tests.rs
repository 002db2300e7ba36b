//! Table-driven tests of the admission core, with a fake clock.

use super::*;

fn policy(
    requests: Option<(u64, u64, u64)>,
    tokens: Option<(u64, u64)>,
    concurrency: Option<u32>,
) -> Policy {
    Policy {
        name: "p".into(),
        requests: requests.map(|(rate, period_ms, burst)| BucketSpec {
            rate,
            period_ms,
            burst,
        }),
        tokens: tokens.map(|(rate, period_ms)| BucketSpec {
            rate,
            period_ms,
            burst: rate,
        }),
        concurrency,
        mode: Mode::Enforce,
    }
}

fn shadow(mut p: Policy) -> Policy {
    p.mode = Mode::Shadow;
    p
}

const PRICING: Pricing = Pricing {
    input_per_mtok: 1_000_000,
    output_per_mtok: 2_000_000,
    reserve: 10,
};

struct World {
    key: LimiterState,
    agent: LimiterState,
    account: AccountState,
}

impl World {
    fn new(balance: i64) -> Self {
        Self {
            key: LimiterState::default(),
            agent: LimiterState::default(),
            account: AccountState {
                balance,
                reserved: 0,
            },
        }
    }

    fn admit(
        &mut self,
        key: Option<&Policy>,
        agent: Option<&Policy>,
        pricing: Option<&Pricing>,
        now_ms: u64,
    ) -> Result<Admitted, Refusal> {
        let call = Admission {
            call_id: "r",
            key_id: "k",
            account: "a",
            agent: "ag",
            key_policy: key,
            agent_policy: agent,
            pricing,
            now_ms,
            lease_ms: 60_000,
        };
        admit(
            &mut self.key,
            &mut self.agent,
            Some(&mut self.account),
            &call,
        )
    }

    fn settle(
        &mut self,
        key: Option<&Policy>,
        reservation: Reservation,
        usage: Option<Usage>,
        cost: i64,
        now_ms: u64,
    ) {
        let call = Settlement {
            call_id: "r",
            key_id: "k",
            account: "a",
            agent: "ag",
            key_policy: key,
            agent_policy: None,
            reservation,
            usage,
            cost,
            now_ms,
            request_id: "r",
            session_id: "s",
            status: 200,
        };
        settle(
            &mut self.key,
            &mut self.agent,
            Some(&mut self.account),
            &call,
        )
    }
}

fn bucket_of(r: &Result<Admitted, Refusal>) -> Option<(Scope, BucketKind)> {
    match r {
        Err(Refusal::RateLimited { scope, bucket, .. }) => Some((*scope, *bucket)),
        _ => None,
    }
}

#[test]
fn request_bucket_admits_burst_then_refuses_with_retry_after() {
    let p = policy(Some((1, 60_000, 3)), None, None);
    let mut w = World::new(0);
    for remaining in [2, 1, 0] {
        let admitted = w.admit(Some(&p), None, None, 0).unwrap();
        assert_eq!(admitted.quota.unwrap().remaining, remaining);
    }
    match w.admit(Some(&p), None, None, 1_000) {
        Err(Refusal::RateLimited {
            scope: Scope::Key,
            bucket: BucketKind::Requests,
            retry_after_ms,
            rule,
            quota,
            ..
        }) => {
            assert_eq!(retry_after_ms, 59_000);
            assert_eq!(rule, "1 requests per 1m");
            assert_eq!(quota.unwrap().remaining, 0);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(w.admit(Some(&p), None, None, 60_000).is_ok());
}

#[test]
fn refusal_table() {
    let tight = policy(Some((1, 1000, 1)), None, None);
    let loose = policy(Some((100, 1000, 100)), None, None);
    let one_slot = policy(None, None, Some(1));
    // (key policy, agent policy, calls admitted before, expected refusing bucket)
    type Case<'a> = (
        &'a Policy,
        Option<&'a Policy>,
        usize,
        Option<(Scope, BucketKind)>,
    );
    let cases: [Case; 5] = [
        (
            &loose,
            Some(&tight),
            1,
            Some((Scope::Agent, BucketKind::Requests)),
        ),
        (
            &tight,
            Some(&loose),
            1,
            Some((Scope::Key, BucketKind::Requests)),
        ),
        (&loose, Some(&shadow(tight.clone())), 1, None),
        (
            &one_slot,
            None,
            1,
            Some((Scope::Key, BucketKind::Concurrency)),
        ),
        (
            &loose,
            Some(&one_slot),
            1,
            Some((Scope::Agent, BucketKind::Concurrency)),
        ),
    ];
    for (i, (key, agent, before, expected)) in cases.into_iter().enumerate() {
        let mut w = World::new(0);
        for _ in 0..before {
            assert!(w.admit(Some(key), agent, None, 0).is_ok(), "case {i}");
        }
        assert_eq!(
            bucket_of(&w.admit(Some(key), agent, None, 0)),
            expected,
            "case {i}"
        );
    }
}

#[test]
fn a_refused_call_takes_nothing() {
    let key = policy(Some((10, 1000, 10)), None, Some(5));
    let agent = policy(Some((1, 1000, 1)), None, None);
    let mut w = World::new(100);
    w.admit(Some(&key), Some(&agent), Some(&PRICING), 0)
        .unwrap();
    let before = (w.key, w.account);
    assert!(w
        .admit(Some(&key), Some(&agent), Some(&PRICING), 0)
        .is_err());
    assert_eq!((w.key, w.account), before);
}

#[test]
fn balance_is_checked_after_rate_limits_and_reserved() {
    let p = policy(Some((1, 1000, 1)), None, None);
    let mut w = World::new(15);
    let first = w.admit(Some(&p), None, Some(&PRICING), 0).unwrap();
    assert_eq!(first.reservation.reserve, 10);
    assert_eq!(w.account.reserved, 10);
    // The bucket is empty, so the answer is 429 even though the balance is short too.
    assert!(matches!(
        w.admit(Some(&p), None, Some(&PRICING), 0),
        Err(Refusal::RateLimited { .. })
    ));
    // Once the bucket refills, 15 - 10 held < 10: refused for balance.
    assert!(matches!(
        w.admit(Some(&p), None, Some(&PRICING), 1000),
        Err(Refusal::InsufficientBalance { .. })
    ));
    w.settle(Some(&p), first.reservation, None, 0, 1000);
    assert_eq!(
        w.account,
        AccountState {
            balance: 15,
            reserved: 0
        }
    );
    assert!(w.admit(Some(&p), None, Some(&PRICING), 2000).is_ok());
}

#[test]
fn exactly_as_many_reservations_as_the_balance_covers() {
    let mut w = World::new(100);
    let admitted = (0..40)
        .filter(|_| w.admit(None, None, Some(&PRICING), 0).is_ok())
        .count();
    assert_eq!(admitted, 10);
    assert_eq!(
        w.account,
        AccountState {
            balance: 100,
            reserved: 100
        }
    );
}

#[test]
fn unpriced_agents_need_no_balance() {
    let mut w = World::new(0);
    let admitted = w.admit(None, None, None, 0).unwrap();
    assert_eq!(admitted.reservation.reserve, 0);
    assert_eq!(w.account.reserved, 0);
}

#[test]
fn settlement_debits_tokens_and_frees_the_slot() {
    let p = policy(None, Some((100, 60_000)), Some(1));
    let mut w = World::new(1000);
    let first = w.admit(Some(&p), None, Some(&PRICING), 0).unwrap();
    assert!(first.reservation.key_slot);
    assert_eq!(
        bucket_of(&w.admit(Some(&p), None, Some(&PRICING), 0)),
        Some((Scope::Key, BucketKind::Concurrency))
    );
    let usage = Usage {
        input_tokens: 100,
        output_tokens: 50,
        total_tokens: 150,
    };
    w.settle(Some(&p), first.reservation, Some(usage), 200, 0);
    assert_eq!(w.key.inflight, 0);
    assert_eq!(
        w.account,
        AccountState {
            balance: 800,
            reserved: 0
        }
    );
    // 150 tokens against a 100-token bucket: 50 in debt, refused until it is positive again.
    match w.admit(Some(&p), None, Some(&PRICING), 0) {
        Err(Refusal::RateLimited {
            bucket: BucketKind::Tokens,
            retry_after_ms,
            ..
        }) => assert_eq!(retry_after_ms, 30_600),
        other => panic!("expected the token bucket to refuse, got {other:?}"),
    }
    assert!(w.admit(Some(&p), None, Some(&PRICING), 30_600).is_ok());
}

#[test]
fn shadow_mode_counts_but_admits_and_never_goes_into_debt() {
    let p = shadow(policy(Some((1, 1000, 1)), None, Some(1)));
    let mut w = World::new(0);
    assert!(w
        .admit(Some(&p), None, None, 0)
        .unwrap()
        .shadow_hits
        .is_empty());
    let second = w.admit(Some(&p), None, None, 0).unwrap();
    assert_eq!(
        second.shadow_hits,
        vec![
            ShadowHit {
                scope: Scope::Key,
                bucket: BucketKind::Requests
            },
            ShadowHit {
                scope: Scope::Key,
                bucket: BucketKind::Concurrency
            },
        ]
    );
    assert_eq!(w.key.requests.unwrap().level, 0);
    assert_eq!(
        second.quota, None,
        "shadow buckets do not drive the headers"
    );
}

#[test]
fn the_longest_wait_wins_when_several_buckets_refuse() {
    let key = policy(Some((1, 1000, 1)), None, None);
    let agent = policy(Some((1, 10_000, 1)), None, None);
    let mut w = World::new(0);
    w.admit(Some(&key), Some(&agent), None, 0).unwrap();
    match w.admit(Some(&key), Some(&agent), None, 0) {
        Err(Refusal::RateLimited {
            scope,
            retry_after_ms,
            ..
        }) => {
            assert_eq!(scope, Scope::Agent);
            assert_eq!(retry_after_ms, 10_000);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn peeking_reports_the_quota_and_takes_nothing() {
    let p = policy(Some((1, 60_000, 3)), None, None);
    let mut w = World::new(0);
    let probe = Admission {
        call_id: "",
        key_id: "k",
        account: "a",
        agent: "ag",
        key_policy: Some(&p),
        agent_policy: None,
        pricing: None,
        now_ms: 0,
        lease_ms: 60_000,
    };
    assert_eq!(
        peek_quota(None, None, &probe).map(|q| q.remaining),
        Some(3),
        "an unseen bucket is full"
    );
    w.admit(Some(&p), None, None, 0).unwrap();
    let before = w.key;
    assert_eq!(
        peek_quota(Some(&w.key), None, &probe).map(|q| q.remaining),
        Some(2)
    );
    assert_eq!(w.key, before);
    assert_eq!(
        peek_quota(
            Some(&w.key),
            None,
            &Admission {
                key_policy: None,
                ..probe
            }
        ),
        None
    );
}
