//! The chat path is matched exactly (SPEC §1): no normalisation turns a non-matching path into
//! a matching one. Sent over a raw socket so that no client library tidies the path first.

use crate::support::*;

fn chat_over_raw(gw: &TestGateway, target: &str) -> Reply {
    let auth = format!("Bearer {}", gw.bob()); // bob may call every agent
    gw.raw_request(
        "POST",
        target,
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        br#"{"message": "hi"}"#,
    )
}

#[test]
fn path_tricks_are_404_and_reach_no_worker() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();

    // The control: the exact path, sent the same way, works.
    chat_over_raw(&gw, &chat_path(AGENT)).assert_status(200);
    assert_eq!(w.count(), 1);

    let a = AGENT;
    let tricks = [
        format!("/v1/agents/../agents/{a}/chat"),
        format!("/v1/agents/x/../{a}/chat"),
        format!("/v1/agents/./{a}/chat"),
        format!("/v1/agents/{a}/./chat"),
        format!("/v1/agents/{a}/chat/.."),
        format!("/v1/agents/{a}/chat/."),
        format!("/v1/agents/{a}%2fchat"),
        format!("/v1/agents/{a}%2Fchat"),
        format!("/v1%2fagents/{a}/chat"),
        "/v1/agents/%61g_c47e7c97_b2f2/chat".to_string(),
        format!("/v1/agents/{a}%00/chat"),
        format!("/v1/agents/{a}/chat%00"),
        format!("//v1/agents/{a}/chat"),
        format!("/v1//agents/{a}/chat"),
        format!("/v1/agents//{a}/chat"),
        format!("/v1/agents/{a}//chat"),
        format!("/v1/agents/{a}/chat/"),
        format!("/v1/agents/{a}/chatx"),
        format!("/v1/agents/{a}/chat;x=1"),
        format!("/v1/agents/{a}/chat%20"),
        format!("/v1/agents/{a}/chat/extra"),
        format!("/V1/agents/{a}/chat"),
        format!("/v1/agents/ag_{}/chat", "a".repeat(65)),
        "/v1/agents/ag_/chat".to_string(),
        "/v1/agents/ag_bad.dot/chat".to_string(),
        // A fragment never goes on the wire; a parser that drops it would match the rest.
        format!("/v1/agents/{a}/chat#/../../admin"),
        format!("/v1/agents/{a}/chat#"),
        format!("/v1/agents/{a}/chat?x=1#y"),
    ];
    for target in &tricks {
        let r = chat_over_raw(&gw, target);
        assert_eq!(r.status, 404, "{target} -> {} {}", r.status, r.body);
        r.error_in(404, &["not_found", "agent_not_found"]);
    }
    assert_eq!(
        w.count(),
        1,
        "a trick reached the worker: {:?}",
        w.seen().last().map(|s| &s.path)
    );
}

#[test]
fn the_longest_valid_agent_id_is_routed_as_an_agent() {
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let longest = format!("ag_{}", "a".repeat(64));
    chat_over_raw(&gw, &chat_path(&longest)).error(404, "agent_not_found");
    let too_long = format!("ag_{}", "a".repeat(65));
    chat_over_raw(&gw, &chat_path(&too_long)).error(404, "not_found");
    assert_eq!(w.count(), 0);
}
