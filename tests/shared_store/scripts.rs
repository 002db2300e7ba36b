//! The Lua scripts: loaded once, reloaded when Redis forgot them.

use serde_json::json;

use crate::on_redis;
use crate::support::redis::RedisServer;
use crate::support::*;

#[test]
fn calls_pass_after_script_flush_and_the_scripts_are_loaded_again() {
    let redis = RedisServer::start();
    let w = Worker::start("w1");
    let gw = on_redis(&w, json!(redis.url()), json!({})).start();
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
    assert_eq!(redis.cli(&["SCRIPT", "FLUSH"]), "OK");
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
    assert_eq!(gw.usage_after("account=acct_jane", 3).requests, 3);
    let stats = redis.cli(&["INFO", "commandstats"]);
    // The hot path's one script (the group commit) loaded on first use, and again after
    // the flush.
    assert!(redis.command_calls("script|load") >= 2, "{stats}");
    assert!(
        stats.lines().any(|l| l.starts_with("cmdstat_evalsha:")),
        "admission runs by EVALSHA: {stats}"
    );
    assert!(
        !stats.lines().any(|l| l.starts_with("cmdstat_eval:")),
        "never the whole script on every call: {stats}"
    );
}
