//! Assembles the Pingora server: the proxy listener, the admin listener, and anything extra
//! (the demo worker), on one store and one config snapshot.

use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::services::listening::Service;
use pingora::services::ServiceWithDependents;
use std::sync::Arc;

use crate::admin::AdminApp;
use crate::config::{Runtime, StoreKind};
use crate::metrics::Metrics;
use crate::proxy::Gateway;
use crate::reload::Watcher;
use crate::state::{Shared, Snapshot};
use crate::store::{MemoryStore, RedisStore, Store};
use crate::upstream::Pools;
use pingora::services::background::background_service;

/// Seconds in-flight calls get to finish after SIGTERM before the process exits.
const SHUTDOWN_GRACE_SECONDS: u64 = 5;

/// Builds the store and seeds it with the config's keys and accounts. The store gets a
/// runtime of its own for its connections and background tasks, alive as long as the process.
fn open_store(runtime: &Runtime, metrics: &Metrics) -> Result<Arc<dyn Store>, String> {
    let store_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("turnpike-store")
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let handle = store_runtime.handle().clone();
    std::mem::forget(store_runtime);
    let store: Arc<dyn Store> = match runtime.store.kind {
        StoreKind::Memory => Arc::new(MemoryStore::new()),
        StoreKind::Redis => {
            handle.block_on(RedisStore::connect(&runtime.store, metrics, handle.clone()))?
        }
    };
    handle
        .block_on(store.seed(&runtime.keys, &runtime.accounts))
        .map_err(|e| format!("seeding the store: {e}"))?;
    Ok(store)
}

/// Runs the gateway until a signal stops it; never returns on success.
pub fn run(runtime: Runtime, extras: Vec<Box<dyn ServiceWithDependents>>) -> Result<(), String> {
    let metrics = Metrics::new();
    let store = open_store(&runtime, &metrics)?;
    let pools = Pools::build(&runtime).map_err(|e| format!("building upstream pools: {e}"))?;
    let listen = runtime.listen.clone();
    let admin_listen = runtime.admin.listen.clone();
    let threads = runtime.threads;
    let shared = Arc::new(Shared::new(
        Snapshot {
            config: runtime,
            pools,
        },
        store,
        metrics,
    ));
    let metrics = &shared.metrics;
    metrics.config_reloads.with_label_values(&["success"]).inc();
    metrics.config_generation.set(1);
    metrics.config_last_success.set(crate::state::unix_now());

    // Until the watcher takes SIGHUP over, a reload signal must not end the process.
    // SAFETY: setting a signal's disposition to "ignore" has no handler to be unsafe in.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
    let conf = ServerConf {
        threads,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(SHUTDOWN_GRACE_SECONDS),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let mut proxy = pingora::proxy::http_proxy_service(
        &server.configuration,
        Gateway {
            shared: Arc::clone(&shared),
        },
    );
    proxy.add_tcp(&listen);
    let watcher = background_service(
        "config watcher",
        Watcher {
            shared: Arc::clone(&shared),
        },
    );
    let mut admin = Service::new("turnpike admin".to_owned(), AdminApp { shared });
    admin.add_tcp(&admin_listen);
    server.add_service(proxy);
    server.add_service(admin);
    server.add_service(watcher);
    for extra in extras {
        server.add_boxed_service(extra);
    }
    tracing::info!(%listen, admin = %admin_listen, threads, "turnpike listening");
    server.run_forever()
}
