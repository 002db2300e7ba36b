//! The Redis store as several gateway instances share it: one limit, one balance, one usage
//! ledger; keys made and revoked anywhere; Redis down, restarted or hung. Every test owns its
//! `redis-server` (or Cluster) on free ports. The behaviour tests of `tests/e2e` also run on
//! Redis and on a Cluster (`TURNPIKE_TEST_STORE`, see scripts/test).
//!
//! Run: `cargo test --release --test shared_store`.

#[path = "../e2e/support/mod.rs"]
mod support;

mod chaos;
mod cluster;
mod config_files;
mod faults;
mod group_commit;
mod mirror;
mod outage;
mod replay;
mod scripts;
mod slices;
mod two_instances;

use serde_json::{json, Value};

use support::gateway::GatewayBuilder;
use support::{TestGateway, Worker};

/// A gateway in front of `worker` on the Redis at `url` (one URL, or a list for a Cluster),
/// with a deadline a loaded test machine meets; `extra` adds to the `store:` section.
pub fn on_redis(worker: &Worker, url: Value, extra: Value) -> GatewayBuilder {
    let mut store = json!({"kind": "redis", "url": url, "timeout": "2s"});
    if let (Some(store), Some(extra)) = (store.as_object_mut(), extra.as_object()) {
        store.extend(extra.clone());
    }
    TestGateway::builder().worker(worker).store(store)
}

/// Sends `n` chat calls that all carry the client request id `request_id`.
pub fn calls_with_request_id(gw: &TestGateway, n: usize, request_id: &str) {
    for _ in 0..n {
        gw.call(support::AGENT)
            .key(gw.jane())
            .message("hi")
            .header("X-Request-Id", request_id)
            .send()
            .assert_status(200);
    }
}

/// The gateway's call ids (`call_` and 20 characters) in `text`, in order.
pub fn call_ids(text: &str) -> Vec<String> {
    text.match_indices("call_")
        .map(|(at, _)| &text[at..])
        .filter_map(|rest| {
            let id: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            (id.len() == "call_".len() + 20).then_some(id)
        })
        .collect()
}
