//! Assembles the Pingora server: the proxy listener, the admin listener, the config
//! watcher, and anything extra (the demo worker), on one store and one config snapshot.

use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use pingora::services::ServiceWithDependents;
use std::sync::Arc;

use crate::admin::AdminApp;
use crate::clock::unix_now;
use crate::config::{ConfigErrors, ProcessConfig, Runtime, StoreKind};
use crate::edge::Edge;
use crate::metrics::Metrics;
use crate::proxy::Gateway;
use crate::reload::{Reloader, Watcher};
use crate::services::{Services, Snapshot};
use crate::store::{MemoryStore, RedisStore, Store, StoreError};

/// Seconds in-flight calls get to finish after SIGTERM before the process exits.
const SHUTDOWN_GRACE_SECONDS: u64 = 5;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("seeding the store: {0}")]
    Seed(StoreError),
    #[error("building upstream pools: {0}")]
    Pools(std::io::Error),
    #[error("starting the store's runtime: {0}")]
    StoreRuntime(std::io::Error),
}

/// Builds the store and seeds it with the config's keys and accounts. The store gets a
/// runtime of its own for its connections and background tasks, alive as long as the process.
fn open_store(
    process: &ProcessConfig,
    snapshot: &Snapshot,
    metrics: &Metrics,
) -> Result<Arc<dyn Store>, StartError> {
    let store_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("turnpike-store")
        .enable_all()
        .build()
        .map_err(StartError::StoreRuntime)?;
    let handle = store_runtime.handle().clone();
    std::mem::forget(store_runtime);
    let store: Arc<dyn Store> = match process.store.kind {
        StoreKind::Memory => Arc::new(MemoryStore::new()),
        StoreKind::Redis => {
            handle.block_on(RedisStore::connect(&process.store, metrics, handle.clone()))?
        }
    };
    let config = &snapshot.config;
    handle
        .block_on(store.seed(&config.keys, &config.accounts))
        .map_err(StartError::Seed)?;
    Ok(store)
}

/// Runs the gateway until a signal stops it; never returns on success.
pub fn run(
    runtime: Runtime,
    extras: Vec<Box<dyn ServiceWithDependents>>,
) -> Result<(), StartError> {
    let Runtime {
        sources,
        process,
        calls,
    } = runtime;
    let metrics = Metrics::new();
    let snapshot = Snapshot::build(calls, 1).map_err(StartError::Pools)?;
    let store = open_store(&process, &snapshot, &metrics)?;
    metrics.config_reloads.with_label_values(&["success"]).inc();
    metrics.config_last_success.set(unix_now());
    let services = Arc::new(Services::new(snapshot, store, metrics));
    let reloader = Arc::new(Reloader::new(
        Arc::clone(&services),
        sources,
        process.clone(),
    ));

    // Until the watcher takes SIGHUP over, a reload signal must not end the process.
    // SAFETY: setting a signal's disposition to "ignore" has no handler to be unsafe in.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
    let conf = ServerConf {
        threads: process.threads,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(SHUTDOWN_GRACE_SECONDS),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let gateway = Gateway {
        services: Arc::clone(&services),
    };
    let edge = Edge::new(
        pingora::proxy::http_proxy(&server.configuration, gateway),
        Arc::clone(&services),
    );
    let mut proxy = Service::new("turnpike".to_owned(), edge);
    proxy.add_tcp(&process.listen);
    let watcher = background_service(
        "config watcher",
        Watcher {
            reloader: Arc::clone(&reloader),
        },
    );
    let mut admin = Service::new("turnpike admin".to_owned(), AdminApp { services, reloader });
    admin.add_tcp(&process.admin_listen);
    server.add_service(proxy);
    server.add_service(admin);
    server.add_service(watcher);
    for extra in extras {
        server.add_boxed_service(extra);
    }
    tracing::info!(listen = %process.listen, admin = %process.admin_listen, threads = process.threads, "turnpike listening");
    server.run_forever()
}
