//! The end of every call: settle with the store exactly once, count it, and write its
//! access-log line (which, with account, session, tokens and cost, is also the embedded
//! store's usage log). Settlement runs as soon as the worker's answer is read, before the
//! client is written to (a slow or vanished client cannot delay or lose it); Pingora's
//! `logging` phase, which runs however a call ended, settles whatever is still open.

use crate::admission::Settlement;
use crate::auth::KeyRecord;
use crate::billing::cost;
use crate::config::Agent;
use crate::ctx::{Call, RequestCtx};
use crate::state::Shared;

/// Settles an admitted call: charges it when a complete 2xx answer carried valid usage,
/// otherwise only releases what admission took. Does nothing the second time.
pub async fn settle(shared: &Shared, ctx: &mut RequestCtx) {
    let (Some(call), Some(key), Some(agent)) =
        (ctx.call.as_mut(), ctx.key.as_ref(), ctx.agent.as_ref())
    else {
        return;
    };
    let Some(call_id) = call.call_id.take() else {
        return;
    };
    let usage = ctx.usage;
    let charge = match (usage, agent.pricing.as_ref()) {
        (Some(usage), Some(pricing)) => cost(&usage, pricing),
        _ => 0,
    };
    let settlement = Settlement {
        usage,
        cost: charge,
        ..release(&call_id, &ctx.request_id, call, key, agent, shared.now_ms())
    };
    let metrics = &shared.metrics;
    if let Err(error) = shared.store.settle(&settlement).await {
        tracing::error!(request_id = %ctx.request_id, %error, "settlement failed");
        // Still open: the logging phase tries again, and a dropped call releases it.
        call.call_id = Some(call_id);
        return;
    }
    let Some(usage) = usage else { return };
    ctx.cost = charge;
    let agent = agent.id.as_str();
    metrics
        .tokens
        .with_label_values(&[agent, "input"])
        .inc_by(usage.input_tokens);
    metrics
        .tokens
        .with_label_values(&[agent, "output"])
        .inc_by(usage.output_tokens);
    if charge > 0 {
        metrics
            .cost
            .with_label_values(&[agent])
            .inc_by(charge as u64);
    }
}

/// Runs once per call in Pingora's `logging` phase, with the status the client was sent
/// (0 when nothing could be sent).
pub async fn finish(shared: &Shared, ctx: &mut RequestCtx, status: u16) {
    settle(shared, ctx).await;
    let metrics = &shared.metrics;
    if ctx.counted_inflight {
        metrics.inflight.dec();
        ctx.counted_inflight = false;
    }
    let status = http::StatusCode::from_u16(status).ok();
    let status_label = status.as_ref().map_or("0", |s| s.as_str());
    let agent = ctx.agent_label();
    metrics
        .requests
        .with_label_values(&[agent, status_label])
        .inc();
    metrics
        .request_duration
        .observe(ctx.started.elapsed().as_secs_f64());
    if let Some(started) = ctx.upstream_started {
        metrics
            .upstream_duration
            .observe(started.elapsed().as_secs_f64());
    }
    if let Some(reason) = ctx.refusal.as_ref().and_then(|e| e.auth_failure_reason()) {
        metrics.auth_failures.with_label_values(&[reason]).inc();
    }

    let (input, output) = ctx
        .usage
        .map_or((0, 0), |u| (u.input_tokens, u.output_tokens));
    tracing::info!(
        target: "access",
        request_id = %ctx.request_id,
        agent,
        key_id = ctx.key.as_ref().map_or("", |k| k.id.as_str()),
        account = ctx.key.as_ref().map_or("", |k| k.account.as_str()),
        session_id = ctx.call.as_ref().map_or("", |c| c.session_id.as_str()),
        status = status_label,
        error = ctx.refusal.as_ref().map_or("", |e| e.code()),
        duration_ms = ctx.started.elapsed().as_millis() as u64,
        upstream_ms = ctx.upstream_started.map_or(0, |s| s.elapsed().as_millis() as u64),
        input_tokens = input,
        output_tokens = output,
        cost = ctx.cost,
    );
}

/// The settlement that gives back what admission took and charges nothing.
fn release<'a>(
    call_id: &'a str,
    request_id: &'a str,
    call: &'a Call,
    key: &'a KeyRecord,
    agent: &'a Agent,
    now_ms: u64,
) -> Settlement<'a> {
    Settlement {
        call_id,
        key_id: &key.id,
        account: &key.account,
        agent: &agent.id,
        key_policy: call.key_policy.as_deref(),
        agent_policy: agent.policy.as_deref(),
        reservation: call.reservation,
        usage: None,
        cost: 0,
        now_ms,
        request_id,
        session_id: &call.session_id,
        status: call.worker_status,
    }
}

/// Releases what an abandoned call holds, without charging it, on a background task.
pub fn release_abandoned(ctx: &mut RequestCtx) {
    let Some(call_id) = ctx.call.as_mut().and_then(|call| call.call_id.take()) else {
        return;
    };
    let (Some(call), Some(key), Some(agent)) = (ctx.call.take(), ctx.key.take(), ctx.agent.take())
    else {
        return;
    };
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let shared = std::sync::Arc::clone(&ctx.shared);
    let request_id = std::mem::take(&mut ctx.request_id);
    tracing::warn!(%request_id, "call ended unsettled; releasing its reservation");
    runtime.spawn(async move {
        let release = release(&call_id, &request_id, &call, &key, &agent, shared.now_ms());
        // A failure is the store's to count and retry.
        let _ = shared.store.settle(&release).await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::Admission;
    use crate::state::Snapshot;
    use crate::store::MemoryStore;
    use std::sync::Arc;

    const CONFIG: &str = r#"
listen: "127.0.0.1:0"
admin: {listen: "127.0.0.1:0"}
policies_dir: "policies"
upstreams:
  pool: {endpoints: ["127.0.0.1:9"]}
agents:
  - {id: ag_priced, upstream: pool, pricing: {input_per_mtok: 1, output_per_mtok: 1, reserve: 10}}
accounts:
  - {id: acct, balance: 10}
keys:
  - {id: key_1, sha256: "0000000000000000000000000000000000000000000000000000000000000000", account: acct, agents: "*", policy: one_at_a_time}
"#;

    fn shared() -> Arc<Shared> {
        let dir = std::env::temp_dir().join(format!("turnpike-outcome-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("policies")).unwrap();
        std::fs::write(dir.join("turnpike.yaml"), CONFIG).unwrap();
        std::fs::write(
            dir.join("policies/p.yaml"),
            "policies:\n  one_at_a_time: {concurrency: 1}\n",
        )
        .unwrap();
        let config = crate::config::load(&dir.join("turnpike.yaml")).unwrap();
        let pools = crate::upstream::Pools::build(&config).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        Arc::new(Shared::new(
            Snapshot { config, pools },
            Arc::new(MemoryStore::new()),
            crate::metrics::Metrics::new(),
        ))
    }

    #[tokio::test]
    async fn a_call_dropped_while_admitted_gives_back_its_reservation_and_slot() {
        let shared = shared();
        let snapshot = shared.snapshot.load_full();
        shared
            .store
            .seed(&snapshot.config.keys, &snapshot.config.accounts)
            .await
            .unwrap();
        let key = Arc::new(snapshot.config.keys[0].1.clone());
        let agent = Arc::clone(&snapshot.config.agents["ag_priced"]);
        let policy = snapshot.config.policies.get("one_at_a_time").cloned();
        let admit = |call_id: &'static str| {
            let (shared, key, agent, policy) = (
                Arc::clone(&shared),
                Arc::clone(&key),
                Arc::clone(&agent),
                policy.clone(),
            );
            async move {
                let admission = Admission {
                    call_id,
                    key_id: &key.id,
                    account: &key.account,
                    agent: &agent.id,
                    key_policy: policy.as_deref(),
                    agent_policy: None,
                    pricing: agent.pricing.as_ref(),
                    now_ms: 0,
                    lease_ms: 60_000,
                };
                shared.store.admit(&admission).await.unwrap()
            }
        };
        let admitted = admit("call_a").await.expect("the first call is admitted");
        assert!(admit("call_b").await.is_err(), "slot and balance are held");

        let mut ctx = RequestCtx::new(Arc::clone(&shared));
        ctx.key = Some(Arc::clone(&key));
        ctx.agent = Some(Arc::clone(&agent));
        ctx.call = Some(Call {
            key_policy: policy.clone(),
            session_id: "s".into(),
            forward_body: Default::default(),
            call_id: Some("call_a".into()),
            reservation: admitted.reservation,
            worker_status: 0,
        });
        drop(ctx);
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        let account = shared.store.balance("acct").await.unwrap().unwrap();
        assert_eq!(
            (account.balance, account.reserved),
            (10, 0),
            "released, not charged"
        );
        assert!(admit("call_c").await.is_ok(), "the slot is free again");
    }
}
