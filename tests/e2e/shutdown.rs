//! SIGTERM drains (every rolling deploy sends one): `/readyz` fails first, answers close their
//! connections, the listener stops accepting, calls in flight finish within `shutdown_grace`
//! and are settled, then the process exits by itself. Runs on every store; on Redis the books
//! are checked again by a gateway started after the drain.

use serde_json::json;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::support::raw::read_response;
use crate::support::redis::StoreUnderTest;
use crate::support::tls::{h2_calls, h2_chat, H2Over, H2Session};
use crate::support::{chat_path, wait_until, Reply, Script, TestGateway, Worker, AGENT};

/// A gateway in front of `w` that drains with this delay and grace.
fn draining_gateway(w: &Worker, delay: &str, grace: &str) -> TestGateway {
    let (delay, grace) = (delay.to_owned(), grace.to_owned());
    let gw = TestGateway::builder()
        .worker(w)
        .timeout("20s")
        .config(move |c| {
            c["shutdown_delay"] = json!(delay);
            c["shutdown_grace"] = json!(grace);
        })
        .start();
    // Ready can come before the signal handlers are in place: a signal then would kill it.
    wait_until(
        Duration::from_secs(10),
        "the stop signals are watched",
        || gw.log().contains("watching for stop signals"),
    );
    gw
}

/// Waits for the gateway process to end by itself, successfully.
fn wait_for_exit(gw: &TestGateway, within: Duration) {
    wait_until(within, "the gateway exits after draining", || {
        gw.exited().is_some()
    });
    let status = gw.exited().expect("exited");
    assert!(status.success(), "exit status {status}; log:\n{}", gw.log());
}

/// Sends a call the worker takes a minute over, on a connection of its own, and returns once
/// the worker has it; the connection is kept open for the answer that would follow.
fn start_a_minute_long_call(gw: &TestGateway, w: &Worker) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", gw.port())).unwrap();
    let body = json!({"message": Script::sleep(60.0).to_string()}).to_string();
    let request = format!(
        "POST {} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        chat_path(AGENT),
        gw.jane(),
        body.len()
    );
    (&stream).write_all(request.as_bytes()).unwrap();
    wait_until(
        Duration::from_secs(10),
        "the call reaches the worker",
        || w.count() == 1,
    );
    stream
}

/// One keep-alive client: chat calls on one connection, a new one whenever an answer says
/// `Connection: close`, until a connection is refused. A connection the kernel took into the
/// listen queue just as the listener closed is reset before it is answered: the client
/// counts that as refused too (the worker never sees that call, which the test checks).
/// Every other call sent must be answered 200: a call cut on a connection that had answered
/// before panics in `read_response`. Returns how many were answered.
fn keep_calling(gw: &TestGateway, key: &str, stop_sending: &AtomicBool) -> u64 {
    let body = json!({"message": Script::sleep(0.05).to_string()}).to_string();
    let request = format!(
        "POST {} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        chat_path(AGENT),
        body.len()
    );
    let mut answered = 0;
    'connections: loop {
        let stream = match TcpStream::connect(("127.0.0.1", gw.port())) {
            Ok(stream) => stream,
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => return answered,
            Err(e) => panic!("connect: {e}"),
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut writer = stream;
        let mut fresh = true;
        loop {
            if stop_sending.load(Ordering::Relaxed) {
                return answered;
            }
            let sent = writer.write_all(request.as_bytes());
            if fresh && (sent.is_err() || reader.fill_buf().map_or(true, |b| b.is_empty())) {
                return answered;
            }
            sent.unwrap();
            fresh = false;
            let reply: Reply = read_response(&mut reader, format!("call {answered}"));
            reply.assert_status(200);
            answered += 1;
            if reply
                .header("connection")
                .is_some_and(|v| v.eq_ignore_ascii_case("close"))
            {
                continue 'connections;
            }
        }
    }
}

#[test]
fn sigterm_fails_readyz_first_then_lets_calls_in_flight_finish() {
    let w = Worker::start("w1");
    let gw = draining_gateway(&w, "3s", "20s");
    let started_balance = gw.balance("acct_jane").balance;
    std::thread::scope(|s| {
        let slow: Vec<_> = (0..6)
            .map(|_| s.spawn(|| gw.chat(AGENT, gw.jane(), Script::sleep(2.5))))
            .collect();
        wait_until(Duration::from_secs(10), "six calls at the worker", || {
            w.count() == 6
        });
        gw.signal("TERM");
        // During the delay: not ready, but still serving, each answer closing its connection.
        wait_until(Duration::from_secs(2), "/readyz fails", || {
            gw.open_get("/readyz").status == 503
        });
        assert_eq!(gw.open_get("/readyz").json()["status"], "draining");
        let during = gw.chat(AGENT, gw.jane(), "hi");
        during.assert_status(200);
        assert_eq!(during.header("connection"), Some("close"));
        // After it: no new connection is accepted, and the calls in flight still finish.
        wait_until(Duration::from_secs(10), "the listener closes", || {
            TcpStream::connect(("127.0.0.1", gw.port())).is_err()
        });
        for call in slow {
            let r = call.join().unwrap();
            r.assert_status(200);
            assert!(r.json()["usage"]["total_tokens"].as_i64().unwrap() > 0);
        }
    });
    wait_for_exit(&gw, Duration::from_secs(15));
    assert!(gw.log().contains("drained"), "log:\n{}", gw.log());
    // Seven calls answered and metered: on Redis, a gateway started after the drain finds
    // them all settled.
    if StoreUnderTest::from_env() != StoreUnderTest::Memory {
        gw.restart();
        assert_eq!(gw.usage_after("account=acct_jane", 7).requests, 7);
        let after = gw.settled_balance("acct_jane");
        assert!(after.balance < started_balance);
    }
}

#[test]
fn sigterm_under_load_cuts_no_call_and_loses_no_settlement() {
    let w = Worker::start("w1");
    let gw = draining_gateway(&w, "500ms", "20s");
    let stop_sending = AtomicBool::new(false);
    let answered: u64 = std::thread::scope(|s| {
        let clients: Vec<_> = (0..4)
            .map(|_| s.spawn(|| keep_calling(&gw, gw.jane(), &stop_sending)))
            .collect();
        wait_until(Duration::from_secs(10), "traffic flows", || w.count() >= 20);
        gw.signal("TERM");
        // A client that never meets a refused connection (one kept open by the delay) stops
        // sending once the drain must be over.
        std::thread::sleep(Duration::from_secs(5));
        stop_sending.store(true, Ordering::Relaxed);
        clients.into_iter().map(|c| c.join().unwrap()).sum()
    });
    wait_for_exit(&gw, Duration::from_secs(15));
    assert_eq!(
        answered,
        w.count() as u64,
        "every call the worker saw was answered"
    );
    if StoreUnderTest::from_env() != StoreUnderTest::Memory {
        gw.restart();
        let usage = gw.usage_after("account=acct_jane", answered as i64);
        assert_eq!(usage.requests, answered as i64);
        assert_eq!(gw.settled_balance("acct_jane").reserved, 0);
    }
}

#[test]
fn a_call_longer_than_the_grace_is_cut_when_the_grace_ends() {
    let w = Worker::start("w1");
    let gw = draining_gateway(&w, "0s", "1s");
    let _endless = start_a_minute_long_call(&gw, &w);
    gw.signal("TERM");
    // Well before the worker's 60 s: the grace, not the call, ends the drain.
    wait_for_exit(&gw, Duration::from_secs(10));
    assert!(
        gw.log().contains("calls still in flight are cut"),
        "log:\n{}",
        gw.log()
    );
}

#[test]
fn an_idle_gateway_exits_promptly_on_sigterm_and_at_once_on_sigint() {
    let w = Worker::start("w1");
    let gw = draining_gateway(&w, "0s", "30s");
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
    gw.signal("TERM");
    wait_for_exit(&gw, Duration::from_secs(10));

    let gw = draining_gateway(&w, "0s", "30s");
    gw.signal("INT");
    wait_for_exit(&gw, Duration::from_secs(10));
}

#[test]
fn a_second_stop_signal_during_a_drain_exits_at_once() {
    let w = Worker::start("w1");
    let gw = draining_gateway(&w, "0s", "60s");
    let _long = start_a_minute_long_call(&gw, &w);
    gw.signal("TERM");
    wait_until(Duration::from_secs(5), "the drain starts", || {
        gw.log().contains("draining")
    });
    assert!(gw.exited().is_none(), "exited before the call ended");
    gw.signal("INT");
    wait_until(Duration::from_secs(10), "the gateway exits", || {
        gw.exited().is_some()
    });
    assert_eq!(gw.exited().unwrap().code(), Some(1));
}

#[test]
fn a_drain_lets_http2_calls_finish_and_closes_idle_http2_connections() {
    let w = Worker::start("w1");
    let gw = draining_gateway(&w, "0s", "20s");
    // One HTTP/2 connection that has served a call and is idle now.
    let idle = H2Session::cleartext(gw.port());
    idle.call(&h2_chat(gw.jane(), "hi")).assert_status(200);
    // A slow call on another, in flight when the signal comes.
    let port = gw.port();
    let slow_call = h2_chat(gw.jane(), &Script::sleep(2.0).to_string());
    let slow = std::thread::spawn(move || h2_calls(port, H2Over::Cleartext, &[slow_call]));
    wait_until(
        Duration::from_secs(10),
        "the slow call reaches the worker",
        || w.count() == 2,
    );
    gw.signal("TERM");
    slow.join().unwrap()[0].assert_status(200);
    // The idle connection does not hold the drain: the process ends by itself.
    wait_for_exit(&gw, Duration::from_secs(15));
    drop(idle);
}

/// A client that hung up before its answer ends its call (SPEC §2); the drain still waits
/// for that call to be settled and logged before the process exits.
#[test]
fn a_drain_waits_for_an_http2_call_whose_client_hung_up() {
    let w = Worker::start("w1");
    let gw = draining_gateway(&w, "0s", "20s");
    let slow = h2_chat(gw.jane(), &Script::sleep(3.0).to_string());
    let session = H2Session::cleartext(gw.port());
    session.start(&slow);
    wait_until(
        Duration::from_secs(10),
        "the call reaches the worker",
        || w.count() == 1,
    );
    // The client hangs up: its connection closes, and its call to the worker with it.
    drop(session);
    gw.signal("TERM");
    wait_for_exit(&gw, Duration::from_secs(15));
    assert_eq!(w.hang_ups().len(), 1, "the worker's call was closed");
    let log = gw.log();
    assert!(
        log.lines()
            .any(|l| l.contains("access") && l.contains("decision=\"client_gone\"")),
        "the call ended, and was logged, before the process exited:\n{log}"
    );
}
