//! Key records in Redis: looked up on the hot path through the per-instance cache, created,
//! revoked and seeded by the operator, and every change announced on pub/sub so each
//! instance drops its cached copy at once.

use futures_util::StreamExt;
use redis::{RedisResult, Value};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use turnpike_core::keys::{AgentScope, KeyHash, KeyRecord};

use super::cache::Cached;
use super::link::{Op, ADMIN_TIMEOUT};
use super::names::{account_hash, key_index, key_record, ACCOUNTS, CONFIG_KEYS, KEY_EVENTS};
use super::RedisStore;
use crate::config::AccountSeed;
use crate::store::StoreError;

impl RedisStore {
    /// A key by hash: from the cache while fresh, else from Redis; under `fail_open` an
    /// unanswered lookup falls back to the stale cached record, then to the config file's.
    pub(super) async fn lookup_key(
        &self,
        hash: &KeyHash,
    ) -> Result<Option<Arc<KeyRecord>>, StoreError> {
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
            Err(error) if self.fail_open.enabled => match stale {
                Some(record) => Ok(record),
                None => self.fail_open.config_key(hash).map(Some).ok_or(error),
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
            .admin(
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
        self.announce(&hash.to_hex()).await;
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
        self.announce(&hash.to_hex()).await;
        Ok(true)
    }

    pub(super) async fn seed_records(
        &self,
        keys: &[(KeyHash, KeyRecord)],
        accounts: &[AccountSeed],
    ) -> Result<(), StoreError> {
        let listed: HashSet<&str> = keys.iter().map(|(_, r)| r.id.as_str()).collect();
        let seeded: Vec<String> = self
            .link
            .admin(redis::cmd("SMEMBERS").arg(CONFIG_KEYS))
            .await?;
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
            // A key revoked in the store stays revoked.
            fields.retain(|(field, _)| *field != "revoked");
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
                    .arg("0")
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
            // An account that exists keeps its live balance: a restart resets nothing.
            self.link
                .admin::<Value>(
                    redis::cmd("HSETNX")
                        .arg(account_hash(&account.id))
                        .arg("balance")
                        .arg(account.balance),
                )
                .await?;
            self.link
                .admin::<Value>(redis::cmd("SADD").arg(ACCOUNTS).arg(&account.id))
                .await?;
        }
        self.fail_open.remember_config_keys(keys);
        self.announce("*").await;
        Ok(())
    }

    /// Tells every instance (this one included) that a key changed.
    async fn announce(&self, what: &str) {
        match KeyHash::from_hex(what) {
            Some(hash) => self.keys.forget(&hash),
            None => self.keys.forget_all(),
        }
        let _ = self
            .link
            .admin::<Value>(redis::cmd("PUBLISH").arg(KEY_EVENTS).arg(what))
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

/// Listens on the key-change channel and drops changed keys from the cache. While the
/// subscription is down the cache's time limit bounds staleness; on every (re)subscription
/// the whole cache is dropped, since messages may have been missed.
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
        live.link.renew_connections();
        drop(live);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
