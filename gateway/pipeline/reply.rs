//! Writing answers to the client: the worker's, and the gateway's own errors.

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use std::future::Future;
use std::time::Duration;

use turnpike_core::limits::Quota;

use super::meter::MeteredAnswer;
use crate::error::GatewayError;
use crate::headers::{
    connection_options, RATELIMIT_LIMIT, RATELIMIT_REMAINING, RATELIMIT_RESET, X_REQUEST_ID,
};

/// Worker headers that describe the worker's connection or framing, not the answer. Names,
/// not text: removing by text parses the text into a name first, each call.
const HOP_BY_HOP: [HeaderName; 7] = [
    http::header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
];

/// Worker headers about the worker itself, not the answer: the client never learns which
/// server software stands behind the gateway.
const WORKER_ONLY: [HeaderName; 1] = [http::header::SERVER];

/// How much of an answer one write hands the connection: a client that reads at all keeps
/// its connection, one that reads nothing for `limits.write_timeout` loses it.
const WRITE_SLICE_BYTES: usize = 64 * 1024;

/// A call the gateway answers itself.
pub struct Refused {
    pub error: GatewayError,
    /// The `RateLimit-*` numbers, once the caller is known.
    pub quota: Option<Quota>,
}

impl Refused {
    /// A refusal that has no `RateLimit-*` numbers (yet).
    pub fn plain(error: GatewayError) -> Self {
        Self { error, quota: None }
    }
}

/// What every answer to a call carries besides its own headers.
pub struct Common<'a> {
    pub request_id: &'a str,
    /// The tightest request bucket, for an authenticated call.
    pub quota: Option<Quota>,
    /// `limits.write_timeout`: the longest a client may read nothing.
    pub write_timeout: Duration,
}

/// Writes the worker's answer with its status and headers, an exact `Content-Length`, and
/// the gateway's own headers: one write for head and body.
pub async fn send_answer(
    session: &mut Session,
    common: &Common<'_>,
    answer: MeteredAnswer,
) -> pingora::Result<()> {
    let mut header = client_head(answer.header, common)?;
    header.insert_header(
        http::header::CONTENT_LENGTH,
        HeaderValue::from(answer.body.len()),
    )?;
    write(session, header, answer.body, common.write_timeout).await
}

/// Writes a streamed answer's head: the worker's status and headers, the gateway's own,
/// and no length: chunked over HTTP/1.1 (Pingora's HTTP/2 writer drops the header and
/// frames the body itself); to an HTTP/1.0 client, which knows no chunks, the answer ends
/// when the connection closes. Sent at once, so the client's first byte waits for nothing.
pub async fn send_stream_head(
    session: &mut Session,
    common: &Common<'_>,
    header: Box<ResponseHeader>,
) -> pingora::Result<()> {
    let mut header = client_head(header, common)?;
    header.remove_header(&http::header::CONTENT_LENGTH);
    if session.req_header().version == http::Version::HTTP_10 {
        session.set_keepalive(None);
    } else {
        header.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
    }
    within(
        common.write_timeout,
        session.write_response_header(header, false),
    )
    .await
}

/// Writes the next bytes of a streamed answer; `end` ends it.
pub async fn send_stream_bytes(
    session: &mut Session,
    write_timeout: Duration,
    bytes: Bytes,
    end: bool,
) -> pingora::Result<()> {
    within(write_timeout, session.write_response_body(Some(bytes), end)).await
}

/// The worker's head as the client gets it: its status and the headers about the answer,
/// with the gateway's own added.
fn client_head(
    mut header: Box<ResponseHeader>,
    common: &Common<'_>,
) -> pingora::Result<Box<ResponseHeader>> {
    // The worker may have answered over HTTP/2; the client gets the answer in its own
    // protocol (Pingora's HTTP/2 writer ignores the version, its HTTP/1 writer needs 1.1).
    header.set_version(http::Version::HTTP_11);
    for name in connection_options(&header.headers) {
        header.remove_header(name.as_str());
    }
    for name in HOP_BY_HOP.iter().chain(&WORKER_ONLY) {
        header.remove_header(name);
    }
    add_common_headers(&mut header, common)?;
    Ok(header)
}

/// Writes `error` in the contract's shape. A body the client was still sending is left
/// unread, so the connection is not reused.
pub async fn send_error(
    session: &mut Session,
    common: &Common<'_>,
    error: &GatewayError,
) -> pingora::Result<()> {
    let body = Bytes::from(error.body(common.request_id));
    let mut header = Box::new(ResponseHeader::build_no_case(error.status(), Some(6))?);
    header.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    header.insert_header(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()))?;
    if let Some((name, value)) = error.extra_headers() {
        header.insert_header(name, value)?;
    }
    add_common_headers(&mut header, common)?;
    if !session.is_body_done() {
        session.set_keepalive(None);
    }
    write(session, header, body, common.write_timeout).await
}

/// Writes head and body, each write given at most `write_timeout` to be taken by the client:
/// one that reads nothing for that long is cut off (its task and answer freed), however
/// large the answer.
async fn write(
    session: &mut Session,
    header: Box<ResponseHeader>,
    mut body: Bytes,
    write_timeout: Duration,
) -> pingora::Result<()> {
    let empty = body.is_empty();
    within(write_timeout, session.write_response_header(header, empty)).await?;
    while !body.is_empty() {
        let slice = body.split_to(body.len().min(WRITE_SLICE_BYTES));
        let end = body.is_empty();
        within(write_timeout, session.write_response_body(Some(slice), end)).await?;
    }
    Ok(())
}

async fn within(
    limit: Duration,
    write: impl Future<Output = pingora::Result<()>>,
) -> pingora::Result<()> {
    // Pingora's timers: lazily armed, so a write that completes at once costs none.
    match pingora::time::timeout(limit, write).await {
        Ok(written) => written,
        Err(_) => pingora::Error::e_explain(
            pingora::ErrorType::WriteTimedout,
            "the client read nothing for limits.write_timeout",
        ),
    }
}

/// `X-Request-Id` always; `RateLimit-*` for an authenticated call with a request bucket.
fn add_common_headers(header: &mut ResponseHeader, common: &Common) -> pingora::Result<()> {
    header.insert_header(X_REQUEST_ID, common.request_id)?;
    if let Some(quota) = common.quota {
        header.insert_header(RATELIMIT_LIMIT, HeaderValue::from(quota.limit))?;
        header.insert_header(RATELIMIT_REMAINING, HeaderValue::from(quota.remaining))?;
        header.insert_header(RATELIMIT_RESET, HeaderValue::from(quota.reset_secs))?;
    }
    Ok(())
}
