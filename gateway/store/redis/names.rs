//! Where each piece of state lives in Redis. Everything an admission touches for a key lives
//! under its account's hash tag (`turnpike:{account:acct_jane}:...`), so one script in one
//! Cluster slot judges the key's buckets and the balance together; an agent's own buckets
//! are shared by every account, so they live under the agent's tag.

use turnpike_core::keys::KeyHash;

/// The usage log billing pipelines read (SPEC §2).
pub const USAGE_STREAM: &str = "turnpike:usage";
/// Every account that has a key or a balance, for usage queries over all accounts.
pub const ACCOUNTS: &str = "turnpike:accounts";
/// Ids of the config keys an older build wrote into Redis; removed (with those keys) when a
/// gateway that reads config keys from its file starts.
pub const CONFIG_KEYS: &str = "turnpike:config_keys";
/// Hashes (hex) of every key revoked, config keys' too: read at start, and written back by
/// the instances that know them after Redis lost its state.
pub const REVOKED_KEYS: &str = "turnpike:revoked_keys";
/// Counts revocations: an instance that sees it move learns the revocations again.
pub const REVOCATIONS: &str = "turnpike:revocations";
/// Set once the first config is in force (and after every re-seed): when it is gone, Redis
/// lost its state (an empty restart).
pub const SEEDED: &str = "turnpike:seeded";
/// Pub/sub channel announcing changed keys (`records::KeyEvent`).
pub const KEY_EVENTS: &str = "turnpike:keys";

/// How long a settled call's marker (which makes a retried settlement change nothing) lives
/// unless the gateway shortens it: long enough for a settlement held in the journal to be
/// replayed after any outage worth riding out. The journal replays nothing older (its
/// marker may be gone), and logs it whole instead.
pub const SETTLED_MARKER_MS: u64 = 30 * 24 * 3_600_000;
/// Once the gateway knows a write's outcome (and, for a held one, the journal says so), its
/// marker lives this much longer, for a duplicate still on its way (a write whose answer
/// was lost, a settlement racing its own retry), then goes.
pub const MARKER_GRACE_MS: u64 = 60_000;

/// Everything of one account shares this hash tag. The fixed `account:` inside the braces
/// keeps the tag non-empty and apart from agents' whatever the id holds (even a `}`).
pub fn account_tag(account: &str) -> String {
    format!("turnpike:{{account:{account}}}")
}

pub fn agent_tag(agent: &str) -> String {
    format!("turnpike:{{agent:{agent}}}")
}

/// `balance`, `reserved`, and `held:<call id>` for each reservation outstanding.
pub fn account_hash(account: &str) -> String {
    format!("{}:account", account_tag(account))
}

/// The account's reservations as leases, scored by when they expire.
pub fn account_leases(account: &str) -> String {
    format!("{}:leases", account_tag(account))
}

/// Per account: usage counters by key and agent, `<field>\x1f<key id>\x1f<agent>`.
pub fn usage_hash(account: &str) -> String {
    format!("{}:usage", account_tag(account))
}

/// Marks a call's usage log entry written, in the stream's own slot (its hash tag is the
/// stream's name), so a retried `XADD` on a Cluster appends nothing twice.
pub fn usage_marker(call_id: &str) -> String {
    format!("{{{USAGE_STREAM}}}:logged:{call_id}")
}

/// The part of a key Redis Cluster hashes to find its slot: the text between the first `{`
/// and the next `}` when there is some, else the whole key.
pub fn hash_tag(key: &str) -> &str {
    if let Some(open) = key.find('{') {
        if let Some(len) = key[open + 1..].find('}').filter(|&len| len > 0) {
            return &key[open + 1..open + 1 + len];
        }
    }
    key
}

pub fn key_record(hash: &KeyHash) -> String {
    format!("turnpike:key:{}", hash.to_hex())
}

pub fn key_index(id: &str) -> String {
    format!("turnpike:keyid:{id}")
}

/// Whose buckets and slots a script judges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limiter<'a> {
    Key { account: &'a str, key_id: &'a str },
    Agent(&'a str),
}

impl Limiter<'_> {
    /// The limiter hash, and the leases of the slices instances hold of its buckets.
    pub fn sliced(self) -> [String; 2] {
        let [limits, _] = self.keys();
        let leases = format!("{limits}:slices");
        [limits, leases]
    }

    /// The limiter hash and the in-flight lease set.
    pub fn keys(self) -> [String; 2] {
        let base = match self {
            Limiter::Key { account, key_id } => format!("{}:key:{key_id}", account_tag(account)),
            Limiter::Agent(agent) => agent_tag(agent),
        };
        // Fixed, different endings: no key id can make one key's name another's.
        [format!("{base}:limits"), format!("{base}:inflight")]
    }
}
