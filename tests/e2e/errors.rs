//! Every row of the error table the embedded store can produce (SPEC §1 Errors): status, code,
//! JSON content type, a message and a request id. (503 `store_unavailable` needs Redis.)

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::*;

/// A chat body of exactly `len` bytes: `{"message":"xxx..."}`.
fn body_of_len(len: usize) -> Vec<u8> {
    let frame = br#"{"message":""}"#.len();
    let body = serde_json::to_vec(&json!({"message": "x".repeat(len - frame)})).unwrap();
    assert_eq!(body.len(), len);
    body
}

#[test]
fn bad_bodies_are_400_invalid_request() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let long_session = "s".repeat(129);
    let long_session_body = format!(r#"{{"message":"hi","session_id":"{long_session}"}}"#);
    let cases: Vec<(&str, &[u8])> = vec![
        ("not JSON", b"{not json"),
        ("empty body", b""),
        ("truncated JSON", br#"{"message": "hi""#),
        ("an array", b"[1, 2]"),
        ("a string", br#""hello""#),
        ("null", b"null"),
        ("no message", br#"{"session_id": "sess_1"}"#),
        ("empty message", br#"{"message": ""}"#),
        ("numeric message", br#"{"message": 5}"#),
        ("null message", br#"{"message": null}"#),
        ("object message", br#"{"message": {"text": "hi"}}"#),
        (
            "session_id with a space",
            br#"{"message": "hi", "session_id": "has space"}"#,
        ),
        (
            "session_id with a slash",
            br#"{"message": "hi", "session_id": "a/b"}"#,
        ),
        (
            "empty session_id",
            br#"{"message": "hi", "session_id": ""}"#,
        ),
        (
            "numeric session_id",
            br#"{"message": "hi", "session_id": 7}"#,
        ),
        ("session_id of 129 chars", long_session_body.as_bytes()),
    ];
    for (what, body) in cases {
        let r = gw.post_json_bytes(&chat_path(AGENT), gw.jane(), body);
        assert_eq!(r.status, 400, "{what}: {}", r.body);
        r.error(400, "invalid_request");
    }
    assert_eq!(w.count(), 0, "no malformed body reaches the worker");

    // The edges of what is valid.
    let longest = "S".repeat(128);
    let r = gw.call(AGENT).key(gw.jane()).session(&longest).send();
    r.assert_status(200);
    assert_eq!(r.json()["session_id"], longest.as_str());
    let r = gw.call(AGENT).key(gw.jane()).session("a.b:c-d_E9").send();
    r.assert_status(200);
    assert_eq!(r.json()["session_id"], "a.b:c-d_E9");
    assert_eq!(w.count(), 2);
}

#[test]
fn missing_or_garbled_authorization_is_401_with_www_authenticate() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let body = br#"{"message": "hi"}"#;
    let json = ("Content-Type", "application/json");

    let r = gw.post_bytes(&chat_path(AGENT), &[json], body);
    r.error(401, "missing_api_key");
    assert!(
        r.header("www-authenticate")
            .unwrap_or("")
            .to_ascii_lowercase()
            .starts_with("bearer"),
        "WWW-Authenticate: {:?}",
        r.header("www-authenticate")
    );

    let jane = gw.jane().to_string();
    let garbled = [
        "Bearer".to_string(),
        "Bearer ".to_string(),
        "Basic dXNlcjpwYXNz".to_string(),
        jane.clone(),
        format!("Bearer {jane} {jane}"),
        format!("Token {jane}"),
    ];
    for auth in &garbled {
        let r = gw.post_bytes(&chat_path(AGENT), &[json, ("Authorization", auth)], body);
        assert_eq!(r.status, 401, "Authorization: {auth:?} -> {}", r.body);
        r.error_in(401, &["missing_api_key", "invalid_api_key"]);
        assert!(
            r.header("www-authenticate")
                .unwrap_or("")
                .to_ascii_lowercase()
                .starts_with("bearer"),
            "Authorization: {auth:?}: WWW-Authenticate {:?}",
            r.header("www-authenticate")
        );
    }
    assert_eq!(w.count(), 0);
}

#[test]
fn unknown_key_is_401_invalid_api_key() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    for key in [
        new_key(),
        "ak_not_a_real_key_000000".to_string(),
        format!("{}x", gw.jane()),
    ] {
        let r = gw.chat(AGENT, &key, "hi");
        r.error(401, "invalid_api_key");
        assert!(
            r.header("www-authenticate")
                .unwrap_or("")
                .to_ascii_lowercase()
                .starts_with("bearer"),
            "WWW-Authenticate: {:?}",
            r.header("www-authenticate")
        );
        assert!(
            !r.body.contains(&key),
            "the error echoes the key: {}",
            r.body
        );
    }
    assert_eq!(w.count(), 0);
}

#[test]
fn bearer_scheme_is_case_insensitive() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let auth = format!("{scheme} {}", gw.jane());
        let r = gw.post_bytes(
            &chat_path(AGENT),
            &[
                ("Content-Type", "application/json"),
                ("Authorization", &auth),
            ],
            br#"{"message": "hi"}"#,
        );
        assert_eq!(r.status, 200, "scheme {scheme}: {}", r.body);
    }
    assert_eq!(w.count(), 4);
}

#[test]
fn expired_key_is_401_and_unexpired_key_works() {
    let w = Worker::start("w1");
    let expired = new_key();
    let fresh = new_key();
    let (e, f) = (sha256_hex(&expired), sha256_hex(&fresh));
    let gw = TestGateway::builder()
        .worker(&w)
        .config(move |c| {
            let keys = c["keys"].as_array_mut().unwrap();
            keys.push(
                json!({"id": "key_old", "sha256": e, "account": "acct_jane", "agents": "*",
                             "policy": "standard", "expires_at": "2020-01-01T00:00:00Z"}),
            );
            keys.push(
                json!({"id": "key_new", "sha256": f, "account": "acct_jane", "agents": "*",
                             "policy": "standard", "expires_at": "2999-01-01T00:00:00Z"}),
            );
        })
        .start();
    gw.chat(AGENT, &expired, "hi").error(401, "invalid_api_key");
    gw.chat(AGENT, &fresh, "hi").assert_status(200);
    assert_eq!(w.count(), 1);
    assert_eq!(w.last().header("x-key-id"), Some("key_new"));
}

#[test]
fn empty_account_is_402_insufficient_balance() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).balance(0).start();
    gw.chat(AGENT, gw.jane(), "hi")
        .error(402, "insufficient_balance");
    assert_eq!(w.count(), 0);
    assert_eq!(
        gw.metric("turnpike_insufficient_balance_total", &[("agent", AGENT)]),
        1.0
    );
}

#[test]
fn unknown_agent_and_out_of_scope_agent_are_the_same_404() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let unknown = gw
        .chat("ag_does_not_exist", gw.bob(), "hi")
        .error(404, "agent_not_found");
    let out_of_scope = gw
        .chat(OTHER_AGENT, gw.jane(), "hi")
        .error(404, "agent_not_found");
    assert_eq!(
        unknown["message"], out_of_scope["message"],
        "the two 404s must not reveal which case it is"
    );
    let longest_id = format!("ag_{}", "a".repeat(64));
    gw.chat(&longest_id, gw.bob(), "hi")
        .error(404, "agent_not_found");
    assert_eq!(w.count(), 0);
    gw.chat(OTHER_AGENT, gw.bob(), "hi").assert_status(200);
}

#[test]
fn other_paths_are_404_not_found() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let auth = format!("Bearer {}", gw.bob());
    let headers = [
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/json"),
    ];
    let body = br#"{"message": "hi"}"#;
    for path in [
        "/".to_string(),
        "/v1".to_string(),
        "/v1/agents".to_string(),
        format!("/v1/agents/{AGENT}"),
        format!("/v1/agents/{AGENT}/chat/more"),
        format!("/v2/agents/{AGENT}/chat"),
        "/v1/agents/not_an_agent_id/chat".to_string(),
        "/metrics".to_string(),
        "/admin/usage".to_string(),
    ] {
        let r = gw.raw_request("POST", &path, &headers, body);
        assert_eq!(r.status, 404, "POST {path}: {}", r.body);
        r.error(404, "not_found");
        let r = gw.raw_request("GET", &path, &[], b"");
        assert_eq!(r.status, 404, "GET {path}: {}", r.body);
        r.error(404, "not_found");
    }
    assert_eq!(w.count(), 0);
}

#[test]
fn other_methods_on_the_chat_path_are_405_with_allow_post() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let auth = format!("Bearer {}", gw.jane());
    for method in ["GET", "PUT", "DELETE", "PATCH", "OPTIONS"] {
        for with_key in [false, true] {
            let mut headers = vec![("Content-Type", "application/json")];
            if with_key {
                headers.push(("Authorization", auth.as_str()));
            }
            let r = gw.raw_request(method, &chat_path(AGENT), &headers, br#"{"message": "hi"}"#);
            assert_eq!(r.status, 405, "{method} (key: {with_key}): {}", r.body);
            r.error(405, "method_not_allowed");
            assert_eq!(
                r.header("allow").map(str::trim),
                Some("POST"),
                "{method}: Allow header"
            );
        }
    }
    assert_eq!(w.count(), 0);
}

#[test]
fn body_over_the_configured_limit_is_413() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .max_body_bytes(1024)
        .start();
    gw.post_json_bytes(&chat_path(AGENT), gw.jane(), &body_of_len(1025))
        .error(413, "payload_too_large");
    gw.post_json_bytes(&chat_path(AGENT), gw.jane(), &body_of_len(4000))
        .error(413, "payload_too_large");
    assert_eq!(w.count(), 0);
    gw.post_json_bytes(&chat_path(AGENT), gw.jane(), &body_of_len(1024))
        .assert_status(200);
    assert_eq!(w.count(), 1);
}

#[test]
fn chunked_body_over_the_limit_is_413() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .max_body_bytes(1024)
        .start();
    let body = body_of_len(3000);
    let mut req = format!(
        "POST {} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        chat_path(AGENT),
        gw.jane()
    )
    .into_bytes();
    for chunk in body.chunks(500) {
        req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    gw.raw(&req).error(413, "payload_too_large");
    assert_eq!(w.count(), 0);
}

#[test]
fn default_body_limit_is_64_kib_and_a_full_64_kib_body_is_forwarded_whole() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    gw.post_json_bytes(&chat_path(AGENT), gw.jane(), &body_of_len(65537))
        .error(413, "payload_too_large");
    assert_eq!(w.count(), 0);
    let body = body_of_len(65536);
    let r = gw.post_json_bytes(&chat_path(AGENT), gw.jane(), &body);
    r.assert_status(200);
    let seen = w.last();
    assert_eq!(
        seen.body["message"].as_str().map(str::len),
        Some(65536 - br#"{"message":""}"#.len()),
        "the worker got the whole message"
    );
}

#[test]
fn non_json_content_type_is_415() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let auth = format!("Bearer {}", gw.jane());
    let body = br#"{"message": "hi"}"#;
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "text/json-ish",
        "application/xml",
    ] {
        let r = gw.post_bytes(
            &chat_path(AGENT),
            &[("Authorization", &auth), ("Content-Type", ct)],
            body,
        );
        assert_eq!(r.status, 415, "Content-Type {ct}: {}", r.body);
        r.error(415, "unsupported_media_type");
    }
    assert_eq!(w.count(), 0);
    for ct in [
        "application/json; charset=utf-8",
        "application/json;charset=UTF-8",
    ] {
        let r = gw.post_bytes(
            &chat_path(AGENT),
            &[("Authorization", &auth), ("Content-Type", ct)],
            body,
        );
        assert_eq!(r.status, 200, "Content-Type {ct}: {}", r.body);
    }
    assert_eq!(w.count(), 2);
}

fn head_with_padding(gw: &TestGateway, pad: usize) -> Vec<u8> {
    let body = br#"{"message": "hi"}"#;
    let mut req = format!(
        "POST {} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nX-Pad: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        chat_path(AGENT),
        gw.jane(),
        "p".repeat(pad),
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    req
}

#[test]
fn oversized_request_head_is_431() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    gw.raw(&head_with_padding(&gw, 20 * 1024))
        .error(431, "headers_too_large");
    assert_eq!(w.count(), 0);
    gw.raw(&head_with_padding(&gw, 8 * 1024)).assert_status(200);
    assert_eq!(w.count(), 1);
}

#[test]
fn configured_head_limit_is_enforced() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .max_header_bytes(2048)
        .start();
    gw.raw(&head_with_padding(&gw, 3000))
        .error(431, "headers_too_large");
    assert_eq!(w.count(), 0);
    gw.raw(&head_with_padding(&gw, 500)).assert_status(200);
    assert_eq!(w.count(), 1);
}

#[test]
fn refused_connection_is_502() {
    let gw = TestGateway::builder()
        .endpoint(&format!("127.0.0.1:{}", free_port()))
        .start();
    gw.chat(AGENT, gw.jane(), "hi")
        .error(502, "upstream_unavailable");
}

#[test]
fn non_http_answer_is_502() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    gw.chat(AGENT, gw.jane(), Script::garbage())
        .error(502, "upstream_unavailable");
    gw.chat(AGENT, gw.jane(), Script::close())
        .error(502, "upstream_unavailable");
    assert!(w.count() >= 2);
}

#[test]
fn slow_worker_is_504_at_the_timeout() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).timeout("500ms").start();
    let started = Instant::now();
    gw.chat(AGENT, gw.jane(), Script::sleep(2.0))
        .error(504, "upstream_timeout");
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(1800),
        "answered after {took:?}, not at the 500ms timeout"
    );
    assert!(
        took >= Duration::from_millis(400),
        "answered after {took:?}, before the timeout"
    );
}

#[test]
fn two_authorization_headers_are_401_whichever_comes_first() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let body = br#"{"message":"hi"}"#;
    let good = format!("Bearer {}", gw.jane());
    for pair in [
        [good.as_str(), "Bearer garbage"],
        ["Bearer garbage", good.as_str()],
        [good.as_str(), good.as_str()],
    ] {
        let r = gw.raw_request(
            "POST",
            &chat_path(AGENT),
            &[
                ("Authorization", pair[0]),
                ("Authorization", pair[1]),
                ("Content-Type", "application/json"),
            ],
            body,
        );
        r.error(401, "missing_api_key");
    }
    assert_eq!(w.count(), 0);
}
