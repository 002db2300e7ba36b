//! A TLS handshake held to `limits.header_timeout`, as a request head is: Pingora gives a
//! handshake a fixed 60 s, so a client that opens connections and never finishes them would
//! hold a task and a socket each for a minute.
//!
//! Pingora has no hook for the handshake's own timeout, so each TLS connection gets a
//! deadline before its handshake starts (a pre-TLS callback); the app marks the connection
//! done when it receives it, handshaken, which cancels the deadline. A connection still
//! unmarked at its deadline has its socket shut down, which ends the handshake with an
//! error. The socket is named by its descriptor and its kernel cookie (`SO_COOKIE`), so a
//! descriptor closed (a failed handshake) and reused meanwhile is never touched, and no
//! socket is held open past its connection.

use async_trait::async_trait;
use parking_lot::Mutex;
use pingora::listeners::PreTlsProcess;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::{GetSocketDigest, SocketDigest};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use tokio::task::AbortHandle;

/// `SO_COOKIE` (asm-generic/socket.h, Linux 4.12): a socket's number, unique for the
/// kernel's uptime.
const SO_COOKIE: libc::c_int = 57;

/// A handshake under way: its own number, its socket, and its deadline's task.
struct UnderWay {
    id: u64,
    fd: RawFd,
    cookie: u64,
    deadline: AbortHandle,
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
        let (Some(digest), fd) = (stream.get_socket_digest(), stream.as_raw_fd()) else {
            return Ok(());
        };
        let Some(cookie) = socket_cookie(fd) else {
            return Ok(());
        };
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let key = digest_key(&digest);
        let limit = (self.limit)();
        let mut under_way = UNDER_WAY.lock();
        let deadline = tokio::spawn(async move {
            tokio::time::sleep(limit).await;
            let late = {
                let mut under_way = UNDER_WAY.lock();
                match under_way.get(&key) {
                    Some(entry) if entry.id == id => under_way.remove(&key),
                    _ => None,
                }
            };
            if let Some(late) = late.filter(|late| socket_cookie(late.fd) == Some(late.cookie)) {
                tracing::debug!("TLS handshake not finished within limits.header_timeout");
                // SAFETY: `late.fd` is the socket this connection was accepted on (its cookie
                // says so); shutdown ends its traffic and closes nothing.
                unsafe {
                    libc::shutdown(late.fd, libc::SHUT_RDWR);
                }
            }
        })
        .abort_handle();
        under_way.insert(
            key,
            UnderWay {
                id,
                fd,
                cookie,
                deadline,
            },
        );
        Ok(())
    }
}

/// Marks a connection's handshake finished, cancelling its deadline; called for every
/// connection the app receives.
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
    if let Some(finished) = finished {
        finished.deadline.abort();
    }
}

/// The kernel's cookie of the socket `fd` is; `None` when it is no socket (any more).
fn socket_cookie(fd: RawFd) -> Option<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, which has them.
    let got = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    (got == 0).then_some(cookie)
}

fn digest_key(digest: &Arc<SocketDigest>) -> usize {
    Arc::as_ptr(digest) as usize
}
