//! The end of every call, however it ended: settle with the store (exactly once), count it,
//! and write its access-log line. Runs in Pingora's `logging` phase, which also runs when
//! the client went away, so an answered call is metered even if nobody read it.

use crate::admission::Settlement;
use crate::billing::cost;
use crate::ctx::RequestCtx;
use crate::state::Shared;

pub async fn finish(shared: &Shared, ctx: &mut RequestCtx, status: u16) {
    let usage = settle(shared, ctx).await;
    let metrics = &shared.metrics;
    let agent = ctx.agent_label().to_owned();
    let status = http::StatusCode::from_u16(status).ok();
    let status_label = status.as_ref().map_or("0", |s| s.as_str());
    metrics
        .requests
        .with_label_values(&[agent.as_str(), status_label])
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
    if ctx.counted_inflight {
        metrics.inflight.dec();
    }
    let (input, output) = usage.map_or((0, 0), |u| (u.input_tokens, u.output_tokens));
    tracing::info!(
        target: "access",
        request_id = %ctx.request_id,
        agent = %agent,
        key_id = ctx.call.as_ref().map_or("", |c| c.key.id.as_str()),
        status = status_label,
        error = ctx.refusal.as_ref().map_or("", |e| e.code()),
        duration_ms = ctx.started.elapsed().as_millis() as u64,
        upstream_ms = ctx.upstream_started.map_or(0, |s| s.elapsed().as_millis() as u64),
        input_tokens = input,
        output_tokens = output,
    );
}

/// Settles an admitted call: charges it when a complete 2xx answer carried valid usage,
/// otherwise only releases what admission took.
async fn settle(shared: &Shared, ctx: &mut RequestCtx) -> Option<crate::metering::Usage> {
    let call = ctx.call.as_mut()?;
    let call_id = call.call_id.take()?;
    let usage = ctx.usage;
    let charge = match (usage, call.agent.pricing.as_ref()) {
        (Some(usage), Some(pricing)) => cost(&usage, pricing),
        _ => 0,
    };
    let settlement = Settlement {
        call_id: &call_id,
        key_id: &call.key.id,
        account: &call.key.account,
        agent: &call.agent.id,
        key_policy: call.key_policy.as_deref(),
        agent_policy: call.agent.policy.as_deref(),
        reservation: call.reservation,
        usage,
        cost: charge,
        now_ms: shared.now_ms(),
    };
    if let Err(error) = shared.store.settle(&settlement).await {
        shared
            .metrics
            .store_errors
            .with_label_values(&["settle"])
            .inc();
        tracing::error!(request_id = %ctx.request_id, %error, "settlement failed");
        return None;
    }
    let usage = usage?;
    let agent = call.agent.id.as_str();
    let metrics = &shared.metrics;
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
    Some(usage)
}
