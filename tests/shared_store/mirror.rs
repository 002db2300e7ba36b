//! The Lua scripts mirror the pure core: one table of admission and settlement sequences run
//! on the embedded store and on Redis (a single server and a Cluster) must decide alike.
//! Policies refill slowly (per hour), so the milliseconds Redis's clock moves during a run
//! change no decision and no whole second of `Retry-After`.

use std::sync::Arc;

use turnpike::config::{AccountSeed, FailMode, StoreConfig, StoreKind};
use turnpike::metrics::Metrics;
use turnpike::store::{AdminStore, CallStore, MemoryStore, RedisStore, Store};
use turnpike_core::admission::{Admission, Refusal, Reservation, Scope, Settlement, ShadowHit};
use turnpike_core::billing::Pricing;
use turnpike_core::limits::{retry_after_secs, BucketKind, BucketSpec, Mode, Policy, Quota};
use turnpike_core::usage::Usage;

use crate::support::redis::{RedisCluster, RedisServer};

/// What a store decided, with time rounded to what a client sees.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Decision {
    Admitted {
        reservation: Reservation,
        quota: Option<Quota>,
        shadow: Vec<ShadowHit>,
    },
    Limited {
        scope: Scope,
        bucket: BucketKind,
        retry_after_secs: u64,
        rule: String,
        quota: Option<Quota>,
        shadow: Vec<ShadowHit>,
    },
    Broke {
        quota: Option<Quota>,
        shadow: Vec<ShadowHit>,
    },
}

/// One step of a case.
#[derive(Clone)]
enum Step {
    /// Admits call `n`.
    Admit(usize),
    /// Settles call `n` (admitted before) with this usage and cost.
    Settle(usize, Option<Usage>, i64),
}

struct Case {
    name: &'static str,
    key_policy: Option<Policy>,
    agent_policy: Option<Policy>,
    pricing: Option<Pricing>,
    balance: i64,
    steps: Vec<Step>,
}

fn hourly(rate: u64, burst: u64) -> Option<BucketSpec> {
    Some(BucketSpec {
        rate,
        period_ms: 3_600_000,
        burst,
    })
}

fn policy(
    requests: Option<BucketSpec>,
    tokens: Option<BucketSpec>,
    concurrency: Option<u32>,
    mode: Mode,
) -> Option<Policy> {
    Some(Policy {
        name: "p".into(),
        requests,
        tokens,
        concurrency,
        mode,
    })
}

fn usage(total: u64) -> Option<Usage> {
    Some(Usage {
        input_tokens: total / 2,
        output_tokens: total - total / 2,
        total_tokens: total,
    })
}

fn cases() -> Vec<Case> {
    use Step::*;
    let enforce = Mode::Enforce;
    vec![
        Case {
            name: "a request bucket admits its burst, then refuses",
            key_policy: policy(hourly(1, 3), None, None, enforce),
            agent_policy: None,
            pricing: None,
            balance: 0,
            steps: (0..5).map(Admit).collect(),
        },
        Case {
            name: "a token bucket goes negative after a large answer",
            key_policy: policy(None, hourly(100, 100), None, enforce),
            agent_policy: None,
            pricing: None,
            balance: 0,
            steps: vec![Admit(0), Settle(0, usage(250), 0), Admit(1), Admit(2)],
        },
        Case {
            name: "a concurrency slot is held until settlement",
            key_policy: policy(None, None, Some(1), enforce),
            agent_policy: None,
            pricing: None,
            balance: 0,
            steps: vec![Admit(0), Admit(1), Settle(0, None, 0), Admit(2), Admit(3)],
        },
        Case {
            name: "reservations never overspend; settlement debits the cost once",
            key_policy: None,
            agent_policy: None,
            pricing: Some(Pricing {
                input_per_mtok: 1_000_000,
                output_per_mtok: 1_000_000,
                reserve: 400,
            }),
            balance: 1000,
            steps: vec![
                Admit(0),
                Admit(1),
                Admit(2),
                Settle(0, usage(500), 500),
                Settle(0, usage(500), 500),
                Admit(3),
                Settle(1, usage(10), 10),
                Admit(4),
            ],
        },
        Case {
            name: "a shadow policy admits and reports what it would refuse",
            key_policy: policy(hourly(1, 1), None, Some(1), Mode::Shadow),
            agent_policy: None,
            pricing: None,
            balance: 0,
            steps: (0..3).map(Admit).collect(),
        },
        Case {
            name: "the agent's policy limits all keys; the tightest quota is reported",
            key_policy: policy(hourly(1, 5), None, None, enforce),
            agent_policy: policy(hourly(1, 2), None, None, enforce),
            pricing: None,
            balance: 0,
            steps: (0..4).map(Admit).collect(),
        },
        Case {
            name: "a rate limit refuses before the balance does",
            key_policy: None,
            agent_policy: policy(hourly(2, 1), None, Some(5), enforce),
            pricing: Some(Pricing {
                input_per_mtok: 0,
                output_per_mtok: 0,
                reserve: 600,
            }),
            balance: 1000,
            steps: vec![Admit(0), Admit(1), Settle(0, None, 0), Admit(2)],
        },
        Case {
            name: "the longest wait wins when both scopes refuse",
            key_policy: policy(hourly(1, 1), None, None, enforce),
            agent_policy: policy(hourly(4, 1), None, None, enforce),
            pricing: None,
            balance: 0,
            steps: (0..3).map(Admit).collect(),
        },
    ]
}

/// Runs every case on `store`; ids are prefixed so cases (and stores) never share state.
async fn run(store: &dyn Store, prefix: &str) -> Vec<(String, Vec<Decision>, Option<(i64, i64)>)> {
    let mut out = Vec::new();
    for (i, case) in cases().into_iter().enumerate() {
        let (account, key, agent) = (
            format!("{prefix}acct{i}"),
            format!("{prefix}key{i}"),
            format!("ag_{prefix}{i}"),
        );
        store
            .apply_config(
                &Default::default(),
                &[AccountSeed {
                    id: account.clone(),
                    balance: case.balance,
                }],
            )
            .await
            .unwrap();
        let mut admitted: Vec<Option<Reservation>> = vec![None; 16];
        let mut decisions = Vec::new();
        for step in &case.steps {
            match step {
                Step::Admit(n) => {
                    let call_id = format!("{prefix}call{i}-{n}");
                    let call = Admission {
                        call_id: &call_id,
                        key_id: &key,
                        account: &account,
                        agent: &agent,
                        key_policy: case.key_policy.as_ref(),
                        agent_policy: case.agent_policy.as_ref(),
                        pricing: case.pricing.as_ref(),
                        now_ms: 0,
                        lease_ms: 600_000,
                    };
                    let decision = match store.admit(&call).await.unwrap() {
                        Ok(a) => {
                            admitted[*n] = Some(a.reservation);
                            Decision::Admitted {
                                reservation: a.reservation,
                                quota: a.quota,
                                shadow: a.shadow_hits,
                            }
                        }
                        Err(Refusal::RateLimited {
                            scope,
                            bucket,
                            retry_after_ms,
                            rule,
                            quota,
                            shadow_hits,
                        }) => Decision::Limited {
                            scope,
                            bucket,
                            retry_after_secs: retry_after_secs(retry_after_ms),
                            rule,
                            quota,
                            shadow: shadow_hits,
                        },
                        Err(Refusal::InsufficientBalance { quota, shadow_hits }) => {
                            Decision::Broke {
                                quota,
                                shadow: shadow_hits,
                            }
                        }
                    };
                    decisions.push(decision);
                }
                Step::Settle(n, usage, cost) => {
                    let call_id = format!("{prefix}call{i}-{n}");
                    let settlement = Settlement {
                        call_id: &call_id,
                        key_id: &key,
                        account: &account,
                        agent: &agent,
                        key_policy: case.key_policy.as_ref(),
                        agent_policy: case.agent_policy.as_ref(),
                        reservation: admitted[*n].expect("settled calls were admitted"),
                        usage: *usage,
                        cost: *cost,
                        now_ms: 0,
                        request_id: "req",
                        session_id: "sess",
                        status: 200,
                    };
                    store.settle(&settlement).await;
                }
            }
        }
        let balance = store
            .balance(&account)
            .await
            .unwrap()
            .map(|a| (a.balance, a.reserved));
        out.push((case.name.to_string(), decisions, balance));
    }
    out
}

/// A Redis store on `urls` (a Cluster's seed nodes when `cluster`), and the runtime it runs on.
fn connect(urls: Vec<String>, cluster: bool) -> (tokio::runtime::Runtime, Arc<RedisStore>) {
    let config = StoreConfig {
        lease_grace: std::time::Duration::from_secs(60),
        kind: StoreKind::Redis,
        cluster,
        urls,
        on_unavailable: FailMode::FailClosed,
        timeout: std::time::Duration::from_secs(2),
        key_cache_ttl: std::time::Duration::from_secs(1),
        usage_stream_maxlen: 1000,
        settlement_queue: 10,
        journal_dir: None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let handle = runtime.handle().clone();
    let store = runtime
        .block_on(RedisStore::connect(&config, &Metrics::new(), handle))
        .unwrap();
    (runtime, store)
}

fn compare(urls: Vec<String>, cluster: bool) {
    let (runtime, redis) = connect(urls, cluster);
    let memory = MemoryStore::new();
    let expected = runtime.block_on(run(&memory, "m"));
    let got = runtime.block_on(run(redis.as_ref(), "r"));
    for (want, have) in expected.iter().zip(&got) {
        assert_eq!(want, have, "case: {}", want.0);
    }
    assert_eq!(expected.len(), got.len());
}

#[test]
fn an_admission_sent_twice_takes_nothing_twice() {
    let redis = RedisServer::start();
    let (runtime, store) = connect(vec![redis.url()], false);
    let key_policy = policy(hourly(1, 5), None, Some(3), Mode::Enforce).unwrap();
    let pricing = Pricing {
        input_per_mtok: 0,
        output_per_mtok: 0,
        reserve: 100,
    };
    let call = Admission {
        call_id: "call-resent",
        key_id: "key1",
        account: "acct1",
        agent: "ag_x",
        key_policy: Some(&key_policy),
        agent_policy: None,
        pricing: Some(&pricing),
        now_ms: 0,
        lease_ms: 600_000,
    };
    runtime.block_on(async {
        store
            .apply_config(
                &Default::default(),
                &[AccountSeed {
                    id: "acct1".into(),
                    balance: 1000,
                }],
            )
            .await
            .unwrap();
        let first = store.admit(&call).await.unwrap().unwrap();
        let again = store.admit(&call).await.unwrap().unwrap();
        assert_eq!(again.reservation, first.reservation);
        let account = store.balance("acct1").await.unwrap().unwrap();
        assert_eq!(
            (account.balance, account.reserved),
            (1000, 100),
            "reserved once"
        );
        assert_eq!(first.quota.unwrap().remaining, 4);
        assert_eq!(again.quota.unwrap().remaining, 4, "one request token taken");
    });
}

#[test]
fn the_scripts_decide_as_the_embedded_store_does() {
    let redis = RedisServer::start();
    compare(vec![redis.url()], false);
}

#[test]
fn the_scripts_split_across_cluster_slots_decide_as_the_embedded_store_does() {
    let cluster = RedisCluster::start();
    compare(cluster.urls(), true);
}
