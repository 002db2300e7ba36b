//! `on_unavailable: fail_open`: while Redis cannot be asked, calls are judged on this
//! instance's own buckets (same policies, no balance check), and keys made through the admin
//! API are recognised from what this instance last knew (config keys always are: they are
//! read from the file). Every such admission is logged and counted.

use parking_lot::Mutex;
use prometheus::IntCounter;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};

use turnpike_core::admission::{Admission, Admitted, Refusal, Settlement};

use crate::store::{CallStore, MemoryStore, StoreError};

pub struct FailOpen {
    /// The operator chose availability over the balance check.
    pub enabled: bool,
    /// The buckets enforced while Redis is down.
    local: MemoryStore,
    /// Calls admitted on `local` and not yet settled.
    local_calls: Mutex<HashSet<String>>,
    /// How many of those there are, read without the lock on every settlement.
    local_open: AtomicUsize,
    admissions: IntCounter,
}

impl FailOpen {
    pub fn new(enabled: bool, admissions: IntCounter) -> Self {
        Self {
            enabled,
            local: MemoryStore::new(),
            local_calls: Mutex::new(HashSet::new()),
            local_open: AtomicUsize::new(0),
            admissions,
        }
    }

    /// Admits on this instance's own buckets, skipping the balance.
    pub async fn admit(
        &self,
        call: &Admission<'_>,
    ) -> Result<Result<Admitted, Refusal>, StoreError> {
        let unpriced = Admission {
            pricing: None,
            ..*call
        };
        let decision = self.local.admit(&unpriced).await?;
        if decision.is_ok() {
            self.admissions.inc();
            self.local_calls.lock().insert(call.call_id.to_owned());
            self.local_open.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                call_id = call.call_id,
                key_id = call.key_id,
                agent = call.agent,
                "admitted without Redis (fail_open): local limits, no balance check"
            );
        }
        Ok(decision)
    }

    /// Gives back the local buckets' slots of a call admitted here; the call is still
    /// settled in Redis as well (its usage and cost belong to the shared ledger).
    pub async fn settle(&self, call: &Settlement<'_>) {
        if self.local_open.load(Ordering::Relaxed) > 0
            && self.local_calls.lock().remove(call.call_id)
        {
            self.local_open.fetch_sub(1, Ordering::Relaxed);
            self.local.settle(call).await;
        }
    }
}
