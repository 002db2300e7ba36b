//! Prepaid balances (SPEC §2): reservation at admission, debit of the actual cost, 402.

use std::sync::Barrier;
use std::time::Duration;

use serde_json::json;

use crate::support::*;

#[test]
fn calls_are_debited_and_an_exhausted_account_gets_402() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).balance(5).start();
    // cost = ceil((2 × 1e6 + 1 × 2e6) / 1e6) = 4
    gw.chat(AGENT, gw.jane(), Script::usage(2, 1))
        .assert_status(200);
    assert_eq!(gw.settled_balance("acct_jane").balance, 1);
    gw.chat(AGENT, gw.jane(), Script::usage(2, 1))
        .assert_status(200);
    // admitted with 1 ≥ reserve 1, cost 4: the balance may end below zero by cost − reserve
    assert_eq!(gw.settled_balance("acct_jane").balance, -3);
    gw.chat(AGENT, gw.jane(), Script::usage(2, 1))
        .error(402, "insufficient_balance");
    assert_eq!(w.count(), 2);
    assert_eq!(
        gw.balance("acct_bob").balance,
        5,
        "another account is untouched"
    );

    let r = gw.admin_post("/admin/accounts/acct_jane/balance", &json!({"add": 10}));
    r.assert_status(200);
    assert_eq!(r.json()["balance"], 7);
    gw.chat(AGENT, gw.jane(), Script::usage(2, 1))
        .assert_status(200);
    assert_eq!(gw.settled_balance("acct_jane").balance, 3);
}

#[test]
fn cost_is_rounded_up_to_whole_units() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .balance(100)
        .pricing(json!({"input_per_mtok": 1_500_000, "output_per_mtok": 2_500_000}))
        .start();
    // ceil(1 × 1.5) = 2
    gw.chat(AGENT, gw.jane(), Script::usage(1, 0))
        .assert_status(200);
    assert_eq!(gw.settled_balance("acct_jane").balance, 98);
    // ceil(3 × 1.5 + 1 × 2.5) = ceil(7.0) = 7
    gw.chat(AGENT, gw.jane(), Script::usage(3, 1))
        .assert_status(200);
    assert_eq!(gw.settled_balance("acct_jane").balance, 91);
    // ceil(0 × 1.5 + 1 × 2.5) = 3
    gw.chat(AGENT, gw.jane(), Script::usage(0, 1))
        .assert_status(200);
    assert_eq!(gw.settled_balance("acct_jane").balance, 88);
    assert_eq!(gw.usage("account=acct_jane").cost, 12);
}

#[test]
fn forty_concurrent_calls_never_overspend() {
    let w = Worker::start("w1");
    // Each call reserves 100 and costs exactly 100 (100 input tokens at 1 unit each):
    // a balance of 1000 admits exactly ten, however the calls interleave.
    let gw = TestGateway::builder()
        .worker(&w)
        .balance(1000)
        .reserve(100)
        .start();
    let barrier = Barrier::new(40);
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..40)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    gw.chat(AGENT, gw.jane(), Script::usage(100, 0).hold())
                        .status
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let broke = statuses.iter().filter(|s| **s == 402).count();
    assert_eq!((ok, broke), (10, 30), "statuses: {statuses:?}");
    assert_eq!(
        gw.settled_balance("acct_jane"),
        Balance {
            balance: 0,
            reserved: 0
        }
    );
    assert_eq!(w.count(), 10);
    let u = gw.usage_after("account=acct_jane", 10);
    assert_eq!((u.requests, u.input_tokens, u.cost), (10, 1000, 1000));
    assert_eq!(
        gw.metric("turnpike_insufficient_balance_total", &[("agent", AGENT)]),
        30.0
    );
}

#[test]
fn a_reservation_is_held_while_the_call_is_in_flight() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .balance(150)
        .reserve(100)
        .start();
    std::thread::scope(|s| {
        let slow = s.spawn(|| gw.chat(AGENT, gw.jane(), Script::sleep(1.0)));
        wait_until(
            Duration::from_secs(5),
            "the slow call reaches the worker",
            || w.count() == 1,
        );
        assert_eq!(
            gw.balance("acct_jane"),
            Balance {
                balance: 150,
                reserved: 100
            }
        );
        // 150 − 100 reserved < 100: no room for a second call.
        gw.chat(AGENT, gw.jane(), "hi")
            .error(402, "insufficient_balance");
        slow.join().unwrap().assert_status(200);
    });
    // The actual cost is 45 + 2 × 32 = 109.
    assert_eq!(
        gw.settled_balance("acct_jane"),
        Balance {
            balance: 41,
            reserved: 0
        }
    );
    assert_eq!(w.count(), 1);
}

#[test]
fn a_free_agent_needs_no_balance() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).balance(0).start();
    for _ in 0..3 {
        gw.chat(OTHER_AGENT, gw.bob(), Script::usage(1000, 1000))
            .assert_status(200);
    }
    let u = gw.usage_after("account=acct_bob", 3);
    assert_eq!(
        (u.requests, u.input_tokens, u.output_tokens, u.cost),
        (3, 3000, 3000, 0)
    );
    assert_eq!(
        gw.settled_balance("acct_bob"),
        Balance {
            balance: 0,
            reserved: 0
        }
    );
}

#[test]
fn an_add_that_would_overflow_is_refused_and_changes_nothing() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).balance(5).start();
    let r = gw.admin_post(
        "/admin/accounts/acct_jane/balance",
        &json!({"add": i64::MAX}),
    );
    let body = r.error(400, "invalid_request");
    assert!(
        body["message"].as_str().unwrap().contains("64-bit"),
        "{body}"
    );
    assert_eq!(gw.balance("acct_jane").balance, 5);
    // The largest balance there is can still be set, and added to by a negative amount.
    gw.admin_post(
        "/admin/accounts/acct_jane/balance",
        &json!({"set": i64::MAX}),
    )
    .assert_status(200);
    let r = gw.admin_post("/admin/accounts/acct_jane/balance", &json!({"add": -1}));
    assert_eq!(r.json()["balance"], i64::MAX - 1);
}
