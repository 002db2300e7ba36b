//! The Redis store as several gateway instances share it: one limit, one balance, one usage
//! ledger; keys made and revoked anywhere; Redis down, restarted or hung. Every test owns its
//! `redis-server` (or Cluster) on free ports. The behaviour tests of `tests/e2e` also run on
//! Redis and on a Cluster (`TURNPIKE_TEST_STORE`, see scripts/test).
//!
//! Run: `cargo test --release --test shared_store`.

#[path = "../e2e/support/mod.rs"]
mod support;

mod cluster;
mod mirror;
mod outage;
mod scripts;
mod two_instances;

use serde_json::{json, Value};

/// The `store:` section for `url`, with a deadline a loaded test machine meets.
pub fn redis_store(url: Value, extra: Value) -> Value {
    let mut store = json!({"kind": "redis", "url": url, "timeout": "2s"});
    if let (Some(store), Some(extra)) = (store.as_object_mut(), extra.as_object()) {
        store.extend(extra.clone());
    }
    store
}
