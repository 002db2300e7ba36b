//! An admitted call sent to its agent's pool.

use pingora::proxy::Session;
use std::time::Instant;

use super::admit::Admitted;
use super::ctx::{CallIds, CallRecord};
use crate::config::Limits;
use crate::error::GatewayError;
use crate::services::Services;
use crate::upstream::head::{outgoing_head, Identity};
use crate::upstream::{Outgoing, WorkerAnswer};

/// The worker's answer to an admitted call: 502 when no worker could be reached or its
/// answer was unusable, 504 when the pool's timeout ran out.
pub async fn forward(
    services: &Services,
    session: &Session,
    call: &Admitted<'_>,
    limits: &Limits,
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
        client_ip: session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip()),
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
        max_answer_bytes: limits.max_response_bytes,
    };
    record.upstream_started = Some(Instant::now());
    let answer = services.upstreams.exchange(&route.pool, outgoing).await?;
    record.upstream_endpoint = Some(answer.endpoint);
    Ok(answer)
}
