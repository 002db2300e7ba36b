//! Keys on the Redis store. The config file's keys are this instance's own copy, looked up
//! first and never written to Redis; keys made through the admin API live in Redis, looked
//! up through the instance's last-known key table. Revocations (of either kind) live in
//! Redis, and every change is announced on pub/sub so each instance applies it (a
//! revocation arrives with the key it revokes); a counter of revocations, read each second,
//! catches one whose announcement was missed.

use futures_util::StreamExt;
use redis::{RedisResult, Value};
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use turnpike_core::ids::random_id;
use turnpike_core::keys::{AgentScope, KeyHash, KeyRecord};

use super::cache::{KnownKeys, Lookup};
use super::link::{Op, ADMIN_TIMEOUT};
use super::names::{
    account_hash, key_index, key_record, ACCOUNTS, CONFIG_KEYS, KEY_EVENTS, REVOCATIONS,
    REVOKED_KEYS, SEEDED,
};
use super::protocol::Invocation;
use super::split::Plan;
use super::RedisStore;
use crate::config::{AccountSeed, ConfigKeys};
use crate::store::StoreError;

/// Accounts given their starting balance at once, as a start or a reload puts them in force.
const ACCOUNTS_AT_ONCE: usize = 32;
/// Accounts asked about in one `SMISMEMBER` at start.
const LISTED_AT_ONCE: usize = 4096;

impl RedisStore {
    /// A key by hash: a config key from this instance's copy (revoked if this instance knows
    /// so); else from the table while fresh, else from Redis. Under `fail_open`, a lookup
    /// Redis cannot answer now falls back to the key as last known; a revocation this
    /// instance learned holds either way.
    pub(super) async fn lookup_key(
        &self,
        hash: &KeyHash,
    ) -> Result<Option<Arc<KeyRecord>>, StoreError> {
        if let Some(record) = self.config_keys.load().get(hash) {
            return Ok(Some(self.keys.as_known(hash, Arc::clone(record))));
        }
        let last_known = match self.keys.get(hash) {
            Lookup::Fresh(record) => return Ok(record),
            Lookup::LastKnown(record) => Some(record),
            Lookup::Unknown => None,
        };
        let epoch = self.keys.epoch();
        match self.fetch_key(hash).await {
            Ok(record) => Ok(self.keys.put(*hash, record, epoch)),
            Err(error) if self.fail_open.enabled && error.kind.is_transient() => match last_known {
                Some(record) => Ok(Some(self.keys.as_known(hash, record))),
                None => Err(error),
            },
            Err(error) => Err(error),
        }
    }

    async fn fetch_key(&self, hash: &KeyHash) -> Result<Option<Arc<KeyRecord>>, StoreError> {
        let fields: HashMap<String, String> = self
            .link
            .query(
                Op::Key,
                self.link.timeout,
                redis::cmd("HGETALL").arg(key_record(hash)),
            )
            .await?;
        Ok(self.made_here(parse_record(&fields)).map(Arc::new))
    }

    /// A record from Redis, unless an older build wrote it for a config key.
    fn made_here(&self, record: Option<KeyRecord>) -> Option<KeyRecord> {
        record.filter(|r| !self.legacy_config_ids.load().contains(&r.id))
    }

    pub(super) async fn key_by_public_id(
        &self,
        id: &str,
    ) -> Result<Option<Arc<KeyRecord>>, StoreError> {
        if let Some((hash, record)) = self.config_keys.load().by_id(id) {
            return Ok(Some(self.keys.as_known(&hash, Arc::clone(record))));
        }
        let Some(hash) = self.hash_of(id).await? else {
            return Ok(None);
        };
        let fields: HashMap<String, String> = self
            .link
            .admin(redis::cmd("HGETALL").arg(key_record(&hash)))
            .await?;
        Ok(self
            .made_here(parse_record(&fields))
            .map(|record| self.keys.as_known(&hash, Arc::new(record))))
    }

    pub(super) async fn create_record(
        &self,
        hash: KeyHash,
        record: KeyRecord,
    ) -> Result<bool, StoreError> {
        if self.config_keys.load().claims(&hash, &record.id) {
            return Ok(false);
        }
        let claimed: Option<String> = self
            .link
            .admin_once(
                redis::cmd("SET")
                    .arg(key_index(&record.id))
                    .arg(hash.to_hex())
                    .arg("NX"),
            )
            .await?;
        if claimed.is_none() {
            return Ok(false);
        }
        let taken: i64 = self
            .link
            .admin(redis::cmd("EXISTS").arg(key_record(&hash)))
            .await?;
        if taken == 1 {
            self.link
                .admin::<Value>(redis::cmd("DEL").arg(key_index(&record.id)))
                .await?;
            return Ok(false);
        }
        self.write_record(&hash, &record).await?;
        self.announce(KeyEvent::Changed(hash)).await;
        Ok(true)
    }

    pub(super) async fn revoke_record(&self, id: &str) -> Result<bool, StoreError> {
        let config = self.config_keys.load().by_id(id).map(|(hash, _)| hash);
        // An admin-made key whose id a later config file took is revoked with it: the
        // config key hides it from every lookup by id, so this is its only way out.
        let made = self
            .hash_of(id)
            .await?
            .filter(|hash| Some(*hash) != config && !self.legacy_config_ids.load().contains(id));
        if let Some(hash) = made {
            self.link
                .admin::<Value>(
                    redis::cmd("HSET")
                        .arg(key_record(&hash))
                        .arg("revoked")
                        .arg("1"),
                )
                .await?;
        }
        let hashes: Vec<KeyHash> = config.into_iter().chain(made).collect();
        if hashes.is_empty() {
            return Ok(false);
        }
        // Every revocation is kept apart, and counted: an instance that missed the
        // announcement reads the set again when the count moves, and a revocation outlives
        // a Redis that lost it (instances write back what they learned).
        let mut kept = redis::cmd("SADD");
        kept.arg(REVOKED_KEYS);
        for hash in &hashes {
            kept.arg(hash.to_hex());
        }
        self.link.admin::<Value>(&kept).await?;
        self.link
            .admin::<Value>(redis::cmd("INCR").arg(REVOCATIONS))
            .await?;
        for hash in hashes {
            self.announce(KeyEvent::Revoked(hash)).await;
        }
        Ok(true)
    }

    /// Puts a config's keys and accounts in force. The keys go in this instance's copy; the
    /// first time, the revocations Redis keeps are read, and the keys an older build seeded
    /// into Redis are removed. Accounts new since the last config put in force here get
    /// their starting balance where Redis has none (a few at a time); then the seed marker,
    /// whose absence later means Redis lost its state.
    pub(super) async fn apply_config_on_redis(
        &self,
        keys: &Arc<ConfigKeys>,
        accounts: &[AccountSeed],
    ) -> Result<(), StoreError> {
        // One at a time: a reload and a re-seed after lost state must not interleave.
        let _one_at_a_time = self.seeding.lock().await;
        let before = self.seeding.last();
        if before.is_none() {
            self.read_revocations().await?;
            self.learn_legacy_config_keys().await?;
        }
        let new: Vec<&AccountSeed> = match &before {
            Some(before) => accounts.iter().filter(|a| !before.has(&a.id)).collect(),
            None => self.not_yet_listed(accounts).await?,
        };
        self.give_starting_balances(&new).await?;
        self.config_keys.store(Arc::clone(keys));
        if before.is_none() {
            self.mark_seeded().await?;
        }
        self.seeding.remember(accounts);
        Ok(())
    }

    /// After Redis lost its state: every account's starting balance where it has none (less
    /// what held settlements charged meanwhile), the revocations this instance learned, and
    /// the seed marker.
    pub(super) async fn seed_again(&self, accounts: &[AccountSeed]) -> Result<(), StoreError> {
        let _one_at_a_time = self.seeding.lock().await;
        let all: Vec<&AccountSeed> = accounts.iter().collect();
        self.give_starting_balances(&all).await?;
        let revoked = self.keys.revoked();
        if !revoked.is_empty() {
            let mut cmd = redis::cmd("SADD");
            cmd.arg(REVOKED_KEYS);
            for hash in &revoked {
                cmd.arg(hash.to_hex());
            }
            self.link.admin::<Value>(&cmd).await?;
            self.link
                .admin::<Value>(redis::cmd("INCR").arg(REVOCATIONS))
                .await?;
        }
        self.mark_seeded().await
    }

    /// Sets the seed marker to a value of this instance's own unless another instance set
    /// one first, and remembers the value in force: the watcher seeds again when it changes.
    async fn mark_seeded(&self) -> Result<(), StoreError> {
        self.link
            .admin::<Value>(
                redis::cmd("SET")
                    .arg(SEEDED)
                    .arg(random_id("seed_", 16))
                    .arg("NX"),
            )
            .await?;
        let marker: Option<String> = self.link.admin(redis::cmd("GET").arg(SEEDED)).await?;
        self.seeding.saw_marker(marker);
        Ok(())
    }

    /// The accounts a store that has been seeded does not list yet; every account when it
    /// has not been (empty, or its state lost). A restart then costs a command per
    /// `LISTED_AT_ONCE` accounts, not a script per account.
    async fn not_yet_listed<'a>(
        &self,
        accounts: &'a [AccountSeed],
    ) -> Result<Vec<&'a AccountSeed>, StoreError> {
        // On a Cluster the list and the marker live on one shard, and a shard that lost
        // the accounts' balances would go unnoticed: there every account is seeded.
        let seeded: i64 = self.link.admin(redis::cmd("EXISTS").arg(SEEDED)).await?;
        if seeded == 0 || matches!(self.plan, Plan::Cluster) {
            return Ok(accounts.iter().collect());
        }
        let mut new = Vec::new();
        for some in accounts.chunks(LISTED_AT_ONCE) {
            let mut cmd = redis::cmd("SMISMEMBER");
            cmd.arg(ACCOUNTS);
            for account in some {
                cmd.arg(&account.id);
            }
            let listed: Vec<bool> = self.link.admin(&cmd).await?;
            new.extend(
                some.iter()
                    .zip(listed)
                    .filter(|(_, listed)| !listed)
                    .map(|(account, _)| account),
            );
        }
        Ok(new)
    }

    /// Gives each account its starting balance where Redis has none (seed_account.lua), a
    /// few at a time, and lists them for usage queries over every account.
    async fn give_starting_balances(&self, accounts: &[&AccountSeed]) -> Result<(), StoreError> {
        if accounts.is_empty() {
            return Ok(());
        }
        let invocations: Vec<Invocation> = accounts
            .iter()
            .map(|account| Invocation {
                keys: vec![account_hash(&account.id)],
                args: vec![account.balance.to_string()],
            })
            .collect();
        let seeded: Vec<Result<Value, StoreError>> = futures_util::stream::iter(invocations)
            .map(|invocation| self.seed_account(invocation))
            .buffer_unordered(ACCOUNTS_AT_ONCE)
            .collect()
            .await;
        seeded.into_iter().collect::<Result<Vec<_>, _>>()?;
        let mut listed = redis::cmd("SADD");
        listed.arg(ACCOUNTS);
        for account in accounts {
            listed.arg(&account.id);
        }
        self.link.admin::<Value>(&listed).await?;
        Ok(())
    }

    async fn seed_account(&self, invocation: Invocation) -> Result<Value, StoreError> {
        self.link
            .invoke_within(
                Op::Admin,
                ADMIN_TIMEOUT,
                &self.seed_account_script,
                &invocation,
            )
            .await
    }

    /// Learns every revocation Redis keeps (of config keys too); returns the revocation
    /// count they go with.
    pub(super) async fn read_revocations(&self) -> Result<u64, StoreError> {
        let count: Option<u64> = self.link.admin(redis::cmd("GET").arg(REVOCATIONS)).await?;
        let revoked: Vec<String> = self
            .link
            .admin(redis::cmd("SMEMBERS").arg(REVOKED_KEYS))
            .await?;
        for hash in revoked.iter().filter_map(|hex| KeyHash::from_hex(hex)) {
            self.keys.revoke(&hash);
        }
        let count = count.unwrap_or(0);
        self.seeding.saw_revocations(count);
        Ok(count)
    }

    /// Learns which config keys an older build wrote into Redis (listed in [`CONFIG_KEYS`]).
    /// Their records stay, so instances of that build still serve them during a rolling
    /// upgrade, but are never taken for admin-made keys here: a key taken out of the file
    /// does not live on through them.
    async fn learn_legacy_config_keys(&self) -> Result<(), StoreError> {
        let ids: Vec<String> = self
            .link
            .admin(redis::cmd("SMEMBERS").arg(CONFIG_KEYS))
            .await?;
        if !ids.is_empty() {
            tracing::info!(
                keys = ids.len(),
                "config keys an older build wrote into Redis are ignored: they are read from the file now"
            );
        }
        self.legacy_config_ids
            .store(Arc::new(ids.into_iter().collect()));
        Ok(())
    }

    /// Tells every instance (this one included) that keys changed.
    async fn announce(&self, event: KeyEvent) {
        event.apply(&self.keys);
        let _ = self
            .link
            .admin::<Value>(redis::cmd("PUBLISH").arg(KEY_EVENTS).arg(event.encode()))
            .await;
    }

    async fn write_record(&self, hash: &KeyHash, record: &KeyRecord) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("HSET");
        cmd.arg(key_record(hash));
        for (field, value) in record_fields(record) {
            cmd.arg(field).arg(value);
        }
        self.link.admin::<Value>(&cmd).await?;
        self.link
            .admin::<Value>(redis::cmd("SADD").arg(ACCOUNTS).arg(&record.account))
            .await?;
        Ok(())
    }

    /// The hash of the key with this public id, from the id index.
    async fn hash_of(&self, id: &str) -> Result<Option<KeyHash>, StoreError> {
        let hex: Option<String> = self
            .link
            .admin(redis::cmd("GET").arg(key_index(id)))
            .await?;
        Ok(hex.as_deref().and_then(KeyHash::from_hex))
    }
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

/// A change to keys, as announced on [`KEY_EVENTS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyEvent {
    /// The key was created or replaced: re-read it.
    Changed(KeyHash),
    /// The key was revoked: refuse it from now on.
    Revoked(KeyHash),
    /// Any key may have changed (a seed).
    AllChanged,
}

impl KeyEvent {
    /// `<hex>`, `revoked:<hex>`, or `*`.
    fn encode(self) -> String {
        match self {
            KeyEvent::Changed(hash) => hash.to_hex(),
            KeyEvent::Revoked(hash) => format!("revoked:{}", hash.to_hex()),
            KeyEvent::AllChanged => "*".to_owned(),
        }
    }

    /// Anything unreadable counts as every key changed.
    fn decode(message: &str) -> Self {
        let revoked = message.strip_prefix("revoked:").and_then(KeyHash::from_hex);
        match (revoked, KeyHash::from_hex(message)) {
            (Some(hash), _) => KeyEvent::Revoked(hash),
            (None, Some(hash)) => KeyEvent::Changed(hash),
            (None, None) => KeyEvent::AllChanged,
        }
    }

    fn apply(self, keys: &KnownKeys) {
        match self {
            KeyEvent::Changed(hash) => keys.changed(&hash),
            KeyEvent::Revoked(hash) => keys.revoke(&hash),
            KeyEvent::AllChanged => keys.all_changed(),
        }
    }
}

/// Listens on the key-change channel and applies each change to the key table. While the
/// subscription is down the table's time limit bounds staleness; on every (re)subscription
/// and every drop, every entry is re-read before it is trusted again (messages may have
/// been missed), but none is forgotten: an outage is when the table is needed.
pub(super) async fn listen_for_key_changes(store: Weak<RedisStore>, urls: Vec<String>) {
    for url in urls.iter().cycle() {
        let subscription = async {
            let client = redis::Client::open(url.as_str())?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(KEY_EVENTS).await?;
            RedisResult::Ok(pubsub)
        };
        if let Ok(Ok(pubsub)) = tokio::time::timeout(ADMIN_TIMEOUT, subscription).await {
            let mut messages = pubsub.into_on_message();
            let Some(live) = store.upgrade() else { return };
            live.keys.all_changed();
            drop(live);
            while let Some(message) = messages.next().await {
                let Some(live) = store.upgrade() else { return };
                let payload = message.get_payload::<String>().unwrap_or_default();
                KeyEvent::decode(&payload).apply(&live.keys);
            }
        }
        let Some(live) = store.upgrade() else { return };
        live.keys.all_changed();
        // The subscription broke: so may every idle connection to the same server.
        live.link.renew_connections();
        drop(live);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
