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
