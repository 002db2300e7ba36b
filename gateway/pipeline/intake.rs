//! A call's way in, in the contract's order: route → authentication → agent and scope →
//! body. Nothing here spends anything: the one store call that takes quota and balance is
//! the next stage's (`admit`).

use bytes::{Bytes, BytesMut};
use pingora::http::RequestHeader;
use pingora::proxy::Session;
use std::sync::Arc;
use tokio::time::Instant;

use turnpike_core::body::{forwarded_body, is_json_content_type, parse_chat, BodyProblem};
use turnpike_core::head::names_both_framings;
use turnpike_core::ids::{is_session_id, new_request_id};
use turnpike_core::keys::{bearer_token, looks_like_key, KeyHash, KeyRecord};
use turnpike_core::limits::Policy;
use turnpike_core::route::{match_route, request_line_target, target_path};
use turnpike_core::trace::TraceParent;

use super::ctx::CallRecord;
use crate::clock::unix_now;
use crate::config::Limits;
use crate::error::{GatewayError, HeadProblem};
use crate::headers::TRACEPARENT;
use crate::services::{Route, Services, Snapshot};

/// An authenticated caller, and the configured agent its path names (if there is one).
pub struct Authenticated<'s> {
    pub key: Arc<KeyRecord>,
    pub route: Option<&'s Route>,
}

/// A caller the key allows to call the agent it named.
pub struct Caller<'s> {
    pub key: Arc<KeyRecord>,
    pub route: &'s Route,
    pub key_policy: Option<Arc<Policy>>,
}

/// A valid chat request, as the worker will receive it.
pub struct Chat {
    pub session_id: String,
    pub forward_body: Bytes,
}

/// The client's `X-Request-Id` when it is sane, else a new one.
pub fn request_id(head: &RequestHeader) -> String {
    head.headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|id| is_session_id(id))
        .map_or_else(new_request_id, str::to_owned)
}

/// The client's valid `traceparent`, or a new trace. Two `traceparent` headers are not a
/// valid one (W3C Trace Context §3.2).
pub fn trace(head: &RequestHeader) -> TraceParent {
    let mut sent = head.headers.get_all(TRACEPARENT).iter();
    let only = match (sent.next(), sent.next()) {
        (Some(one), None) => one.to_str().ok(),
        _ => None,
    };
    TraceParent::for_call(only)
}

/// Whether the head is one HTTP allows: an HTTP/1.1 request names `Host` (RFC 9112 §3.2;
/// Pingora's parser refuses two), and no HTTP/2 field value begins or ends with a space or
/// tab (RFC 9113 §8.2.1; HTTP/1's parser trims them). A malformed head is refused with 400
/// and the connection is not reused. An HTTP/2 `:path` that carried a fragment (which the
/// `h2` crate dropped, and the edge noted) matches no route: 404, as on HTTP/1.1.
pub fn well_formed(session: &mut Session) -> Result<(), GatewayError> {
    let head = session.req_header();
    if session.is_http2() && fragment_dropped(session, head) {
        return Err(GatewayError::NotFound);
    }
    let problem = if session.is_http2() {
        let padded = |v: &http::HeaderValue| {
            let bytes = v.as_bytes();
            let is_padding = |b: Option<&u8>| matches!(b, Some(b' ' | b'\t'));
            is_padding(bytes.first()) || is_padding(bytes.last())
        };
        head.headers
            .values()
            .any(padded)
            .then_some(HeadProblem::PaddedValue)
    } else {
        let no_host = !head.headers.contains_key(http::header::HOST);
        (no_host && head.version == http::Version::HTTP_11).then_some(HeadProblem::NoHost)
    };
    match problem {
        None => Ok(()),
        Some(problem) => {
            session.set_keepalive(None);
            Err(GatewayError::MalformedHead(problem))
        }
    }
}

/// The route and the bearer key: 404/405, then 401. Records the key and the agent it named.
pub async fn authenticate<'s>(
    services: &Services,
    snapshot: &'s Snapshot,
    session: &Session,
    record: &mut CallRecord,
) -> Result<Authenticated<'s>, GatewayError> {
    // The head's size (431) was judged at the edge, before Pingora parsed it.
    let head = session.req_header();
    // The target as the client sent it, not as the parser kept it: a fragment the parser
    // dropped must not leave the rest to match.
    let raw_head = session.as_downstream().to_h1_raw();
    let path = target_path(request_line_target(&raw_head))?;
    let agent_id = match_route(head.method.as_str(), path)?.agent_id;
    let token = bearer_token(only_authorization(head)?)?;
    let key = live_key(services, token).await?;
    let route = snapshot.route(agent_id);
    record.agent = route.map(|r| Arc::clone(&r.agent));
    record.agent_series = route.map(|r| Arc::clone(&r.series));
    record.key = Some(Arc::clone(&key));
    record.counted_per_key = snapshot.config.metrics_per_key;
    Ok(Authenticated { key, route })
}

/// Whether this HTTP/2 request's `:path` carried a fragment.
fn fragment_dropped(session: &Session, head: &RequestHeader) -> bool {
    let connection = session.digest().and_then(|d| d.socket_digest.as_ref());
    let path = head.uri.path_and_query().map_or("", |p| p.as_str());
    crate::h2_paths::had_fragment(connection, path)
}

/// The one `Authorization` header's value; two are malformed (which one would a server
/// behind believe?).
fn only_authorization(head: &RequestHeader) -> Result<Option<&[u8]>, GatewayError> {
    let mut values = head.headers.get_all(http::header::AUTHORIZATION).iter();
    let first = values.next().map(|v| v.as_bytes());
    match values.next() {
        Some(_) => Err(GatewayError::MissingApiKey),
        None => Ok(first),
    }
}

/// The live key a bearer token names; 401 for anything else, 503 when the store cannot say.
async fn live_key(services: &Services, token: &str) -> Result<Arc<KeyRecord>, GatewayError> {
    if !looks_like_key(token) {
        return Err(GatewayError::InvalidApiKey);
    }
    match services.store.key(&KeyHash::of(token)).await {
        Ok(Some(key)) if key.is_live(unix_now()) => Ok(key),
        Ok(_) => Err(GatewayError::InvalidApiKey),
        // The store counted the failure.
        Err(_) => Err(GatewayError::StoreUnavailable),
    }
}

/// Whether the key may call the agent (404 whether it is unknown or out of scope), and
/// the key's policy.
pub fn authorize<'s>(
    snapshot: &Snapshot,
    caller: &Authenticated<'s>,
) -> Result<Caller<'s>, GatewayError> {
    let key = &caller.key;
    let route = caller
        .route
        .filter(|route| key.agents.allows(&route.agent.id))
        .ok_or(GatewayError::AgentNotFound)?;
    let key_policy = match key.policy.as_str() {
        "" => None,
        name => Some(snapshot.config.policies.get(name).cloned().ok_or_else(|| {
            // Fail closed: a key must not lose its limits because its policy was removed.
            tracing::warn!(key_id = %key.id, policy = name, "key names a policy that is not loaded");
            GatewayError::InvalidApiKey
        })?),
    };
    Ok(Caller {
        key: Arc::clone(key),
        route,
        key_policy,
    })
}

/// Reads and validates the body (413, 415, 400; 408 when it takes longer than
/// `limits.body_timeout`) and makes the body the worker receives. A body that was not read
/// whole and well framed (too large, too slow, a bad chunk) leaves the connection's next
/// bytes unknown, so the connection is not reused: whatever follows is never read as a
/// request of its own.
pub async fn read_chat(
    session: &mut Session,
    limits: &Limits,
    record: &mut CallRecord,
) -> Result<Chat, GatewayError> {
    let deadline = Instant::now() + limits.body_timeout;
    let read = tokio::time::timeout_at(deadline, read_body(session, limits.max_body_bytes))
        .await
        .unwrap_or(Err(GatewayError::RequestTimeout));
    let body = read.inspect_err(|error| {
        // Only a body read whole and well framed says where the next request begins.
        let read_whole =
            matches!(error, GatewayError::UnsupportedMediaType) && session.is_body_done();
        if !read_whole {
            session.set_keepalive(None);
        }
    })?;
    let chat = parse_chat(&body)?;
    let forward_body = match forwarded_body(&body, &chat) {
        Some(rewritten) => Bytes::from(rewritten),
        None => body,
    };
    record.session_id = Some(chat.session_id.clone());
    Ok(Chat {
        session_id: chat.session_id,
        forward_body,
    })
}

/// Reads the whole body, up to `limit` bytes: 413 above it, then 415 unless it is JSON.
async fn read_body(session: &mut Session, limit: usize) -> Result<Bytes, GatewayError> {
    let too_large = GatewayError::PayloadTooLarge { limit };
    // Judged on the head as sent: Pingora keeps only Transfer-Encoding of the two.
    if names_both_framings(&session.as_downstream().to_h1_raw()) {
        return Err(BodyProblem::ConflictingFraming.into());
    }
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
            .map_err(|_| BodyProblem::Unreadable)?;
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
