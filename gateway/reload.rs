//! Config reloads: on `POST /admin/reload`, on SIGHUP, and when the config file or a policy
//! file changes. The whole new set is loaded and validated first and then swapped in at
//! once; a refused set leaves the old one in force. Calls in flight finish on the snapshot
//! they started with, and rate-limit state lives in the store, so it survives.

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::config::{self, ConfigError, ConfigErrors, Runtime};
use crate::state::{unix_now, Shared, Snapshot};
use crate::upstream::Pools;

/// How often the watcher looks at the files.
const POLL_EVERY: Duration = Duration::from_millis(250);

/// Loads the config file again and, if it is valid, puts it in force. Returns the new
/// config generation.
pub async fn reload(shared: &Shared) -> Result<u64, ConfigErrors> {
    let _one_at_a_time = shared.reload_lock.lock().await;
    let current = shared.snapshot.load_full();
    let path = current.config.source.clone();
    // Taken before reading: a file that changes while it is read is seen as changed and
    // loaded again, never marked seen without being loaded.
    let before_reading = fingerprint(&current.config);
    *shared.files_seen.lock() = before_reading.clone();
    let metrics = &shared.metrics;
    match prepare(shared, &path).await {
        Ok((runtime, pools)) => {
            warn_about_restart_only_changes(&current.config, &runtime);
            if runtime.policies_dir != current.config.policies_dir {
                *shared.files_seen.lock() = fingerprint(&runtime);
            }
            shared.snapshot.store(Arc::new(Snapshot {
                config: runtime,
                pools,
            }));
            metrics.config_reloads.with_label_values(&["success"]).inc();
            metrics.config_generation.inc();
            metrics.config_last_success.set(unix_now());
            let generation = metrics.config_generation.get() as u64;
            tracing::info!(generation, config = %path.display(), "configuration reloaded");
            Ok(generation)
        }
        Err(errors) => {
            metrics.config_reloads.with_label_values(&["error"]).inc();
            for error in &errors.0 {
                tracing::error!(%error, "configuration refused; the previous one stays in force");
            }
            Err(errors)
        }
    }
}

/// Everything that can fail, in order, with the store touched last: a refused set changes
/// nothing, and keys are seeded only just before the snapshot that knows their policies.
async fn prepare(shared: &Shared, path: &Path) -> Result<(Runtime, Pools), ConfigErrors> {
    let runtime = config::load(path)?;
    let pools = build_pools(&runtime, path)?;
    shared
        .store
        .seed(&runtime.keys, &runtime.accounts)
        .await
        .map_err(|e| one_error(path, format!("seeding keys and accounts: {e}")))?;
    Ok((runtime, pools))
}

fn build_pools(runtime: &Runtime, path: &Path) -> Result<Pools, ConfigErrors> {
    Pools::build(runtime).map_err(|e| one_error(path, format!("building upstream pools: {e}")))
}

fn one_error(path: &Path, message: String) -> ConfigErrors {
    ConfigErrors(vec![ConfigError {
        file: path.to_path_buf(),
        location: None,
        key: String::new(),
        message,
    }])
}

/// Listeners, threads and the store are set up once; a reload cannot move them.
fn warn_about_restart_only_changes(old: &Runtime, new: &Runtime) {
    let changed = [
        ("listen", old.listen != new.listen),
        ("admin.listen", old.admin.listen != new.admin.listen),
        ("threads", old.threads != new.threads),
        ("store", old.store != new.store),
    ];
    for (key, _) in changed.iter().filter(|(_, changed)| *changed) {
        tracing::warn!(
            key,
            "changed in the config file; takes effect after a restart"
        );
    }
}

/// Watches the config file and policy directory, and SIGHUP, and reloads on either.
pub struct Watcher {
    pub shared: Arc<Shared>,
}

#[async_trait]
impl BackgroundService for Watcher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(signal) => Some(signal),
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGHUP; reload with POST /admin/reload");
                None
            }
        };
        let mut ticks = tokio::time::interval(POLL_EVERY);
        loop {
            let signalled = async {
                match hangup.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = signalled => tracing::info!("SIGHUP: reloading the configuration"),
                _ = ticks.tick() => {
                    if fingerprint(&self.shared.snapshot.load().config) == *self.shared.files_seen.lock() {
                        continue;
                    }
                    // Let an editor or a copy finish writing before reading.
                    tokio::time::sleep(POLL_EVERY).await;
                    tracing::info!("configuration files changed: reloading");
                }
            }
            let _ = reload(&self.shared).await;
        }
    }
}

/// Name, size and modification time of every file a load of `config` reads.
pub fn fingerprint(config: &Runtime) -> Fingerprint {
    let mut files = vec![config.source.clone()];
    if let Ok(entries) = std::fs::read_dir(&config.policies_dir) {
        files.extend(entries.filter_map(|e| e.ok().map(|e| e.path())));
    }
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let meta = std::fs::metadata(&path).ok();
            let size = meta.as_ref().map_or(0, |m| m.len());
            let modified = meta.and_then(|m| m.modified().ok());
            (path, size, modified)
        })
        .collect()
}

pub type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;
