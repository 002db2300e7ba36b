//! The drain on a stop signal (see `lifecycle` for what each signal does).
//!
//! Pingora, once told to stop, stops its listeners, sleeps a fixed grace period and then
//! drops every task, finished or not. So the drain runs on a thread of its own beside that
//! sleep: once the listener has closed, it waits until every client connection is gone
//! (idle kept-alive ones close within a second of the shutdown; busy ones after their
//! answer) or the grace is over, has the store write what it still owes, and ends the
//! process itself; a quiet gateway stops in about a second.

use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::runtime::Handle;
use tokio::signal::unix::{signal, SignalKind};

use crate::lifecycle::{Shutdown, STORE_FLUSH_LIMIT, STREAM_END_LIMIT};
use crate::services::Services;

/// How often the drain looks at what is still open.
const POLL: Duration = Duration::from_millis(20);
/// How long no connection must be open before the drain ends: a connection the accept loop
/// took just before it closed is counted once its task first runs.
const QUIET_FOR: Duration = Duration::from_millis(100);

/// Pingora's signal watch, replaced so that a stop signal starts the drain first.
pub struct Signals {
    pub services: Arc<Services>,
    /// The runtime the store's connections run on, which outlives Pingora's.
    pub store_runtime: Handle,
    pub shutdown: Shutdown,
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let (Ok(mut term), Ok(mut quit), Ok(mut interrupt)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::quit()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot watch for stop signals; only SIGKILL stops this process");
            return std::future::pending().await;
        };
        tracing::info!("watching for stop signals (SIGTERM, SIGQUIT: drain; SIGINT: now)");
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = quit.recv() => "SIGQUIT",
            _ = interrupt.recv() => {
                tracing::warn!("SIGINT: stopping now; calls in flight are cut");
                return ShutdownSignal::FastShutdown;
            }
        };
        // Whoever sends a second stop signal wants the process gone now.
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = quit.recv() => {}
                _ = interrupt.recv() => {}
            }
            tracing::warn!("a second stop signal: exiting now; calls in flight are cut");
            std::process::exit(1);
        });
        let lifecycle = &self.services.lifecycle;
        lifecycle.start_draining();
        let Shutdown { delay, grace } = self.shutdown;
        tracing::info!(
            signal = name,
            in_flight = lifecycle.in_flight(),
            ?delay,
            ?grace,
            "draining: /readyz fails now, the listeners close after the delay, calls in flight get the grace"
        );
        let drain = Drain {
            services: Arc::clone(&self.services),
            store_runtime: self.store_runtime.clone(),
            cut_at: Instant::now() + delay + grace,
        };
        std::thread::Builder::new()
            .name("turnpike-drain".into())
            .spawn(move || drain.run())
            .map_err(|e| tracing::error!(error = %e, "cannot start the drain; Pingora's grace period applies"))
            .ok();
        tokio::time::sleep(delay).await;
        ShutdownSignal::GracefulTerminate
    }
}

struct Drain {
    services: Arc<Services>,
    store_runtime: Handle,
    /// After this, what is still in flight is cut.
    cut_at: Instant,
}

impl Drain {
    /// Waits for the client connections to end, writes what the store owes, and exits the
    /// process.
    fn run(self) -> ! {
        let lifecycle = &self.services.lifecycle;
        let mut quiet_since = None;
        loop {
            let now = Instant::now();
            let in_flight = lifecycle.in_flight();
            // A call outlives its connection when the client hangs up (its answer is still
            // read and metered), and an HTTP/2 stream runs as a task of its own: both counted.
            if lifecycle.is_listener_closed() && lifecycle.open_connections() <= 0 && in_flight <= 0
            {
                if now - *quiet_since.get_or_insert(now) >= QUIET_FOR {
                    tracing::info!("drained: no connection open, no call in flight");
                    break;
                }
            } else {
                quiet_since = None;
            }
            if now >= self.cut_at {
                self.end_streams();
                tracing::warn!(
                    in_flight = lifecycle.in_flight(),
                    "shutdown_grace is over: the calls still in flight are cut"
                );
                break;
            }
            std::thread::sleep(POLL);
        }
        flush_store(&self.services, &self.store_runtime);
        // Log lines still gathered are written by the logger's exit hook.
        std::process::exit(0);
    }
}

impl Drain {
    /// Tells the streams still running to end, and gives them `STREAM_END_LIMIT` to send
    /// their last event and settle.
    fn end_streams(&self) {
        let lifecycle = &self.services.lifecycle;
        if lifecycle.in_flight() <= 0 {
            return;
        }
        lifecycle.end_streams();
        let until = Instant::now() + STREAM_END_LIMIT;
        while lifecycle.in_flight() > 0 && Instant::now() < until {
            std::thread::sleep(POLL);
        }
    }
}

/// Has the store write what it still owes (settlements held while it was away), within
/// `STORE_FLUSH_LIMIT`; what it could not write the store keeps in its journal or logs.
pub fn flush_store(services: &Services, store_runtime: &Handle) {
    let store = Arc::clone(&services.store);
    let left = store_runtime.block_on(async move { store.write_owed(STORE_FLUSH_LIMIT).await });
    if left > 0 {
        tracing::error!(
            settlements = left,
            "the store could not write every settlement it owed before exiting"
        );
    }
}
