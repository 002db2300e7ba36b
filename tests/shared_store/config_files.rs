//! Config files on a shared Redis (SPEC §4): every instance reads the file's keys from its
//! own file; Redis holds only what changes at run time (keys made through the admin API,
//! revocations, balances), so starting or reloading costs Redis nothing per key, and two
//! instances on different versions of the files never undo each other's state.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::on_redis;
use crate::support::redis::RedisServer;
use crate::support::*;

/// Redis's count of every command it ran, less what the test's own probes ran.
fn commands_run(redis: &RedisServer) -> u64 {
    let stats = redis.cli(&["INFO", "commandstats"]);
    stats
        .lines()
        .filter(|l| !l.starts_with("cmdstat_info:") && !l.starts_with("cmdstat_ping:"))
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// Makes one call and lets its own writes (its settlement, its marker let go) land; returns
/// Redis's command count from then.
fn after_a_settled_call(gw: &TestGateway, redis: &RedisServer) -> u64 {
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
    std::thread::sleep(Duration::from_millis(500));
    commands_run(redis)
}

/// `n` more config keys (`key_extra_<i>`, on acct_jane), each with a key no test uses.
fn extra_keys(n: usize) -> impl FnOnce(&mut Value) {
    move |c: &mut Value| {
        let keys = c["keys"].as_array_mut().unwrap();
        for i in 0..n {
            keys.push(json!({
                "id": format!("key_extra_{i}"),
                "sha256": sha256_hex(&format!("ak_extra_{i}_0123456789abcdef0123456789abcdef")),
                "account": "acct_jane",
                "agents": "*",
                "policy": "standard",
            }));
        }
    }
}

#[test]
fn a_config_key_works_on_two_instances_and_its_revocation_reaches_both_and_stays() {
    let redis = RedisServer::start();
    let w = Worker::start("w1");
    let files = on_redis(&w, json!(redis.url()), json!({"key_cache_ttl": "60s"})).write();
    let second = files.sibling();
    let (a, b) = (files.start(), second.start());
    // Redis has never seen the key: nothing of it was written there.
    assert_eq!(
        redis.cli(&["--scan", "--pattern", "turnpike:key:*"]).trim(),
        ""
    );
    assert_eq!(
        redis
            .cli(&["--scan", "--pattern", "turnpike:keyid:*"])
            .trim(),
        ""
    );
    a.chat(AGENT, a.jane(), "hi").assert_status(200);
    b.chat(AGENT, b.jane(), "hi").assert_status(200);

    a.admin_delete("/admin/keys/key_jane").assert_status(200);
    let revoked = Instant::now();
    wait_until(
        Duration::from_secs(5),
        "the other instance refuses it",
        || b.chat(AGENT, b.jane(), "hi").status == 401,
    );
    assert!(
        revoked.elapsed() < Duration::from_secs(1),
        "the revocation took {:?} to reach the other instance",
        revoked.elapsed()
    );
    a.chat(AGENT, a.jane(), "hi").error(401, "invalid_api_key");
    assert_eq!(b.admin_get("/admin/keys/key_jane").json()["revoked"], true);

    // The file still lists it: neither a reload nor a restart brings it back.
    a.admin_post("/admin/reload", &json!({})).assert_status(200);
    a.chat(AGENT, a.jane(), "hi").error(401, "invalid_api_key");
    b.restart();
    b.chat(AGENT, b.jane(), "hi").error(401, "invalid_api_key");
    b.chat(AGENT, b.bob(), "hi").assert_status(200);
}

#[test]
fn instances_on_different_files_each_enforce_their_own_and_agree_on_the_same() {
    let redis = RedisServer::start();
    let w = Worker::start("w1");
    let tight = json!({"requests": {"rate": 1, "per": "1h", "burst": 2}});
    let shadowed = json!({"requests": {"rate": 1, "per": "1h", "burst": 2}, "mode": "shadow"});
    let files = on_redis(&w, json!(redis.url()), json!({}))
        .policy("standard", shadowed)
        .config(extra_keys(1))
        .write();
    let second = files.sibling();
    second.write_policies(&json!({"standard": tight.clone()}));
    // The second's file lacks the first's extra key.
    let mut narrower = second.config.clone();
    narrower["keys"].as_array_mut().unwrap().pop();
    second.write_config(&narrower);
    let (a, b) = (files.start(), second.start());
    let extra = "ak_extra_0_0123456789abcdef0123456789abcdef";

    // One bucket in Redis, judged by each instance's own policy: enforced on the second,
    // only counted on the first.
    for _ in 0..2 {
        b.chat(AGENT, b.jane(), "hi").assert_status(200);
    }
    b.chat(AGENT, b.jane(), "hi")
        .error(429, "rate_limit_exceeded");
    a.chat(AGENT, a.jane(), "hi").assert_status(200);
    // The second's reload of its narrower file takes nothing from the first.
    b.admin_post("/admin/reload", &json!({})).assert_status(200);
    a.chat(AGENT, extra, "hi").assert_status(200);
    b.chat(AGENT, extra, "hi").error(401, "invalid_api_key");

    // Once both load the same files, they agree.
    a.files.write_policies(&json!({"standard": tight}));
    a.admin_post("/admin/reload", &json!({})).assert_status(200);
    let mut same = a.files.config.clone();
    same["listen"] = b.files.config["listen"].clone();
    same["admin"] = b.files.config["admin"].clone();
    b.files.write_config(&same);
    b.admin_post("/admin/reload", &json!({})).assert_status(200);
    for gw in [&a, &b] {
        gw.chat(AGENT, gw.jane(), "hi")
            .error(429, "rate_limit_exceeded");
    }
    b.chat(AGENT, extra, "hi").assert_status(200);
}

#[test]
fn a_reload_sends_redis_nothing_per_key() {
    const KEYS: usize = 500;
    let redis = RedisServer::start();
    let w = Worker::start("w1");
    let gw = on_redis(&w, json!(redis.url()), json!({}))
        .config(extra_keys(KEYS))
        .start();
    let before = after_a_settled_call(&gw, &redis);
    gw.files.write_policies(&json!({
        "standard": {"requests": {"rate": 5, "per": "1s"}},
    }));
    gw.admin_post("/admin/reload", &json!({}))
        .assert_status(200);
    let during = commands_run(&redis) - before;
    // The background checks (seed marker, revocation count) run a couple of commands a
    // second; a key's record alone would be one or more for each of the 502 keys.
    assert!(
        during < 20,
        "{during} Redis commands for a reload of {} keys",
        KEYS + 2
    );
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
    assert_eq!(
        gw.chat(AGENT, gw.jane(), "hi")
            .int_header("ratelimit-limit"),
        5
    );
}

#[test]
fn a_restart_on_a_seeded_store_sends_redis_nothing_per_account() {
    const ACCOUNTS: usize = 300;
    let redis = RedisServer::start();
    let w = Worker::start("w1");
    let gw = on_redis(&w, json!(redis.url()), json!({}))
        .config(|c: &mut Value| {
            let accounts = c["accounts"].as_array_mut().unwrap();
            for i in 0..ACCOUNTS {
                accounts.push(json!({"id": format!("acct_extra_{i}"), "balance": 1000 + i}));
            }
        })
        .start();
    let before = after_a_settled_call(&gw, &redis);
    let spent = gw.admin_get("/admin/accounts/acct_jane/balance").json()["balance"].clone();
    gw.restart();
    let during = commands_run(&redis) - before;
    // A script for each of the 302 accounts would be over 600 commands.
    assert!(during < 40, "{during} Redis commands for a restart");
    // Balances as they were, not written again.
    assert_eq!(
        gw.admin_get("/admin/accounts/acct_jane/balance").json()["balance"],
        spent
    );
    assert_eq!(
        gw.admin_get("/admin/accounts/acct_extra_7/balance").json()["balance"],
        1007
    );
    // An account first listed across a restart gets its starting balance.
    let mut more = gw.files.config.clone();
    more["accounts"]
        .as_array_mut()
        .unwrap()
        .push(json!({"id": "acct_new", "balance": 4321}));
    gw.files.write_config(&more);
    gw.restart();
    assert_eq!(
        gw.admin_get("/admin/accounts/acct_new/balance").json()["balance"],
        4321
    );
}

#[test]
fn an_instance_that_finds_redis_seeded_by_another_after_a_loss_adds_what_it_knows() {
    let redis = RedisServer::start();
    let w = Worker::start("w1");
    let files = on_redis(&w, json!(redis.url()), json!({}))
        .config(|c: &mut Value| {
            c["accounts"]
                .as_array_mut()
                .unwrap()
                .push(json!({"id": "acct_only_a", "balance": 777}));
        })
        .write();
    let second = files.sibling();
    // The second instance's file lacks the first's extra account.
    let mut narrower = second.config.clone();
    narrower["accounts"].as_array_mut().unwrap().pop();
    second.write_config(&narrower);
    let a = files.start();
    a.admin_delete("/admin/keys/key_jane").assert_status(200);

    // Redis loses everything while the first instance is paused, and the second starts on
    // the empty Redis first: it seeds Redis (its own accounts, no revocations) and sets
    // the marker the first then finds.
    a.signal("STOP");
    redis.restart_empty();
    let b = second.start();
    b.chat(AGENT, b.jane(), "hi").assert_status(200);
    a.signal("CONT");

    wait_until(
        Duration::from_secs(10),
        "the first instance's revocation reaches the second",
        || b.chat(AGENT, b.jane(), "hi").status == 401,
    );
    wait_until(
        Duration::from_secs(10),
        "the first instance's own account is funded",
        || a.admin_get("/admin/accounts/acct_only_a/balance").json()["balance"] == 777,
    );
}
