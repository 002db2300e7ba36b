//! This instance's last-known key table. A key Redis answered for is kept: served from here
//! while fresh, re-read from Redis once stale or once a change may have been missed, and,
//! while Redis cannot be asked, recognised as last known (under `fail_open`). Revocations
//! are never forgotten: one announced arrives with the key it revokes, and stays.
//! Lookups of keys Redis does not know are cached apart, briefly and bounded, so random
//! bearer tokens cannot grow the table or push real keys out.

use parking_lot::RwLock;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use turnpike_core::keys::{KeyHash, KeyRecord};

/// More unknown keys than this and their cache starts over.
const MAX_UNKNOWN: usize = 100_000;

pub struct KnownKeys {
    ttl: Duration,
    table: RwLock<Table>,
    /// Counts changes, so a lookup that a change overtook is not cached as current.
    changes: AtomicU64,
}

#[derive(Default)]
struct Table {
    known: HashMap<KeyHash, Known>,
    /// Hashes Redis said it does not know, and when.
    unknown: HashMap<KeyHash, Instant>,
    /// Every key this instance learned was revoked.
    revoked: HashSet<KeyHash>,
}

struct Known {
    record: Arc<KeyRecord>,
    fetched: Instant,
    /// False once a change to it was announced or may have been missed: re-read first.
    current: bool,
}

/// What the table knows about a key.
pub enum Lookup {
    /// Read from Redis within the time limit, with no change since: `None` means no such key.
    Fresh(Option<Arc<KeyRecord>>),
    /// Known, but to be re-read; usable as last known while Redis cannot be asked.
    LastKnown(Arc<KeyRecord>),
    Unknown,
}

impl KnownKeys {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            table: RwLock::new(Table::default()),
            changes: AtomicU64::new(0),
        }
    }

    /// Taken before a lookup in Redis, and handed to [`KnownKeys::put`] with its result.
    pub fn epoch(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    pub fn get(&self, hash: &KeyHash) -> Lookup {
        let table = self.table.read();
        if let Some(known) = table.known.get(hash) {
            return if known.current && known.fetched.elapsed() < self.ttl {
                Lookup::Fresh(Some(Arc::clone(&known.record)))
            } else {
                Lookup::LastKnown(Arc::clone(&known.record))
            };
        }
        match table.unknown.get(hash) {
            Some(fetched) if fetched.elapsed() < self.ttl => Lookup::Fresh(None),
            _ => Lookup::Unknown,
        }
    }

    /// Records what Redis answered for `hash`, and returns the record to use: a revoked key
    /// stays revoked whatever an older read says; a read a change overtook is kept only as
    /// last known.
    pub fn put(
        &self,
        hash: KeyHash,
        record: Option<Arc<KeyRecord>>,
        epoch: u64,
    ) -> Option<Arc<KeyRecord>> {
        let mut table = self.table.write();
        let current = self.changes.load(Ordering::Acquire) == epoch;
        match record {
            Some(record) => {
                let record = if table.revoked.contains(&hash) && !record.revoked {
                    record.as_revoked()
                } else {
                    record
                };
                if record.revoked {
                    table.revoked.insert(hash);
                }
                table.unknown.remove(&hash);
                table.known.insert(
                    hash,
                    Known {
                        record: Arc::clone(&record),
                        fetched: Instant::now(),
                        current,
                    },
                );
                Some(record)
            }
            None => {
                // The key is gone from Redis (removed from the config file, or Redis lost
                // its state): nothing is left to recognise it by.
                table.known.remove(&hash);
                if current {
                    if table.unknown.len() >= MAX_UNKNOWN {
                        table.unknown.clear();
                    }
                    table.unknown.insert(hash, Instant::now());
                }
                None
            }
        }
    }

    /// A change to `hash` was announced: re-read it before trusting it again.
    pub fn changed(&self, hash: &KeyHash) {
        let mut table = self.table.write();
        self.changes.fetch_add(1, Ordering::AcqRel);
        table.unknown.remove(hash);
        if let Some(known) = table.known.get_mut(hash) {
            known.current = false;
        }
    }

    /// `hash` was revoked: refused from now on, Redis reachable or not.
    pub fn revoke(&self, hash: &KeyHash) {
        let mut table = self.table.write();
        self.changes.fetch_add(1, Ordering::AcqRel);
        table.revoked.insert(*hash);
        table.unknown.remove(hash);
        if let Some(known) = table.known.get_mut(hash) {
            known.record = known.record.as_revoked();
            known.current = false;
        }
    }

    /// Any key may have changed (a re-seed, or changes missed while the subscription was
    /// down): every entry is re-read before it is trusted, none is forgotten.
    pub fn all_changed(&self) {
        let mut table = self.table.write();
        self.changes.fetch_add(1, Ordering::AcqRel);
        table.unknown.clear();
        for known in table.known.values_mut() {
            known.current = false;
        }
    }

    /// Every key this instance learned was revoked.
    pub fn revoked(&self) -> Vec<KeyHash> {
        self.table.read().revoked.iter().copied().collect()
    }

    /// `record` as this instance knows it: revoked if it learned so.
    pub fn as_known(&self, hash: &KeyHash, record: Arc<KeyRecord>) -> Arc<KeyRecord> {
        if !record.revoked && self.table.read().revoked.contains(hash) {
            record.as_revoked()
        } else {
            record
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use turnpike_core::keys::AgentScope;

    fn record(id: &str) -> Arc<KeyRecord> {
        Arc::new(KeyRecord {
            id: id.into(),
            account: "acct".into(),
            agents: AgentScope::All,
            policy: "standard".into(),
            expires_at: None,
            revoked: false,
        })
    }

    #[test]
    fn a_known_key_goes_stale_but_is_never_forgotten_by_a_change() {
        let table = KnownKeys::new(Duration::from_millis(50));
        let hash = KeyHash::of("ak_x");
        assert!(matches!(table.get(&hash), Lookup::Unknown));
        table.put(hash, Some(record("k")), table.epoch());
        assert!(matches!(table.get(&hash), Lookup::Fresh(Some(_))));
        table.changed(&hash);
        assert!(matches!(table.get(&hash), Lookup::LastKnown(_)));
        table.put(hash, Some(record("k")), table.epoch());
        table.all_changed();
        assert!(matches!(table.get(&hash), Lookup::LastKnown(_)));
        table.put(hash, Some(record("k")), table.epoch());
        std::thread::sleep(Duration::from_millis(60));
        assert!(matches!(table.get(&hash), Lookup::LastKnown(_)));
    }

    #[test]
    fn a_revocation_outlives_older_reads() {
        let table = KnownKeys::new(Duration::from_secs(60));
        let hash = KeyHash::of("ak_x");
        let before = table.epoch();
        table.revoke(&hash);
        // A read that began before the revocation arrives after it.
        table.put(hash, Some(record("k")), before);
        match table.get(&hash) {
            Lookup::LastKnown(record) => assert!(record.revoked),
            _ => panic!("a read overtaken by a change is not current"),
        }
        table.put(hash, Some(record("k")), table.epoch());
        match table.get(&hash) {
            Lookup::Fresh(Some(record)) => assert!(record.revoked),
            _ => panic!("known"),
        }
        assert!(table.as_known(&hash, record("k")).revoked);
    }

    #[test]
    fn unknown_keys_are_cached_apart_and_dropped_by_a_change() {
        let table = KnownKeys::new(Duration::from_secs(60));
        let hash = KeyHash::of("ak_new");
        table.put(hash, None, table.epoch());
        assert!(matches!(table.get(&hash), Lookup::Fresh(None)));
        table.changed(&hash); // the key was just created
        assert!(matches!(table.get(&hash), Lookup::Unknown));
        let overtaken = table.epoch();
        table.changed(&KeyHash::of("ak_other"));
        table.put(hash, None, overtaken);
        assert!(matches!(table.get(&hash), Lookup::Unknown));
    }
}
