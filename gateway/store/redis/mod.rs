//! The Redis store: one shared state for many gateway instances, on a single Redis server or
//! a Redis Cluster. Admission and settlement are one Lua script each (`admit.lua`,
//! `settle.lua`), which mirror the pure core in `admission.rs` and read the time from Redis.
//!
//! Every call has a short deadline. After a failure the store stays "down" for a moment and
//! fails fast instead of making each call wait for its deadline; a background task probes it,
//! writes the settlements held meanwhile, and brings it back.

mod cache;
mod layout;
mod queue;

use async_trait::async_trait;
use futures_util::StreamExt;
use parking_lot::Mutex;
use prometheus::{Histogram, IntCounter};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, Pipeline, RedisFuture, RedisResult, Script, Value};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use self::cache::{Cached, KeyCache};
use self::layout::{Invocation, Plan, Purpose};
use self::queue::{SettlementQueue, Step};
use super::{AccountSeed, BalanceChange, MemoryStore, Store, StoreError, UsageFilter, UsageTotals};
use crate::admission::{Admission, Admitted, Refusal, Reservation, Scope, Settlement};
use crate::auth::{AgentScope, KeyHash, KeyRecord};
use crate::billing::AccountState;
use crate::config::{FailMode, StoreConfig};
use crate::limits::Quota;
use crate::metrics::Metrics;

const ADMIT_LUA: &str = concat!(include_str!("prelude.lua"), include_str!("admit.lua"));
const SETTLE_LUA: &str = concat!(include_str!("prelude.lua"), include_str!("settle.lua"));
const CHANGE_BALANCE_LUA: &str = r"
-- KEYS[1] account hash; ARGV[1] add | set, ARGV[2] amount. Unknown account: nil.
if redis.call('HEXISTS', KEYS[1], 'balance') == 0 then return false end
if ARGV[1] == 'add' then
  redis.call('HINCRBY', KEYS[1], 'balance', ARGV[2])
else
  redis.call('HSET', KEYS[1], 'balance', ARGV[2])
end
return redis.call('HMGET', KEYS[1], 'balance', 'reserved')
";

/// How long the store fails fast after a failed call before trying Redis again.
const DOWN_FOR_MS: u64 = 250;
/// How often held settlements are retried.
const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// The deadline of admin and start-up calls, which may do more work than one script.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(2);

/// The operations timed and counted in metrics (`op` label).
#[derive(Clone, Copy)]
enum Op {
    Key,
    Admit,
    Quota,
    Settle,
    Admin,
}

impl Op {
    const ALL: [Op; 5] = [Op::Key, Op::Admit, Op::Quota, Op::Settle, Op::Admin];

    fn label(self) -> &'static str {
        match self {
            Op::Key => "key",
            Op::Admit => "admit",
            Op::Quota => "quota",
            Op::Settle => "settle",
            Op::Admin => "admin",
        }
    }
}

/// Metric handles resolved once, so the hot path does no label lookups.
struct OpMetrics {
    duration: Histogram,
    errors: IntCounter,
}

/// A connection to one server or to a Cluster; both reconnect by themselves.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// How to open a connection; each runtime thread opens its own (see [`RedisStore::conn`]).
enum Connector {
    Single(redis::Client, ConnectionManagerConfig),
    Cluster(redis::cluster::ClusterClient),
}

impl Connector {
    async fn connect(&self) -> RedisResult<Conn> {
        match self {
            Connector::Single(client, config) => Ok(Conn::Single(
                ConnectionManager::new_with_config(client.clone(), config.clone()).await?,
            )),
            Connector::Cluster(client) => Ok(Conn::Cluster(client.get_async_connection().await?)),
        }
    }
}

pub struct RedisStore {
    /// Tells this store's per-thread connections from another's.
    id: usize,
    /// Bumped when connections may have broken; older ones are replaced on next use.
    generation: AtomicU64,
    connector: Connector,
    plan: Plan,
    timeout: Duration,
    fail_open: bool,
    stream_maxlen: u64,
    admit_script: Script,
    settle_script: Script,
    balance_script: Script,
    keys: KeyCache,
    /// The config file's keys, by hash: what a fail-open instance still recognises when
    /// Redis cannot be asked.
    config_keys: arc_swap::ArcSwap<HashMap<KeyHash, Arc<KeyRecord>>>,
    /// The buckets a fail-open instance enforces while Redis is down.
    local: MemoryStore,
    /// Calls admitted on `local` and not yet settled.
    local_calls: Mutex<HashSet<String>>,
    local_open: std::sync::atomic::AtomicUsize,
    queue: SettlementQueue,
    /// Milliseconds since `epoch` until which Redis counts as down (0: up).
    down_until_ms: AtomicU64,
    epoch: Instant,
    ops: [OpMetrics; 5],
    fail_open_admissions: IntCounter,
}

impl RedisStore {
    /// Connects (a list of URLs: a Cluster), warns about an evicting `maxmemory-policy`,
    /// and starts the key-change listener and the settlement flusher on `runtime`, which
    /// must outlive the store.
    pub async fn connect(
        config: &StoreConfig,
        metrics: &Metrics,
        runtime: tokio::runtime::Handle,
    ) -> Result<Arc<Self>, String> {
        let plan = if config.cluster {
            Plan::Cluster
        } else {
            Plan::Single
        };
        let connector = match plan {
            Plan::Single => Connector::Single(
                redis::Client::open(config.urls[0].as_str())
                    .map_err(|e| format!("store.url: {e}"))?,
                ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(config.timeout.max(Duration::from_millis(500))))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500)),
            ),
            Plan::Cluster => Connector::Cluster(
                redis::cluster::ClusterClient::builder(config.urls.clone())
                    .connection_timeout(config.timeout.max(Duration::from_millis(500)))
                    .response_timeout(config.timeout)
                    .retries(1)
                    .build()
                    .map_err(|e| format!("store.url: {e}"))?,
            ),
        };
        // Fail at start, not on the first call, when Redis cannot be reached.
        match tokio::time::timeout(ADMIN_TIMEOUT, connector.connect()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("Redis at {}: {e}", config.urls.join(", "))),
            Err(_) => {
                return Err(format!(
                    "Redis at {} did not answer",
                    config.urls.join(", ")
                ))
            }
        }
        let ops = Op::ALL.map(|op| OpMetrics {
            duration: metrics.store_duration.with_label_values(&[op.label()]),
            errors: metrics.store_errors.with_label_values(&[op.label()]),
        });
        static STORES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let store = Arc::new(Self {
            id: STORES.fetch_add(1, Ordering::Relaxed),
            generation: AtomicU64::new(0),
            connector,
            plan,
            timeout: config.timeout,
            fail_open: config.on_unavailable == FailMode::FailOpen,
            stream_maxlen: config.usage_stream_maxlen,
            admit_script: Script::new(ADMIT_LUA),
            settle_script: Script::new(SETTLE_LUA),
            balance_script: Script::new(CHANGE_BALANCE_LUA),
            keys: KeyCache::new(config.key_cache_ttl),
            config_keys: Default::default(),
            local: MemoryStore::new(),
            local_calls: Mutex::new(HashSet::new()),
            local_open: Default::default(),
            queue: SettlementQueue::new(
                config.settlement_queue,
                metrics.settlements_queued.clone(),
                metrics.settlements_dropped.clone(),
            ),
            down_until_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            ops,
            fail_open_admissions: metrics.fail_open_admissions.clone(),
        });
        for url in &config.urls {
            warn_if_evicting(url).await;
        }
        runtime.spawn(listen_for_key_changes(
            Arc::downgrade(&store),
            config.urls.clone(),
        ));
        runtime.spawn(flush_held_settlements(Arc::downgrade(&store)));
        Ok(store)
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn is_down(&self) -> bool {
        self.now_ms() < self.down_until_ms.load(Ordering::Relaxed)
    }

    /// Runs one Redis call under the deadline, timing it and counting its failure. While
    /// Redis counts as down, fails at once.
    async fn run<T>(
        &self,
        op: Op,
        deadline: Duration,
        call: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, StoreError> {
        let metrics = &self.ops[op as usize];
        if self.is_down() {
            metrics.errors.inc();
            return Err(StoreError::Unreachable("Redis is unreachable".into()));
        }
        let started = Instant::now();
        let result = tokio::time::timeout(deadline, call).await;
        metrics.duration.observe(started.elapsed().as_secs_f64());
        let error = match result {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(error)) if is_reply_error(&error) => {
                // Redis answered: it is up, the command was wrong.
                metrics.errors.inc();
                return Err(StoreError::Refused(error.to_string()));
            }
            Ok(Err(error)) if error.is_connection_refusal() => {
                StoreError::Unreachable(error.to_string())
            }
            Ok(Err(error)) => StoreError::Unavailable(error.to_string()),
            Err(_) => StoreError::Unavailable(format!("no answer within {deadline:?}")),
        };
        metrics.errors.inc();
        self.mark_down(&error.to_string());
        Err(error)
    }

    fn mark_down(&self, error: &str) {
        let until = self.now_ms() + DOWN_FOR_MS;
        if self.down_until_ms.swap(until, Ordering::Relaxed) == 0 {
            tracing::warn!(%error, "Redis is unreachable");
        }
    }

    fn mark_up(&self) {
        if self.down_until_ms.swap(0, Ordering::Relaxed) != 0 {
            self.renew_connections();
            tracing::info!("Redis is reachable again");
        }
    }

    async fn invoke<T: FromRedisValue>(
        &self,
        op: Op,
        script: &Script,
        invocation: &Invocation,
    ) -> Result<T, StoreError> {
        self.invoke_within(op, self.timeout, script, invocation)
            .await
    }

    async fn invoke_within<T: FromRedisValue>(
        &self,
        op: Op,
        deadline: Duration,
        script: &Script,
        invocation: &Invocation,
    ) -> Result<T, StoreError> {
        let mut call = script.prepare_invoke();
        for key in &invocation.keys {
            call.key(key);
        }
        for arg in &invocation.args {
            call.arg(arg);
        }
        self.run(op, deadline, async move {
            let mut conn = self.conn().await?;
            call.invoke_async(&mut conn).await
        })
        .await
    }

    /// One command under `deadline`.
    async fn query<T: FromRedisValue>(
        &self,
        op: Op,
        deadline: Duration,
        cmd: &Cmd,
    ) -> Result<T, StoreError> {
        self.run(op, deadline, async move {
            let mut conn = self.conn().await?;
            cmd.query_async(&mut conn).await
        })
        .await
    }

    /// One command with the admin deadline.
    async fn admin<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, StoreError> {
        self.query(Op::Admin, ADMIN_TIMEOUT, cmd).await
    }

    /// This thread's connection, made on first use. Each runtime thread has its own, so a
    /// call's Redis I/O runs on the thread that awaits it: no cross-thread wake-ups.
    /// A connection from before Redis was last unreachable is replaced, so no thread keeps
    /// one that broke while it sat idle.
    async fn conn(&self) -> RedisResult<Conn> {
        thread_local! {
            static CONNECTIONS: std::cell::RefCell<HashMap<usize, (u64, Conn)>> =
                std::cell::RefCell::new(HashMap::new());
        }
        let generation = self.generation.load(Ordering::Relaxed);
        let cached = CONNECTIONS.with(|c| c.borrow().get(&self.id).cloned());
        if let Some((made_in, conn)) = cached {
            if made_in == generation {
                return Ok(conn);
            }
        }
        let conn = self.connector.connect().await?;
        CONNECTIONS.with(|c| c.borrow_mut().insert(self.id, (generation, conn.clone())));
        Ok(conn)
    }

    /// Every thread opens a new connection on its next call.
    fn renew_connections(&self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    /// Writes the steps of one settlement; what could not be written is left in `steps`.
    async fn write(&self, steps: &mut Vec<Step>) -> Result<(), StoreError> {
        let mut outcome = Ok(());
        let mut left = Vec::new();
        for step in steps.drain(..) {
            if outcome.is_err() {
                left.push(step);
                continue;
            }
            match step {
                Step::Script {
                    invocation,
                    stream_after,
                } => match self
                    .invoke::<i64>(Op::Settle, &self.settle_script, &invocation)
                    .await
                {
                    Ok(applied) => {
                        if let (1, Some(entry)) = (applied, stream_after) {
                            if let Err(error) = self.append(&entry).await {
                                left.push(Step::Stream(entry));
                                outcome = Err(error);
                            }
                        }
                    }
                    Err(error) => {
                        left.push(Step::Script {
                            invocation,
                            stream_after,
                        });
                        outcome = Err(error);
                    }
                },
                Step::Stream(entry) => {
                    if let Err(error) = self.append(&entry).await {
                        left.push(Step::Stream(entry));
                        outcome = Err(error);
                    }
                }
            }
        }
        *steps = left;
        outcome
    }

    async fn append(&self, entry: &Cmd) -> Result<(), StoreError> {
        self.query::<Value>(Op::Settle, self.timeout, entry)
            .await
            .map(drop)
    }

    fn settle_steps(&self, call: &Settlement, purpose: Purpose) -> Vec<Step> {
        layout::settle_sides(call, self.plan, self.stream_maxlen, purpose)
            .into_iter()
            .map(|side| Step::Script {
                stream_after: (side.account_side && !side.writes_stream && call.usage.is_some())
                    .then(|| layout::stream_entry(call, self.stream_maxlen, unix_ms())),
                invocation: side.invocation,
            })
            .collect()
    }

    /// Admits on this instance's own buckets, skipping the balance: Redis is down and the
    /// operator chose availability.
    async fn admit_locally(
        &self,
        call: &Admission<'_>,
    ) -> Result<Result<Admitted, Refusal>, StoreError> {
        let unpriced = Admission {
            pricing: None,
            ..*call
        };
        let decision = self.local.admit(&unpriced).await?;
        if decision.is_ok() {
            self.fail_open_admissions.inc();
            self.local_calls.lock().insert(call.call_id.to_owned());
            self.local_open.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                call_id = call.call_id,
                key_id = call.key_id,
                agent = call.agent,
                "admitted without Redis (fail_open): local limits, no balance check"
            );
        }
        Ok(decision)
    }

    /// Gives back what a side took for a call another side refused.
    /// Undoes what one side of an admission took, or may have taken: a side that admitted
    /// a call another side refused gives everything back (`reply` given); a side whose
    /// answer was lost releases any reservation and slots its script may have taken.
    async fn undo(
        &self,
        call: &Admission<'_>,
        side: &layout::Side<'_>,
        reply: Option<&layout::SideReply>,
    ) {
        let (key_slot, agent_slot, purpose) = match reply.map(|r| &r.outcome) {
            Some(layout::SideOutcome::Admitted {
                key_slot,
                agent_slot,
            }) => (
                *key_slot,
                *agent_slot,
                Purpose::Refund {
                    key: side.judges(Scope::Key),
                    agent: side.judges(Scope::Agent),
                },
            ),
            Some(_) => return,
            None => (
                side.judges(Scope::Key),
                side.judges(Scope::Agent),
                Purpose::Release,
            ),
        };
        let settlement = Settlement {
            call_id: call.call_id,
            key_id: call.key_id,
            account: call.account,
            agent: call.agent,
            key_policy: call.key_policy,
            agent_policy: call.agent_policy,
            reservation: Reservation {
                reserve: if side.priced() {
                    call.pricing.map_or(0, |p| p.reserve)
                } else {
                    0
                },
                key_slot,
                agent_slot,
            },
            usage: None,
            cost: 0,
            now_ms: call.now_ms,
            request_id: "",
            session_id: "",
            status: 0,
        };
        let mut steps = self.settle_steps(&settlement, purpose);
        if self.write(&mut steps).await.is_err() {
            self.queue.push(steps);
        }
    }

    async fn fetch_key(&self, hash: &KeyHash) -> Result<Option<Arc<KeyRecord>>, StoreError> {
        let fields: HashMap<String, String> = self
            .query(
                Op::Key,
                self.timeout,
                redis::cmd("HGETALL").arg(layout::key_record(hash)),
            )
            .await?;
        Ok(parse_record(&fields).map(Arc::new))
    }

    /// Tells every instance (this one included) that a key changed.
    async fn announce(&self, what: &str) {
        match KeyHash::from_hex(what) {
            Some(hash) => self.keys.forget(&hash),
            None => self.keys.forget_all(),
        }
        let _ = self
            .admin::<Value>(redis::cmd("PUBLISH").arg(layout::KEY_EVENTS).arg(what))
            .await;
    }

    async fn write_record(&self, hash: &KeyHash, record: &KeyRecord) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("HSET");
        cmd.arg(layout::key_record(hash));
        for (field, value) in record_fields(record) {
            cmd.arg(field).arg(value);
        }
        self.admin::<Value>(&cmd).await?;
        self.admin::<Value>(
            redis::cmd("SADD")
                .arg(layout::ACCOUNTS)
                .arg(&record.account),
        )
        .await?;
        Ok(())
    }

    /// The hash of the key with this public id, from the id index.
    async fn hash_of(&self, id: &str) -> Result<Option<KeyHash>, StoreError> {
        let hex: Option<String> = self
            .admin(redis::cmd("GET").arg(layout::key_index(id)))
            .await?;
        Ok(hex.as_deref().and_then(KeyHash::from_hex))
    }

    async fn remove_key(&self, id: &str) -> Result<(), StoreError> {
        if let Some(hash) = self.hash_of(id).await? {
            self.admin::<Value>(redis::cmd("DEL").arg(layout::key_record(&hash)))
                .await?;
        }
        self.admin::<Value>(redis::cmd("DEL").arg(layout::key_index(id)))
            .await?;
        Ok(())
    }
}

/// Whether Redis itself answered with an error (so it is up).
fn is_reply_error(error: &redis::RedisError) -> bool {
    !(error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_unrecoverable_error())
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[async_trait]
impl Store for RedisStore {
    async fn admit(&self, call: &Admission<'_>) -> Result<Result<Admitted, Refusal>, StoreError> {
        let sides = layout::admit_sides(call, self.plan, false);
        let replies =
            futures_util::future::join_all(sides.iter().map(|side| {
                self.invoke::<Vec<i64>>(Op::Admit, &self.admit_script, &side.invocation)
            }))
            .await;
        let mut decoded = Vec::with_capacity(replies.len());
        // Whether each side's script may have run.
        let mut sent = Vec::with_capacity(replies.len());
        let mut failure = None;
        for (side, reply) in sides.iter().zip(replies) {
            sent.push(!matches!(reply, Err(StoreError::Unreachable(_))));
            match reply.map(|r| layout::decode_admit(side, &r)) {
                Ok(Some(reply)) => decoded.push(Some(reply)),
                Ok(None) => {
                    failure = Some(StoreError::Refused("unexpected admission reply".into()));
                    decoded.push(None);
                }
                Err(error) => {
                    failure = Some(error);
                    decoded.push(None);
                }
            }
        }
        let answered: Vec<layout::SideReply> = decoded.iter().flatten().cloned().collect();
        let Some(error) = failure else {
            let decision = layout::combine(call, &answered);
            if decision.is_err() {
                for (side, reply) in sides.iter().zip(&decoded) {
                    self.undo(call, side, reply.as_ref()).await;
                }
            }
            return Ok(decision);
        };
        // Some side's answer was lost: whatever its script may have taken is released, and
        // whatever the other side took is given back.
        for ((side, reply), sent) in sides.iter().zip(&decoded).zip(sent) {
            if sent {
                self.undo(call, side, reply.as_ref()).await;
            }
        }
        // A refusal Redis did give stands, whatever happened to the other side.
        let refused = answered.iter().any(|r| {
            matches!(
                r.outcome,
                layout::SideOutcome::RateLimited { .. } | layout::SideOutcome::InsufficientBalance
            )
        });
        if refused {
            return Ok(layout::combine(call, &answered));
        }
        if self.fail_open {
            self.admit_locally(call).await
        } else {
            Err(error)
        }
    }

    async fn quota(&self, call: &Admission<'_>) -> Result<Option<Quota>, StoreError> {
        let sides = layout::admit_sides(call, self.plan, true);
        let mut replies = Vec::with_capacity(sides.len());
        for side in &sides {
            let reply: Vec<i64> = self
                .invoke(Op::Quota, &self.admit_script, &side.invocation)
                .await?;
            replies.extend(layout::decode_admit(side, &reply));
        }
        Ok(layout::tightest(&replies))
    }

    async fn settle(&self, call: &Settlement<'_>) -> Result<(), StoreError> {
        if self.local_open.load(Ordering::Relaxed) > 0
            && self.local_calls.lock().remove(call.call_id)
        {
            self.local_open.fetch_sub(1, Ordering::Relaxed);
            self.local.settle(call).await?;
        }
        let mut steps = self.settle_steps(call, Purpose::Settle);
        if steps.is_empty() {
            return Ok(());
        }
        if self.write(&mut steps).await.is_err() {
            // Written when Redis is back; the call's usage is not lost.
            self.queue.push(steps);
        }
        Ok(())
    }

    async fn key(&self, hash: &KeyHash) -> Result<Option<Arc<KeyRecord>>, StoreError> {
        let stale = match self.keys.get(hash) {
            Cached::Fresh(record) => return Ok(record),
            Cached::Stale(record) => Some(record),
            Cached::Unknown => None,
        };
        let epoch = self.keys.epoch();
        match self.fetch_key(hash).await {
            Ok(record) => {
                self.keys.put(*hash, record.clone(), epoch);
                Ok(record)
            }
            Err(error) if self.fail_open => match stale {
                Some(record) => Ok(record),
                None => match self.config_keys.load().get(hash) {
                    Some(record) => Ok(Some(Arc::clone(record))),
                    None => Err(error),
                },
            },
            Err(error) => Err(error),
        }
    }

    async fn key_by_id(&self, id: &str) -> Result<Option<Arc<KeyRecord>>, StoreError> {
        let Some(hash) = self.hash_of(id).await? else {
            return Ok(None);
        };
        let fields: HashMap<String, String> = self
            .admin(redis::cmd("HGETALL").arg(layout::key_record(&hash)))
            .await?;
        Ok(parse_record(&fields).map(Arc::new))
    }

    async fn create_key(&self, hash: KeyHash, record: KeyRecord) -> Result<bool, StoreError> {
        let claimed: Option<String> = self
            .admin(
                redis::cmd("SET")
                    .arg(layout::key_index(&record.id))
                    .arg(hash.to_hex())
                    .arg("NX"),
            )
            .await?;
        if claimed.is_none() {
            return Ok(false);
        }
        let taken: i64 = self
            .admin(redis::cmd("EXISTS").arg(layout::key_record(&hash)))
            .await?;
        if taken == 1 {
            self.admin::<Value>(redis::cmd("DEL").arg(layout::key_index(&record.id)))
                .await?;
            return Ok(false);
        }
        self.write_record(&hash, &record).await?;
        self.announce(&hash.to_hex()).await;
        Ok(true)
    }

    async fn revoke_key(&self, id: &str) -> Result<bool, StoreError> {
        let Some(hash) = self.hash_of(id).await? else {
            return Ok(false);
        };
        self.admin::<Value>(
            redis::cmd("HSET")
                .arg(layout::key_record(&hash))
                .arg("revoked")
                .arg("1"),
        )
        .await?;
        self.announce(&hash.to_hex()).await;
        Ok(true)
    }

    async fn seed(
        &self,
        keys: &[(KeyHash, KeyRecord)],
        accounts: &[AccountSeed],
    ) -> Result<(), StoreError> {
        let listed: HashSet<&str> = keys.iter().map(|(_, r)| r.id.as_str()).collect();
        let seeded: Vec<String> = self
            .admin(redis::cmd("SMEMBERS").arg(layout::CONFIG_KEYS))
            .await?;
        for gone in seeded.iter().filter(|id| !listed.contains(id.as_str())) {
            self.remove_key(gone).await?;
            self.admin::<Value>(redis::cmd("SREM").arg(layout::CONFIG_KEYS).arg(gone))
                .await?;
        }
        for (hash, record) in keys {
            if self.hash_of(&record.id).await?.is_some_and(|p| p != *hash) {
                // The file gave this id a new secret: the old one stops working.
                self.remove_key(&record.id).await?;
            }
            let live = KeyRecord {
                revoked: false,
                ..record.clone()
            };
            let mut fields = record_fields(&live);
            // A key revoked in the store stays revoked.
            fields.retain(|(field, _)| *field != "revoked");
            let mut cmd = redis::cmd("HSET");
            cmd.arg(layout::key_record(hash));
            for (field, value) in fields {
                cmd.arg(field).arg(value);
            }
            self.admin::<Value>(&cmd).await?;
            self.admin::<Value>(
                redis::cmd("HSETNX")
                    .arg(layout::key_record(hash))
                    .arg("revoked")
                    .arg("0"),
            )
            .await?;
            self.admin::<Value>(
                redis::cmd("SET")
                    .arg(layout::key_index(&record.id))
                    .arg(hash.to_hex()),
            )
            .await?;
            self.admin::<Value>(redis::cmd("SADD").arg(layout::CONFIG_KEYS).arg(&record.id))
                .await?;
            self.admin::<Value>(
                redis::cmd("SADD")
                    .arg(layout::ACCOUNTS)
                    .arg(&record.account),
            )
            .await?;
        }
        for account in accounts {
            // An account that exists keeps its live balance: a restart resets nothing.
            self.admin::<Value>(
                redis::cmd("HSETNX")
                    .arg(layout::account_hash(&account.id))
                    .arg("balance")
                    .arg(account.balance),
            )
            .await?;
            self.admin::<Value>(redis::cmd("SADD").arg(layout::ACCOUNTS).arg(&account.id))
                .await?;
        }
        self.config_keys.store(Arc::new(
            keys.iter()
                .map(|(hash, record)| (*hash, Arc::new(record.clone())))
                .collect(),
        ));
        self.announce("*").await;
        Ok(())
    }

    async fn balance(&self, account: &str) -> Result<Option<AccountState>, StoreError> {
        let fields: Vec<Option<i64>> = self
            .admin(
                redis::cmd("HMGET")
                    .arg(layout::account_hash(account))
                    .arg("balance")
                    .arg("reserved"),
            )
            .await?;
        Ok(account_state(&fields))
    }

    async fn change_balance(
        &self,
        account: &str,
        change: BalanceChange,
    ) -> Result<Option<AccountState>, StoreError> {
        let (how, amount) = match change {
            BalanceChange::Add(n) => ("add", n),
            BalanceChange::Set(n) => ("set", n),
        };
        let invocation = Invocation {
            keys: vec![layout::account_hash(account)],
            args: vec![how.to_owned(), amount.to_string()],
        };
        let fields: Option<Vec<Option<i64>>> = self
            .invoke_within(Op::Admin, ADMIN_TIMEOUT, &self.balance_script, &invocation)
            .await?;
        Ok(fields.as_deref().and_then(account_state))
    }

    async fn usage(&self, filter: &UsageFilter) -> Result<UsageTotals, StoreError> {
        let accounts: Vec<String> = match &filter.account {
            Some(account) => vec![account.clone()],
            None => {
                self.admin(redis::cmd("SMEMBERS").arg(layout::ACCOUNTS))
                    .await?
            }
        };
        let mut sum = UsageTotals::default();
        for account in &accounts {
            let rows: HashMap<String, i64> = self
                .admin(redis::cmd("HGETALL").arg(layout::usage_hash(account)))
                .await?;
            for (field, value) in rows {
                let mut parts = field.split('\x1f');
                let (Some(name), Some(key), Some(agent)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    continue;
                };
                let wanted =
                    |w: &Option<String>, have: &str| w.as_deref().is_none_or(|w| w == have);
                if !wanted(&filter.key, key) || !wanted(&filter.agent, agent) {
                    continue;
                }
                let value = value.max(0) as u64;
                match name {
                    "requests" => sum.requests += value,
                    "input_tokens" => sum.input_tokens += value,
                    "output_tokens" => sum.output_tokens += value,
                    "total_tokens" => sum.total_tokens += value,
                    "cost" => sum.cost = sum.cost.saturating_add(value as i64),
                    _ => {}
                }
            }
        }
        Ok(sum)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        // Not `run`: readiness asks Redis itself even while calls fail fast.
        let ping = async {
            let mut conn = self.conn().await?;
            redis::cmd("PING").query_async::<Value>(&mut conn).await
        };
        match tokio::time::timeout(ADMIN_TIMEOUT, ping).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(StoreError::Unavailable(error.to_string())),
            Err(_) => Err(StoreError::Unavailable("Redis did not answer PING".into())),
        }
    }
}

fn account_state(fields: &[Option<i64>]) -> Option<AccountState> {
    let balance = (*fields.first()?)?;
    Some(AccountState {
        balance,
        reserved: fields.get(1).copied().flatten().unwrap_or(0),
    })
}

/// A key record as hash fields. Agents are `*` or a JSON list.
fn record_fields(record: &KeyRecord) -> Vec<(&'static str, String)> {
    let agents = match &record.agents {
        AgentScope::All => "*".to_owned(),
        AgentScope::Only(agents) => serde_json::to_string(agents).unwrap_or_default(),
    };
    vec![
        ("id", record.id.clone()),
        ("account", record.account.clone()),
        ("agents", agents),
        ("policy", record.policy.clone()),
        (
            "expires_at",
            record
                .expires_at
                .map_or_else(String::new, |t| t.to_string()),
        ),
        ("revoked", if record.revoked { "1" } else { "0" }.to_owned()),
    ]
}

fn parse_record(fields: &HashMap<String, String>) -> Option<KeyRecord> {
    let agents = match fields.get("agents")?.as_str() {
        "*" => AgentScope::All,
        list => AgentScope::Only(serde_json::from_str(list).ok()?),
    };
    Some(KeyRecord {
        id: fields.get("id")?.clone(),
        account: fields.get("account")?.clone(),
        agents,
        policy: fields.get("policy")?.clone(),
        expires_at: fields.get("expires_at").and_then(|t| t.parse().ok()),
        revoked: fields.get("revoked").is_some_and(|r| r == "1"),
    })
}

/// Warns when Redis may evict keys: eviction silently resets limits and balances.
async fn warn_if_evicting(url: &str) {
    let Ok(client) = redis::Client::open(url) else {
        return;
    };
    let asking = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("CONFIG")
            .arg("GET")
            .arg("maxmemory-policy")
            .query_async::<Vec<String>>(&mut conn)
            .await
    };
    if let Ok(Ok(reply)) = tokio::time::timeout(ADMIN_TIMEOUT, asking).await {
        if let Some(policy) = reply.get(1).filter(|p| *p != "noeviction") {
            tracing::warn!(
                %url,
                maxmemory_policy = %policy,
                "Redis may evict keys, which silently resets rate limits and balances; set maxmemory-policy noeviction"
            );
        }
    }
}

/// Listens on the key-change channel and drops changed keys from the cache. While the
/// subscription is down the cache's time limit bounds staleness; on every (re)subscription
/// the whole cache is dropped, since messages may have been missed.
async fn listen_for_key_changes(store: std::sync::Weak<RedisStore>, urls: Vec<String>) {
    for url in urls.iter().cycle() {
        let subscription = async {
            let client = redis::Client::open(url.as_str())?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(layout::KEY_EVENTS).await?;
            RedisResult::Ok(pubsub)
        };
        if let Ok(Ok(pubsub)) = tokio::time::timeout(ADMIN_TIMEOUT, subscription).await {
            let mut messages = pubsub.into_on_message();
            let Some(live) = store.upgrade() else { return };
            live.keys.forget_all();
            drop(live);
            while let Some(message) = messages.next().await {
                let Some(live) = store.upgrade() else { return };
                match message
                    .get_payload::<String>()
                    .ok()
                    .as_deref()
                    .and_then(KeyHash::from_hex)
                {
                    Some(hash) => live.keys.forget(&hash),
                    None => live.keys.forget_all(),
                }
            }
        }
        let Some(live) = store.upgrade() else { return };
        live.keys.forget_all();
        // The subscription broke: so may every idle connection to the same server.
        live.renew_connections();
        drop(live);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Writes held settlements, oldest first, whenever Redis answers; brings the store back up.
async fn flush_held_settlements(store: std::sync::Weak<RedisStore>) {
    loop {
        tokio::time::sleep(FLUSH_EVERY).await;
        let Some(store) = store.upgrade() else { return };
        if store.is_down() || !store.queue.is_empty() {
            if store.ping().await.is_err() {
                continue;
            }
            store.mark_up();
        }
        while let Some(mut steps) = store.queue.pop() {
            match store.write(&mut steps).await {
                Ok(()) => {}
                // Redis answered with an error: retrying cannot help, and must not hold up
                // everything queued behind it.
                Err(StoreError::Refused(error)) => store.queue.give_up(&error),
                Err(_) => {
                    store.queue.put_back(steps);
                    break;
                }
            }
        }
    }
}
