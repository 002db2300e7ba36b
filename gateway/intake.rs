//! A call's way in, in the contract's order: route → authentication → agent and scope →
//! body → rate limits and balance (one store call). A call refused before the store call
//! has spent nothing.

use bytes::{Bytes, BytesMut};
use pingora::proxy::Session;
use std::sync::Arc;

use crate::admission::{Admission, Refusal, Scope, ShadowHit};
use crate::auth::{bearer_token, looks_like_key, KeyHash, KeyRecord};
use crate::config::Agent;
use crate::ctx::{Call, RequestCtx};
use crate::error::GatewayError;
use crate::limits::{retry_after_secs, Quota};
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

/// Runs every check; on success `ctx.call` is admitted and must be settled. A call refused
/// after authentication still gets its `RateLimit-*` numbers.
pub async fn admit(
    shared: &Shared,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> Result<(), GatewayError> {
    let judged = judge(shared, session, ctx).await;
    if judged.is_err() && ctx.quota.is_none() {
        ctx.quota = peek_quota(shared, ctx).await;
    }
    judged
}

/// The `RateLimit-*` numbers of an authenticated call, read without taking anything.
async fn peek_quota(shared: &Shared, ctx: &RequestCtx) -> Option<Quota> {
    let key = ctx.key.as_ref()?;
    let key_policy = ctx.snapshot.config.policies.get(&key.policy);
    let agent = ctx.agent.as_ref().filter(|a| key.agents.allows(&a.id));
    let probe = Admission {
        call_id: "",
        key_id: &key.id,
        account: &key.account,
        agent: agent.map_or("", |a| a.id.as_str()),
        key_policy: key_policy.map(|p| p.as_ref()),
        agent_policy: agent.and_then(|a| a.policy.as_deref()),
        pricing: None,
        now_ms: shared.now_ms(),
        lease_ms: 0,
    };
    shared.store.quota(&probe).await.ok().flatten()
}

async fn judge(
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
    let agent_id = match_route(&header.method, header.uri.path())?.agent_id;

    let token = bearer_token(
        header
            .headers
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes()),
    )?;
    let key = authenticate(shared, token).await?;
    let snapshot = Arc::clone(&ctx.snapshot);
    let agent = snapshot.config.agents.get(agent_id).cloned();
    ctx.agent = agent.clone();
    ctx.key = Some(Arc::clone(&key));

    let agent = agent
        .filter(|_| key.agents.allows(agent_id))
        .ok_or(GatewayError::AgentNotFound)?;
    let key_policy = match key.policy.as_str() {
        "" => None,
        name => Some(snapshot.config.policies.get(name).cloned().ok_or_else(|| {
            // Fail closed: a key must not lose its limits because its policy was removed.
            tracing::warn!(key_id = %key.id, policy = name, "key names a policy that is not loaded");
            GatewayError::InvalidApiKey
        })?),
    };

    let body = read_body(session, limits.max_body_bytes).await?;
    let chat = parse_chat(&body)?;
    let forward_body = match forwarded_body(&body, &chat) {
        Some(rewritten) => Bytes::from(rewritten),
        None => body,
    };
    ctx.call = Some(Call {
        key_policy,
        session_id: chat.session_id,
        forward_body,
        call_id: None,
        reservation: Default::default(),
        worker_status: 0,
    });
    reserve(shared, ctx, &key, &agent).await
}

/// The live key a bearer token names; 401 for anything else.
async fn authenticate(shared: &Shared, token: &str) -> Result<Arc<KeyRecord>, GatewayError> {
    if !looks_like_key(token) {
        return Err(GatewayError::InvalidApiKey);
    }
    match shared.store.key(&KeyHash::of(token)).await {
        Ok(Some(key)) if key.is_live(unix_now()) => Ok(key),
        Ok(_) => Err(GatewayError::InvalidApiKey),
        // The store counted the failure.
        Err(_) => Err(GatewayError::StoreUnavailable),
    }
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

/// Reads the whole body, up to `limit` bytes: 413 above it, then 415 unless it is JSON.
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
    let json = is_json_content_type(
        headers
            .get(http::header::CONTENT_TYPE)
            .map(|v| v.as_bytes()),
    );
    if !json && declared.is_some() {
        // Known length and wrong type: refuse before reading a byte.
        return Err(GatewayError::UnsupportedMediaType);
    }
    let expects_continue = headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue {
        let _ = session.write_continue_response().await;
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
    if !json {
        return Err(GatewayError::UnsupportedMediaType);
    }
    Ok(body.freeze())
}

/// How much longer than its pool's timeout a call's slots and reservation are held, so a
/// lease never runs out under a call that is still being settled.
const LEASE_GRACE_MS: u64 = 60_000;

/// The one store call: rate limits, concurrency and balance together.
async fn reserve(
    shared: &Shared,
    ctx: &mut RequestCtx,
    key: &KeyRecord,
    agent: &Agent,
) -> Result<(), GatewayError> {
    let Some(call) = ctx.call.as_mut() else {
        return Ok(());
    };
    let call_id = crate::request::random_id("call_", 20);
    let longest_call = ctx
        .snapshot
        .config
        .pools
        .get(&agent.pool)
        .map(|p| p.timeout);
    let admission = Admission {
        call_id: &call_id,
        key_id: &key.id,
        account: &key.account,
        agent: &agent.id,
        key_policy: call.key_policy.as_deref(),
        agent_policy: agent.policy.as_deref(),
        pricing: agent.pricing.as_ref(),
        now_ms: shared.now_ms(),
        lease_ms: longest_call.unwrap_or_default().as_millis() as u64 + LEASE_GRACE_MS,
    };
    let decision = shared
        .store
        .admit(&admission)
        .await
        .map_err(|_| GatewayError::StoreUnavailable)?;
    let metrics = &shared.metrics;
    let agent = agent.id.as_str();
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
            ctx.quota = admitted.quota;
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
            ctx.quota = quota;
            Err(GatewayError::RateLimited {
                bucket,
                rule,
                retry_after_secs: retry_after_secs(retry_after_ms),
            })
        }
        Err(Refusal::InsufficientBalance { quota, shadow_hits }) => {
            ctx.quota = quota;
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
