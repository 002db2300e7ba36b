//! The front door of both public listeners (plain and TLS, whose handshake Pingora has done).
//! An HTTP/1 request head is read here first, under `limits.header_timeout` and
//! `limits.max_header_bytes`, then handed to Pingora as if it had just arrived.
//!
//! Pingora's only bounds on a head are a 60 s timeout per read (a client sending a byte a
//! minute holds its task for ever) and its parser's 1 MiB and 256 header lines, refused with
//! a bare 400. Here a head that takes too long closes the connection, and one too large gets
//! the contract's 431, for every head on every kept-alive connection.
//!
//! A connection that negotiated `h2` by ALPN, or a cleartext one that opens with HTTP/2's
//! preface (h2c with prior knowledge), goes to Pingora's HTTP/2 server instead, whose
//! streams run the same proxy; there the h2 layer bounds each head (`max_header_list_size`,
//! a bare 431) and its settings bound the streams per connection.

use async_trait::async_trait;
use bytes::{Buf, BytesMut};
use pingora::apps::{
    HttpPersistentSettings, HttpServerApp, HttpServerOptions, ReusedHttpStream, ServerApp,
};
use pingora::protocols::http::v2::server::H2Options;
use pingora::protocols::http::ServerSession;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID,
    UniqueIDType, ALPN,
};
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

use turnpike_core::head::{HeadScan, HeadScanner};
use turnpike_core::ids::new_request_id;

use crate::error::GatewayError;
use crate::h2_paths;
use crate::lifecycle::{Counted, Lifecycle};
use crate::pipeline::finish;
use crate::proxy::Gateway;
use crate::services::Services;

/// How long a kept-alive connection may sit idle before its next request: Pingora's default.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
/// How long, and how much, a refused client's unread bytes are drained before the connection
/// closes, so its kernel does not reset the connection under the 431 it has not read yet.
const DRAIN_TIME: Duration = Duration::from_secs(2);
const DRAIN_BYTES: usize = 4 << 20;
/// How often a connection idle between requests looks at whether the gateway is stopping.
const SHUTDOWN_CHECK: Duration = Duration::from_secs(1);
/// A read-ahead buffer larger than this (after a large head) is not kept between requests.
const KEPT_BUFFER_BYTES: usize = 64 << 10;
/// How every HTTP/2 connection begins (RFC 9113 §3.4). The head scanner reads its first 18
/// bytes as a head: that is how a cleartext one is told from HTTP/1.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const H2_PREFACE_HEAD: &[u8] = b"PRI * HTTP/2.0\r\n\r\n";

/// The public listeners' app: heads read here, calls served by Pingora's proxy.
pub struct Edge {
    proxy: Arc<HttpProxy<Gateway>>,
    h2: Arc<Http2Calls>,
    services: Arc<Services>,
}

impl Edge {
    pub fn new(proxy: HttpProxy<Gateway>, services: Arc<Services>) -> Self {
        let proxy = Arc::new(proxy);
        let mut h2_server = HttpServerOptions::default();
        // An idle HTTP/2 connection closes as an idle HTTP/1 one does.
        h2_server.h2_idle_timeout = Some(KEEPALIVE_IDLE);
        Self {
            h2: Arc::new(Http2Calls {
                proxy: Arc::clone(&proxy),
                services: Arc::clone(&services),
                server: h2_server,
            }),
            proxy,
            services,
        }
    }
}

impl Edge {
    /// Serves an HTTP/2 connection once its whole preface has arrived within
    /// `limits.header_timeout` (Pingora's HTTP/2 handshake has no time limit of its own, so a
    /// client that never finishes it would hold the connection, and a drain, for ever).
    async fn serve_h2(
        self: &Arc<Self>,
        mut conn: Box<ReadAhead>,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let limit = self.services.snapshot().config.limits.header_timeout;
        let deadline = Instant::now() + limit;
        // From its first byte (the preface, read ahead below, is read again through it).
        conn.watch = h2_paths::Watch::new(conn.inner.get_socket_digest());
        while conn.ahead.len() < H2_PREFACE.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            conn.ahead.reserve(H2_PREFACE.len());
            match pingora::time::timeout(left, conn.inner.read_buf(&mut conn.ahead)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return None,
            }
        }
        self.h2.process_new(conn, shutdown).await
    }
}

/// Pingora's HTTP/2 server over the proxy, each stream counted in flight while it runs (as
/// the HTTP/1 path counts a request from its first byte), so a drain waits for it.
struct Http2Calls {
    proxy: Arc<HttpProxy<Gateway>>,
    services: Arc<Services>,
    server: HttpServerOptions,
}

#[async_trait]
impl HttpServerApp for Http2Calls {
    async fn process_new_http(
        self: &Arc<Self>,
        session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        let _in_flight = self.services.lifecycle.request_begins();
        self.proxy.process_new_http(session, shutdown).await
    }

    fn h2_options(&self) -> Option<H2Options> {
        self.proxy.h2_options.clone()
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        Some(&self.server)
    }
}

/// How reading a head ended.
enum Head {
    /// Whole, and within the limits: Pingora takes it from here.
    Ready,
    TooLarge {
        limit: usize,
    },
    /// Closed by the client, timed out, or the gateway is shutting down: nothing to answer.
    Gone,
}

#[async_trait]
impl ServerApp for Edge {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // A drain waits for every connection to close (idle ones close at the shutdown).
        let _open = self.services.lifecycle.connection_opens();
        crate::tls::handshake_done(stream.get_socket_digest());
        let alpn_h2 = stream.selected_alpn_proto() == Some(ALPN::H2);
        let mut conn = Box::new(ReadAhead {
            inner: stream,
            ahead: BytesMut::new(),
            h2_prior_knowledge: false,
            watch: None,
        });
        if alpn_h2 {
            return self.serve_h2(conn, shutdown).await;
        }
        // What Pingora keeps from one request to the next on a kept-alive connection.
        let mut kept: Option<HttpPersistentSettings> = None;
        let mut reused = false;
        loop {
            let limits = self.services.snapshot().config.limits;
            // A new connection's head is timed from the start; a kept-alive one's from its
            // first byte, after an idle wait.
            let timed_from_start = !reused;
            // Counted in flight from its first byte to the end of its answer, so a drain
            // waits for it.
            let mut in_flight = None;
            let head = conn
                .read_head(
                    limits.max_header_bytes,
                    limits.header_timeout,
                    timed_from_start,
                    shutdown,
                    (&self.services.lifecycle, &mut in_flight),
                )
                .await;
            match head {
                Head::Ready if !reused && conn.ahead.starts_with(H2_PREFACE_HEAD) => {
                    // Its streams are counted one by one instead.
                    drop(in_flight);
                    conn.h2_prior_knowledge = true;
                    return self.serve_h2(conn, shutdown).await;
                }
                Head::Ready => {}
                Head::TooLarge { limit } => {
                    conn.refuse(&self.services, &GatewayError::HeadersTooLarge { limit })
                        .await;
                    return None;
                }
                Head::Gone => return None,
            }
            let mut session = ServerSession::new_http1(conn);
            session.set_keepalive(Some(KEEPALIVE_IDLE.as_secs()));
            match kept.take() {
                Some(settings) => settings.apply_to_session(&mut session),
                // As Pingora's own accept path does for a new connection.
                None => session.set_keepalive_reuses_remaining(
                    self.proxy
                        .server_options()
                        .and_then(|o| o.keepalive_request_limit),
                ),
            }
            if *shutdown.borrow() {
                session.set_keepalive(None);
            }
            let reused_stream = self.proxy.process_new_http(session, shutdown).await?;
            let (stream, settings) = reused_stream.consume();
            conn = stream.into_any().downcast::<ReadAhead>().ok()?;
            if conn.ahead.is_empty() && conn.ahead.capacity() > KEPT_BUFFER_BYTES {
                conn.ahead = BytesMut::new();
            }
            kept = settings;
            reused = true;
        }
    }

    /// Runs once the listener's accept loop has ended at shutdown.
    async fn cleanup(&self) {
        self.services.lifecycle.close_listener();
        self.proxy.http_cleanup().await;
    }
}

/// A client connection whose next head was read ahead: those bytes are served again, first,
/// to whoever reads the connection next (Pingora's parser).
#[derive(Debug)]
struct ReadAhead {
    inner: Stream,
    ahead: BytesMut,
    /// A cleartext connection that opened with HTTP/2's preface: it reports `h2` as its
    /// protocol, as ALPN would have, so Pingora serves it as HTTP/2.
    h2_prior_knowledge: bool,
    /// An HTTP/2 connection's watch over its header blocks: every byte read is shown to it.
    watch: Option<Box<h2_paths::Watch>>,
}

impl ReadAhead {
    /// Reads until the head in `ahead` is whole, too large, or out of time. Timers are
    /// Pingora's shared, lazily armed ones (none when the bytes are already there), and
    /// shutdown is looked at between reads rather than waited on, so a request costs no
    /// registration on a channel every connection shares.
    async fn read_head(
        &mut self,
        max_bytes: usize,
        header_timeout: Duration,
        timed_from_start: bool,
        shutdown: &ShutdownWatch,
        (lifecycle, in_flight): (&Lifecycle, &mut Option<Counted>),
    ) -> Head {
        let mut scanner = HeadScanner::default();
        let mut deadline = timed_from_start.then(|| Instant::now() + header_timeout);
        let idle_until = Instant::now() + KEEPALIVE_IDLE;
        loop {
            if in_flight.is_none() && !self.ahead.is_empty() {
                *in_flight = Some(lifecycle.request_begins());
            }
            match scanner.scan(&self.ahead, max_bytes) {
                HeadScan::Complete(_) => return Head::Ready,
                HeadScan::TooLarge => return Head::TooLarge { limit: max_bytes },
                HeadScan::Incomplete => {}
            }
            // Between requests on a kept-alive connection only: a head already begun is
            // finished (or timed out), and a new connection's first request is read.
            if !timed_from_start && self.ahead.is_empty() && *shutdown.borrow() {
                return Head::Gone;
            }
            let until = deadline.unwrap_or(idle_until);
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Head::Gone;
            }
            // An idle connection wakes each second to see whether the gateway is stopping.
            let slice = if deadline.is_none() {
                left.min(SHUTDOWN_CHECK)
            } else {
                left
            };
            self.ahead.reserve(4096);
            match pingora::time::timeout(slice, self.inner.read_buf(&mut self.ahead)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Head::Gone,
                Ok(Ok(_)) => {
                    deadline.get_or_insert_with(|| Instant::now() + header_timeout);
                }
                Err(_) => {}
            }
        }
    }

    /// Answers `error` in the contract's shape, then closes after draining what the client
    /// was still sending.
    async fn refuse(&mut self, services: &Services, error: &GatewayError) {
        let request_id = new_request_id();
        let body = error.body(&request_id);
        let head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nX-Request-Id: {request_id}\r\nConnection: close\r\n\r\n",
            error.status(),
            http::StatusCode::from_u16(error.status())
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or(""),
            body.len(),
        );
        finish::refused_at_the_edge(&services.metrics, &request_id, error);
        let written = async {
            self.inner.write_all(head.as_bytes()).await?;
            self.inner.write_all(&body).await?;
            self.inner.flush().await
        };
        if written.await.is_err() {
            return;
        }
        let _ = AsyncWriteExt::shutdown(&mut self.inner).await;
        let mut drained = 0;
        let mut scratch = vec![0; 16 * 1024];
        let drain = async {
            while drained < DRAIN_BYTES {
                match self.inner.read(&mut scratch).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => drained += n,
                }
            }
        };
        let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
    }
}

impl AsyncRead for ReadAhead {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        if this.ahead.is_empty() {
            match Pin::new(&mut this.inner).poll_read(cx, buf) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
        } else {
            let n = this.ahead.len().min(buf.remaining());
            buf.put_slice(&this.ahead[..n]);
            this.ahead.advance(n);
        }
        if let Some(watch) = this.watch.as_mut() {
            watch.feed(&buf.filled()[before..])?;
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ReadAhead {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

// The rest of Pingora's `IO` is the socket's own.

#[async_trait]
impl Shutdown for ReadAhead {
    async fn shutdown(&mut self) {
        Shutdown::shutdown(&mut *self.inner).await
    }
}

impl UniqueID for ReadAhead {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for ReadAhead {
    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        if self.h2_prior_knowledge {
            return Some(ALPN::H2);
        }
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for ReadAhead {
    fn get_timing_digest(&self) -> Vec<Option<pingora::protocols::TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for ReadAhead {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl GetSocketDigest for ReadAhead {
    fn get_socket_digest(&self) -> Option<Arc<pingora::protocols::SocketDigest>> {
        self.inner.get_socket_digest()
    }
}

#[async_trait]
impl Peek for ReadAhead {}
