//! Pingora's `ProxyHttp` for Turnpike: glue only. A call is judged (`intake`), exchanged
//! with a worker (`exchange`), its answer read (`answer`) and sent (`reply`), all in
//! `request_filter`; `logging` settles it (`outcome`) however it ended. Pingora's streaming
//! upstream phases are not used: see `exchange` for why.

use async_trait::async_trait;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType};
use std::sync::Arc;
use std::time::Instant;

use crate::ctx::RequestCtx;
use crate::error::GatewayError;
use crate::exchange::{Outgoing, WorkerAnswer};
use crate::state::Shared;
use crate::{answer, intake, outcome, reply, upstream};

pub struct Gateway {
    pub shared: Arc<Shared>,
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new(Arc::clone(&self.shared))
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

    /// Answers every call itself; always `Ok(true)` unless the client could not be written.
    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        let answered = match intake::admit(&self.shared, session, ctx).await {
            Ok(()) => self.forward(session, ctx).await,
            Err(error) => Err(error),
        };
        // The call is metered before the client is written to.
        outcome::settle(&self.shared, ctx).await;
        match answered {
            Ok(worker) => reply::send_answer(session, ctx, worker).await?,
            Err(error) => {
                // Recorded first, so the access log has it even if the client is gone.
                ctx.refusal = Some(error.clone());
                reply::send_error(session, ctx, &error).await?;
            }
        }
        Ok(true)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> pingora::Result<Box<HttpPeer>> {
        // Never reached: `request_filter` answers every call.
        Error::e_explain(
            ErrorType::InternalError,
            "calls are forwarded by request_filter",
        )
    }

    /// Reached when answering failed (the client went away: nothing to send) or on an
    /// internal error before anything was sent.
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let client_gone = matches!(
            e.etype(),
            ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed
        );
        let error_code = if client_gone || session.response_written().is_some() {
            0
        } else {
            let error = GatewayError::UpstreamUnavailable;
            ctx.refusal = Some(error.clone());
            let _ = reply::send_error(session, ctx, &error).await;
            error.status()
        };
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

impl Gateway {
    /// Sends an admitted call to its pool and returns the answer the client gets.
    async fn forward(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
    ) -> Result<WorkerAnswer, GatewayError> {
        let snapshot = Arc::clone(&ctx.snapshot);
        let unavailable = || GatewayError::UpstreamUnavailable;
        let pool = ctx
            .agent
            .as_ref()
            .and_then(|agent| snapshot.pools.get(&agent.pool))
            .ok_or_else(unavailable)?;
        let client_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let header = upstream::outgoing_header(session.req_header(), client_ip, ctx, &pool.config)
            .map_err(|_| unavailable())?;
        let call = ctx.call.as_ref().ok_or_else(unavailable)?;
        let outgoing = Outgoing {
            header,
            body: &call.forward_body,
            session_id: &call.session_id,
            max_answer_bytes: snapshot.config.limits.max_response_bytes,
        };
        ctx.upstream_started = Some(Instant::now());
        let mut worker = self.shared.upstreams.exchange(pool, outgoing).await?;
        let status = worker.header.status.as_u16();
        worker.body = answer::finish(&self.shared, ctx, status, worker.body);
        Ok(worker)
    }
}
