//! The worker's answer on its way back: buffered (bounded) so its `usage` can be read and
//! its `session_id` filled in, then sent to the client in one piece.

use bytes::Bytes;
use pingora::http::ResponseHeader;

use crate::ctx::RequestCtx;
use crate::metering::{read_answer, with_session_id};
use crate::state::Shared;

/// The answer is larger than `limits.max_response_bytes`.
#[derive(Debug)]
pub struct TooLarge;

/// Runs on the worker's response head. The body may grow by a `session_id`, so the length
/// is dropped and the answer goes out chunked.
pub fn on_head(header: &mut ResponseHeader, ctx: &mut RequestCtx) -> Result<(), TooLarge> {
    ctx.answer.status = header.status.as_u16();
    let cap = ctx.snapshot.config.limits.max_response_bytes;
    let declared = header
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|length| length > cap) {
        return Err(TooLarge);
    }
    ctx.answer.body.reserve(declared.unwrap_or(0));
    header.remove_header(&http::header::CONTENT_LENGTH);
    header.remove_header(&http::header::TRANSFER_ENCODING);
    Ok(())
}

/// Runs on each piece of the worker's body: holds it back until the end, then releases the
/// whole answer with usage read and `session_id` inserted when the worker left it out.
pub fn on_body(
    shared: &Shared,
    body: &mut Option<Bytes>,
    end_of_stream: bool,
    ctx: &mut RequestCtx,
) -> Result<(), TooLarge> {
    if let Some(piece) = body.take() {
        if ctx.answer.body.len() + piece.len() > ctx.snapshot.config.limits.max_response_bytes {
            return Err(TooLarge);
        }
        ctx.answer.body.extend_from_slice(&piece);
    }
    if !end_of_stream || ctx.answer.finished {
        return Ok(());
    }
    ctx.answer.finished = true;
    let whole = std::mem::take(&mut ctx.answer.body);
    *body = Some(Bytes::from(finish(shared, ctx, whole)));
    Ok(())
}

fn finish(shared: &Shared, ctx: &mut RequestCtx, whole: Vec<u8>) -> Vec<u8> {
    let Some(call) = ctx.call.as_ref() else {
        return whole;
    };
    if !(200..300).contains(&ctx.answer.status) {
        return whole;
    }
    let answer = read_answer(&whole);
    match answer.usage {
        Ok(usage) => ctx.answer.usage = Some(usage),
        Err(problem) => shared
            .metrics
            .usage_rejected
            .with_label_values(&[call.agent.id.as_str(), problem.label()])
            .inc(),
    }
    if answer.is_object && !answer.has_session_id {
        with_session_id(&whole, &call.session_id)
    } else {
        whole
    }
}
