//! The per-call context Pingora carries from phase to phase. It holds only what the end of
//! the call reports (metrics and the access log): the call's own state travels as values
//! from stage to stage (see [`super`]), never through here.

use prometheus::IntGauge;
use std::sync::Arc;
use std::time::Instant;

use turnpike_core::keys::KeyRecord;
use turnpike_core::usage::Usage;

use crate::config::Agent;
use crate::error::GatewayError;
use crate::metrics::NO_AGENT;

pub struct RequestCtx {
    pub started: Instant,
    /// Echoed to the client and sent to the worker; set as the head arrives.
    pub request_id: String,
    pub record: CallRecord,
    _inflight: Inflight,
}

/// What the end of a call reports, filled in by the stage that learns each part; a part no
/// stage reached stays unknown.
#[derive(Default)]
pub struct CallRecord {
    /// The configured agent the path names, once the caller is authenticated.
    pub agent: Option<Arc<Agent>>,
    /// The authenticated key.
    pub key: Option<Arc<KeyRecord>>,
    pub session_id: Option<String>,
    /// When the worker exchange began.
    pub upstream_started: Option<Instant>,
    /// The usage the call was charged for.
    pub usage: Option<Usage>,
    pub cost: i64,
    /// The error the gateway answered with.
    pub refusal: Option<GatewayError>,
}

impl RequestCtx {
    /// A new call: counted in `turnpike_inflight_requests` until its context is dropped,
    /// after Pingora's `logging` phase.
    pub fn new(inflight: &IntGauge) -> Self {
        Self {
            started: Instant::now(),
            request_id: String::new(),
            record: CallRecord::default(),
            _inflight: Inflight::count(inflight),
        }
    }
}

impl CallRecord {
    /// The agent label for metrics: a configured agent id, or a placeholder.
    pub fn agent_label(&self) -> &str {
        self.agent.as_ref().map_or(NO_AGENT, |a| a.id.as_str())
    }
}

/// One call in flight, counted while it lives.
struct Inflight(IntGauge);

impl Inflight {
    fn count(gauge: &IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        self.0.dec();
    }
}
