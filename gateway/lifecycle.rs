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
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The longest the store may take, after the calls, to write what it still owes.
pub const STORE_FLUSH_LIMIT: Duration = Duration::from_secs(5);
/// Once `shutdown_grace` is over, how long streams still running get to send their last
/// event and settle what they used.
pub const STREAM_END_LIMIT: Duration = Duration::from_secs(2);

/// Whether the gateway is draining, and what is open: the gauges are the state, so what a
/// dashboard shows is what the drain decides on.
pub struct Lifecycle {
    /// `turnpike_draining`: 0, then 1 from the stop signal on.
    draining: IntGauge,
    /// `turnpike_open_connections`: client connections the edge holds, idle or not.
    connections: IntGauge,
    /// `turnpike_inflight_requests`: requests from their first byte to their answer's end.
    requests: IntGauge,
    /// Set once the public listener accepts no more connections.
    listener_closed: AtomicBool,
    /// Turns true when `shutdown_grace` is over: streams still running end themselves.
    streams_must_end: tokio::sync::watch::Sender<bool>,
}

impl Lifecycle {
    pub fn new(draining: IntGauge, connections: IntGauge, requests: IntGauge) -> Self {
        Self {
            draining,
            connections,
            requests,
            listener_closed: AtomicBool::new(false),
            streams_must_end: tokio::sync::watch::Sender::new(false),
        }
    }

    /// `shutdown_grace` is over: every stream still running ends now.
    pub fn end_streams(&self) {
        self.streams_must_end.send_replace(true);
    }

    /// Resolves once streams must end (at once when they already must).
    pub async fn streams_must_end(&self) {
        let mut told = self.streams_must_end.subscribe();
        // The sender lives as long as `self`: `wait_for` cannot fail while it is borrowed.
        let _ = told.wait_for(|must| *must).await;
    }

    /// True from the shutdown signal on: `/readyz` fails and answers close their connection.
    pub fn is_draining(&self) -> bool {
        self.draining.get() != 0
    }

    pub fn start_draining(&self) {
        self.draining.set(1);
    }

    /// A client connection was accepted; it is open until the guard drops.
    pub fn connection_opens(&self) -> Counted {
        Counted::count(&self.connections)
    }

    /// A request has begun (its first byte arrived); it is in flight until the guard drops.
    pub fn request_begins(&self) -> Counted {
        Counted::count(&self.requests)
    }

    pub fn open_connections(&self) -> i64 {
        self.connections.get()
    }

    pub fn in_flight(&self) -> i64 {
        self.requests.get()
    }

    /// The public listener has stopped accepting (Pingora's cleanup after its accept loop).
    pub fn close_listener(&self) {
        self.listener_closed.store(true, Ordering::Relaxed);
    }

    pub fn is_listener_closed(&self) -> bool {
        self.listener_closed.load(Ordering::Relaxed)
    }
}

/// One open connection or request in flight, counted in its gauge while it lives.
pub struct Counted(IntGauge);

impl Counted {
    fn count(gauge: &IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Counted {
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
        (self.delay + self.grace + STREAM_END_LIMIT + STORE_FLUSH_LIMIT).as_secs() + 2
    }
}
