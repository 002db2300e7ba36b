//! Writing the gateway's own answers, and the headers every answer carries.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

use crate::ctx::RequestCtx;
use crate::error::GatewayError;

/// Writes `error` in the contract's shape. A body the client was still sending is left
/// unread, so the connection is not reused.
pub async fn send_error(
    session: &mut Session,
    ctx: &RequestCtx,
    error: &GatewayError,
) -> pingora::Result<()> {
    let body = Bytes::from(error.body(&ctx.request_id));
    let mut header = ResponseHeader::build(error.status(), Some(6))?;
    header.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    header.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    if let Some((name, value)) = error.extra_headers() {
        header.insert_header(name, value)?;
    }
    add_common_headers(&mut header, ctx)?;
    if !session.is_body_done() {
        session.set_keepalive(None);
    }
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session.write_response_body(Some(body), true).await
}

/// `X-Request-Id` always; `RateLimit-*` for an authenticated call with a request bucket.
pub fn add_common_headers(header: &mut ResponseHeader, ctx: &RequestCtx) -> pingora::Result<()> {
    header.insert_header("x-request-id", ctx.request_id.as_str())?;
    if let Some(quota) = ctx.call.as_ref().and_then(|c| c.quota) {
        header.insert_header("ratelimit-limit", quota.limit.to_string())?;
        header.insert_header("ratelimit-remaining", quota.remaining.to_string())?;
        header.insert_header("ratelimit-reset", quota.reset_secs.to_string())?;
    }
    Ok(())
}
