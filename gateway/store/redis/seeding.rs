//! A Redis that lost its state (restarted empty, or failed over to a replica that had
//! nothing) is found by the seed marker's absence, checked every [`CHECK_EVERY`] and at once
//! when a config-file key is missing. It is seeded again straight away from what this
//! instance last seeded, without a reload: config keys (revocations included, as far as the
//! revoked set survived) and starting balances, less what held settlements charge on top.
//! What Redis did not persist is gone: admin-made keys, balance changes and usage totals.

use parking_lot::Mutex;
use prometheus::IntCounter;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::Notify;

use turnpike_core::keys::{KeyHash, KeyRecord};

use super::names::SEEDED;
use super::RedisStore;
use crate::clock::unix_ms;
use crate::config::AccountSeed;

/// What a Redis that lost its state took with it.
const LOST: &str = "admin-made keys, balance changes, usage totals and the usage stream Redis did not persist are gone (run Redis with appendonly yes)";

/// How often the seed marker is looked for.
const CHECK_EVERY: Duration = Duration::from_secs(1);

pub struct Seeding {
    /// The last seed that completed: until one has, there is no marker to miss.
    last: Mutex<Option<Arc<Seed>>>,
    /// Held by each seed while it runs.
    running: tokio::sync::Mutex<()>,
    wake: Notify,
    lost: IntCounter,
    /// When Redis was last found to have lost its state (Unix ms; 0: never).
    lost_at_ms: AtomicU64,
}

/// What a seed wrote.
struct Seed {
    keys: Vec<(KeyHash, KeyRecord)>,
    accounts: Vec<AccountSeed>,
}

impl Seeding {
    pub fn new(lost: IntCounter) -> Self {
        Self {
            last: Mutex::new(None),
            running: tokio::sync::Mutex::new(()),
            wake: Notify::new(),
            lost,
            lost_at_ms: AtomicU64::new(0),
        }
    }

    /// For `/readyz`: what the last loss of state took with it.
    pub fn note(&self) -> Option<String> {
        let at = self.lost_at_ms.load(Ordering::Relaxed);
        (at != 0).then(|| {
            format!(
                "Redis lost its state {} time(s) since this instance started, last at {} (Unix ms); config keys and balances were seeded again, and {LOST}",
                self.lost.get(),
                at
            )
        })
    }

    pub fn remember(&self, keys: &[(KeyHash, KeyRecord)], accounts: &[AccountSeed]) {
        *self.last.lock() = Some(Arc::new(Seed {
            keys: keys.to_vec(),
            accounts: accounts.to_vec(),
        }));
    }

    /// Taken by a seed for as long as it runs.
    pub async fn lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.running.lock().await
    }

    /// Looks for the marker now rather than at the next tick.
    pub fn check_soon(&self) {
        self.wake.notify_one();
    }
}

/// Seeds Redis again whenever its seed marker is gone.
pub(super) async fn watch_for_lost_state(store: Weak<RedisStore>, seeding: Arc<Seeding>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(CHECK_EVERY) => {}
            _ = seeding.wake.notified() => {}
        }
        let Some(store) = store.upgrade() else { return };
        let Some(seed) = seeding.last.lock().clone() else {
            continue;
        };
        if store.link.is_down() {
            continue;
        }
        let present: Result<i64, _> = store.link.admin(redis::cmd("EXISTS").arg(SEEDED)).await;
        if present.ok() != Some(0) {
            continue;
        }
        tracing::error!(
            marker = SEEDED,
            "Redis lost its state (an empty restart?): seeding config keys and balances again; {LOST}"
        );
        seeding.lost_at_ms.store(unix_ms(), Ordering::Relaxed);
        seeding.lost.inc();
        match store.seed_records(&seed.keys, &seed.accounts).await {
            Ok(()) => tracing::warn!("Redis seeded again after losing its state"),
            Err(error) => {
                tracing::error!(%error, "could not seed Redis again; retrying");
                seeding.check_soon();
            }
        }
    }
}
