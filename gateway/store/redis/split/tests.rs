//! The Cluster split: slots per side, no round trip when nothing is held, combining sides.

use super::*;
use turnpike_core::billing::Pricing;
use turnpike_core::limits::BucketSpec;

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
        assert!(admit_sides(&admission(None, None, false), plan, Sliced::default()).is_empty());
    }
}

#[test]
fn on_a_cluster_each_script_stays_in_one_slot() {
    let policy = limited_policy(Some(1));
    let call = admission(Some(&policy), Some(&policy), true);
    let single = admit_sides(&call, Plan::Single, Sliced::default());
    assert_eq!(single.len(), 1);
    let sides = admit_sides(&call, Plan::Cluster, Sliced::default());
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
            ..Reservation::default()
        },
        usage: Some(turnpike_core::usage::Usage::default()),
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
            ..Reservation::default()
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
fn a_side_reads_scope_indexes_as_its_own_scopes() {
    let policy = limited_policy(Some(1));
    let call = admission(Some(&policy), Some(&policy), false);
    let side = &admit_sides(&call, Plan::Single, Sliced::default())[0];
    // outcome, slots, scope, bucket, retry_ms, has_quota, limit, remaining, reset,
    // shadow_count, then (scope, bucket) pairs: see protocol.rs.
    let admitted = decode_admit(side, &[1, 0b10, 0, 0, 0, 1, 2, 1, 1, 1, 1, 1]).unwrap();
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
    let limited = decode_admit(side, &[0, 0, 2, 3, 1000, 0, 0, 0, 0, 0]).unwrap();
    assert_eq!(
        limited.outcome,
        SideOutcome::RateLimited {
            scope: Scope::Agent,
            bucket: BucketKind::Concurrency,
            retry_after_ms: 1000
        }
    );
    assert_eq!(limited.quota, None);
    // A third scope this side does not have.
    assert_eq!(decode_admit(side, &[0, 0, 3, 1, 10, 0, 0, 0, 0, 0]), None);
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

fn extension<'a>(
    key: Option<&'a Policy>,
    agent: Option<&'a Policy>,
    priced: bool,
    reservation: Reservation,
) -> Extension<'a> {
    Extension {
        call_id: "c1",
        key_id: "k1",
        account: "acct",
        agent: "ag_x",
        key_policy: key,
        agent_policy: agent,
        reservation,
        priced,
        hold_to: 0,
        now_ms: 0,
        lease_ms: 1000,
    }
}

#[test]
fn an_extension_asks_only_the_sides_that_hold_something() {
    let with_slot = limited_policy(Some(2));
    let both_slots = Reservation {
        reserve: 10,
        key_slot: true,
        agent_slot: true,
        ..Reservation::default()
    };
    let call = extension(Some(&with_slot), Some(&with_slot), true, both_slots);
    // One server: one script, the account and both scopes.
    let single = extend_sides(&call, Plan::Single);
    assert_eq!(single.len(), 1);
    assert_eq!(single[0].keys.len(), 3 + 2 * 2);
    // A Cluster: the agent's slot on its own side.
    let cluster = extend_sides(&call, Plan::Cluster);
    assert_eq!(cluster.len(), 2);
    assert!(cluster[1].keys.iter().all(|k| k.contains("{agent:ag_x}")));
    // An agent scope holding no slot reads nothing and renews nothing: no second trip.
    let key_slot_only = Reservation {
        agent_slot: false,
        ..both_slots
    };
    let call = extension(Some(&with_slot), Some(&with_slot), true, key_slot_only);
    assert_eq!(extend_sides(&call, Plan::Cluster).len(), 1);
    // A free call with no slots: nothing to ask at all.
    let call = extension(None, Some(&with_slot), false, Reservation::default());
    assert!(extend_sides(&call, Plan::Cluster).is_empty());
}
