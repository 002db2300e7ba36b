//! TLS and HTTP/2 on the gateway's listeners: the HTTPS listener (HTTP/1.1 and HTTP/2 by
//! ALPN), h2c on the plain one, certificates rotated on disk, TLS versions, the admin
//! listener over TLS, and what `check` says of TLS files. Workers over HTTPS are in
//! `https_workers.rs`. Every certificate is made at run time by a CA of the test's own.

use std::time::Duration;

use serde_json::json;

use crate::support::gateway::GatewayBuilder;
use crate::support::raw;
use crate::support::tls::*;
use crate::support::*;

/// How a scenario's calls reach the gateway.
#[derive(Clone, Copy, Debug)]
enum Protocol {
    Plain,
    HttpsH1,
    HttpsH2,
    CleartextH2,
}

/// What the client can tell of an answer: status, error code, the gateway's headers, and
/// the worker's `response`.
#[derive(Debug, PartialEq)]
struct Seen {
    status: u16,
    code: String,
    headers: Vec<&'static str>,
    response: String,
}

const WATCHED_HEADERS: [&str; 7] = [
    "content-type",
    "content-length",
    "x-request-id",
    "retry-after",
    "ratelimit-limit",
    "ratelimit-remaining",
    "ratelimit-reset",
];

fn seen(reply: &Reply) -> Seen {
    let body: serde_json::Value = serde_json::from_str(&reply.body).unwrap_or_default();
    Seen {
        status: reply.status,
        code: body["error"]["code"].as_str().unwrap_or("").to_string(),
        headers: WATCHED_HEADERS
            .into_iter()
            .filter(|h| reply.header(h).is_some())
            .collect(),
        response: body["response"].as_str().unwrap_or("").to_string(),
    }
}

fn tls_gateway(ca: &TestCa, builder: GatewayBuilder) -> (TestGateway, u16) {
    let tls_port = free_port();
    let files = builder
        .config(move |c| c["tls"] = tls_block(tls_port))
        .write();
    write_pair(files.dir.path(), &ca.leaf());
    (files.start(), tls_port)
}

fn call(
    gw: &TestGateway,
    tls_port: u16,
    ca: &TestCa,
    protocol: Protocol,
    agent: &str,
    key: Option<&str>,
) -> Reply {
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(auth) = &auth {
        headers.push(("Authorization", auth.as_str()));
    }
    let body = br#"{"message": "hello"}"#;
    let path = chat_path(agent);
    match protocol {
        Protocol::Plain => raw::send(gw.port(), &raw::request("POST", &path, &headers, body)),
        Protocol::HttpsH1 => {
            https_h1(
                tls_port,
                &ca.pem(),
                &raw::request("POST", &path, &headers, body),
            )
            .0
        }
        Protocol::HttpsH2 => {
            let pem = ca.pem();
            h2_calls(
                tls_port,
                H2Over::Tls(&pem),
                &[H2Request::post(&path, &headers, body)],
            )
            .remove(0)
        }
        Protocol::CleartextH2 => h2_calls(
            gw.port(),
            H2Over::Cleartext,
            &[H2Request::post(&path, &headers, body)],
        )
        .remove(0),
    }
}

#[test]
fn https_and_http2_get_the_same_answers_and_errors_as_plain_http() {
    let ca = TestCa::new("turnpike test CA");
    let w = Worker::start("w1");
    let scenario = |protocol: Protocol| -> Vec<Seen> {
        let builder = TestGateway::builder()
            .worker(&w)
            .policy(
                "standard",
                json!({"requests": {"rate": 1, "per": "1m", "burst": 2}}),
            )
            .account_balance("acct_bob", 0);
        let (gw, tls_port) = tls_gateway(&ca, builder);
        let jane = gw.jane().to_string();
        let bob = gw.bob().to_string();
        let replies = [
            call(&gw, tls_port, &ca, protocol, AGENT, Some(&jane)),
            call(&gw, tls_port, &ca, protocol, AGENT, None),
            call(&gw, tls_port, &ca, protocol, "ag_nope_0000", Some(&jane)),
            call(&gw, tls_port, &ca, protocol, AGENT, Some(&bob)),
            call(&gw, tls_port, &ca, protocol, AGENT, Some(&jane)),
            call(&gw, tls_port, &ca, protocol, AGENT, Some(&jane)),
        ];
        gw.usage_after("key=key_jane", 2);
        replies.iter().map(seen).collect()
    };
    let plain = scenario(Protocol::Plain);
    let statuses: Vec<u16> = plain.iter().map(|s| s.status).collect();
    assert_eq!(statuses, [200, 401, 404, 402, 200, 429], "{plain:#?}");
    assert_eq!(plain[0].response, "w1: hello");
    assert!(plain[5].headers.contains(&"retry-after"), "{plain:#?}");
    for protocol in [Protocol::HttpsH1, Protocol::HttpsH2, Protocol::CleartextH2] {
        assert_eq!(
            scenario(protocol),
            plain,
            "{protocol:?} against plain HTTP/1.1"
        );
    }
}

#[test]
fn many_http2_streams_on_one_connection_are_limited_and_metered_like_separate_connections() {
    let ca = TestCa::new("turnpike test CA");
    let w = Worker::start("w1");
    let builder = TestGateway::builder().worker(&w).policy(
        "standard",
        json!({"requests": {"rate": 1, "per": "1h", "burst": 8}}),
    );
    let (gw, tls_port) = tls_gateway(&ca, builder);
    let before = gw.balance("acct_jane").balance;
    assert_eq!(before, gw.balance("acct_bob").balance);

    // Jane: 20 concurrent streams of one HTTP/2 connection.
    let request = h2_chat(gw.jane(), "hi");
    let pem = ca.pem();
    let streams = h2_calls(tls_port, H2Over::Tls(&pem), &vec![request; 20]);
    // Bob: 20 concurrent calls, each on a connection of its own.
    let bob = gw.bob().to_string();
    let connections: Vec<Reply> = std::thread::scope(|s| {
        let calls: Vec<_> = (0..20)
            .map(|_| s.spawn(|| gw.chat(AGENT, &bob, "hi")))
            .collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });

    for (who, replies) in [("h2 streams", &streams), ("connections", &connections)] {
        let ok = replies.iter().filter(|r| r.status == 200).count();
        let limited = replies.iter().filter(|r| r.status == 429).count();
        assert_eq!((ok, limited), (8, 12), "{who}: 200s and 429s");
    }
    let jane = gw.usage_after("key=key_jane", 8);
    let bob = gw.usage_after("key=key_bob", 8);
    assert_eq!(jane.requests, 8);
    assert_eq!((jane.input_tokens, jane.output_tokens), (8 * 45, 8 * 32));
    assert_eq!(
        (
            jane.requests,
            jane.input_tokens,
            jane.output_tokens,
            jane.cost
        ),
        (bob.requests, bob.input_tokens, bob.output_tokens, bob.cost)
    );
    let jane_paid = before - gw.settled_balance("acct_jane").balance;
    let bob_paid = before - gw.settled_balance("acct_bob").balance;
    assert!(jane_paid > 0);
    assert_eq!(jane_paid, bob_paid, "the same calls cost the same");
    assert_eq!(w.count(), 16);
}

/// Waits until the public listener's certificate reloads with `result` number `count`.
fn wait_reloads(gw: &TestGateway, result: &str, count: f64) {
    gw.wait_metric(
        "turnpike_tls_certificate_reloads_total",
        &[("listener", "public"), ("result", result)],
        count,
    );
}

fn reloads(gw: &TestGateway, result: &str) -> f64 {
    gw.metric(
        "turnpike_tls_certificate_reloads_total",
        &[("listener", "public"), ("result", result)],
    )
}

#[test]
fn a_certificate_swapped_on_disk_is_served_without_a_restart_and_a_broken_one_is_refused() {
    let ca = TestCa::new("turnpike test CA");
    let w = Worker::start("w1");
    let first = ca.leaf();
    let tls_port = free_port();
    let files = TestGateway::builder()
        .worker(&w)
        .config(move |c| c["tls"] = tls_block(tls_port))
        .write();
    write_pair(files.dir.path(), &first);
    let gw = files.start();
    let dir = gw.files.dir.path().to_path_buf();
    assert_eq!(served_certificate(tls_port, &ca.pem()).unwrap(), first.der);
    assert_eq!((reloads(&gw, "success"), reloads(&gw, "error")), (0.0, 0.0));
    let expiry = gw.metric(
        "turnpike_tls_certificate_expiry_timestamp_seconds",
        &[("listener", "public")],
    );
    assert!(expiry > 1.7e9, "expiry gauge {expiry}");

    // Not a certificate at all: refused, the first keeps serving.
    write_atomically(
        &dir.join("tls/cert.pem"),
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    );
    wait_reloads(&gw, "error", 1.0);
    assert_eq!(served_certificate(tls_port, &ca.pem()).unwrap(), first.der);
    let pem = ca.pem();
    let request = raw::chat_request(AGENT, gw.jane(), br#"{"message": "still"}"#);
    https_h1(tls_port, &pem, &request).0.assert_status(200);

    // The next certificate before its key: they do not match, so still refused.
    let second = ca.leaf();
    write_atomically(&dir.join("tls/cert.pem"), &second.cert_pem);
    wait_reloads(&gw, "error", 2.0);
    assert_eq!(served_certificate(tls_port, &ca.pem()).unwrap(), first.der);

    // Its key arrives: the pair is whole, and new connections get it.
    write_atomically(&dir.join("tls/key.pem"), &second.key_pem);
    wait_reloads(&gw, "success", 1.0);
    assert_eq!(served_certificate(tls_port, &ca.pem()).unwrap(), second.der);
    https_h1(tls_port, &pem, &request).0.assert_status(200);
    wait_until(Duration::from_secs(5), "the refusal is logged", || {
        gw.log().contains("TLS certificate refused")
    });
}

#[test]
fn tls_1_0_and_1_1_handshakes_are_refused_and_1_2_is_answered() {
    let ca = TestCa::new("turnpike test CA");
    let w = Worker::start("w1");
    let (_gw, tls_port) = tls_gateway(&ca, TestGateway::builder().worker(&w));
    assert_eq!(
        first_record(tls_port, &client_hello(0x0303)),
        Some((22, None)),
        "a TLS 1.2 hello gets a ServerHello"
    );
    for version in [0x0301, 0x0302] {
        // An alert, `protocol_version` (70).
        assert_eq!(
            first_record(tls_port, &client_hello(version)),
            Some((21, Some(70))),
            "a hello offering only {version:#06x} is refused"
        );
    }
}

#[test]
fn the_admin_listener_serves_https_with_its_own_certificate() {
    let ca = TestCa::new("admin CA");
    let w = Worker::start("w1");
    let mut files = TestGateway::builder()
        .worker(&w)
        .config(|c| c["admin"]["tls"] = json!({"cert": "admin/cert.pem", "key": "admin/key.pem"}))
        .write();
    let leaf = ca.leaf();
    write_atomically(&files.dir.path().join("admin/cert.pem"), &leaf.cert_pem);
    write_atomically(&files.dir.path().join("admin/key.pem"), &leaf.key_pem);
    files.admin_ca_pem = Some(ca.pem());
    let gw = files.start();
    let (metrics, presented) = https_h1(
        gw.admin_port(),
        &ca.pem(),
        &raw::request("GET", "/metrics", &[], b""),
    );
    metrics.assert_status(200);
    assert_eq!(presented, leaf.der);
    assert!(metrics
        .body
        .contains("turnpike_tls_certificate_expiry_timestamp_seconds{listener=\"admin\"}"));
    // Plain HTTP to it is not answered as HTTP.
    let mut plain = std::net::TcpStream::connect(("127.0.0.1", gw.admin_port())).unwrap();
    plain
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    std::io::Write::write_all(&mut plain, &raw::request("GET", "/healthz", &[], b"")).unwrap();
    let mut answer = Vec::new();
    let _ = std::io::Read::read_to_end(&mut plain, &mut answer);
    assert!(
        !answer.starts_with(b"HTTP/1.1 200"),
        "plain HTTP got {answer:?}"
    );
    // The public listener is still plain HTTP.
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
}

fn check_output(files: &crate::support::gateway::GatewayFiles) -> (bool, String) {
    let out = files.check();
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    (out.status.success(), text)
}

#[test]
fn check_says_what_is_wrong_with_tls_files_and_https_pools() {
    let ca = TestCa::new("turnpike test CA");
    let tls_port = free_port();
    let files = TestGateway::builder()
        .endpoint("127.0.0.1:9")
        .config(move |c| {
            c["tls"] = tls_block(tls_port);
            c["upstreams"]["mixed"] =
                json!({"endpoints": ["https://127.0.0.1:9443", "127.0.0.1:9001"]});
            c["upstreams"]["plain"] = json!({"endpoints": ["127.0.0.1:9001"], "ca": "tls/ca.pem"});
            c["upstreams"]["twice"] =
                json!({"endpoints": ["https://127.0.0.1:9443", "https://localhost:9443"]});
        })
        .write();
    let (ok, text) = check_output(&files);
    assert!(!ok);
    assert!(text.contains("mixes http and https"), "{text}");
    assert!(
        text.contains("only applies to https:// endpoints"),
        "{text}"
    );
    assert!(
        text.contains("one connection cannot be checked against two names"),
        "{text}"
    );

    // The pools fixed, the listener's files are checked: missing, then not each other's.
    let mut config = files.config.clone();
    for pool in ["mixed", "plain", "twice"] {
        config["upstreams"].as_object_mut().unwrap().remove(pool);
    }
    files.write_config(&config);
    let (ok, text) = check_output(&files);
    assert!(!ok);
    assert!(text.contains("tls.cert"), "{text}");
    let (one, other) = (ca.leaf(), ca.leaf());
    write_atomically(&files.dir.path().join("tls/cert.pem"), &one.cert_pem);
    write_atomically(&files.dir.path().join("tls/key.pem"), &other.key_pem);
    let (ok, text) = check_output(&files);
    assert!(!ok);
    assert!(
        text.contains("is not the private key of the certificate"),
        "{text}"
    );
    write_atomically(&files.dir.path().join("tls/key.pem"), &one.key_pem);
    let (ok, text) = check_output(&files);
    assert!(ok, "{text}");
}

#[test]
fn an_http2_client_that_never_finishes_its_preface_is_closed_after_the_header_timeout() {
    use std::io::{Read, Write};
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .config(|c| c["limits"] = json!({"header_timeout": "1s"}))
        .start();
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", gw.port())).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(b"PRI * HTTP/2.0\r\n\r\n").unwrap();
    let started = std::time::Instant::now();
    let mut byte = [0u8; 1];
    let read = conn.read(&mut byte);
    assert!(matches!(read, Ok(0)), "closed, not {read:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed after {:?}",
        started.elapsed()
    );
}
