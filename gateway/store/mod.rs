//! The state seam: everything shared between calls (buckets, balances, keys, usage) sits
//! behind [`Store`]. The operations every call makes ([`CallStore`]) are apart from the
//! operator's ([`AdminStore`]); each maps one to one onto an atomic call a networked store
//! makes (on Redis: one script per operation), so the proxy is the same on every store.

mod memory;
mod redis;

pub use self::memory::MemoryStore;
pub use self::redis::RedisStore;

use async_trait::async_trait;
use std::sync::Arc;

use turnpike_core::admission::{Admission, Admitted, Extended, Extension, Refusal, Settlement};
use turnpike_core::billing::AccountState;
use turnpike_core::keys::{KeyHash, KeyRecord};
use turnpike_core::limits::Quota;

use crate::config::{AccountSeed, ConfigKeys};

/// A store operation that failed, with what that says about the store.
#[derive(Debug, thiserror::Error)]
#[error("{kind}: {source}")]
pub struct StoreError {
    pub kind: StoreErrorKind,
    source: Box<dyn std::error::Error + Send + Sync>,
}

/// What a failure says about the store, and so what a caller may assume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StoreErrorKind {
    /// No answer in time: the operation may or may not have been applied.
    #[error("store unavailable")]
    Unanswered,
    /// Nothing was sent: the store is known to be down.
    #[error("store unreachable")]
    Unreachable,
    /// The store answered that it cannot do this now (out of memory, a read-only replica
    /// after a failover, a cluster slot moving or down, loading, busy): nothing was applied,
    /// and the same operation may succeed later.
    #[error("store cannot do this now")]
    Transient,
    /// The store answered with an error that no retry can cure (a wrong type, a script
    /// error): the operation was refused for good.
    #[error("store refused the operation")]
    Refused,
}

impl StoreErrorKind {
    /// Whether the same operation may succeed if tried again later.
    pub fn is_transient(self) -> bool {
        self != StoreErrorKind::Refused
    }

    /// Whether the operation can have been applied, whole or in part (so what it took may
    /// need giving back): a lost answer, or a script that failed half-way.
    pub fn may_have_applied(self) -> bool {
        matches!(self, StoreErrorKind::Unanswered | StoreErrorKind::Refused)
    }
}

impl StoreError {
    pub fn new(
        kind: StoreErrorKind,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self {
            kind,
            source: source.into(),
        }
    }
}

/// Totals over everything metered, for `GET /admin/usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct UsageTotals {
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub total_tokens: u64,
    pub cost: i64,
}

/// Which usage to add up; `None` matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageFilter {
    pub account: Option<String>,
    pub key: Option<String>,
    pub agent: Option<String>,
}

/// What became of an operator's balance change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BalanceOutcome {
    Changed(AccountState),
    NoSuchAccount,
    /// The balance would leave the 64-bit range; nothing was changed.
    WouldOverflow,
}

/// A change an operator makes to a balance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BalanceChange {
    Add(i64),
    Set(i64),
}

/// What every call asks of the store: at most one round trip each.
#[async_trait]
pub trait CallStore: Send + Sync {
    /// The key with this hash, whether live or not (a config key first, then one made
    /// through the admin API); `None` when unknown.
    async fn key(&self, hash: &KeyHash) -> Result<Option<Arc<KeyRecord>>, StoreError>;

    /// Checks every bucket of the key and agent policies, the concurrency slots and the
    /// account's balance; on success takes them all, on refusal takes nothing. The outer
    /// error means the store could not decide.
    async fn admit(&self, call: &Admission<'_>) -> Result<Result<Admitted, Refusal>, StoreError>;

    /// The `RateLimit-*` numbers for `call` as this instance knows them, without taking
    /// anything and without a round trip to a networked store (`call_id` unused): for a
    /// refusal before admission, which must cost the store nothing.
    fn quota(&self, call: &Admission<'_>) -> Option<Quota>;

    /// A stream still running (SPEC §5): grows the call's hold towards `hold_to` as far as
    /// the account has free (a total: asking twice takes nothing more), renews the leases of
    /// its hold and slots so none expires under it, and reads the key's token bucket. A
    /// round trip per side (one on a single Redis server). Asked only for a call not yet
    /// settled; the embedded store gives a settled call nothing.
    async fn extend(&self, call: &Extension<'_>) -> Result<Extended, StoreError>;

    /// Releases the call's reservation and slots, debits cost and token buckets, and records
    /// usage. Idempotent per `call_id`: settling twice changes nothing the second time.
    /// Never fails from the caller's side: a store that cannot write it now holds it, and
    /// counts and logs what it could not keep.
    async fn settle(&self, call: &Settlement<'_>);

    /// Before the process exits, once no call is in flight: writes, for at most `within`,
    /// what the store still owes (settlements held while it was unreachable). Returns how
    /// many it could not write, which the store has logged (or kept in its journal).
    /// Nothing, by default.
    async fn write_owed(&self, _within: std::time::Duration) -> usize {
        0
    }
}

/// What the operator (admin API, start-up and reload) asks of the store.
#[async_trait]
pub trait AdminStore: Send + Sync {
    /// The key with this public id (a config key first); `None` when unknown.
    async fn key_by_id(&self, id: &str) -> Result<Option<Arc<KeyRecord>>, StoreError>;

    /// Adds a key; `Ok(false)` when its id or hash is already taken (by a config key too).
    async fn create_key(&self, hash: KeyHash, record: KeyRecord) -> Result<bool, StoreError>;

    /// Marks the key revoked (it stays visible, refused), a config key as much as one made
    /// through the admin API; `Ok(false)` when unknown.
    async fn revoke_key(&self, id: &str) -> Result<bool, StoreError>;

    /// Puts a config's keys and accounts in force, at start and on every reload. The keys
    /// are looked up in this instance's copy from now on and are never written to a shared
    /// store: only their revocations live there, and a revocation wins over the file. Each
    /// account the store has no balance for gets its starting balance; one that has a
    /// balance keeps it. The store's work is in proportion to what changed since the last
    /// config put in force here (its new accounts), not to the number of keys.
    async fn apply_config(
        &self,
        keys: &Arc<ConfigKeys>,
        accounts: &[AccountSeed],
    ) -> Result<(), StoreError>;

    /// `None` when the account is unknown.
    async fn balance(&self, account: &str) -> Result<Option<AccountState>, StoreError>;

    /// Applies `change`, atomically, unless it would overflow.
    async fn change_balance(
        &self,
        account: &str,
        change: BalanceChange,
    ) -> Result<BalanceOutcome, StoreError>;

    async fn usage(&self, filter: &UsageFilter) -> Result<UsageTotals, StoreError>;

    /// Whether the store answers, for `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;

    /// What an operator should know about the store's past, for `/readyz` (e.g. that it
    /// lost its state and what went with it).
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }
}

/// A whole store: what the server builds and hands to the proxy and the admin API, each of
/// which sees only its side.
pub trait Store: CallStore + AdminStore {}

impl<T: CallStore + AdminStore + ?Sized> Store for T {}
