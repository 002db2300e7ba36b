//! `turnpike check --config FILE` (SPEC §3): exit 0 on a good config, non-zero with every
//! error it found on a broken one.

use serde_json::json;

use crate::support::gateway::BINARY;
use crate::support::*;

fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn check_accepts_a_good_config() {
    let w = Worker::start("w1");
    let files = TestGateway::builder()
        .worker(&w)
        .policy(
            "agent-default",
            json!({"requests": {"rate": 500, "per": "1s"}, "mode": "shadow"}),
        )
        .agent_policy("agent-default")
        .write();
    let out = files.check();
    assert!(
        out.status.success(),
        "check failed on a good config:\n{}",
        output_text(&out)
    );
}

#[test]
fn check_reports_every_broken_reference() {
    let w = Worker::start("w1");
    let files = TestGateway::builder()
        .worker(&w)
        .config(|c| {
            c["agents"][1]["upstream"] = json!("nowhere_pool");
            c["keys"][0]["policy"] = json!("no_such_policy");
        })
        .write();
    let out = files.check();
    let text = output_text(&out);
    assert!(
        !out.status.success(),
        "check passed a broken config:\n{text}"
    );
    assert!(
        text.contains("nowhere_pool"),
        "the unknown upstream is not named:\n{text}"
    );
    assert!(
        text.contains("no_such_policy"),
        "the unknown policy is not named:\n{text}"
    );
}

#[test]
fn check_rejects_a_broken_policy_file() {
    let w = Worker::start("w1");
    let files = TestGateway::builder().worker(&w).write();
    files.write_policies_text("policies:\n  standard:\n    requests: {rate: 10, per: soon}\n");
    let out = files.check();
    let text = output_text(&out);
    assert!(
        !out.status.success(),
        "check passed a broken policy file:\n{text}"
    );
    assert!(!text.trim().is_empty(), "no message");
}

#[test]
fn check_rejects_yaml_that_does_not_parse() {
    let w = Worker::start("w1");
    let files = TestGateway::builder().worker(&w).write();
    std::fs::write(&files.config_path, "listen: [unclosed\nagents: {").unwrap();
    let out = files.check();
    assert!(!out.status.success(), "check passed unparsable YAML");
    assert!(!output_text(&out).trim().is_empty(), "no message");
}

#[test]
fn check_rejects_unknown_fields() {
    let w = Worker::start("w1");
    let files = TestGateway::builder()
        .worker(&w)
        .config(|c| c["upstreams"]["pool"]["endpionts"] = json!(["127.0.0.1:1"]))
        .write();
    let out = files.check();
    let text = output_text(&out);
    assert!(
        !out.status.success(),
        "check passed a misspelt field:\n{text}"
    );
    assert!(
        text.contains("endpionts"),
        "the misspelt field is not named:\n{text}"
    );
}

/// Runs `turnpike <args>` against the gateway's admin API with its token.
fn operator(gw: &TestGateway, args: &[&str]) -> std::process::Output {
    std::process::Command::new(BINARY)
        .args(args)
        .args(["--admin", &gw.admin_url(""), "--json"])
        .env("TURNPIKE_ADMIN_TOKEN", gw.admin_token())
        .output()
        .expect("running turnpike")
}

fn operator_json(gw: &TestGateway, args: &[&str]) -> serde_json::Value {
    let out = operator(gw, args);
    assert!(
        out.status.success(),
        "turnpike {args:?}:\n{}",
        output_text(&out)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "turnpike {args:?} printed no JSON ({e}):\n{}",
            output_text(&out)
        )
    })
}

#[test]
fn the_operator_cli_round_trips_keys_balances_and_usage() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();

    let created = operator_json(
        &gw,
        &[
            "keys",
            "create",
            "--account",
            "acct_bob",
            "--policy",
            "standard",
            "--agents",
            OTHER_AGENT,
        ],
    );
    let key = created["key"]
        .as_str()
        .expect("the secret is printed once")
        .to_string();
    let id = created["id"].as_str().expect("id").to_string();
    gw.chat(OTHER_AGENT, &key, Script::usage(3, 4))
        .assert_status(200);
    assert_eq!(
        operator_json(&gw, &["keys", "show", &id])["agents"],
        json!([OTHER_AGENT])
    );

    let usage = operator_json(&gw, &["usage", "--key", &id]);
    assert_eq!(
        (
            usage["requests"].as_u64(),
            usage["input_tokens"].as_u64(),
            usage["output_tokens"].as_u64()
        ),
        (Some(1), Some(3), Some(4))
    );

    assert_eq!(
        operator_json(&gw, &["balance", "set", "acct_bob", "70"])["balance"],
        70
    );
    assert_eq!(
        operator_json(&gw, &["balance", "add", "acct_bob", "5"])["balance"],
        75
    );
    assert_eq!(
        operator_json(&gw, &["balance", "get", "acct_bob"])["balance"],
        75
    );

    operator_json(&gw, &["keys", "revoke", &id]);
    gw.chat(OTHER_AGENT, &key, "hi")
        .error(401, "invalid_api_key");

    let missing = operator(&gw, &["balance", "get", "acct_nobody"]);
    assert!(!missing.status.success(), "an unknown account is an error");
    assert!(
        output_text(&missing).contains("not_found"),
        "{}",
        output_text(&missing)
    );
}

#[test]
fn the_operator_cli_refuses_a_wrong_token_and_hashes_keys() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let out = std::process::Command::new(BINARY)
        .args(["usage", "--admin", &gw.admin_url("")])
        .env("TURNPIKE_ADMIN_TOKEN", "not-the-token")
        .output()
        .expect("running turnpike");
    assert!(!out.status.success());
    assert!(output_text(&out).contains("401"), "{}", output_text(&out));

    let out = std::process::Command::new(BINARY)
        .args(["hash-key", "ak_test"])
        .output()
        .expect("running turnpike");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        sha256_hex("ak_test")
    );
}

#[test]
fn the_cli_reaches_accounts_and_keys_whose_ids_need_escaping() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .config(|c| {
            c["accounts"]
                .as_array_mut()
                .unwrap()
                .push(serde_json::json!({"id": "acct eu/1+x", "balance": 7}));
        })
        .start();
    let got = operator_json(&gw, &["balance", "get", "acct eu/1+x"]);
    assert_eq!(got["account"], "acct eu/1+x");
    assert_eq!(got["balance"], 7);
    let added = operator_json(&gw, &["balance", "add", "acct eu/1+x", "3"]);
    assert_eq!(added["balance"], 10);
    let made = operator_json(
        &gw,
        &[
            "keys",
            "create",
            "--account",
            "acct eu/1+x",
            "--policy",
            "standard",
            "--id",
            "key.a:b",
        ],
    );
    assert_eq!(made["id"], "key.a:b");
    assert_eq!(
        operator_json(&gw, &["keys", "show", "key.a:b"])["account"],
        "acct eu/1+x"
    );
    assert_eq!(
        operator_json(&gw, &["keys", "revoke", "key.a:b"])["revoked"],
        true
    );
}
