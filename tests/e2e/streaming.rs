//! Streamed answers (SPEC §5): a worker's `text/event-stream` relayed event by event over
//! HTTP/1.1 and HTTP/2, metered from its usage event, the session named first, cut off when
//! the money or the tokens run out, closed when the client leaves, ended when idle. Runs on
//! every store (`TURNPIKE_TEST_STORE`).

use serde_json::{json, Value};
use std::time::{Duration, Instant};

use crate::support::sse::{h2_stream, SseEvent, StreamCall};
use crate::support::{wait_until, BadUsage, Balance, Script, TestGateway, Worker, AGENT};

/// The chat body that runs `script`, in session `sess_stream_1`.
fn body(script: &Script) -> Value {
    json!({"message": script.to_string(), "session_id": "sess_stream_1"})
}

fn deltas(events: &[SseEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| e.json()["delta"].as_str().map(str::to_owned))
        .collect()
}

fn streams_ended(gw: &TestGateway, end: &str) -> f64 {
    gw.metric("turnpike_streams_total", &[("agent", AGENT), ("end", end)])
}

/// Waits until `count` streams have ended with `end` (a call is counted just after its
/// client got its last bytes).
fn wait_streams_ended(gw: &TestGateway, end: &str, count: f64) {
    gw.wait_metric(
        "turnpike_streams_total",
        &[("agent", AGENT), ("end", end)],
        count,
    );
}

#[test]
fn events_reach_the_client_before_the_worker_has_finished() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let call = StreamCall::open(gw.port(), AGENT, gw.jane(), &body(&Script::stream(5, 200)));
    assert_eq!(call.status, 200);
    assert_eq!(call.header("content-type"), Some("text/event-stream"));
    assert!(call.header("content-length").is_none());
    assert!(call.header("x-request-id").is_some());
    assert!(call.header("ratelimit-remaining").is_some());
    let sent_at = call.sent_at;
    let (events, ended) = call.all();
    assert!(ended, "the answer ended properly");
    assert_eq!(
        deltas(&events),
        ["w1-0 ", "w1-1 ", "w1-2 ", "w1-3 ", "w1-4 "]
    );
    assert_eq!(events[0].json()["session_id"], "sess_stream_1");
    assert_eq!(events[5].json()["usage"]["total_tokens"], 77);
    assert_eq!(events.last().unwrap().data, "[DONE]");
    // The worker takes 800 ms over its deltas: the first must be here long before the last.
    let first = events[0].at;
    let last = events[4].at;
    assert!(
        last.duration_since(first) >= Duration::from_millis(600),
        "the events came together: {:?} apart",
        last.duration_since(first)
    );
    assert!(first.duration_since(sent_at) < Duration::from_millis(600));
    wait_streams_ended(&gw, "done", 1.0);
    assert!(gw
        .metrics()
        .contains("turnpike_stream_first_byte_seconds_count 1"));
}

#[test]
fn events_reach_an_http2_client_before_the_worker_has_finished() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let (status, events) = h2_stream(gw.port(), AGENT, gw.jane(), &body(&Script::stream(4, 250)));
    assert_eq!(status, 200);
    assert_eq!(deltas(&events), ["w1-0 ", "w1-1 ", "w1-2 ", "w1-3 "]);
    assert_eq!(events.last().unwrap().data, "[DONE]");
    let spread = events[3].at.duration_since(events[0].at);
    assert!(
        spread >= Duration::from_millis(500),
        "came together: {spread:?}"
    );
    let usage = gw.usage_after("account=acct_jane", 1);
    assert_eq!(usage.total_tokens, 77);
}

#[test]
fn the_usage_of_the_final_event_is_metered_exactly() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).balance(10_000).start();
    // Running usage on every delta, the final usage event last: the final one counts.
    let script = Script::stream(3, 20).running_usage().and_usage(100, 300);
    let (events, _) = StreamCall::open(gw.port(), AGENT, gw.jane(), &body(&script)).all();
    assert_eq!(events.len(), 5, "{events:?}");
    // 100 input × 1 + 300 output × 2 per token.
    assert_eq!(
        gw.settled_balance("acct_jane"),
        Balance {
            balance: 10_000 - 700,
            reserved: 0
        }
    );
    let usage = gw.usage_after("account=acct_jane", 1);
    assert_eq!(
        (usage.input_tokens, usage.output_tokens, usage.cost),
        (100, 300, 700)
    );
    assert_eq!(
        gw.metric(
            "turnpike_tokens_total",
            &[("agent", AGENT), ("kind", "output")]
        ),
        300.0
    );
    wait_streams_ended(&gw, "done", 1.0);
}

#[test]
fn a_stream_without_usage_costs_nothing() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).balance(1_000).start();
    let script = Script::stream(2, 10).and_bad_usage(BadUsage::Missing);
    let (events, ended) = StreamCall::open(gw.port(), AGENT, gw.jane(), &body(&script)).all();
    assert!(ended);
    assert_eq!(deltas(&events).len(), 2);
    assert_eq!(events.last().unwrap().data, "[DONE]");
    wait_streams_ended(&gw, "no_usage", 1.0);
    gw.assert_jane_charged_nothing(1_000);
}

#[test]
fn the_client_learns_its_session_first_when_the_worker_does_not_name_it() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let script = Script::stream(2, 10).and_no_session();
    let (events, _) = StreamCall::open(gw.port(), AGENT, gw.jane(), &body(&script)).all();
    assert_eq!(events[0].name.as_deref(), Some("session"));
    assert_eq!(events[0].json(), json!({"session_id": "sess_stream_1"}));
    assert_eq!(deltas(&events[1..]), ["w1-0 ", "w1-1 "]);

    // A session the gateway made is named the same way; one the worker names is not repeated.
    let made = json!({"message": script.to_string()});
    let (events, _) = StreamCall::open(gw.port(), AGENT, gw.jane(), &made).all();
    assert_eq!(events[0].name.as_deref(), Some("session"));
    assert!(events[0].json()["session_id"]
        .as_str()
        .unwrap()
        .starts_with("sess_"));
    let (events, _) =
        StreamCall::open(gw.port(), AGENT, gw.jane(), &body(&Script::stream(1, 0))).all();
    assert!(events.iter().all(|e| e.name.is_none()), "{events:?}");
}

#[test]
fn a_client_that_hangs_up_mid_stream_closes_the_worker_and_pays_what_was_used() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .balance(100_000)
        .reserve(500)
        .start();
    // 40 deltas 50 ms apart, each with the running usage (input 10, output up to 400).
    let script = Script::stream(40, 50).running_usage().and_usage(10, 400);
    let mut call = StreamCall::open(gw.port(), AGENT, gw.jane(), &body(&script));
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(call.next_event().expect("an event"));
    }
    let left_at = Instant::now();
    drop(call);
    wait_until(
        Duration::from_secs(3),
        "the worker sees the hang-up",
        || !w.hang_ups().is_empty(),
    );
    let closed_after = w.hang_ups()[0].saturating_duration_since(left_at);
    assert!(
        closed_after < Duration::from_secs(1),
        "worker closed after {closed_after:?}"
    );
    let after = gw.settled_balance("acct_jane");
    let usage = gw.usage_after("account=acct_jane", 1);
    // Charged exactly the running usage the gateway had read: at least what the client saw,
    // less than the whole stream.
    let seen_output = seen.last().unwrap().json()["usage"]["output_tokens"]
        .as_i64()
        .unwrap();
    assert_eq!(usage.input_tokens, 10);
    assert!(
        usage.output_tokens >= seen_output && usage.output_tokens < 400,
        "{usage:?}"
    );
    assert_eq!(usage.cost, 10 + 2 * usage.output_tokens);
    assert_eq!(after.balance, 100_000 - usage.cost);
    wait_streams_ended(&gw, "client_gone", 1.0);
}

#[test]
fn a_client_that_hangs_up_before_any_usage_pays_the_reservation() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .balance(100_000)
        .reserve(500)
        .start();
    let mut call = StreamCall::open(gw.port(), AGENT, gw.jane(), &body(&Script::stream(40, 50)));
    call.next_event().expect("an event");
    drop(call);
    wait_until(
        Duration::from_secs(3),
        "the worker sees the hang-up",
        || !w.hang_ups().is_empty(),
    );
    assert_eq!(
        gw.settled_balance("acct_jane"),
        Balance {
            balance: 100_000 - 500,
            reserved: 0
        }
    );
    assert_eq!(gw.usage_after("account=acct_jane", 1).cost, 500);
}

/// A gateway whose agent cuts streams that exhaust what they may spend: the account's
/// `balance`, or the `tokens` an hour of the key's bucket.
fn cutting_gateway(w: &Worker, balance: i64, tokens: u64) -> TestGateway {
    TestGateway::builder()
        .worker(w)
        .balance(balance)
        .reserve(100)
        .policy(
            "metered",
            json!({"requests": {"rate": 1000, "per": "1s"}, "tokens": {"rate": tokens, "per": "1h"}}),
        )
        .key_policy("metered")
        .config(|c| c["agents"][0]["on_exhaustion"] = json!("cut"))
        .start()
}

/// The stream's events up to its error event, which must be its last.
fn until_error(events: &[SseEvent]) -> Value {
    let last = events.last().expect("events");
    assert_eq!(last.name.as_deref(), Some("error"), "{events:?}");
    assert!(events.iter().all(|e| e.data != "[DONE]"), "{events:?}");
    last.json()
}

#[test]
fn a_stream_that_outspends_its_account_is_cut_and_charged_what_it_used() {
    let w = Worker::start("w1");
    let gw = cutting_gateway(&w, 1_000, 1_000_000);
    // Output grows by 20 tokens (40 units) an event, to 400 tokens (800 units) and beyond:
    // input 200 (200 units) makes the account run out after about 20 events.
    let script = Script::stream(40, 20).running_usage().and_usage(200, 800);
    let (events, ended) = StreamCall::open(gw.port(), AGENT, gw.jane(), &body(&script)).all();
    assert!(ended, "the stream ends properly after its error event");
    let error = until_error(&events);
    assert_eq!(error["error"]["code"], "insufficient_balance");
    assert_eq!(error["error"]["status"], 402);
    // The event that went over reached the client before the error.
    let over = &events[events.len() - 2].json()["usage"];
    let over_cost =
        over["input_tokens"].as_i64().unwrap() + 2 * over["output_tokens"].as_i64().unwrap();
    assert!(over_cost > 1_000, "{over}");
    assert!(deltas(&events).len() < 40);
    wait_until(Duration::from_secs(3), "the worker is closed", || {
        !w.hang_ups().is_empty()
    });
    let after = gw.settled_balance("acct_jane");
    let usage = gw.usage_after("account=acct_jane", 1);
    assert_eq!(after.balance, 1_000 - usage.cost);
    // Cut at the first event the account could not cover: over by less than one event.
    assert!(usage.cost > 1_000 && usage.cost <= 1_000 + 40, "{usage:?}");
    wait_streams_ended(&gw, "cut", 1.0);
}

#[test]
fn a_stream_that_empties_the_keys_token_bucket_is_cut() {
    let w = Worker::start("w1");
    let gw = cutting_gateway(&w, 1_000_000, 500);
    // 500 tokens in the key's bucket; the stream reports up to 10 + 1,000.
    let script = Script::stream(20, 20).running_usage().and_usage(10, 1_000);
    let (events, _) = StreamCall::open(gw.port(), AGENT, gw.jane(), &body(&script)).all();
    let error = until_error(&events);
    assert_eq!(error["error"]["code"], "rate_limit_exceeded");
    let usage = gw.usage_after("account=acct_jane", 1);
    assert!(
        usage.total_tokens > 500 && usage.total_tokens <= 560,
        "{usage:?}"
    );
    // The next call finds the bucket empty.
    let r = gw.chat(AGENT, gw.jane(), "hi");
    r.assert_status(429);
}

#[test]
fn a_stream_left_as_it_is_by_finish_runs_to_its_end() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .balance(1_000)
        .reserve(100)
        .start();
    let script = Script::stream(10, 5).running_usage().and_usage(200, 800);
    let (events, _) = StreamCall::open(gw.port(), AGENT, gw.jane(), &body(&script)).all();
    assert_eq!(events.last().unwrap().data, "[DONE]");
    let after = gw.settled_balance("acct_jane");
    assert_eq!(after.balance, 1_000 - 1_800, "charged in full, below zero");
}

#[test]
fn an_idle_stream_is_ended_by_the_stream_idle_timeout() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .balance(1_000)
        .config(|c| c["upstreams"]["pool"]["stream_idle_timeout"] = json!("400ms"))
        .start();
    let script = Script::stream(2, 10)
        .running_usage()
        .and_usage(5, 10)
        .stall();
    let call = StreamCall::open(gw.port(), AGENT, gw.jane(), &body(&script));
    let (events, ended) = call.all();
    assert!(ended);
    let error = until_error(&events);
    assert_eq!(error["error"]["code"], "upstream_timeout");
    let stalled_for = events.last().unwrap().at.duration_since(events[1].at);
    assert!(stalled_for >= Duration::from_millis(350), "{stalled_for:?}");
    wait_until(Duration::from_secs(3), "the worker is closed", || {
        !w.hang_ups().is_empty()
    });
    // What it used before it stalled is charged: 5 × 1 + 10 × 2.
    assert_eq!(gw.settled_balance("acct_jane").balance, 1_000 - 25);
    wait_streams_ended(&gw, "timeout", 1.0);
}

#[test]
fn a_stream_longer_than_the_pools_timeout_runs_on_and_holds_its_slot() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .timeout("300ms")
        .policy(
            "one",
            json!({"requests": {"rate": 1000, "per": "1s"}, "concurrency": 1}),
        )
        .key_policy("one")
        .start();
    let mut call = StreamCall::open(gw.port(), AGENT, gw.jane(), &body(&Script::stream(8, 150)));
    call.next_event().expect("an event");
    std::thread::sleep(Duration::from_millis(500));
    let r = gw.chat(AGENT, gw.jane(), "hi");
    r.assert_status(429);
    let (events, ended) = call.all();
    assert!(ended);
    assert_eq!(events.last().unwrap().data, "[DONE]");
    assert_eq!(streams_ended(&gw, "done"), 1.0);
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
}

#[test]
fn a_json_answer_keeps_its_length_and_path() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let call = StreamCall::open(gw.port(), AGENT, gw.jane(), &body(&Script::usage(1, 2)));
    assert_eq!(call.status, 200);
    assert_eq!(call.header("content-type"), Some("application/json"));
    assert!(call.header("content-length").is_some());
    assert_eq!(streams_ended(&gw, "done"), 0.0);
}

#[test]
fn sigterm_lets_a_stream_run_for_the_grace_then_ends_it_and_settles_it() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .config(|c| {
            c["shutdown_delay"] = json!("0s");
            c["shutdown_grace"] = json!("1s");
        })
        .start();
    wait_until(
        Duration::from_secs(10),
        "the stop signals are watched",
        || gw.log().contains("watching for stop signals"),
    );
    // 100 deltas 50 ms apart: five seconds, longer than the grace.
    let script = Script::stream(100, 50).running_usage().and_usage(10, 100);
    let mut call = StreamCall::open(gw.port(), AGENT, gw.jane(), &body(&script));
    call.next_event().expect("an event");
    let signalled = Instant::now();
    gw.signal("TERM");
    let (events, ended) = call.all();
    let lasted = signalled.elapsed();
    assert!(ended, "the stream ends properly");
    let error = until_error(&events);
    assert_eq!(error["error"]["code"], "upstream_unavailable");
    assert!(
        deltas(&events).len() >= 10,
        "it ran on during the grace: {events:?}"
    );
    assert!(
        lasted >= Duration::from_millis(900) && lasted < Duration::from_secs(4),
        "ended {lasted:?} after the signal"
    );
    wait_until(Duration::from_secs(15), "the gateway exits", || {
        gw.exited().is_some()
    });
    assert!(gw.exited().unwrap().success());
    // Settled before the process went: its access line carries the usage it was charged.
    let log = gw.log();
    let line = log
        .lines()
        .find(|l| l.contains("stream_end=\"timeout\"") || l.contains("stream_end=timeout"))
        .unwrap_or_else(|| panic!("no access line for the stream:\n{log}"));
    assert!(line.contains("input_tokens=10"), "{line}");
}

#[test]
fn two_hundred_concurrent_streams_fit_in_bounded_memory() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let rss = || gw.metric("process_resident_memory_bytes", &[]);
    let before = rss();
    let script = Script::stream(30, 100);
    let calls: Vec<StreamCall> = (0..200)
        .map(|_| StreamCall::open(gw.port(), AGENT, gw.jane(), &body(&script)))
        .collect();
    wait_until(Duration::from_secs(10), "200 streams are running", || {
        gw.metric("turnpike_inflight_requests", &[]) >= 200.0
    });
    let during = rss();
    let grew = (during - before) / (1024.0 * 1024.0);
    assert!(grew < 48.0, "200 streams took {grew:.1} MiB");
    let finished: Vec<bool> = std::thread::scope(|s| {
        let readers: Vec<_> = calls
            .into_iter()
            .map(|call| s.spawn(move || call.all().1))
            .collect();
        readers.into_iter().map(|r| r.join().unwrap()).collect()
    });
    assert!(finished.iter().all(|ended| *ended));
    wait_streams_ended(&gw, "done", 200.0);
}

#[test]
fn a_worker_that_keeps_its_stream_open_after_done_still_ends_it_well() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let script = Script::stream(2, 10).linger();
    let call = StreamCall::open(gw.port(), AGENT, gw.jane(), &body(&script));
    let sent_at = call.sent_at;
    let (events, ended) = call.all();
    assert!(ended);
    assert_eq!(events.last().unwrap().data, "[DONE]", "{events:?}");
    assert!(sent_at.elapsed() < Duration::from_secs(5));
    wait_streams_ended(&gw, "done", 1.0);
    assert_eq!(gw.usage_after("account=acct_jane", 1).total_tokens, 77);
}

#[test]
fn a_wrong_usage_after_good_ones_ends_the_stream_and_is_never_free() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .balance(1_000)
        .reserve(50)
        .start();
    // Deltas carry good running usage (45 in, up to 32 out); the final usage is negative.
    let script = Script::stream(3, 10)
        .running_usage()
        .and_bad_usage(BadUsage::Negative);
    let (events, ended) = StreamCall::open(gw.port(), AGENT, gw.jane(), &body(&script)).all();
    assert!(ended);
    let error = until_error(&events);
    assert_eq!(error["error"]["code"], "upstream_invalid_usage");
    // Charged the good running usage (45 + 2 × 32), which is more than the reservation.
    assert_eq!(gw.settled_balance("acct_jane").balance, 1_000 - 109);
    // Without any good usage first, the reservation.
    let script = Script::stream(1, 0).and_bad_usage(BadUsage::Negative);
    StreamCall::open(gw.port(), AGENT, gw.jane(), &body(&script)).all();
    gw.usage_after("account=acct_jane", 2);
    assert_eq!(gw.settled_balance("acct_jane").balance, 1_000 - 109 - 50);
}

#[test]
fn an_http10_client_gets_the_stream_until_the_connection_closes() {
    use std::io::{Read, Write};
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let body = body(&Script::stream(3, 10)).to_string();
    let request = format!(
        "POST {} HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        crate::support::chat_path(AGENT),
        gw.jane(),
        body.len()
    );
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", gw.port())).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, rest) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1."), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("transfer-encoding"),
        "{head}"
    );
    assert!(rest.starts_with("data: "), "no chunk sizes: {rest:?}");
    assert!(rest.ends_with("data: [DONE]\n\n"), "{rest:?}");
}

#[test]
fn a_stream_keeps_its_slot_and_reservation_past_its_first_lease() {
    let w = Worker::start("w1");
    // Leased for 300 ms + 700 ms: on Redis the lease runs out after a second unless renewed.
    let gw = TestGateway::builder()
        .worker(&w)
        .timeout("300ms")
        .reserve(70)
        .policy(
            "one",
            json!({"requests": {"rate": 1000, "per": "1s"}, "concurrency": 1}),
        )
        .key_policy("one")
        .config(|c| c["store"]["lease_grace"] = json!("700ms"))
        .start();
    let mut call = StreamCall::open(gw.port(), AGENT, gw.jane(), &body(&Script::stream(30, 100)));
    call.next_event().expect("an event");
    std::thread::sleep(Duration::from_millis(2_000));
    gw.chat(AGENT, gw.jane(), "hi").assert_status(429);
    assert_eq!(
        gw.balance("acct_jane").reserved,
        70,
        "the reservation is still held"
    );
    let (events, ended) = call.all();
    assert!(ended);
    assert_eq!(events.last().unwrap().data, "[DONE]");
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
}

#[test]
fn an_event_larger_than_the_limit_ends_the_stream_cleanly() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).balance(1_000).start();
    // The first delta carries 1.5 MiB: more than the one event the relay holds (1 MiB).
    let script = Script {
        padding: Some(1_500_000),
        ..Script::stream(3, 10)
    };
    let (events, ended) = StreamCall::open(gw.port(), AGENT, gw.jane(), &body(&script)).all();
    assert!(ended, "the answer ends properly");
    let error = until_error(&events);
    assert_eq!(error["error"]["code"], "upstream_unavailable");
    assert!(
        deltas(&events).is_empty(),
        "nothing of the oversized event went out"
    );
    wait_streams_ended(&gw, "worker_gone", 1.0);
    gw.assert_jane_charged_nothing(1_000);
}
