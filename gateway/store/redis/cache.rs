//! Key lookups cached per instance, positive and negative, for a short time. Another
//! instance's change arrives over pub/sub and drops the entry at once; the time limit bounds
//! how stale an entry can be when a message is missed.

use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use turnpike_core::keys::{KeyHash, KeyRecord};

/// More entries than this and the cache starts over: random bearer tokens cannot grow it
/// without bound.
const MAX_ENTRIES: usize = 100_000;

pub struct KeyCache {
    ttl: Duration,
    entries: RwLock<HashMap<KeyHash, Entry>>,
    /// Counts invalidations, so a lookup that an invalidation overtook is not cached.
    invalidations: AtomicU64,
}

#[derive(Clone)]
struct Entry {
    record: Option<Arc<KeyRecord>>,
    fetched: Instant,
}

/// What the cache knows about a key.
pub enum Cached {
    /// Looked up within the time limit: `None` means no such key.
    Fresh(Option<Arc<KeyRecord>>),
    /// Older than the time limit; usable only while the store is unreachable.
    Stale(Option<Arc<KeyRecord>>),
    Unknown,
}

impl KeyCache {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: RwLock::new(HashMap::new()),
            invalidations: AtomicU64::new(0),
        }
    }

    /// Taken before a lookup in the store, and handed to [`KeyCache::put`] with its result.
    pub fn epoch(&self) -> u64 {
        self.invalidations.load(Ordering::Acquire)
    }

    pub fn get(&self, hash: &KeyHash) -> Cached {
        match self.entries.read().get(hash) {
            Some(entry) if entry.fetched.elapsed() < self.ttl => {
                Cached::Fresh(entry.record.clone())
            }
            Some(entry) => Cached::Stale(entry.record.clone()),
            None => Cached::Unknown,
        }
    }

    /// Caches a lookup's result, unless a key changed since `epoch` (the record may be
    /// from before the change).
    pub fn put(&self, hash: KeyHash, record: Option<Arc<KeyRecord>>, epoch: u64) {
        let mut entries = self.entries.write();
        if self.invalidations.load(Ordering::Acquire) != epoch {
            return;
        }
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        entries.insert(
            hash,
            Entry {
                record,
                fetched: Instant::now(),
            },
        );
    }

    pub fn forget(&self, hash: &KeyHash) {
        let mut entries = self.entries.write();
        self.invalidations.fetch_add(1, Ordering::AcqRel);
        entries.remove(hash);
    }

    pub fn forget_all(&self) {
        let mut entries = self.entries.write();
        self.invalidations.fetch_add(1, Ordering::AcqRel);
        entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_go_stale_and_can_be_forgotten() {
        let cache = KeyCache::new(Duration::from_millis(50));
        let hash = KeyHash::of("ak_x");
        assert!(matches!(cache.get(&hash), Cached::Unknown));
        let epoch = cache.epoch();
        cache.put(hash, None, epoch);
        assert!(matches!(cache.get(&hash), Cached::Fresh(None)));
        std::thread::sleep(Duration::from_millis(60));
        assert!(matches!(cache.get(&hash), Cached::Stale(None)));
        cache.forget(&hash);
        assert!(matches!(cache.get(&hash), Cached::Unknown));
    }

    #[test]
    fn a_lookup_overtaken_by_an_invalidation_is_not_cached() {
        let cache = KeyCache::new(Duration::from_secs(60));
        let hash = KeyHash::of("ak_x");
        let epoch = cache.epoch();
        cache.forget(&KeyHash::of("ak_other")); // a change arrives while the lookup runs
        cache.put(hash, None, epoch);
        assert!(matches!(cache.get(&hash), Cached::Unknown));
    }
}
