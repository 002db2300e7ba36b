//! The faults Redis really has, each on a `redis-server` the test owns, with a call in flight
//! when it strikes: out of memory, a replica's READONLY after a failover, connections
//! killed, a hung server, an empty restart, and a gateway killed while it holds settlements.
//! Every call is charged exactly once, every reservation given back, nothing dropped.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::redis::RedisServer;
use crate::support::*;
use crate::{call_ids, calls_with_request_id, on_redis};

/// What one call costs at the test config's prices: 45 input and 32 output tokens at 1 and
/// 2 units per token.
pub const COST: i64 = 45 + 2 * 32;
/// Long enough for any held settlement to be retried after Redis recovers (the retry backs
/// off to at most 5 s while Redis fails) on a busy machine.
const RECOVERY: Duration = Duration::from_secs(20);

/// Runs `during` while a call that holds its worker for `hold_secs` is in flight (admitted,
/// and at the worker), then returns the call's reply.
pub fn with_a_call_in_flight(
    gw: &TestGateway,
    w: &Worker,
    hold_secs: f64,
    during: impl FnOnce(),
) -> Reply {
    let seen = w.count();
    std::thread::scope(|s| {
        let call = s.spawn(|| gw.chat(AGENT, gw.jane(), Script::sleep(hold_secs)));
        wait_until(Duration::from_secs(10), "the worker has the call", || {
            w.count() > seen
        });
        during();
        call.join().unwrap()
    })
}

/// Waits until `account`'s balance is `balance` with nothing reserved; returns how long.
/// The admin API answers 503 while Redis counts as down: that is asked again.
pub fn wait_for_balance(gw: &TestGateway, account: &str, balance: i64) -> Duration {
    let started = Instant::now();
    wait_until(RECOVERY, "the held settlement is written", || {
        let now = gw.admin_get(&format!("/admin/accounts/{account}/balance"));
        now.status == 200 && now.json()["balance"] == balance && now.json()["reserved"] == 0
    });
    started.elapsed()
}

/// Whether Redis answers a `PING` within 50 ms.
pub fn answers_ping(redis: &RedisServer) -> bool {
    use std::io::{Read, Write};
    let Ok(mut conn) = std::net::TcpStream::connect(redis.addr()) else {
        return false;
    };
    conn.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut reply = [0u8; 7];
    conn.write_all(b"PING\r\n").is_ok() && conn.read_exact(&mut reply).is_ok()
}

/// `calls` metered calls are recorded once each: in the usage totals and the usage stream,
/// and nothing was dropped.
#[track_caller]
pub fn assert_recorded_once(gw: &TestGateway, redis: &RedisServer, calls: u64) {
    assert_eq!(gw.usage("account=acct_jane").requests, calls as i64);
    let entries = format!("(integer) {calls}");
    assert_eq!(redis.cli(&["XLEN", "turnpike:usage"]), entries);
    assert_eq!(dropped(gw), 0.0);
}

fn dropped(gw: &TestGateway) -> f64 {
    gw.metric("turnpike_store_settlements_dropped_total", &[])
}

#[test]
fn out_of_memory_holds_the_settlement_until_memory_frees_and_charges_it_once() {
    let redis = RedisServer::start();
    let w = Worker::start("w1");
    let gw = on_redis(&w, json!(redis.url()), json!({}))
        .reserve(1000)
        .start();
    let start = gw.balance("acct_jane").balance;

    let reply = with_a_call_in_flight(&gw, &w, 1.0, || {
        redis.cli(&["CONFIG", "SET", "maxmemory", "1"]);
        // Redis refuses the admission's writes: fail_closed refuses the call, and nothing
        // is admitted locally.
        gw.chat(AGENT, gw.jane(), "hi")
            .error(503, "store_unavailable");
    });
    reply.assert_status(200);
    // The settlement is held, its reservation still taken, while Redis stays full.
    gw.wait_metric("turnpike_store_settlements_queued", &[], 1.0);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(gw.balance("acct_jane").reserved, 1000);
    assert_eq!(
        dropped(&gw),
        0.0,
        "a full Redis is waited for, not given up on"
    );
    assert_eq!(
        gw.metric("turnpike_store_fail_open_admissions_total", &[]),
        0.0
    );

    redis.cli(&["CONFIG", "SET", "maxmemory", "0"]);
    let took = wait_for_balance(&gw, "acct_jane", start - COST);
    eprintln!("OOM: held settlement written {took:?} after memory freed");
    assert_recorded_once(&gw, &redis, 1);
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
}

#[test]
fn out_of_memory_under_fail_open_admits_on_local_limits() {
    let redis = RedisServer::start();
    let w = Worker::start("w1");
    let gw = on_redis(
        &w,
        json!(redis.url()),
        json!({"on_unavailable": "fail_open"}),
    )
    .start();
    let start = gw.balance("acct_jane").balance;
    redis.cli(&["CONFIG", "SET", "maxmemory", "1"]);
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
    assert_eq!(
        gw.metric("turnpike_store_fail_open_admissions_total", &[]),
        1.0
    );
    redis.cli(&["CONFIG", "SET", "maxmemory", "0"]);
    wait_for_balance(&gw, "acct_jane", start - COST);
    assert_eq!(gw.usage("account=acct_jane").requests, 1);
    assert_eq!(dropped(&gw), 0.0);
}

#[test]
fn a_failover_that_leaves_redis_read_only_holds_the_settlement_until_it_is_primary_again() {
    let redis = RedisServer::start();
    let w = Worker::start("w1");
    let gw = on_redis(&w, json!(redis.url()), json!({}))
        .reserve(1000)
        .start();
    let start = gw.balance("acct_jane").balance;
    // A primary that nothing answers on: Redis keeps its data, and refuses writes.
    let nowhere = free_port().to_string();

    let reply = with_a_call_in_flight(&gw, &w, 1.0, || {
        redis.cli(&["REPLICAOF", "127.0.0.1", &nowhere]);
        gw.chat(AGENT, gw.jane(), "hi")
            .error(503, "store_unavailable");
    });
    reply.assert_status(200);
    gw.wait_metric("turnpike_store_settlements_queued", &[], 1.0);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(dropped(&gw), 0.0, "READONLY is waited for, not given up on");
    assert_eq!(gw.balance("acct_jane").reserved, 1000);

    redis.cli(&["REPLICAOF", "NO", "ONE"]);
    let took = wait_for_balance(&gw, "acct_jane", start - COST);
    eprintln!("READONLY: held settlement written {took:?} after promotion");
    assert_recorded_once(&gw, &redis, 1);
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
}

#[test]
fn connections_killed_mid_call_lose_nothing_and_fail_no_call() {
    let redis = RedisServer::start();
    let w = Worker::start("w1");
    let gw = on_redis(&w, json!(redis.url()), json!({}))
        .reserve(1000)
        .start();
    let start = gw.balance("acct_jane").balance;
    let reply = with_a_call_in_flight(&gw, &w, 0.5, || {
        redis.cli(&["CLIENT", "KILL", "TYPE", "normal"]);
    });
    reply.assert_status(200);
    // The next calls find their connections gone; each is sent again on a new one.
    redis.cli(&["CLIENT", "KILL", "TYPE", "normal"]);
    for _ in 0..3 {
        gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
    }
    let took = wait_for_balance(&gw, "acct_jane", start - 4 * COST);
    eprintln!("CLIENT KILL: all four settled {took:?} after the last call");
    assert_recorded_once(&gw, &redis, 4);
}

#[test]
fn a_hung_redis_fails_calls_fast_and_its_late_writes_count_once() {
    let redis = RedisServer::start_with(&["--enable-debug-command", "yes"]);
    let w = Worker::start("w1");
    let gw = on_redis(&w, json!(redis.url()), json!({"timeout": "200ms"}))
        .reserve(1000)
        .start();
    let start = gw.balance("acct_jane").balance;
    let reply = std::thread::scope(|s| {
        let reply = with_a_call_in_flight(&gw, &w, 1.0, || {
            s.spawn(|| redis.cli(&["DEBUG", "SLEEP", "3"]));
            wait_until(Duration::from_secs(5), "Redis sleeps", || {
                !answers_ping(&redis)
            });
        });
        // Redis still sleeps: a new call is refused within its two tries' deadlines.
        let asked = Instant::now();
        gw.chat(AGENT, gw.jane(), "hi")
            .error(503, "store_unavailable");
        assert!(asked.elapsed() < Duration::from_millis(1500));
        reply
    });
    reply.assert_status(200);
    // The settlement sent before the deadline ran out is applied when Redis wakes, and the
    // held copy of it then changes nothing.
    assert!(gw.metric("turnpike_store_errors_total", &[("op", "settle")]) >= 1.0);
    let took = wait_for_balance(&gw, "acct_jane", start - COST);
    eprintln!("DEBUG SLEEP: settled {took:?} after Redis woke");
    assert_recorded_once(&gw, &redis, 1);
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
}

#[test]
fn an_empty_restart_is_seeded_again_and_the_held_charge_comes_off_the_starting_balance() {
    let redis = RedisServer::start();
    let w = Worker::start("w1");
    let gw = crate::outage::gateway(&redis, &w, "fail_open");
    let starting = gw.balance("acct_jane").balance;
    gw.admin_delete("/admin/keys/key_bob").assert_status(200);
    redis.stop();
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);

    redis.restart_empty();
    let restarted = Instant::now();
    wait_until(RECOVERY, "Redis is seeded again", || {
        gw.metric("turnpike_store_state_lost_total", &[]) >= 1.0
    });
    let took = wait_for_balance(&gw, "acct_jane", starting - COST);
    eprintln!(
        "empty restart: seeded and settled {:?} after Redis came back",
        restarted.elapsed().max(took)
    );
    wait_until(Duration::from_secs(5), "the loss is logged", || {
        gw.log().contains("lost its state")
    });
    let ready = gw.open_get("/readyz");
    ready.assert_status(200);
    assert!(
        ready.json()["notes"][0]
            .as_str()
            .is_some_and(|n| n.contains("lost its state") && n.contains("admin-made keys")),
        "{}",
        ready.body
    );
    // The revocation this instance knew is in Redis again, for every instance to read.
    let bob = sha256_hex(gw.bob());
    assert_eq!(
        redis.cli(&["SISMEMBER", "turnpike:revoked_keys", &bob]),
        "(integer) 1"
    );
    gw.chat(AGENT, gw.bob(), "hi").error(401, "invalid_api_key");
    // Config keys work again without a reload, and the account is not locked.
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
    assert_eq!(gw.settled_balance("acct_jane").balance, starting - 2 * COST);
    assert_eq!(gw.usage("account=acct_jane").requests, 2);
    assert_eq!(dropped(&gw), 0.0);
}

/// A gateway on `redis` under `fail_open`, journalling what it holds.
pub fn journalled_on(redis: &RedisServer, w: &Worker) -> crate::support::gateway::GatewayBuilder {
    on_redis(
        w,
        json!(redis.url()),
        json!({"on_unavailable": "fail_open", "timeout": "200ms", "journal_dir": "journal"}),
    )
}

/// One call settled, then Redis stopped and three more served: their settlements are held.
/// Returns jane's balance from before the four.
fn hold_three_settlements(gw: &TestGateway, redis: &RedisServer) -> i64 {
    let start = gw.balance("acct_jane").balance;
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
    redis.stop();
    for _ in 0..3 {
        gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
    }
    assert!(gw.metric("turnpike_store_settlements_queued", &[]) >= 3.0);
    start
}

#[test]
fn a_gateway_killed_with_held_settlements_replays_each_exactly_once_after_its_restart() {
    let redis = RedisServer::start();
    let w = Worker::start("w1");
    let gw = journalled_on(&redis, &w).start();
    let start = hold_three_settlements(&gw, &redis);
    gw.kill();

    redis.restart();
    gw.restart();
    let took = wait_for_balance(&gw, "acct_jane", start - 4 * COST);
    eprintln!("SIGKILL: 3 journalled settlements replayed {took:?} after the gateway restarted");
    assert_recorded_once(&gw, &redis, 4);
    wait_until(Duration::from_secs(5), "the replay is logged", || {
        gw.log().contains("settlement journal holds")
    });

    // Written means done: the journal is empty, and another restart replays nothing.
    let journal = gw.files.dir.path().join("journal/settlements.journal");
    assert_eq!(std::fs::metadata(&journal).unwrap().len(), 0, "{journal:?}");
    gw.restart();
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
    assert_eq!(gw.settled_balance("acct_jane").balance, start - 5 * COST);
    assert_recorded_once(&gw, &redis, 5);
}

#[test]
fn two_calls_with_one_request_id_are_two_records_with_their_own_call_ids() {
    let redis = RedisServer::start();
    let w = Worker::start("w1");
    let gw = on_redis(&w, json!(redis.url()), json!({})).start();
    calls_with_request_id(&gw, 2, "req-reused");
    let entries = redis.cli(&["XRANGE", "turnpike:usage", "-", "+"]);
    assert_eq!(entries.matches("req-reused").count(), 2, "{entries}");
    let stream_ids = call_ids(&entries);
    assert_eq!(stream_ids.len(), 2, "{entries}");
    assert_ne!(stream_ids[0], stream_ids[1]);
    // The worker saw the same ids as `Idempotency-Key`, and so does the access log.
    let sent: Vec<String> = w
        .seen()
        .iter()
        .map(|s| s.header("idempotency-key").unwrap().to_owned())
        .collect();
    assert_eq!(sent, stream_ids);
    // The access line is written as the call ends, just after its answer.
    wait_until(Duration::from_secs(5), "both calls' access lines", || {
        let log = gw.log();
        stream_ids
            .iter()
            .all(|id| log.contains(&format!("call_id={id}")))
    });
}

/// SIGTERM while Redis is down and settlements are held: the drain's last try fails, the
/// journal keeps them, the process still exits by itself, and the next start writes each once.
#[test]
fn a_gateway_stopped_by_sigterm_during_an_outage_keeps_its_held_settlements_for_the_next_start() {
    let redis = RedisServer::start();
    let w = Worker::start("w1");
    let gw = journalled_on(&redis, &w)
        .config(|c| c["shutdown_grace"] = json!("5s"))
        .start();
    let start = hold_three_settlements(&gw, &redis);
    gw.signal("TERM");
    wait_until(Duration::from_secs(20), "the gateway exits", || {
        gw.exited().is_some()
    });
    assert!(gw.exited().unwrap().success(), "{}", gw.log());
    assert!(
        gw.log()
            .contains("the journal keeps them for the next start"),
        "{}",
        gw.log()
    );

    redis.restart();
    gw.restart();
    wait_for_balance(&gw, "acct_jane", start - 4 * COST);
    assert_recorded_once(&gw, &redis, 4);
}
