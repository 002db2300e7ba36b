//! `turnpike check --config FILE` (SPEC §3): exit 0 on a good config, non-zero with every
//! error it found on a broken one.

use serde_json::json;

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
