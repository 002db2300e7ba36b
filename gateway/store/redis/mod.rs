//! The Redis store: one shared state for many gateway instances, on a single Redis server or
//! a Redis Cluster. Admission and settlement are one Lua function each (`admit.lua`,
//! `settle.lua`), which mirror the pure core's admission and read the time from Redis; the
//! calls waiting at the same moment run together in one `batch.lua` script call.
//!
//! - `link`: connections, deadlines, failing fast while Redis is down.
//! - `protocol`: the scripts' arguments and replies, by name.
//! - `names` and `split`: where state lives, and a call split into per-slot sides.
//! - `admit`, `settle` (with `queue` and its `journal`), `fail_open`: the hot path and its
//!   outage behaviour; `batch`: the group commit both go through; `extend`: a running
//!   stream's hold and leases.
//! - `records` (with `cache`, the last-known key table), `accounts`, and `seeding` (which
//!   finds a Redis that lost its state and seeds it again): keys, balances and usage.

mod accounts;
mod admit;
mod batch;
mod cache;
mod escrows;
mod extend;
mod fail_open;
mod journal;
mod ledger;
mod link;
mod names;
mod protocol;
mod queue;
mod records;
mod seats;
mod seeding;
mod settle;
mod slicing;
mod split;

use async_trait::async_trait;
use redis::Script;
use std::sync::Arc;

use turnpike_core::admission::{Admission, Admitted, Extended, Extension, Refusal, Settlement};
use turnpike_core::billing::AccountState;
use turnpike_core::keys::{KeyHash, KeyRecord};
use turnpike_core::limits::Quota;

use self::admit::QuotaMemo;
use self::batch::GroupCommit;
use self::cache::KnownKeys;
use self::fail_open::FailOpen;
use self::link::{Link, ADMIN_TIMEOUT};
use self::queue::SettlementQueue;
use self::seeding::Seeding;
use self::slicing::Slicer;
use self::split::Plan;
use super::{
    AdminStore, BalanceChange, BalanceOutcome, CallStore, StoreError, StoreErrorKind, UsageFilter,
    UsageTotals,
};
use crate::config::{AccountSeed, ConfigKeys, FailMode, StoreConfig};
use crate::metrics::Metrics;

pub struct RedisStore {
    link: Arc<Link>,
    /// Admissions and settlements go to Redis through it, together.
    batches: Arc<GroupCommit>,
    /// This instance's slices of the shared buckets, and their syncs.
    slicer: Arc<Slicer>,
    plan: Plan,
    stream_maxlen: u64,
    balance_script: Script,
    extend_script: Script,
    seed_account_script: Script,
    /// The config file's keys: this instance's copy, looked up first.
    config_keys: arc_swap::ArcSwap<ConfigKeys>,
    /// Ids of the config keys an older build wrote into Redis (`turnpike:config_keys`):
    /// their records are left for instances of that build still running, and ignored here.
    legacy_config_ids: arc_swap::ArcSwap<std::collections::HashSet<String>>,
    /// Keys made through the admin API as last read, and every revocation learned.
    keys: KnownKeys,
    /// The `RateLimit-*` numbers each key's last admission here returned.
    quotas: QuotaMemo,
    seeding: Arc<Seeding>,
    fail_open: FailOpen,
    queue: Arc<SettlementQueue>,
    /// Calls settled here unmarked (`settle::record_or_hold`), so that a second settlement
    /// of one changes nothing.
    recorded: settle::Recorded,
    /// Held by whoever is writing the queue's settlements.
    flushing: tokio::sync::Mutex<()>,
    /// Calls a stream's extension may have held more for in Redis.
    extended_calls: extend::ExtendedCalls,
}

impl RedisStore {
    /// Connects (a list of URLs: a Cluster), warns about an evicting `maxmemory-policy`,
    /// and starts the key-change listener and the settlement flusher on `runtime`, which
    /// must outlive the store.
    pub async fn connect(
        config: &StoreConfig,
        metrics: &Metrics,
        runtime: tokio::runtime::Handle,
    ) -> Result<Arc<Self>, StoreError> {
        let link = Arc::new(Link::open(config, metrics).await?);
        let batches = GroupCommit::new(
            Arc::clone(&link),
            config.cluster,
            metrics.store_batch_calls.clone(),
        );
        let queue = SettlementQueue::open(
            config.settlement_queue,
            config.journal_dir.as_deref(),
            metrics.settlements_queued.clone(),
            metrics.settlements_dropped.clone(),
        )
        .map_err(|e| StoreError::new(StoreErrorKind::Refused, format!("store.journal_dir: {e}")))?;
        if config.journal_dir.is_none() {
            tracing::warn!("store.journal_dir is not set: settlements held while Redis is unreachable are lost if the gateway stops before it is back");
        }
        let slicer = Slicer::new(Arc::clone(&link));
        let store = Arc::new(Self {
            link,
            batches,
            slicer,
            plan: if config.cluster {
                Plan::Cluster
            } else {
                Plan::Single
            },
            stream_maxlen: config.usage_stream_maxlen,
            balance_script: Script::new(protocol::CHANGE_BALANCE_LUA),
            extend_script: Script::new(protocol::EXTEND_LUA),
            seed_account_script: Script::new(protocol::SEED_ACCOUNT_LUA),
            config_keys: Default::default(),
            legacy_config_ids: Default::default(),
            keys: KnownKeys::new(config.key_cache_ttl),
            quotas: QuotaMemo::default(),
            seeding: Arc::new(Seeding::new(metrics.store_state_lost.clone())),
            fail_open: FailOpen::new(
                config.on_unavailable == FailMode::FailOpen,
                metrics.fail_open_admissions.clone(),
            ),
            queue: Arc::new(queue),
            recorded: Default::default(),
            flushing: tokio::sync::Mutex::new(()),
            extended_calls: Default::default(),
        });
        for url in &config.urls {
            check_server(url).await?;
        }
        runtime.spawn(records::listen_for_key_changes(
            Arc::downgrade(&store),
            config.urls.clone(),
        ));
        runtime.spawn(settle::flush_held_settlements(Arc::downgrade(&store)));
        runtime.spawn(slicing::give_back_idle_slices(Arc::downgrade(
            &store.slicer,
        )));
        runtime.spawn(seeding::watch_for_lost_state(
            Arc::downgrade(&store),
            Arc::clone(&store.seeding),
        ));
        Ok(store)
    }
}

#[async_trait]
impl CallStore for RedisStore {
    async fn key(&self, hash: &KeyHash) -> Result<Option<Arc<KeyRecord>>, StoreError> {
        self.lookup_key(hash).await
    }

    async fn admit(&self, call: &Admission<'_>) -> Result<Result<Admitted, Refusal>, StoreError> {
        self.admit_on_redis(call).await
    }

    fn quota(&self, call: &Admission<'_>) -> Option<Quota> {
        self.known_quota(call)
    }

    async fn extend(&self, call: &Extension<'_>) -> Result<Extended, StoreError> {
        self.extend_on_redis(call).await
    }

    async fn settle(&self, call: &Settlement<'_>) {
        self.settle_on_redis(call).await
    }

    async fn write_owed(&self, within: std::time::Duration) -> usize {
        self.write_held_before_exit(within).await
    }
}

#[async_trait]
impl AdminStore for RedisStore {
    async fn key_by_id(&self, id: &str) -> Result<Option<Arc<KeyRecord>>, StoreError> {
        self.key_by_public_id(id).await
    }

    async fn create_key(&self, hash: KeyHash, record: KeyRecord) -> Result<bool, StoreError> {
        self.create_record(hash, record).await
    }

    async fn revoke_key(&self, id: &str) -> Result<bool, StoreError> {
        self.revoke_record(id).await
    }

    async fn apply_config(
        &self,
        keys: &Arc<ConfigKeys>,
        accounts: &[AccountSeed],
    ) -> Result<(), StoreError> {
        self.apply_config_on_redis(keys, accounts).await
    }

    async fn balance(&self, account: &str) -> Result<Option<AccountState>, StoreError> {
        self.read_balance(account).await
    }

    async fn change_balance(
        &self,
        account: &str,
        change: BalanceChange,
    ) -> Result<BalanceOutcome, StoreError> {
        self.apply_balance_change(account, change).await
    }

    async fn usage(&self, filter: &UsageFilter) -> Result<UsageTotals, StoreError> {
        self.sum_usage(filter).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.link.ping().await
    }

    fn notes(&self) -> Vec<String> {
        self.seeding.note().into_iter().collect()
    }
}

/// The oldest Redis the scripts run on: they start with a shebang (`#!lua`), so that Redis
/// judges `maxmemory` once before a run rather than at its first write.
const OLDEST_REDIS: (u32, u32) = (7, 0);

/// Refuses a Redis too old for the scripts, and warns when Redis may evict keys (eviction
/// silently resets limits and balances). A server that does not answer now is not judged:
/// the store's own checks find it when it is back.
async fn check_server(url: &str) -> Result<(), StoreError> {
    let Ok(client) = redis::Client::open(url) else {
        return Ok(());
    };
    let asking = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut conn)
            .await?;
        let policy: Vec<String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("maxmemory-policy")
            .query_async(&mut conn)
            .await?;
        Ok::<_, redis::RedisError>((info, policy))
    };
    let Ok(Ok((info, policy))) = tokio::time::timeout(ADMIN_TIMEOUT, asking).await else {
        return Ok(());
    };
    if let Some(version) = server_version(&info).filter(|v| *v < OLDEST_REDIS) {
        return Err(StoreError::new(
            StoreErrorKind::Refused,
            format!(
                "{url} runs Redis {}.{}; Turnpike needs Redis {}.{} or newer",
                version.0, version.1, OLDEST_REDIS.0, OLDEST_REDIS.1
            ),
        ));
    }
    if let Some(policy) = policy.get(1).filter(|p| *p != "noeviction") {
        tracing::warn!(
            %url,
            maxmemory_policy = %policy,
            "Redis may evict keys, which silently resets rate limits and balances; set maxmemory-policy noeviction"
        );
    }
    Ok(())
}

/// `(major, minor)` of `redis_version:` in an `INFO server` reply.
fn server_version(info: &str) -> Option<(u32, u32)> {
    let version = info
        .lines()
        .find_map(|line| line.strip_prefix("redis_version:"))?;
    let mut parts = version.trim().split('.').map(str::parse::<u32>);
    Some((parts.next()?.ok()?, parts.next()?.ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_version_is_read_from_info() {
        let info = "# Server\r\nredis_version:7.0.15\r\nredis_git_sha1:00000000\r\n";
        assert_eq!(server_version(info), Some((7, 0)));
        assert!(server_version("redis_version:6.2.14\r\n").unwrap() < OLDEST_REDIS);
        assert!(server_version("redis_version:10.0.0").unwrap() > OLDEST_REDIS);
        assert_eq!(server_version("redis_version:x\r\n"), None);
        assert_eq!(server_version(""), None);
    }
}
