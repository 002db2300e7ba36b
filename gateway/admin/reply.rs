//! The admin listener's answers, JSON bodies and path segments.

use http::StatusCode;
use pingora::protocols::http::ServerSession;

use crate::error::{AdminProblem, GatewayError};

/// Admin request bodies are small JSON documents.
const MAX_ADMIN_BODY: usize = 16 * 1024;

/// A status, a body and its media type; or an error in the contract's shape.
pub type Answer = Result<(StatusCode, Vec<u8>, &'static str), GatewayError>;

pub fn json_ok(value: serde_json::Value) -> Answer {
    json(StatusCode::OK, value)
}

pub fn json(status: StatusCode, value: serde_json::Value) -> Answer {
    Ok((
        status,
        serde_json::to_vec(&value).unwrap_or_default(),
        "application/json",
    ))
}

/// The request body as `T`: 413 above the admin limit, 400 when it is not `T`.
pub async fn read_json<T: serde::de::DeserializeOwned>(
    session: &mut ServerSession,
) -> Result<T, GatewayError> {
    let mut body = Vec::new();
    while let Some(chunk) = session
        .read_request_body()
        .await
        .map_err(|_| AdminProblem::Unreadable)?
    {
        if body.len() + chunk.len() > MAX_ADMIN_BODY {
            return Err(GatewayError::PayloadTooLarge {
                limit: MAX_ADMIN_BODY,
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(serde_json::from_slice(&body).map_err(|e| AdminProblem::NotJson(e.to_string()))?)
}

/// A path segment with its `%XX` escapes decoded (ids may hold any character).
pub fn segment(raw: &str) -> Result<String, GatewayError> {
    let bad = || AdminProblem::BadEscape(raw.to_owned());
    let mut bytes = Vec::with_capacity(raw.len());
    let mut rest = raw.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        if byte == b'%' {
            let hex = tail.get(..2).ok_or_else(bad)?;
            let hex = std::str::from_utf8(hex).map_err(|_| bad())?;
            bytes.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            rest = &tail[2..];
        } else {
            bytes.push(byte);
            rest = tail;
        }
    }
    Ok(String::from_utf8(bytes).map_err(|_| bad())?)
}

/// The store could not answer: 503, whatever the operation.
pub fn unavailable(_: crate::store::StoreError) -> GatewayError {
    GatewayError::StoreUnavailable
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_decode_escapes_and_refuse_broken_ones() {
        assert_eq!(segment("acct%2Fjane%20b").unwrap(), "acct/jane b");
        assert_eq!(segment("plain").unwrap(), "plain");
        for bad in ["%", "%2", "%zz", "%ff"] {
            assert_eq!(
                segment(bad),
                Err(GatewayError::InvalidAdminRequest(AdminProblem::BadEscape(
                    bad.into()
                ))),
                "{bad}"
            );
        }
    }
}
