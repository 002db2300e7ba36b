//! Every error a client can see, and its one rendering into the contract's JSON body.

use crate::limits::BucketKind;

/// One variant per row of the contract's error table (plus the admin API's own refusals).
/// Each `match` below is exhaustive on purpose: a new variant must decide its status, code
/// and metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    #[error("{0}")]
    InvalidRequest(String),
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
    #[error("Method not allowed; use POST")]
    /// `allow`: the methods the path takes, for the `Allow` header.
    MethodNotAllowed { allow: &'static str },
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
    #[error("State store unavailable")]
    StoreUnavailable,
    #[error("Upstream timed out")]
    UpstreamTimeout,
    #[error("Missing or wrong admin token")]
    AdminUnauthorized,
    #[error("{0}")]
    Conflict(String),
    #[error("The new configuration was refused, the old one stays in force:\n{0}")]
    InvalidConfig(String),
}

impl GatewayError {
    pub fn status(&self) -> u16 {
        match self {
            GatewayError::InvalidRequest(_) => 400,
            GatewayError::MissingApiKey | GatewayError::InvalidApiKey => 401,
            GatewayError::AdminUnauthorized => 401,
            GatewayError::Conflict(_) => 409,
            GatewayError::InvalidConfig(_) => 400,
            GatewayError::InsufficientBalance => 402,
            GatewayError::AgentNotFound | GatewayError::NotFound => 404,
            GatewayError::MethodNotAllowed { .. } => 405,
            GatewayError::PayloadTooLarge { .. } => 413,
            GatewayError::UnsupportedMediaType => 415,
            GatewayError::RateLimited { .. } => 429,
            GatewayError::HeadersTooLarge { .. } => 431,
            GatewayError::UpstreamUnavailable => 502,
            GatewayError::StoreUnavailable => 503,
            GatewayError::UpstreamTimeout => 504,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::InvalidRequest(_) => "invalid_request",
            GatewayError::MissingApiKey => "missing_api_key",
            GatewayError::InvalidApiKey => "invalid_api_key",
            GatewayError::AdminUnauthorized => "unauthorized",
            GatewayError::Conflict(_) => "conflict",
            GatewayError::InvalidConfig(_) => "invalid_config",
            GatewayError::InsufficientBalance => "insufficient_balance",
            GatewayError::AgentNotFound => "agent_not_found",
            GatewayError::NotFound => "not_found",
            GatewayError::MethodNotAllowed { .. } => "method_not_allowed",
            GatewayError::PayloadTooLarge { .. } => "payload_too_large",
            GatewayError::UnsupportedMediaType => "unsupported_media_type",
            GatewayError::RateLimited { .. } => "rate_limit_exceeded",
            GatewayError::HeadersTooLarge { .. } => "headers_too_large",
            GatewayError::UpstreamUnavailable => "upstream_unavailable",
            GatewayError::StoreUnavailable => "store_unavailable",
            GatewayError::UpstreamTimeout => "upstream_timeout",
        }
    }

    /// The `reason` label of `turnpike_auth_failures_total`, for the auth errors only.
    pub fn auth_failure_reason(&self) -> Option<&'static str> {
        match self {
            GatewayError::MissingApiKey => Some("missing"),
            GatewayError::InvalidApiKey => Some("invalid"),
            GatewayError::AdminUnauthorized => Some("admin"),
            GatewayError::InvalidRequest(_)
            | GatewayError::InsufficientBalance
            | GatewayError::AgentNotFound
            | GatewayError::NotFound
            | GatewayError::MethodNotAllowed { .. }
            | GatewayError::PayloadTooLarge { .. }
            | GatewayError::UnsupportedMediaType
            | GatewayError::RateLimited { .. }
            | GatewayError::HeadersTooLarge { .. }
            | GatewayError::UpstreamUnavailable
            | GatewayError::StoreUnavailable
            | GatewayError::UpstreamTimeout
            | GatewayError::Conflict(_)
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
            GatewayError::InvalidRequest(_)
            | GatewayError::InsufficientBalance
            | GatewayError::AgentNotFound
            | GatewayError::NotFound
            | GatewayError::PayloadTooLarge { .. }
            | GatewayError::UnsupportedMediaType
            | GatewayError::HeadersTooLarge { .. }
            | GatewayError::UpstreamUnavailable
            | GatewayError::StoreUnavailable
            | GatewayError::UpstreamTimeout
            | GatewayError::Conflict(_)
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
}
