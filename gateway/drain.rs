//! The drain on a stop signal (see `lifecycle` for what each signal does).
//!
//! Pingora, once told to stop, stops its listeners, sleeps a fixed grace period and then
//! drops every task, finished or not. So the drain runs on a thread of its own beside that
//! sleep: it waits until nothing is in flight (or the grace is over), has the store write
//! what it still owes, and ends the process itself; a quiet gateway stops in about a second.

use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::runtime::Handle;
use tokio::signal::unix::{signal, SignalKind};

use crate::lifecycle::{Shutdown, STORE_FLUSH_LIMIT};
use crate::services::Services;

/// How long an idle kept-alive connection may take to notice the shutdown and close: the
/// edge looks once a second, plus a margin for a busy machine.
const IDLE_CONNECTIONS_CLOSED: Duration = Duration::from_millis(1500);
/// How often the drain looks at what is still in flight.
const POLL: Duration = Duration::from_millis(20);

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
        let stop_accepting_at = Instant::now() + delay;
        let drain = Drain {
            services: Arc::clone(&self.services),
            store_runtime: self.store_runtime.clone(),
            quiet_from: stop_accepting_at + IDLE_CONNECTIONS_CLOSED,
            cut_at: stop_accepting_at + grace,
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
    /// Before this, a kept-alive connection may still bring a request.
    quiet_from: Instant,
    /// After this, what is still in flight is cut.
    cut_at: Instant,
}

impl Drain {
    /// Waits for the calls in flight, writes what the store owes, and exits the process.
    fn run(self) -> ! {
        let lifecycle = &self.services.lifecycle;
        loop {
            let now = Instant::now();
            let in_flight = lifecycle.in_flight();
            if in_flight <= 0 && now >= self.quiet_from {
                tracing::info!("drained: no call in flight");
                break;
            }
            if now >= self.cut_at {
                tracing::warn!(
                    in_flight,
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

/// Has the store write what it still owes (settlements held while it was away), within
/// `STORE_FLUSH_LIMIT`; what it could not write is logged by the store.
pub fn flush_store(services: &Services, store_runtime: &Handle) {
    let store = Arc::clone(&services.store);
    let written = store_runtime
        .block_on(async move { tokio::time::timeout(STORE_FLUSH_LIMIT, store.write_owed()).await });
    match written {
        Ok(0) => {}
        Ok(left) => tracing::error!(
            settlements = left,
            "the store could not write every settlement it owed before exiting"
        ),
        Err(_) => tracing::error!(
            limit = ?STORE_FLUSH_LIMIT,
            "the store was still writing settlements it owed when the process exited"
        ),
    }
}
