//! Metering (SPEC §2): the totals equal the sum of the usage the workers reported, by account,
//! key and agent; bad usage is not credited; a client that hangs up before the worker
//! answers is charged nothing, and its worker's call is closed.

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::*;

fn usage(requests: i64, input: i64, output: i64, cost: i64) -> Usage {
    Usage {
        requests,
        input_tokens: input,
        output_tokens: output,
        total_tokens: input + output,
        cost,
    }
}

#[test]
fn usage_totals_and_token_metrics_equal_what_the_workers_reported() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    // (key, agent, input, output); AGENT costs input + 2 × output, OTHER_AGENT is free.
    let (jane, bob) = (gw.jane().to_string(), gw.bob().to_string());
    let calls = [
        (&jane, AGENT, 3, 4),
        (&jane, AGENT, 10, 20),
        (&jane, AGENT, 7, 0),
        (&bob, AGENT, 1, 1),
        (&bob, AGENT, 5, 5),
        (&bob, OTHER_AGENT, 2, 3),
    ];
    for (key, agent, i, o) in calls {
        gw.chat(agent, key, Script::usage(i, o)).assert_status(200);
    }
    assert_eq!(gw.usage_after("", 6), usage(6, 28, 33, 86));
    assert_eq!(gw.usage("account=acct_jane"), usage(3, 20, 24, 68));
    assert_eq!(gw.usage("key=key_jane"), usage(3, 20, 24, 68));
    assert_eq!(gw.usage("account=acct_bob"), usage(3, 8, 9, 18));
    assert_eq!(gw.usage("key=key_bob"), usage(3, 8, 9, 18));
    assert_eq!(gw.usage(&format!("agent={AGENT}")), usage(5, 26, 30, 86));
    assert_eq!(gw.usage(&format!("agent={OTHER_AGENT}")), usage(1, 2, 3, 0));
    assert_eq!(
        gw.usage(&format!("account=acct_bob&agent={AGENT}")),
        usage(2, 6, 6, 18)
    );
    assert_eq!(
        gw.usage(&format!("key=key_jane&agent={OTHER_AGENT}")),
        usage(0, 0, 0, 0)
    );

    assert_eq!(gw.settled_balance("acct_jane").balance, 10_000_000 - 68);
    assert_eq!(gw.settled_balance("acct_bob").balance, 10_000_000 - 18);

    gw.wait_metric(
        "turnpike_requests_total",
        &[("agent", AGENT), ("status", "200")],
        5.0,
    );
    gw.wait_metric(
        "turnpike_requests_total",
        &[("agent", OTHER_AGENT), ("status", "200")],
        1.0,
    );
    let text = gw.metrics();
    let tokens = |agent: &str, kind: &str| {
        metric_value(
            &text,
            "turnpike_tokens_total",
            &[("agent", agent), ("kind", kind)],
        )
    };
    assert_eq!(tokens(AGENT, "input"), 26.0);
    assert_eq!(tokens(AGENT, "output"), 30.0);
    assert_eq!(tokens(OTHER_AGENT, "input"), 2.0);
    assert_eq!(tokens(OTHER_AGENT, "output"), 3.0);
    assert_eq!(
        metric_value(
            &text,
            "turnpike_requests_total",
            &[("agent", AGENT), ("status", "200")]
        ),
        5.0
    );
    assert_eq!(
        metric_value(
            &text,
            "turnpike_requests_total",
            &[("agent", OTHER_AGENT), ("status", "200")]
        ),
        1.0
    );
}

#[test]
fn an_answer_without_usage_costs_nothing() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .balance(1000)
        .reserve(100)
        .start();
    gw.chat(AGENT, gw.jane(), Script::bad_usage(BadUsage::Missing))
        .assert_status(200);
    gw.assert_jane_charged_nothing(1000);
    assert_eq!(gw.metric("turnpike_invalid_usage_total", &[]), 0.0);
    // A good answer afterwards is credited as usual.
    gw.chat(AGENT, gw.jane(), Script::usage(5, 5))
        .assert_status(200);
    assert_eq!(gw.usage_after("account=acct_jane", 1), usage(1, 5, 5, 15));
    assert_eq!(gw.settled_balance("acct_jane").balance, 985);
}

/// SPEC §2: a usage that is there but wrong is never a free call. By default it is refused.
#[test]
fn invalid_usage_is_refused_and_costs_nothing() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .balance(1000)
        .reserve(100)
        .start();
    for how in BadUsage::INVALID {
        let r = gw.chat(AGENT, gw.jane(), Script::bad_usage(how));
        r.error(502, "upstream_invalid_usage");
        assert!(r.header("x-request-id").is_some(), "{how:?}");
    }
    assert_eq!(w.count(), 4);
    gw.assert_jane_charged_nothing(1000);
    let rejected = [("agent", AGENT), ("action", "rejected")];
    gw.wait_metric("turnpike_invalid_usage_total", &rejected, 4.0);
    for reason in ["not_an_integer", "absurd", "inconsistent"] {
        let labels = [("agent", AGENT), ("reason", reason)];
        assert!(
            gw.metric("turnpike_usage_rejected_total", &labels) >= 1.0,
            "{reason}"
        );
    }
}

/// `on_invalid_usage: charge_reserve`: the answer passes and the reservation is charged.
#[test]
fn invalid_usage_can_be_charged_the_reservation_instead() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .balance(1000)
        .reserve(100)
        .config(|c| c["upstreams"]["pool"]["on_invalid_usage"] = json!("charge_reserve"))
        .start();
    for how in BadUsage::INVALID {
        gw.chat(AGENT, gw.jane(), Script::bad_usage(how))
            .assert_status(200);
    }
    assert_eq!(
        gw.settled_balance("acct_jane"),
        Balance {
            balance: 600,
            reserved: 0
        }
    );
    assert_eq!(gw.usage_after("account=acct_jane", 4), usage(4, 0, 0, 400));
    let charged = [("agent", AGENT), ("action", "charged_reserve")];
    gw.wait_metric("turnpike_invalid_usage_total", &charged, 4.0);
}

/// SPEC §2: a client gone before the worker answered is noticed within a second; the
/// worker's call is closed (so the agent can stop) and nothing is charged or kept reserved.
#[test]
fn a_client_gone_before_the_answer_closes_the_workers_call_and_costs_nothing() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).reserve(100).start();
    let start = gw.balance("acct_jane").balance;
    let body = json!({"message": Script::sleep(5.0).to_string()}).to_string();
    let request = raw::chat_request(AGENT, gw.jane(), body.as_bytes());
    let mut s = TcpStream::connect(("127.0.0.1", gw.port())).unwrap();
    s.write_all(&request).unwrap();
    wait_until(
        Duration::from_secs(3),
        "the call reaches the worker",
        || w.count() == 1,
    );
    drop(s);
    let gone = Instant::now();
    assert_worker_told(&w, gone);
    assert_charged_nothing(&gw, start);
}

/// The same over HTTP/2: the client's connection closed while its stream waits.
#[test]
fn an_http2_client_gone_before_the_answer_closes_the_workers_call_and_costs_nothing() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).reserve(100).start();
    let start = gw.balance("acct_jane").balance;
    let client = tls::H2Session::cleartext(gw.port());
    client.start(&tls::h2_chat(gw.jane(), &Script::sleep(5.0).to_string()));
    wait_until(
        Duration::from_secs(3),
        "the call reaches the worker",
        || w.count() == 1,
    );
    drop(client);
    let gone = Instant::now();
    assert_worker_told(&w, gone);
    assert_charged_nothing(&gw, start);
}

/// The worker saw its call closed within a second of the client going.
#[track_caller]
fn assert_worker_told(w: &Worker, gone: Instant) {
    wait_until(
        Duration::from_secs(3),
        "the worker sees its call closed",
        || !w.hang_ups().is_empty(),
    );
    let told = w.hang_ups()[0].saturating_duration_since(gone);
    assert!(
        told <= Duration::from_secs(1),
        "the worker was told after {told:?}"
    );
}

#[track_caller]
fn assert_charged_nothing(gw: &TestGateway, start: i64) {
    assert_eq!(
        gw.settled_balance("acct_jane"),
        Balance {
            balance: start,
            reserved: 0
        }
    );
    assert_eq!(gw.usage("account=acct_jane"), usage(0, 0, 0, 0));
}
