//! Key records in Redis: looked up on the hot path through the instance's last-known key
//! table, created, revoked and seeded by the operator, and every change announced on pub/sub
//! so each instance re-reads its copy (a revocation arrives with the key it revokes).

use futures_util::StreamExt;
use redis::{RedisResult, Value};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use turnpike_core::keys::{AgentScope, KeyHash, KeyRecord};

use super::cache::{KnownKeys, Lookup};
use super::link::{Op, ADMIN_TIMEOUT};
use super::names::{
    account_hash, key_index, key_record, ACCOUNTS, CONFIG_KEYS, KEY_EVENTS, REVOKED_KEYS, SEEDED,
};
use super::protocol::Invocation;
use super::RedisStore;
use crate::config::AccountSeed;
use crate::store::StoreError;

impl RedisStore {
    /// A key by hash: from the table while fresh, else from Redis. Under `fail_open`, a
    /// lookup Redis cannot answer now falls back to the key as last known, then to the
    /// config file's record; a revocation this instance learned holds either way.
    pub(super) async fn lookup_key(
        &self,
        hash: &KeyHash,
    ) -> Result<Option<Arc<KeyRecord>>, StoreError> {
        let last_known = match self.keys.get(hash) {
            Lookup::Fresh(record) => return Ok(record),
            Lookup::LastKnown(record) => Some(record),
            Lookup::Unknown => None,
        };
        let epoch = self.keys.epoch();
        match self.fetch_key(hash).await {
            Ok(record) => {
                if record.is_none() && self.fail_open.config_key(hash).is_some() {
                    // Redis lost a key the config file seeds: it may have lost everything.
                    self.seeding.check_soon();
                }
                Ok(self.keys.put(*hash, record, epoch))
            }
            Err(error) if self.fail_open.enabled && error.kind.is_transient() => {
                match last_known.or_else(|| self.fail_open.config_key(hash)) {
                    Some(record) => Ok(Some(self.keys.as_known(hash, record))),
                    None => Err(error),
                }
            }
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
        Ok(parse_record(&fields).map(Arc::new))
    }

    pub(super) async fn key_by_public_id(
        &self,
        id: &str,
    ) -> Result<Option<Arc<KeyRecord>>, StoreError> {
        let Some(hash) = self.hash_of(id).await? else {
            return Ok(None);
        };
        let fields: HashMap<String, String> = self
            .link
            .admin(redis::cmd("HGETALL").arg(key_record(&hash)))
            .await?;
        Ok(parse_record(&fields).map(Arc::new))
    }

    pub(super) async fn create_record(
        &self,
        hash: KeyHash,
        record: KeyRecord,
    ) -> Result<bool, StoreError> {
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
        let Some(hash) = self.hash_of(id).await? else {
            return Ok(false);
        };
        self.link
            .admin::<Value>(
                redis::cmd("HSET")
                    .arg(key_record(&hash))
                    .arg("revoked")
                    .arg("1"),
            )
            .await?;
        // Kept apart too, so a re-seed after Redis lost its state revokes it again.
        self.link
            .admin::<Value>(redis::cmd("SADD").arg(REVOKED_KEYS).arg(hash.to_hex()))
            .await?;
        self.announce(KeyEvent::Revoked(hash)).await;
        Ok(true)
    }

    pub(super) async fn seed_records(
        &self,
        keys: &[(KeyHash, KeyRecord)],
        accounts: &[AccountSeed],
    ) -> Result<(), StoreError> {
        // One seed at a time: a reload and a re-seed after lost state must not interleave.
        let _one_at_a_time = self.seeding.lock().await;
        let listed: HashSet<&str> = keys.iter().map(|(_, r)| r.id.as_str()).collect();
        let seeded: Vec<String> = self
            .link
            .admin(redis::cmd("SMEMBERS").arg(CONFIG_KEYS))
            .await?;
        let mut revoked: HashSet<String> = self
            .link
            .admin(redis::cmd("SMEMBERS").arg(REVOKED_KEYS))
            .await?;
        // A revocation this instance learned outlives a Redis that lost it.
        for (hash, _) in keys {
            if self.keys.is_revoked(hash) && revoked.insert(hash.to_hex()) {
                self.link
                    .admin::<Value>(redis::cmd("SADD").arg(REVOKED_KEYS).arg(hash.to_hex()))
                    .await?;
            }
        }
        for gone in seeded.iter().filter(|id| !listed.contains(id.as_str())) {
            self.remove_key(gone).await?;
            self.link
                .admin::<Value>(redis::cmd("SREM").arg(CONFIG_KEYS).arg(gone))
                .await?;
        }
        for (hash, record) in keys {
            if self.hash_of(&record.id).await?.is_some_and(|p| p != *hash) {
                // The file gave this id a new secret: the old one stops working.
                self.remove_key(&record.id).await?;
            }
            let mut fields = record_fields(record);
            // A key revoked in the store stays revoked, even once Redis lost it.
            fields.retain(|(field, _)| *field != "revoked");
            let revoked_before = if revoked.contains(&hash.to_hex()) {
                "1"
            } else {
                "0"
            };
            let mut cmd = redis::cmd("HSET");
            cmd.arg(key_record(hash));
            for (field, value) in fields {
                cmd.arg(field).arg(value);
            }
            let commands = [
                cmd,
                redis::cmd("HSETNX")
                    .arg(key_record(hash))
                    .arg("revoked")
                    .arg(revoked_before)
                    .clone(),
                redis::cmd("SET")
                    .arg(key_index(&record.id))
                    .arg(hash.to_hex())
                    .clone(),
                redis::cmd("SADD").arg(CONFIG_KEYS).arg(&record.id).clone(),
                redis::cmd("SADD")
                    .arg(ACCOUNTS)
                    .arg(&record.account)
                    .clone(),
            ];
            for cmd in &commands {
                self.link.admin::<Value>(cmd).await?;
            }
        }
        for account in accounts {
            // An account that exists keeps its live balance: a restart resets nothing. One
            // that lost it starts again from the file, less what was settled meanwhile.
            let invocation = Invocation {
                keys: vec![account_hash(&account.id)],
                args: vec![account.balance.to_string()],
            };
            self.link
                .invoke_within::<Value>(
                    Op::Admin,
                    ADMIN_TIMEOUT,
                    &self.seed_account_script,
                    &invocation,
                )
                .await?;
            self.link
                .admin::<Value>(redis::cmd("SADD").arg(ACCOUNTS).arg(&account.id))
                .await?;
        }
        self.fail_open.remember_config_keys(keys);
        for (hash, _) in keys {
            if revoked.contains(&hash.to_hex()) {
                self.keys.revoke(hash);
            }
        }
        // Last: its presence says everything above is in Redis; from now on its absence
        // means Redis lost it.
        self.link
            .admin::<Value>(redis::cmd("SET").arg(SEEDED).arg("1"))
            .await?;
        self.seeding.remember(keys, accounts);
        self.announce(KeyEvent::AllChanged).await;
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

    async fn remove_key(&self, id: &str) -> Result<(), StoreError> {
        if let Some(hash) = self.hash_of(id).await? {
            self.link
                .admin::<Value>(redis::cmd("DEL").arg(key_record(&hash)))
                .await?;
        }
        self.link
            .admin::<Value>(redis::cmd("DEL").arg(key_index(id)))
            .await?;
        Ok(())
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
