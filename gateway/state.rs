//! What every call and the admin API share: the config snapshot, the store, the metrics.

use arc_swap::ArcSwap;
use std::sync::Arc;
use std::time::Instant;

use crate::config::Runtime;
use crate::exchange::Upstreams;
use crate::metrics::Metrics;
use crate::reload::{fingerprint, Fingerprint};
use crate::store::Store;
use crate::upstream::Pools;

/// One consistent view of the config and the pools built from it. A call loads one
/// snapshot when it starts and uses it to the end.
pub struct Snapshot {
    pub config: Runtime,
    pub pools: Pools,
}

pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    pub store: Arc<dyn Store>,
    pub metrics: Metrics,
    pub upstreams: Upstreams,
    /// Reloads run one at a time.
    pub reload_lock: tokio::sync::Mutex<()>,
    /// The config files as the last load attempt read them.
    pub files_seen: parking_lot::Mutex<Fingerprint>,
    started: Instant,
}

impl Shared {
    pub fn new(snapshot: Snapshot, store: Arc<dyn Store>, metrics: Metrics) -> Self {
        let files_seen = parking_lot::Mutex::new(fingerprint(&snapshot.config));
        Self {
            snapshot: ArcSwap::from_pointee(snapshot),
            store,
            metrics,
            upstreams: Upstreams::default(),
            reload_lock: tokio::sync::Mutex::new(()),
            files_seen,
            started: Instant::now(),
        }
    }

    /// Milliseconds on a monotonic clock, for the rate-limit core.
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

/// Seconds since the Unix epoch, for key expiry.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
