//! HTTP/2 requests whose `:path` carried a `#fragment`. The `h2` crate drops a fragment before
//! the gateway sees the request, so `/v1/agents/ag_x/chat#junk` would match where the same
//! target over HTTP/1.1 answers 404 (SPEC §1: trailing junk never matches). The edge watches
//! each HTTP/2 connection's header blocks as they arrive ([`Watch`], on
//! `turnpike_core::h2_watch`) and notes such paths here, per connection; the pipeline asks
//! [`had_fragment`] of each HTTP/2 request first of all, which takes its note. A note no
//! request takes (a stream refused or reset before it was served) stays until its connection
//! ends; a connection with [`MOST_NOTED`] of them is closed.
//!
//! A connection is known by its socket digest, which Pingora hands from the accepted socket
//! to every stream of the connection.

use parking_lot::Mutex;
use pingora::protocols::SocketDigest;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};

use turnpike_core::h2_watch::H2PathWatch;

/// Per connection, the paths (before the fragment) of its requests not yet routed.
static NOTED: LazyLock<Mutex<HashMap<usize, Vec<String>>>> = LazyLock::new(Default::default);
/// How many connections have paths noted: none, almost always, and then no lock is taken.
static CONNECTIONS_NOTED: AtomicUsize = AtomicUsize::new(0);
/// The most paths noted on one connection and not yet taken: more is a client sending
/// fragments it never waits for, and its connection is closed.
pub const MOST_NOTED: usize = 64;

/// One HTTP/2 connection's watch, fed every byte the client sends, first to last.
#[derive(Debug)]
pub struct Watch {
    watcher: H2PathWatch,
    connection: usize,
    noted: bool,
}

impl Watch {
    /// A watch for the connection with this socket digest; `None` without one.
    pub fn new(connection: Option<Arc<SocketDigest>>) -> Option<Box<Self>> {
        Some(Box::new(Self {
            watcher: H2PathWatch::default(),
            connection: key(&connection?),
            noted: false,
        }))
    }

    /// Follows the next bytes the client sent. An error means the connection can no longer
    /// be followed (a header block past the watch's limit, or bytes the `h2` crate refuses
    /// too): it is closed rather than served unwatched.
    pub fn feed(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.watcher
            .feed(bytes)
            .map_err(|lost| std::io::Error::new(std::io::ErrorKind::InvalidData, lost))?;
        if self.watcher.has_findings() {
            let found = self.watcher.take_fragment_paths();
            let mut noted = NOTED.lock();
            let paths = noted.entry(self.connection).or_insert_with(|| {
                CONNECTIONS_NOTED.fetch_add(1, Ordering::Relaxed);
                Vec::new()
            });
            paths.extend(found.into_iter().map(|f| f.path_before_fragment));
            self.noted = true;
            if paths.len() > MOST_NOTED {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "too many HTTP/2 requests with a fragment in :path",
                ));
            }
        }
        Ok(())
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if self.noted && NOTED.lock().remove(&self.connection).is_some() {
            CONNECTIONS_NOTED.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Whether an HTTP/2 request on this connection with this path (and query) was sent with a
/// fragment; each noted path answers yes once. Two requests on one connection with the same
/// path, one with a fragment and one without, may swap answers: both are that client's own.
pub fn had_fragment(connection: Option<&Arc<SocketDigest>>, path_and_query: &str) -> bool {
    if CONNECTIONS_NOTED.load(Ordering::Relaxed) == 0 {
        return false;
    }
    let Some(connection) = connection else {
        return false;
    };
    let mut noted = NOTED.lock();
    let Some(paths) = noted.get_mut(&key(connection)) else {
        return false;
    };
    match paths.iter().position(|p| p == path_and_query) {
        Some(at) => {
            paths.swap_remove(at);
            true
        }
        None => false,
    }
}

fn key(connection: &Arc<SocketDigest>) -> usize {
    Arc::as_ptr(connection) as usize
}
