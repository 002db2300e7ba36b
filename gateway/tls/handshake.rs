//! A TLS handshake held to `limits.header_timeout`, as a request head is: Pingora gives a
//! handshake a fixed 60 s, so a client that opens connections and never finishes them would
//! hold a task and a socket each for a minute.
//!
//! Pingora has no hook for the handshake's own timeout, so each TLS connection gets a
//! deadline before its handshake starts (a pre-TLS callback); the app marks the connection
//! done when it receives it, handshaken. A connection still unmarked at its deadline has its
//! socket shut down, which ends the handshake with an error.

use async_trait::async_trait;
use parking_lot::Mutex;
use pingora::listeners::PreTlsProcess;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::{GetSocketDigest, SocketDigest};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

/// A handshake under way: its own number, and a duplicate of its socket, which keeps the
/// socket (not just its number) there for the deadline to shut down.
struct UnderWay {
    id: u64,
    socket: OwnedFd,
}

/// Handshakes under way, by their connection's socket digest (its address: the one thing
/// Pingora carries from the raw socket to the handshaken stream).
static UNDER_WAY: LazyLock<Mutex<HashMap<usize, UnderWay>>> = LazyLock::new(Default::default);
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// The pre-TLS callback of a TLS listener: arms each connection's deadline.
pub struct HandshakeDeadline {
    /// The deadline in force (`limits.header_timeout`, which a reload may change).
    limit: Box<dyn Fn() -> Duration + Send + Sync>,
}

impl HandshakeDeadline {
    pub fn new(limit: impl Fn() -> Duration + Send + Sync + 'static) -> Self {
        Self {
            limit: Box::new(limit),
        }
    }
}

#[async_trait]
impl PreTlsProcess for HandshakeDeadline {
    async fn process(&self, stream: &mut L4Stream) -> pingora::Result<()> {
        let Some(digest) = stream.get_socket_digest() else {
            return Ok(());
        };
        // Without a duplicate the deadline could not be kept: the connection is refused.
        // SAFETY: the stream's descriptor is open for as long as `stream` is borrowed.
        let borrowed = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
        let socket = borrowed.try_clone_to_owned().map_err(|e| {
            pingora::Error::because(pingora::ErrorType::AcceptError, "dup of a TLS socket", e)
        })?;
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let key = digest_key(&digest);
        UNDER_WAY.lock().insert(key, UnderWay { id, socket });
        let limit = (self.limit)();
        tokio::spawn(async move {
            tokio::time::sleep(limit).await;
            let late = {
                let mut under_way = UNDER_WAY.lock();
                match under_way.get(&key) {
                    Some(entry) if entry.id == id => under_way.remove(&key),
                    _ => None,
                }
            };
            if let Some(late) = late {
                tracing::debug!("TLS handshake not finished within limits.header_timeout");
                // SAFETY: `late.socket` is an open descriptor this task owns; shutdown ends
                // the connection's traffic and closes nothing.
                unsafe {
                    libc::shutdown(late.socket.as_raw_fd(), libc::SHUT_RDWR);
                }
            }
        });
        Ok(())
    }
}

/// Marks a connection's handshake finished (and lets go of its duplicate socket); called
/// for every connection the app receives.
pub fn handshake_done(connection: Option<Arc<SocketDigest>>) {
    let Some(digest) = connection else {
        return;
    };
    let finished = {
        let mut under_way = UNDER_WAY.lock();
        if under_way.is_empty() {
            return;
        }
        under_way.remove(&digest_key(&digest))
    };
    drop(finished);
}

fn digest_key(digest: &Arc<SocketDigest>) -> usize {
    Arc::as_ptr(digest) as usize
}
