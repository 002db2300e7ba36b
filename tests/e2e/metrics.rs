//! `/metrics` as a dashboard and an alert see it (SPEC §4): counters over known label sets
//! at zero from the start, per-endpoint health, process metrics, and text that Prometheus's
//! own checker accepts.

use serde_json::json;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::*;

/// The samples of `name` whose labels include `labels`: empty when the series is absent,
/// which a dashboard shows as "no data" and `rate()` cannot count from.
fn samples(text: &str, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            let (series, _) = line.rsplit_once(' ').unwrap_or((line, ""));
            let sample_name = series.split('{').next().unwrap_or_default();
            sample_name == name
                && labels
                    .iter()
                    .all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|line| line.rsplit_once(' ')?.1.parse().ok())
        .collect()
}

#[track_caller]
fn assert_zero(text: &str, name: &str, labels: &[(&str, &str)]) {
    let found = samples(text, name, labels);
    assert!(
        !found.is_empty() && found.iter().all(|v| *v == 0.0),
        "{name}{labels:?}: expected series at 0, found {found:?}"
    );
}

#[test]
fn counters_over_known_label_sets_are_exported_at_zero_from_the_start() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    // The harness's readiness probe was a connection to the data port: counted open until
    // the gateway sees it closed.
    // (Read from the same answer the rest is: a probe connection still being closed may be
    // counted again between two reads.)
    let mut text = String::new();
    wait_until(Duration::from_secs(5), "no connection counted open", || {
        text = gw.metrics();
        metric_value(&text, "turnpike_open_connections", &[]) == 0.0
    });
    for agent in [AGENT, OTHER_AGENT] {
        assert_zero(
            &text,
            "turnpike_insufficient_balance_total",
            &[("agent", agent)],
        );
        assert_zero(&text, "turnpike_cost_total", &[("agent", agent)]);
        for status in ["200", "402", "429", "502", "503", "504"] {
            let labels = [("agent", agent), ("status", status)];
            assert_zero(&text, "turnpike_requests_total", &labels);
        }
        for kind in ["input", "output"] {
            assert_zero(
                &text,
                "turnpike_tokens_total",
                &[("agent", agent), ("kind", kind)],
            );
        }
        for bucket in ["requests", "tokens", "concurrency"] {
            let labels = [("agent", agent), ("bucket", bucket), ("shadow", "false")];
            assert_zero(&text, "turnpike_rate_limited_total", &labels);
        }
        let labels = [("agent", agent), ("action", "rejected")];
        assert_zero(&text, "turnpike_invalid_usage_total", &labels);
    }
    for status in ["401", "404", "431"] {
        let labels = [("agent", "-"), ("status", status)];
        assert_zero(&text, "turnpike_requests_total", &labels);
    }
    for reason in ["missing", "invalid", "admin"] {
        assert_zero(&text, "turnpike_auth_failures_total", &[("reason", reason)]);
    }
    for op in ["key", "admit", "settle"] {
        assert_zero(&text, "turnpike_store_errors_total", &[("op", op)]);
    }
    assert_zero(
        &text,
        "turnpike_config_reloads_total",
        &[("result", "error")],
    );
    assert_zero(&text, "turnpike_store_settlements_dropped_total", &[]);
    assert_zero(&text, "turnpike_draining", &[]);
    assert_zero(&text, "turnpike_open_connections", &[]);
    let endpoint = w.addr();
    for outcome in ["answered", "connect_failed", "timed_out"] {
        let labels = [
            ("pool", "pool"),
            ("endpoint", endpoint.as_str()),
            ("outcome", outcome),
        ];
        assert_zero(&text, "turnpike_upstream_attempts_total", &labels);
    }
    assert_eq!(
        samples(
            &text,
            "turnpike_upstream_endpoint_up",
            &[("endpoint", &endpoint)]
        ),
        vec![1.0]
    );
    let rss = samples(&text, "process_resident_memory_bytes", &[]);
    assert!(
        rss.iter().any(|v| *v > 1e6),
        "process_resident_memory_bytes {rss:?}"
    );
    // A first refusal then counts from 0 to 1, which `rate()` sees.
    gw.chat(AGENT, "ak_wrong", "hi").assert_status(401);
    gw.wait_metric(
        "turnpike_auth_failures_total",
        &[("reason", "invalid")],
        1.0,
    );
}

#[test]
fn an_agent_a_reload_adds_is_exported_at_zero_at_once() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let mut config = gw.files.config.clone();
    config["agents"]
        .as_array_mut()
        .unwrap()
        .push(json!({"id": "ag_added_by_reload", "upstream": "pool"}));
    gw.files.write_config(&config);
    gw.admin_post("/admin/reload", &json!({}))
        .assert_status(200);
    let text = gw.metrics();
    let labels = [("agent", "ag_added_by_reload"), ("status", "429")];
    assert_zero(&text, "turnpike_requests_total", &labels);
}

#[test]
fn an_endpoint_that_refuses_connections_is_counted_and_shown_down() {
    let w = Worker::start("w1");
    let dead = format!("127.0.0.1:{}", free_port());
    let gw = TestGateway::builder().worker(&w).endpoint(&dead).start();
    // Round robin: within a few calls one is tried on the dead endpoint first, and is then
    // answered by the live one.
    for _ in 0..4 {
        gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
    }
    let text = gw.metrics();
    let dead_labels = [("endpoint", dead.as_str()), ("outcome", "connect_failed")];
    let failed: f64 = samples(&text, "turnpike_upstream_attempts_total", &dead_labels)
        .iter()
        .sum();
    assert!(failed >= 1.0, "connect_failed on {dead}: {failed}");
    assert_eq!(
        samples(
            &text,
            "turnpike_upstream_endpoint_up",
            &[("endpoint", &dead)]
        ),
        vec![0.0]
    );
    let live = w.addr();
    let live_up = |text: &str| {
        samples(
            text,
            "turnpike_upstream_endpoint_up",
            &[("endpoint", &live)],
        )
    };
    assert_eq!(live_up(&text), vec![1.0]);
    // A reload that removes the dead endpoint removes its series: no stale "down" alert.
    let mut config = gw.files.config.clone();
    config["upstreams"]["pool"]["endpoints"] = json!([live]);
    gw.files.write_config(&config);
    gw.admin_post("/admin/reload", &json!({}))
        .assert_status(200);
    let text = gw.metrics();
    assert!(!text.contains(&dead), "series of a removed endpoint remain");
    assert_eq!(live_up(&text), vec![1.0]);
}

/// `promtool check metrics` (Prometheus's own linter: names, help, types, units) on a live
/// `/metrics` after some traffic. scripts/test installs promtool (Debian's `prometheus`).
#[test]
fn promtool_accepts_the_live_metrics() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
    gw.chat(AGENT, "ak_wrong", "hi").assert_status(401);
    let text = gw.metrics();
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's `prometheus` package; scripts/test installs it)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// No series names a key unless the operator asks (`metrics.per_key`); then requests and
/// tokens are counted per key id.
#[test]
fn per_key_series_exist_only_when_the_config_turns_them_on() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
    let text = gw.metrics();
    assert!(
        !text.contains("key_jane"),
        "a key id in /metrics by default"
    );

    let gw = TestGateway::builder()
        .worker(&w)
        .config(|c| c["metrics"] = json!({"per_key": true}))
        .start();
    let r = gw.chat(AGENT, gw.jane(), "hi");
    r.assert_status(200);
    let input = r.json()["usage"]["input_tokens"].as_f64().unwrap();
    // Counted as the call ends, just after its answer: tokens last.
    gw.wait_metric(
        "turnpike_key_tokens_total",
        &[("key", "key_jane"), ("kind", "input")],
        input,
    );
    let text = gw.metrics();
    let labels = [("key", "key_jane"), ("status", "200")];
    assert_eq!(
        samples(&text, "turnpike_key_requests_total", &labels),
        vec![1.0]
    );
}

/// A worker's statuses become label values only as their class, beside the gateway's own
/// codes: whatever workers answer, the series stay bounded.
#[test]
fn worker_statuses_the_gateway_never_answers_are_counted_by_class() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    for status in [201, 299, 418, 451, 500, 599] {
        gw.chat(AGENT, gw.jane(), Script::status(status))
            .assert_status(status);
    }
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
    for (class, count) in [("2xx", 2.0), ("4xx", 2.0), ("5xx", 2.0), ("200", 1.0)] {
        gw.wait_metric(
            "turnpike_requests_total",
            &[("agent", AGENT), ("status", class)],
            count,
        );
    }
    let text = gw.metrics();
    for raw in ["201", "299", "418", "451", "500", "599"] {
        assert!(
            samples(&text, "turnpike_requests_total", &[("status", raw)]).is_empty(),
            "status {raw} has a series of its own"
        );
    }
}
