//! A balance under chaos (issue 23): four gateways, one account, calls of random cost from
//! four clients each until the balance runs out; one gateway SIGKILLed mid-run (its calls in
//! flight and its escrow with it) and started again. The books must agree: the balance fell
//! by exactly what the usage stream charged, each call once; no call was admitted that the
//! balance could not cover (every cost is at most the reservation, so the balance never goes
//! below zero); every answered call is in the stream; and the killed gateway's escrow goes
//! back when its lease runs out.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::json;

use crate::on_redis;
use crate::support::redis::RedisServer;
use crate::support::*;

const START: i64 = 150_000;
/// Costs are input + 2 × output with both at most 100: never above the reservation.
const RESERVE: i64 = 300;

/// Each call's usage entry in the stream: (entries, call ids seen twice, Σ cost).
const STREAM_BOOKS: &str = "
local seen, twice, sum = {}, 0, 0
local entries = redis.call('XRANGE', KEYS[1], '-', '+')
for _, entry in ipairs(entries) do
  local fields, id, cost = entry[2], nil, 0
  for i = 1, #fields, 2 do
    if fields[i] == 'call_id' then id = fields[i + 1] end
    if fields[i] == 'cost' then cost = tonumber(fields[i + 1]) end
  end
  if seen[id] then twice = twice + 1 end
  seen[id] = true
  sum = sum + cost
end
return { #entries, twice, sum }
";

#[test]
fn four_gateways_keep_the_books_of_one_balance_through_a_sigkill() {
    let redis = RedisServer::start();
    let w = Worker::start("w1");
    let files = on_redis(&w, json!(redis.url()), json!({}))
        .reserve(RESERVE)
        .account_balance("acct_jane", START)
        .write();
    let mut gateways: Vec<TestGateway> = (1..4).map(|_| files.sibling().start()).collect();
    gateways.insert(0, files.start());
    let killed = AtomicBool::new(false);
    let start = Instant::now();
    let seconds = 4.0;
    // (answered, refused for the balance, lost to the kill)
    let (answered, broke, lost) = std::thread::scope(|s| {
        let clients: Vec<_> = gateways
            .iter()
            .enumerate()
            .flat_map(|(i, gw)| std::iter::repeat_n((i, gw), 4))
            .map(|(i, gw)| {
                let killed = &killed;
                s.spawn(move || {
                    let mut rng = rand::thread_rng();
                    let (mut answered, mut broke, mut lost) = (0, 0, 0);
                    while start.elapsed().as_secs_f64() < seconds {
                        let usage = Script::usage(rng.gen_range(1..=100), rng.gen_range(1..=100));
                        let call = std::panic::catch_unwind(AssertUnwindSafe(|| {
                            gw.chat(AGENT, gw.jane(), &usage).status
                        }));
                        match call {
                            Ok(200) => answered += 1,
                            Ok(402) => broke += 1,
                            Ok(other) => panic!("status {other}"),
                            // The gateway was killed under the call.
                            Err(_) if i == 1 && killed.load(Ordering::SeqCst) => {
                                lost += 1;
                                std::thread::sleep(Duration::from_millis(50));
                            }
                            Err(panic) => std::panic::resume_unwind(panic),
                        }
                    }
                    (answered, broke, lost)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(1500));
        killed.store(true, Ordering::SeqCst);
        gateways[1].kill();
        std::thread::sleep(Duration::from_millis(300));
        gateways[1].restart();
        clients
            .into_iter()
            .map(|c| c.join().unwrap())
            .fold((0, 0, 0), |(a, b, l), (ca, cb, cl)| {
                (a + ca, b + cb, l + cl)
            })
    });
    let [entries, twice, charged]: [i64; 3] = redis
        .cli(&["EVAL", STREAM_BOOKS, "1", "turnpike:usage"])
        .lines()
        // `1) (integer) 42`
        .map(|line| line.split_whitespace().last().unwrap().parse().unwrap())
        .collect::<Vec<_>>()
        .try_into()
        .unwrap();
    let books = gateways[0].balance("acct_jane");
    eprintln!(
        "{answered} answered, {broke} refused (402), {lost} lost to the kill; \
         {entries} usage entries charging {charged}; balance {} reserved {}",
        books.balance, books.reserved
    );
    assert!(broke > 0, "the balance never ran out");
    assert_eq!(twice, 0, "a call recorded twice");
    assert_eq!(
        books.balance,
        START - charged,
        "the balance and the stream disagree"
    );
    assert!(books.balance >= 0, "overspent: {}", books.balance);
    // The first call of each gateway warms nothing up: every answered call is recorded, and
    // at most the calls in flight at the kill besides.
    assert!(
        entries >= answered && entries <= answered + lost,
        "{entries} entries for {answered} answered and {lost} lost"
    );
    // What the killed gateway held in escrow goes back when its lease runs out (2 s after its
    // last sync), at the next script that sweeps the account's leases.
    wait_until(Duration::from_secs(5), "nothing left reserved", || {
        let gw = &gateways[0];
        let _ = gw.chat(AGENT, gw.jane(), Script::usage(1, 1)).status;
        std::thread::sleep(Duration::from_millis(500));
        gw.balance("acct_jane").reserved == 0
    });
}
