//! What every call and the admin API share: the config in force, the store, the metrics,
//! the connections to workers and the clock.

use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::Arc;

use crate::clock::Clock;
use crate::config::{Agent, CallConfig, InvalidUsageRule};
use crate::lifecycle::Lifecycle;
use crate::metrics::{AgentSeries, Metrics, ZERO_AGENTS_MAX};
use crate::store::Store;
use crate::upstream::{build_pools, Pool, Upstreams};

pub struct Services {
    snapshot: ArcSwap<Snapshot>,
    pub store: Arc<dyn Store>,
    pub metrics: Metrics,
    pub upstreams: Upstreams,
    pub clock: Clock,
    /// Whether the gateway is draining, and what is in flight.
    pub lifecycle: Lifecycle,
    /// `store.lease_grace`: how much longer than its pool's `timeout` a call is leased.
    pub lease_grace: std::time::Duration,
}

impl Services {
    pub fn new(
        snapshot: Snapshot,
        store: Arc<dyn Store>,
        metrics: Metrics,
        lease_grace: std::time::Duration,
    ) -> Self {
        metrics.config_generation.set(snapshot.generation as i64);
        zero_agents(&metrics, &snapshot.config);
        Self {
            snapshot: ArcSwap::from_pointee(snapshot),
            store,
            lifecycle: Lifecycle::new(
                metrics.draining.clone(),
                metrics.open_connections.clone(),
                metrics.inflight.clone(),
            ),
            metrics,
            upstreams: Upstreams::default(),
            clock: Clock::start(),
            lease_grace,
        }
    }

    /// The config in force now. A call takes it once and uses it to the end, so a reload
    /// never changes the rules under a call in flight.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Puts a new config in force for every call that starts from now on.
    pub fn put_in_force(&self, snapshot: Snapshot) {
        self.metrics
            .config_generation
            .set(snapshot.generation as i64);
        zero_agents(&self.metrics, &snapshot.config);
        let old = self.snapshot.swap(Arc::new(snapshot));
        forget_removed_endpoints(&self.metrics, &old.config, &self.snapshot.load().config);
    }
}

/// The endpoint series of pools or endpoints the new config no longer has. (An agent's
/// counters stay: a counter that stops moving alerts on nothing.)
fn forget_removed_endpoints(metrics: &Metrics, old: &CallConfig, new: &CallConfig) {
    for (name, pool) in &old.pools {
        let kept = new.pools.get(name).map(|p| &p.endpoints);
        for endpoint in &pool.endpoints {
            if !kept.is_some_and(|k| k.contains(endpoint)) {
                metrics.forget_endpoint(name, &endpoint.to_string());
            }
        }
    }
}

/// The configured agents' series at zero, unless there are too many for that to be cheap.
fn zero_agents(metrics: &Metrics, config: &CallConfig) {
    if config.agents.len() > ZERO_AGENTS_MAX {
        return;
    }
    for agent in config.agents.values() {
        let rule = config.pools.get(&agent.pool).map(|p| p.on_invalid_usage);
        let action = match rule.unwrap_or_default() {
            InvalidUsageRule::Reject => "rejected",
            InvalidUsageRule::ChargeReserve => "charged_reserve",
        };
        metrics.zero_agent(&agent.id, action);
    }
}

/// One consistent view of the config and the pools built from it.
pub struct Snapshot {
    /// Counts the configs put in force since start, this one included.
    pub generation: u64,
    pub config: CallConfig,
    routes: HashMap<String, Route>,
}

/// Where calls to one agent go: every configured agent has a pool, by construction.
pub struct Route {
    pub agent: Arc<Agent>,
    pub pool: Arc<Pool>,
    /// The agent's per-call counters, resolved on first use under this config.
    pub series: Arc<AgentSeries>,
}

impl Snapshot {
    /// Builds the pools of `config` and resolves each agent to its pool.
    pub fn build(config: CallConfig, generation: u64, metrics: &Metrics) -> std::io::Result<Self> {
        let pools = build_pools(&config.pools, metrics)?;
        let mut routes = HashMap::with_capacity(config.agents.len());
        for (id, agent) in &config.agents {
            let pool = pools.get(&agent.pool).cloned().ok_or_else(|| {
                std::io::Error::other(format!("agent {id}: no upstream named '{}'", agent.pool))
            })?;
            let agent = Arc::clone(agent);
            let series = Arc::default();
            routes.insert(
                id.clone(),
                Route {
                    agent,
                    pool,
                    series,
                },
            );
        }
        Ok(Self {
            generation,
            config,
            routes,
        })
    }

    /// The route of a configured agent.
    pub fn route(&self, agent_id: &str) -> Option<&Route> {
        self.routes.get(agent_id)
    }
}
