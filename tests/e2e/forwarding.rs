//! What the worker receives and what the client gets back (SPEC §1 Headers, Success).

use std::collections::HashSet;
use std::time::Duration;

use serde_json::json;

use crate::support::*;

#[test]
fn worker_receives_the_rewritten_call_with_identity_headers() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let r = gw
        .call(AGENT)
        .key(gw.jane())
        .message("What are your business hours?")
        .session("sess_customer_jane_001")
        .field(
            "metadata",
            json!({"channel": "web", "tags": [1, "two", null]}),
        )
        .field("temperature", json!(0.25))
        .send();
    r.assert_status(200);

    let seen = w.last();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.path, format!("/internal/{AGENT}/invoke"));
    assert_eq!(
        seen.header_values("x-request-id"),
        vec![r.header("x-request-id").unwrap()]
    );
    assert_eq!(seen.header_values("x-agent-id"), vec![AGENT]);
    assert_eq!(
        seen.header_values("x-session-id"),
        vec!["sess_customer_jane_001"]
    );
    assert_eq!(seen.header_values("x-key-id"), vec!["key_jane"]);
    assert_eq!(seen.header_values("x-account-id"), vec!["acct_jane"]);
    assert_eq!(seen.header_values("x-upstream-token"), vec!["s3cret"]);
    assert_eq!(
        seen.header("authorization"),
        None,
        "Authorization is never forwarded"
    );
    assert_eq!(
        seen.body,
        json!({
            "message": "What are your business hours?",
            "session_id": "sess_customer_jane_001",
            "metadata": {"channel": "web", "tags": [1, "two", null]},
            "temperature": 0.25,
        }),
        "the body is forwarded unchanged"
    );
    let everything = format!("{:?}{}", seen.headers, seen.raw_body);
    assert!(
        !everything.contains(gw.jane()),
        "the secret reached the worker"
    );

    let body = r.json();
    assert!(
        r.header("content-type")
            .unwrap_or("")
            .starts_with("application/json"),
        "content-type {:?}",
        r.header("content-type")
    );
    assert_eq!(body["response"], "w1: What are your business hours?");
    assert_eq!(body["session_id"], "sess_customer_jane_001");
    assert_eq!(
        body["usage"],
        json!({"input_tokens": 45, "output_tokens": 32, "total_tokens": 77})
    );
    for name in ["ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"] {
        assert!(r.header(name).is_some(), "no {name} on a successful call");
    }
}

#[test]
fn client_sent_identity_headers_are_overwritten() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    gw.call(AGENT)
        .key(gw.jane())
        .session("sess_real")
        .header("X-Key-Id", "key_bob")
        .header("X-Account-Id", "acct_bob")
        .header("X-Agent-Id", "ag_spoofed")
        .header("X-Session-Id", "sess_spoofed")
        .header("X-Upstream-Token", "forged")
        .send()
        .assert_status(200);
    let seen = w.last();
    assert_eq!(seen.header_values("x-key-id"), vec!["key_jane"]);
    assert_eq!(seen.header_values("x-account-id"), vec!["acct_jane"]);
    assert_eq!(seen.header_values("x-agent-id"), vec![AGENT]);
    assert_eq!(seen.header_values("x-session-id"), vec!["sess_real"]);
    assert_eq!(seen.header_values("x-upstream-token"), vec!["s3cret"]);
}

#[test]
fn other_agent_and_key_are_named_to_the_worker() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let r = gw.chat(OTHER_AGENT, gw.bob(), "hi");
    r.assert_status(200);
    let seen = w.last();
    assert_eq!(seen.path, format!("/internal/{OTHER_AGENT}/invoke"));
    assert_eq!(seen.header("x-agent-id"), Some(OTHER_AGENT));
    assert_eq!(seen.header("x-key-id"), Some("key_bob"));
    assert_eq!(seen.header("x-account-id"), Some("acct_bob"));
    assert_eq!(r.json()["response"], "w1: hi");
}

#[test]
fn a_sane_client_request_id_is_echoed_and_forwarded() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let id = "req-e2e-0001_abc.DEF";
    let r = gw
        .call(AGENT)
        .key(gw.jane())
        .header("X-Request-Id", id)
        .send();
    r.assert_status(200);
    assert_eq!(r.header("x-request-id"), Some(id));
    assert_eq!(w.last().header_values("x-request-id"), vec![id]);

    // Errors carry it too, in the header and the body.
    let r = gw
        .call(AGENT)
        .key(&new_key())
        .header("X-Request-Id", id)
        .send();
    let e = r.error(401, "invalid_api_key");
    assert_eq!(e["request_id"], id);
}

#[test]
fn an_insane_client_request_id_is_replaced() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let bad = r#"bad id "with" spaces <and> {braces}"#;
    let r = gw
        .call(AGENT)
        .key(gw.jane())
        .header("X-Request-Id", bad)
        .send();
    r.assert_status(200);
    let id = r.header("x-request-id").expect("a request id").to_string();
    assert!(!id.is_empty() && id != bad, "kept the insane id {id:?}");
    assert_eq!(w.last().header_values("x-request-id"), vec![id.as_str()]);
}

#[test]
fn every_response_gets_a_fresh_request_id() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let mut ids = HashSet::new();
    for i in 0..5 {
        let r = gw.chat(AGENT, gw.jane(), "hi");
        r.assert_status(200);
        let id = r.header("x-request-id").expect("X-Request-Id").to_string();
        assert_eq!(w.seen()[i].header("x-request-id"), Some(id.as_str()));
        ids.insert(id);
    }
    assert_eq!(ids.len(), 5, "request ids repeat: {ids:?}");
    // Error responses carry one as well.
    let r = gw.raw_request("GET", "/nowhere", &[], b"");
    assert!(r.header("x-request-id").is_some_and(|v| !v.is_empty()));
    let r = gw.chat(AGENT, &new_key(), "hi");
    assert!(r.header("x-request-id").is_some_and(|v| !ids.contains(v)));
}

#[test]
fn the_workers_status_and_body_come_back() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let r = gw.chat(AGENT, gw.jane(), Script::status(201));
    r.assert_status(201);
    let body = r.json();
    assert_eq!(body["response"], format!("w1: {}", Script::status(201)));
    assert_eq!(body["usage"]["total_tokens"], 77);
    let r = gw.chat(AGENT, gw.jane(), Script::usage(7, 9));
    r.assert_status(200);
    assert_eq!(
        r.json()["usage"],
        json!({"input_tokens": 7, "output_tokens": 9, "total_tokens": 16})
    );
}

#[test]
fn a_body_over_64_kib_is_forwarded_whole_when_the_limit_allows_it() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .max_body_bytes(2 * 1024 * 1024)
        .start();
    // 1 MiB of text, not one repeated byte, so a lost or repeated slice would show.
    let message: String = (0..1024 * 1024)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    let body = serde_json::to_vec(&json!({"message": message})).unwrap();
    assert!(body.len() > 1024 * 1024);
    let r = gw.post_json_bytes(&chat_path(AGENT), gw.jane(), &body);
    r.assert_status(200);
    assert_eq!(w.count(), 1);
    let seen = w.last();
    let got = seen.body["message"].as_str().unwrap_or_default();
    assert_eq!(
        got.len(),
        message.len(),
        "the worker got {} of the {} bytes of the message (raw body {} bytes)",
        got.len(),
        message.len(),
        seen.raw_body.len()
    );
    assert!(got == message, "the worker got a different message");
}

#[test]
fn the_worker_is_asked_for_an_identity_encoding() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    gw.call(AGENT)
        .key(gw.jane())
        .header("Accept-Encoding", "gzip, br")
        .send()
        .assert_status(200);
    assert_eq!(w.last().header_values("accept-encoding"), vec!["identity"]);
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
    assert_eq!(w.last().header_values("accept-encoding"), vec!["identity"]);
}

#[test]
fn expect_100_continue_is_answered_before_the_body_is_sent() {
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpStream;
    use std::time::{Duration, Instant};

    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let body = br#"{"message": "continued"}"#;
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\
         Connection: close\r\n\r\n",
        chat_path(AGENT),
        gw.jane(),
        body.len()
    );
    let mut stream = TcpStream::connect(("127.0.0.1", gw.port())).expect("connect");
    stream.write_all(head.as_bytes()).unwrap();
    stream.flush().unwrap();
    // The interim answer must come while the body is still held back.
    let started = Instant::now();
    stream
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut status_line = String::new();
    reader.read_line(&mut status_line).unwrap_or_else(|e| {
        panic!(
            "no interim answer within 1 s of the head ({e}); the gateway waited for the body \
             (read so far: {status_line:?})"
        )
    });
    assert!(
        status_line.starts_with("HTTP/1.1 100"),
        "expected `HTTP/1.1 100 Continue` before the body, got {status_line:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    loop {
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .expect("the rest of the 100 head");
        if line.trim().is_empty() {
            break;
        }
    }
    assert_eq!(w.count(), 0, "nothing is forwarded before the body");
    stream.write_all(body).unwrap();
    stream.flush().unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let r = raw::read_response(&mut reader, "POST with Expect: 100-continue".into());
    r.assert_status(200);
    assert_eq!(r.json()["response"], "w1: continued");
    assert_eq!(w.last().body["message"], "continued");
}

#[test]
fn identity_headers_spelt_with_underscores_and_connection_named_headers_stay_behind() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let body = br#"{"message":"hi"}"#;
    let key = format!("Bearer {}", gw.jane());
    gw.raw_request(
        "POST",
        &chat_path(AGENT),
        &[
            ("Authorization", key.as_str()),
            ("Content-Type", "application/json"),
            ("X_Account_Id", "acct_evil"),
            ("X_Key_Id", "key_evil"),
            ("x_forwarded_for", "10.6.6.6"),
            ("Idempotency_Key", "mine"),
            ("Connection", "X-Hop-Secret, x-other-hop"),
            ("X-Hop-Secret", "s"),
            ("X-Other-Hop", "o"),
            ("X-Plain_Underscore", "kept"),
        ],
        body,
    )
    .assert_status(200);
    let seen = w.last();
    for gone in [
        "x_account_id",
        "x_key_id",
        "x_forwarded_for",
        "idempotency_key",
        "x-hop-secret",
        "x-other-hop",
    ] {
        assert_eq!(seen.header(gone), None, "{gone} reached the worker");
    }
    assert_eq!(seen.header_values("x-account-id"), vec!["acct_jane"]);
    assert_eq!(seen.header_values("x-forwarded-for"), vec!["127.0.0.1"]);
    assert!(seen
        .header("idempotency-key")
        .is_some_and(|k| k.starts_with("call_")));
    // An underscore name that is no gateway header passes.
    assert_eq!(seen.header("x-plain_underscore"), Some("kept"));
}

#[test]
fn headers_the_worker_names_in_connection_stay_behind() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let r = gw.chat(AGENT, gw.jane(), Script::hop_header());
    r.assert_status(200);
    assert_eq!(r.header("x-worker-hop"), None);
    assert_eq!(r.header("x-worker-kept"), Some("yes"));
}

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// Whether `value` is a W3C `traceparent` of version 00.
fn is_traceparent(value: &str) -> bool {
    let fields: Vec<&str> = value.split('-').collect();
    fields.len() == 4
        && [2, 32, 16, 2]
            .iter()
            .zip(&fields)
            .all(|(len, f)| f.len() == *len && f.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[test]
fn a_clients_trace_context_reaches_the_worker_unchanged_and_is_logged() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    gw.call(AGENT)
        .key(gw.jane())
        .header("traceparent", TRACEPARENT)
        .header("tracestate", "vendor=abc")
        .send()
        .assert_status(200);
    let seen = w.last();
    assert_eq!(seen.header_values("traceparent"), vec![TRACEPARENT]);
    assert_eq!(seen.header("tracestate"), Some("vendor=abc"));
    wait_until(
        Duration::from_secs(3),
        "the access line has the trace id",
        || gw.log().contains("4bf92f3577b34da6a3ce929d0e0e4736"),
    );
    let log = gw.log();
    let line = log
        .lines()
        .find(|l| l.contains("4bf92f3577b34da6a3ce929d0e0e4736"))
        .unwrap();
    // The access line also names the worker that answered and what the gateway decided.
    assert!(line.contains(&w.addr()), "{line}");
    assert!(line.contains("forwarded"), "{line}");
    assert!(line.contains("admit_ms"), "{line}");
}

#[test]
fn a_missing_or_malformed_traceparent_starts_a_new_trace_without_the_tracestate() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
    let first = w
        .last()
        .header("traceparent")
        .unwrap_or_default()
        .to_owned();
    assert!(is_traceparent(&first), "{first:?}");
    gw.call(AGENT)
        .key(gw.jane())
        .header("traceparent", "00-not-a-trace-01")
        .header("tracestate", "vendor=abc")
        .send()
        .assert_status(200);
    let seen = w.last();
    let second = seen.header_values("traceparent");
    assert_eq!(second.len(), 1, "{second:?}");
    assert!(
        is_traceparent(second[0]) && second[0] != first,
        "{second:?}"
    );
    assert_eq!(seen.header("tracestate"), None);
}
