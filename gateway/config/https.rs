//! A pool's `https://` endpoints compiled: every endpoint of a pool HTTPS or none, one name
//! per address (a connection is checked against one), the `ca:` bundle loaded, and the key
//! that keeps connections made under different bundles apart in the keep-alive pool.

use std::collections::HashMap;

use super::endpoint::Endpoint;
use super::errors::Report;
use super::files::beside_config;
use super::spec::UpstreamSpec;
use super::UpstreamTls;
use crate::tls::{load_ca_bundle, CaBundle};

/// A digest of a CA bundle's certificates.
fn trust_key(bundle: &CaBundle) -> u64 {
    use sha2::{Digest, Sha256};
    let mut digest = Sha256::new();
    for cert in bundle.iter() {
        digest.update(cert.borrow_raw_cert());
    }
    let bytes: [u8; 32] = digest.finalize().into();
    u64::from_be_bytes(bytes[..8].try_into().unwrap_or_default())
}

/// A pool's HTTPS settings: all its endpoints `https://`, or none of them.
pub(super) fn compile_upstream_tls(
    key: &str,
    spec: &UpstreamSpec,
    endpoints: &[Endpoint],
    report: &mut Report,
) -> Option<UpstreamTls> {
    let https = endpoints.iter().filter(|e| e.https_name.is_some()).count();
    if https == 0 {
        if spec.ca.is_some() {
            report.error(format!("{key}.ca"), "only applies to https:// endpoints");
        }
        if !spec.verify {
            report.error(
                format!("{key}.verify"),
                "only applies to https:// endpoints",
            );
        }
        return None;
    }
    if https != endpoints.len() {
        report.error(
            format!("{key}.endpoints"),
            "mixes http and https endpoints: a pool's workers are reached one way",
        );
        return None;
    }
    let ca = spec.ca.as_ref().and_then(|path| {
        load_ca_bundle(&beside_config(report, path))
            .map_err(|e| report.error(format!("{key}.ca"), e))
            .ok()
    });
    let mut names = HashMap::new();
    for endpoint in endpoints {
        let name = endpoint.https_name.as_deref().unwrap_or_default();
        if let Some(other) = names
            .insert(endpoint.addr, name)
            .filter(|other| *other != name)
        {
            report.error(
                format!("{key}.endpoints"),
                format!(
                    "'{other}' and '{name}' are both {}: one connection cannot be checked against two names",
                    endpoint.addr
                ),
            );
        }
    }
    Some(UpstreamTls {
        trust_key: ca.as_ref().map_or(0, trust_key),
        server_names: endpoints
            .iter()
            .filter_map(|e| e.https_name.clone())
            .collect(),
        ca,
        verify: spec.verify,
    })
}
