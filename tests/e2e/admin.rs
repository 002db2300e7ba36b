//! The admin listener (SPEC §4): open health and metrics, everything else behind the admin
//! token; keys, balances, usage; secrets never leak.

use std::time::Duration;

use serde_json::json;

use crate::support::*;

#[test]
fn health_readiness_and_metrics_are_open() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    gw.open_get("/healthz").assert_status(200);
    gw.open_get("/readyz").assert_status(200);
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
    let r = gw.open_get("/metrics");
    r.assert_status(200);
    assert!(
        r.header("content-type")
            .unwrap_or("")
            .starts_with("text/plain"),
        "metrics content-type {:?}",
        r.header("content-type")
    );
    gw.usage_after("", 1);
    gw.wait_metric(
        "turnpike_requests_total",
        &[("agent", AGENT), ("status", "200")],
        1.0,
    );
    let text = gw.metrics();
    assert_eq!(
        metric_value(
            &text,
            "turnpike_requests_total",
            &[("agent", AGENT), ("status", "200")]
        ),
        1.0
    );
    assert!(metric_value(&text, "turnpike_request_duration_seconds_count", &[]) >= 1.0);
    assert!(metric_value(&text, "turnpike_upstream_duration_seconds_count", &[]) >= 1.0);
    assert!(
        text.contains("turnpike_inflight_requests"),
        "no turnpike_inflight_requests gauge"
    );
    assert_eq!(metric_value(&text, "turnpike_inflight_requests", &[]), 0.0);
}

#[test]
fn admin_endpoints_refuse_missing_and_wrong_tokens() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let wrong = format!("Bearer {}", random_hex(12));
    let token_as_is = gw.admin_token().to_string();
    let basic = format!("Basic {}", gw.admin_token());
    let bad_auths: [Option<&str>; 4] = [None, Some(&wrong), Some(&token_as_is), Some(&basic)];
    let calls: [(&str, &str, Option<serde_json::Value>); 7] = [
        ("GET", "/admin/accounts/acct_jane/balance", None),
        (
            "POST",
            "/admin/accounts/acct_jane/balance",
            Some(json!({"set": 999_999_999})),
        ),
        ("GET", "/admin/usage", None),
        (
            "POST",
            "/admin/keys",
            Some(json!({"account": "acct_jane", "agents": "*", "policy": "standard"})),
        ),
        ("GET", "/admin/keys/key_jane", None),
        ("DELETE", "/admin/keys/key_jane", None),
        ("POST", "/admin/reload", None),
    ];
    for (method, path, body) in &calls {
        for auth in bad_auths {
            let r = gw.admin_call(method, path, auth, body.as_ref());
            assert_eq!(r.status, 401, "{method} {path} with {auth:?}: {}", r.body);
        }
    }
    // Nothing happened.
    assert_eq!(gw.balance("acct_jane").balance, 10_000_000);
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
}

#[test]
fn balances_can_be_read_added_to_and_set() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).balance(500).start();
    let r = gw.admin_get("/admin/accounts/acct_jane/balance");
    r.assert_status(200);
    assert_eq!(
        r.json(),
        json!({"account": "acct_jane", "balance": 500, "reserved": 0})
    );

    let r = gw.admin_post("/admin/accounts/acct_jane/balance", &json!({"add": 250}));
    r.assert_status(200);
    assert_eq!(r.json()["balance"], 750);
    assert_eq!(
        gw.balance("acct_jane"),
        Balance {
            balance: 750,
            reserved: 0
        }
    );

    let r = gw.admin_post("/admin/accounts/acct_jane/balance", &json!({"set": 0}));
    r.assert_status(200);
    assert_eq!(r.json()["balance"], 0);
    gw.chat(AGENT, gw.jane(), "hi")
        .error(402, "insufficient_balance");

    let r = gw.admin_post("/admin/accounts/acct_jane/balance", &json!({"set": 42}));
    r.assert_status(200);
    assert_eq!(r.json()["balance"], 42);
    assert_eq!(
        gw.balance("acct_jane"),
        Balance {
            balance: 42,
            reserved: 0
        }
    );
    assert_eq!(
        gw.balance("acct_bob").balance,
        500,
        "only the named account changed"
    );
    gw.chat(AGENT, gw.jane(), Script::usage(1, 1))
        .assert_status(200);
    assert_eq!(gw.settled_balance("acct_jane").balance, 39);
}

#[test]
fn a_key_is_created_used_inspected_and_revoked() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let r = gw.admin_post(
        "/admin/keys",
        &json!({"account": "acct_bob", "agents": [OTHER_AGENT], "policy": "standard"}),
    );
    r.assert_status(201);
    let created = r.json();
    let id = created["id"].as_str().expect("id").to_string();
    let key = created["key"].as_str().expect("key").to_string();
    assert!(!id.is_empty());
    assert!(key.starts_with("ak_") && key.len() > 10, "key {key:?}");
    assert_eq!(created["account"], "acct_bob");
    assert_eq!(created["agents"], json!([OTHER_AGENT]));
    assert_eq!(created["policy"], "standard");

    gw.chat(OTHER_AGENT, &key, "hi").assert_status(200);
    assert_eq!(w.last().header("x-key-id"), Some(id.as_str()));
    // A generated key carries a checksum: a typo is refused like any unknown key.
    let mut typo = key.clone().into_bytes();
    typo[10] = if typo[10] == b'x' { b'y' } else { b'x' };
    gw.chat(OTHER_AGENT, &String::from_utf8(typo).unwrap(), "hi")
        .error(401, "invalid_api_key");
    assert_eq!(w.last().header("x-account-id"), Some("acct_bob"));
    gw.chat(AGENT, &key, "hi").error(404, "agent_not_found");

    let r = gw.admin_get(&format!("/admin/keys/{id}"));
    r.assert_status(200);
    assert_eq!(r.json()["id"], id.as_str());
    assert_eq!(r.json()["account"], "acct_bob");
    assert!(
        !r.body.contains(&key),
        "GET /admin/keys shows the secret: {}",
        r.body
    );

    let r = gw.admin_delete(&format!("/admin/keys/{id}"));
    assert!(
        (200..300).contains(&r.status),
        "revoke: {} {}",
        r.status,
        r.body
    );
    wait_until(Duration::from_secs(1), "the revoked key is refused", || {
        gw.chat(OTHER_AGENT, &key, "hi").status == 401
    });
    gw.chat(OTHER_AGENT, &key, "hi")
        .error(401, "invalid_api_key");
    gw.chat(OTHER_AGENT, gw.bob(), "hi").assert_status(200);
}

#[test]
fn a_key_can_be_created_with_a_chosen_id_and_config_keys_can_be_revoked() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let r = gw.admin_post(
        "/admin/keys",
        &json!({"id": "key_custom_1", "account": "acct_jane", "agents": "*", "policy": "standard"}),
    );
    r.assert_status(201);
    assert_eq!(r.json()["id"], "key_custom_1");
    let key = r.json()["key"].as_str().unwrap().to_string();
    gw.chat(AGENT, &key, "hi").assert_status(200);
    assert_eq!(w.last().header("x-key-id"), Some("key_custom_1"));

    let r = gw.admin_get("/admin/keys/key_jane");
    r.assert_status(200);
    assert_eq!(r.json()["account"], "acct_jane");
    assert!(!r.body.contains(gw.jane()));
    let r = gw.admin_delete("/admin/keys/key_jane");
    assert!(
        (200..300).contains(&r.status),
        "revoke: {} {}",
        r.status,
        r.body
    );
    wait_until(
        Duration::from_secs(1),
        "the revoked config key is refused",
        || gw.chat(AGENT, gw.jane(), "hi").status == 401,
    );
}

#[test]
fn revoking_an_id_a_later_file_gave_a_config_key_revokes_the_admin_made_key_too() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let r = gw.admin_post(
        "/admin/keys",
        &json!({"id": "key_shared_id", "account": "acct_jane", "agents": "*", "policy": "standard"}),
    );
    r.assert_status(201);
    let made = r.json()["key"].as_str().unwrap().to_string();
    // A later file lists a config key under the same id (a different secret).
    let mut config = gw.files.config.clone();
    config["keys"].as_array_mut().unwrap().push(json!({
        "id": "key_shared_id",
        "sha256": sha256_hex("ak_shared_id_0123456789abcdef0123456789ab"),
        "account": "acct_jane",
        "agents": "*",
    }));
    gw.files.write_config(&config);
    gw.admin_post("/admin/reload", &json!({}))
        .assert_status(200);
    gw.chat(AGENT, &made, "hi").assert_status(200);

    gw.admin_delete("/admin/keys/key_shared_id")
        .assert_status(200);
    wait_until(Duration::from_secs(2), "both keys are refused", || {
        gw.chat(AGENT, &made, "hi").status == 401
            && gw
                .chat(AGENT, "ak_shared_id_0123456789abcdef0123456789ab", "hi")
                .status
                == 401
    });
}

#[test]
fn secrets_never_appear_in_logs_metrics_or_admin_answers() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
    gw.chat(OTHER_AGENT, gw.jane(), "hi")
        .error(404, "agent_not_found");
    gw.chat(OTHER_AGENT, gw.bob(), Script::status(500))
        .assert_status(500);
    gw.usage_after("", 1);
    let text = gw.metrics();
    let usage = gw.admin_get("/admin/usage").body;
    let key_info = gw.admin_get("/admin/keys/key_jane").body;
    // Log lines are written in batches: wait for the access lines of the calls above.
    wait_until(Duration::from_secs(2), "access lines in the log", || {
        gw.log().matches("key_jane").count() >= 2
    });
    let log = gw.log();
    for (name, secret) in [
        ("jane's key", gw.jane()),
        ("bob's key", gw.bob()),
        ("admin token", gw.admin_token()),
    ] {
        assert!(!text.contains(secret), "{name} in /metrics");
        assert!(!usage.contains(secret), "{name} in /admin/usage");
        assert!(!key_info.contains(secret), "{name} in /admin/keys");
        assert!(!log.contains(secret), "{name} in the gateway log");
    }
}

#[test]
fn refusals_are_counted_in_metrics() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .account_balance("acct_jane", 0)
        .start();
    gw.call(AGENT).send().error(401, "missing_api_key");
    gw.chat(AGENT, &new_key(), "hi")
        .error(401, "invalid_api_key");
    gw.chat(AGENT, &new_key(), "hi")
        .error(401, "invalid_api_key");
    gw.chat(AGENT, gw.jane(), "hi")
        .error(402, "insufficient_balance");
    gw.chat(AGENT, gw.jane(), "hi")
        .error(402, "insufficient_balance");
    gw.wait_metric(
        "turnpike_requests_total",
        &[("agent", AGENT), ("status", "402")],
        2.0,
    );
    gw.wait_metric("turnpike_auth_failures_total", &[], 3.0);
    let text = gw.metrics();
    assert_eq!(
        metric_value(&text, "turnpike_auth_failures_total", &[]),
        3.0
    );
    assert_eq!(
        metric_value(
            &text,
            "turnpike_insufficient_balance_total",
            &[("agent", AGENT)]
        ),
        2.0
    );
    assert_eq!(
        metric_value(
            &text,
            "turnpike_requests_total",
            &[("agent", AGENT), ("status", "402")]
        ),
        2.0
    );
}

#[test]
fn a_created_key_whose_policy_is_reloaded_away_is_refused() {
    let w = Worker::start("w1");
    let other = json!({"requests": {"rate": 1000, "per": "1s"}});
    // Config keys use `other`, which stays; `standard` only backs the key made below.
    let gw = TestGateway::builder()
        .worker(&w)
        .policy("other", other.clone())
        .key_policy("other")
        .start();
    let r = gw.admin_post(
        "/admin/keys",
        &json!({"account": "acct_bob", "agents": "*", "policy": "standard"}),
    );
    r.assert_status(201);
    let key = r.json()["key"].as_str().expect("key").to_string();
    gw.chat(OTHER_AGENT, &key, "hi").assert_status(200);

    gw.files.write_policies(&json!({ "other": other }));
    gw.admin_post("/admin/reload", &json!({}))
        .assert_status(200);
    gw.chat(OTHER_AGENT, &key, "hi")
        .error(401, "invalid_api_key");
    gw.chat(AGENT, &key, "hi").error(401, "invalid_api_key");
    assert_eq!(w.count(), 1, "the key without a policy reached the worker");
    // The config keys, on the policy that stayed, still work.
    gw.chat(OTHER_AGENT, gw.bob(), "hi").assert_status(200);
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
}

#[test]
fn a_revoked_key_is_shown_revoked_and_never_with_its_secret() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let r = gw.admin_post(
        "/admin/keys",
        &json!({"account": "acct_jane", "agents": "*", "policy": "standard"}),
    );
    r.assert_status(201);
    let id = r.json()["id"].as_str().expect("id").to_string();
    let key = r.json()["key"].as_str().expect("key").to_string();
    let before = gw.admin_get(&format!("/admin/keys/{id}"));
    before.assert_status(200);
    assert_ne!(
        before.json()["revoked"],
        json!(true),
        "revoked before DELETE: {}",
        before.body
    );

    for (id, secret) in [(id.as_str(), key.as_str()), ("key_jane", gw.jane())] {
        let r = gw.admin_delete(&format!("/admin/keys/{id}"));
        assert!(
            (200..300).contains(&r.status),
            "revoke {id}: {} {}",
            r.status,
            r.body
        );
        assert!(
            !r.body.contains(secret),
            "DELETE shows the secret: {}",
            r.body
        );
        let r = gw.admin_get(&format!("/admin/keys/{id}"));
        r.assert_status(200);
        assert_eq!(r.json()["id"], id, "{}", r.body);
        assert_eq!(
            r.json()["revoked"],
            json!(true),
            "GET after DELETE: {}",
            r.body
        );
        assert!(
            !r.body.contains(secret),
            "GET /admin/keys/{id} shows the secret: {}",
            r.body
        );
        gw.chat(AGENT, secret, "hi").error(401, "invalid_api_key");
    }
    assert_eq!(w.count(), 0);
}

#[test]
fn admin_405_answers_say_which_methods_are_allowed() {
    let gw = TestGateway::builder().endpoint("127.0.0.1:9").start();
    let auth = format!("Bearer {}", gw.admin_token());
    for (method, path, allow) in [
        ("GET", "/admin/reload", "POST"),
        ("GET", "/admin/keys", "POST"),
        ("POST", "/admin/usage", "GET"),
        ("DELETE", "/admin/policies", "GET"),
        ("POST", "/admin/keys/key_jane", "GET, DELETE"),
        ("DELETE", "/admin/accounts/acct_jane/balance", "GET, POST"),
    ] {
        let r = gw.admin_call(method, path, Some(&auth), None);
        r.error(405, "method_not_allowed");
        assert_eq!(r.header("allow"), Some(allow), "{method} {path}");
    }
}
