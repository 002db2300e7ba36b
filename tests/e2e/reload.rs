//! Policy reloads (SPEC §3): on `POST /admin/reload` and on file change; a broken set is
//! refused whole; rate-limit state survives.

use std::time::Duration;

use serde_json::json;

use crate::support::*;

#[test]
fn admin_reload_puts_new_policies_in_force() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    for _ in 0..3 {
        gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
    }
    gw.files.write_policies(&json!({
        "standard": {"requests": {"rate": 1, "per": "1m", "burst": 1}},
    }));
    let r = gw.admin_post("/admin/reload", &json!({}));
    r.assert_status(200);
    // At most one call fits the new limit (more, if the old bucket state is carried over with
    // a level the new burst caps at 1).
    let statuses: Vec<u16> = (0..3)
        .map(|_| gw.chat(AGENT, gw.jane(), "hi").status)
        .collect();
    assert!(
        statuses == [200, 429, 429] || statuses == [429, 429, 429],
        "after reload: {statuses:?}"
    );
}

#[test]
fn a_policy_file_changed_under_traffic_is_in_force_within_2s_and_no_call_fails() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (statuses, changed_after) = std::thread::scope(|s| {
        let traffic: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    let mut statuses = Vec::new();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        statuses.push(gw.chat(AGENT, gw.jane(), "hi").status);
                    }
                    statuses
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        gw.files.write_policies(&json!({
            "standard": {"requests": {"rate": 2000, "per": "1s"}},
        }));
        let written = std::time::Instant::now();
        wait_until(Duration::from_secs(5), "the new limit shows", || {
            gw.chat(AGENT, gw.jane(), "hi").header("ratelimit-limit") == Some("2000")
        });
        let changed_after = written.elapsed();
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let statuses: Vec<u16> = traffic
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        (statuses, changed_after)
    });
    assert!(
        changed_after < Duration::from_secs(2),
        "in force after {changed_after:?}"
    );
    assert!(
        statuses.len() > 20,
        "traffic flowed: {} calls",
        statuses.len()
    );
    assert!(
        statuses.iter().all(|s| *s == 200),
        "a call failed: {statuses:?}"
    );
}

#[test]
fn a_broken_policy_set_is_refused_whole_and_the_old_one_stays() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .policy(
            "standard",
            json!({"requests": {"rate": 1, "per": "1m", "burst": 2}}),
        )
        .start();
    // A looser `standard` next to a broken policy: none of it may apply.
    gw.files.write_policies_text(
        "policies:\n  standard:\n    requests: {rate: 1000, per: 1s}\n  broken:\n    requests: {rate: -5, per: soon}\n",
    );
    let r = gw.admin_post("/admin/reload", &json!({}));
    // A 4xx that means "refused", not "no such endpoint" or "not allowed".
    assert!(
        (400..500).contains(&r.status) && ![401, 403, 404, 405].contains(&r.status),
        "reload of a broken set: {} {}",
        r.status,
        r.body
    );
    assert!(!r.body.trim().is_empty(), "the refusal carries the errors");
    assert_eq!(
        gw.metric("turnpike_config_reloads_total", &[("result", "error")]),
        1.0,
        "a refused reload is counted"
    );
    // Log lines are written in batches (within 200 ms).
    wait_until(
        Duration::from_secs(2),
        "the error is logged with its file and line",
        || gw.log().contains("policies.yaml:5:"),
    );
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
    gw.chat(AGENT, gw.jane(), "hi")
        .error(429, "rate_limit_exceeded");
}

#[test]
fn rate_limit_state_survives_a_reload() {
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
    gw.admin_post("/admin/reload", &json!({}))
        .assert_status(200);
    gw.chat(AGENT, gw.jane(), "hi")
        .error(429, "rate_limit_exceeded");
    assert_eq!(w.count(), 2);
}

#[test]
fn a_changed_policy_file_is_picked_up_without_asking() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
    gw.files.write_policies(&json!({
        "standard": {"requests": {"rate": 1, "per": "1h", "burst": 1}},
    }));
    wait_until(
        Duration::from_secs(10),
        "the new policy file is in force",
        || {
            std::thread::sleep(Duration::from_millis(100));
            gw.chat(AGENT, gw.jane(), "hi").status == 429
        },
    );
}

#[test]
fn the_config_generation_counts_successful_reloads() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let text = gw.metrics();
    assert_eq!(
        metric_value(&text, "turnpike_config_generation", &[]),
        1.0,
        "generation at start"
    );
    let started_at = metric_value(&text, "turnpike_config_last_success_timestamp_seconds", &[]);
    assert!(started_at > 0.0, "last success at start: {started_at}");
    gw.admin_post("/admin/reload", &json!({}))
        .assert_status(200);
    let text = gw.metrics();
    assert_eq!(
        metric_value(&text, "turnpike_config_generation", &[]),
        2.0,
        "generation after one reload"
    );
    let reloaded_at = metric_value(&text, "turnpike_config_last_success_timestamp_seconds", &[]);
    assert!(
        reloaded_at >= started_at,
        "last success went back from {started_at} to {reloaded_at}"
    );
}

#[test]
fn sighup_reloads_even_when_no_file_changed() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    assert_eq!(gw.metric("turnpike_config_generation", &[]), 1.0);
    // Nothing changed on disk, so the file watcher has no reason to reload: only SIGHUP can.
    gw.signal("HUP");
    wait_until(
        Duration::from_secs(2),
        "SIGHUP moves the config generation to 2",
        || {
            assert!(gw.exited().is_none(), "the gateway died of SIGHUP");
            gw.metric("turnpike_config_generation", &[]) == 2.0
        },
    );
    // ... and it was one reload: once the watcher has seen a later change on disk (so it has
    // handled everything that came before it), the count is one more, not two.
    gw.files.write_policies(&json!({
        "standard": {"requests": {"rate": 999, "per": "1s"}},
    }));
    wait_until(
        Duration::from_secs(5),
        "the watcher puts the changed policy in force",
        || gw.chat(AGENT, gw.jane(), "hi").header("ratelimit-limit") == Some("999"),
    );
    assert_eq!(gw.metric("turnpike_config_generation", &[]), 3.0);
    assert!(gw.exited().is_none(), "the gateway died of SIGHUP");
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
}

#[test]
fn sighup_puts_a_changed_policy_in_force() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
    gw.files.write_policies(&json!({
        "standard": {"requests": {"rate": 1, "per": "1h", "burst": 1}},
    }));
    gw.signal("HUP");
    wait_until(
        Duration::from_secs(2),
        "the new limit is in force after SIGHUP",
        || {
            assert!(gw.exited().is_none(), "the gateway died of SIGHUP");
            gw.chat(AGENT, gw.jane(), "hi").status == 429
        },
    );
    assert!(gw.metric("turnpike_config_generation", &[]) >= 2.0);
}

#[test]
fn a_key_deleted_from_the_config_file_is_refused_after_a_reload() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
    let mut config = gw.files.config.clone();
    let keys = config["keys"].as_array_mut().expect("keys");
    keys.retain(|k| k["id"] != "key_jane");
    gw.files.write_config(&config);
    gw.admin_post("/admin/reload", &json!({}))
        .assert_status(200);
    gw.chat(AGENT, gw.jane(), "hi")
        .error(401, "invalid_api_key");
    gw.admin_get("/admin/keys/key_jane").assert_status(404);
    gw.chat(OTHER_AGENT, gw.bob(), "hi").assert_status(200);
}

/// Lays `dir/<name>` out as Kubernetes mounts a ConfigMap: the file lives in a timestamped
/// directory, `..data` links to that directory, and `<name>` links through `..data`.
fn as_configmap(dir: &std::path::Path, name: &str) {
    let version = dir.join("..2026_12_03_00_00_00.1");
    std::fs::create_dir(&version).unwrap();
    std::fs::rename(dir.join(name), version.join(name)).unwrap();
    std::os::unix::fs::symlink("..2026_12_03_00_00_00.1", dir.join("..data")).unwrap();
    std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name)).unwrap();
}

/// What the kubelet does when the ConfigMap changes: writes a new timestamped directory,
/// swaps `..data` to it in one rename, and removes the old one. The new file gets the old
/// one's modification time, as a coarse clock or a quick second update can give it.
fn swap_configmap(dir: &std::path::Path, name: &str, text: &str) {
    let old = std::fs::read_link(dir.join("..data")).unwrap();
    let old_modified = std::fs::metadata(dir.join(name))
        .unwrap()
        .modified()
        .unwrap();
    let version = "..2026_12_03_00_05_00.2";
    std::fs::create_dir(dir.join(version)).unwrap();
    std::fs::write(dir.join(version).join(name), text).unwrap();
    std::fs::File::options()
        .write(true)
        .open(dir.join(version).join(name))
        .unwrap()
        .set_modified(old_modified)
        .unwrap();
    std::os::unix::fs::symlink(version, dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    std::fs::remove_dir_all(dir.join(old)).unwrap();
}

#[test]
fn a_configmap_update_by_symlink_swap_is_picked_up() {
    let w = Worker::start("w1");
    let files = TestGateway::builder().worker(&w).write();
    let policies = files.dir.path().join("policies");
    as_configmap(&policies, "policies.yaml");
    as_configmap(files.dir.path(), "turnpike.yaml");
    let gw = files.start();
    let r = gw.chat(AGENT, gw.jane(), "hi");
    assert_eq!(r.header("ratelimit-limit"), Some("1000"));
    // The same length as before: only the swap (a new file, a new inode) tells them apart.
    let text = serde_yaml_ng::to_string(&json!({
        "policies": {"standard": {"requests": {"rate": 2000, "per": "1s"}}},
    }))
    .unwrap();
    swap_configmap(&policies, "policies.yaml", &text);
    wait_until(
        Duration::from_secs(5),
        "the swapped policy is in force",
        || gw.chat(AGENT, gw.jane(), "hi").header("ratelimit-limit") == Some("2000"),
    );
    // The config file itself, swapped the same way, with the same length and time: only
    // its inode says it changed. An agent renamed (same length) is served under its new id.
    let old_text = serde_yaml_ng::to_string(&gw.files.config).unwrap();
    let renamed = OTHER_AGENT.replace("other_1", "other_2");
    let new_text = old_text.replace(OTHER_AGENT, &renamed);
    assert_eq!(new_text.len(), old_text.len());
    swap_configmap(gw.files.dir.path(), "turnpike.yaml", &new_text);
    wait_until(
        Duration::from_secs(5),
        "the swapped config is in force",
        || gw.chat(&renamed, gw.bob(), "hi").status == 200,
    );
}
