//! What one call costs, stage by stage, and whole: criterion benchmarks of the functions
//! every call runs through, and of the whole in-process pipeline (Pingora's session over an
//! in-memory pipe, the embedded store, a worker on loopback). docs/scaling.md keeps the
//! cost table these make.
//! Run: cargo bench --bench hot_path

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use std::hint::black_box;

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::{ProxyHttp, Session};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use turnpike::config::{self, AccountSeed, ConfigKeys, Source};
use turnpike::logging;
use turnpike::metrics::Metrics;
use turnpike::pipeline::ctx::RequestCtx;
use turnpike::pipeline::finish;
use turnpike::pipeline::meter::MeteredAnswer;
use turnpike::pipeline::open_call::Bill;
use turnpike::pipeline::reply::{send_answer, Common};
use turnpike::proxy::Gateway;
use turnpike::services::{Services, Snapshot};
use turnpike::store::{AdminStore, CallStore, MemoryStore};
use turnpike::upstream::head::{outgoing_head, Identity, Peer};
use turnpike::upstream::Outgoing;
use turnpike_core::admission::{self, Admission, LimiterState, Settlement};
use turnpike_core::billing::{cost, AccountState, Pricing};
use turnpike_core::body::{forwarded_body, parse_chat};
use turnpike_core::keys::{bearer_token, KeyHash};
use turnpike_core::limits::{BucketSpec, Mode, Policy};
use turnpike_core::route::match_route;
use turnpike_core::trace::TraceParent;
use turnpike_core::usage::{client_body, read_answer, Usage};

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
    c.bench_function("usage::read_answer + client_body (session named)", |b| {
        b.iter(|| {
            let reading = read_answer(black_box(answer));
            client_body(answer, &reading, "sess_customer_jane_001")
        })
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

/// The load benchmark's worker answer (benches/load.py's ANSWER).
const ANSWER: &str = r#"{"response":"Our support team is available 9am-5pm.","session_id":"sess_bench","usage":{"input_tokens":45,"output_tokens":32,"total_tokens":77}}"#;
const KEY: &str = "ak_bench0123456789abcdef0123456789abcdef";
const REQUEST_BODY: &str =
    r#"{"message":"What are your business hours?","session_id":"sess_bench"}"#;

/// A keep-alive HTTP/1.1 worker on loopback that answers every request with `ANSWER`.
fn loopback_worker() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || serve_worker_connection(conn));
        }
    });
    addr
}

fn serve_worker_connection(mut conn: std::net::TcpStream) {
    conn.set_nodelay(true).unwrap();
    let answer = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{ANSWER}",
        ANSWER.len()
    );
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        // One request: its head, then the Content-Length it names.
        let whole = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if buf.len() >= end + 4 + length {
                    break end + 4 + length;
                }
            }
            match conn.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        buf.drain(..whole);
        if conn.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

/// The load benchmark's Turnpike (benches/load.py's write_config), on the embedded store.
fn services(worker: SocketAddr, runtime: &tokio::runtime::Runtime) -> Arc<Services> {
    let text = format!(
        r#"upstreams:
  pool: {{endpoints: ["{worker}"], path: "/invoke"}}
agents:
  - {{id: ag_bench, upstream: pool, policy: bench, pricing: {{input_per_mtok: 3000000, output_per_mtok: 15000000}}}}
accounts:
  - {{id: acct_bench, balance: 9000000000000000}}
keys:
  - {{id: key_bench, sha256: "{}", account: acct_bench, agents: "*", policy: bench}}
"#,
        KeyHash::of(KEY).to_hex()
    );
    let policies = "policies:\n  bench:\n    requests: {rate: 10000000, per: 1s}\n    \
                    tokens: {rate: 1000000000000, per: 1s}\n    concurrency: 100000\n";
    let loaded = config::parse(
        &Source::new("turnpike.yaml", text),
        &[Source::new("policies/bench.yaml", policies)],
    )
    .unwrap();
    let metrics = Metrics::new();
    let snapshot = Snapshot::build(loaded.calls, 1, &metrics).unwrap();
    let store = Arc::new(MemoryStore::new());
    runtime
        .block_on(store.apply_config(&snapshot.config.keys, &snapshot.config.accounts))
        .unwrap();
    Arc::new(Services::new(
        snapshot,
        store,
        metrics,
        Duration::from_secs(60),
    ))
}

fn chat_request() -> Vec<u8> {
    format!(
        "POST /v1/agents/ag_bench/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{REQUEST_BODY}",
        REQUEST_BODY.len()
    )
    .into_bytes()
}

/// Reads one whole answer (head and `Content-Length` body) off the client's end of the pipe.
async fn read_answer_off(client: &mut DuplexStream, buf: &mut Vec<u8>) {
    buf.clear();
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end])
                .unwrap()
                .to_ascii_lowercase();
            assert!(head.starts_with("http/1.1 200"), "{head}");
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if buf.len() >= end + 4 + length {
                return;
            }
        }
        let mut chunk = [0u8; 4096];
        let n = client.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the gateway closed the pipe");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// One call as Pingora runs it on a keep-alive connection: the head read, the call served by
/// the gateway's phases, the answer read by the client.
async fn one_call(gateway: &Gateway, request: &[u8], answer: &mut Vec<u8>) {
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    client.write_all(request).await.unwrap();
    let mut session = Session::new_h1(Box::new(server));
    assert!(session.read_request().await.unwrap());
    let mut ctx = gateway.new_ctx();
    gateway
        .early_request_filter(&mut session, &mut ctx)
        .await
        .unwrap();
    gateway
        .request_filter(&mut session, &mut ctx)
        .await
        .unwrap();
    gateway.logging(&mut session, None, &mut ctx).await;
    read_answer_off(&mut client, answer).await;
}

fn whole_call(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let worker = loopback_worker();
    let services = services(worker, &runtime);
    let gateway = Gateway {
        services: Arc::clone(&services),
    };
    let request = chat_request();

    // The stages of a call not benchmarked above, on the services and worker of the whole
    // call's benchmark (below).
    let snapshot = services.snapshot();
    let route = snapshot.route("ag_bench").unwrap();
    let key_hash = KeyHash::of(KEY);
    c.bench_function("stage: key lookup (embedded store)", |b| {
        b.iter(|| runtime.block_on(services.store.key(black_box(&key_hash))))
    });
    let client_head = {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        runtime.block_on(client.write_all(&request)).unwrap();
        let mut session = Session::new_h1(Box::new(server));
        runtime.block_on(session.read_request()).unwrap();
        session.req_header().clone()
    };
    let trace = TraceParent::for_call(None);
    let who = Identity {
        request_id: "req_0123456789abcdef",
        call_id: "call_0123456789abcdef",
        agent_id: "ag_bench",
        session_id: "sess_bench",
        key_id: "key_bench",
        account: "acct_bench",
        peer: Peer {
            ip: Some([127, 0, 0, 1].into()),
            trusted: false,
            scheme: "http",
        },
        trace: &trace,
    };
    let body = Bytes::from_static(REQUEST_BODY.as_bytes());
    c.bench_function("stage: worker request head", |b| {
        b.iter(|| {
            outgoing_head(
                black_box(&client_head),
                &who,
                body.len(),
                &route.pool.config,
            )
        })
    });
    c.bench_function(
        "stage: worker exchange (loopback round trip, worker included)",
        |b| {
            b.iter(|| {
                let call = Outgoing {
                    header: outgoing_head(&client_head, &who, body.len(), &route.pool.config)
                        .unwrap(),
                    body: &body,
                    session_id: "sess_bench",
                    max_answer_bytes: 1 << 20,
                };
                runtime
                    .block_on(services.upstreams.exchange(&route.pool, call))
                    .ok()
                    .unwrap()
            })
        },
    );
    // Pingora's part at either end: the request head read and parsed into a session, and
    // the worker's answer written to the client (head rewritten, one write).
    c.bench_function("stage: request head read (Pingora session)", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let (mut client, server) = tokio::io::duplex(64 * 1024);
                client.write_all(&request).await.unwrap();
                let mut session = Session::new_h1(Box::new(server));
                session.read_request().await.unwrap()
            })
        })
    });
    let common = Common {
        request_id: "req_0123456789abcdef",
        quota: None,
        write_timeout: Duration::from_secs(10),
    };
    c.bench_function("stage: answer to the client (head rewrite, write)", |b| {
        b.iter_batched(
            || {
                // A session whose request was read, and the worker's answer as Pingora's
                // client reads it (header case kept).
                let (mut client, server) = tokio::io::duplex(64 * 1024);
                let mut session = Session::new_h1(Box::new(server));
                runtime.block_on(async {
                    client.write_all(&request).await.unwrap();
                    session.read_request().await.unwrap();
                    session.read_request_body().await.unwrap();
                });
                let mut header = ResponseHeader::build(200, Some(4)).unwrap();
                header
                    .append_header("Content-Type", "application/json")
                    .unwrap();
                header.append_header("Server", "nginx").unwrap();
                let answer = MeteredAnswer {
                    header: Box::new(header),
                    body: Bytes::from_static(ANSWER.as_bytes()),
                    bill: Bill::Nothing,
                };
                (client, session, answer)
            },
            |(client, mut session, answer)| {
                runtime
                    .block_on(send_answer(&mut session, &common, answer))
                    .unwrap();
                (client, session)
            },
            BatchSize::SmallInput,
        )
    });
    // The end of a call: its counters alone, then with its access-log line formatted.
    let ctx = {
        let mut ctx = RequestCtx::start();
        ctx.record.agent = Some(Arc::clone(&route.agent));
        ctx.record.agent_series = Some(Arc::clone(&route.series));
        ctx.record.upstream_started = Some(Instant::now());
        ctx.record.upstream_finished = Some(Instant::now());
        ctx.record.upstream_endpoint = Some(worker);
        ctx.record.session_id = Some("sess_bench".into());
        ctx.record.usage = Some(Usage {
            input_tokens: 45,
            output_tokens: 32,
            total_tokens: 77,
        });
        ctx
    };
    c.bench_function("stage: metrics (no log line)", |b| {
        b.iter(|| finish::finish(&services.metrics, black_box(&ctx), 200))
    });
    // From here on the gateway's logger is installed, batching its lines into nothing.
    logging::init_to(logging::Format::Text, Box::new(std::io::sink()));
    c.bench_function("stage: metrics + access-log line (text)", |b| {
        b.iter(|| finish::finish(&services.metrics, black_box(&ctx), 200))
    });

    let mut answer = Vec::new();
    c.bench_function("call: whole pipeline, loopback worker", |b| {
        b.iter(|| runtime.block_on(one_call(&gateway, &request, &mut answer)))
    });
}

criterion_group!(
    benches,
    request_side,
    decision_core,
    response_side,
    memory_store,
    whole_call
);
criterion_main!(benches);
