//! The per-call context: each field is filled by the phase that owns it.

use bytes::Bytes;
use std::sync::Arc;
use std::time::Instant;

use crate::admission::Reservation;
use crate::auth::KeyRecord;
use crate::config::Agent;
use crate::error::GatewayError;
use crate::limits::{Policy, Quota};
use crate::metering::Usage;
use crate::state::{Shared, Snapshot};

pub struct RequestCtx {
    pub shared: Arc<Shared>,
    pub started: Instant,
    /// The config this call runs on, from start to end.
    pub snapshot: Arc<Snapshot>,
    /// Echoed to the client and sent to the worker.
    pub request_id: String,
    /// The authenticated key, once known.
    pub key: Option<Arc<KeyRecord>>,
    /// The configured agent the path names, once known.
    pub agent: Option<Arc<Agent>>,
    pub call: Option<Call>,
    /// The error this gateway answered with, if it answered one.
    pub refusal: Option<GatewayError>,
    pub counted_inflight: bool,
    /// When the worker exchange began.
    pub upstream_started: Option<Instant>,
    /// The tightest request bucket, for the `RateLimit-*` headers of an authenticated call.
    pub quota: Option<Quota>,
    /// Set once a complete 2xx answer with valid usage has been read.
    pub usage: Option<Usage>,
    /// What the call was charged, once settled.
    pub cost: i64,
}

/// A valid call the key may make, with everything admission decided.
pub struct Call {
    pub key_policy: Option<Arc<Policy>>,
    pub session_id: String,
    /// The body the worker receives.
    pub forward_body: Bytes,
    /// Unique per call; set once the store admitted it, and then it must be settled.
    pub call_id: Option<String>,
    pub reservation: Reservation,
    /// The worker's status, once its answer was read (for the usage log).
    pub worker_status: u16,
}

impl RequestCtx {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self {
            snapshot: shared.snapshot.load_full(),
            shared,
            started: Instant::now(),
            request_id: String::new(),
            key: None,
            agent: None,
            call: None,
            refusal: None,
            counted_inflight: false,
            upstream_started: None,
            quota: None,
            usage: None,
            cost: 0,
        }
    }

    /// The agent label for metrics: a configured agent id, or a placeholder.
    pub fn agent_label(&self) -> &str {
        self.agent
            .as_ref()
            .map_or(crate::metrics::NO_AGENT, |a| a.id.as_str())
    }
}

/// A call dropped while still admitted (a panic, a cancelled task) must not keep its
/// reservation and concurrency slots: release them in the background. Calls that ended
/// normally were settled already and have nothing left to release.
impl Drop for RequestCtx {
    fn drop(&mut self) {
        crate::outcome::release_abandoned(self);
        if self.counted_inflight {
            self.shared.metrics.inflight.dec();
        }
    }
}
