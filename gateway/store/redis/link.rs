//! The connections to Redis and their health. Every call runs under a deadline; after a
//! failure the link counts as down for a moment and fails fast instead of making each call
//! wait for its deadline, until a probe (`ping`) finds Redis answering again.

use prometheus::{Histogram, IntCounter};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, Pipeline, RedisFuture, RedisResult, Script, Value};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::protocol::Invocation;
use crate::config::StoreConfig;
use crate::metrics::Metrics;
use crate::store::{StoreError, StoreErrorKind};

/// How long the link fails fast after a failed call before trying Redis again.
const DOWN_FOR_MS: u64 = 250;
/// The deadline of admin and start-up calls, which may do more work than one script.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(2);

/// The operations timed and counted in metrics (`op` label).
#[derive(Clone, Copy)]
pub enum Op {
    Key,
    Admit,
    Settle,
    /// A running stream's hold and leases.
    Extend,
    /// A slice of a bucket taken or given back (issue 23).
    Slice,
    /// The operator's reads and idempotent writes (`SET`, `HSET`, `SADD`, `DEL`).
    Admin,
    /// The operator's changes that must not be sent twice (a balance `add`, a `SET NX`).
    AdminOnce,
}

impl Op {
    const ALL: [Op; 7] = [
        Op::Key,
        Op::Admit,
        Op::Settle,
        Op::Extend,
        Op::Slice,
        Op::Admin,
        Op::AdminOnce,
    ];

    fn label(self) -> &'static str {
        match self {
            Op::Key => "key",
            Op::Admit => "admit",
            Op::Settle => "settle",
            Op::Extend => "extend",
            Op::Slice => "slice",
            Op::Admin | Op::AdminOnce => "admin",
        }
    }

    /// Whether sending the operation twice has the effect of sending it once: reads and
    /// idempotent writes; settlement, whose scripts mark each call id done; and admission,
    /// whose script takes nothing twice for a call id that holds a reservation or a slot (a
    /// call that holds neither may lose one more request token, never more); an extension,
    /// which asks for a total, not an increment; a slice's sync, marked done by a key of
    /// its own.
    fn resend_safe(self) -> bool {
        !matches!(self, Op::AdminOnce)
    }

    fn is_admin(self) -> bool {
        matches!(self, Op::Admin | Op::AdminOnce)
    }
}

/// Metric handles resolved once, so the hot path does no label lookups.
struct OpMetrics {
    duration: Histogram,
    errors: IntCounter,
}

/// A call Redis did not answer within its deadline.
#[derive(Debug, thiserror::Error)]
#[error("no answer within {0:?}")]
struct NoAnswer(Duration);

/// How a Redis call failed: before anything was sent (no connection), or after.
enum Failure {
    Connect(redis::RedisError),
    Call(redis::RedisError),
}

/// A call not sent because Redis counts as down.
#[derive(Debug, thiserror::Error)]
#[error("Redis is unreachable")]
struct KnownDown;

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

/// How to open a connection; each runtime thread opens its own (see [`Link::conn`]).
#[allow(clippy::large_enum_variant)] // one per store, made once
enum Connector {
    Single(redis::Client, ConnectionManagerConfig),
    /// The Cluster client resends a command whose answer was lost by itself, which the hot
    /// path's idempotent scripts allow; the operator's changes go through a second client
    /// that never resends, with the admin deadline.
    Cluster(ClusterClients),
}

struct ClusterClients {
    calls: redis::cluster::ClusterClient,
    admin: redis::cluster::ClusterClient,
}

impl Connector {
    fn new(config: &StoreConfig) -> RedisResult<Self> {
        let connect_within = config.timeout.max(Duration::from_millis(500));
        if config.cluster {
            let client = |response_timeout, retries| {
                redis::cluster::ClusterClient::builder(config.urls.clone())
                    .connection_timeout(connect_within)
                    .response_timeout(response_timeout)
                    .retries(retries)
                    .build()
            };
            return Ok(Connector::Cluster(ClusterClients {
                calls: client(config.timeout, 1)?,
                admin: client(ADMIN_TIMEOUT, 0)?,
            }));
        }
        let client = redis::Client::open(config.urls[0].as_str())?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(connect_within))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        Ok(Connector::Single(client, manager))
    }

    async fn connect(&self, op: Op) -> RedisResult<Conn> {
        match self {
            Connector::Single(client, config) => Ok(Conn::Single(
                ConnectionManager::new_with_config(client.clone(), config.clone()).await?,
            )),
            Connector::Cluster(clients) => {
                let client = if op.is_admin() {
                    &clients.admin
                } else {
                    &clients.calls
                };
                Ok(Conn::Cluster(client.get_async_connection().await?))
            }
        }
    }
}

pub struct Link {
    /// Tells this link's per-thread connections from another's.
    id: usize,
    /// Bumped when connections may have broken; older ones are replaced on next use.
    generation: AtomicU64,
    connector: Connector,
    /// The deadline of every call on the hot path.
    pub timeout: Duration,
    /// Milliseconds since `epoch` until which Redis counts as down (0: up).
    down_until_ms: AtomicU64,
    epoch: Instant,
    ops: [OpMetrics; 7],
}

impl Link {
    /// Connects once, so a Redis that cannot be reached fails the start, not the first call.
    pub async fn open(config: &StoreConfig, metrics: &Metrics) -> Result<Self, StoreError> {
        let urls = config.urls.join(", ");
        let unreachable = |message: String| StoreError::new(StoreErrorKind::Unreachable, message);
        let connector =
            Connector::new(config).map_err(|e| unreachable(format!("store.url: {e}")))?;
        match tokio::time::timeout(ADMIN_TIMEOUT, connector.connect(Op::Key)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(unreachable(format!("Redis at {urls}: {e}"))),
            Err(_) => return Err(unreachable(format!("Redis at {urls} did not answer"))),
        }
        static LINKS: AtomicUsize = AtomicUsize::new(0);
        Ok(Self {
            id: LINKS.fetch_add(1, Ordering::Relaxed),
            generation: AtomicU64::new(0),
            connector,
            timeout: config.timeout,
            down_until_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            ops: Op::ALL.map(|op| OpMetrics {
                duration: metrics.store_duration.with_label_values(&[op.label()]),
                errors: metrics.store_errors.with_label_values(&[op.label()]),
            }),
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub fn is_down(&self) -> bool {
        self.now_ms() < self.down_until_ms.load(Ordering::Relaxed)
    }

    fn mark_down(&self, error: &StoreError) {
        let until = self.now_ms() + DOWN_FOR_MS;
        if self.down_until_ms.swap(until, Ordering::Relaxed) == 0 {
            tracing::warn!(%error, "Redis is unreachable");
        }
    }

    /// Redis answered a probe: calls go to it again, on fresh connections.
    pub fn mark_up(&self) {
        if self.down_until_ms.swap(0, Ordering::Relaxed) != 0 {
            self.renew_connections();
            tracing::info!("Redis is reachable again");
        }
    }

    /// Every thread opens a new connection on its next call.
    pub fn renew_connections(&self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    /// Runs one Redis call under the deadline, timing it and counting its failure. While
    /// Redis counts as down, fails at once. An operation safe to send twice ([`Op::resend_safe`])
    /// whose answer was lost is sent once more before the failure counts: one slow reply or
    /// one dropped connection does not fail a call.
    async fn run<T, F>(
        &self,
        op: Op,
        deadline: Duration,
        call: impl Fn() -> F,
    ) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, Failure>>,
    {
        self.run_timed(op, Some(&self.ops[op as usize]), deadline, call)
            .await
    }

    /// [`Link::run`], timed and counted in `metrics` when given.
    async fn run_timed<T, F>(
        &self,
        op: Op,
        metrics: Option<&OpMetrics>,
        deadline: Duration,
        call: impl Fn() -> F,
    ) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, Failure>>,
    {
        if self.is_down() {
            if let Some(metrics) = metrics {
                metrics.errors.inc();
            }
            return Err(StoreError::new(StoreErrorKind::Unreachable, KnownDown));
        }
        let attempts = if op.resend_safe() { 2 } else { 1 };
        let mut attempt = 1;
        let error = loop {
            let started = Instant::now();
            let result = tokio::time::timeout(deadline, call()).await;
            if let Some(metrics) = metrics {
                metrics.duration.observe(started.elapsed().as_secs_f64());
            }
            let error = match result {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(Failure::Connect(error))) => {
                    StoreError::new(StoreErrorKind::Unreachable, error)
                }
                Ok(Err(Failure::Call(error))) => StoreError::new(classify(&error), error),
                Err(_) => StoreError::new(StoreErrorKind::Unanswered, NoAnswer(deadline)),
            };
            if error.kind != StoreErrorKind::Unanswered || attempt == attempts {
                // A resend that failed another way does not undo that the first send may
                // have been applied.
                break match error.kind {
                    StoreErrorKind::Transient | StoreErrorKind::Unreachable if attempt > 1 => {
                        StoreError::new(StoreErrorKind::Unanswered, error)
                    }
                    _ => error,
                };
            }
            attempt += 1;
        };
        if let Some(metrics) = metrics {
            metrics.errors.inc();
        }
        // Redis answering with an error is up; only silence counts it as down.
        if matches!(
            error.kind,
            StoreErrorKind::Unanswered | StoreErrorKind::Unreachable
        ) {
            self.mark_down(&error);
        }
        Err(error)
    }

    pub async fn invoke_within<T: FromRedisValue>(
        &self,
        op: Op,
        deadline: Duration,
        script: &Script,
        invocation: &Invocation,
    ) -> Result<T, StoreError> {
        let call = &with_invocation(script.prepare_invoke(), invocation);
        self.run(op, deadline, || async move {
            let mut conn = self.conn(op).await.map_err(Failure::Connect)?;
            call.invoke_async(&mut conn).await.map_err(Failure::Call)
        })
        .await
    }

    /// Runs a group commit (batch.lua) with the hot path's deadline, sent again like the
    /// admissions and settlements it carries if its answer is lost. It is not timed here:
    /// each call in it is, by [`Link::observe`], from when it began to wait.
    pub async fn invoke_batch(
        &self,
        call: &redis::ScriptInvocation<'_>,
    ) -> Result<Value, StoreError> {
        self.run_timed(Op::Settle, None, self.timeout, || async move {
            let mut conn = self.conn(Op::Settle).await.map_err(Failure::Connect)?;
            call.invoke_async(&mut conn).await.map_err(Failure::Call)
        })
        .await
    }

    /// Times one call of a group commit, and counts it if it failed.
    pub fn observe(&self, op: Op, waited: Duration, failed: bool) {
        let metrics = &self.ops[op as usize];
        metrics.duration.observe(waited.as_secs_f64());
        if failed {
            metrics.errors.inc();
        }
    }

    /// One command under `deadline`.
    pub async fn query<T: FromRedisValue>(
        &self,
        op: Op,
        deadline: Duration,
        cmd: &Cmd,
    ) -> Result<T, StoreError> {
        self.run(op, deadline, || async move {
            let mut conn = self.conn(op).await.map_err(Failure::Connect)?;
            cmd.query_async(&mut conn).await.map_err(Failure::Call)
        })
        .await
    }

    /// One command with the admin deadline.
    pub async fn admin<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, StoreError> {
        self.query(Op::Admin, ADMIN_TIMEOUT, cmd).await
    }

    /// One command with the admin deadline, never sent twice.
    pub async fn admin_once<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, StoreError> {
        self.query(Op::AdminOnce, ADMIN_TIMEOUT, cmd).await
    }

    /// Whether Redis answers `PING`, asked even while calls fail fast.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let ping = async {
            let mut conn = self.conn(Op::Admin).await?;
            redis::cmd("PING").query_async::<Value>(&mut conn).await
        };
        match tokio::time::timeout(ADMIN_TIMEOUT, ping).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(StoreError::new(StoreErrorKind::Unanswered, error)),
            Err(_) => Err(StoreError::new(
                StoreErrorKind::Unanswered,
                NoAnswer(ADMIN_TIMEOUT),
            )),
        }
    }

    /// This thread's connection, made on first use. Each runtime thread has its own, so a
    /// call's Redis I/O runs on the thread that awaits it: no cross-thread wake-ups.
    /// A connection from before Redis was last unreachable is replaced, so no thread keeps
    /// one that broke while it sat idle. The operator's calls have their own on a Cluster.
    async fn conn(&self, op: Op) -> RedisResult<Conn> {
        thread_local! {
            static CONNECTIONS: std::cell::RefCell<HashMap<(usize, bool), (u64, Conn)>> =
                std::cell::RefCell::new(HashMap::new());
        }
        let which = (self.id, op.is_admin());
        let generation = self.generation.load(Ordering::Relaxed);
        let cached = CONNECTIONS.with(|c| c.borrow().get(&which).cloned());
        if let Some((made_in, conn)) = cached {
            if made_in == generation {
                return Ok(conn);
            }
        }
        let conn = self.connector.connect(op).await?;
        CONNECTIONS.with(|c| c.borrow_mut().insert(which, (generation, conn.clone())));
        Ok(conn)
    }
}

/// The error codes of a Redis that cannot do something now but may soon: out of memory
/// under `noeviction`, a replica after a failover, a cluster slot moving or down, a server
/// loading its data, busy with a script, short of replicas, or failing to persist. Redis
/// refuses these before a script starts, so nothing was applied.
const TRANSIENT_CODES: [&str; 9] = [
    "OOM",
    "READONLY",
    "CLUSTERDOWN",
    "TRYAGAIN",
    "MASTERDOWN",
    "LOADING",
    "BUSY",
    "NOREPLICAS",
    "MISCONF",
];

/// Error replies about the operation itself, which no retry can cure: a key of the wrong
/// type, keys in different Cluster slots, a field the scripts find damaged (not an integer). A script that failed at run time is final too
/// (its error names the script, whatever the code).
const FINAL_CODES: [&str; 3] = ["WRONGTYPE", "CROSSSLOT", "DAMAGED"];

/// What a failed Redis call says about the store: an error reply is transient or final by
/// its code; a reply of the wrong shape is final; a refused connection sent nothing; any
/// other failure (I/O, a dropped connection) may have come after Redis applied the call.
fn with_invocation<'a>(
    mut call: redis::ScriptInvocation<'a>,
    invocation: &Invocation,
) -> redis::ScriptInvocation<'a> {
    for key in &invocation.keys {
        call.key(key);
    }
    for arg in &invocation.args {
        call.arg(arg);
    }
    call
}

fn classify(error: &redis::RedisError) -> StoreErrorKind {
    if error.is_connection_refusal() {
        return StoreErrorKind::Unreachable;
    }
    if let Some(code) = error.code() {
        return reply_kind(code, error.detail().unwrap_or(""));
    }
    match error.kind() {
        redis::ErrorKind::UnexpectedReturnType => StoreErrorKind::Refused,
        redis::ErrorKind::ClusterConnectionNotFound => StoreErrorKind::Transient,
        _ => StoreErrorKind::Unanswered,
    }
}

/// An error reply's kind by its code (the reply's first word) and the rest of its text.
/// Anything not known to be final counts as transient (`ERR max number of clients`,
/// `NOAUTH`, an ACL refusal an operator can fix): a held settlement waits rather than
/// being dropped.
pub(super) fn reply_kind(code: &str, detail: &str) -> StoreErrorKind {
    if TRANSIENT_CODES.contains(&code) {
        StoreErrorKind::Transient
    } else if FINAL_CODES.contains(&code) || detail.contains("script") {
        StoreErrorKind::Refused
    } else {
        StoreErrorKind::Transient
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every operation's series is exported at zero from the start, on either store.
    #[test]
    fn every_operation_is_in_the_metrics_fixed_set() {
        for op in Op::ALL {
            assert!(
                crate::metrics::STORE_OPS.contains(&op.label()),
                "{}",
                op.label()
            );
        }
        assert_eq!(Op::ALL.len(), crate::metrics::STORE_OPS.len());
    }

    #[test]
    fn error_replies_are_transient_or_final_by_their_code() {
        for code in TRANSIENT_CODES {
            let detail = "command not allowed when used memory > 'maxmemory'. script: 9f3c";
            assert_eq!(
                reply_kind(code, detail),
                StoreErrorKind::Transient,
                "{code}"
            );
        }
        for code in FINAL_CODES {
            assert_eq!(reply_kind(code, ""), StoreErrorKind::Refused, "{code}");
        }
        let script_failed = "user_script:12: attempt to index a number value script: 9f3c";
        assert_eq!(reply_kind("ERR", script_failed), StoreErrorKind::Refused);
        for (code, detail) in [
            ("ERR", "max number of clients reached"),
            ("NOAUTH", "Authentication required."),
            (
                "NOPERM",
                "this user has no permissions to run the 'evalsha' command",
            ),
        ] {
            assert_eq!(
                reply_kind(code, detail),
                StoreErrorKind::Transient,
                "{code}"
            );
        }
    }

    #[test]
    fn failures_without_a_reply_may_have_been_applied() {
        let io = redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(classify(&io), StoreErrorKind::Unanswered);
        let refused =
            redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(classify(&refused), StoreErrorKind::Unreachable);
    }
}
