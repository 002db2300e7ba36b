//! Key lookups cached per instance, positive and negative, for a short time. Another
//! instance's change arrives over pub/sub and drops the entry at once; the time limit bounds
//! how stale an entry can be when a message is missed.

use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::{KeyHash, KeyRecord};

/// More entries than this and the cache starts over: random bearer tokens cannot grow it
/// without bound.
const MAX_ENTRIES: usize = 100_000;

pub struct KeyCache {
    ttl: Duration,
    entries: RwLock<HashMap<KeyHash, Entry>>,
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
        }
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

    pub fn put(&self, hash: KeyHash, record: Option<Arc<KeyRecord>>) {
        let mut entries = self.entries.write();
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
        self.entries.write().remove(hash);
    }

    pub fn forget_all(&self) {
        self.entries.write().clear();
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
        cache.put(hash, None);
        assert!(matches!(cache.get(&hash), Cached::Fresh(None)));
        std::thread::sleep(Duration::from_millis(60));
        assert!(matches!(cache.get(&hash), Cached::Stale(None)));
        cache.forget(&hash);
        assert!(matches!(cache.get(&hash), Cached::Unknown));
    }
}
