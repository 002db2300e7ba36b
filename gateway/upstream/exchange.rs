//! One call's exchange with a worker: send the validated request, read the answer.
//!
//! Turnpike must read a JSON answer completely before the client sees it (the `usage`
//! decides the charge, and `session_id` may have to be added), so the upstream leg is a
//! buffered exchange on Pingora's connector and keep-alive pool rather than Pingora's
//! streaming proxy. That gives the answer an exact `Content-Length` (one write to the
//! client), a real whole-answer timeout, and a call the client cannot cancel by hanging up:
//! a worker's answer is always read, so it is always metered.
//!
//! A 2xx `text/event-stream` answer is the exception: the exchange ends with its head, and
//! hands the relay a [`WorkerStream`] that owns the worker's connection (SPEC §5).

use bytes::{Bytes, BytesMut};
use pingora::connectors::http::Connector;
use pingora::connectors::ConnectorOptions;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::client::HttpSession;
use pingora::protocols::http::v1;
use pingora::protocols::http::v1::client::http_req_header_to_wire;
use pingora::protocols::Stream;
use pingora::{Error, ErrorType};
use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use super::{Pool, WorkerPeer};
use crate::error::GatewayError;
use crate::metrics::EndpointMetrics;

/// Idle keep-alive connections kept to workers, across all pools.
const KEEPALIVE_POOL_SIZE: usize = 1024;
/// How long an idle keep-alive connection to a worker is kept for reuse.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Connections to workers, shared by every call.
pub struct Upstreams {
    connector: Arc<Connector>,
}

/// A worker's answer: its head, and its body as it arrives.
pub struct WorkerAnswer {
    pub header: Box<ResponseHeader>,
    pub body: AnswerBody,
    /// The endpoint that answered.
    pub endpoint: SocketAddr,
}

/// How an answer's body reaches the gateway.
pub enum AnswerBody {
    /// Read whole: its `usage` decides the charge before the client sees a byte.
    Buffered(Bytes),
    /// A 2xx `text/event-stream` answer, its head read: the relay reads its events.
    Stream(Box<WorkerStream>),
}

/// The worker's connection while its streamed answer is relayed. Dropped before the answer
/// ended, it closes the connection, so the worker learns at once that nobody is listening.
pub struct WorkerStream {
    session: HttpSession,
    peer: WorkerPeer,
    connector: Arc<Connector>,
}

impl WorkerStream {
    /// The next bytes of the answer; `None` at its end. An error: the worker broke off.
    pub async fn read(&mut self) -> pingora::Result<Option<Bytes>> {
        self.session.read_response_body().await
    }

    /// The relay is done with the answer: a connection whose answer ended goes back to the
    /// pool; one cut off mid-answer is closed (an HTTP/2 stream is reset), so the worker
    /// can stop working.
    pub async fn finish(mut self) {
        if self.session.response_done() {
            self.connector
                .release_http_session(self.session, &self.peer, Some(IDLE_TIMEOUT))
                .await;
        } else {
            self.session.shutdown().await;
        }
    }
}

/// Why no worker's answer could be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeFailure {
    /// No worker could be reached, or its answer was not valid HTTP or was too large.
    Unavailable,
    /// The pool's `timeout` ran out.
    Timeout,
}

impl From<ExchangeFailure> for GatewayError {
    fn from(failure: ExchangeFailure) -> Self {
        match failure {
            ExchangeFailure::Unavailable => GatewayError::UpstreamUnavailable,
            ExchangeFailure::Timeout => GatewayError::UpstreamTimeout,
        }
    }
}

/// What the gateway sends a worker.
pub struct Outgoing<'a> {
    pub header: RequestHeader,
    pub body: &'a Bytes,
    pub session_id: &'a str,
    pub max_answer_bytes: usize,
}

enum Failure {
    /// Nothing was sent on a fresh connection: another endpoint may take the call.
    Connect,
    /// A pooled connection that broke while the request was still being written: the
    /// worker cannot have run a request it never got whole, so it is safe to send again.
    Stale,
    Timeout,
    TooLarge,
    Broken,
}

impl Default for Upstreams {
    fn default() -> Self {
        Self {
            connector: Arc::new(Connector::new(Some(ConnectorOptions::new(
                KEEPALIVE_POOL_SIZE,
            )))),
        }
    }
}

impl Upstreams {
    /// Sends the call to the pool and returns the worker's whole answer, or a stream's head
    /// and the stream. A failed connect
    /// (or a stale pooled connection) moves on to an endpoint not tried yet; the pool's
    /// `timeout` bounds everything after the worker is chosen.
    pub async fn exchange(
        &self,
        pool: &Pool,
        call: Outgoing<'_>,
    ) -> Result<WorkerAnswer, ExchangeFailure> {
        let deadline = Instant::now() + pool.config.timeout;
        let mut tried = Vec::with_capacity(1);
        let mut resent_after_stale = false;
        while let Some(addr) = pool.select(call.session_id, &tried) {
            tried.push(addr);
            let Some((peer, host)) = pool.peer(addr) else {
                continue;
            };
            let attempt =
                tokio::time::timeout_at(deadline, self.attempt(addr, peer, host, &call)).await;
            if let Some(metrics) = pool.endpoint_metrics(addr) {
                count_attempt(metrics, &attempt);
            }
            match attempt {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(Failure::Stale)) if !resent_after_stale => {
                    // Once per call, the same endpoint again: the pool hands out another
                    // connection, or opens one.
                    resent_after_stale = true;
                    tried.pop();
                }
                Ok(Err(Failure::Connect | Failure::Stale)) => continue,
                Ok(Err(Failure::TooLarge | Failure::Broken)) => {
                    return Err(ExchangeFailure::Unavailable)
                }
                Ok(Err(Failure::Timeout)) | Err(_) => return Err(ExchangeFailure::Timeout),
            }
        }
        Err(ExchangeFailure::Unavailable)
    }

    async fn attempt(
        &self,
        addr: SocketAddr,
        peer: &WorkerPeer,
        host: Option<&str>,
        call: &Outgoing<'_>,
    ) -> Result<WorkerAnswer, Failure> {
        let (session, reused) = self
            .connector
            .get_http_session(peer)
            .await
            .map_err(|_| Failure::Connect)?;
        let (mut session, sent) = send(session, peer, host, call).await;
        let answer = match sent {
            Ok(()) => receive(&mut session, call.max_answer_bytes).await,
            // As Go's client does for a request that is not idempotent: resent only when the
            // worker cannot have had all of it. Once written whole, a worker that did the
            // work and dropped the connection must not run it twice.
            Err(Failure::Broken) if reused => Err(Failure::Stale),
            Err(e) => Err(e),
        };
        match answer {
            Ok(Received::Whole(header, body)) => {
                self.connector
                    .release_http_session(session, peer, Some(IDLE_TIMEOUT))
                    .await;
                Ok(WorkerAnswer {
                    header,
                    body: AnswerBody::Buffered(body),
                    endpoint: addr,
                })
            }
            Ok(Received::StreamHead(header)) => Ok(WorkerAnswer {
                header,
                body: AnswerBody::Stream(Box::new(WorkerStream {
                    session,
                    peer: peer.clone(),
                    connector: Arc::clone(&self.connector),
                })),
                endpoint: addr,
            }),
            Err(failure) => {
                session.shutdown().await;
                Err(failure)
            }
        }
    }
}

/// One attempt in the endpoint's counters, and its passive health: a connect that failed
/// marks it down, any answer up.
fn count_attempt(
    metrics: &EndpointMetrics,
    attempt: &Result<Result<WorkerAnswer, Failure>, tokio::time::error::Elapsed>,
) {
    match attempt {
        Ok(Ok(_)) => {
            metrics.answered.inc();
            metrics.up.set(1);
        }
        Ok(Err(Failure::Connect)) => {
            metrics.connect_failed.inc();
            metrics.up.set(0);
        }
        Ok(Err(Failure::Stale | Failure::Broken)) => metrics.broken.inc(),
        Ok(Err(Failure::TooLarge)) => metrics.too_large.inc(),
        Ok(Err(Failure::Timeout)) | Err(_) => metrics.timed_out.inc(),
    }
}

/// Writes the request. To an HTTP/1.1 worker, head and body leave in one write, so the
/// worker wakes once (Pingora's session writes and flushes the head alone, then the body:
/// a generic proxy does not have the body yet; we do). The session is then made anew on the
/// written connection, as the connector makes one per call, to read the answer.
///
/// A pooled connection the worker closed just as it was handed out (after Pingora's check
/// that it is still open) is seen here only if the one write fails; when the write goes
/// through and the worker's reset comes after it, the answer's read fails instead, which is
/// a 502, not a resend: the worker may have had the whole request.
async fn send(
    session: HttpSession,
    peer: &WorkerPeer,
    host: Option<&str>,
    call: &Outgoing<'_>,
) -> (HttpSession, Result<(), Failure>) {
    match session {
        HttpSession::H1(h1) => {
            let mut stream = h1.into_inner();
            let written = write_whole(&mut stream, host, call).await;
            let session = v1::client::HttpSession::new_with_options(stream, peer);
            (HttpSession::H1(session), written)
        }
        mut framed => {
            let sent = send_framed(&mut framed, host, call).await;
            (framed, sent)
        }
    }
}

/// The request head and body, in one buffer and one write.
async fn write_whole(
    stream: &mut Stream,
    host: Option<&str>,
    call: &Outgoing<'_>,
) -> Result<(), Failure> {
    let header = with_host(&call.header, host)?;
    let mut wire = http_req_header_to_wire(&header).ok_or(Failure::Broken)?;
    wire.extend_from_slice(call.body);
    stream.write_all(&wire).await.map_err(|_| Failure::Broken)?;
    stream.flush().await.map_err(|_| Failure::Broken)
}

/// An HTTP/2 worker's request: Pingora's session frames head and body.
async fn send_framed(
    session: &mut HttpSession,
    host: Option<&str>,
    call: &Outgoing<'_>,
) -> Result<(), Failure> {
    let header = Box::new(with_host(&call.header, host)?.into_owned());
    session
        .write_request_header(header)
        .await
        .map_err(|e| classify(&e))?;
    session
        .write_request_body(call.body.clone(), true)
        .await
        .map_err(|e| classify(&e))?;
    session
        .finish_request_body()
        .await
        .map_err(|e| classify(&e))
}

/// The head with the endpoint's `Host` (an HTTPS endpoint's name), copied only then.
fn with_host<'h>(
    header: &'h RequestHeader,
    host: Option<&str>,
) -> Result<Cow<'h, RequestHeader>, Failure> {
    let Some(host) = host else {
        return Ok(Cow::Borrowed(header));
    };
    let mut header = header.clone();
    header
        .insert_header(http::header::HOST, host)
        .map_err(|_| Failure::Broken)?;
    Ok(Cow::Owned(header))
}

/// What `receive` read: a whole answer, or the head of a stream.
enum Received {
    Whole(Box<ResponseHeader>, Bytes),
    StreamHead(Box<ResponseHeader>),
}

async fn receive(session: &mut HttpSession, max_bytes: usize) -> Result<Received, Failure> {
    loop {
        session
            .read_response_header()
            .await
            .map_err(|e| classify(&e))?;
        let informational = session
            .response_header()
            .is_some_and(|h| h.status.is_informational());
        if !informational {
            break;
        }
    }
    let header = session.response_header().ok_or(Failure::Broken)?;
    if header.status.is_success() && is_event_stream(header) {
        return Ok(Received::StreamHead(Box::new(header.clone())));
    }
    let declared = header
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|length| length > max_bytes) {
        return Err(Failure::TooLarge);
    }
    let header = Box::new(header.clone());
    let mut body = BytesMut::with_capacity(declared.unwrap_or(4096));
    while let Some(piece) = session
        .read_response_body()
        .await
        .map_err(|e| classify(&e))?
    {
        if body.len() + piece.len() > max_bytes {
            return Err(Failure::TooLarge);
        }
        body.extend_from_slice(&piece);
    }
    Ok(Received::Whole(header, body.freeze()))
}

/// `Content-Type: text/event-stream`, with or without parameters.
fn is_event_stream(header: &ResponseHeader) -> bool {
    header
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("text/event-stream"))
}

fn classify(error: &Error) -> Failure {
    match error.etype() {
        ErrorType::ReadTimedout | ErrorType::WriteTimedout => Failure::Timeout,
        _ => Failure::Broken,
    }
}
