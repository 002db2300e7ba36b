//! A call's way in, in the contract's order: route → authentication → agent and scope →
//! body → rate limits and balance (one store call). A call refused before the store call
//! has spent nothing.

use bytes::{Bytes, BytesMut};
use pingora::proxy::Session;
use std::sync::Arc;

use crate::admission::{Admission, Refusal, Scope, ShadowHit};
use crate::auth::{bearer_token, looks_like_key, KeyHash};
use crate::ctx::{Call, RequestCtx};
use crate::error::GatewayError;
use crate::limits::retry_after_secs;
use crate::request::{forwarded_body, is_json_content_type, parse_chat};
use crate::routing::{is_session_id, match_route};
use crate::state::{unix_now, Shared};

/// The client's `X-Request-Id` when it is sane, else a new one.
pub fn request_id(session: &Session) -> String {
    session
        .req_header()
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|id| is_session_id(id))
        .map_or_else(|| crate::request::random_id("req_", 24), str::to_owned)
}

/// Runs every check; on success `ctx.call` is admitted and must be settled.
pub async fn admit(
    shared: &Shared,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> Result<(), GatewayError> {
    let limits = ctx.snapshot.config.limits;
    if head_size(session) > limits.max_header_bytes {
        return Err(GatewayError::HeadersTooLarge {
            limit: limits.max_header_bytes,
        });
    }
    let header = session.req_header();
    let route = match_route(&header.method, header.uri.path())?;
    let agent_id = route.agent_id.to_owned();

    let token = bearer_token(
        header
            .headers
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes()),
    )?;
    if !looks_like_key(token) {
        return Err(GatewayError::InvalidApiKey);
    }
    let hash = KeyHash::of(token);
    let key = match shared.store.key(&hash).await {
        Ok(Some(key)) if key.is_live(unix_now()) => key,
        Ok(_) => return Err(GatewayError::InvalidApiKey),
        Err(_) => {
            shared
                .metrics
                .store_errors
                .with_label_values(&["key"])
                .inc();
            return Err(GatewayError::StoreUnavailable);
        }
    };

    let snapshot = Arc::clone(&ctx.snapshot);
    let agent = snapshot
        .config
        .agents
        .get(&agent_id)
        .filter(|_| key.agents.allows(&agent_id))
        .ok_or(GatewayError::AgentNotFound)?;
    let key_policy = snapshot.config.policies.get(&key.policy).cloned();

    let body = read_body(session, limits.max_body_bytes).await?;
    let chat = parse_chat(&body)?;
    let forward_body = match forwarded_body(&body, &chat) {
        Some(rewritten) => Bytes::from(rewritten),
        None => body,
    };
    ctx.call = Some(Call {
        key,
        agent: Arc::clone(agent),
        key_policy,
        session_id: chat.session_id,
        forward_body,
        call_id: None,
        reservation: Default::default(),
        quota: None,
    });
    reserve(shared, ctx).await
}

/// The request head's size as received: request line and every header line.
fn head_size(session: &Session) -> usize {
    let header = session.req_header();
    let target = header.uri.path_and_query().map_or(1, |p| p.as_str().len());
    let line = header.method.as_str().len() + target + 12;

    header.headers.iter().fold(line, |size, (name, value)| {
        size + name.as_str().len() + value.len() + 4
    })
}

/// Reads the whole body, up to `limit` bytes; 413 above it, 415 unless it is JSON.
async fn read_body(session: &mut Session, limit: usize) -> Result<Bytes, GatewayError> {
    let too_large = GatewayError::PayloadTooLarge { limit };
    let headers = &session.req_header().headers;
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|length| length > limit) {
        return Err(too_large);
    }
    if !is_json_content_type(
        headers
            .get(http::header::CONTENT_TYPE)
            .map(|v| v.as_bytes()),
    ) {
        return Err(GatewayError::UnsupportedMediaType);
    }
    let mut body = BytesMut::with_capacity(declared.unwrap_or(1024).min(limit));
    loop {
        let chunk = session
            .read_request_body()
            .await
            .map_err(|_| GatewayError::InvalidRequest("Could not read the request body".into()))?;
        let Some(chunk) = chunk else { break };
        if body.len() + chunk.len() > limit {
            return Err(too_large);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// The one store call: rate limits, concurrency and balance together.
async fn reserve(shared: &Shared, ctx: &mut RequestCtx) -> Result<(), GatewayError> {
    let Some(call) = ctx.call.as_mut() else {
        return Ok(());
    };
    let call_id = crate::request::random_id("call_", 20);
    let admission = Admission {
        call_id: &call_id,
        key_id: &call.key.id,
        account: &call.key.account,
        agent: &call.agent.id,
        key_policy: call.key_policy.as_deref(),
        agent_policy: call.agent.policy.as_deref(),
        pricing: call.agent.pricing.as_ref(),
        now_ms: shared.now_ms(),
    };
    let decision = shared.store.admit(&admission).await.map_err(|_| {
        shared
            .metrics
            .store_errors
            .with_label_values(&["admit"])
            .inc();
        GatewayError::StoreUnavailable
    })?;
    let metrics = &shared.metrics;
    let agent = call.agent.id.as_str();
    let count_shadow = |hits: &[ShadowHit]| {
        for hit in hits {
            metrics
                .rate_limited
                .with_label_values(&[agent, hit.bucket.label(), scope_label(hit.scope), "true"])
                .inc();
        }
    };
    match decision {
        Ok(admitted) => {
            count_shadow(&admitted.shadow_hits);
            call.reservation = admitted.reservation;
            call.quota = admitted.quota;
            call.call_id = Some(call_id);
            Ok(())
        }
        Err(Refusal::RateLimited {
            scope,
            bucket,
            retry_after_ms,
            rule,
            quota,
            shadow_hits,
        }) => {
            count_shadow(&shadow_hits);
            metrics
                .rate_limited
                .with_label_values(&[agent, bucket.label(), scope_label(scope), "false"])
                .inc();
            call.quota = quota;
            Err(GatewayError::RateLimited {
                bucket,
                rule,
                retry_after_secs: retry_after_secs(retry_after_ms),
            })
        }
        Err(Refusal::InsufficientBalance { shadow_hits }) => {
            count_shadow(&shadow_hits);
            metrics
                .insufficient_balance
                .with_label_values(&[agent])
                .inc();
            Err(GatewayError::InsufficientBalance)
        }
    }
}

fn scope_label(scope: Scope) -> &'static str {
    match scope {
        Scope::Key => "key",
        Scope::Agent => "agent",
    }
}
