//! Workers over HTTPS: reached with the pool's CA over HTTP/2 or HTTP/1.1, refused with an
//! unknown CA (unless `verify: false`), and never reached on a connection a pool trusting
//! another CA left in the keep-alive pool. Certificates are made at run time.

use serde_json::json;
use std::time::Duration;

use crate::support::gateway::DEFAULT_BALANCE;
use crate::support::tls::*;
use crate::support::tls_worker::TlsWorker;
use crate::support::*;

/// A gateway whose pool is the HTTPS worker on `port`, trusting the CA `ca_pem`.
fn gateway_trusting(port: u16, ca_pem: &str) -> TestGateway {
    let files = TestGateway::builder()
        .endpoint(&format!("https://127.0.0.1:{port}"))
        .config(|c| c["upstreams"]["pool"]["ca"] = json!("tls/ca.pem"))
        .write();
    write_atomically(&files.dir.path().join("tls/ca.pem"), ca_pem);
    files.start()
}

/// A gateway whose pool is the HTTPS worker on `port`, with `verify: false`.
fn gateway_trusting_any_worker(port: u16) -> TestGateway {
    TestGateway::builder()
        .endpoint(&format!("https://127.0.0.1:{port}"))
        .config(|c| c["upstreams"]["pool"]["verify"] = json!(false))
        .start()
}

#[test]
fn an_https_worker_is_reached_with_the_pools_ca_over_http2_or_http1() {
    let ca = TestCa::new("worker CA");
    let w = Worker::start("secure");
    for (alpn, protocol) in [
        (&[&b"h2"[..], b"http/1.1"][..], "h2"),
        (&[&b"http/1.1"[..]][..], "http/1.1"),
    ] {
        let front = TlsWorker::start(&w, &ca.leaf(), alpn);
        let gw = gateway_trusting(front.port, &ca.pem());
        let r = gw.chat(AGENT, gw.jane(), "over tls");
        r.assert_status(200);
        assert_eq!(r.json()["response"], "secure: over tls");
        assert_eq!(front.protocols(), [protocol], "the worker offered {alpn:?}");
        let seen = w.last();
        assert_eq!(seen.path, format!("/internal/{AGENT}/invoke"));
        assert_eq!(seen.header("x-key-id"), Some("key_jane"));
        let port = front.port;
        assert_eq!(
            seen.header("host"),
            Some(format!("127.0.0.1:{port}").as_str()),
            "an HTTPS worker is sent its own name as Host"
        );
        gw.usage_after("key=key_jane", 1);
    }
}

#[test]
fn an_https_worker_with_an_unknown_ca_is_refused_with_502_unless_verify_is_off() {
    let worker_ca = TestCa::new("worker CA");
    let other_ca = TestCa::new("some other CA");
    let w = Worker::start("secure");
    let front = TlsWorker::start(&w, &worker_ca.leaf(), &[b"h2", b"http/1.1"]);
    let gw = gateway_trusting(front.port, &other_ca.pem());
    gw.chat(AGENT, gw.jane(), "hi")
        .error(502, "upstream_unavailable");
    assert_eq!(w.count(), 0, "nothing reached the worker");
    assert!(front.protocols().iter().all(|p| p == "handshake failed"));
    gw.assert_jane_charged_nothing(DEFAULT_BALANCE);

    let gw = gateway_trusting_any_worker(front.port);
    gw.chat(AGENT, gw.jane(), "hi").assert_status(200);
    // The log reaches its file within 200 ms.
    wait_until(
        Duration::from_secs(5),
        "verify: false is warned about",
        || gw.log().contains("`verify: false`"),
    );
}

#[test]
fn a_kept_alive_worker_connection_is_not_reused_by_a_pool_that_trusts_another_ca() {
    let worker_ca = TestCa::new("worker CA");
    let other_ca = TestCa::new("some other CA");
    let w = Worker::start("secure");
    let front = TlsWorker::start(&w, &worker_ca.leaf(), &[b"http/1.1"]);
    let endpoint = format!("https://127.0.0.1:{}", front.port);
    let files = TestGateway::builder()
        .endpoint(&endpoint)
        .config(move |c| {
            c["upstreams"]["pool"]["ca"] = json!("tls/worker-ca.pem");
            c["upstreams"]["other"] = json!({"endpoints": [endpoint], "ca": "tls/other-ca.pem"});
            c["agents"][1]["upstream"] = json!("other");
        })
        .write();
    write_atomically(
        &files.dir.path().join("tls/worker-ca.pem"),
        &worker_ca.pem(),
    );
    write_atomically(&files.dir.path().join("tls/other-ca.pem"), &other_ca.pem());
    let gw = files.start();
    // The trusting pool leaves a verified connection in the keep-alive pool...
    gw.chat(AGENT, gw.bob(), "first").assert_status(200);
    // ...which the pool trusting another CA must not take.
    gw.chat(OTHER_AGENT, gw.bob(), "second")
        .error(502, "upstream_unavailable");
    assert_eq!(w.count(), 1);
}
