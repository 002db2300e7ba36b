//! The Redis store as several gateway instances share it: one limit, one balance, one usage
//! ledger; keys made and revoked anywhere; Redis down, restarted or hung. Every test owns its
//! `redis-server` (or Cluster) on free ports. The behaviour tests of `tests/e2e` also run on
//! Redis and on a Cluster (`TURNPIKE_TEST_STORE`, see scripts/test).
//!
//! Run: `cargo test --release --test shared_store`.

#[path = "../e2e/support/mod.rs"]
mod support;

mod cluster;
mod faults;
mod mirror;
mod outage;
mod scripts;
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
