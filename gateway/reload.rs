//! Config reloads: on `POST /admin/reload`, on SIGHUP, and when the config file or a policy
//! file changes. The whole new set is loaded and validated first and then put in force at
//! once; a refused set leaves the old one in force. Calls in flight finish on the snapshot
//! they started with, and rate-limit state lives in the store, so it survives.

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::clock::unix_now;
use crate::config::{self, ConfigError, ConfigErrors, ParsedFile, ProcessConfig, Sources};
use crate::services::{Services, Snapshot};

/// How often the watcher looks at the files.
const POLL_EVERY: Duration = Duration::from_millis(250);

/// Name, size and modification time of every file a load reads.
pub type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>, u64)>;

pub struct Reloader {
    services: Arc<Services>,
    /// Reloads run one at a time. Holds how the process was set up, which a reload cannot
    /// change.
    one_at_a_time: tokio::sync::Mutex<ProcessConfig>,
    watched: parking_lot::Mutex<Watched>,
    /// The config file as last parsed: a reload that finds the same text skips the parse.
    last_parse: parking_lot::Mutex<ParsedFile>,
}

/// The files in force, as the last load attempt found them.
struct Watched {
    sources: Sources,
    fingerprint: Fingerprint,
}

impl Reloader {
    pub fn new(
        services: Arc<Services>,
        sources: Sources,
        process: ProcessConfig,
        parsed: ParsedFile,
    ) -> Self {
        let fingerprint = fingerprint(&sources);
        Self {
            services,
            one_at_a_time: tokio::sync::Mutex::new(process),
            watched: parking_lot::Mutex::new(Watched {
                sources,
                fingerprint,
            }),
            last_parse: parking_lot::Mutex::new(parsed),
        }
    }

    /// Loads the config files again and, if they are valid, puts them in force. Returns the
    /// new config generation.
    pub async fn reload(&self) -> Result<u64, ConfigErrors> {
        let process = self.one_at_a_time.lock().await;
        let sources = {
            let mut watched = self.watched.lock();
            // Taken before reading: a file that changes while it is read is seen as changed
            // and loaded again, never marked seen without being loaded.
            watched.fingerprint = fingerprint(&watched.sources);
            watched.sources.clone()
        };
        let metrics = &self.services.metrics;
        match self.prepare(&sources).await {
            Ok((new_sources, new_process, snapshot)) => {
                warn_about_restart_only_changes(&process, &new_process);
                if new_sources != sources {
                    *self.watched.lock() = Watched {
                        fingerprint: fingerprint(&new_sources),
                        sources: new_sources,
                    };
                }
                let generation = snapshot.generation;
                self.services.put_in_force(snapshot);
                metrics.config_reloads.with_label_values(&["success"]).inc();
                metrics.config_last_success.set(unix_now());
                tracing::info!(generation, config = %sources.config.display(), "configuration reloaded");
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

    /// Everything that can fail, in order, with the store touched last: a refused set
    /// changes nothing, and the keys and accounts go in force only just before the snapshot
    /// that knows their policies.
    async fn prepare(
        &self,
        sources: &Sources,
    ) -> Result<(Sources, ProcessConfig, Snapshot), ConfigErrors> {
        let path = &sources.config;
        let last = self.last_parse.lock().clone();
        let runtime = config::load_reusing(path, Some(&last))?;
        *self.last_parse.lock() = runtime.parsed.clone();
        let generation = self.services.snapshot().generation + 1;
        let snapshot = Snapshot::build(runtime.calls, generation, &self.services.metrics)
            .map_err(|e| one_error(path, format!("building upstream pools: {e}")))?;
        self.services
            .store
            .apply_config(&snapshot.config.keys, &snapshot.config.accounts)
            .await
            .map_err(|e| one_error(path, format!("putting keys and accounts in force: {e}")))?;
        Ok((runtime.sources, runtime.process, snapshot))
    }

    /// Whether the files in force changed since the last load attempt read them.
    fn files_changed(&self) -> bool {
        let watched = self.watched.lock();
        fingerprint(&watched.sources) != watched.fingerprint
    }
}

fn one_error(path: &Path, message: String) -> ConfigErrors {
    ConfigErrors::one(ConfigError::whole_file(path, None, message))
}

/// Listeners, threads and the store are set up once; a reload cannot move them.
fn warn_about_restart_only_changes(old: &ProcessConfig, new: &ProcessConfig) {
    let changed = [
        ("listen", old.listen != new.listen),
        ("admin.listen", old.admin_listen != new.admin_listen),
        ("threads", old.threads != new.threads),
        ("store", old.store != new.store),
        ("tls", old.tls != new.tls),
        ("admin.tls", old.admin_tls != new.admin_tls),
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
    pub reloader: Arc<Reloader>,
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
                    if !self.reloader.files_changed() {
                        continue;
                    }
                    // Let an editor or a copy finish writing before reading.
                    tokio::time::sleep(POLL_EVERY).await;
                    tracing::info!("configuration files changed: reloading");
                }
            }
            let _ = self.reloader.reload().await;
        }
    }
}

/// Name, size, modification time and inode of every file a load of `sources` reads,
/// through symlinks: a Kubernetes ConfigMap update swaps a `..data` link to new files,
/// which the inode tells apart even when size and time match.
fn fingerprint(sources: &Sources) -> Fingerprint {
    let mut files = vec![sources.config.clone()];
    if let Ok(entries) = std::fs::read_dir(&sources.policies_dir) {
        files.extend(entries.filter_map(|e| e.ok().map(|e| e.path())));
    }
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let meta = std::fs::metadata(&path).ok();
            let size = meta.as_ref().map_or(0, |m| m.len());
            let inode = meta.as_ref().map_or(0, |m| m.ino());
            let modified = meta.and_then(|m| m.modified().ok());
            (path, size, modified, inode)
        })
        .collect()
}
