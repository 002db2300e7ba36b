//! The end of every call, in Pingora's `logging` phase however the call ended: its metrics
//! and its access-log line (which, with account, session, tokens and cost, is also the
//! embedded store's usage log).

use std::net::SocketAddr;
use std::time::Duration;

use super::ctx::{CallRecord, RequestCtx};
use crate::error::GatewayError;
use crate::logging::AccessLine;
use crate::metrics::{status_label, Metrics, NO_AGENT};

/// Counts the call and writes its access-log line; `status` is what the client was sent
/// (0 when nothing could be sent).
pub fn finish(metrics: &Metrics, ctx: &RequestCtx, status: u16) {
    let record = &ctx.record;
    let status_label = status_label(status);
    let agent = record.agent_label();
    match &record.agent_series {
        Some(series) => series
            .get(metrics, agent)
            .count_request(metrics, agent, status_label),
        None => metrics
            .requests
            .with_label_values(&[agent, status_label])
            .inc(),
    }
    metrics
        .request_duration
        .observe(ctx.started.elapsed().as_secs_f64());
    let upstream = record.upstream_time();
    if let Some(upstream) = upstream {
        metrics.upstream_duration.observe(upstream.as_secs_f64());
    }
    if let Some(key) = record.key.as_ref().filter(|_| record.counted_per_key) {
        count_per_key(metrics, &key.id, status_label, record);
    }
    if let Some(reason) = record
        .refusal
        .as_ref()
        .and_then(|e| e.auth_failure_reason())
    {
        metrics.auth_failures.with_label_values(&[reason]).inc();
    }
    if let Some(line) = AccessLine::start() {
        access_line(line, ctx, status, upstream);
    }
}

/// The call's access-log line (see `logging::AccessLine` for its format).
fn access_line(mut line: AccessLine, ctx: &RequestCtx, status: u16, upstream: Option<Duration>) {
    let record = &ctx.record;
    let key = record.key.as_deref();
    let (input, output) = record
        .usage
        .map_or((0, 0), |u| (u.input_tokens, u.output_tokens));
    let stream = record.stream.as_ref();
    line.plain("call_id", &ctx.ids.call_id);
    line.plain("request_id", &ctx.ids.request_id);
    line.text("agent", record.agent_label());
    line.text("key_id", key.map_or("", |k| k.id.as_str()));
    line.text("account", key.map_or("", |k| k.account.as_str()));
    line.text("session_id", record.session_id.as_deref().unwrap_or(""));
    line.number("status", status);
    line.text("error", record.refusal.as_ref().map_or("", |e| e.code()));
    line.text("decision", decision(record));
    line.text("trace_id", ctx.ids.trace.trace_id());
    line.plain("upstream", Endpoint(record.upstream_endpoint));
    line.number("duration_ms", ctx.started.elapsed().as_millis() as u64);
    // The gateway's own time before the worker: parsing, auth, admission.
    let admit = record
        .upstream_started
        .map(|s| s.duration_since(ctx.started));
    line.number("admit_ms", admit.map_or(0, |a| a.as_millis() as u64));
    // The worker exchange alone: not the settlement, not the client's write.
    line.number("upstream_ms", upstream.map_or(0, |u| u.as_millis() as u64));
    line.number("input_tokens", input);
    line.number("output_tokens", output);
    line.number("cost", record.cost);
    line.flag("stream", stream.is_some());
    line.number("events", stream.map_or(0, |s| s.events));
    line.float(
        "first_byte_ms",
        stream.map_or(0.0, |s| s.first_byte.as_secs_f64() * 1000.0),
    );
    line.text("stream_end", stream.map_or("", |s| s.end.label()));
    line.write();
}

/// `metrics.per_key`: the call under its key id too.
fn count_per_key(metrics: &Metrics, key_id: &str, status: &str, record: &CallRecord) {
    metrics
        .key_requests
        .with_label_values(&[key_id, status])
        .inc();
    if let Some(usage) = record.usage {
        for (kind, tokens) in [
            ("input", usage.input_tokens),
            ("output", usage.output_tokens),
        ] {
            metrics
                .key_tokens
                .with_label_values(&[key_id, kind])
                .inc_by(tokens);
        }
    }
}

/// The endpoint that answered, or nothing: written straight into the line, no copy.
struct Endpoint(Option<SocketAddr>);

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => addr.fmt(f),
            None => Ok(()),
        }
    }
}

/// What the gateway did with the call: `forwarded` (a worker answered), `refused` (the
/// gateway answered it without a worker: auth, limits, balance, bad input),
/// `upstream_failed` (sent to the pool, no usable answer), or `client_gone` (the client
/// left before the worker answered, and the worker's call was closed).
fn decision(record: &CallRecord) -> &'static str {
    if matches!(record.refusal, Some(GatewayError::ClientGone)) {
        "client_gone"
    } else if record.upstream_endpoint.is_some() {
        "forwarded"
    } else if record.upstream_started.is_some() {
        "upstream_failed"
    } else {
        "refused"
    }
}

/// Counts and logs a request the edge refused before it became a call (a head too large).
pub fn refused_at_the_edge(metrics: &Metrics, request_id: &str, error: &GatewayError) {
    let status = error.status();
    metrics
        .requests
        .with_label_values(&[NO_AGENT, status_label(status)])
        .inc();
    tracing::info!(
        target: "access",
        request_id,
        agent = NO_AGENT,
        status,
        error = error.code(),
        decision = "refused",
    );
}
