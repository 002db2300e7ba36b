//! An HTTPS front for a mock worker: TLS with a certificate of the test's CA, offering the
//! ALPN protocols a test names. HTTP/1.1 is piped to the worker as is; on HTTP/2 each stream
//! becomes one HTTP/1.1 request to it, so the gateway meets a real HTTP/2 worker.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::raw::read_response;
use super::tls::{provider_for_tests, Leaf};
use super::Worker;

/// An HTTPS front for a mock worker: TLS with `leaf`, offering `alpn`. An HTTP/1.1
/// connection is piped to the worker as is; on HTTP/2 each stream becomes one HTTP/1.1
/// request to it. Records the protocol each connection chose.
pub struct TlsWorker {
    pub port: u16,
    protocols: Arc<Mutex<Vec<String>>>,
}

impl TlsWorker {
    pub fn start(worker: &Worker, leaf: &Leaf, alpn: &[&[u8]]) -> Self {
        let certs = vec![CertificateDer::from(leaf.der.clone())];
        let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(provider_for_tests())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let protocols = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&protocols);
        let target = worker.addr();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        continue;
                    };
                    let (acceptor, seen, target) = (acceptor.clone(), seen.clone(), target.clone());
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            seen.lock().unwrap().push("handshake failed".into());
                            return;
                        };
                        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                        seen.lock()
                            .unwrap()
                            .push(if h2 { "h2" } else { "http/1.1" }.into());
                        if h2 {
                            serve_h2(tls, &target).await;
                        } else if let Ok(mut plain) = tokio::net::TcpStream::connect(&target).await
                        {
                            let mut tls = tls;
                            let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                        }
                    });
                }
            });
        });
        Self { port, protocols }
    }

    /// The protocol each connection to this front chose, in order.
    pub fn protocols(&self) -> Vec<String> {
        self.protocols.lock().unwrap().clone()
    }
}

async fn serve_h2<IO>(io: IO, target: &str)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let Ok(mut connection) = h2::server::handshake(io).await else {
        return;
    };
    while let Some(Ok((request, mut respond))) = connection.accept().await {
        let target = target.to_string();
        tokio::spawn(async move {
            let (parts, mut body) = request.into_parts();
            let mut bytes = Vec::new();
            while let Some(Ok(chunk)) = body.data().await {
                let _ = body.flow_control().release_capacity(chunk.len());
                bytes.extend_from_slice(&chunk);
            }
            let mut head = format!("{} {} HTTP/1.1\r\n", parts.method, parts.uri.path());
            for (name, value) in &parts.headers {
                if name != http::header::CONTENT_LENGTH {
                    head.push_str(&format!("{name}: {}\r\n", value.to_str().unwrap_or("")));
                }
            }
            let host = parts
                .uri
                .authority()
                .map(|a| a.as_str())
                .unwrap_or("worker");
            head.push_str(&format!(
                "host: {host}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                bytes.len()
            ));
            let Ok(mut plain) = tokio::net::TcpStream::connect(&target).await else {
                return;
            };
            let _ = plain.write_all(head.as_bytes()).await;
            let _ = plain.write_all(&bytes).await;
            let mut answer = Vec::new();
            let _ = plain.read_to_end(&mut answer).await;
            let reply = read_response(&mut &answer[..], "worker via h2".into());
            let mut response = http::Response::builder().status(reply.status);
            for (name, value) in &reply.headers {
                if !["connection", "keep-alive", "transfer-encoding"].contains(&name.as_str()) {
                    response = response.header(name, value);
                }
            }
            if let Ok(mut send) = respond.send_response(response.body(()).unwrap(), false) {
                let _ = send.send_data(Bytes::from(reply.body.into_bytes()), true);
            }
        });
    }
}
