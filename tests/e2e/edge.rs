//! The front door (SPEC §1 431, §3 `limits.header_timeout` / `body_timeout`): heads too large
//! for the parser behind get the contract's 431, slow heads and bodies are cut off, and a
//! kept-alive connection may still idle between calls.

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::*;

/// A chat call's bytes with `extra` header lines; `close` asks for `Connection: close`.
fn chat_bytes(gw: &TestGateway, extra: &str, close: bool) -> Vec<u8> {
    let body = br#"{"message": "hi"}"#;
    let connection = if close { "Connection: close\r\n" } else { "" };
    let mut req = format!(
        "POST {} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\n{extra}Content-Length: {}\r\n{connection}\r\n",
        chat_path(AGENT),
        gw.jane(),
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    req
}

fn connect(gw: &TestGateway) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", gw.port())).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream
}

/// Waits for the gateway to close `stream` without answering; returns how long it took.
fn closed_without_answer(mut stream: TcpStream, what: &str) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 256];
    match stream.read(&mut buf) {
        Ok(0) => {}
        // A reset is a close too.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Ok(n) => panic!(
            "{what}: answered instead of closing: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) => panic!("{what}: still open after {:?}: {e}", started.elapsed()),
    }
    started.elapsed()
}

/// A config tweak setting these `limits`.
fn limits(limits: serde_json::Value) -> impl FnOnce(&mut serde_json::Value) + 'static {
    move |c| {
        for (k, v) in limits.as_object().unwrap() {
            c["limits"][k] = v.clone();
        }
    }
}

#[test]
fn a_head_with_more_lines_than_the_parser_takes_is_431_in_the_contract_shape() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let many: String = (0..300).map(|i| format!("X-Line-{i}: v\r\n")).collect();
    let r = gw.raw(&chat_bytes(&gw, &many, true));
    r.error(431, "headers_too_large");
    assert!(r.header("x-request-id").is_some(), "{}", r.body);
    // 200 header lines are fine (and well under the byte limit).
    let some: String = (0..200).map(|i| format!("X-Line-{i}: v\r\n")).collect();
    gw.raw(&chat_bytes(&gw, &some, true)).assert_status(200);
    assert_eq!(w.count(), 1);
    gw.wait_metric("turnpike_requests_total", &[("status", "431")], 1.0);
}

#[test]
fn a_head_over_a_mebibyte_is_431_not_a_bare_400() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let huge = format!("X-Pad: {}\r\n", "p".repeat(1_500_000));
    gw.raw(&chat_bytes(&gw, &huge, true))
        .error(431, "headers_too_large");
    assert_eq!(w.count(), 0);
}

#[test]
fn a_head_that_never_ends_is_closed_at_the_header_timeout() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .config(limits(json!({"header_timeout": "1s"})))
        .worker(&w)
        .start();
    let half = chat_bytes(&gw, "", true);
    let half = &half[..40];
    let mut slow: Vec<TcpStream> = (0..20).map(|_| connect(&gw)).collect();
    for stream in &mut slow {
        stream.write_all(half).unwrap();
    }
    let silent = connect(&gw);
    for (i, stream) in slow.into_iter().enumerate() {
        let took = closed_without_answer(stream, &format!("half a head #{i}"));
        assert!(took < Duration::from_secs(10), "#{i} closed after {took:?}");
    }
    closed_without_answer(silent, "a connection that sent nothing");
    assert_eq!(w.count(), 0);
    // Meanwhile normal calls are served as usual.
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
}

#[test]
fn a_head_sent_slowly_but_in_time_is_served() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .config(limits(json!({"header_timeout": "5s"})))
        .worker(&w)
        .start();
    let request = chat_bytes(&gw, "", true);
    let mut stream = connect(&gw);
    for piece in request.chunks(20) {
        stream.write_all(piece).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    raw::read_response(&mut BufReader::new(stream), "slow head".into()).assert_status(200);
}

#[test]
fn a_kept_alive_connection_may_idle_longer_than_the_header_timeout() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .config(limits(json!({"header_timeout": "1s"})))
        .worker(&w)
        .start();
    let stream = connect(&gw);
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    writer.write_all(&chat_bytes(&gw, "", false)).unwrap();
    raw::read_response(&mut reader, "first call".into()).assert_status(200);
    std::thread::sleep(Duration::from_millis(2500));
    writer.write_all(&chat_bytes(&gw, "", true)).unwrap();
    raw::read_response(&mut reader, "second call, after idling".into()).assert_status(200);
    assert_eq!(w.count(), 2);
}

#[test]
fn a_body_that_trickles_is_408_and_reaches_no_worker() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .config(limits(json!({"body_timeout": "1s"})))
        .worker(&w)
        .balance(1000)
        .reserve(100)
        .start();
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"message\": ",
        chat_path(AGENT),
        gw.jane(),
    );
    let mut stream = connect(&gw);
    stream.write_all(head.as_bytes()).unwrap();
    let reader = BufReader::new(stream.try_clone().unwrap());
    let trickle = std::thread::spawn(move || {
        for _ in 0..40 {
            if stream.write_all(b" ").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let r = raw::read_response(&mut { reader }, "trickled body".into());
    r.error(408, "request_timeout");
    assert!(r.header("x-request-id").is_some());
    trickle.join().unwrap();
    assert_eq!(w.count(), 0);
    gw.assert_jane_charged_nothing(1000);
}
