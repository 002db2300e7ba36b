//! The worker's complete answer on its way back: its `usage` read (and judged), and its
//! `session_id` filled in when the worker left it out.

use bytes::Bytes;

use crate::ctx::RequestCtx;
use crate::metering::{read_answer, with_session_id};
use crate::state::Shared;

/// Records the usage of a 2xx answer in `ctx` (or counts why it was not credited) and
/// returns the body the client receives.
pub fn finish(shared: &Shared, ctx: &mut RequestCtx, status: u16, body: Bytes) -> Bytes {
    if let Some(call) = ctx.call.as_mut() {
        call.worker_status = status;
    }
    let (Some(call), Some(agent)) = (ctx.call.as_ref(), ctx.agent.as_ref()) else {
        return body;
    };
    if !(200..300).contains(&status) {
        return body;
    }
    let answer = read_answer(&body);
    match answer.usage {
        Ok(usage) => ctx.usage = Some(usage),
        Err(problem) => shared
            .metrics
            .usage_rejected
            .with_label_values(&[agent.id.as_str(), problem.label()])
            .inc(),
    }
    if answer.is_object && !answer.has_session_id {
        Bytes::from(with_session_id(&body, &call.session_id))
    } else {
        body
    }
}
