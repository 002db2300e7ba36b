//! How the process ends, so that a rolling deploy cuts no call.
//!
//! SIGTERM (and SIGQUIT: this build hands no sockets to a successor) drains: `/readyz` fails
//! at once and every answer from then on closes its connection; after `shutdown_delay` the
//! listeners stop accepting and idle connections are closed; calls in flight get
//! `shutdown_grace` to finish; the store then writes what it still owes, and the process
//! exits. SIGINT stops at once (calls in flight are cut), still writing what the store owes.
//! A second stop signal during a drain ends the process at once (exit status 1).
//!
//! This module holds what calls see of it (the draining flag, the count of requests in
//! flight) and the drain's timings; `drain` runs it.

use prometheus::IntGauge;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The longest the store may take, after the calls, to write what it still owes.
pub const STORE_FLUSH_LIMIT: Duration = Duration::from_secs(5);

/// Whether the gateway is draining, and how many requests are in flight.
pub struct Lifecycle {
    draining: AtomicBool,
    /// `turnpike_draining`.
    draining_gauge: IntGauge,
    /// `turnpike_inflight_requests`: requests from their first byte to their answer's end.
    requests: IntGauge,
}

impl Lifecycle {
    pub fn new(requests: IntGauge, draining_gauge: IntGauge) -> Self {
        Self {
            draining: AtomicBool::new(false),
            draining_gauge,
            requests,
        }
    }

    /// True from the shutdown signal on: `/readyz` fails and answers close their connection.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// A request has begun (its first byte arrived); it is in flight until the guard drops.
    pub fn request_begins(&self) -> RequestInFlight {
        self.requests.inc();
        RequestInFlight(self.requests.clone())
    }

    /// Marks the gateway as draining; returns false if it already was.
    pub fn start_draining(&self) -> bool {
        self.draining_gauge.set(1);
        !self.draining.swap(true, Ordering::Relaxed)
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> i64 {
        self.requests.get()
    }
}

/// One request in flight, counted while it lives.
pub struct RequestInFlight(IntGauge);

impl Drop for RequestInFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// How long each stage of a drain may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shutdown {
    /// From the signal until the listeners stop accepting (`/readyz` already fails), so load
    /// balancers stop sending first.
    pub delay: Duration,
    /// From then on, for calls in flight to finish; what is still running after it is cut.
    pub grace: Duration,
}

impl Shutdown {
    /// What Pingora is told to wait before it drops every task: past the drain's own end, so
    /// the drain, not Pingora, decides when the process exits.
    pub fn pingora_backstop_seconds(&self) -> u64 {
        (self.delay + self.grace + STORE_FLUSH_LIMIT).as_secs() + 2
    }
}
