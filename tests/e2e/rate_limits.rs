//! Rate limits (SPEC §3 policies): request buckets, token buckets, concurrency, agent-wide
//! policies and shadow mode, with `Retry-After` and the `RateLimit-*` headers.

use std::time::Duration;

use serde_json::json;

use crate::support::*;

#[test]
fn request_bucket_admits_the_burst_then_429_with_retry_after() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .policy(
            "standard",
            json!({"requests": {"rate": 3, "per": "1m", "burst": 3}}),
        )
        .start();
    for remaining in [2, 1, 0] {
        let r = gw.chat(AGENT, gw.jane(), "hi");
        r.assert_status(200);
        assert_eq!(r.int_header("ratelimit-limit"), 3);
        assert_eq!(r.int_header("ratelimit-remaining"), remaining);
        // one token every 20 s: full again in 20 s per missing token
        let reset = r.int_header("ratelimit-reset");
        let full_in = 20 * (3 - remaining);
        assert!(
            (full_in - 1..=full_in).contains(&reset),
            "RateLimit-Reset {reset}, expected about {full_in}"
        );
    }
    let r = gw.chat(AGENT, gw.jane(), "hi");
    r.error(429, "rate_limit_exceeded");
    let retry_after = r.int_header("retry-after");
    assert!(
        (1..=20).contains(&retry_after),
        "Retry-After {retry_after}, expected 1..=20"
    );
    assert_eq!(r.int_header("ratelimit-limit"), 3);
    assert_eq!(r.int_header("ratelimit-remaining"), 0);
    assert!(r.int_header("ratelimit-reset") >= 1);
    assert_eq!(w.count(), 3, "the refused call reached the worker");
    assert_eq!(
        gw.metric(
            "turnpike_rate_limited_total",
            &[("agent", AGENT), ("bucket", "requests")]
        ),
        1.0
    );
    gw.wait_metric(
        "turnpike_requests_total",
        &[("agent", AGENT), ("status", "429")],
        1.0,
    );
}

#[test]
fn request_buckets_are_per_key() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .policy(
            "standard",
            json!({"requests": {"rate": 1, "per": "1m", "burst": 2}}),
        )
        .start();
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
    gw.chat(AGENT, gw.jane(), "hi")
        .error(429, "rate_limit_exceeded");
    gw.chat(AGENT, gw.bob(), "hi").assert_status(200);
    gw.chat(OTHER_AGENT, gw.bob(), "hi").assert_status(200);
    gw.chat(OTHER_AGENT, gw.bob(), "hi")
        .error(429, "rate_limit_exceeded");
    assert_eq!(w.count(), 4);
}

#[test]
fn token_bucket_goes_negative_after_a_large_answer_and_refuses_the_next_call() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .policy(
            "standard",
            json!({"requests": {"rate": 1000, "per": "1s"}, "tokens": {"rate": 100, "per": "1m"}}),
        )
        .start();
    // 100 tokens in the bucket, the answer uses 150: the bucket ends at −50.
    gw.chat(AGENT, gw.jane(), Script::usage(100, 50))
        .assert_status(200);
    gw.usage_after("key=key_jane", 1);
    let r = gw.chat(AGENT, gw.jane(), "hi");
    r.error(429, "rate_limit_exceeded");
    // Back to positive after 50–51 tokens at 100 per minute: about 30 s.
    let retry_after = r.int_header("retry-after");
    assert!(
        (29..=31).contains(&retry_after),
        "Retry-After {retry_after}, expected about 30"
    );
    assert_eq!(w.count(), 1);
    assert_eq!(
        gw.metric(
            "turnpike_rate_limited_total",
            &[("agent", AGENT), ("bucket", "tokens")]
        ),
        1.0
    );
}

#[test]
fn concurrency_limit_refuses_a_second_call_in_flight() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .policy(
            "standard",
            json!({"requests": {"rate": 1000, "per": "1s"}, "concurrency": 1}),
        )
        .start();
    std::thread::scope(|s| {
        let slow = s.spawn(|| gw.chat(AGENT, gw.jane(), Script::sleep(1.0)));
        wait_until(
            Duration::from_secs(5),
            "the slow call reaches the worker",
            || w.count() == 1,
        );
        let r = gw.chat(AGENT, gw.jane(), "hi");
        r.error(429, "rate_limit_exceeded");
        assert!(
            r.header("retry-after").is_some(),
            "a 429 carries Retry-After"
        );
        r.int_header("retry-after");
        // another key has its own slot
        gw.chat(AGENT, gw.bob(), "hi").assert_status(200);
        slow.join().unwrap().assert_status(200);
    });
    assert_eq!(
        gw.metric(
            "turnpike_rate_limited_total",
            &[("agent", AGENT), ("bucket", "concurrency")]
        ),
        1.0
    );
    // The slot is released once the slow call is done.
    wait_until(Duration::from_secs(3), "jane's slot is free again", || {
        gw.chat(AGENT, gw.jane(), "hi").status == 200
    });
}

#[test]
fn two_overlapping_calls_with_concurrency_one_give_one_429() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .policy(
            "standard",
            json!({"requests": {"rate": 1000, "per": "1s"}, "concurrency": 1}),
        )
        .start();
    let barrier = std::sync::Barrier::new(2);
    let mut statuses: Vec<u16> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    gw.chat(AGENT, gw.jane(), Script::sleep(1.0)).status
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    statuses.sort();
    assert_eq!(statuses, vec![200, 429]);
    assert_eq!(w.count(), 1);
}

#[test]
fn an_agent_policy_limits_all_keys_together() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .policy(
            "agent-wide",
            json!({"requests": {"rate": 1, "per": "1m", "burst": 2}}),
        )
        .agent_policy("agent-wide")
        .start();
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
    gw.chat(AGENT, gw.bob(), "hi").assert_status(200);
    gw.chat(AGENT, gw.bob(), "hi")
        .error(429, "rate_limit_exceeded");
    gw.chat(AGENT, gw.jane(), "hi")
        .error(429, "rate_limit_exceeded");
    // the other agent has no agent policy
    gw.chat(OTHER_AGENT, gw.bob(), "hi").assert_status(200);
    assert_eq!(w.count(), 3);
}

#[test]
fn shadow_mode_admits_and_counts_would_be_rejections() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .policy(
            "standard",
            json!({"requests": {"rate": 1, "per": "1m", "burst": 1}, "mode": "shadow"}),
        )
        .start();
    for _ in 0..4 {
        gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
    }
    assert_eq!(w.count(), 4);
    assert_eq!(
        gw.metric(
            "turnpike_rate_limited_total",
            &[("agent", AGENT), ("bucket", "requests"), ("shadow", "true")]
        ),
        3.0
    );
}

#[test]
fn a_shadow_agent_policy_does_not_loosen_an_enforced_key_policy() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .policy(
            "standard",
            json!({"requests": {"rate": 1, "per": "1m", "burst": 2}}),
        )
        .policy(
            "agent-trial",
            json!({"requests": {"rate": 1, "per": "1m", "burst": 1}, "mode": "shadow"}),
        )
        .agent_policy("agent-trial")
        .start();
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200); // shadow would refuse: counted
    gw.chat(AGENT, gw.jane(), "hi")
        .error(429, "rate_limit_exceeded"); // the key's own limit
    assert_eq!(w.count(), 2);
    assert!(
        gw.metric(
            "turnpike_rate_limited_total",
            &[("agent", AGENT), ("bucket", "requests"), ("shadow", "true")]
        ) >= 1.0
    );
}

#[test]
fn a_402_carries_the_ratelimit_headers() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .policy(
            "standard",
            json!({"requests": {"rate": 5, "per": "1m", "burst": 5}}),
        )
        .account_balance("acct_jane", 0)
        .start();
    let r = gw.chat(AGENT, gw.jane(), "hi");
    r.error(402, "insufficient_balance");
    assert_eq!(r.int_header("ratelimit-limit"), 5);
    // Whether the refused call keeps the token it took is not this test's business.
    let remaining = r.int_header("ratelimit-remaining");
    assert!(
        (4..=5).contains(&remaining),
        "RateLimit-Remaining {remaining}, expected 4 or 5"
    );
    // One token every 12 s: full again in 12 s per missing token.
    let reset = r.int_header("ratelimit-reset");
    let full_in = 12 * (5 - remaining);
    assert!(
        (full_in - 1..=full_in).contains(&reset),
        "RateLimit-Reset {reset}, expected about {full_in}"
    );
    assert_eq!(w.count(), 0);
}

#[test]
fn an_authenticated_call_refused_before_admission_still_gets_ratelimit_headers_and_spends_nothing()
{
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .policy(
            "standard",
            json!({"requests": {"rate": 1, "per": "1m", "burst": 5}}),
        )
        .start();
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
    let r = gw
        .call(AGENT)
        .key(gw.jane())
        .field("message", json!(""))
        .send();
    r.error(400, "invalid_request");
    assert_eq!(r.header("ratelimit-limit"), Some("5"));
    assert_eq!(
        r.header("ratelimit-remaining"),
        Some("4"),
        "the refused call took no token"
    );
    let r = gw.chat(OTHER_AGENT, gw.jane(), "hi");
    r.error(404, "agent_not_found");
    assert_eq!(r.header("ratelimit-remaining"), Some("4"));
    let r = gw.chat(AGENT, gw.jane(), "hi");
    r.assert_status(200);
    assert_eq!(r.header("ratelimit-remaining"), Some("3"));
}
