//! A TLS listener's certificate, live: handshakes take whatever pair is in force, and a
//! watcher loads the files again when they change. A pair that does not load (half written,
//! a key that is not the certificate's) is refused with a log line and a metric, and the
//! one in force keeps serving; the next change is tried again.

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::listeners::tls::TlsSettings;
use pingora::protocols::ALPN;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::tls::sign::CertifiedKey;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::files::{load_cert, CertFiles, LoadedCert, TlsFileError};
use crate::metrics::Metrics;
use prometheus::{IntCounter, IntGauge};

/// How often the watcher looks at the certificate files.
const POLL_EVERY: Duration = Duration::from_secs(1);

/// Size, modification time and inode of the chain and the key, as a rotation changes them
/// (cert-manager swaps a symlink; `metadata` follows it).
type Stamp = Vec<(u64, Option<SystemTime>, u64)>;

fn stamp(files: &CertFiles) -> Stamp {
    [&files.cert, &files.key]
        .iter()
        .map(|path| match std::fs::metadata(path) {
            Ok(meta) => (meta.len(), meta.modified().ok(), meta.ino()),
            Err(_) => (0, None, 0),
        })
        .collect()
}

/// One TLS listener's certificate files and the pair it serves now.
pub struct TlsListener {
    /// `public` or `admin`: the metrics' `listener` label.
    pub name: &'static str,
    pub files: CertFiles,
    serving: ArcSwap<CertifiedKey>,
    seen: parking_lot::Mutex<Stamp>,
    reloaded: IntCounter,
    refused: IntCounter,
    expiry: IntGauge,
}

impl std::fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsListener")
            .field("name", &self.name)
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl TlsListener {
    /// Loads the pair the listener starts with; a start with files that do not load fails.
    pub fn load(
        name: &'static str,
        files: CertFiles,
        metrics: &Metrics,
    ) -> Result<Arc<Self>, TlsFileError> {
        let seen = stamp(&files);
        let loaded = load_cert(&files)?;
        let expiry = metrics.tls_cert_expiry.with_label_values(&[name]);
        expiry.set(loaded.not_after);
        Ok(Arc::new(Self {
            name,
            files,
            serving: ArcSwap::new(loaded.certified),
            seen: parking_lot::Mutex::new(seen),
            reloaded: metrics
                .tls_cert_reloads
                .with_label_values(&[name, "success"]),
            refused: metrics.tls_cert_reloads.with_label_values(&[name, "error"]),
            expiry,
        }))
    }

    /// Pingora's settings for this listener: TLS 1.2 and 1.3 only, ALPN `h2` then
    /// `http/1.1`, and certificates from this listener's live pair.
    pub fn settings(self: &Arc<Self>) -> std::io::Result<TlsSettings> {
        let cert = self.files.cert.to_string_lossy();
        let key = self.files.key.to_string_lossy();
        let mut settings = TlsSettings::intermediate(&cert, &key)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let resolver: Arc<dyn pingora::tls::ResolvesServerCert> = self.clone();
        settings.set_cert_resolver(resolver);
        settings.set_alpn(ALPN::H2H1);
        Ok(settings)
    }

    /// Loads the files again if they changed since last looked at. Returns what happened,
    /// `None` when nothing changed.
    pub fn refresh(&self) -> Option<Result<(), TlsFileError>> {
        // Taken before reading: a file that changes while it is read is read again next time.
        let now = stamp(&self.files);
        {
            let mut seen = self.seen.lock();
            if *seen == now {
                return None;
            }
            *seen = now;
        }
        let result = load_cert(&self.files).map(
            |LoadedCert {
                 certified,
                 not_after,
             }| {
                self.serving.store(certified);
                self.expiry.set(not_after);
            },
        );
        match &result {
            Ok(()) => {
                self.reloaded.inc();
                tracing::info!(listener = self.name, cert = %self.files.cert.display(), "TLS certificate reloaded");
            }
            Err(error) => {
                self.refused.inc();
                tracing::error!(listener = self.name, %error, "TLS certificate refused; the previous one keeps serving");
            }
        }
        Some(result)
    }
}

impl pingora::tls::ResolvesServerCert for TlsListener {
    fn resolve(&self, _hello: pingora::tls::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.serving.load_full())
    }
}

/// Looks at every TLS listener's files each second.
pub struct CertWatcher {
    pub listeners: Vec<Arc<TlsListener>>,
}

#[async_trait]
impl BackgroundService for CertWatcher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(POLL_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {}
            }
            for listener in &self.listeners {
                listener.refresh();
            }
        }
    }
}
