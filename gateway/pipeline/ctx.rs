//! The per-call context Pingora carries from phase to phase. It holds only what the end of
//! the call reports (metrics and the access log): the call's own state travels as values
//! from stage to stage (see [`super`]), never through here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use turnpike_core::ids::new_call_id;
use turnpike_core::keys::KeyRecord;
use turnpike_core::trace::TraceParent;
use turnpike_core::usage::Usage;

use crate::config::Agent;
use crate::error::GatewayError;
use crate::metrics::{AgentSeries, StreamEnd, NO_AGENT};

pub struct RequestCtx {
    pub started: Instant,
    pub ids: CallIds,
    pub record: CallRecord,
}

/// A call's two ids. Both reach the worker and every usage record.
pub struct CallIds {
    /// The client's `X-Request-Id` (or one made up), for correlation: echoed to the client,
    /// set as the head arrives. A client may send the same one twice.
    pub request_id: String,
    /// The gateway's own, unique per call: the store settles each once, the worker gets it
    /// as `Idempotency-Key`, billing de-duplicates on it.
    pub call_id: String,
    /// The client's W3C `traceparent`, or a new trace: sent to the worker, its trace id
    /// logged. Set as the head arrives.
    pub trace: TraceParent,
}

/// What the end of a call reports, filled in by the stage that learns each part; a part no
/// stage reached stays unknown.
#[derive(Default)]
pub struct CallRecord {
    /// The configured agent the path names, once the caller is authenticated.
    pub agent: Option<Arc<Agent>>,
    /// That agent's counters under the config the call runs on.
    pub agent_series: Option<Arc<AgentSeries>>,
    /// The authenticated key.
    pub key: Option<Arc<KeyRecord>>,
    /// Whether the config in force counts this call per key (`metrics.per_key`).
    pub counted_per_key: bool,
    pub session_id: Option<String>,
    /// When the worker exchange began.
    pub upstream_started: Option<Instant>,
    /// When it ended: the worker's whole answer read, or given up on.
    pub upstream_finished: Option<Instant>,
    /// The worker endpoint that answered.
    pub upstream_endpoint: Option<SocketAddr>,
    /// The usage the call was charged for.
    pub usage: Option<Usage>,
    pub cost: i64,
    /// The error the gateway answered with.
    pub refusal: Option<GatewayError>,
    /// Set when the worker's answer was a stream.
    pub stream: Option<StreamRecord>,
}

/// What the access line and metrics tell of a streamed answer.
#[derive(Debug, Clone, Copy)]
pub struct StreamRecord {
    /// Events the worker sent.
    pub events: u64,
    /// From the call's start to the first byte the client was sent.
    pub first_byte: Duration,
    pub end: StreamEnd,
}

impl RequestCtx {
    /// A new call, its head just read (the edge counts it in flight).
    pub fn start() -> Self {
        Self {
            started: Instant::now(),
            ids: CallIds {
                request_id: String::new(),
                call_id: new_call_id(),
                trace: TraceParent::default(),
            },
            record: CallRecord::default(),
        }
    }
}

impl CallRecord {
    /// How long the worker exchange took, once it has ended.
    pub fn upstream_time(&self) -> Option<std::time::Duration> {
        Some(
            self.upstream_finished?
                .saturating_duration_since(self.upstream_started?),
        )
    }

    /// The agent label for metrics: a configured agent id, or a placeholder.
    pub fn agent_label(&self) -> &str {
        self.agent.as_ref().map_or(NO_AGENT, |a| a.id.as_str())
    }
}
