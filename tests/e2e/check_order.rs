//! The order of checks (SPEC §1): route → authentication (401) → agent and key scope (404) →
//! body (413, 415, 400) → rate limits (429) → balance (402) → proxy. Whatever is refused before
//! the rate-limit step consumes no quota and no balance.

use serde_json::json;

use crate::support::*;

/// One call a minute, no burst beyond it.
fn one_call_per_minute() -> serde_json::Value {
    json!({"requests": {"rate": 1, "per": "1m", "burst": 1}})
}

#[test]
fn route_comes_before_authentication() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    gw.raw_request("GET", &chat_path(AGENT), &[], b"")
        .error(405, "method_not_allowed");
    gw.raw_request(
        "POST",
        "/v1/agents/not-an-agent/chat",
        &[("Content-Type", "application/json")],
        br#"{"message": "hi"}"#,
    )
    .error(404, "not_found");
}

#[test]
fn authentication_comes_before_agent_lookup_and_body() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    // An invalid key on an unknown agent is a 401, never a 404 that probes the catalogue.
    gw.chat("ag_does_not_exist", &new_key(), "hi")
        .error(401, "invalid_api_key");
    gw.call("ag_does_not_exist")
        .send()
        .error(401, "missing_api_key");
    // ... and on a broken body it is still a 401.
    gw.post_json_bytes(&chat_path(AGENT), &new_key(), b"{not json")
        .error(401, "invalid_api_key");
    gw.post_bytes(&chat_path(AGENT), &[("Content-Type", "text/plain")], b"hi")
        .error(401, "missing_api_key");
    assert_eq!(w.count(), 0);
}

#[test]
fn scope_comes_before_body_checks() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .max_body_bytes(1024)
        .start();
    let auth = format!("Bearer {}", gw.jane());
    let path = chat_path(OTHER_AGENT); // jane may only call AGENT
    let json_ct = ("Content-Type", "application/json");
    gw.post_bytes(&path, &[("Authorization", &auth), json_ct], b"{not json")
        .error(404, "agent_not_found");
    gw.post_bytes(
        &path,
        &[("Authorization", &auth), ("Content-Type", "text/plain")],
        b"hi",
    )
    .error(404, "agent_not_found");
    let big = format!(r#"{{"message": "{}"}}"#, "x".repeat(4000));
    gw.post_bytes(&path, &[("Authorization", &auth), json_ct], big.as_bytes())
        .error(404, "agent_not_found");
    assert_eq!(w.count(), 0);
}

#[test]
fn body_checks_run_413_then_415_then_400() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .max_body_bytes(1024)
        .start();
    let auth = format!("Bearer {}", gw.jane());
    let big_garbage = "not json ".repeat(300);
    gw.post_bytes(
        &chat_path(AGENT),
        &[("Authorization", &auth), ("Content-Type", "text/plain")],
        big_garbage.as_bytes(),
    )
    .error(413, "payload_too_large");
    gw.post_bytes(
        &chat_path(AGENT),
        &[("Authorization", &auth), ("Content-Type", "text/plain")],
        b"not json",
    )
    .error(415, "unsupported_media_type");
    assert_eq!(w.count(), 0);
}

#[test]
fn refused_before_the_rate_limit_costs_no_quota() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .max_body_bytes(1024)
        .policy("standard", one_call_per_minute())
        .start();
    let auth = format!("Bearer {}", gw.jane());
    let path = chat_path(AGENT);
    for _ in 0..3 {
        gw.post_json_bytes(&path, gw.jane(), b"{not json")
            .error(400, "invalid_request");
        gw.post_json_bytes(&path, gw.jane(), br#"{"message": ""}"#)
            .error(400, "invalid_request");
        gw.post_bytes(
            &path,
            &[("Authorization", &auth), ("Content-Type", "text/plain")],
            b"hi",
        )
        .error(415, "unsupported_media_type");
        let big = format!(r#"{{"message": "{}"}}"#, "x".repeat(2000));
        gw.post_json_bytes(&path, gw.jane(), big.as_bytes())
            .error(413, "payload_too_large");
        gw.chat(OTHER_AGENT, gw.jane(), "hi")
            .error(404, "agent_not_found");
    }
    // The single call of the minute is still there...
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
    // ... and now it is gone.
    gw.chat(AGENT, gw.jane(), "hi")
        .error(429, "rate_limit_exceeded");
    // A bad body is still judged before the (empty) bucket.
    gw.post_json_bytes(&path, gw.jane(), b"{not json")
        .error(400, "invalid_request");
    gw.chat(OTHER_AGENT, gw.jane(), "hi")
        .error(404, "agent_not_found");
    assert_eq!(w.count(), 1);
    assert_eq!(
        gw.settled_balance("acct_jane").balance,
        10_000_000 - (45 + 2 * 32)
    );
}

#[test]
fn rate_limit_comes_before_balance() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .policy("standard", one_call_per_minute())
        .account_balance("acct_bob", 0)
        .start();
    // bob's one call of the minute goes to the free agent...
    gw.chat(OTHER_AGENT, gw.bob(), "hi").assert_status(200);
    // ... so the priced agent refuses with 429 even though bob cannot pay either.
    gw.chat(AGENT, gw.bob(), "hi")
        .error(429, "rate_limit_exceeded");
    assert_eq!(w.count(), 1);
}

#[test]
fn balance_comes_before_proxy() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .account_balance("acct_jane", 0)
        .start();
    gw.chat(AGENT, gw.jane(), "hi")
        .error(402, "insufficient_balance");
    assert_eq!(w.count(), 0);
    assert_eq!(
        gw.balance("acct_jane"),
        Balance {
            balance: 0,
            reserved: 0
        }
    );
}

#[test]
fn an_oversized_chunked_body_is_413_before_its_content_type_is_judged() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .max_body_bytes(1024)
        .start();
    let body = "not json ".repeat(400); // 3600 bytes, no Content-Length
    let mut req = format!(
        "POST {} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\n\
         Content-Type: text/plain\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        chat_path(AGENT),
        gw.jane()
    )
    .into_bytes();
    for chunk in body.as_bytes().chunks(500) {
        req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    gw.raw(&req).error(413, "payload_too_large");
    // The same content type on a small chunked body is judged on its type.
    let small = format!(
        "POST {} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\n\
         Content-Type: text/plain\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
         8\r\nnot json\r\n0\r\n\r\n",
        chat_path(AGENT),
        gw.jane()
    );
    gw.raw(small.as_bytes())
        .error(415, "unsupported_media_type");
    assert_eq!(w.count(), 0);
}
