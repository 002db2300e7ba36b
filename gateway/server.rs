//! Assembles the Pingora server: the proxy listener, the admin listener, the config
//! watcher, and anything extra (the demo worker), on one store and one config snapshot.

use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server};
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use pingora::services::ServiceWithDependents;
use std::sync::Arc;

use crate::admin::AdminApp;
use crate::clock::unix_now;
use crate::config::{ConfigErrors, ProcessConfig, Runtime, StoreKind};
use crate::drain::{self, Signals};
use crate::edge::Edge;
use crate::metrics::Metrics;
use crate::proxy::Gateway;
use crate::reload::{Reloader, Watcher};
use crate::services::{Services, Snapshot};
use crate::store::{MemoryStore, RedisStore, Store, StoreError};
use crate::tls::{CertWatcher, HandshakeDeadline, TlsFileError, TlsListener};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("putting the config's keys and accounts in force: {0}")]
    Seed(StoreError),
    #[error("building upstream pools: {0}")]
    Pools(std::io::Error),
    #[error("starting the store's runtime: {0}")]
    StoreRuntime(std::io::Error),
    #[error("TLS: {0}")]
    Tls(#[from] TlsFileError),
    #[error("TLS listener: {0}")]
    TlsListener(std::io::Error),
}

/// Builds the store and puts the config's keys and accounts in force on it. The store gets a
/// runtime of its own for its connections and background tasks, alive as long as the process
/// (returned, for the drain's last writes).
fn open_store(
    process: &ProcessConfig,
    snapshot: &Snapshot,
    metrics: &Metrics,
) -> Result<(Arc<dyn Store>, tokio::runtime::Handle), StartError> {
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
        .block_on(store.apply_config(&config.keys, &config.accounts))
        .map_err(StartError::Seed)?;
    Ok((store, handle))
}

/// Runs the gateway until a signal stops it. SIGTERM and SIGQUIT drain and end the process
/// from `drain`; after SIGINT this returns, once the store has written what it owes.
pub fn run(
    runtime: Runtime,
    extras: Vec<Box<dyn ServiceWithDependents>>,
) -> Result<(), StartError> {
    let Runtime {
        sources,
        process,
        calls,
        parsed,
    } = runtime;
    let metrics = Metrics::new();
    let snapshot = Snapshot::build(calls, 1, &metrics).map_err(StartError::Pools)?;
    let (store, store_runtime) = open_store(&process, &snapshot, &metrics)?;
    metrics.config_reloads.with_label_values(&["success"]).inc();
    metrics.config_last_success.set(unix_now());
    let services = Arc::new(Services::new(
        snapshot,
        store,
        metrics,
        process.store.lease_grace,
    ));
    let reloader = Arc::new(Reloader::new(
        Arc::clone(&services),
        sources,
        process.clone(),
        parsed,
    ));

    // Until the watcher takes SIGHUP over, a reload signal must not end the process.
    // SAFETY: setting a signal's disposition to "ignore" has no handler to be unsafe in.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
    // The drain ends the process before Pingora's grace period does (see `drain`).
    let conf = ServerConf {
        threads: process.threads,
        grace_period_seconds: Some(process.shutdown.pingora_backstop_seconds()),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let gateway = Gateway {
        services: Arc::clone(&services),
    };
    let mut http_proxy = pingora::proxy::http_proxy(&server.configuration, gateway);
    http_proxy.h2_options = Some(h2_options(&services));
    let edge = Edge::new(http_proxy, Arc::clone(&services));
    let mut proxy = Service::new("turnpike".to_owned(), edge);
    proxy.add_tcp(&process.listen);
    let mut tls_listeners = Vec::new();
    if let Some(tls) = &process.tls {
        let listener = TlsListener::load("public", tls.files.clone(), &services.metrics)?;
        let settings = listener.settings().map_err(StartError::TlsListener)?;
        proxy.add_tls_with_settings(&tls.listen, None, settings);
        let limits = Arc::clone(&services);
        proxy
            .endpoints()
            .set_pre_tls_callback(Arc::new(HandshakeDeadline::new(move || {
                limits.snapshot().config.limits.header_timeout
            })));
        tls_listeners.push(listener);
    }
    let watcher = background_service(
        "config watcher",
        Watcher {
            reloader: Arc::clone(&reloader),
        },
    );
    let signals = Signals {
        services: Arc::clone(&services),
        store_runtime: store_runtime.clone(),
        shutdown: process.shutdown,
    };
    let mut admin = Service::new(
        "turnpike admin".to_owned(),
        AdminApp {
            services: Arc::clone(&services),
            reloader,
        },
    );
    match &process.admin_tls {
        Some(files) => {
            let listener = TlsListener::load("admin", files.clone(), &services.metrics)?;
            let settings = listener.settings().map_err(StartError::TlsListener)?;
            admin.add_tls_with_settings(&process.admin_listen, None, settings);
            tls_listeners.push(listener);
        }
        None => admin.add_tcp(&process.admin_listen),
    }
    server.add_service(proxy);
    server.add_service(admin);
    server.add_service(watcher);
    if !tls_listeners.is_empty() {
        server.add_service(background_service(
            "certificate watcher",
            CertWatcher {
                listeners: tls_listeners,
            },
        ));
    }
    for extra in extras {
        server.add_boxed_service(extra);
    }
    let tls_listen = process.tls.as_ref().map(|tls| tls.listen.as_str());
    tracing::info!(listen = %process.listen, tls = tls_listen, admin = %process.admin_listen, admin_tls = process.admin_tls.is_some(), threads = process.threads, "turnpike listening");
    server.run(RunArgs {
        shutdown_signal: Box::new(signals),
    });
    drain::flush_store(&services, &store_runtime);
    Ok(())
}

/// HTTP/2 as Pingora bounds it by default (100 streams per connection), with each head held
/// to `limits.max_header_bytes` as on HTTP/1 (the limit at start; a reload does not change a
/// connection's settings).
fn h2_options(services: &Services) -> pingora::protocols::http::v2::server::H2Options {
    let mut options = pingora::protocols::http::v2::server::default_h2_options();
    let limit = services.snapshot().config.limits.max_header_bytes;
    options.max_header_list_size(u32::try_from(limit).unwrap_or(u32::MAX));
    options
}
