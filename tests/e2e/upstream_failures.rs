//! Upstream failures (SPEC §1 errors 502/504, §2 "only a 2xx answer that carries usage is
//! charged"): a failed call costs nothing and releases its reservation; a connect failure is
//! retried on another endpoint.

use std::time::Duration;

use crate::support::*;

#[test]
fn a_worker_error_status_is_passed_on_and_costs_nothing() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .balance(1000)
        .reserve(100)
        .start();
    let r = gw.chat(AGENT, gw.jane(), Script::status(500));
    r.assert_status(500);
    assert_eq!(r.json()["response"], format!("w1: {}", Script::status(500)));
    gw.chat(AGENT, gw.jane(), Script::status(503))
        .assert_status(503);
    gw.chat(AGENT, gw.jane(), Script::status(429))
        .assert_status(429);
    gw.assert_jane_charged_nothing(1000);
    assert_eq!(w.count(), 3);
}

#[test]
fn a_timed_out_call_costs_nothing_even_when_the_worker_answers_later() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .balance(1000)
        .reserve(100)
        .timeout("500ms")
        .start();
    gw.chat(AGENT, gw.jane(), Script::sleep(1.2))
        .error(504, "upstream_timeout");
    wait_until(
        Duration::from_secs(5),
        "the worker finished its late answer",
        || w.finished() == 1,
    );
    // The call has ended (it is counted after it settled) and the worker has nothing more
    // to say: nothing can charge it any more.
    gw.wait_metric("turnpike_requests_total", &[("status", "504")], 1.0);
    gw.assert_jane_charged_nothing(1000);
}

#[test]
fn a_refused_connection_costs_nothing() {
    let gw = TestGateway::builder()
        .endpoint(&format!("127.0.0.1:{}", free_port()))
        .balance(1000)
        .reserve(100)
        .start();
    for _ in 0..3 {
        gw.chat(AGENT, gw.jane(), "hi")
            .error(502, "upstream_unavailable");
    }
    gw.assert_jane_charged_nothing(1000);
}

#[test]
fn a_broken_answer_costs_nothing() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .balance(1000)
        .reserve(100)
        .start();
    gw.chat(AGENT, gw.jane(), Script::garbage())
        .error(502, "upstream_unavailable");
    gw.chat(AGENT, gw.jane(), Script::close())
        .error(502, "upstream_unavailable");
    gw.assert_jane_charged_nothing(1000);
    // and the gateway still works
    gw.chat(AGENT, gw.jane(), Script::usage(10, 0))
        .assert_status(200);
    assert_eq!(gw.settled_balance("acct_jane").balance, 990);
}

/// A request the worker got whole is never sent again, even on a reused connection: a worker
/// that did the work and then dropped the connection would run it twice, billed once.
#[test]
fn a_call_the_worker_dropped_after_reading_it_is_not_sent_again() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .balance(1000)
        .reserve(100)
        .start();
    // Leaves a kept-alive connection in the gateway's pool for the next call to reuse.
    gw.chat(AGENT, gw.jane(), Script::usage(10, 0))
        .assert_status(200);
    gw.chat(AGENT, gw.jane(), Script::close())
        .error(502, "upstream_unavailable");
    assert_eq!(w.count(), 2, "the dropped call reached the worker once");
    let r = gw.chat(AGENT, gw.jane(), Script::usage(10, 0));
    r.assert_status(200);
    assert_eq!(
        r.json()["response"],
        format!("w1: {}", Script::usage(10, 0))
    );
    assert_eq!(gw.settled_balance("acct_jane").balance, 980);
}

#[test]
fn an_answer_over_the_response_cap_is_502_and_costs_nothing() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .balance(1000)
        .reserve(100)
        .max_response_bytes(4096)
        .start();
    gw.chat(AGENT, gw.jane(), Script::padding(10000))
        .error(502, "upstream_unavailable");
    gw.assert_jane_charged_nothing(1000);
    let r = gw.chat(AGENT, gw.jane(), Script::padding(1000));
    r.assert_status(200);
    assert_eq!(r.json()["padding"].as_str().map(str::len), Some(1000));
}

#[test]
fn a_connect_failure_is_retried_on_another_endpoint() {
    let w = Worker::start("w1");
    let dead = format!("127.0.0.1:{}", free_port());
    let gw = TestGateway::builder().endpoint(&dead).worker(&w).start();
    for i in 0..10 {
        let r = gw.chat(AGENT, gw.jane(), format!("call {i}"));
        assert_eq!(r.status, 200, "call {i}: {}", r.body);
    }
    assert_eq!(w.count(), 10);
}

#[test]
fn a_connect_failure_is_retried_with_session_balancing_too() {
    let w = Worker::start("w1");
    let dead = format!("127.0.0.1:{}", free_port());
    let gw = TestGateway::builder()
        .endpoint(&dead)
        .worker(&w)
        .balance_mode("session")
        .start();
    for i in 0..10 {
        let r = gw
            .call(AGENT)
            .key(gw.jane())
            .session(&format!("sess_retry_{i}"))
            .send();
        assert_eq!(r.status, 200, "session {i}: {}", r.body);
    }
    assert_eq!(w.count(), 10);
}
