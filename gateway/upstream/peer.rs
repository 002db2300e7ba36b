//! A worker endpoint as Pingora's connector sees it.

use pingora::protocols::l4::socket::SocketAddr;
use pingora::upstreams::peer::{HttpPeer, Peer, PeerOptions, Proxy, Tracer};
use pingora::utils::tls::CertKey;
use std::fmt;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;

/// An endpoint's `HttpPeer`, built once per config, with every trait method `HttpPeer`
/// overrides passed on to it, save one check. Pingora asks the kernel
/// for a pooled connection's peer address (`getpeername`) each time it hands one out, to be
/// sure the descriptor still points where the pool says. A pooled connection owns its
/// descriptor, so it cannot point anywhere else; and the pool is keyed by the peer (address,
/// TLS settings), so it only hands out connections to this one. The check is a system call
/// per call that answers nothing.
#[derive(Clone)]
pub struct WorkerPeer(pub HttpPeer);

impl Peer for WorkerPeer {
    fn address(&self) -> &SocketAddr {
        self.0.address()
    }

    fn tls(&self) -> bool {
        self.0.tls()
    }

    fn sni(&self) -> &str {
        self.0.sni()
    }

    fn reuse_hash(&self) -> u64 {
        self.0.reuse_hash()
    }

    fn get_peer_options(&self) -> Option<&PeerOptions> {
        self.0.get_peer_options()
    }

    fn get_mut_peer_options(&mut self) -> Option<&mut PeerOptions> {
        self.0.get_mut_peer_options()
    }

    fn get_proxy(&self) -> Option<&Proxy> {
        self.0.get_proxy()
    }

    fn get_client_cert_key(&self) -> Option<&Arc<CertKey>> {
        self.0.get_client_cert_key()
    }

    fn get_tracer(&self) -> Option<Tracer> {
        self.0.get_tracer()
    }

    fn matches_fd<V: AsRawFd>(&self, _fd: V) -> bool {
        true
    }
}

impl fmt::Display for WorkerPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
