//! Pingora's `ProxyHttp` for Turnpike: glue only, each phase handing over to the module
//! that owns it. Every call is answered in `request_filter` by [`pipeline::serve`], which
//! runs the worker exchange itself (see `upstream::exchange` for why); Pingora's streaming
//! upstream phases are not used.

use async_trait::async_trait;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType};
use std::sync::Arc;

use crate::error::GatewayError;
use crate::pipeline::ctx::RequestCtx;
use crate::pipeline::reply::{self, Common};
use crate::pipeline::{self, finish, intake};
use crate::services::Services;

pub struct Gateway {
    pub services: Arc<Services>,
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    /// Runs first for every request, once its head is read.
    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::start()
    }

    /// The request head has been read: the call gets its request id and trace.
    async fn early_request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        ctx.ids.request_id = intake::request_id(session.req_header());
        ctx.ids.trace = intake::trace(session.req_header());
        Ok(())
    }

    /// Answers every call itself: always `Ok(true)` unless the client could not be written.
    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        pipeline::serve(&self.services, session, ctx).await?;
        Ok(true)
    }

    /// Never reached: `request_filter` answers every call.
    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> pingora::Result<Box<HttpPeer>> {
        Error::e_explain(
            ErrorType::InternalError,
            "calls are forwarded by request_filter",
        )
    }

    /// Reached when answering failed (the client went away: nothing to send) or on an
    /// internal error before anything was sent, which is answered with a 502.
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let client_gone = matches!(
            e.etype(),
            ErrorType::ReadError
                | ErrorType::WriteError
                | ErrorType::WriteTimedout
                | ErrorType::ConnectionClosed
        );
        let error_code = if client_gone || session.response_written().is_some() {
            0
        } else {
            let error = ctx.record.refusal.insert(GatewayError::UpstreamUnavailable);
            let common = Common {
                request_id: &ctx.ids.request_id,
                quota: None,
                write_timeout: self.services.snapshot().config.limits.write_timeout,
            };
            let _ = reply::send_error(session, &common, error).await;
            error.status()
        };
        FailToProxy {
            error_code,
            can_reuse_downstream: false,
        }
    }

    /// Runs once per call however it ended: metrics and the access log.
    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        let status = session.response_written().map_or(0, |h| h.status.as_u16());
        finish::finish(&self.services.metrics, ctx, status);
    }
}
