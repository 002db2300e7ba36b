//! Two gateway processes on one Redis behave as one gateway.

use std::fmt::Display;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::on_redis;
use crate::support::redis::RedisServer;
use crate::support::*;

/// Two gateways with the same config and one Redis; `store` adds to the `store:` section.
fn pair(
    redis: &RedisServer,
    store: serde_json::Value,
    build: impl FnOnce(gateway::GatewayBuilder) -> gateway::GatewayBuilder,
) -> (TestGateway, TestGateway, Worker) {
    let w = Worker::start("w1");
    let builder = on_redis(&w, json!(redis.url()), store);
    let files = build(builder).write();
    let second = files.sibling();
    (files.start(), second.start(), w)
}

/// Sends `n` calls at once, alternating between the gateways; returns their statuses.
fn burst(gateways: [&TestGateway; 2], n: usize, message: impl Display + Sync) -> Vec<u16> {
    let message = &message;
    let barrier = Barrier::new(n);
    std::thread::scope(|s| {
        let calls: Vec<_> = (0..n)
            .map(|i| {
                let gw = gateways[i % 2];
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    gw.chat(AGENT, gw.jane(), message).status
                })
            })
            .collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    })
}

#[test]
fn sixty_concurrent_calls_against_a_burst_of_20_admit_exactly_20() {
    let redis = RedisServer::start();
    let (a, b, w) = pair(&redis, json!({}), |g| {
        g.policy(
            "standard",
            json!({"requests": {"rate": 1, "per": "1h", "burst": 20}}),
        )
    });
    let statuses = burst([&a, &b], 60, "hi");
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!((admitted, limited), (20, 40), "{statuses:?}");
    assert_eq!(w.count(), 20);
}

#[test]
fn a_balance_covering_10_reservations_admits_exactly_10_and_ends_exact() {
    let redis = RedisServer::start();
    // Each call reserves 1000 and costs 45 × 1 + 32 × 2 = 109.
    let (a, b, w) = pair(&redis, json!({}), |g| {
        g.reserve(1000).account_balance("acct_jane", 10_000)
    });
    let statuses = burst([&a, &b], 30, Script::sleep(1.0));
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 402).count();
    assert_eq!((admitted, refused), (10, 20), "{statuses:?}");
    assert_eq!(w.count(), 10);
    let balance = a.settled_balance("acct_jane");
    assert_eq!(balance.balance, 10_000 - 10 * 109);
    assert_eq!(
        b.balance("acct_jane"),
        balance,
        "both instances see one balance"
    );
    assert_eq!(b.usage("account=acct_jane").requests, 10);
}

#[test]
fn a_key_made_on_one_instance_works_on_the_other_and_its_revocation_reaches_it_within_1s() {
    let redis = RedisServer::start();
    // Cached keys would live a minute: only the pub/sub message can bring the change in time.
    let (a, b, _w) = pair(&redis, json!({"key_cache_ttl": "60s"}), |g| g);
    let made = a.admin_post(
        "/admin/keys",
        &json!({"account": "acct_jane", "agents": "*", "policy": "standard"}),
    );
    made.assert_status(201);
    let (id, key) = (
        made.json()["id"].as_str().unwrap().to_string(),
        made.json()["key"].as_str().unwrap().to_string(),
    );
    // The other instance learns of it at once (a cached "no such key" is dropped too).
    b.chat(AGENT, &key, "hi").assert_status(200);
    b.chat(AGENT, &key, "hi").assert_status(200);

    a.admin_delete(&format!("/admin/keys/{id}"))
        .assert_status(200);
    let revoked = Instant::now();
    loop {
        let status = b.chat(AGENT, &key, "hi").status;
        if status == 401 {
            break;
        }
        assert_eq!(status, 200);
        assert!(
            revoked.elapsed() < Duration::from_secs(1),
            "the other instance still takes a key revoked {:?} ago",
            revoked.elapsed()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    eprintln!(
        "revocation reached the other instance in {:?}",
        revoked.elapsed()
    );
    a.chat(AGENT, &key, "hi").error(401, "invalid_api_key");
}

#[test]
fn state_survives_a_gateway_restart() {
    let redis = RedisServer::start();
    let w = Worker::start("w1");
    let gw = on_redis(&w, json!(redis.url()), json!({}))
        .policy(
            "standard",
            json!({"requests": {"rate": 1, "per": "1h", "burst": 3}}),
        )
        .start();
    let made = gw.admin_post(
        "/admin/keys",
        &json!({"account": "acct_bob", "agents": "*", "policy": "standard"}),
    );
    let key = made.json()["key"].as_str().unwrap().to_string();
    for _ in 0..3 {
        gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
    }
    let before = gw.settled_balance("acct_jane");
    gw.admin_post("/admin/accounts/acct_bob/balance", &json!({"set": 777}))
        .assert_status(200);

    gw.restart();

    assert_eq!(
        gw.balance("acct_jane"),
        before,
        "the seed did not reset the balance"
    );
    assert_eq!(gw.balance("acct_bob").balance, 777);
    assert_eq!(gw.usage("account=acct_jane").requests, 3);
    gw.chat(AGENT, gw.jane(), "hi")
        .error(429, "rate_limit_exceeded");
    gw.chat(AGENT, &key, "hi").assert_status(200);
}

#[test]
fn every_metered_call_is_appended_to_the_usage_stream() {
    let redis = RedisServer::start();
    let w = Worker::start("w1");
    let gw = on_redis(&w, json!(redis.url()), json!({})).start();
    gw.call(AGENT)
        .key(gw.jane())
        .message(Script::usage(7, 5))
        .session("sess-1")
        .header("X-Request-Id", "req-stream-1")
        .send()
        .assert_status(200);
    gw.chat(AGENT, gw.bob(), Script::status(500))
        .assert_status(500);
    assert_eq!(redis.cli(&["XLEN", "turnpike:usage"]), "(integer) 1");
    let entry = redis.cli(&["XRANGE", "turnpike:usage", "-", "+"]);
    // redis-cli prints one `n) "value"` per line: the entry id, then field, value, ...
    let values: Vec<&str> = entry
        .lines()
        .filter_map(|line| line.rsplit_once(") "))
        .map(|(_, v)| v.trim_matches('"'))
        .collect();
    let fields: std::collections::HashMap<&str, &str> = values[1..]
        .chunks(2)
        .map(|pair| (pair[0], pair[1]))
        .collect();
    for (field, value) in [
        ("request_id", "req-stream-1"),
        ("account", "acct_jane"),
        ("key_id", "key_jane"),
        ("agent", AGENT),
        ("session_id", "sess-1"),
        ("status", "200"),
        ("input_tokens", "7"),
        ("output_tokens", "5"),
        ("total_tokens", "12"),
        // 7 × 1 + 5 × 2
        ("cost", "17"),
    ] {
        assert_eq!(fields.get(field), Some(&value), "{field} in {entry}");
    }
    assert!(fields.contains_key("time_ms"), "{entry}");
    assert!(
        fields
            .get("call_id")
            .is_some_and(|id| id.starts_with("call_")),
        "{entry}"
    );
}
