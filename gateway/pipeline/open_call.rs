//! An admitted call's hold on the store — its reservation and concurrency slots — until it
//! is settled, exactly once. [`OpenCall::settle`] consumes it; an `OpenCall` dropped
//! unsettled (a panic, a cancelled task) settles itself in the background: released without
//! a charge, or with the charge it last knew (a running stream's, [`OpenCall::note`]; a
//! settlement's that had begun). No slot or reservation is ever kept by a call that is gone,
//! and no charge is lost by a cut-short one.

use std::sync::Arc;

use turnpike_core::admission::{Extended, Extension, Reservation, Settlement};
use turnpike_core::billing::cost;
use turnpike_core::keys::KeyRecord;
use turnpike_core::limits::Policy;
use turnpike_core::usage::Usage;

use crate::clock::Clock;
use crate::config::Agent;
use crate::store::{CallStore, StoreError};

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
    /// How long the store holds the call's slots and reservation unless renewed.
    pub lease_ms: u64,
}

/// What a finished call is charged for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Bill {
    /// No usage (an error, a timeout, an answer without `usage`): released, nothing charged.
    #[default]
    Nothing,
    /// A complete 2xx answer's valid usage, at the agent's prices.
    Usage(Usage),
    /// An invalid usage let through by `on_invalid_usage: charge_reserve`: the agent's
    /// reservation, recorded with zero tokens since the worker's counts cannot be trusted.
    Reserve,
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

    /// Settles the call as `bill` says, or, with nothing to bill, only releases it. Returns
    /// the usage recorded and what it was charged.
    pub async fn settle(mut self, bill: Bill, worker_status: u16) -> (Option<Usage>, i64) {
        // Recorded first: were this future dropped while the store works, `drop` sends the
        // same settlement again, and the store applies whichever arrives first, once.
        self.note(bill, worker_status);
        let settlement = self.hold.settlement(&self.charge, self.clock.now_ms());
        self.store.settle(&settlement).await;
        self.settled = true;
        (self.charge.usage, self.charge.cost)
    }

    /// What the call would be charged were it dropped now: a running stream notes its usage
    /// as it grows, so a stream cut short by a cancelled task is still charged it.
    pub fn note(&mut self, bill: Bill, worker_status: u16) {
        let pricing = self.hold.agent.pricing.as_ref();
        let (usage, cost) = match bill {
            Bill::Nothing => (None, 0),
            Bill::Usage(usage) => (Some(usage), pricing.map_or(0, |p| cost(&usage, p))),
            Bill::Reserve => (Some(Usage::default()), pricing.map_or(0, |p| p.reserve)),
        };
        self.charge = Charge {
            usage,
            cost,
            worker_status,
        };
    }
}

impl OpenCall {
    /// What the call holds of its account now.
    pub fn held(&self) -> i64 {
        self.hold.reservation.reserve
    }

    /// A stream still running asks to hold `hold_to` in all and renews its leases (see
    /// [`CallStore::extend`]).
    pub async fn extend(&mut self, hold_to: i64) -> Result<Extended, StoreError> {
        let extension = Extension {
            hold_to,
            now_ms: self.clock.now_ms(),
            ..self.hold.extension()
        };
        let extended = self.store.extend(&extension).await?;
        self.hold.reservation.reserve = self.hold.reservation.reserve.max(extended.held);
        Ok(extended)
    }

    /// What renews the call's leases while a stream runs, apart from the stream's own work.
    pub fn lease_keeper(&self) -> LeaseKeeper {
        LeaseKeeper {
            store: Arc::clone(&self.store),
            clock: self.clock,
            hold: self.hold.clone(),
        }
    }
}

/// Renews a running stream's leases at half their length, so none runs out under it (a
/// networked store sweeps the holds and slots of calls whose instance died).
pub struct LeaseKeeper {
    store: Arc<dyn CallStore>,
    clock: Clock,
    hold: Hold,
}

impl LeaseKeeper {
    /// Runs until dropped. The first renewal is at once: the lease began at admission, and
    /// the stream's head may have taken most of it.
    pub async fn keep(self) -> std::convert::Infallible {
        // Never busier than ten times a second, however short the lease.
        let every = std::time::Duration::from_millis(self.hold.lease_ms / 2)
            .max(std::time::Duration::from_millis(100));
        loop {
            let hold = &self.hold;
            // A total of 0 grows nothing: only the leases are renewed.
            let renewal = Extension {
                hold_to: 0,
                now_ms: self.clock.now_ms(),
                ..hold.extension()
            };
            match self.store.extend(&renewal).await {
                Ok(renewed) if renewed.held == 0 && hold.reservation.reserve > 0 => {
                    tracing::warn!(request_id = %hold.request_id, "a stream's hold was gone when its lease was renewed");
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(request_id = %hold.request_id, %error, "could not renew a stream's leases");
                }
            }
            tokio::time::sleep(every).await;
        }
    }
}

impl Hold {
    /// This call's extension, holding nothing more, as of time 0.
    fn extension(&self) -> Extension<'_> {
        Extension {
            call_id: &self.call_id,
            key_id: &self.key.id,
            account: &self.key.account,
            agent: &self.agent.id,
            key_policy: self.key_policy.as_deref(),
            agent_policy: self.agent.policy.as_deref(),
            reservation: self.reservation,
            priced: self.agent.pricing.is_some(),
            hold_to: 0,
            now_ms: 0,
            lease_ms: self.lease_ms,
        }
    }

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
    use turnpike_core::admission::{Admission, Admitted, Extended, Extension, Refusal};
    use turnpike_core::billing::Pricing;
    use turnpike_core::keys::{AgentScope, KeyHash};
    use turnpike_core::limits::Quota;

    use crate::config::AccountSeed;
    use crate::store::{AdminStore, MemoryStore, StoreError, UsageFilter};

    /// One key of account `acct` calling one priced agent, with or without a key policy.
    struct Caller {
        key: Arc<KeyRecord>,
        agent: Arc<Agent>,
        policy: Option<Arc<Policy>>,
    }

    impl Caller {
        fn new(pricing: Pricing, policy: Option<Policy>) -> Self {
            let policy = policy.map(Arc::new);
            Self {
                key: Arc::new(KeyRecord {
                    id: "key_1".into(),
                    account: "acct".into(),
                    agents: AgentScope::All,
                    policy: policy.as_ref().map_or(String::new(), |p| p.name.clone()),
                    expires_at: None,
                    revoked: false,
                }),
                agent: Arc::new(Agent {
                    id: "ag_priced".into(),
                    pool: "pool".into(),
                    policy: None,
                    pricing: Some(pricing),
                    on_exhaustion: Default::default(),
                }),
                policy,
            }
        }

        fn admission<'a>(&'a self, call_id: &'a str) -> Admission<'a> {
            Admission {
                call_id,
                key_id: &self.key.id,
                account: &self.key.account,
                agent: &self.agent.id,
                key_policy: self.policy.as_deref(),
                agent_policy: None,
                pricing: self.agent.pricing.as_ref(),
                now_ms: 0,
                lease_ms: 60_000,
            }
        }

        /// Admits `call_id` on `store` and returns the call's open hold on it.
        async fn open(&self, store: Arc<dyn CallStore>, call_id: &str) -> OpenCall {
            let admitted = store.admit(&self.admission(call_id)).await.unwrap();
            let hold = Hold {
                call_id: call_id.into(),
                request_id: "req_a".into(),
                session_id: "s".into(),
                key: Arc::clone(&self.key),
                agent: Arc::clone(&self.agent),
                key_policy: self.policy.clone(),
                reservation: admitted.expect("admitted").reservation,
                lease_ms: 60_000,
            };
            OpenCall::new(store, Clock::start(), hold)
        }
    }

    async fn with_account(store: &MemoryStore, balance: i64) {
        let account = AccountSeed {
            id: "acct".into(),
            balance,
        };
        store
            .apply_config(&Default::default(), &[account])
            .await
            .unwrap();
    }

    /// Lets the tasks a drop spawned run.
    async fn let_background_work_run() {
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_call_dropped_while_admitted_gives_back_its_reservation_and_slot() {
        let store = Arc::new(MemoryStore::new());
        with_account(&store, 10).await;
        let one_at_a_time = Policy {
            name: "one_at_a_time".into(),
            requests: None,
            tokens: None,
            concurrency: Some(1),
            mode: Default::default(),
        };
        let pricing = Pricing {
            input_per_mtok: 1,
            output_per_mtok: 1,
            reserve: 10,
        };
        let caller = Caller::new(pricing, Some(one_at_a_time));
        let open = caller.open(store.clone(), "call_a").await;
        let refused = store.admit(&caller.admission("call_b")).await.unwrap();
        assert!(refused.is_err(), "slot and balance are held");

        drop(open);
        let_background_work_run().await;
        let account = store.balance("acct").await.unwrap().unwrap();
        assert_eq!(
            (account.balance, account.reserved),
            (10, 0),
            "released, not charged"
        );
        let again = store.admit(&caller.admission("call_c")).await.unwrap();
        assert!(again.is_ok(), "the slot is free again");
    }

    /// The real store, except that the first settlement never finishes: as if the task
    /// running it were cancelled while Redis worked.
    struct FirstSettleStalls {
        store: MemoryStore,
        stalled: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl CallStore for FirstSettleStalls {
        async fn key(&self, hash: &KeyHash) -> Result<Option<Arc<KeyRecord>>, StoreError> {
            self.store.key(hash).await
        }

        async fn admit(
            &self,
            call: &Admission<'_>,
        ) -> Result<Result<Admitted, Refusal>, StoreError> {
            self.store.admit(call).await
        }

        fn quota(&self, call: &Admission<'_>) -> Option<Quota> {
            self.store.quota(call)
        }

        async fn extend(&self, call: &Extension<'_>) -> Result<Extended, StoreError> {
            self.store.extend(call).await
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
        with_account(&store.store, 100).await;
        let pricing = Pricing {
            input_per_mtok: 1_000_000,
            output_per_mtok: 1_000_000,
            reserve: 10,
        };
        let open = Caller::new(pricing, None)
            .open(store.clone(), "call_a")
            .await;
        let usage = Usage {
            input_tokens: 3,
            output_tokens: 4,
            total_tokens: 7,
        };
        let cut_short = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            open.settle(Bill::Usage(usage), 200),
        )
        .await;
        assert!(cut_short.is_err(), "the first settlement stalls");
        let_background_work_run().await;
        let account = store.store.balance("acct").await.unwrap().unwrap();
        assert_eq!(
            (account.balance, account.reserved),
            (93, 0),
            "settled in the background with its charge"
        );
        let used = store.store.usage(&UsageFilter::default()).await.unwrap();
        assert_eq!((used.requests, used.total_tokens, used.cost), (1, 7, 7));
    }
}
