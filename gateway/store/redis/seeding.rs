//! A Redis that lost its state (restarted empty, or failed over to a replica that had
//! nothing) is found by the seed marker's absence, or its change (another instance seeded
//! it first), checked every [`CHECK_EVERY`]. It is
//! seeded again straight away from what this instance last put in force, without a reload:
//! the accounts' starting balances, less what held settlements charge on top, and the
//! revocations this instance learned. Config keys need nothing: they are read from the
//! file. What Redis did not persist is gone: admin-made keys, balance changes and usage
//! totals. The same check reads the revocation count, and learns the revocations again when
//! it moved without an announcement this instance heard.

use parking_lot::Mutex;
use prometheus::IntCounter;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::names::{REVOCATIONS, SEEDED};
use super::RedisStore;
use crate::clock::unix_ms;
use crate::config::AccountSeed;

/// What a Redis that lost its state took with it.
const LOST: &str = "admin-made keys, balance changes, usage totals and the usage stream Redis did not persist are gone (run Redis with appendonly yes)";

/// How often the seed marker and the revocation count are looked at.
const CHECK_EVERY: Duration = Duration::from_secs(1);

pub struct Seeding {
    /// The accounts of the last config put in force: until one has, there is no marker to
    /// miss.
    last: Mutex<Option<Arc<Seeded>>>,
    /// Held by each seed while it runs.
    running: tokio::sync::Mutex<()>,
    lost: IntCounter,
    /// When Redis was last found to have lost its state (Unix ms; 0: never).
    lost_at_ms: AtomicU64,
    /// The revocation count this instance's revocations are up to date with.
    revocations_seen: AtomicU64,
    /// The seed marker's value this instance has seeded against: a new value means another
    /// instance seeded Redis after it lost its state, and this one adds what it knows.
    marker_seen: Mutex<Option<String>>,
}

/// The accounts a config put in force.
pub struct Seeded {
    pub accounts: Vec<AccountSeed>,
    ids: HashSet<String>,
}

impl Seeded {
    pub fn has(&self, account: &str) -> bool {
        self.ids.contains(account)
    }
}

impl Seeding {
    pub fn new(lost: IntCounter) -> Self {
        Self {
            last: Mutex::new(None),
            running: tokio::sync::Mutex::new(()),
            lost,
            lost_at_ms: AtomicU64::new(0),
            revocations_seen: AtomicU64::new(0),
            marker_seen: Mutex::new(None),
        }
    }

    pub fn saw_marker(&self, marker: Option<String>) {
        *self.marker_seen.lock() = marker;
    }

    /// For `/readyz`: what the last loss of state took with it.
    pub fn note(&self) -> Option<String> {
        let at = self.lost_at_ms.load(Ordering::Relaxed);
        (at != 0).then(|| {
            format!(
                "Redis lost its state {} time(s) since this instance started, last at {} (Unix ms); balances and revocations were seeded again, and {LOST}",
                self.lost.get(),
                at
            )
        })
    }

    pub fn last(&self) -> Option<Arc<Seeded>> {
        self.last.lock().clone()
    }

    pub fn remember(&self, accounts: &[AccountSeed]) {
        *self.last.lock() = Some(Arc::new(Seeded {
            ids: accounts.iter().map(|a| a.id.clone()).collect(),
            accounts: accounts.to_vec(),
        }));
    }

    pub fn saw_revocations(&self, count: u64) {
        self.revocations_seen.store(count, Ordering::Relaxed);
    }

    /// Taken by a seed for as long as it runs.
    pub async fn lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.running.lock().await
    }
}

/// Seeds Redis again whenever its seed marker is gone, and learns revocations again when
/// their count moved.
pub(super) async fn watch_for_lost_state(store: Weak<RedisStore>, seeding: Arc<Seeding>) {
    loop {
        tokio::time::sleep(CHECK_EVERY).await;
        let Some(store) = store.upgrade() else { return };
        let Some(seeded) = seeding.last() else {
            continue;
        };
        if store.link.is_down() {
            continue;
        }
        let count: Result<Option<u64>, _> =
            store.link.admin(redis::cmd("GET").arg(REVOCATIONS)).await;
        if let Ok(count) = count {
            if count.unwrap_or(0) != seeding.revocations_seen.load(Ordering::Relaxed) {
                if let Err(error) = store.read_revocations().await {
                    tracing::warn!(%error, "could not read the revocations again");
                }
            }
        }
        let Ok(marker) = store
            .link
            .admin::<Option<String>>(redis::cmd("GET").arg(SEEDED))
            .await
        else {
            continue;
        };
        if marker.is_some() && marker == *seeding.marker_seen.lock() {
            continue;
        }
        // Gone: Redis lost its state. Changed: it did, and another instance (one starting,
        // or one that looked first) seeded it; this one still adds its own accounts and the
        // revocations it learned, which the other may not know.
        tracing::error!(
            marker = SEEDED,
            found = if marker.is_none() { "gone" } else { "changed" },
            "Redis lost its state (an empty restart?): seeding balances and revocations again; {LOST}"
        );
        seeding.lost_at_ms.store(unix_ms(), Ordering::Relaxed);
        seeding.lost.inc();
        let seeded_again = async {
            store.seed_again(&seeded.accounts).await?;
            store.read_revocations().await
        };
        match seeded_again.await {
            Ok(_) => tracing::warn!("Redis seeded again after losing its state"),
            Err(error) => tracing::error!(%error, "could not seed Redis again; retrying"),
        }
    }
}
