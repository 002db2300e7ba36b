//! Writing answers to the client: the worker's, and the gateway's own errors.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

use crate::ctx::RequestCtx;
use crate::error::GatewayError;
use crate::exchange::WorkerAnswer;
use crate::headers::{RATELIMIT_LIMIT, RATELIMIT_REMAINING, RATELIMIT_RESET, X_REQUEST_ID};
use http::HeaderValue;

/// Worker headers that describe the worker's connection or framing, not the answer.
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Writes the worker's answer with its status and headers, an exact `Content-Length`, and
/// the gateway's own headers: one write for head and body.
pub async fn send_answer(
    session: &mut Session,
    ctx: &RequestCtx,
    worker: WorkerAnswer,
) -> pingora::Result<()> {
    let mut header = worker.header;
    for name in HOP_BY_HOP {
        header.remove_header(name);
    }
    header.insert_header(
        http::header::CONTENT_LENGTH,
        HeaderValue::from(worker.body.len()),
    )?;
    add_common_headers(&mut header, ctx)?;
    write(session, header, worker.body).await
}

/// Writes `error` in the contract's shape. A body the client was still sending is left
/// unread, so the connection is not reused.
pub async fn send_error(
    session: &mut Session,
    ctx: &RequestCtx,
    error: &GatewayError,
) -> pingora::Result<()> {
    let body = Bytes::from(error.body(&ctx.request_id));
    let mut header = Box::new(ResponseHeader::build_no_case(error.status(), Some(6))?);
    header.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    header.insert_header(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()))?;
    if let Some((name, value)) = error.extra_headers() {
        header.insert_header(name, value)?;
    }
    add_common_headers(&mut header, ctx)?;
    if !session.is_body_done() {
        session.set_keepalive(None);
    }
    write(session, header, body).await
}

async fn write(
    session: &mut Session,
    header: Box<ResponseHeader>,
    body: Bytes,
) -> pingora::Result<()> {
    let empty = body.is_empty();
    session.write_response_header(header, empty).await?;
    if !empty {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

/// `X-Request-Id` always; `RateLimit-*` for an authenticated call with a request bucket.
fn add_common_headers(header: &mut ResponseHeader, ctx: &RequestCtx) -> pingora::Result<()> {
    header.insert_header(X_REQUEST_ID, ctx.request_id.as_str())?;
    if let Some(quota) = ctx.quota {
        header.insert_header(RATELIMIT_LIMIT, HeaderValue::from(quota.limit))?;
        header.insert_header(RATELIMIT_REMAINING, HeaderValue::from(quota.remaining))?;
        header.insert_header(RATELIMIT_RESET, HeaderValue::from(quota.reset_secs))?;
    }
    Ok(())
}
