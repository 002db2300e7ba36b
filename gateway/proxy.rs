//! Pingora's `ProxyHttp` for Turnpike: glue only. Each phase hands its work to the module
//! that owns the concern.

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::ctx::RequestCtx;
use crate::error::GatewayError;
use crate::state::Shared;
use crate::{answer, intake, outcome, reply};

/// Headers a client must not be able to forge towards a worker.
const IDENTITY_HEADERS: [&str; 5] = [
    "x-request-id",
    "x-agent-id",
    "x-session-id",
    "x-key-id",
    "x-account-id",
];

pub struct Gateway {
    pub shared: Arc<Shared>,
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new(self.shared.snapshot.load_full())
    }

    async fn early_request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        ctx.request_id = intake::request_id(session);
        ctx.counted_inflight = true;
        self.shared.metrics.inflight.inc();
        Ok(())
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        match intake::admit(&self.shared, session, ctx).await {
            Ok(()) => Ok(false),
            Err(error) => {
                reply::send_error(session, ctx, &error).await?;
                ctx.refusal = Some(error);
                Ok(true)
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Box<HttpPeer>> {
        let unavailable = || {
            Error::explain(
                ErrorType::HTTPStatus(502),
                "no upstream endpoint left to try",
            )
        };
        let call = ctx.call.as_ref().ok_or_else(unavailable)?;
        let pool = ctx
            .snapshot
            .pools
            .get(&call.agent.pool)
            .ok_or_else(unavailable)?;
        let addr = pool
            .select(&call.session_id, &ctx.upstream.tried)
            .ok_or_else(unavailable)?;
        ctx.upstream.tried.push(addr);
        ctx.upstream.started.get_or_insert_with(Instant::now);
        ctx.upstream.body_sent = false;
        Ok(Box::new(pool.peer(addr)))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let pool_size = ctx
            .call
            .as_ref()
            .and_then(|c| ctx.snapshot.pools.get(&c.agent.pool))
            .map_or(0, |p| p.size());
        // Nothing reached the worker yet, so another endpoint may take the call.
        e.set_retry(ctx.upstream.tried.len() < pool_size);
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        _session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        // A pooled connection the worker had already closed fails before any answer; the
        // buffered body lets the call go again on a fresh connection.
        let answered = ctx.answer.status != 0;
        if answered {
            e.set_retry(false);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        let Some(call) = ctx.call.as_ref() else {
            return Ok(());
        };
        let Some(pool) = ctx.snapshot.pools.get(&call.agent.pool) else {
            return Ok(());
        };
        let path = pool.config.path.render(&call.agent.id);
        request.set_uri(
            http::Uri::try_from(path)
                .map_err(|e| Error::because(ErrorType::InternalError, "upstream path", e))?,
        );
        request.remove_header(&http::header::AUTHORIZATION);
        request.remove_header(&http::header::TRANSFER_ENCODING);
        request.remove_header(&http::header::EXPECT);
        for name in IDENTITY_HEADERS {
            request.remove_header(name);
        }
        request.insert_header("x-request-id", ctx.request_id.as_str())?;
        request.insert_header("x-agent-id", call.agent.id.as_str())?;
        request.insert_header("x-session-id", call.session_id.as_str())?;
        request.insert_header("x-key-id", call.key.id.as_str())?;
        request.insert_header("x-account-id", call.key.account.as_str())?;
        request.insert_header(
            http::header::CONTENT_LENGTH,
            call.forward_body.len().to_string(),
        )?;
        for (name, value) in &pool.config.headers {
            request.insert_header(name.clone(), value.clone())?;
        }
        Ok(())
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        // The client's body was read and judged in `request_filter`; the worker gets the
        // forwarded version, once per attempt.
        if let Some(call) = ctx.call.as_ref() {
            *body = if ctx.upstream.body_sent {
                None
            } else {
                Some(call.forward_body.clone())
            };
            ctx.upstream.body_sent = true;
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        answer::on_head(response, ctx).map_err(|_| too_large())?;
        reply::add_common_headers(response, ctx)
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Option<Duration>> {
        answer::on_body(&self.shared, body, end_of_stream, ctx).map_err(|_| too_large())?;
        Ok(None)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let error = upstream_error(e);
        let error_code = match &error {
            Some(error) if session.response_written().is_none() => {
                let _ = reply::send_error(session, ctx, error).await;
                error.status()
            }
            Some(error) => error.status(),
            None => 0,
        };
        ctx.refusal = error;
        FailToProxy {
            error_code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        let status = session.response_written().map_or(0, |h| h.status.as_u16());
        outcome::finish(&self.shared, ctx, status).await;
    }
}

fn too_large() -> Box<Error> {
    Error::explain(
        ErrorType::HTTPStatus(502),
        "worker answer exceeds limits.max_response_bytes",
    )
}

/// The contract's error for a failed proxy attempt; `None` when the client is gone.
fn upstream_error(e: &Error) -> Option<GatewayError> {
    match (e.esource(), e.etype()) {
        (_, ErrorType::HTTPStatus(504)) => Some(GatewayError::UpstreamTimeout),
        (_, ErrorType::HTTPStatus(_)) => Some(GatewayError::UpstreamUnavailable),
        (ErrorSource::Upstream, ErrorType::ReadTimedout | ErrorType::WriteTimedout) => {
            Some(GatewayError::UpstreamTimeout)
        }
        (ErrorSource::Upstream, _) => Some(GatewayError::UpstreamUnavailable),
        (
            ErrorSource::Downstream,
            ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed,
        ) => None,
        (ErrorSource::Downstream, _) => Some(GatewayError::InvalidRequest(
            "Malformed HTTP request".into(),
        )),
        (ErrorSource::Internal | ErrorSource::Unset, _) => Some(GatewayError::UpstreamUnavailable),
    }
}
