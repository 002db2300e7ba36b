//! Every error a client can see, and its one rendering into the contract's JSON body.

use std::fmt;

use turnpike_core::body::BodyProblem;
use turnpike_core::keys::NoBearerToken;
use turnpike_core::limits::BucketKind;
use turnpike_core::route::RouteMiss;

use crate::config::validate::KeyProblem;
use crate::config::ConfigErrors;

/// One variant per row of the contract's error table (plus the admin API's own refusals).
/// Each `match` below is exhaustive on purpose: a new variant must decide its status, code
/// and metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    #[error("{0}")]
    InvalidBody(BodyProblem),
    #[error("{0}")]
    InvalidAdminRequest(AdminProblem),
    #[error("Missing or malformed Authorization header; expected 'Bearer ak_...'")]
    MissingApiKey,
    #[error("Invalid API key")]
    InvalidApiKey,
    #[error("Insufficient balance for this call")]
    InsufficientBalance,
    #[error("Agent not found")]
    AgentNotFound,
    #[error("Not found")]
    NotFound,
    #[error("Method not allowed; use {allow}")]
    /// `allow`: the methods the path takes, for the `Allow` header.
    MethodNotAllowed { allow: &'static str },
    #[error("The request body did not arrive in time (limits.body_timeout)")]
    RequestTimeout,
    #[error("Request body exceeds {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("Content-Type must be application/json")]
    UnsupportedMediaType,
    #[error("Rate limit exceeded: {rule}")]
    RateLimited {
        bucket: BucketKind,
        rule: String,
        retry_after_secs: u64,
    },
    #[error("Request headers exceed {limit} bytes")]
    HeadersTooLarge { limit: usize },
    #[error("Upstream unavailable")]
    UpstreamUnavailable,
    /// The worker answered 2xx with a `usage` that is there but wrong (`on_invalid_usage: reject`).
    #[error("The agent's worker reported invalid usage; the call was not charged")]
    UpstreamInvalidUsage,
    #[error("State store unavailable")]
    StoreUnavailable,
    #[error("Upstream timed out")]
    UpstreamTimeout,
    /// The client went away before the worker answered: nothing is sent, nothing charged.
    #[error("The client closed the connection before the answer")]
    ClientGone,
    /// A request head HTTP does not allow (RFC 9112 §3.2, RFC 9113 §8.2.1).
    #[error("{0}")]
    MalformedHead(HeadProblem),
    #[error("Missing or wrong admin token")]
    AdminUnauthorized,
    #[error("A key with id '{key_id}' already exists")]
    Conflict { key_id: String },
    #[error("The new configuration was refused, the old one stays in force:\n{0}")]
    InvalidConfig(ConfigErrors),
}

/// What makes a request head malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadProblem {
    /// An HTTP/1.1 request without `Host`.
    NoHost,
    /// An HTTP/2 field value with spaces or tabs around it.
    PaddedValue,
}

impl fmt::Display for HeadProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HeadProblem::NoHost => "An HTTP/1.1 request must carry a Host header",
            HeadProblem::PaddedValue => {
                "A header value must not begin or end with a space or a tab"
            }
        })
    }
}

/// Why an admin request was refused (400 `invalid_request`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminProblem {
    /// A field of a new key breaks a rule the config file's keys follow too.
    Key {
        field: &'static str,
        problem: KeyProblem,
    },
    /// A path segment with a `%` not followed by two hex digits of UTF-8.
    BadEscape(String),
    /// A balance change that is not exactly one of `add` and `set`.
    BalanceChange,
    /// An `add` that would take the balance out of the 64-bit range.
    BalanceOverflow,
    /// The JSON parser's own account of what is wrong with the body.
    NotJson(String),
    Unreadable,
}

impl fmt::Display for AdminProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdminProblem::Key { field, problem } => write!(f, "'{field}': {problem}"),
            AdminProblem::BadEscape(raw) => write!(f, "Bad escape in path segment '{raw}'"),
            AdminProblem::BalanceChange => {
                f.write_str("Send exactly one of {\"add\": n} or {\"set\": n}")
            }
            AdminProblem::BalanceOverflow => f.write_str(
                "The balance would leave the range of a 64-bit integer; nothing was changed",
            ),
            AdminProblem::NotJson(detail) => write!(f, "Invalid JSON body: {detail}"),
            AdminProblem::Unreadable => f.write_str("Could not read the request body"),
        }
    }
}

impl From<BodyProblem> for GatewayError {
    fn from(problem: BodyProblem) -> Self {
        GatewayError::InvalidBody(problem)
    }
}

impl From<AdminProblem> for GatewayError {
    fn from(problem: AdminProblem) -> Self {
        GatewayError::InvalidAdminRequest(problem)
    }
}

impl From<RouteMiss> for GatewayError {
    fn from(miss: RouteMiss) -> Self {
        match miss {
            RouteMiss::NotFound => GatewayError::NotFound,
            RouteMiss::MethodNotAllowed { allow } => GatewayError::MethodNotAllowed { allow },
        }
    }
}

impl From<NoBearerToken> for GatewayError {
    fn from(_: NoBearerToken) -> Self {
        GatewayError::MissingApiKey
    }
}

impl GatewayError {
    pub fn status(&self) -> u16 {
        match self {
            GatewayError::InvalidBody(_)
            | GatewayError::InvalidAdminRequest(_)
            | GatewayError::MalformedHead(_) => 400,
            GatewayError::MissingApiKey | GatewayError::InvalidApiKey => 401,
            GatewayError::AdminUnauthorized => 401,
            GatewayError::Conflict { .. } => 409,
            GatewayError::InvalidConfig(_) => 400,
            GatewayError::InsufficientBalance => 402,
            GatewayError::AgentNotFound | GatewayError::NotFound => 404,
            GatewayError::MethodNotAllowed { .. } => 405,
            GatewayError::RequestTimeout => 408,
            GatewayError::PayloadTooLarge { .. } => 413,
            GatewayError::UnsupportedMediaType => 415,
            GatewayError::RateLimited { .. } => 429,
            GatewayError::HeadersTooLarge { .. } => 431,
            GatewayError::UpstreamUnavailable | GatewayError::UpstreamInvalidUsage => 502,
            GatewayError::StoreUnavailable => 503,
            GatewayError::UpstreamTimeout => 504,
            // nginx's "client closed request": logged, never sent.
            GatewayError::ClientGone => 499,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::InvalidBody(_)
            | GatewayError::InvalidAdminRequest(_)
            | GatewayError::MalformedHead(_) => "invalid_request",
            GatewayError::MissingApiKey => "missing_api_key",
            GatewayError::InvalidApiKey => "invalid_api_key",
            GatewayError::AdminUnauthorized => "unauthorized",
            GatewayError::Conflict { .. } => "conflict",
            GatewayError::InvalidConfig(_) => "invalid_config",
            GatewayError::InsufficientBalance => "insufficient_balance",
            GatewayError::AgentNotFound => "agent_not_found",
            GatewayError::NotFound => "not_found",
            GatewayError::MethodNotAllowed { .. } => "method_not_allowed",
            GatewayError::RequestTimeout => "request_timeout",
            GatewayError::PayloadTooLarge { .. } => "payload_too_large",
            GatewayError::UnsupportedMediaType => "unsupported_media_type",
            GatewayError::RateLimited { .. } => "rate_limit_exceeded",
            GatewayError::HeadersTooLarge { .. } => "headers_too_large",
            GatewayError::UpstreamUnavailable => "upstream_unavailable",
            GatewayError::UpstreamInvalidUsage => "upstream_invalid_usage",
            GatewayError::StoreUnavailable => "store_unavailable",
            GatewayError::UpstreamTimeout => "upstream_timeout",
            GatewayError::ClientGone => "client_closed_request",
        }
    }

    /// The `reason` label of `turnpike_auth_failures_total`, for the auth errors only.
    pub fn auth_failure_reason(&self) -> Option<&'static str> {
        match self {
            GatewayError::MissingApiKey => Some("missing"),
            GatewayError::InvalidApiKey => Some("invalid"),
            GatewayError::AdminUnauthorized => Some("admin"),
            GatewayError::InvalidBody(_)
            | GatewayError::InvalidAdminRequest(_)
            | GatewayError::InsufficientBalance
            | GatewayError::AgentNotFound
            | GatewayError::NotFound
            | GatewayError::MethodNotAllowed { .. }
            | GatewayError::RequestTimeout
            | GatewayError::PayloadTooLarge { .. }
            | GatewayError::UnsupportedMediaType
            | GatewayError::RateLimited { .. }
            | GatewayError::HeadersTooLarge { .. }
            | GatewayError::UpstreamUnavailable
            | GatewayError::UpstreamInvalidUsage
            | GatewayError::StoreUnavailable
            | GatewayError::UpstreamTimeout
            | GatewayError::ClientGone
            | GatewayError::MalformedHead(_)
            | GatewayError::Conflict { .. }
            | GatewayError::InvalidConfig(_) => None,
        }
    }

    /// Headers the contract adds to this error, beyond `Content-Type`.
    pub fn extra_headers(&self) -> Option<(&'static str, String)> {
        match self {
            GatewayError::MissingApiKey
            | GatewayError::InvalidApiKey
            | GatewayError::AdminUnauthorized => Some(("WWW-Authenticate", "Bearer".into())),
            GatewayError::MethodNotAllowed { allow } => Some(("Allow", (*allow).into())),
            GatewayError::RateLimited {
                retry_after_secs, ..
            } => Some(("Retry-After", retry_after_secs.to_string())),
            GatewayError::InvalidBody(_)
            | GatewayError::InvalidAdminRequest(_)
            | GatewayError::InsufficientBalance
            | GatewayError::AgentNotFound
            | GatewayError::NotFound
            | GatewayError::RequestTimeout
            | GatewayError::PayloadTooLarge { .. }
            | GatewayError::UnsupportedMediaType
            | GatewayError::HeadersTooLarge { .. }
            | GatewayError::UpstreamUnavailable
            | GatewayError::UpstreamInvalidUsage
            | GatewayError::StoreUnavailable
            | GatewayError::UpstreamTimeout
            | GatewayError::ClientGone
            | GatewayError::MalformedHead(_)
            | GatewayError::Conflict { .. }
            | GatewayError::InvalidConfig(_) => None,
        }
    }

    /// The contract's body: `{"error": {"status", "code", "message", "request_id"}}`.
    pub fn body(&self, request_id: &str) -> Vec<u8> {
        let body = serde_json::json!({
            "error": {
                "status": self.status(),
                "code": self.code(),
                "message": self.to_string(),
                "request_id": request_id,
            }
        });
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every auth failure reason's series is exported at zero from the start.
    #[test]
    fn every_auth_failure_reason_is_in_the_metrics_fixed_set() {
        for error in [
            GatewayError::MissingApiKey,
            GatewayError::InvalidApiKey,
            GatewayError::AdminUnauthorized,
        ] {
            let reason = error.auth_failure_reason().expect("an auth failure");
            assert!(
                crate::metrics::AUTH_FAILURE_REASONS.contains(&reason),
                "{reason}"
            );
        }
    }

    #[test]
    fn body_has_the_contract_shape() {
        let err = GatewayError::RateLimited {
            bucket: BucketKind::Requests,
            rule: "10 requests per 1s".into(),
            retry_after_secs: 1,
        };
        let body: serde_json::Value = serde_json::from_slice(&err.body("req_1")).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"error": {"status": 429, "code": "rate_limit_exceeded",
                "message": "Rate limit exceeded: 10 requests per 1s", "request_id": "req_1"}})
        );
        assert_eq!(err.extra_headers(), Some(("Retry-After", "1".into())));
    }

    #[test]
    fn body_and_admin_problems_are_invalid_requests_with_their_own_words() {
        let body = GatewayError::from(BodyProblem::MessageMissing);
        assert_eq!((body.status(), body.code()), (400, "invalid_request"));
        assert_eq!(body.to_string(), "'message' is required");
        let admin = GatewayError::from(AdminProblem::Key {
            field: "policy",
            problem: KeyProblem::UnknownPolicy("gold".into()),
        });
        assert_eq!((admin.status(), admin.code()), (400, "invalid_request"));
        assert_eq!(admin.to_string(), "'policy': no policy named 'gold'");
    }
}
