//! A TLS handshake is held to `limits.header_timeout`, as a request head is: a client that
//! opens the TLS listener and never finishes its handshake is cut off then, not after
//! Pingora's fixed minute; a handshake in time is served as ever.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::tls::*;
use crate::support::*;

/// How long the connection stayed open after `first` was sent on it, up to `wait`.
fn open_for(port: u16, first: &[u8], wait: Duration) -> Duration {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    let sent = Instant::now();
    s.write_all(first).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return sent.elapsed(),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return sent.elapsed(),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return sent.elapsed(),
            Err(_) => return sent.elapsed(),
        }
    }
}

#[test]
fn a_handshake_not_finished_within_the_header_timeout_is_cut_off() {
    let w = Worker::start("w1");
    let ca = TestCa::new("handshake");
    let tls_port = free_port();
    let files = TestGateway::builder()
        .worker(&w)
        .config(move |c| {
            c["tls"] = tls_block(tls_port);
            c["limits"]["header_timeout"] = json!("1s");
        })
        .write();
    write_pair(files.dir.path(), &ca.leaf());
    let gw = files.start();
    // Nothing at all, and half a ClientHello.
    let hello = client_hello(0x0303);
    for first in [&b""[..], &hello[..hello.len() / 2]] {
        let open = open_for(tls_port, first, Duration::from_secs(20));
        assert!(
            open >= Duration::from_millis(900) && open < Duration::from_secs(10),
            "an unfinished handshake was cut off after {open:?}"
        );
    }
    // A handshake that fails (plain HTTP to the TLS port) closes at once, deadline or not.
    let open = open_for(
        tls_port,
        b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n",
        Duration::from_secs(20),
    );
    assert!(
        open < Duration::from_millis(900),
        "a failed handshake's connection stayed open {open:?}"
    );
    // A whole handshake, then a call, is unaffected.
    let (reply, _) = https_h1(
        tls_port,
        &ca.pem(),
        &raw::chat_request(AGENT, gw.jane(), br#"{"message":"hi"}"#),
    );
    reply.assert_status(200);
}
