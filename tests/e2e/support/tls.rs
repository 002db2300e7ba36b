//! TLS for the tests, all made at run time: a CA and the certificates it signs (rcgen),
//! HTTPS clients for HTTP/1.1 and HTTP/2 (rustls, h2), and raw ClientHellos. The HTTPS front
//! for a mock worker is `tls_worker`.

use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::raw::read_response;
use super::{Reply, Worker};

/// A certificate authority of the test's own.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
#[derive(Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { issuer }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `localhost` and `127.0.0.1`.
    pub fn leaf(&self) -> Leaf {
        let params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }
}

/// Writes `contents` to `path` at once (a rename), as cert-manager's swap appears to readers.
pub fn write_atomically(path: &Path, contents: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Writes a pair as `<dir>/tls/cert.pem` and `<dir>/tls/key.pem`, the paths
/// [`tls_block`] names.
pub fn write_pair(dir: &Path, leaf: &Leaf) {
    write_atomically(&dir.join("tls/key.pem"), &leaf.key_pem);
    write_atomically(&dir.join("tls/cert.pem"), &leaf.cert_pem);
}

/// The config's `tls:` block for a listener on `port` with the pair [`write_pair`] writes.
pub fn tls_block(port: u16) -> serde_json::Value {
    serde_json::json!({
        "listen": format!("127.0.0.1:{port}"),
        "cert": "tls/cert.pem",
        "key": "tls/key.pem",
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The crypto the tests' TLS peers use (ring, as the gateway's).
pub(super) fn provider_for_tests() -> Arc<rustls::crypto::CryptoProvider> {
    provider()
}

/// A client that trusts only `ca_pem` and offers `alpn`.
pub fn client_config(ca_pem: &str, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert: CertificateDer<'static> = cert.unwrap();
        roots.add(cert).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A TLS connection (HTTP/1.1 by ALPN) to `127.0.0.1:port` for `localhost`, trusting only
/// `ca_pem`, its handshake done; `Err` says why not.
fn https_connect(
    port: u16,
    ca_pem: &str,
    read_timeout: Duration,
) -> Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>, String> {
    let config = client_config(ca_pem, &[b"http/1.1"]);
    let name = ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(config, name).map_err(|e| e.to_string())?;
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(read_timeout))
        .map_err(|e| e.to_string())?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).map_err(|e| e.to_string())?;
    }
    Ok(rustls::StreamOwned::new(conn, tcp))
}

/// The leaf certificate the server presented on `tls`.
fn presented(tls: &rustls::StreamOwned<rustls::ClientConnection, TcpStream>) -> Option<Vec<u8>> {
    tls.conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|c| c.to_vec())
}

/// Sends `request` as is over HTTPS (HTTP/1.1) and reads one response; also returns the
/// certificate the server presented.
pub fn https_h1(port: u16, ca_pem: &str, request: &[u8]) -> (Reply, Vec<u8>) {
    let mut tls = https_connect(port, ca_pem, Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("https :{port}: {e}"));
    tls.write_all(request).unwrap();
    tls.flush().unwrap();
    let certificate = presented(&tls).unwrap_or_default();
    let reply = read_response(&mut BufReader::new(tls), format!("https/1.1 :{port}"));
    (reply, certificate)
}

/// The certificate a TLS handshake with the listener on `port` is served now.
pub fn served_certificate(port: u16, ca_pem: &str) -> Result<Vec<u8>, String> {
    let tls = https_connect(port, ca_pem, Duration::from_secs(10))?;
    presented(&tls).ok_or_else(|| "no certificate".to_string())
}

/// The status of `GET path` over HTTPS, `None` while nothing answers (a readiness probe).
pub fn https_status(port: u16, ca_pem: &str, path: &str) -> Option<u16> {
    use std::io::Read;
    let mut tls = https_connect(port, ca_pem, Duration::from_secs(2)).ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).ok()?;
    let mut head = [0u8; 12];
    tls.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// One request for [`h2_calls`].
#[derive(Clone)]
pub struct H2Request {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl H2Request {
    pub fn post(path: &str, headers: &[(&str, &str)], body: &[u8]) -> Self {
        Self {
            path: path.to_string(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: body.to_vec(),
        }
    }
}

/// A chat call to [`AGENT`] with `key`, as an HTTP/2 request.
pub fn h2_chat(key: &str, message: &str) -> H2Request {
    let auth = format!("Bearer {key}");
    let body = serde_json::json!({ "message": message }).to_string();
    H2Request::post(
        &super::chat_path(super::AGENT),
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        body.as_bytes(),
    )
}

/// How [`h2_calls`] reaches the gateway.
pub enum H2Over<'a> {
    /// HTTPS with ALPN `h2`, trusting this CA.
    Tls(&'a str),
    /// Cleartext, prior knowledge (h2c).
    Cleartext,
}

/// Sends every request as a concurrent stream of one HTTP/2 connection; replies in order.
pub fn h2_calls(port: u16, over: H2Over<'_>, requests: &[H2Request]) -> Vec<Reply> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        match over {
            H2Over::Tls(ca_pem) => {
                let connector = tokio_rustls::TlsConnector::from(client_config(ca_pem, &[b"h2"]));
                let name = ServerName::try_from("localhost").unwrap();
                let tls = connector.connect(name, tcp).await.unwrap();
                let alpn = tls.get_ref().1.alpn_protocol().map(|p| p.to_vec());
                assert_eq!(alpn.as_deref(), Some(&b"h2"[..]), "ALPN chose h2");
                h2_streams(tls, port, requests).await
            }
            H2Over::Cleartext => h2_streams(tcp, port, requests).await,
        }
    })
}

/// One cleartext HTTP/2 connection kept open between calls, so a test can leave it idle.
pub struct H2Session {
    runtime: tokio::runtime::Runtime,
    client: h2::client::SendRequest<Bytes>,
    port: u16,
}

impl H2Session {
    pub fn cleartext(port: u16) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let client = runtime.block_on(async {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            let (client, connection) = h2::client::handshake(tcp).await.unwrap();
            tokio::spawn(async move {
                let _ = connection.await;
            });
            client
        });
        Self {
            runtime,
            client,
            port,
        }
    }

    /// Sends one request as a new stream of this connection and does not wait for the
    /// answer (dropping the session then hangs up on it).
    pub fn start(&self, request: &H2Request) {
        let client = self.client.clone();
        let (port, request) = (self.port, request.clone());
        self.runtime.spawn(async move {
            let _ = one_stream(client, port, request).await;
        });
    }

    /// Sends one request as a new stream of this connection.
    pub fn call(&self, request: &H2Request) -> Reply {
        let client = self.client.clone();
        self.runtime
            .block_on(one_stream(client, self.port, request.clone()))
    }

    /// Sends one request as a new stream of this connection and hands each piece of the
    /// answer's body to `on_data` the moment it arrives; returns the status.
    pub fn stream(&self, request: &H2Request, on_data: impl FnMut(&[u8])) -> u16 {
        let client = self.client.clone();
        let answer = answer_body(client, self.port, request.clone(), on_data);
        self.runtime.block_on(answer).1
    }
}

async fn one_stream(
    client: h2::client::SendRequest<Bytes>,
    port: u16,
    request: H2Request,
) -> Reply {
    let mut bytes = Vec::new();
    let (what, status, headers) = answer_body(client, port, request, |chunk| {
        bytes.extend_from_slice(chunk)
    })
    .await;
    Reply {
        what,
        status,
        headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

/// Sends `request` as a stream of `client`'s connection and hands the answer's body to
/// `on_data` piece by piece as it arrives; returns what was asked, the status and headers.
async fn answer_body(
    mut client: h2::client::SendRequest<Bytes>,
    port: u16,
    request: H2Request,
    mut on_data: impl FnMut(&[u8]),
) -> (String, u16, Vec<(String, String)>) {
    let what = format!("h2 POST {} :{port}", request.path);
    let mut builder = http::Request::builder()
        .method("POST")
        .uri(format!("https://localhost:{port}{}", request.path));
    for (k, v) in &request.headers {
        builder = builder.header(k, v);
    }
    client = client
        .ready()
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let (answer, mut send) = client
        .send_request(builder.body(()).unwrap(), request.body.is_empty())
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    if !request.body.is_empty() {
        send.send_data(Bytes::from(request.body.clone()), true)
            .unwrap();
    }
    let answer = answer.await.unwrap_or_else(|e| panic!("{what}: {e}"));
    let status = answer.status().as_u16();
    let headers = answer
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let mut body = answer.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        on_data(&chunk);
    }
    (what, status, headers)
}

async fn h2_streams<IO>(io: IO, port: u16, requests: &[H2Request]) -> Vec<Reply>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (client, connection) = h2::client::handshake(io).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let calls = requests
        .iter()
        .map(|request| one_stream(client.clone(), port, request.clone()));
    futures_util::future::join_all(calls).await
}

/// A ClientHello offering only `version` (0x0301 TLS 1.0, 0x0302 TLS 1.1, 0x0303 TLS 1.2),
/// with the ECDHE suites, groups and signature algorithms a server needs to answer it, so
/// that the version is the only reason to refuse it.
pub fn client_hello(version: u16) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&version.to_be_bytes());
    body.extend_from_slice(&[7u8; 32]); // random
    body.push(0); // no session id
    let suites: [u16; 5] = [0xc02b, 0xc02f, 0xc009, 0xc013, 0x002f];
    body.extend_from_slice(&((suites.len() * 2) as u16).to_be_bytes());
    for suite in suites {
        body.extend_from_slice(&suite.to_be_bytes());
    }
    body.extend_from_slice(&[1, 0]); // compression: null
    let mut extensions = Vec::new();
    let mut extension = |kind: u16, data: &[u8]| {
        extensions.extend_from_slice(&kind.to_be_bytes());
        extensions.extend_from_slice(&(data.len() as u16).to_be_bytes());
        extensions.extend_from_slice(data);
    };
    extension(0x000a, &[0, 4, 0x00, 0x1d, 0x00, 0x17]); // groups: x25519, secp256r1
    extension(0x000b, &[1, 0]); // point formats: uncompressed
    extension(0x000d, &[0, 6, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01]); // signature algorithms
    body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
    body.extend_from_slice(&extensions);
    let mut handshake = vec![1u8]; // client_hello
    handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

/// Sends a raw ClientHello and returns the first record's content type (22 handshake: a
/// ServerHello; 21 alert) and, for an alert, its description; `None` if the server closed.
pub fn first_record(port: u16, hello: &[u8]) -> Option<(u8, Option<u8>)> {
    use std::io::Read;
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(hello).unwrap();
    let mut head = [0u8; 5];
    tcp.read_exact(&mut head).ok()?;
    let mut first = [0u8; 2];
    let description = match head[0] {
        21 => tcp.read_exact(&mut first).ok().map(|_| first[1]),
        _ => None,
    };
    Some((head[0], description))
}
