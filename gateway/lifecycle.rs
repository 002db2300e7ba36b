//! How the process ends, so that a rolling deploy cuts no call.
//!
//! SIGTERM (and SIGQUIT: this build hands no sockets to a successor) drains: `/readyz` fails
//! at once and every answer from then on closes its connection; after `shutdown_delay` the
//! listeners stop accepting and idle connections are closed; calls in flight get
//! `shutdown_grace` to finish; the store then writes what it still owes, and the process
//! exits. SIGINT stops at once (calls in flight are cut), still writing what the store owes.
//! A second stop signal during a drain ends the process at once (exit status 1).
//!
//! This module holds what calls see of it (the draining flag, the counts of open client
//! connections and of requests in flight, whether the listener has closed) and the drain's
//! timings; `drain` runs it.

use prometheus::IntGauge;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The longest the store may take, after the calls, to write what it still owes.
pub const STORE_FLUSH_LIMIT: Duration = Duration::from_secs(5);

/// Whether the gateway is draining, and how many requests are in flight.
pub struct Lifecycle {
    draining: AtomicBool,
    /// Set once the public listener accepts no more connections.
    listener_closed: AtomicBool,
    /// Client connections the edge holds open, idle or not.
    connections: Arc<AtomicI64>,
    /// `turnpike_draining`.
    draining_gauge: IntGauge,
    /// `turnpike_inflight_requests`: requests from their first byte to their answer's end.
    requests: IntGauge,
}

impl Lifecycle {
    pub fn new(requests: IntGauge, draining_gauge: IntGauge) -> Self {
        Self {
            draining: AtomicBool::new(false),
            listener_closed: AtomicBool::new(false),
            connections: Arc::new(AtomicI64::new(0)),
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

    /// A client connection was accepted; it is open until the guard drops.
    pub fn connection_opens(&self) -> OpenConnection {
        self.connections.fetch_add(1, Ordering::Relaxed);
        OpenConnection(Arc::clone(&self.connections))
    }

    /// Client connections open now.
    pub fn open_connections(&self) -> i64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// The public listener has stopped accepting (Pingora's cleanup after its accept loop).
    pub fn close_listener(&self) {
        self.listener_closed.store(true, Ordering::Relaxed);
    }

    pub fn is_listener_closed(&self) -> bool {
        self.listener_closed.load(Ordering::Relaxed)
    }
}

/// One request in flight, counted while it lives.
pub struct RequestInFlight(IntGauge);

impl Drop for RequestInFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// One client connection, counted while it lives.
pub struct OpenConnection(Arc<AtomicI64>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
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
