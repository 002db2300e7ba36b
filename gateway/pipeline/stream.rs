//! A streamed answer (SPEC §5): a worker's 2xx `text/event-stream` relayed to the client
//! event by event, metered as it flows, settled before its last bytes.
//!
//! ```text
//! head          the worker's head, sent at once                         (first byte)
//! relay loop    each whole event read, judged, written                  (one event held)
//!               `event: session` before the first, when it names none
//!               `on_exhaustion: cut`: the hold extended as usage grows
//!               ends: worker done | client gone | idle | cut | worker broke off
//!               beside it: max_stream, the drain, the leases renewed (LeaseKeeper)
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
use turnpike_core::sse::{
    error_event, session_event, Event, EventReader, Next, StreamReading, BOM,
};
use turnpike_core::usage::UsageProblem;

use super::admit::Admitted;
use super::ctx::{CallRecord, StreamRecord};
use super::forward::client_gone;
use super::open_call::Bill;
use super::reply::{self, Common};
use crate::config::{ExhaustionRule, InvalidUsageRule};
use crate::error::GatewayError;
use crate::metrics::StreamEnd as End;
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

/// How long a worker that sent `[DONE]` gets to end its answer before the relay ends it.
const AFTER_DONE: Duration = Duration::from_secs(1);
/// How long the worker's connection gets to go back to the pool, or close.
const FINISH_LIMIT: Duration = Duration::from_secs(1);
/// After a store error, how long a stream runs on before it asks the store again.
const EXTEND_BACKOFF: Duration = Duration::from_secs(1);

/// Why the relay stopped, and the error event the client gets for it.
struct Stop {
    end: End,
    error: Option<GatewayError>,
}

impl Stop {
    fn quiet(end: End) -> Self {
        Self { end, error: None }
    }

    fn with(end: End, error: GatewayError) -> Self {
        Self {
            end,
            error: Some(error),
        }
    }
}

/// What ends a stream from outside its relay loop.
enum Outside {
    MaxStream,
    Drain,
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
        status,
        write_timeout: common.write_timeout,
        reader: EventReader::new(),
        reading: StreamReading::default(),
        session_named: false,
        held_done: None,
        done_by: None,
        writing: false,
        client_ok: true,
        spend: Spend::default(),
        invalid_rule: pool.on_invalid_usage,
        on_exhaustion: agent.on_exhaustion,
    };
    record.stream = Some(StreamRecord {
        events: 0,
        first_byte: Duration::ZERO,
        end: End::ClientGone,
    });
    let stop = match reply::send_stream_head(session, common, header).await {
        Ok(()) => {
            let first_byte = started.elapsed();
            let metrics = &services.metrics;
            metrics.stream_first_byte.observe(first_byte.as_secs_f64());
            if let Some(stream) = record.stream.as_mut() {
                stream.first_byte = first_byte;
            }
            // Billed from now on even if this task is cut short: a client gone, until usage.
            let abandoned = relay.bill(End::ClientGone);
            relay.admitted.open.note(abandoned, status);
            let keeper = relay.admitted.open.lease_keeper();
            let ends_at = tokio::time::Instant::now() + pool.max_stream;
            let idle = pool.stream_idle_timeout;
            let inside = tokio::select! {
                biased;
                () = services.lifecycle.streams_must_end() => Err(Outside::Drain),
                () = tokio::time::sleep_until(ends_at) => Err(Outside::MaxStream),
                never = keeper.keep() => match never {},
                stop = relay.run(session, &mut worker, idle) => Ok(stop),
            };
            relay.last_word(inside)
        }
        Err(_) => {
            relay.client_ok = false;
            Stop::quiet(End::ClientGone)
        }
    };
    // The worker first: a connection cut short closes now, so the agent can stop working.
    let _ = tokio::time::timeout(FINISH_LIMIT, worker.finish()).await;
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
    if !client_ok {
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

/// The relay's state.
struct Relay<'a, 's> {
    services: &'a Services,
    admitted: Admitted<'s>,
    /// The worker's status, for the usage record.
    status: u16,
    write_timeout: Duration,
    reader: EventReader,
    reading: StreamReading,
    /// Whether the client has learnt its session (from the worker's first event or ours).
    session_named: bool,
    /// The worker's `[DONE]` (and anything after it), sent only once the stream is settled.
    held_done: Option<Bytes>,
    /// Once `[DONE]` is in, when the worker must have ended its answer.
    done_by: Option<tokio::time::Instant>,
    /// True while a write to the client is under way: one cut short leaves its framing
    /// broken, so nothing more may be written.
    writing: bool,
    /// False once the client cannot be written to.
    client_ok: bool,
    spend: Spend,
    invalid_rule: InvalidUsageRule,
    on_exhaustion: ExhaustionRule,
}

/// What `on_exhaustion: cut` knows of what the call may still spend.
#[derive(Default)]
struct Spend {
    /// The key's token bucket at the last look.
    tokens: TokensSeen,
    /// After a store error, no extension is asked for before this.
    quiet_until: Option<Instant>,
}

#[derive(Default, Clone, Copy)]
enum TokensSeen {
    #[default]
    NotLooked,
    /// The key's policy has no enforced token bucket.
    NoBucket,
    Left(i64),
}

impl Relay<'_, '_> {
    /// Reads and passes on events until the worker ends, the client leaves, the worker goes
    /// quiet for `idle`, or the stream is cut.
    async fn run(
        &mut self,
        session: &mut Session,
        worker: &mut WorkerStream,
        idle: Duration,
    ) -> Stop {
        loop {
            let wait = match self.done_by {
                Some(by) => by.saturating_duration_since(tokio::time::Instant::now()),
                None => idle,
            };
            let read = tokio::select! {
                biased;
                () = client_gone(session) => return Stop::quiet(End::ClientGone),
                read = timeout(wait, worker.read()) => read,
            };
            let bytes = match read {
                Err(_) => return Stop::with(End::Timeout, GatewayError::UpstreamTimeout),
                Ok(Err(_)) => {
                    return Stop::with(End::WorkerGone, GatewayError::UpstreamUnavailable)
                }
                Ok(Ok(None)) => return Stop::quiet(self.finished()),
                Ok(Ok(Some(bytes))) => bytes,
            };
            self.reader.push(&bytes);
            if let Some(stop) = self.pass_on_whole_events(session).await {
                return stop;
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

    /// How a stream the worker ended, ended.
    fn finished(&self) -> End {
        if self.reading.running.is_some() {
            End::Done
        } else {
            End::NoUsage
        }
    }

    /// The stop, once the relay loop and what runs beside it are done. A stream whose worker
    /// already sent `[DONE]` ended well whatever stopped it after; a write cut short by the
    /// drain or `max_stream` leaves nothing more to say to the client.
    fn last_word(&mut self, inside: Result<Stop, Outside>) -> Stop {
        let stop = match inside {
            Ok(stop) => stop,
            Err(_) if self.writing => {
                self.client_ok = false;
                Stop::quiet(End::Timeout)
            }
            Err(Outside::MaxStream) => Stop::with(End::Timeout, GatewayError::UpstreamTimeout),
            Err(Outside::Drain) => Stop::with(End::Timeout, GatewayError::UpstreamUnavailable),
        };
        match stop.end {
            End::ClientGone => {
                self.client_ok = false;
                stop
            }
            _ if self.held_done.is_some() && self.client_ok => Stop::quiet(self.finished()),
            _ => stop,
        }
    }

    /// Passes on every whole event read so far; `Some` when the stream must stop.
    async fn pass_on_whole_events(&mut self, session: &mut Session) -> Option<Stop> {
        while let Next::Event(event) = self.reader.next_event() {
            if let Some(stop) = self.pass_on(session, event).await {
                return Some(stop);
            }
        }
        None
    }

    /// Reads one event and writes it to the client; `Some` when the stream must stop.
    async fn pass_on(&mut self, session: &mut Session, event: Event) -> Option<Stop> {
        let news = self.reading.read(&event);
        if news.usage || news.invalid.is_some() {
            let bill = self.bill(End::ClientGone);
            self.admitted.open.note(bill, self.status);
        }
        let mut raw = event.raw;
        // The first event with data decides: does the client learn its session from it?
        if !self.session_named && event.data.is_some() {
            self.session_named = true;
            if !news.names_session {
                // A byte-order mark belongs at the very start: it goes with the first event.
                if raw.starts_with(BOM) {
                    raw = raw.slice(BOM.len()..);
                }
                let named = session_event(&self.admitted.chat.session_id);
                if let Some(stop) = self.write(session, named).await {
                    return Some(stop);
                }
            }
        }
        // `[DONE]`, and anything the worker still sends after it, waits for the settlement.
        if let Some(done) = self.held_done.as_mut() {
            if done.len() + raw.len() > MAX_EVENT_BYTES {
                return Some(Stop::with(
                    End::WorkerGone,
                    GatewayError::UpstreamUnavailable,
                ));
            }
            *done = [done.as_ref(), raw.as_ref()].concat().into();
            return None;
        }
        if event.data.as_deref() == Some("[DONE]") {
            self.held_done = Some(raw);
            self.done_by = Some(tokio::time::Instant::now() + AFTER_DONE);
            return None;
        }
        if let Some(stop) = self.write(session, raw).await {
            return Some(stop);
        }
        if let Some(problem) = news.invalid {
            if let Some(stop) = self.invalid_usage(problem) {
                return Some(stop);
            }
        }
        if news.usage && self.on_exhaustion == ExhaustionRule::Cut {
            if let Some(error) = self.exhausted().await {
                return Some(Stop::with(End::Cut, error));
            }
        }
        None
    }

    async fn write(&mut self, session: &mut Session, bytes: Bytes) -> Option<Stop> {
        self.writing = true;
        let written = reply::send_stream_bytes(session, self.write_timeout, bytes, false).await;
        self.writing = false;
        if written.is_err() {
            self.client_ok = false;
            return Some(Stop::quiet(End::ClientGone));
        }
        None
    }

    /// A `usage` that is wrong is counted; under `on_invalid_usage: reject` it ends the
    /// stream, under `charge_reserve` the stream goes on. Either way the stream is never
    /// free (see [`Self::bill`]).
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
    /// with. The store is asked only when the hold must grow or the bucket may be empty.
    async fn exhausted(&mut self) -> Option<GatewayError> {
        let usage = self.reading.running?;
        let caller = &self.admitted.caller;
        let pricing = caller.route.agent.pricing.as_ref();
        let running_cost = pricing.map_or(0, |p| cost(&usage, p));
        let open = &mut self.admitted.open;
        let must_grow = running_cost > open.held();
        let may_be_empty = match self.spend.tokens {
            TokensSeen::NotLooked => true,
            TokensSeen::NoBucket => false,
            TokensSeen::Left(left) => usage.total_tokens as i64 > left,
        };
        let quiet = self.spend.quiet_until.is_some_and(|t| Instant::now() < t);
        if !(must_grow || may_be_empty) || quiet {
            return None;
        }
        // An eighth more (at least a reservation), so a stream asks a few dozen times in
        // all, yet holds little its account's other calls could have used.
        let hold_to = if must_grow {
            let headroom = (running_cost / 8).max(pricing.map_or(0, |p| p.reserve));
            running_cost.saturating_add(headroom)
        } else {
            open.held()
        };
        let extended = match open.extend(hold_to).await {
            Ok(extended) => extended,
            Err(error) => {
                // The store cannot say: the stream runs on (as under `finish`), charged in full.
                tracing::warn!(%error, "could not extend a stream's hold; it runs on");
                self.spend.quiet_until = Some(Instant::now() + EXTEND_BACKOFF);
                return None;
            }
        };
        self.spend.tokens = extended
            .tokens_left
            .map_or(TokensSeen::NoBucket, TokensSeen::Left);
        if extended.held < running_cost {
            return Some(GatewayError::InsufficientBalance);
        }
        let policy = caller.key_policy.as_deref()?;
        match (extended.tokens_left, policy.tokens) {
            (Some(left), Some(spec)) if usage.total_tokens as i64 > left => {
                let deficit = (usage.total_tokens as i64 - left) as u128 * spec.period_ms as u128;
                let wait_ms = deficit.div_ceil(spec.rate.max(1) as u128) as u64;
                Some(GatewayError::RateLimited {
                    bucket: BucketKind::Tokens,
                    rule: turnpike_core::admission::rule_text(BucketKind::Tokens, policy),
                    retry_after_secs: turnpike_core::limits::retry_after_secs(wait_ms),
                })
            }
            _ => None,
        }
    }

    /// What the call is charged, by how the stream ended: its running usage; at least the
    /// reservation when a usage it sent was wrong (a stream already under way cannot be
    /// refused whole, so it is never free); the reservation for a client gone before any
    /// usage; nothing for a stream that ended without usage.
    fn bill(&self, end: End) -> Bill {
        let pricing = self.admitted.caller.route.agent.pricing.as_ref();
        let reserve = pricing.map_or(0, |p| p.reserve);
        let running = self.reading.running;
        let at_least_reserve = |usage| match pricing {
            Some(p) if cost(&usage, p) < reserve => Bill::Reserve,
            _ => Bill::Usage(usage),
        };
        match (self.reading.invalid, running, end) {
            (Some(_), Some(usage), _) => at_least_reserve(usage),
            (Some(_), None, _) => Bill::Reserve,
            (None, Some(usage), _) => Bill::Usage(usage),
            // An abandoned stream is never free: what it held, when it reported nothing.
            (None, None, End::ClientGone) if reserve > 0 => Bill::Reserve,
            (None, None, _) => Bill::Nothing,
        }
    }
}
