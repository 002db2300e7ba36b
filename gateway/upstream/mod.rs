//! The worker side of a call. Pools pick a worker on Pingora's load balancers: round
//! robin, or Ketama consistent hashing on `session_id` so a conversation stays on one worker
//! while the pool is unchanged; a retry after a failed connect goes to an endpoint not tried
//! yet. `head` writes what a worker receives; `exchange` sends it and reads the answer.

pub mod exchange;
pub mod head;

pub use exchange::{AnswerBody, ExchangeFailure, Outgoing, Upstreams, WorkerAnswer, WorkerStream};

use pingora::lb::selection::{Consistent, RoundRobin};
use pingora::lb::{Backend, LoadBalancer};
use pingora::upstreams::peer::HttpPeer;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::{Balance, PoolConfig};
use crate::metrics::{EndpointMetrics, Metrics};

/// Bound on the selection walk; pools are small.
const MAX_SELECTION_STEPS: usize = 256;

enum Selector {
    RoundRobin(LoadBalancer<RoundRobin>),
    Session(LoadBalancer<Consistent>),
}

pub struct Pool {
    pub config: PoolConfig,
    selector: Selector,
    /// Each endpoint's attempt counters and passive health, in `config.endpoints` order.
    endpoint_metrics: Vec<(SocketAddr, EndpointMetrics)>,
    /// HTTPS pools: each endpoint's `Host`, in `config.endpoints` order.
    https_hosts: Vec<String>,
}

/// Every pool of one config, by name, with their endpoints' metrics.
pub fn build_pools(
    configs: &BTreeMap<String, PoolConfig>,
    metrics: &Metrics,
) -> std::io::Result<BTreeMap<String, Arc<Pool>>> {
    configs
        .iter()
        .map(|(name, config)| {
            let pool = Pool::new(name, config.clone(), metrics)?;
            Ok((name.clone(), Arc::new(pool)))
        })
        .collect()
}

impl Pool {
    fn new(name: &str, config: PoolConfig, metrics: &Metrics) -> std::io::Result<Self> {
        let endpoints = config.endpoints.clone();
        let endpoint_metrics = endpoints
            .iter()
            .map(|addr| (*addr, metrics.endpoint(name, &addr.to_string())))
            .collect();
        if config.tls.as_ref().is_some_and(|tls| !tls.verify) {
            tracing::warn!(
                pool = name,
                "upstream pool has `verify: false`: its workers' certificates are NOT checked, so anyone on the path can pose as them; use `ca:` instead"
            );
        }
        let https_hosts = config.tls.as_ref().map_or_else(Vec::new, |tls| {
            tls.server_names
                .iter()
                .zip(&config.endpoints)
                .map(|(name, addr)| {
                    let name = if name.contains(':') {
                        format!("[{name}]")
                    } else {
                        name.clone()
                    };
                    match addr.port() {
                        443 => name,
                        port => format!("{name}:{port}"),
                    }
                })
                .collect()
        });
        let selector = match config.balance {
            Balance::RoundRobin => Selector::RoundRobin(LoadBalancer::try_from_iter(endpoints)?),
            Balance::Session => Selector::Session(LoadBalancer::try_from_iter(endpoints)?),
        };
        Ok(Self {
            config,
            selector,
            endpoint_metrics,
            https_hosts,
        })
    }

    /// The metrics of the endpoint at `addr` (one of this pool's).
    pub fn endpoint_metrics(&self, addr: SocketAddr) -> Option<&EndpointMetrics> {
        self.endpoint_metrics
            .iter()
            .find(|(a, _)| *a == addr)
            .map(|(_, m)| m)
    }

    /// The next endpoint for a call, skipping those already `tried`; `None` when none is left.
    pub fn select(&self, session_id: &str, tried: &[SocketAddr]) -> Option<SocketAddr> {
        let fresh = |backend: &Backend, _healthy: bool| !tried.contains(&backend.addr_socket());
        let backend = match &self.selector {
            Selector::RoundRobin(lb) => lb.select_with(b"", MAX_SELECTION_STEPS, fresh),
            Selector::Session(lb) => {
                lb.select_with(session_id.as_bytes(), MAX_SELECTION_STEPS, fresh)
            }
        };
        backend.map(|b| b.addr_socket())
    }

    /// The peer for `addr` with the connect timeout (which covers the TLS handshake too).
    /// The answer timeout is one deadline over the whole exchange (see `exchange`), not a
    /// timer per read. An HTTPS peer sends its endpoint's name as SNI, checks the
    /// certificate against it and the pool's CA (unless `verify: false`), and offers HTTP/2.
    ///
    /// Also returns the `Host` an HTTPS worker is sent: its name (and port, unless 443), as
    /// nginx sends `$proxy_host`, so a worker behind a name-based ingress finds its site;
    /// `None` for plain-HTTP pools, whose workers get the client's `Host`.
    pub fn peer(&self, addr: SocketAddr) -> (HttpPeer, Option<&str>) {
        let tls = self.config.tls.as_ref();
        // Only an HTTPS pool looks its endpoint up (pools are small).
        let index = tls.and_then(|_| self.config.endpoints.iter().position(|a| *a == addr));
        let server_name = tls
            .zip(index)
            .and_then(|(tls, i)| tls.server_names.get(i).cloned())
            .unwrap_or_default();
        let host = index
            .and_then(|i| self.https_hosts.get(i))
            .map(String::as_str);
        let mut peer = HttpPeer::new(addr, tls.is_some(), server_name);
        peer.options.connection_timeout = Some(self.config.connect_timeout);
        peer.options.total_connection_timeout = Some(self.config.connect_timeout);
        if let Some(tls) = tls {
            peer.options.ca = tls.ca.clone();
            peer.options.verify_cert = tls.verify;
            peer.options.verify_hostname = tls.verify;
            peer.options.alpn = pingora::protocols::ALPN::H2H1;
            peer.group_key = tls.trust_key;
        }
        (peer, host)
    }
}

trait BackendAddr {
    fn addr_socket(&self) -> SocketAddr;
}

impl BackendAddr for Backend {
    fn addr_socket(&self) -> SocketAddr {
        match &self.addr {
            pingora::protocols::l4::socket::SocketAddr::Inet(addr) => *addr,
            // Pools are built from IP endpoints only.
            pingora::protocols::l4::socket::SocketAddr::Unix(_) => {
                SocketAddr::from(([0, 0, 0, 0], 0))
            }
        }
    }
}
