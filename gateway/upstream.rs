//! Upstream pools: which worker gets a call, on Pingora's load balancers. Round robin, or
//! Ketama consistent hashing on `session_id` so a conversation stays on one worker while the
//! pool is unchanged. A retry after a failed connect goes to an endpoint not tried yet.
//! Also what a worker receives: the rewritten request head.

use pingora::http::RequestHeader;
use pingora::lb::selection::{Consistent, RoundRobin};
use pingora::lb::{Backend, LoadBalancer};
use pingora::upstreams::peer::HttpPeer;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::config::{Balance, PoolConfig, Runtime};
use crate::ctx::RequestCtx;
use crate::headers::{
    X_ACCOUNT_ID, X_AGENT_ID, X_FORWARDED_FOR, X_KEY_ID, X_REQUEST_ID, X_SESSION_ID,
};

/// Client headers a worker never sees: credentials, identities the gateway asserts itself,
/// and hop-by-hop headers that belong to the client's connection.
const DROPPED_HEADERS: [&str; 16] = [
    "accept-encoding",
    "authorization",
    "x-request-id",
    "x-agent-id",
    "x-session-id",
    "x-key-id",
    "x-account-id",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
];

/// The request head a worker receives: the rewritten path, the client's other headers, the
/// gateway's identity headers, `X-Forwarded-For` with the client's address appended, and the
/// pool's configured headers.
pub fn outgoing_header(
    client: &RequestHeader,
    client_ip: Option<IpAddr>,
    ctx: &RequestCtx,
    pool: &PoolConfig,
) -> pingora::Result<RequestHeader> {
    let missing =
        || pingora::Error::explain(pingora::ErrorType::InternalError, "call not admitted");
    let (call, key, agent) = (
        ctx.call.as_ref().ok_or_else(missing)?,
        ctx.key.as_ref().ok_or_else(missing)?,
        ctx.agent.as_ref().ok_or_else(missing)?,
    );
    let path = pool.path.render(&agent.id);
    let mut header = RequestHeader::build_no_case(
        http::Method::POST,
        path.as_bytes(),
        Some(client.headers.len() + 8),
    )?;
    for (name, value) in &client.headers {
        if !DROPPED_HEADERS.contains(&name.as_str()) && name != http::header::CONTENT_LENGTH {
            header.append_header(name.clone(), value.clone())?;
        }
    }
    if let Some(ip) = client_ip {
        let forwarded_for = match client
            .headers
            .get(X_FORWARDED_FOR)
            .and_then(|v| v.to_str().ok())
        {
            Some(earlier) => format!("{earlier}, {ip}"),
            None => ip.to_string(),
        };
        header.insert_header(X_FORWARDED_FOR, forwarded_for)?;
    }
    // The answer's usage must be readable: no compression between gateway and worker.
    header.insert_header(http::header::ACCEPT_ENCODING, "identity")?;
    header.insert_header(X_REQUEST_ID, ctx.request_id.as_str())?;
    header.insert_header(X_AGENT_ID, agent.id.as_str())?;
    header.insert_header(X_SESSION_ID, call.session_id.as_str())?;
    header.insert_header(X_KEY_ID, key.id.as_str())?;
    header.insert_header(X_ACCOUNT_ID, key.account.as_str())?;
    header.insert_header(
        http::header::CONTENT_LENGTH,
        http::HeaderValue::from(call.forward_body.len()),
    )?;
    for (name, value) in &pool.headers {
        header.insert_header(name.clone(), value.clone())?;
    }
    Ok(header)
}

/// Bound on the selection walk; pools are small.
const MAX_SELECTION_STEPS: usize = 256;

enum Selector {
    RoundRobin(LoadBalancer<RoundRobin>),
    Session(LoadBalancer<Consistent>),
}

pub struct Pool {
    pub config: PoolConfig,
    selector: Selector,
}

/// Every pool of one config, by name.
#[derive(Default)]
pub struct Pools(HashMap<String, Arc<Pool>>);

impl Pools {
    pub fn build(runtime: &Runtime) -> std::io::Result<Self> {
        let mut pools = HashMap::new();
        for (name, config) in &runtime.pools {
            pools.insert(name.clone(), Arc::new(Pool::new(config.clone())?));
        }
        Ok(Self(pools))
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Pool>> {
        self.0.get(name)
    }
}

impl Pool {
    fn new(config: PoolConfig) -> std::io::Result<Self> {
        let endpoints = config.endpoints.clone();
        let selector = match config.balance {
            Balance::RoundRobin => Selector::RoundRobin(LoadBalancer::try_from_iter(endpoints)?),
            Balance::Session => Selector::Session(LoadBalancer::try_from_iter(endpoints)?),
        };
        Ok(Self { config, selector })
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

    /// A plain-HTTP peer for `addr` with the connect timeout. The answer timeout is one
    /// deadline over the whole exchange (see `exchange`), not a timer per read.
    pub fn peer(&self, addr: SocketAddr) -> HttpPeer {
        let mut peer = HttpPeer::new(addr, false, String::new());
        peer.options.connection_timeout = Some(self.config.connect_timeout);
        peer.options.total_connection_timeout = Some(self.config.connect_timeout);

        peer
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
