//! An admitted call sent to its agent's pool, while the client is watched: a client that goes
//! away before the worker has answered ends the exchange, which closes the worker's
//! connection (so the agent can stop working) and leaves nothing to charge (SPEC §2).

use pingora::proxy::Session;
use pingora::ErrorType;
use std::time::Instant;

use super::admit::Admitted;
use super::ctx::{CallIds, CallRecord};
use crate::config::CallConfig;
use crate::error::GatewayError;
use crate::services::Services;
use crate::upstream::head::{outgoing_head, Identity, Peer};
use crate::upstream::{Outgoing, WorkerAnswer};

/// The worker's answer to an admitted call: 502 when no worker could be reached or its
/// answer was unusable, 504 when the pool's timeout ran out, [`GatewayError::ClientGone`]
/// when the client hung up first.
pub async fn forward(
    services: &Services,
    session: &mut Session,
    call: &Admitted<'_>,
    config: &CallConfig,
    ids: &CallIds,
    record: &mut CallRecord,
) -> Result<WorkerAnswer, GatewayError> {
    let (route, key) = (call.caller.route, &call.caller.key);
    let who = Identity {
        request_id: &ids.request_id,
        call_id: &ids.call_id,
        agent_id: &route.agent.id,
        session_id: &call.chat.session_id,
        key_id: &key.id,
        account: &key.account,
        peer: peer(session, config),
        trace: &ids.trace,
    };
    let body = &call.chat.forward_body;
    let header = outgoing_head(session.req_header(), &who, body.len(), &route.pool.config)
        .map_err(|error| {
            tracing::error!(call_id = %ids.call_id, %error, "cannot write the worker's request head");
            GatewayError::UpstreamUnavailable
        })?;
    let outgoing = Outgoing {
        header,
        body,
        session_id: &call.chat.session_id,
        max_answer_bytes: config.limits.max_response_bytes,
    };
    record.upstream_started = Some(Instant::now());
    let exchange = services.upstreams.exchange(&route.pool, outgoing);
    let answer = tokio::select! {
        // An answer that is in wins over a client gone at the same moment: it is metered.
        biased;
        answer = exchange => answer.map_err(GatewayError::from),
        () = client_gone(session) => Err(GatewayError::ClientGone),
    };
    record.upstream_finished = Some(Instant::now());
    let answer = answer?;
    record.upstream_endpoint = Some(answer.endpoint);
    Ok(answer)
}

/// Who is calling, as the forwarding headers tell the worker.
fn peer(session: &Session, config: &CallConfig) -> Peer {
    let ip = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip().to_canonical());
    let trusted = ip.is_some_and(|ip| config.trusted_proxies.iter().any(|n| n.contains(&ip)));
    let tls = session
        .digest()
        .is_some_and(|digest| digest.ssl_digest.is_some());
    Peer {
        ip,
        trusted,
        scheme: if tls { "https" } else { "http" },
    }
}

/// Resolves once the client has gone away: an HTTP/1 connection closed or reset (a client
/// that half-closes its side counts as gone, as nginx and Envoy count it), an HTTP/2 stream
/// reset or its connection closed. The whole body has been read, so anything more it sends
/// is a request pipelined behind this one: the connection is then not kept alive (pipelining
/// is off, RFC 9112 §9.3.2 lets a server close) and the client is no longer watched.
pub(super) async fn client_gone(session: &mut Session) {
    match session.as_downstream_mut().read_body_or_idle(true).await {
        Err(error)
            if matches!(
                error.etype(),
                ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::H2Error
            ) => {}
        _ => {
            session.set_keepalive(None);
            std::future::pending::<()>().await
        }
    }
}
