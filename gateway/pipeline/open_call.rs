//! An admitted call's hold on the store — its reservation and concurrency slots — until it
//! is settled, exactly once. [`OpenCall::settle`] consumes it; an `OpenCall` dropped
//! unsettled (a panic, a cancelled task) settles itself in the background, without a charge,
//! so no slot or reservation is ever kept by a call that is gone.

use std::sync::Arc;

use turnpike_core::admission::{Reservation, Settlement};
use turnpike_core::billing::cost;
use turnpike_core::keys::KeyRecord;
use turnpike_core::limits::Policy;
use turnpike_core::usage::Usage;

use crate::clock::Clock;
use crate::config::Agent;
use crate::store::CallStore;

/// What an admitted call holds, and what its settlement must name.
#[derive(Clone)]
pub struct Hold {
    /// Unique per call, made by the gateway; the store settles each call id once.
    pub call_id: String,
    pub request_id: String,
    pub session_id: String,
    pub key: Arc<KeyRecord>,
    pub agent: Arc<Agent>,
    pub key_policy: Option<Arc<Policy>>,
    pub reservation: Reservation,
}

pub struct OpenCall {
    store: Arc<dyn CallStore>,
    clock: Clock,
    hold: Hold,
    settled: bool,
}

impl OpenCall {
    pub fn new(store: Arc<dyn CallStore>, clock: Clock, hold: Hold) -> Self {
        Self {
            store,
            clock,
            hold,
            settled: false,
        }
    }

    /// Settles the call: charged for `usage` (a complete 2xx answer's valid usage) at the
    /// agent's prices, or, without usage, only released. Returns what it was charged.
    pub async fn settle(mut self, usage: Option<Usage>, worker_status: u16) -> i64 {
        let hold = &self.hold;
        let charge = match (usage, hold.agent.pricing.as_ref()) {
            (Some(usage), Some(pricing)) => cost(&usage, pricing),
            _ => 0,
        };
        let settlement = Settlement {
            usage,
            cost: charge,
            status: worker_status,
            ..hold.release(self.clock.now_ms())
        };
        self.store.settle(&settlement).await;
        // Only now: were this future dropped while the store worked, `drop` would still
        // release (a settlement already applied makes the release a no-op).
        self.settled = true;
        charge
    }
}

impl Hold {
    /// The settlement that gives back what admission took and charges nothing.
    fn release(&self, now_ms: u64) -> Settlement<'_> {
        Settlement {
            call_id: &self.call_id,
            key_id: &self.key.id,
            account: &self.key.account,
            agent: &self.agent.id,
            key_policy: self.key_policy.as_deref(),
            agent_policy: self.agent.policy.as_deref(),
            reservation: self.reservation,
            usage: None,
            cost: 0,
            now_ms,
            request_id: &self.request_id,
            session_id: &self.session_id,
            status: 0,
        }
    }
}

impl Drop for OpenCall {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        tracing::warn!(request_id = %self.hold.request_id, "call ended unsettled; releasing its reservation");
        let (store, clock, hold) = (Arc::clone(&self.store), self.clock, self.hold.clone());
        runtime.spawn(async move {
            store.settle(&hold.release(clock.now_ms())).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use turnpike_core::admission::Admission;
    use turnpike_core::billing::Pricing;
    use turnpike_core::keys::AgentScope;

    use crate::config::AccountSeed;
    use crate::store::{AdminStore, MemoryStore};

    #[tokio::test]
    async fn a_call_dropped_while_admitted_gives_back_its_reservation_and_slot() {
        let store = Arc::new(MemoryStore::new());
        let account = AccountSeed {
            id: "acct".into(),
            balance: 10,
        };
        store.seed(&[], &[account]).await.unwrap();
        let policy = Arc::new(Policy {
            name: "one_at_a_time".into(),
            requests: None,
            tokens: None,
            concurrency: Some(1),
            mode: Default::default(),
        });
        let agent = Arc::new(Agent {
            id: "ag_priced".into(),
            pool: "pool".into(),
            policy: None,
            pricing: Some(Pricing {
                input_per_mtok: 1,
                output_per_mtok: 1,
                reserve: 10,
            }),
        });
        let key = Arc::new(KeyRecord {
            id: "key_1".into(),
            account: "acct".into(),
            agents: AgentScope::All,
            policy: "one_at_a_time".into(),
            expires_at: None,
            revoked: false,
        });
        let admit = |call_id: &'static str| {
            let (store, key, agent, policy) = (
                Arc::clone(&store),
                Arc::clone(&key),
                Arc::clone(&agent),
                Arc::clone(&policy),
            );
            async move {
                let admission = Admission {
                    call_id,
                    key_id: &key.id,
                    account: &key.account,
                    agent: &agent.id,
                    key_policy: Some(&policy),
                    agent_policy: None,
                    pricing: agent.pricing.as_ref(),
                    now_ms: 0,
                    lease_ms: 60_000,
                };
                store.admit(&admission).await.unwrap()
            }
        };
        let admitted = admit("call_a").await.expect("the first call is admitted");
        assert!(admit("call_b").await.is_err(), "slot and balance are held");

        let open = OpenCall::new(
            store.clone(),
            Clock::start(),
            Hold {
                call_id: "call_a".into(),
                request_id: "req_a".into(),
                session_id: "s".into(),
                key: Arc::clone(&key),
                agent: Arc::clone(&agent),
                key_policy: Some(Arc::clone(&policy)),
                reservation: admitted.reservation,
            },
        );
        drop(open);
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        let account = store.balance("acct").await.unwrap().unwrap();
        assert_eq!(
            (account.balance, account.reserved),
            (10, 0),
            "released, not charged"
        );
        assert!(admit("call_c").await.is_ok(), "the slot is free again");
    }
}
