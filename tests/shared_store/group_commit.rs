//! The group commit: admissions and settlements waiting at the same moment share one script
//! run, and each call is still judged, charged and logged exactly as if it ran alone.

use std::sync::Barrier;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::on_redis;
use crate::support::redis::RedisServer;
use crate::support::*;

/// 45 input and 32 output tokens at 1 and 2 units per token.
const COST: i64 = 45 + 2 * 32;

/// Sends one call per key in `keys`, all at once; returns their statuses in order.
fn at_once(gw: &TestGateway, keys: &[&str]) -> Vec<u16> {
    at_once_answered_after(gw, keys, 0.2)
}

/// As [`at_once`], with the worker answering each call after `seconds`.
fn at_once_answered_after(gw: &TestGateway, keys: &[&str], seconds: f64) -> Vec<u16> {
    let barrier = Barrier::new(keys.len());
    std::thread::scope(|s| {
        let calls: Vec<_> = keys
            .iter()
            .map(|key| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    gw.chat(AGENT, key, Script::sleep(seconds)).status
                })
            })
            .collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    })
}

#[test]
fn concurrent_calls_share_script_runs_and_each_is_charged_and_logged_once() {
    let redis = RedisServer::start();
    let w = Worker::start("w1");
    let gw = on_redis(&w, json!(redis.url()), json!({}))
        .policy(
            "standard",
            json!({"requests": {"rate": 1000, "per": "1s"}, "tokens": {"rate": 1000000, "per": "1s"},
                   "concurrency": 100}),
        )
        .reserve(1000)
        .account_balance("acct_jane", 1_000_000)
        .start();
    // One call first, which loads the script (a first EVALSHA answered NOSCRIPT): three
    // operations, its admission, its settlement, and the mark of the run that carried it let
    // go.
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
    gw.wait_metric("turnpike_store_batch_calls_sum", &[], 3.0);
    let runs_before = gw.metric("turnpike_store_batch_calls_count", &[]);
    let operations_before = gw.metric("turnpike_store_batch_calls_sum", &[]);
    let slices_before = gw.metric("turnpike_store_duration_seconds_count", &[("op", "slice")]);
    let scripts_before = redis.command_calls("evalsha");
    let calls = 48;
    let statuses = at_once(&gw, &vec![gw.jane(); calls]);
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let all = calls as i64 + 1;
    let usage = gw.usage_after("account=acct_jane", all);
    assert_eq!(
        (usage.requests, usage.total_tokens, usage.cost),
        (all, 77 * all, COST * all)
    );
    let balance = gw.settled_balance("acct_jane");
    assert_eq!(balance.balance, 1_000_000 - COST * all);
    assert_eq!(
        redis.cli(&["XLEN", "turnpike:usage"]),
        format!("(integer) {all}")
    );
    // Calls shared runs: far fewer runs than operations (a call is its settlement, and its
    // admission when Redis admitted it, not when the gateway's escrow and block did; a run
    // of settlements has its mark let go in a later run). The other scripts are the syncs
    // of the key's slices and of the gateway's escrow and blocks (slice.lua and the like).
    let operations = gw.metric("turnpike_store_batch_calls_sum", &[]) - operations_before;
    let runs = gw.metric("turnpike_store_batch_calls_count", &[]) - runs_before;
    assert!(
        operations >= calls as f64 && runs * 2.0 <= operations,
        "{runs} runs for {operations} operations"
    );
    let slices = || gw.metric("turnpike_store_duration_seconds_count", &[("op", "slice")]);
    let (slices_then, scripts, slices_now) = (slices(), redis.command_calls("evalsha"), slices());
    let scripts = (scripts - scripts_before) as f64;
    // A sync script's first run is two EVALSHAs (the first answered NOSCRIPT), and two syncs
    // sent at once may both meet NOSCRIPT: the slices', the block's and the escrow's first
    // runs come in this window (a bucket is sliced only once it is called on often).
    let first_loads = 6.0;
    assert!(
        runs + slices_then - slices_before <= scripts
            && scripts <= runs + slices_now - slices_before + first_loads,
        "{scripts} scripts, {runs} runs, {} to {} slices",
        slices_then - slices_before,
        slices_now - slices_before
    );
    // Nothing is left held: no reservation, no concurrency slot.
    assert_eq!(
        calls_seated(&redis, "turnpike:{account:acct_jane}:key:key_jane:inflight"),
        0
    );
}

/// Calls holding a slot of a concurrency limit in Redis (not the gateways' blocks, issue 23).
fn calls_seated(redis: &RedisServer, inflight: &str) -> usize {
    redis
        .cli(&["ZRANGE", inflight, "0", "-1"])
        .lines()
        .filter(|member| member.contains("call_"))
        .count()
}

#[test]
fn a_call_redis_refuses_fails_alone_and_the_calls_run_with_it_pass() {
    let redis = RedisServer::start();
    let w = Worker::start("w1");
    let gw = on_redis(&w, json!(redis.url()), json!({}))
        // A burst too small to slice: each admission is judged in Redis.
        .policy(
            "standard",
            json!({"requests": {"rate": 1000, "per": "1s", "burst": 15}}),
        )
        .start();
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
    // Damage jane's key's buckets: her admission fails in Redis (WRONGTYPE), for good.
    redis.cli(&["DEL", "turnpike:{account:acct_jane}:key:key_jane:limits"]);
    redis.cli(&[
        "SET",
        "turnpike:{account:acct_jane}:key:key_jane:limits",
        "damaged",
    ]);
    let statuses = at_once(&gw, &interleaved(&gw, 12));
    let (jane, bob): (Vec<_>, Vec<_>) = statuses.iter().enumerate().partition(|(i, _)| i % 2 == 0);
    assert!(jane.iter().all(|(_, s)| **s == 503), "{statuses:?}");
    assert!(bob.iter().all(|(_, s)| **s == 200), "{statuses:?}");
    assert_eq!(gw.usage_after("account=acct_bob", 12).requests, 12);
}

/// Jane's and Bob's calls, alternating, `n` of each.
fn interleaved(gw: &TestGateway, n: usize) -> Vec<&str> {
    (0..2 * n)
        .map(|i| if i % 2 == 0 { gw.jane() } else { gw.bob() })
        .collect()
}

/// An account hash damaged by hand (a field that is no number) fails its own calls, at
/// admission and at settlement, and nothing else: the calls that shared script runs with
/// them are admitted, charged and logged exactly, and nothing of a failed call is
/// half-applied (no lease, slot or reservation left behind).
#[test]
fn a_damaged_account_fails_only_its_own_calls_and_the_runs_they_share_apply_the_rest() {
    let redis = RedisServer::start();
    let w = Worker::start("w1");
    let gw = on_redis(&w, json!(redis.url()), json!({}))
        .policy(
            "standard",
            json!({"requests": {"rate": 1000, "per": "1s"}, "concurrency": 100}),
        )
        .reserve(100)
        // Enough for her calls, too little to escrow (issue 23): each of Jane's calls is
        // judged and settled in Redis, call by call.
        .account_balance("acct_jane", 1_500)
        .account_balance("acct_bob", 1_000_000)
        .start();
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
    gw.chat(AGENT, gw.bob(), "hi").assert_status(200);
    let jane = "turnpike:{account:acct_jane}:account";
    let held_fields = |account: &str| {
        redis
            .cli(&["HKEYS", account])
            .lines()
            .filter(|f| f.contains("held:call_"))
            .count()
    };

    // At admission: what Jane has reserved is no number.
    redis.cli(&["HSET", jane, "reserved", "abc"]);
    let statuses = at_once(&gw, &interleaved(&gw, 12));
    let (jane_calls, bob_calls): (Vec<_>, Vec<_>) =
        statuses.iter().enumerate().partition(|(i, _)| i % 2 == 0);
    assert!(jane_calls.iter().all(|(_, s)| **s == 503), "{statuses:?}");
    assert!(bob_calls.iter().all(|(_, s)| **s == 200), "{statuses:?}");
    assert_eq!(redis.cli(&["HGET", jane, "reserved"]), "abc");
    assert_eq!(
        held_fields(jane),
        0,
        "a refused admission reserved something"
    );
    for (account, key) in [("acct_jane", "key_jane"), ("acct_bob", "key_bob")] {
        let inflight = format!("turnpike:{{account:{account}}}:key:{key}:inflight");
        assert_eq!(calls_seated(&redis, &inflight), 0, "{inflight}");
    }

    // At settlement: Jane's calls are admitted, then her balance is damaged, and Redis is
    // held up while the answers come, so her settlements and Bob's share runs.
    redis.cli(&["HSET", jane, "reserved", "0"]);
    // The refused admissions' releases, held, are written now, or were dropped (refused for
    // good) if the flusher met the damage first: either way, none is left.
    gw.wait_metric("turnpike_store_settlements_queued", &[], 0.0);
    let dropped_before = gw.metric("turnpike_store_settlements_dropped_total", &[]);
    let started = Instant::now();
    let statuses = std::thread::scope(|s| {
        let calls = s.spawn(|| at_once_answered_after(&gw, &interleaved(&gw, 12), 1.5));
        wait_until(Duration::from_secs(5), "Jane's 12 calls admitted", || {
            redis.cli(&["HGET", jane, "reserved"]) == "1200"
        });
        redis.cli(&["HSET", jane, "balance", "abc"]);
        std::thread::sleep(Duration::from_millis(1200).saturating_sub(started.elapsed()));
        redis.cli(&["DEBUG", "SLEEP", "0.6"]);
        calls.join().unwrap()
    });
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let usage = gw.usage_after("account=acct_bob", 25);
    assert_eq!((usage.requests, usage.cost), (25, 25 * COST));
    assert_eq!(
        gw.settled_balance("acct_bob").balance,
        1_000_000 - 25 * COST
    );
    // Jane's settlements are refused for good, counted and logged whole; none half-applied.
    // (Held first, then dropped by the flusher when Redis refuses them again.)
    gw.wait_metric(
        "turnpike_store_settlements_dropped_total",
        &[],
        dropped_before + 12.0,
    );
    assert_eq!(redis.cli(&["HGET", jane, "balance"]), "abc");
    assert_eq!(redis.cli(&["HGET", jane, "reserved"]), "1200");
    assert_eq!(held_fields(jane), 12);
    assert_eq!(gw.usage("account=acct_jane").requests, 1);
}

/// A call refused before admission (here a body that is not JSON) costs Redis nothing: its
/// `RateLimit-*` numbers are what this instance knows, not a second script run.
#[test]
fn a_call_refused_before_admission_sends_redis_nothing() {
    let redis = RedisServer::start();
    let w = Worker::start("w1");
    let gw = on_redis(&w, json!(redis.url()), json!({"key_cache_ttl": "1m"}))
        // Slow enough that the numbers the instance remembers do not refill meanwhile.
        .policy("standard", json!({"requests": {"rate": 10, "per": "1m"}}))
        .start();
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
    // Its admission, its settlement, and its settled marker let go.
    gw.wait_metric("turnpike_store_batch_calls_sum", &[], 3.0);
    // Scripts are the calls' only work on Redis (the key is cached); background checks
    // (the seed marker, the flusher's ping) are not a call's.
    let scripts = || redis.command_calls("evalsha") + redis.command_calls("eval");
    let before = scripts();
    let refused = gw.post_json_bytes(&chat_path(AGENT), gw.jane(), b"{not json");
    refused.error(400, "invalid_request");
    assert_eq!(refused.int_header("ratelimit-limit"), 10);
    assert!(refused.int_header("ratelimit-remaining") <= 9);
    assert_eq!(scripts(), before, "the refusal ran a script on Redis");
}
