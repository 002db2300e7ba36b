//! One call, start to end, as a pipeline of values: each stage takes what the one before
//! made and returns what the next needs, so a stage cannot run on a call that has not
//! passed the ones before it.
//!
//! ```text
//! edge                  the head, before Pingora parses it              (431, or closed)
//! intake::well_formed   Host, field values, HTTP/2 fragments        (400 closed, 404)
//! intake::authenticate  route, key               -> Authenticated   (404/405, 401)
//! intake::authorize     agent and scope          -> Caller          (404)
//! intake::read_chat     body                     -> Chat            (408, 413, 415, 400)
//! admit::admit          one store call           -> Admitted        (429, 402, 503)
//!                                                   holding an OpenCall
//! forward::forward      the worker exchange      -> WorkerAnswer    (502, 504; client gone)
//! meter::meter          usage, session_id        -> MeteredAnswer   (502 invalid usage)
//! OpenCall::settle      one store call           -> cost
//! reply                 the client's answer
//! ```
//!
//! A worker that answers with a stream (2xx `text/event-stream`) leaves `forward` with its
//! head, and one stage takes over from there: `stream::relay` sends the head at once, then
//! relays and meters event by event, settles, and only then sends the last bytes.
//!
//! The call is settled before the client is written to, so a slow or vanished client can
//! neither delay nor lose its metering; a client that vanishes before the worker answers
//! ends the exchange and is charged nothing. [`ctx::RequestCtx`] only records what the end
//! of the call reports (`finish`, in Pingora's `logging` phase).

pub mod admit;
pub mod ctx;
pub mod finish;
pub mod forward;
pub mod intake;
pub mod meter;
pub mod open_call;
pub mod reply;
pub mod stream;

use pingora::proxy::Session;

use self::admit::Admitted;
use self::ctx::{CallIds, CallRecord, RequestCtx};
use self::intake::Authenticated;
use self::meter::MeteredAnswer;
use self::open_call::Bill;
use self::reply::{Common, Refused};
use self::stream::Streaming;
use crate::error::GatewayError;
use crate::metrics::Metrics;
use crate::services::{Services, Snapshot};
use crate::upstream::{AnswerBody, WorkerAnswer};
use turnpike_core::limits::Quota;

/// The worker's answer as the client gets it: whole, or a stream still to relay.
enum Answered<'s> {
    Whole {
        answer: MeteredAnswer,
        quota: Option<Quota>,
    },
    Stream(Box<Streaming<'s>>),
}

/// Runs one call on the config in force and writes its answer. `Err` only when the client
/// could not be written to.
pub async fn serve(
    services: &Services,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> pingora::Result<()> {
    let snapshot = services.snapshot();
    // Boxed, so its state (the worker exchange's, the largest) is freed once it is done
    // rather than held for as long as a stream runs: 6 KiB less a stream (load.py --stream).
    let outcome = Box::pin(run(services, &snapshot, session, &ctx.ids, &mut ctx.record)).await;
    // A draining gateway sends each client elsewhere for its next call.
    if services.lifecycle.is_draining() {
        session.set_keepalive(None);
    }
    let write_timeout = snapshot.config.limits.write_timeout;
    match outcome {
        Ok(Answered::Whole { answer, quota }) => {
            let common = Common {
                request_id: &ctx.ids.request_id,
                quota,
                write_timeout,
            };
            reply::send_answer(session, &common, answer).await
        }
        Ok(Answered::Stream(streaming)) => {
            let common = Common {
                request_id: &ctx.ids.request_id,
                quota: streaming.admitted.quota,
                write_timeout,
            };
            stream::relay(
                services,
                session,
                &common,
                *streaming,
                &mut ctx.record,
                ctx.started,
            )
            .await
        }
        Err(Refused {
            error: GatewayError::ClientGone,
            ..
        }) => {
            ctx.record.refusal = Some(GatewayError::ClientGone);
            pingora::Error::e_explain(
                pingora::ErrorType::ConnectionClosed,
                "the client went away before the worker answered",
            )
        }
        Err(Refused { error, quota }) => {
            // Recorded first, so the access log has it even if the client is gone.
            let error = ctx.record.refusal.insert(error);
            let common = Common {
                request_id: &ctx.ids.request_id,
                quota,
                write_timeout,
            };
            reply::send_error(session, &common, error).await
        }
    }
}

async fn run<'s>(
    services: &Services,
    snapshot: &'s Snapshot,
    session: &mut Session,
    ids: &CallIds,
    record: &mut CallRecord,
) -> Result<Answered<'s>, Refused> {
    intake::well_formed(session).map_err(Refused::plain)?;
    let caller = intake::authenticate(services, snapshot, session, record)
        .await
        .map_err(Refused::plain)?;
    // From here on the caller is known: every refusal carries its `RateLimit-*` numbers, as
    // this instance knows them (no store round trip; none at all when the store failed).
    let admitted = match admit_caller(services, snapshot, session, &caller, ids, record).await {
        Ok(admitted) => admitted,
        Err(Refused {
            error: error @ GatewayError::StoreUnavailable,
            quota,
        }) => return Err(Refused { error, quota }),
        Err(Refused { error, quota: None }) => {
            let quota = admit::known_quota(services, snapshot, &caller);
            return Err(Refused { error, quota });
        }
        Err(refused) => return Err(refused),
    };
    let route = admitted.caller.route;
    let answer =
        forward::forward(services, session, &admitted, &snapshot.config, ids, record).await;
    let answer = match answer {
        Ok(WorkerAnswer {
            header,
            body: AnswerBody::Stream(worker),
            ..
        }) => {
            let streaming = Streaming {
                admitted,
                header,
                worker,
            };
            return Ok(Answered::Stream(Box::new(streaming)));
        }
        Ok(WorkerAnswer {
            header,
            body: AnswerBody::Buffered(body),
            ..
        }) => {
            let rule = route.pool.config.on_invalid_usage;
            let session_id = &admitted.chat.session_id;
            meter::meter(
                &services.metrics,
                &route.agent.id,
                session_id,
                rule,
                header,
                body,
            )
        }
        Err(error) => Err(error),
    };
    let (bill, status) = match &answer {
        Ok(answer) => (answer.bill, answer.status()),
        Err(_) => (Bill::Nothing, 0),
    };
    let quota = admitted.quota;
    settle(&services.metrics, admitted, bill, status, record).await;
    match answer {
        Ok(answer) => Ok(Answered::Whole { answer, quota }),
        Err(error) => Err(Refused { error, quota }),
    }
}

/// Everything up to and including the store's admission.
async fn admit_caller<'s>(
    services: &Services,
    snapshot: &'s Snapshot,
    session: &mut Session,
    caller: &Authenticated<'s>,
    ids: &CallIds,
    record: &mut CallRecord,
) -> Result<Admitted<'s>, Refused> {
    let caller = intake::authorize(snapshot, caller).map_err(Refused::plain)?;
    let chat = intake::read_chat(session, &snapshot.config.limits, record)
        .await
        .map_err(Refused::plain)?;
    admit::admit(services, caller, chat, ids).await
}

/// Settles the call as `bill` says, and counts what it used.
async fn settle(
    metrics: &Metrics,
    admitted: Admitted<'_>,
    bill: Bill,
    worker_status: u16,
    record: &mut CallRecord,
) {
    let (usage, cost) = admitted.open.settle(bill, worker_status).await;
    let Some(usage) = usage else { return };
    let route = admitted.caller.route;
    let counters = route.series.get(metrics, &route.agent.id);
    counters.input_tokens.inc_by(usage.input_tokens);
    counters.output_tokens.inc_by(usage.output_tokens);
    if cost > 0 {
        counters.cost.inc_by(cost as u64);
    }
    record.usage = Some(usage);
    record.cost = cost;
}
