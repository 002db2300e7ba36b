//! Criterion benchmarks of the functions every call runs through.
//! Run: cargo bench --bench hot_path

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;

use std::sync::Arc;
use turnpike::config::{AccountSeed, ConfigKeys};
use turnpike::store::{AdminStore, CallStore, MemoryStore};
use turnpike_core::admission::{self, Admission, LimiterState, Settlement};
use turnpike_core::billing::{cost, AccountState, Pricing};
use turnpike_core::body::{forwarded_body, parse_chat};
use turnpike_core::keys::{bearer_token, KeyHash};
use turnpike_core::limits::{BucketSpec, Mode, Policy};
use turnpike_core::route::match_route;
use turnpike_core::usage::{read_answer, Usage};

const PRICING: Pricing = Pricing {
    input_per_mtok: 3_000_000,
    output_per_mtok: 15_000_000,
    reserve: 50,
};

fn policy() -> Policy {
    Policy {
        name: "standard".into(),
        requests: Some(BucketSpec {
            rate: 1_000_000,
            period_ms: 1000,
            burst: 1_000_000,
        }),
        tokens: Some(BucketSpec {
            rate: 1_000_000_000,
            period_ms: 60_000,
            burst: 1_000_000_000,
        }),
        concurrency: Some(1_000_000),
        mode: Mode::Enforce,
    }
}

fn admission<'a>(policy: &'a Policy, call_id: &'a str, now_ms: u64) -> Admission<'a> {
    Admission {
        call_id,
        key_id: "key_jane",
        account: "acct_jane",
        agent: "ag_c47e7c97_b2f2",
        key_policy: Some(policy),
        agent_policy: Some(policy),
        pricing: Some(&PRICING),
        now_ms,
        lease_ms: 60_000,
    }
}

fn settlement<'a>(policy: &'a Policy, call_id: &'a str, now_ms: u64) -> Settlement<'a> {
    Settlement {
        call_id,
        key_id: "key_jane",
        account: "acct_jane",
        agent: "ag_c47e7c97_b2f2",
        key_policy: Some(policy),
        agent_policy: Some(policy),
        reservation: Default::default(),
        usage: Some(Usage {
            input_tokens: 45,
            output_tokens: 32,
            total_tokens: 77,
        }),
        cost: 615,
        now_ms,
        request_id: "req_1",
        session_id: "sess_1",
        status: 200,
    }
}

fn request_side(c: &mut Criterion) {
    let body = br#"{"message":"What are your business hours?","metadata":{"channel":"web"}}"#;
    let method = http::Method::POST;
    let method = method.as_str();
    c.bench_function("match_route", |b| {
        b.iter(|| {
            match_route(
                black_box(method),
                black_box("/v1/agents/ag_c47e7c97_b2f2/chat"),
            )
        })
    });
    c.bench_function("bearer_token + sha256", |b| {
        b.iter(|| {
            let token = bearer_token(Some(black_box(
                b"Bearer ak_0123456789abcdef0123456789abcdef",
            )))
            .unwrap();
            KeyHash::of(token)
        })
    });
    c.bench_function("parse_chat + forwarded_body (new session)", |b| {
        b.iter(|| {
            let chat = parse_chat(black_box(body)).unwrap();
            forwarded_body(body, &chat)
        })
    });
}

fn decision_core(c: &mut Criterion) {
    let policy = policy();
    let mut key = LimiterState::default();
    let mut agent = LimiterState::default();
    let mut account = AccountState {
        balance: i64::MAX / 2,
        reserved: 0,
    };
    let mut now = 0;
    c.bench_function("admission::admit + settle (pure)", |b| {
        b.iter(|| {
            now += 1;
            let admitted = admission::admit(
                &mut key,
                &mut agent,
                Some(&mut account),
                &admission(&policy, "c", now),
            )
            .unwrap();
            let settle = Settlement {
                reservation: admitted.reservation,
                ..settlement(&policy, "c", now)
            };
            admission::settle(&mut key, &mut agent, Some(&mut account), &settle);
        })
    });
    let usage = Usage {
        input_tokens: 45,
        output_tokens: 32,
        total_tokens: 77,
    };
    c.bench_function("billing::cost", |b| {
        b.iter(|| cost(black_box(&usage), &PRICING))
    });
}

fn response_side(c: &mut Criterion) {
    let answer = br#"{"response":"Our support team is available 9am-5pm, Monday to Friday.","session_id":"sess_customer_jane_001","usage":{"input_tokens":45,"output_tokens":32,"total_tokens":77}}"#;
    c.bench_function("usage::read_answer", |b| {
        b.iter(|| read_answer(black_box(answer)))
    });
}

fn memory_store(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let store = MemoryStore::new();
    let seed = [AccountSeed {
        id: "acct_jane".into(),
        balance: i64::MAX / 2,
    }];
    runtime
        .block_on(store.apply_config(&Arc::new(ConfigKeys::new(Vec::new())), &seed))
        .unwrap();
    let policy = policy();
    let mut now = 0;
    c.bench_function("MemoryStore admit + settle", |b| {
        b.iter(|| {
            now += 1;
            runtime.block_on(async {
                let decision = store
                    .admit(&admission(&policy, "call_1", now))
                    .await
                    .unwrap()
                    .unwrap();
                let settle = Settlement {
                    reservation: decision.reservation,
                    ..settlement(&policy, "call_1", now)
                };
                store.settle(&settle).await;
            })
        })
    });
}

criterion_group!(
    benches,
    request_side,
    decision_core,
    response_side,
    memory_store
);
criterion_main!(benches);
