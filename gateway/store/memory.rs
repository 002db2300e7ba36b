//! The embedded store: all state in this process, lost on restart, for one instance.

use arc_swap::ArcSwap;
use async_trait::async_trait;
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use turnpike_core::admission::{
    self, Admission, Admitted, Extended, Extension, LimiterState, Refusal, Reservation, Settlement,
};
use turnpike_core::billing::AccountState;
use turnpike_core::keys::{KeyHash, KeyRecord};
use turnpike_core::limits::Quota;

use super::{
    AdminStore, BalanceChange, BalanceOutcome, CallStore, StoreError, UsageFilter, UsageTotals,
};
use crate::config::{AccountSeed, ConfigKeys};

/// Keys are read on every call and written rarely, so they sit in copy-on-write maps that
/// readers load without a lock: the config's own (put in force whole, never copied) and the
/// ones made through the admin API with the revocations of config keys. Everything an
/// admission must change atomically sits under one mutex: its critical section is a few
/// integer operations and map lookups, with no I/O and no allocation once a key, agent and
/// account have been seen.
#[derive(Default)]
pub struct MemoryStore {
    config_keys: ArcSwap<ConfigKeys>,
    keys: ArcSwap<KeyTable>,
    /// Serialises key writers so none loses another's change.
    key_writer: Mutex<()>,
    ledger: Mutex<Ledger>,
}

/// Keys made through the admin API, and the hashes of config keys revoked.
#[derive(Default, Clone)]
struct KeyTable {
    by_hash: HashMap<KeyHash, Arc<KeyRecord>>,
    by_id: HashMap<String, KeyHash>,
    revoked_config_keys: HashSet<KeyHash>,
}

impl KeyTable {
    fn insert(&mut self, hash: KeyHash, record: KeyRecord) {
        if let Some(old) = self.by_id.insert(record.id.clone(), hash) {
            if old != hash {
                self.by_hash.remove(&old);
            }
        }
        self.by_hash.insert(hash, Arc::new(record));
    }
}

#[derive(Default)]
struct Ledger {
    key_limits: HashMap<String, LimiterState>,
    agent_limits: HashMap<String, LimiterState>,
    accounts: HashMap<String, AccountState>,
    /// Calls admitted and not yet settled; settling removes the entry, which makes a second
    /// settlement of the same call a no-op.
    open_calls: HashMap<String, Reservation>,
    /// Usage by key, then agent.
    usage: HashMap<String, HashMap<String, UsageRow>>,
}

#[derive(Default)]
struct UsageRow {
    account: String,
    totals: UsageTotals,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// A config key as it stands: revoked once revoked, whatever the file says.
    fn config_key(
        &self,
        table: &KeyTable,
        hash: &KeyHash,
        record: &Arc<KeyRecord>,
    ) -> Arc<KeyRecord> {
        if table.revoked_config_keys.contains(hash) {
            record.as_revoked()
        } else {
            Arc::clone(record)
        }
    }
}

impl Ledger {
    /// The rate-limit state of a key and of an agent, and the accounts, borrowed together.
    fn limiters(
        &mut self,
        key_id: &str,
        agent: &str,
    ) -> (
        &mut LimiterState,
        &mut LimiterState,
        &mut HashMap<String, AccountState>,
    ) {
        (
            entry(&mut self.key_limits, key_id),
            entry(&mut self.agent_limits, agent),
            &mut self.accounts,
        )
    }
}

/// The entry for `id`, created empty on first sight; allocates only then.
fn entry<'m, V: Default>(map: &'m mut HashMap<String, V>, id: &str) -> &'m mut V {
    if !map.contains_key(id) {
        map.insert(id.to_owned(), V::default());
    }
    map.get_mut(id).expect("inserted above")
}

#[async_trait]
impl CallStore for MemoryStore {
    async fn key(&self, hash: &KeyHash) -> Result<Option<Arc<KeyRecord>>, StoreError> {
        let table = self.keys.load();
        if let Some(record) = self.config_keys.load().get(hash) {
            return Ok(Some(self.config_key(&table, hash, record)));
        }
        Ok(table.by_hash.get(hash).cloned())
    }

    async fn admit(&self, call: &Admission<'_>) -> Result<Result<Admitted, Refusal>, StoreError> {
        let mut ledger = self.ledger.lock();
        let (key, agent, accounts) = ledger.limiters(call.key_id, call.agent);
        let account = call.pricing.map(|_| entry(accounts, call.account));
        let decision = admission::admit(key, agent, account, call);
        if let Ok(admitted) = &decision {
            ledger
                .open_calls
                .insert(call.call_id.to_owned(), admitted.reservation);
        }
        Ok(decision)
    }

    fn quota(&self, call: &Admission<'_>) -> Option<Quota> {
        let ledger = self.ledger.lock();
        let key = ledger.key_limits.get(call.key_id);
        let agent = ledger.agent_limits.get(call.agent);
        admission::peek_quota(key, agent, call)
    }

    async fn extend(&self, call: &Extension<'_>) -> Result<Extended, StoreError> {
        let mut guard = self.ledger.lock();
        let ledger = &mut *guard;
        // Leases are a networked store's: in this process a call is open until settled.
        let Some(reservation) = ledger.open_calls.get_mut(call.call_id) else {
            return Ok(Extended::default());
        };
        let key = entry(&mut ledger.key_limits, call.key_id);
        let account = call
            .priced
            .then(|| entry(&mut ledger.accounts, call.account));
        Ok(admission::extend(
            key,
            account,
            &mut reservation.reserve,
            call,
        ))
    }

    async fn settle(&self, call: &Settlement<'_>) {
        let mut guard = self.ledger.lock();
        let ledger = &mut *guard;
        let Some(reservation) = ledger.open_calls.remove(call.call_id) else {
            return;
        };
        let call = Settlement {
            reservation,
            ..*call
        };
        let (key, agent, accounts) = ledger.limiters(call.key_id, call.agent);
        let priced = reservation.reserve != 0 || call.cost != 0;
        let account = priced.then(|| entry(accounts, call.account));
        admission::settle(key, agent, account, &call);
        if let Some(usage) = call.usage {
            let row = entry(entry(&mut ledger.usage, call.key_id), call.agent);
            if row.account.is_empty() {
                row.account = call.account.to_owned();
            }
            let totals = &mut row.totals;
            totals.requests += 1;
            totals.input_tokens += usage.input_tokens;
            totals.output_tokens += usage.output_tokens;
            totals.total_tokens += usage.total_tokens;
            totals.cost = totals.cost.saturating_add(call.cost);
        }
    }
}

#[async_trait]
impl AdminStore for MemoryStore {
    async fn key_by_id(&self, id: &str) -> Result<Option<Arc<KeyRecord>>, StoreError> {
        let table = self.keys.load();
        if let Some((hash, record)) = self.config_keys.load().by_id(id) {
            return Ok(Some(self.config_key(&table, &hash, record)));
        }
        Ok(table
            .by_id
            .get(id)
            .and_then(|hash| table.by_hash.get(hash))
            .cloned())
    }

    async fn create_key(&self, hash: KeyHash, record: KeyRecord) -> Result<bool, StoreError> {
        let _writer = self.key_writer.lock();
        if self.config_keys.load().claims(&hash, &record.id) {
            return Ok(false);
        }
        let mut table = KeyTable::clone(&self.keys.load());
        if table.by_id.contains_key(&record.id) || table.by_hash.contains_key(&hash) {
            return Ok(false);
        }
        table.insert(hash, record);
        self.keys.store(Arc::new(table));
        Ok(true)
    }

    async fn revoke_key(&self, id: &str) -> Result<bool, StoreError> {
        let _writer = self.key_writer.lock();
        let mut table = KeyTable::clone(&self.keys.load());
        let config = self.config_keys.load().by_id(id).map(|(hash, _)| hash);
        if let Some(hash) = config {
            table.revoked_config_keys.insert(hash);
        }
        // An admin-made key whose id a later config file took is revoked with it: the
        // config key hides it from every lookup by id, so this is its only way out.
        let made = table.by_id.get(id).copied();
        if let Some(record) = made.and_then(|hash| table.by_hash.get_mut(&hash)) {
            Arc::make_mut(record).revoked = true;
        }
        self.keys.store(Arc::new(table));
        Ok(config.is_some() || made.is_some())
    }

    async fn apply_config(
        &self,
        keys: &Arc<ConfigKeys>,
        accounts: &[AccountSeed],
    ) -> Result<(), StoreError> {
        self.config_keys.store(Arc::clone(keys));
        let mut ledger = self.ledger.lock();
        for seed in accounts {
            ledger
                .accounts
                .entry(seed.id.clone())
                .or_insert(AccountState {
                    balance: seed.balance,
                    reserved: 0,
                });
        }
        Ok(())
    }

    async fn balance(&self, account: &str) -> Result<Option<AccountState>, StoreError> {
        Ok(self.ledger.lock().accounts.get(account).copied())
    }

    async fn change_balance(
        &self,
        account: &str,
        change: BalanceChange,
    ) -> Result<BalanceOutcome, StoreError> {
        let mut ledger = self.ledger.lock();
        let Some(state) = ledger.accounts.get_mut(account) else {
            return Ok(BalanceOutcome::NoSuchAccount);
        };
        state.balance = match change {
            BalanceChange::Add(amount) => match state.balance.checked_add(amount) {
                Some(balance) => balance,
                None => return Ok(BalanceOutcome::WouldOverflow),
            },
            BalanceChange::Set(amount) => amount,
        };
        Ok(BalanceOutcome::Changed(*state))
    }

    async fn usage(&self, filter: &UsageFilter) -> Result<UsageTotals, StoreError> {
        let ledger = self.ledger.lock();
        let mut sum = UsageTotals::default();
        let matches =
            |wanted: &Option<String>, have: &str| wanted.as_deref().is_none_or(|w| w == have);
        for (key, by_agent) in &ledger.usage {
            for (agent, row) in by_agent {
                if matches(&filter.key, key)
                    && matches(&filter.agent, agent)
                    && matches(&filter.account, &row.account)
                {
                    sum.requests += row.totals.requests;
                    sum.input_tokens += row.totals.input_tokens;
                    sum.output_tokens += row.totals.output_tokens;
                    sum.total_tokens += row.totals.total_tokens;
                    sum.cost = sum.cost.saturating_add(row.totals.cost);
                }
            }
        }
        Ok(sum)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
