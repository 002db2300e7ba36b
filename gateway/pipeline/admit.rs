//! The one store call of a call: every rate limit, the concurrency slots and the balance,
//! judged and taken together. An admitted call leaves holding an [`OpenCall`].

use std::sync::Arc;

use turnpike_core::admission::{Admission, Refusal, ShadowHit};
use turnpike_core::limits::{retry_after_secs, Quota};

use super::ctx::CallIds;
use super::intake::{Authenticated, Caller, Chat};
use super::open_call::{Hold, OpenCall};
use super::reply::Refused;
use crate::error::GatewayError;
use crate::metrics::Metrics;
use crate::services::{Services, Snapshot};
use crate::store::CallStore;

/// A call the store admitted: everything the rest of the pipeline needs.
pub struct Admitted<'s> {
    pub caller: Caller<'s>,
    pub chat: Chat,
    /// The tightest request bucket after this call took its token.
    pub quota: Option<Quota>,
    pub open: OpenCall,
}

/// Asks the store to admit the call; a refusal carries the `RateLimit-*` numbers.
pub async fn admit<'s>(
    services: &Services,
    caller: Caller<'s>,
    chat: Chat,
    ids: &CallIds,
) -> Result<Admitted<'s>, Refused> {
    let agent = &caller.route.agent;
    // A stream renews its leases as it runs (`OpenCall::lease_keeper`).
    let lease = caller.route.pool.config.timeout + services.lease_grace;
    let lease_ms = lease.as_millis() as u64;
    let admission = Admission {
        call_id: &ids.call_id,
        key_id: &caller.key.id,
        account: &caller.key.account,
        agent: &agent.id,
        key_policy: caller.key_policy.as_deref(),
        agent_policy: agent.policy.as_deref(),
        pricing: agent.pricing.as_ref(),
        now_ms: services.clock.now_ms(),
        lease_ms,
    };
    let decision = services
        .store
        .admit(&admission)
        .await
        .map_err(|_| Refused {
            error: GatewayError::StoreUnavailable,
            quota: None,
        })?;
    let metrics = &services.metrics;
    match decision {
        Ok(admitted) => {
            count_shadow(metrics, &agent.id, &admitted.shadow_hits);
            let store: Arc<dyn CallStore> = services.store.clone();
            let hold = Hold {
                call_id: ids.call_id.clone(),
                request_id: ids.request_id.clone(),
                session_id: chat.session_id.clone(),
                key: Arc::clone(&caller.key),
                agent: Arc::clone(agent),
                key_policy: caller.key_policy.clone(),
                reservation: admitted.reservation,
                lease_ms,
            };
            let open = OpenCall::new(store, services.clock, hold);
            Ok(Admitted {
                caller,
                chat,
                quota: admitted.quota,
                open,
            })
        }
        Err(Refusal::RateLimited {
            scope,
            bucket,
            retry_after_ms,
            rule,
            quota,
            shadow_hits,
        }) => {
            count_shadow(metrics, &agent.id, &shadow_hits);
            metrics
                .rate_limited
                .with_label_values(&[&agent.id, bucket.label(), scope.label(), "false"])
                .inc();
            Err(Refused {
                error: GatewayError::RateLimited {
                    bucket,
                    rule,
                    retry_after_secs: retry_after_secs(retry_after_ms),
                },
                quota,
            })
        }
        Err(Refusal::InsufficientBalance { quota, shadow_hits }) => {
            count_shadow(metrics, &agent.id, &shadow_hits);
            metrics
                .insufficient_balance
                .with_label_values(&[&agent.id])
                .inc();
            Err(Refused {
                error: GatewayError::InsufficientBalance,
                quota,
            })
        }
    }
}

/// The `RateLimit-*` numbers of an authenticated call refused before admission, as this
/// instance knows them: read without taking anything, and without a store round trip.
pub fn known_quota(
    services: &Services,
    snapshot: &Snapshot,
    caller: &Authenticated<'_>,
) -> Option<Quota> {
    let key = &caller.key;
    let key_policy = snapshot.config.policies.get(&key.policy);
    let agent = caller
        .route
        .map(|r| &r.agent)
        .filter(|a| key.agents.allows(&a.id));
    let probe = Admission {
        call_id: "",
        key_id: &key.id,
        account: &key.account,
        agent: agent.map_or("", |a| a.id.as_str()),
        key_policy: key_policy.map(|p| p.as_ref()),
        agent_policy: agent.and_then(|a| a.policy.as_deref()),
        pricing: None,
        now_ms: services.clock.now_ms(),
        lease_ms: 0,
    };
    services.store.quota(&probe)
}

fn count_shadow(metrics: &Metrics, agent: &str, hits: &[ShadowHit]) {
    for hit in hits {
        metrics
            .rate_limited
            .with_label_values(&[agent, hit.bucket.label(), hit.scope.label(), "true"])
            .inc();
    }
}
