//! Reading TLS material from PEM files: a listener's certificate chain and key, checked to
//! belong together, and the CA bundle a pool's workers are verified against. Everything is
//! checked here, at load, so nothing Pingora later parses can panic on it.

use pingora::tls::sign::CertifiedKey;
use pingora::utils::tls::{parse_x509, WrappedX509};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where a listener's certificate chain and private key are read from (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A certificate chain and key that load and match, ready to serve.
pub struct LoadedCert {
    pub certified: Arc<CertifiedKey>,
    /// The leaf's `notAfter`, in Unix seconds.
    pub not_after: i64,
}

/// Workers' trusted CAs, in the form Pingora's connector takes.
pub type CaBundle = Arc<pingora::protocols::tls::CaType>;

/// Why TLS material was refused; the message names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    #[error("{path}: {reason}")]
    Unreadable { path: String, reason: String },
    #[error("{path}: no PEM certificate in it")]
    NoCertificate { path: String },
    #[error("{path}: not an X.509 certificate: {reason}")]
    BadCertificate { path: String, reason: String },
    #[error("{path}: no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {reason}")]
    BadKey { path: String, reason: String },
    #[error("{key} is not the private key of the certificate in {cert}")]
    Mismatch { cert: String, key: String },
}

impl TlsFileError {
    /// The field at fault: `key` when the key could not be used, `cert` otherwise.
    pub fn field(&self) -> &'static str {
        match self {
            TlsFileError::BadKey { .. } => "key",
            _ => "cert",
        }
    }
}

fn shown(path: &Path) -> String {
    path.display().to_string()
}

/// Reads every certificate of a PEM file, each checked to parse as X.509.
fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let unreadable = |reason: String| TlsFileError::Unreadable {
        path: shown(path),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| unreadable(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unreadable(format!("not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(TlsFileError::NoCertificate { path: shown(path) });
    }
    for cert in &certs {
        x509_parser::parse_x509_certificate(cert).map_err(|e| TlsFileError::BadCertificate {
            path: shown(path),
            reason: e.to_string(),
        })?;
    }
    Ok(certs)
}

/// Loads a listener's chain and key and checks that the key is the leaf's.
pub fn load_cert(files: &CertFiles) -> Result<LoadedCert, TlsFileError> {
    let chain = read_certificates(&files.cert)?;
    let bad_key = |reason: String| TlsFileError::BadKey {
        path: shown(&files.key),
        reason,
    };
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| bad_key(e.to_string()))?;
    let signing_key =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| bad_key(e.to_string()))?;
    let not_after = x509_parser::parse_x509_certificate(&chain[0])
        .map(|(_, leaf)| leaf.validity().not_after.timestamp())
        .unwrap_or(0);
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        // `Unknown`: the key type cannot say; the handshake will.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(_) => {
            return Err(TlsFileError::Mismatch {
                cert: shown(&files.cert),
                key: shown(&files.key),
            })
        }
    }
    Ok(LoadedCert {
        certified: Arc::new(certified),
        not_after,
    })
}

/// Loads a CA bundle (one or more PEM certificates) for verifying workers.
pub fn load_ca_bundle(path: &Path) -> Result<CaBundle, TlsFileError> {
    let certs = read_certificates(path)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in &certs {
        roots
            .add(cert.clone())
            .map_err(|e| TlsFileError::BadCertificate {
                path: shown(path),
                reason: e.to_string(),
            })?;
    }
    let wrapped: Vec<WrappedX509> = certs
        .into_iter()
        .map(|cert| WrappedX509::new(cert.to_vec(), parse_x509))
        .collect();
    Ok(wrapped.into())
}
