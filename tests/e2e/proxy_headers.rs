//! The headers between client, gateway and worker that a proxy in front, a CGI-style worker
//! or a careless client could be fooled by (SPEC §1 Headers): forwarding headers believed
//! only from `trusted_proxies`, no spelling of a route's configured header from a client,
//! the worker's `Server` kept from clients, HTTP/2's cookie crumbs joined and its malformed
//! field values refused, `Host` required once on HTTP/1.1.

use serde_json::json;

use crate::support::tls::{h2_calls, h2_chat, H2Over, H2Request};
use crate::support::*;

/// What a client may send to pose as a proxy in front.
const FORWARDING: [(&str, &str); 5] = [
    ("X-Forwarded-For", "10.1.2.3"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "evil.example"),
    ("X-Real-IP", "10.9.9.9"),
    ("Forwarded", "for=10.1.2.3;proto=https"),
];

fn call_with(gw: &TestGateway, headers: &[(&str, &str)]) -> Reply {
    let mut call = gw.call(AGENT).key(gw.jane());
    for (name, value) in headers {
        call = call.header(name, value);
    }
    call.send()
}

#[test]
fn forwarding_headers_from_an_untrusted_peer_are_replaced_by_the_gateways_own() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    call_with(&gw, &FORWARDING).assert_status(200);
    let seen = w.last();
    assert_eq!(seen.header_values("x-forwarded-for"), vec!["127.0.0.1"]);
    assert_eq!(seen.header_values("x-forwarded-proto"), vec!["http"]);
    for gone in ["x-forwarded-host", "x-real-ip", "forwarded"] {
        assert_eq!(seen.header(gone), None, "{gone} reached the worker");
    }
}

#[test]
fn forwarding_headers_from_a_trusted_proxy_are_kept_and_the_chain_extended() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .config(|c| c["trusted_proxies"] = json!(["10.0.0.0/8", "127.0.0.1/32"]))
        .start();
    call_with(&gw, &FORWARDING).assert_status(200);
    let seen = w.last();
    assert_eq!(
        seen.header_values("x-forwarded-for"),
        vec!["10.1.2.3, 127.0.0.1"]
    );
    assert_eq!(seen.header_values("x-forwarded-proto"), vec!["https"]);
    assert_eq!(seen.header_values("x-forwarded-host"), vec!["evil.example"]);
    assert_eq!(seen.header_values("x-real-ip"), vec!["10.9.9.9"]);
    assert_eq!(
        seen.header_values("forwarded"),
        vec!["for=10.1.2.3;proto=https"]
    );
    // Without a chain of its own, the proxy's call gets the peer and the listener's scheme.
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
    let seen = w.last();
    assert_eq!(seen.header_values("x-forwarded-for"), vec!["127.0.0.1"]);
    assert_eq!(seen.header_values("x-forwarded-proto"), vec!["http"]);
}

#[test]
fn trusted_proxies_must_be_addresses_or_cidr_blocks() {
    let files = TestGateway::builder()
        .config(|c| c["trusted_proxies"] = json!(["10.0.0.0/8", "10.0.0.0/33", "proxy.local"]))
        .write();
    let out = files.check();
    assert!(!out.status.success());
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("trusted_proxies[1]"), "{text}");
    assert!(text.contains("trusted_proxies[2]"), "{text}");
    assert!(!text.contains("trusted_proxies[0]"), "{text}");
}

/// Every spelling a CGI or WSGI worker reads as a configured pool header.
const FORGED_POOL_HEADERS: [(&str, &str); 3] = [
    ("X_Upstream_Token", "forged"),
    ("x_upstream_token", "forged"),
    ("X-Upstream_Token", "forged"),
];

#[test]
fn no_spelling_of_a_pool_header_from_a_client_reaches_the_worker() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .config(|c| c["upstreams"]["pool"]["headers"]["X-Tenant_Secret"] = json!("t0p"))
        .start();
    let mut forged = FORGED_POOL_HEADERS.to_vec();
    forged.extend([("X_Tenant_Secret", "forged"), ("x-tenant-secret", "forged")]);
    let body = br#"{"message":"hi"}"#;
    let key = format!("Bearer {}", gw.jane());
    let mut headers = vec![
        ("Authorization", key.as_str()),
        ("Content-Type", "application/json"),
    ];
    headers.extend(forged.iter().copied());
    gw.raw_request("POST", &chat_path(AGENT), &headers, body)
        .assert_status(200);
    assert_only_the_pools_own(&w.last());

    // HTTP/2 clients may send the same names.
    let mut request = h2_chat(gw.jane(), "hi");
    request.headers.extend(
        forged
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string())),
    );
    let replies = h2_calls(gw.port(), H2Over::Cleartext, &[request]);
    replies[0].assert_status(200);
    assert_only_the_pools_own(&w.last());
}

#[track_caller]
fn assert_only_the_pools_own(seen: &worker::Seen) {
    assert_eq!(seen.header_values("x-upstream-token"), vec!["s3cret"]);
    assert_eq!(seen.header_values("x-tenant_secret"), vec!["t0p"]);
    let forged: Vec<_> = seen
        .headers
        .iter()
        .filter(|(_, value)| value == "forged")
        .collect();
    assert!(
        forged.is_empty(),
        "forged headers reached the worker: {forged:?}"
    );
}

#[test]
fn the_workers_server_header_does_not_reach_the_client() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let r = gw.chat(AGENT, gw.jane(), Script::hop_header());
    r.assert_status(200);
    assert_eq!(r.header("server"), None);
    assert_eq!(r.header("x-worker-kept"), Some("yes"));
}

#[test]
fn http2_cookie_crumbs_reach_the_worker_as_one_header() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let mut request = h2_chat(gw.jane(), "hi");
    for crumb in ["a=1", "b=2", "c=3"] {
        request.headers.push(("cookie".into(), crumb.into()));
    }
    h2_calls(gw.port(), H2Over::Cleartext, &[request])[0].assert_status(200);
    assert_eq!(w.last().header_values("cookie"), vec!["a=1; b=2; c=3"]);
}

#[test]
fn http2_field_values_with_surrounding_spaces_are_refused() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let padded = |value: &str| {
        let mut request = h2_chat(gw.jane(), "hi");
        request.headers.push(("x-note".into(), value.into()));
        request
    };
    let requests: Vec<H2Request> = [" lead", "trail ", "\ttab", "fine"]
        .iter()
        .map(|v| padded(v))
        .collect();
    let replies = h2_calls(gw.port(), H2Over::Cleartext, &requests);
    for reply in &replies[..3] {
        reply.error(400, "invalid_request");
    }
    replies[3].assert_status(200);
    assert_eq!(w.count(), 1, "only the well-formed call reached the worker");
}

#[test]
fn an_http2_path_with_a_fragment_matches_nothing_as_on_http1() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let path = chat_path(AGENT);
    // Client libraries drop a fragment themselves: these frames are written by hand.
    let statuses = raw_h2_statuses(
        gw.port(),
        gw.jane(),
        &[
            format!("{path}#frag"),
            path.clone(),
            format!("{path}?q=1#x"),
        ],
    );
    assert_eq!(statuses, vec![404, 200, 404]);
    let h1 = gw.raw_request(
        "POST",
        &format!("{path}#frag"),
        &[
            ("Authorization", &format!("Bearer {}", gw.jane())),
            ("Content-Type", "application/json"),
        ],
        br#"{"message":"hi"}"#,
    );
    h1.error(404, "not_found");
    assert_eq!(w.count(), 1);
}

/// One cleartext HTTP/2 connection carrying a chat call per path, one stream after another,
/// each `:path` sent exactly as given; returns each call's status.
fn raw_h2_statuses(port: u16, key: &str, paths: &[String]) -> Vec<u16> {
    use std::io::{Read, Write};
    use turnpike_core::h2_watch::hpack::HpackDecoder;

    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    };
    // Each field a literal without indexing and with a literal name: no table, no Huffman.
    let field = |block: &mut Vec<u8>, name: &str, value: &str| {
        block.push(0);
        for text in [name, value] {
            assert!(text.len() < 127);
            block.push(text.len() as u8);
            block.extend_from_slice(text.as_bytes());
        }
    };
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(std::time::Duration::from_secs(15)))
        .unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(4, 0, 0, &[]));
    conn.write_all(&out).unwrap();
    let mut decoder = HpackDecoder::default();
    let mut statuses = Vec::new();
    for (i, path) in paths.iter().enumerate() {
        let stream = 1 + 2 * i as u32;
        let body = br#"{"message":"hi"}"#;
        let mut block = Vec::new();
        for (name, value) in [
            (":method", "POST"),
            (":scheme", "http"),
            (":authority", "localhost"),
            (":path", path.as_str()),
            ("authorization", &format!("Bearer {key}")),
            ("content-type", "application/json"),
        ] {
            field(&mut block, name, value);
        }
        let mut request = frame(1, 0x4, stream, &block);
        request.extend(frame(0, 0x1, stream, body));
        conn.write_all(&request).unwrap();
        // Frames until this stream's answer head.
        let status = loop {
            let mut head = [0u8; 9];
            conn.read_exact(&mut head).unwrap();
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            conn.read_exact(&mut payload).unwrap();
            let on = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            if head[3] == 4 && head[4] & 1 == 0 {
                conn.write_all(&frame(4, 1, 0, &[])).unwrap();
            }
            if head[3] == 1 && on == stream {
                let mut status = 0;
                decoder
                    .decode(&payload, |name, value| {
                        if name == b":status" {
                            status = std::str::from_utf8(value).unwrap().parse().unwrap();
                        }
                    })
                    .unwrap();
                break status;
            }
        };
        statuses.push(status);
    }
    statuses
}

#[test]
fn http11_without_host_or_with_two_is_refused() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let key = format!("Bearer {}", gw.jane());
    let body = br#"{"message":"hi"}"#;
    let head = |hosts: &str| {
        let mut bytes = format!(
            "POST {} HTTP/1.1\r\n{hosts}Authorization: {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            chat_path(AGENT),
            body.len()
        )
        .into_bytes();
        bytes.extend_from_slice(body);
        bytes
    };
    let r = raw::send(gw.port(), &head(""));
    r.error(400, "invalid_request");
    assert_eq!(r.header("connection"), Some("close"));
    // Pingora's parser refuses two before the gateway sees the head.
    raw::send(gw.port(), &head("Host: a\r\nHost: b\r\n")).assert_status(400);
    raw::send(gw.port(), &head("Host: gw\r\n")).assert_status(200);
    assert_eq!(w.count(), 1);
}
