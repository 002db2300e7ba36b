//! An admitted call's hold on the store — its reservation and concurrency slots — until it
//! is settled, exactly once. [`OpenCall::settle`] consumes it; an `OpenCall` dropped
//! unsettled (a panic, a cancelled task) settles itself in the background: released without
//! a charge, or, when its settlement had begun, with that settlement's charge. No slot or
//! reservation is ever kept by a call that is gone, and no charge is lost by a cut-short one.

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

/// What a settlement under way charges, kept so that one cut short is finished the same way.
#[derive(Clone, Copy, Default)]
struct Charge {
    usage: Option<Usage>,
    cost: i64,
    worker_status: u16,
}

pub struct OpenCall {
    store: Arc<dyn CallStore>,
    clock: Clock,
    hold: Hold,
    charge: Charge,
    settled: bool,
}

impl OpenCall {
    pub fn new(store: Arc<dyn CallStore>, clock: Clock, hold: Hold) -> Self {
        Self {
            store,
            clock,
            hold,
            charge: Charge::default(),
            settled: false,
        }
    }

    /// Settles the call: charged for `usage` (a complete 2xx answer's valid usage) at the
    /// agent's prices, or, without usage, only released. Returns what it was charged.
    pub async fn settle(mut self, usage: Option<Usage>, worker_status: u16) -> i64 {
        let cost = match (usage, self.hold.agent.pricing.as_ref()) {
            (Some(usage), Some(pricing)) => cost(&usage, pricing),
            _ => 0,
        };
        // Recorded first: were this future dropped while the store works, `drop` sends the
        // same settlement again, and the store applies whichever arrives first, once.
        self.charge = Charge {
            usage,
            cost,
            worker_status,
        };
        let settlement = self.hold.settlement(&self.charge, self.clock.now_ms());
        self.store.settle(&settlement).await;
        self.settled = true;
        cost
    }
}

impl Hold {
    /// The settlement of this call: it gives back what admission took and charges `charge`
    /// (nothing, by default).
    fn settlement(&self, charge: &Charge, now_ms: u64) -> Settlement<'_> {
        Settlement {
            call_id: &self.call_id,
            key_id: &self.key.id,
            account: &self.key.account,
            agent: &self.agent.id,
            key_policy: self.key_policy.as_deref(),
            agent_policy: self.agent.policy.as_deref(),
            reservation: self.reservation,
            usage: charge.usage,
            cost: charge.cost,
            now_ms,
            request_id: &self.request_id,
            session_id: &self.session_id,
            status: charge.worker_status,
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
        tracing::warn!(request_id = %self.hold.request_id, "call ended unsettled; settling it in the background");
        let (store, clock, hold, charge) = (
            Arc::clone(&self.store),
            self.clock,
            self.hold.clone(),
            self.charge,
        );
        runtime.spawn(async move {
            store
                .settle(&hold.settlement(&charge, clock.now_ms()))
                .await;
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

    /// The real store, except that the first settlement never finishes: as if the task
    /// running it were cancelled while Redis worked.
    struct FirstSettleStalls {
        store: MemoryStore,
        stalled: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl CallStore for FirstSettleStalls {
        async fn key(
            &self,
            hash: &turnpike_core::keys::KeyHash,
        ) -> Result<Option<Arc<KeyRecord>>, crate::store::StoreError> {
            self.store.key(hash).await
        }

        async fn admit(
            &self,
            call: &Admission<'_>,
        ) -> Result<
            Result<turnpike_core::admission::Admitted, turnpike_core::admission::Refusal>,
            crate::store::StoreError,
        > {
            self.store.admit(call).await
        }

        async fn quota(
            &self,
            call: &Admission<'_>,
        ) -> Result<Option<turnpike_core::limits::Quota>, crate::store::StoreError> {
            self.store.quota(call).await
        }

        async fn settle(&self, call: &Settlement<'_>) {
            if !self.stalled.swap(true, std::sync::atomic::Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            self.store.settle(call).await
        }
    }

    #[tokio::test]
    async fn a_settlement_cut_short_is_finished_with_its_charge() {
        let store = Arc::new(FirstSettleStalls {
            store: MemoryStore::new(),
            stalled: Default::default(),
        });
        let account = AccountSeed {
            id: "acct".into(),
            balance: 100,
        };
        store.store.seed(&[], &[account]).await.unwrap();
        let pricing = Pricing {
            input_per_mtok: 1_000_000,
            output_per_mtok: 1_000_000,
            reserve: 10,
        };
        let agent = Arc::new(Agent {
            id: "ag_priced".into(),
            pool: "pool".into(),
            policy: None,
            pricing: Some(pricing),
        });
        let key = Arc::new(KeyRecord {
            id: "key_1".into(),
            account: "acct".into(),
            agents: AgentScope::All,
            policy: String::new(),
            expires_at: None,
            revoked: false,
        });
        let admission = Admission {
            call_id: "call_a",
            key_id: &key.id,
            account: &key.account,
            agent: &agent.id,
            key_policy: None,
            agent_policy: None,
            pricing: Some(&pricing),
            now_ms: 0,
            lease_ms: 60_000,
        };
        let admitted = store.admit(&admission).await.unwrap().unwrap();
        let open = OpenCall::new(
            store.clone(),
            Clock::start(),
            Hold {
                call_id: "call_a".into(),
                request_id: "req_a".into(),
                session_id: "s".into(),
                key: Arc::clone(&key),
                agent: Arc::clone(&agent),
                key_policy: None,
                reservation: admitted.reservation,
            },
        );
        let usage = Usage {
            input_tokens: 3,
            output_tokens: 4,
            total_tokens: 7,
        };
        let cut_short = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            open.settle(Some(usage), 200),
        )
        .await;
        assert!(cut_short.is_err(), "the first settlement stalls");
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        let account = store.store.balance("acct").await.unwrap().unwrap();
        assert_eq!(
            (account.balance, account.reserved),
            (93, 0),
            "settled in the background with its charge"
        );
        let used = store
            .store
            .usage(&crate::store::UsageFilter::default())
            .await
            .unwrap();
        assert_eq!((used.requests, used.total_tokens, used.cost), (1, 7, 7));
    }
}
