//! The header names Turnpike itself sets, parsed once.

use http::HeaderName;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_AGENT_ID: HeaderName = HeaderName::from_static("x-agent-id");
pub const X_SESSION_ID: HeaderName = HeaderName::from_static("x-session-id");
pub const X_KEY_ID: HeaderName = HeaderName::from_static("x-key-id");
pub const X_ACCOUNT_ID: HeaderName = HeaderName::from_static("x-account-id");
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
pub const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
pub const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
pub const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// W3C Trace Context.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The header names a message's `Connection` header lists, lowercase: options of that one
/// connection, never passed on (RFC 9110 §7.6.1). `close` and `keep-alive` name no header.
pub fn connection_options(headers: &http::HeaderMap) -> Vec<String> {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|token| token.trim().to_ascii_lowercase())
        .filter(|token| !token.is_empty() && token != "close" && token != "keep-alive")
        .collect()
}
