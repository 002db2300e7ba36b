//! The shipped dashboard and alert rules against a real Prometheus scraping a live gateway
//! under a little traffic: every dashboard query and alert expression parses and runs, the
//! panels that should have data do, the rules evaluate without error and stay quiet on a
//! healthy gateway, and an alert fires on the first refused reload (which only works because
//! the counter is exported at zero from the start).

use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;

use crate::support::prometheus::Prometheus;
use crate::support::redis::StoreUnderTest;
use crate::support::*;

fn repo_file(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Every query of the dashboard: (panel title, expr with the dashboard's variables set as
/// Grafana would for "All" and a 1m rate interval).
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo_file("deploy/grafana/turnpike.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut queries = Vec::new();
    collect_queries(&dashboard["panels"], &mut queries);
    assert!(queries.len() >= 15, "only {} queries", queries.len());
    queries
        .into_iter()
        .map(|(title, expr)| {
            let expr = expr
                .replace("${job}", ".*")
                .replace("$job", ".*")
                .replace("${agent}", ".*")
                .replace("$agent", ".*")
                .replace("$__rate_interval", "1m");
            (title, expr)
        })
        .collect()
}

fn collect_queries(panels: &Value, out: &mut Vec<(String, String)>) {
    for panel in panels.as_array().into_iter().flatten() {
        let title = panel["title"].as_str().unwrap_or_default().to_owned();
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                out.push((title.clone(), expr.to_owned()));
            }
        }
        collect_queries(&panel["panels"], out);
    }
}

/// Every alert rule of the shipped file: (name, expr).
fn alert_rules() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo_file("deploy/prometheus/alerts.yml")).unwrap();
    let rules: Value = serde_yaml_ng::from_str(&text).unwrap();
    let mut out = Vec::new();
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            out.push((
                rule["alert"].as_str().unwrap().to_owned(),
                rule["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    assert!(out.len() >= 10, "only {} alert rules", out.len());
    out
}

/// Panels allowed to be empty under this test's traffic, by a word of their query: nothing
/// was refused in shadow mode, and the embedded store makes no store round trips.
fn may_be_empty(expr: &str) -> bool {
    expr.contains("shadow=\"true\"")
        // Only with a TLS listener, which this gateway has not.
        || expr.contains("turnpike_tls_")
        || (StoreUnderTest::from_env() == StoreUnderTest::Memory
            && expr.contains("turnpike_store_duration_seconds"))
}

#[test]
fn the_dashboard_and_alerts_work_against_a_real_prometheus() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let prometheus =
        Prometheus::scraping(gw.admin_port(), &repo_file("deploy/prometheus/alerts.yml"));
    wait_until(
        Duration::from_secs(30),
        "Prometheus scrapes the gateway",
        || prometheus.query("up{job=\"turnpike\"} == 1").len() == 1,
    );
    // A little traffic of every common kind, spread over several scrapes.
    for round in 0..4 {
        for _ in 0..10 {
            gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
        }
        gw.chat(AGENT, "ak_wrong", "hi").assert_status(401);
        if round == 0 {
            // One worker error in about 45 calls: under the 5% the 5xx alert watches.
            gw.chat(AGENT, gw.jane(), Script::status(500))
                .assert_status(500);
            gw.chat(OTHER_AGENT, gw.bob(), "hi").assert_status(200);
        }
        std::thread::sleep(Duration::from_millis(1200));
    }
    wait_until(
        Duration::from_secs(20),
        "Prometheus has the traffic",
        || {
            prometheus
                .query("sum(turnpike_requests_total{status=\"200\"}) >= 41")
                .len()
                == 1
        },
    );

    let mut empty = Vec::new();
    for (title, expr) in dashboard_queries() {
        let result = prometheus.query(&expr);
        if result.is_empty() && !may_be_empty(&expr) {
            empty.push(format!("{title}: {expr}"));
        }
    }
    assert!(
        empty.is_empty(),
        "panels with no data:\n{}",
        empty.join("\n")
    );

    for (name, expr) in alert_rules() {
        // Runs (`query` panics on an error); healthy, so no rule's condition holds.
        let holds = prometheus.query(&expr);
        assert!(
            holds.is_empty(),
            "{name} holds on a healthy gateway: {holds:?}"
        );
    }
    wait_until(
        Duration::from_secs(20),
        "every rule evaluated without error",
        || {
            let groups = prometheus.api("rules", &[]);
            let rules: Vec<&Value> = groups["groups"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|g| g["rules"].as_array().unwrap())
                .collect();
            !rules.is_empty() && rules.iter().all(|r| r["health"] == "ok")
        },
    );
    let alerts = prometheus.api("alerts", &[]);
    assert_eq!(
        alerts["alerts"],
        json!([]),
        "a healthy gateway raised alerts"
    );

    // The first refused reload: the error counter goes from 0 to 1 and the alert fires.
    gw.files
        .write_policies_text("policies: {standard: {requests: {rate: -1, per: 1s}}}\n");
    let refused = gw.admin_post("/admin/reload", &json!({}));
    assert!(refused.status >= 400, "{}", refused.status);
    wait_until(
        Duration::from_secs(30),
        "TurnpikeConfigReloadFailed fires",
        || {
            let alerts = prometheus.api("alerts", &[]);
            alerts["alerts"].as_array().unwrap().iter().any(|a| {
                a["labels"]["alertname"] == "TurnpikeConfigReloadFailed" && a["state"] == "firing"
            })
        },
    );
}

/// `promtool check rules` and `promtool test rules`: each alert fires on its synthetic series
/// and stays quiet on a healthy one (deploy/prometheus/alerts_test.yml).
#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ] {
        let out = std::process::Command::new("promtool")
            .args(args)
            .current_dir(repo_file("deploy/prometheus"))
            .output()
            .expect("promtool (Debian's `prometheus` package; scripts/test installs it)");
        assert!(
            out.status.success(),
            "promtool {}: {}\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
