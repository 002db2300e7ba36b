//! Redis Cluster specifics: an agent's buckets live in another slot than the key's, so a
//! refusal on one side gives back what the other side took.

use serde_json::json;
use std::time::Duration;

use crate::support::redis::RedisCluster;
use crate::support::*;
use crate::{call_ids, calls_with_request_id, on_redis};

#[test]
fn a_call_the_agent_limit_refuses_gives_the_key_its_token_back() {
    let cluster = RedisCluster::start();
    let w = Worker::start("w1");
    let gw = on_redis(&w, json!(cluster.urls()), json!({}))
        .policy(
            "standard",
            json!({"requests": {"rate": 1, "per": "1h", "burst": 2}}),
        )
        .policy(
            "agent-wide",
            json!({"requests": {"rate": 10, "per": "1s", "burst": 1}}),
        )
        .agent_policy("agent-wide")
        .start();
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
    // The agent's bucket is empty: refused, and the key's token is given back.
    gw.chat(AGENT, gw.jane(), "hi")
        .error(429, "rate_limit_exceeded");
    std::thread::sleep(Duration::from_millis(250));
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
    std::thread::sleep(Duration::from_millis(250));
    // Now the key's two calls of the hour are spent.
    let refused = gw.chat(AGENT, gw.jane(), "hi");
    refused.error(429, "rate_limit_exceeded");
    assert_eq!(refused.header("ratelimit-remaining"), Some("0"));
    assert_eq!(w.count(), 2);
    // The key's buckets and its account's balance live on one node, under one tag.
    let holder = |key: &str| {
        cluster
            .nodes
            .iter()
            .position(|node| node.cli(&["EXISTS", key]) == "(integer) 1")
            .unwrap_or_else(|| panic!("no node holds {key}"))
    };
    assert_eq!(
        holder("turnpike:{account:acct_jane}:account"),
        holder("turnpike:{account:acct_jane}:key:key_jane:limits")
    );
    holder(&format!("turnpike:{{agent:{AGENT}}}:limits"));
}

#[test]
fn every_usage_entry_on_a_cluster_carries_its_own_call_id_once() {
    let cluster = RedisCluster::start();
    let w = Worker::start("w1");
    let gw = on_redis(&w, json!(cluster.urls()), json!({})).start();
    calls_with_request_id(&gw, 3, "req-reused");
    assert_eq!(gw.usage_after("account=acct_jane", 3).requests, 3);
    let entries = cluster
        .nodes
        .iter()
        .map(|node| node.cli(&["XRANGE", "turnpike:usage", "-", "+"]))
        .collect::<Vec<_>>()
        .join("\n");
    let ids = call_ids(&entries);
    assert_eq!(ids.len(), 3, "{entries}");
    assert!(ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2]);
}
