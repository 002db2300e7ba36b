//! Clients that do not read their answers (SPEC §3 `limits.write_timeout`): one that reads
//! nothing for that long is closed, its call settled exactly once, other calls unharmed; and
//! what the worker exchange took is timed apart from the client's write.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::*;

/// An 8 MiB answer: more than the kernel's socket buffers on both sides hold.
const BIG: usize = 8 << 20;

/// A connection that asked for a big answer and reads none of it.
fn stalled_call(gw: &TestGateway) -> TcpStream {
    let body = json!({"message": Script::padding(BIG).to_string()}).to_string();
    let mut s = TcpStream::connect(("127.0.0.1", gw.port())).unwrap();
    s.write_all(&raw::chat_request(AGENT, gw.jane(), body.as_bytes()))
        .unwrap();
    s
}

fn open_connections(gw: &TestGateway) -> f64 {
    gw.metric("turnpike_open_connections", &[])
}

#[test]
fn a_client_that_stops_reading_is_closed_after_the_write_timeout_and_metered_once() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .max_response_bytes(16 << 20)
        .config(|c| c["limits"]["write_timeout"] = json!("1s"))
        .start();
    let stalled: Vec<TcpStream> = (0..3).map(|_| stalled_call(&gw)).collect();
    wait_until(
        Duration::from_secs(10),
        "the big answers are metered",
        || gw.usage("account=acct_jane").requests == 3,
    );
    // Meanwhile other calls keep their pace.
    for _ in 0..20 {
        let asked = Instant::now();
        gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "a call took {:?} beside the stalled clients",
            asked.elapsed()
        );
    }
    // The stalled connections are closed by the gateway while their clients still hold them.
    wait_until(
        Duration::from_secs(10),
        "the stalled connections are closed",
        || open_connections(&gw) == 0.0,
    );
    for mut s in stalled {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        assert!(got.len() < BIG, "a stalled client got its whole answer");
    }
    let usage = gw.usage("account=acct_jane");
    assert_eq!(usage.requests, 23, "each call metered once");
    assert_eq!(gw.settled_balance("acct_jane").reserved, 0);
}

#[test]
fn the_upstream_time_is_the_worker_exchange_not_the_clients_write() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .max_response_bytes(16 << 20)
        .start();
    let mut s = stalled_call(&gw);
    // The client reads nothing for a while, then all of it.
    std::thread::sleep(Duration::from_millis(1500));
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert!(got.len() > BIG, "the whole answer arrives once read");
    wait_until(Duration::from_secs(5), "the call is logged", || {
        gw.log().contains("upstream_ms=")
    });
    let line = gw
        .log()
        .lines()
        .find(|l| l.contains("upstream_ms="))
        .unwrap()
        .to_owned();
    let field = |name: &str| -> u64 {
        let start = line.find(&format!("{name}=")).unwrap() + name.len() + 1;
        line[start..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(field("duration_ms") >= 1400, "{line}");
    assert!(field("upstream_ms") < 1000, "{line}");
    let upstream_sum = gw.metric("turnpike_upstream_duration_seconds_sum", &[]);
    assert!(upstream_sum < 1.0, "upstream duration {upstream_sum}s");
}
