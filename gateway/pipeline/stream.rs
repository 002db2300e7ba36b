//! A streamed answer (SPEC §5): a worker's 2xx `text/event-stream` relayed to the client
//! event by event, metered as it flows, settled before its last bytes.
//!
//! ```text
//! head          the worker's head, sent at once                         (first byte)
//! relay loop    each whole event read, judged, written                  (one event held)
//!               `event: session` before the first, when it names none
//!               `on_exhaustion: cut`: the hold extended as usage grows
//!               ends: worker done | client gone | idle or max_stream | cut | drain
//! worker        released to the pool (answer ended) or closed (cut short)
//! settle        the running usage, or the reservation for a client gone without one
//! last bytes    `[DONE]` (held back until settled) or `event: error`, then the end
//! ```

use bytes::Bytes;
use pingora::proxy::Session;
use std::time::{Duration, Instant};
use tokio::time::timeout;

use turnpike_core::billing::cost;
use turnpike_core::limits::BucketKind;
use turnpike_core::sse::{error_event, session_event, Event, EventReader, Next, StreamReading};
use turnpike_core::usage::UsageProblem;

use super::admit::Admitted;
use super::ctx::{CallRecord, StreamRecord};
use super::forward::client_gone;
use super::open_call::Bill;
use super::reply::{self, Common};
use crate::config::{ExhaustionRule, InvalidUsageRule};
use crate::error::GatewayError;
use crate::services::Services;
use crate::upstream::WorkerStream;

/// The largest event relayed: a worker that sends more without ending its event has its
/// stream ended (`end="worker_gone"`), so a stream's memory stays bounded.
pub const MAX_EVENT_BYTES: usize = 1 << 20;

/// An admitted call whose worker answered with a stream.
pub struct Streaming<'s> {
    pub admitted: Admitted<'s>,
    pub header: Box<pingora::http::ResponseHeader>,
    pub worker: Box<WorkerStream>,
}

/// How a stream ended: the `end` label of `turnpike_streams_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The worker ended it, with usage.
    Done,
    /// The worker ended it without usage: nothing charged.
    NoUsage,
    /// Its running usage exhausted the balance or the key's token bucket.
    Cut,
    ClientGone,
    /// The worker broke off, sent an event too large, or a usage that is refused.
    WorkerGone,
    /// `stream_idle_timeout`, `max_stream`, or the drain's `shutdown_grace`.
    Timeout,
}

impl End {
    pub fn label(self) -> &'static str {
        match self {
            End::Done => "done",
            End::NoUsage => "no_usage",
            End::Cut => "cut",
            End::ClientGone => "client_gone",
            End::WorkerGone => "worker_gone",
            End::Timeout => "timeout",
        }
    }
}

/// Why the relay loop stopped, and the error event the client gets for it.
struct Stop {
    end: End,
    error: Option<GatewayError>,
}

impl Stop {
    fn with(end: End, error: GatewayError) -> Self {
        Self {
            end,
            error: Some(error),
        }
    }
}

/// Relays the stream, settles it, and writes its last bytes. `Err` only when the client
/// could not be written to (it is settled all the same).
pub async fn relay(
    services: &Services,
    session: &mut Session,
    common: &Common<'_>,
    streaming: Streaming<'_>,
    record: &mut CallRecord,
    started: Instant,
) -> pingora::Result<()> {
    let Streaming {
        admitted,
        header,
        mut worker,
    } = streaming;
    let status = header.status.as_u16();
    let agent = admitted.caller.route.agent.clone();
    let pool = &admitted.caller.route.pool.config;
    let mut relay = Relay {
        services,
        admitted,
        write_timeout: common.write_timeout,
        reader: EventReader::new(),
        reading: StreamReading::default(),
        session_named: false,
        held_done: None,
        client_ok: true,
        spend: Spend::default(),
        invalid_rule: pool.on_invalid_usage,
    };
    let head = reply::send_stream_head(session, common, header).await;
    let first_byte = started.elapsed();
    services
        .metrics
        .stream_first_byte
        .observe(first_byte.as_secs_f64());
    record.stream = Some(StreamRecord {
        events: 0,
        first_byte,
        end: End::ClientGone,
    });
    let stop = match head {
        Ok(()) => {
            let limits = (pool.stream_idle_timeout, pool.max_stream);
            relay
                .run(session, &mut worker, limits, agent.on_exhaustion)
                .await
        }
        Err(_) => Stop {
            end: End::ClientGone,
            error: None,
        },
    };
    // The worker first: a connection cut short closes now, so the agent can stop working.
    worker.finish().await;
    record.upstream_finished = Some(Instant::now());
    let bill = relay.bill(stop.end);
    let Relay {
        admitted,
        reader: mut leftover,
        reading,
        held_done,
        client_ok,
        ..
    } = relay;
    super::settle(&services.metrics, admitted, bill, status, record).await;
    if let Some(stream) = record.stream.as_mut() {
        stream.events = reading.events;
        stream.end = stop.end;
    }
    services
        .metrics
        .streams
        .with_label_values(&[&agent.id, stop.end.label()])
        .inc();
    if stop.end == End::ClientGone || !client_ok {
        return pingora::Error::e_explain(
            pingora::ErrorType::ConnectionClosed,
            "the client went away during the stream",
        );
    }
    // Durable first (SPEC §5), then the last bytes: `[DONE]` and any unfinished event, or
    // the error event, and the end of the answer.
    let last = match &stop.error {
        Some(error) => error_event(&String::from_utf8_lossy(&error.body(common.request_id))),
        None => {
            let tail = leftover.finish();
            match held_done {
                Some(done) if tail.is_empty() => done,
                Some(done) => [done, tail].concat().into(),
                None => tail,
            }
        }
    };
    reply::send_stream_bytes(session, common.write_timeout, last, true).await
}

/// The relay loop's state.
struct Relay<'a, 's> {
    services: &'a Services,
    admitted: Admitted<'s>,
    write_timeout: Duration,
    reader: EventReader,
    reading: StreamReading,
    /// Whether the client has learnt its session (from the worker's first event or ours).
    session_named: bool,
    /// A `[DONE]` event, sent only once the stream is settled.
    held_done: Option<Bytes>,
    /// False once a write to the client failed.
    client_ok: bool,
    spend: Spend,
    invalid_rule: InvalidUsageRule,
}

/// What `on_exhaustion: cut` knows of what the call may still spend.
#[derive(Default)]
struct Spend {
    /// Whole tokens the key's bucket held at the last look; `None`: not looked yet.
    tokens_left: Option<Option<i64>>,
}

impl Relay<'_, '_> {
    async fn run(
        &mut self,
        session: &mut Session,
        worker: &mut WorkerStream,
        (idle, longest): (Duration, Duration),
        on_exhaustion: ExhaustionRule,
    ) -> Stop {
        let lifecycle = &self.services.lifecycle;
        let ends_at = tokio::time::Instant::now() + longest;
        // Leases are renewed at half their length, so none runs out under a live stream.
        let renew_every = self.admitted.open.lease() / 2;
        let mut renew_at = tokio::time::Instant::now() + renew_every;
        loop {
            let read = tokio::select! {
                biased;
                read = timeout(idle, worker.read()) => read,
                () = client_gone(session) => return Stop { end: End::ClientGone, error: None },
                () = tokio::time::sleep_until(ends_at) => {
                    return Stop::with(End::Timeout, GatewayError::UpstreamTimeout);
                }
                () = lifecycle.streams_must_end() => {
                    return Stop::with(End::Timeout, GatewayError::UpstreamUnavailable);
                }
                () = tokio::time::sleep_until(renew_at) => {
                    renew_at = tokio::time::Instant::now() + renew_every;
                    let held = self.admitted.open.held();
                    if let Err(error) = self.admitted.open.extend(held).await {
                        tracing::warn!(%error, "could not renew a stream's leases");
                    }
                    continue;
                }
            };
            let bytes = match read {
                Err(_) => return Stop::with(End::Timeout, GatewayError::UpstreamTimeout),
                Ok(Err(_)) => {
                    return Stop::with(End::WorkerGone, GatewayError::UpstreamUnavailable)
                }
                Ok(Ok(None)) => {
                    // A last event ended by a CR is whole only now.
                    self.reader.close();
                    while let Next::Event(event) = self.reader.next_event() {
                        if let Some(stop) = self.pass_on(session, event, on_exhaustion).await {
                            return stop;
                        }
                    }
                    let end = if self.reading.running.is_some() {
                        End::Done
                    } else {
                        End::NoUsage
                    };
                    return Stop { end, error: None };
                }
                Ok(Ok(Some(bytes))) => bytes,
            };
            self.reader.push(&bytes);
            while let Next::Event(event) = self.reader.next_event() {
                if let Some(stop) = self.pass_on(session, event, on_exhaustion).await {
                    return stop;
                }
            }
            if self.reader.pending() > MAX_EVENT_BYTES {
                tracing::warn!(
                    limit = MAX_EVENT_BYTES,
                    "a worker's event is too large; the stream is ended"
                );
                return Stop::with(End::WorkerGone, GatewayError::UpstreamUnavailable);
            }
        }
    }

    /// Reads one event and writes it to the client; `Some` when the stream must stop.
    async fn pass_on(
        &mut self,
        session: &mut Session,
        event: Event,
        on_exhaustion: ExhaustionRule,
    ) -> Option<Stop> {
        let news = self.reading.read(&event);
        if !self.session_named {
            self.session_named = true;
            if !news.names_session {
                let named = session_event(&self.admitted.chat.session_id);
                if let Some(stop) = self.write(session, named).await {
                    return Some(stop);
                }
            }
        }
        if let Some(problem) = news.invalid {
            if let Some(stop) = self.invalid_usage(problem) {
                return Some(stop);
            }
        }
        if news.usage && on_exhaustion == ExhaustionRule::Cut {
            if let Some(error) = self.exhausted().await {
                return Some(Stop::with(End::Cut, error));
            }
        }
        if event.data.as_deref() == Some("[DONE]") {
            self.held_done = Some(event.raw);
            return None;
        }
        self.write(session, event.raw).await
    }

    async fn write(&mut self, session: &mut Session, bytes: Bytes) -> Option<Stop> {
        let written = reply::send_stream_bytes(session, self.write_timeout, bytes, false).await;
        if written.is_err() {
            self.client_ok = false;
            return Some(Stop {
                end: End::ClientGone,
                error: None,
            });
        }
        None
    }

    /// A `usage` that is wrong is counted; under `on_invalid_usage: reject` it ends the
    /// stream (nothing charged), under `charge_reserve` the stream goes on.
    fn invalid_usage(&mut self, problem: UsageProblem) -> Option<Stop> {
        let metrics = &self.services.metrics;
        let agent = self.admitted.caller.route.agent.id.as_str();
        metrics
            .usage_rejected
            .with_label_values(&[agent, problem.label()])
            .inc();
        let action = match self.invalid_rule {
            InvalidUsageRule::Reject => "rejected",
            InvalidUsageRule::ChargeReserve => "charged_reserve",
        };
        metrics
            .invalid_usage
            .with_label_values(&[agent, action])
            .inc();
        (self.invalid_rule == InvalidUsageRule::Reject)
            .then(|| Stop::with(End::WorkerGone, GatewayError::UpstreamInvalidUsage))
    }

    /// Under `on_exhaustion: cut`, whether the running usage has exhausted the account (its
    /// hold cannot grow to cover it) or the key's token bucket: the error the stream ends
    /// with. The store is asked only when the hold must grow, or the bucket may be empty.
    async fn exhausted(&mut self) -> Option<GatewayError> {
        let usage = self.reading.running?;
        let route = self.admitted.caller.route;
        let pricing = route.agent.pricing.as_ref();
        let running_cost = pricing.map_or(0, |p| cost(&usage, p));
        let open = &mut self.admitted.open;
        let tokens_bucket = self
            .admitted
            .caller
            .key_policy
            .as_deref()
            .and_then(|p| p.tokens);
        let must_grow = running_cost > open.held();
        let may_be_empty = match self.spend.tokens_left {
            None => tokens_bucket.is_some(),
            Some(left) => left.is_some_and(|left| usage.total_tokens as i64 > left),
        };
        if !must_grow && !may_be_empty {
            return None;
        }
        // One reservation's headroom beyond the running cost, so the next events need no
        // store call.
        let hold_to = running_cost.saturating_add(pricing.map_or(0, |p| p.reserve));
        let extended = match open.extend(hold_to.max(open.held())).await {
            Ok(extended) => extended,
            Err(error) => {
                // The store cannot say: the stream runs on (as `finish` would), charged in full.
                tracing::warn!(%error, "could not extend a stream's hold; it runs on");
                return None;
            }
        };
        self.spend.tokens_left = Some(extended.tokens_left);
        if extended.held < running_cost {
            return Some(GatewayError::InsufficientBalance);
        }
        match (extended.tokens_left, tokens_bucket) {
            (Some(left), Some(spec)) if usage.total_tokens as i64 > left => {
                let deficit = (usage.total_tokens as i64 - left) as u128 * spec.period_ms as u128;
                let wait_ms = deficit.div_ceil(spec.rate.max(1) as u128) as u64;
                let policy = self.admitted.caller.key_policy.as_deref()?;
                Some(GatewayError::RateLimited {
                    bucket: BucketKind::Tokens,
                    rule: turnpike_core::admission::rule_text(BucketKind::Tokens, policy),
                    retry_after_secs: turnpike_core::limits::retry_after_secs(wait_ms),
                })
            }
            _ => None,
        }
    }

    /// What the call is charged, by how the stream ended.
    fn bill(&self, end: End) -> Bill {
        let priced = self.admitted.caller.route.agent.pricing.is_some();
        match (self.reading.invalid, self.reading.running, end) {
            (Some(_), _, _) => match self.invalid_rule {
                InvalidUsageRule::Reject => Bill::Nothing,
                InvalidUsageRule::ChargeReserve => Bill::Reserve,
            },
            (None, Some(usage), _) => Bill::Usage(usage),
            // An abandoned stream is never free: what it held, when it reported nothing.
            (None, None, End::ClientGone) if priced => Bill::Reserve,
            (None, None, _) => Bill::Nothing,
        }
    }
}
