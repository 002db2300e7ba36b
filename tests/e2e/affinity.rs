//! Choosing a worker (SPEC §3 `balance`): round robin, or consistent hashing on `session_id`.

use std::collections::{HashMap, HashSet};

use crate::support::*;

/// The worker that answered, from the `response` field (`"w1: ..."`).
fn answered_by(r: &Reply) -> String {
    r.assert_status(200);
    let body = r.json();
    let text = body["response"].as_str().expect("response").to_string();
    text.split(':').next().unwrap().to_string()
}

#[test]
fn one_session_sticks_to_one_worker() {
    let workers = Worker::start_many(3);
    let gw = TestGateway::builder()
        .workers(&workers)
        .balance_mode("session")
        .start();
    for _ in 0..20 {
        gw.call(AGENT)
            .key(gw.jane())
            .session("sess_sticky_customer_42")
            .send()
            .assert_status(200);
    }
    let counts: Vec<usize> = workers.iter().map(Worker::count).collect();
    assert_eq!(counts.iter().sum::<usize>(), 20);
    assert!(
        counts.contains(&20),
        "one session spread over workers: {counts:?}"
    );
}

#[test]
fn different_sessions_spread_and_each_stays_put() {
    let workers = Worker::start_many(3);
    let gw = TestGateway::builder()
        .workers(&workers)
        .balance_mode("session")
        .start();
    let mut home: HashMap<String, String> = HashMap::new();
    for round in 0..2 {
        for i in 0..30 {
            let session = format!("sess_spread_{i}");
            let r = gw.call(AGENT).key(gw.jane()).session(&session).send();
            let by = answered_by(&r);
            if round == 0 {
                home.insert(session, by);
            } else {
                assert_eq!(home[&session], by, "{session} moved between workers");
            }
        }
    }
    let used: HashSet<&String> = home.values().collect();
    assert!(used.len() > 1, "30 sessions all landed on {used:?}");
}

#[test]
fn round_robin_spreads_evenly() {
    let workers = Worker::start_many(3);
    let gw = TestGateway::builder().workers(&workers).start();
    for _ in 0..30 {
        gw.call(AGENT)
            .key(gw.jane())
            .session("sess_same_for_all")
            .send()
            .assert_status(200);
    }
    let counts: Vec<usize> = workers.iter().map(Worker::count).collect();
    assert_eq!(counts, vec![10, 10, 10], "round robin over three workers");
}
