//! TLS for the listeners and for the workers: certificate files, served through a resolver
//! that a watcher swaps when the files change on disk (a renewal rotates them in place), and
//! CA bundles for verifying HTTPS workers. Everything is rustls, through Pingora's `rustls`
//! feature: no OpenSSL to build.

pub mod files;
pub mod handshake;
pub mod live;

pub use files::{load_ca_bundle, load_cert, CaBundle, CertFiles, LoadedCert, TlsFileError};
pub use handshake::{handshake_done, HandshakeDeadline};
pub use live::{CertWatcher, TlsListener};
