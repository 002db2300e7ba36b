//! HPACK's two index tables (RFC 7541 §2.3): the static table every connection shares, and
//! the dynamic table each decoder keeps in step with its peer's encoder.

use std::collections::VecDeque;

/// RFC 7541 Appendix A, in index order from 1.
const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// The number of static entries; dynamic indexes start after them.
pub(super) const STATIC_LEN: usize = STATIC.len();

/// What RFC 7541 §4.1 counts for each entry beyond its name and value.
pub(super) const ENTRY_OVERHEAD: usize = 32;

/// One dynamic entry: its name and value in one allocation.
#[derive(Debug)]
pub(super) struct Entry {
    bytes: Box<[u8]>,
    name_len: usize,
}

impl Entry {
    /// A copy of a field, so the table can take it even when its name was one of the table's
    /// own entries (which the insertion may evict, RFC 7541 §4.4).
    pub(super) fn new(name: &[u8], value: &[u8]) -> Self {
        let mut bytes = Vec::with_capacity(name.len() + value.len());
        bytes.extend_from_slice(name);
        bytes.extend_from_slice(value);
        Self {
            bytes: bytes.into_boxed_slice(),
            name_len: name.len(),
        }
    }

    pub(super) fn name(&self) -> &[u8] {
        &self.bytes[..self.name_len]
    }

    pub(super) fn value(&self) -> &[u8] {
        &self.bytes[self.name_len..]
    }

    fn size(&self) -> usize {
        self.bytes.len() + ENTRY_OVERHEAD
    }
}

/// The dynamic table: newest entry first, oldest evicted first, never over `capacity` by
/// RFC 7541's size rule. Its memory is its size (less the overhead), so `capacity`, which the
/// decoder never lets past its SETTINGS maximum, bounds it.
#[derive(Debug, Default)]
pub(super) struct DynamicTable {
    entries: VecDeque<Entry>,
    size: usize,
    capacity: usize,
}

impl DynamicTable {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            ..Self::default()
        }
    }

    /// The name and value at a 1-based HPACK index, static entries first; `None` for 0 or an
    /// index past both tables.
    pub(super) fn get(&self, index: usize) -> Option<(&[u8], &[u8])> {
        match index {
            0 => None,
            1..=STATIC_LEN => {
                let (name, value) = STATIC[index - 1];
                Some((name.as_bytes(), value.as_bytes()))
            }
            _ => self
                .entries
                .get(index - STATIC_LEN - 1)
                .map(|entry| (entry.name(), entry.value())),
        }
    }

    /// Whether an entry of this name and value would fit in the table at all.
    pub(super) fn fits(&self, name: &[u8], value: &[u8]) -> bool {
        name.len() + value.len() + ENTRY_OVERHEAD <= self.capacity
    }

    /// Adds an entry, evicting the oldest until it fits (RFC 7541 §4.4). One that cannot fit
    /// even in an empty table empties it and is not added; callers ask [`Self::fits`] first,
    /// so as not to copy a field only to drop it.
    pub(super) fn insert(&mut self, entry: Entry) {
        match self.capacity.checked_sub(entry.size()) {
            Some(room) => {
                self.evict_down_to(room);
                self.size += entry.size();
                self.entries.push_front(entry);
            }
            None => self.evict_down_to(0),
        }
    }

    /// A dynamic table size update (RFC 7541 §4.3): evicts until the table fits the new size.
    pub(super) fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
        self.evict_down_to(capacity);
    }

    /// Empties the table, as a field too large for it does.
    pub(super) fn clear(&mut self) {
        self.evict_down_to(0);
    }

    fn evict_down_to(&mut self, size: usize) {
        while self.size > size {
            match self.entries.pop_back() {
                Some(entry) => self.size -= entry.size(),
                None => break,
            }
        }
    }

    pub(super) fn size(&self) -> usize {
        self.size
    }

    pub(super) fn capacity(&self) -> usize {
        self.capacity
    }

    /// The entries, newest (index 62) first.
    pub(super) fn entries(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.entries
            .iter()
            .map(|entry| (entry.name(), entry.value()))
    }
}
