//! Writing answers to the client: the worker's, and the gateway's own errors.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

use crate::ctx::RequestCtx;
use crate::error::GatewayError;
use crate::exchange::WorkerAnswer;

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
    let mut header =
        ResponseHeader::build(worker.header.status, Some(worker.header.headers.len() + 4))?;
    for (name, value) in &worker.header.headers {
        if !HOP_BY_HOP.contains(&name.as_str()) && name != http::header::CONTENT_LENGTH {
            header.append_header(name.clone(), value.clone())?;
        }
    }
    header.insert_header(http::header::CONTENT_LENGTH, worker.body.len().to_string())?;
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
    write(session, header, body).await
}

async fn write(session: &mut Session, header: ResponseHeader, body: Bytes) -> pingora::Result<()> {
    let empty = body.is_empty();
    session
        .write_response_header(Box::new(header), empty)
        .await?;
    if !empty {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

/// `X-Request-Id` always; `RateLimit-*` for an authenticated call with a request bucket.
fn add_common_headers(header: &mut ResponseHeader, ctx: &RequestCtx) -> pingora::Result<()> {
    header.insert_header("x-request-id", ctx.request_id.as_str())?;
    if let Some(quota) = ctx.call.as_ref().and_then(|c| c.quota) {
        header.insert_header("ratelimit-limit", quota.limit.to_string())?;
        header.insert_header("ratelimit-remaining", quota.remaining.to_string())?;
        header.insert_header("ratelimit-reset", quota.reset_secs.to_string())?;
    }
    Ok(())
}
