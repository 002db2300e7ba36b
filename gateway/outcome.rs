//! The end of every call: settle with the store exactly once, count it, and write its
//! access-log line (which, with account, session, tokens and cost, is also the embedded
//! store's usage log). Settlement runs as soon as the worker's answer is read, before the
//! client is written to (a slow or vanished client cannot delay or lose it); Pingora's
//! `logging` phase, which runs however a call ended, settles whatever is still open.

use crate::admission::Settlement;
use crate::billing::cost;
use crate::ctx::RequestCtx;
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
        call_id: &call_id,
        key_id: &key.id,
        account: &key.account,
        agent: &agent.id,
        key_policy: call.key_policy.as_deref(),
        agent_policy: agent.policy.as_deref(),
        reservation: call.reservation,
        usage,
        cost: charge,
        now_ms: shared.now_ms(),
    };
    let metrics = &shared.metrics;
    if let Err(error) = shared.store.settle(&settlement).await {
        metrics.store_errors.with_label_values(&["settle"]).inc();
        tracing::error!(request_id = %ctx.request_id, %error, "settlement failed");
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
    if ctx.counted_inflight {
        metrics.inflight.dec();
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
