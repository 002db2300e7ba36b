//! Sessions (SPEC §1): created when the client sends none, always in the answer.

use std::collections::HashSet;

use crate::support::*;

fn is_created_session(s: &str) -> bool {
    s.strip_prefix("sess_").is_some_and(|rest| {
        rest.len() >= 22
            && rest
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    })
}

#[test]
fn a_session_is_created_forwarded_and_returned() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let mut sessions = HashSet::new();
    for i in 0..5 {
        let r = gw.chat(AGENT, gw.jane(), "hi");
        r.assert_status(200);
        let sid = r.json()["session_id"]
            .as_str()
            .expect("session_id")
            .to_string();
        assert!(
            is_created_session(&sid),
            "not sess_ + 22 URL-safe chars: {sid:?}"
        );
        let seen = &w.seen()[i];
        assert_eq!(
            seen.body["session_id"],
            sid.as_str(),
            "the worker got it in the body"
        );
        assert_eq!(
            seen.header("x-session-id"),
            Some(sid.as_str()),
            "and in X-Session-Id"
        );
        sessions.insert(sid);
    }
    assert_eq!(sessions.len(), 5, "sessions repeat: {sessions:?}");
}

#[test]
fn the_clients_session_is_kept() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let r = gw
        .call(AGENT)
        .key(gw.jane())
        .session("sess_customer_jane_001")
        .send();
    r.assert_status(200);
    assert_eq!(r.json()["session_id"], "sess_customer_jane_001");
    assert_eq!(w.last().body["session_id"], "sess_customer_jane_001");
}

#[test]
fn the_session_is_inserted_when_the_worker_leaves_it_out() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();

    let r = gw
        .call(AGENT)
        .key(gw.jane())
        .message(Script::no_session())
        .session("sess_mine")
        .send();
    r.assert_status(200);
    let body = r.json();
    assert_eq!(body["session_id"], "sess_mine");
    assert_eq!(body["response"], format!("w1: {}", Script::no_session()));
    assert_eq!(body["usage"]["total_tokens"], 77);

    let r = gw.chat(AGENT, gw.jane(), Script::no_session());
    r.assert_status(200);
    let sid = r.json()["session_id"]
        .as_str()
        .expect("session_id inserted")
        .to_string();
    assert!(is_created_session(&sid), "{sid:?}");
    assert_eq!(
        w.last().body["session_id"],
        sid.as_str(),
        "the same session the worker got"
    );
}
