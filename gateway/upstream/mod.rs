//! The worker side of a call. Pools pick a worker on Pingora's load balancers: round
//! robin, or Ketama consistent hashing on `session_id` so a conversation stays on one worker
//! while the pool is unchanged; a retry after a failed connect goes to an endpoint not tried
//! yet. `head` writes what a worker receives; `exchange` sends it and reads the answer.

pub mod exchange;
pub mod head;
pub mod peer;

pub use exchange::{AnswerBody, ExchangeFailure, Outgoing, Upstreams, WorkerAnswer, WorkerStream};
pub use peer::WorkerPeer;

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
    /// Each endpoint's peer and counters, in `config.endpoints` order.
    endpoints: Vec<Endpoint>,
}

/// One worker endpoint of a pool.
struct Endpoint {
    addr: SocketAddr,
    peer: WorkerPeer,
    /// The `Host` an HTTPS worker is sent; `None` in a plain-HTTP pool.
    host: Option<String>,
    /// Its attempt counters and passive health.
    metrics: EndpointMetrics,
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
        if config.tls.as_ref().is_some_and(|tls| !tls.verify) {
            tracing::warn!(
                pool = name,
                "upstream pool has `verify: false`: its workers' certificates are NOT checked, so anyone on the path can pose as them; use `ca:` instead"
            );
        }
        let endpoints = config
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, &addr)| Endpoint {
                addr,
                peer: endpoint_peer(&config, i, addr),
                host: https_host(&config, i, addr),
                metrics: metrics.endpoint(name, &addr.to_string()),
            })
            .collect();
        let addrs = config.endpoints.clone();
        let selector = match config.balance {
            Balance::RoundRobin => Selector::RoundRobin(LoadBalancer::try_from_iter(addrs)?),
            Balance::Session => Selector::Session(LoadBalancer::try_from_iter(addrs)?),
        };
        Ok(Self {
            config,
            selector,
            endpoints,
        })
    }

    /// The metrics of the endpoint at `addr` (one of this pool's).
    pub fn endpoint_metrics(&self, addr: SocketAddr) -> Option<&EndpointMetrics> {
        self.endpoint(addr).map(|e| &e.metrics)
    }

    fn endpoint(&self, addr: SocketAddr) -> Option<&Endpoint> {
        self.endpoints.iter().find(|e| e.addr == addr)
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

    /// The peer for `addr` (one of this pool's endpoints), and the `Host` an HTTPS worker is
    /// sent (`None` for plain-HTTP pools, whose workers get the client's `Host`).
    pub fn peer(&self, addr: SocketAddr) -> Option<(&WorkerPeer, Option<&str>)> {
        self.endpoint(addr).map(|e| (&e.peer, e.host.as_deref()))
    }
}

/// The peer for endpoint `i` with the connect timeout (which covers the TLS handshake too).
/// The answer timeout is one deadline over the whole exchange (see `exchange`), not a timer
/// per read. An HTTPS peer sends its endpoint's name as SNI, checks the certificate against
/// it and the pool's CA (unless `verify: false`), and offers HTTP/2.
fn endpoint_peer(config: &PoolConfig, i: usize, addr: SocketAddr) -> WorkerPeer {
    let tls = config.tls.as_ref();
    let server_name = tls
        .and_then(|tls| tls.server_names.get(i).cloned())
        .unwrap_or_default();
    let mut peer = HttpPeer::new(addr, tls.is_some(), server_name);
    peer.options.connection_timeout = Some(config.connect_timeout);
    peer.options.total_connection_timeout = Some(config.connect_timeout);
    if let Some(tls) = tls {
        peer.options.ca = tls.ca.clone();
        peer.options.verify_cert = tls.verify;
        peer.options.verify_hostname = tls.verify;
        peer.options.alpn = pingora::protocols::ALPN::H2H1;
        peer.group_key = tls.trust_key;
    }
    WorkerPeer(peer)
}

/// The `Host` an HTTPS worker is sent: its name (and port, unless 443), as nginx sends
/// `$proxy_host`, so a worker behind a name-based ingress finds its site.
fn https_host(config: &PoolConfig, i: usize, addr: SocketAddr) -> Option<String> {
    let name = config.tls.as_ref()?.server_names.get(i)?;
    let name = if name.contains(':') {
        format!("[{name}]")
    } else {
        name.clone()
    };
    Some(match addr.port() {
        443 => name,
        port => format!("{name}:{port}"),
    })
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
