//! Assembles the Pingora server: the proxy listener, the admin listener, and anything extra
//! (the demo worker), on one store and one config snapshot.

use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::services::listening::Service;
use pingora::services::ServiceWithDependents;
use std::sync::Arc;

use crate::admin::AdminApp;
use crate::config::{Runtime, StoreKind};
use crate::proxy::Gateway;
use crate::reload::Watcher;
use crate::state::{Shared, Snapshot};
use crate::store::{MemoryStore, Store};
use crate::upstream::Pools;
use pingora::services::background::background_service;

/// Seconds in-flight calls get to finish after SIGTERM before the process exits.
const SHUTDOWN_GRACE_SECONDS: u64 = 5;

/// Builds the store and seeds it with the config's keys and accounts.
fn open_store(runtime: &Runtime) -> Result<Arc<dyn Store>, String> {
    let store: Arc<dyn Store> = match runtime.store.kind {
        StoreKind::Memory => Arc::new(MemoryStore::new()),
        StoreKind::Redis => return Err("the Redis store is not available in this build".into()),
    };
    let seeding = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    seeding
        .block_on(store.seed(&runtime.keys, &runtime.accounts))
        .map_err(|e| e.to_string())?;
    Ok(store)
}

/// Runs the gateway until a signal stops it; never returns on success.
pub fn run(runtime: Runtime, extras: Vec<Box<dyn ServiceWithDependents>>) -> Result<(), String> {
    let store = open_store(&runtime)?;
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
