//! What a worker receives: the client's request head rewritten for it.

use pingora::http::RequestHeader;
use std::net::IpAddr;

use turnpike_core::trace::TraceParent;

use crate::config::PoolConfig;
use crate::headers::{
    connection_options, IDEMPOTENCY_KEY, TRACEPARENT, TRACESTATE, X_ACCOUNT_ID, X_AGENT_ID,
    X_FORWARDED_FOR, X_FORWARDED_PROTO, X_KEY_ID, X_REQUEST_ID, X_SESSION_ID,
};

/// Client headers a worker never sees: credentials, identities the gateway asserts itself,
/// and hop-by-hop headers that belong to the client's connection.
const DROPPED_HEADERS: [&str; 19] = [
    "accept-encoding",
    "content-length",
    "traceparent",
    "authorization",
    "idempotency-key",
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

/// The most header slots reserved up front (as Pingora bounds its own hint): an HTTP/2 head
/// may carry tens of thousands of tiny headers, and `HeaderMap::with_capacity` panics above
/// 24,576.
const MAX_HINT: usize = 4096;

/// What a proxy in front says about the client. Believed only from a trusted proxy (as
/// Envoy's `xff_num_trusted_hops` and nginx's `set_real_ip_from` do); from anyone else they
/// are dropped and the gateway sends its own `X-Forwarded-For` and `X-Forwarded-Proto`.
const FORWARDING_HEADERS: [&str; 5] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
];

/// Whether a client header is kept from the worker. Names are compared with `_` read as
/// `-` (`X_Account_Id` is `x-account-id` to a CGI or WSGI worker), so no spelling of an
/// identity header, a forwarding header or one the pool sets itself gets past; only a
/// trusted proxy's forwarding headers, spelled exactly, are kept.
fn is_dropped(name: &str, pool: &PoolConfig, from_trusted_proxy: bool) -> bool {
    if from_trusted_proxy && FORWARDING_HEADERS.contains(&name) {
        return false;
    }
    DROPPED_HEADERS
        .iter()
        .chain(&FORWARDING_HEADERS)
        .any(|dropped| same_folded(name, dropped))
        || pool
            .headers
            .iter()
            .any(|(set, _)| same_folded(name, set.as_str()))
}

/// Whether two lowercase header names are the same once `_` is read as `-`.
fn same_folded(a: &str, b: &str) -> bool {
    let fold = |c: u8| if c == b'_' { b'-' } else { c };
    a.len() == b.len() && a.bytes().zip(b.bytes()).all(|(x, y)| fold(x) == fold(y))
}

/// The client's connection as the worker is told of it.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    /// The address the connection came from.
    pub ip: Option<IpAddr>,
    /// Whether that address is one of `trusted_proxies`.
    pub trusted: bool,
    /// The listener's scheme: `http` or `https`.
    pub scheme: &'static str,
}

/// Who the gateway says is calling, for the worker's identity headers.
pub struct Identity<'a> {
    pub request_id: &'a str,
    /// Sent as `Idempotency-Key`: a worker that sees it twice is seeing one call twice.
    pub call_id: &'a str,
    pub agent_id: &'a str,
    pub session_id: &'a str,
    pub key_id: &'a str,
    pub account: &'a str,
    pub peer: Peer,
    /// The client's valid `traceparent` (sent on unchanged), or a new trace.
    pub trace: &'a TraceParent,
}

/// The request head a worker receives: the rewritten path, the client's other headers, the
/// gateway's identity headers, the forwarding headers (the peer's address appended to a
/// trusted proxy's `X-Forwarded-For`, else alone), the pool's configured headers, and the
/// length of the body it will be sent. Fails only on a header value no HTTP head can carry.
pub fn outgoing_head(
    client: &RequestHeader,
    who: &Identity,
    body_len: usize,
    pool: &PoolConfig,
) -> pingora::Result<RequestHeader> {
    // Built as a plain header map, made the head at the end: Pingora's `insert_header`
    // turns each name into bytes and parses it back, every time.
    let mut headers = http::HeaderMap::with_capacity((client.headers.len() + 12).min(MAX_HINT));
    let connection_options = connection_options(&client.headers);
    let trusted = who.peer.trusted;
    let mut cookies = client.headers.get_all(http::header::COOKIE).iter();
    let split_cookie = cookies.next().is_some() && cookies.next().is_some();
    for (name, value) in &client.headers {
        let name_str = name.as_str();
        // X-Forwarded-For and split cookies are written whole below.
        let kept_back = is_dropped(name_str, pool, trusted)
            || name == X_FORWARDED_FOR
            || (split_cookie && name == http::header::COOKIE)
            || connection_options.iter().any(|o| o == name_str);
        if !kept_back {
            headers.append(name.clone(), value.clone());
        }
    }
    // HTTP/2 may split `cookie` into crumbs; an HTTP/1.1 worker gets them as one header
    // (RFC 9113 §8.2.3).
    if split_cookie {
        let cookie = joined(client.headers.get_all(http::header::COOKIE), b"; ", &[])?;
        headers.insert(http::header::COOKIE, cookie);
    }
    // An HTTP/2 client names the host in `:authority`, not `Host`; a worker gets `Host`
    // either way (and an HTTP/2 worker's `:authority` is made from it).
    if !client.headers.contains_key(http::header::HOST) {
        if let Some(authority) = client.uri.authority() {
            set(&mut headers, http::header::HOST, authority.as_str())?;
        }
    }
    forwarding_headers(&mut headers, client, who.peer)?;
    // The answer's usage must be readable: no compression between gateway and worker.
    headers.insert(
        http::header::ACCEPT_ENCODING,
        http::HeaderValue::from_static("identity"),
    );
    set(&mut headers, X_REQUEST_ID, who.request_id)?;
    set(&mut headers, IDEMPOTENCY_KEY, who.call_id)?;
    set(&mut headers, X_AGENT_ID, who.agent_id)?;
    set(&mut headers, X_SESSION_ID, who.session_id)?;
    set(&mut headers, X_KEY_ID, who.key_id)?;
    set(&mut headers, X_ACCOUNT_ID, who.account)?;
    set(&mut headers, TRACEPARENT, who.trace.as_str())?;
    // `tracestate` belongs to the client's trace: kept with it, dropped with a new one.
    if !who.trace.is_from_client() {
        headers.remove(&TRACESTATE);
    }
    headers.insert(
        http::header::CONTENT_LENGTH,
        http::HeaderValue::from(body_len),
    );
    for (name, value) in &pool.headers {
        headers.insert(name.clone(), value.clone());
    }
    let path = pool.path.render(who.agent_id);
    let head = RequestHeader::build_no_case(http::Method::POST, path.as_bytes(), Some(0))?;
    // A head without case is its parts: the target stays the origin-form path set above.
    let mut parts = http::request::Parts::from(head);
    parts.headers = headers;
    Ok(RequestHeader::from(parts))
}

/// `X-Forwarded-For` and `X-Forwarded-Proto`: a trusted proxy's chain with the peer appended
/// and its scheme kept; anyone else's replaced by the peer's address and the listener's
/// scheme.
fn forwarding_headers(
    headers: &mut http::HeaderMap,
    client: &RequestHeader,
    peer: Peer,
) -> pingora::Result<()> {
    let earlier = client
        .headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter(|_| peer.trusted);
    let peer_ip = peer.ip.map(|ip| ip.to_string());
    let peer_part;
    let last: &[&[u8]] = match &peer_ip {
        Some(ip) => {
            peer_part = [ip.as_bytes()];
            &peer_part
        }
        None => &[],
    };
    let chain = joined(earlier, b", ", last)?;
    if !chain.is_empty() {
        headers.insert(X_FORWARDED_FOR, chain);
    }
    if !(peer.trusted && client.headers.contains_key(X_FORWARDED_PROTO)) {
        set(headers, X_FORWARDED_PROTO, peer.scheme)?;
    }
    Ok(())
}

/// Sets a header to a text value, checked as a header value.
fn set(headers: &mut http::HeaderMap, name: http::HeaderName, value: &str) -> pingora::Result<()> {
    let value = http::HeaderValue::from_str(value).map_err(|e| {
        pingora::Error::because(pingora::ErrorType::InvalidHTTPHeader, "a header value", e)
    })?;
    headers.insert(name, value);
    Ok(())
}

/// `values`, then `more`, joined by `separator`: bytes as they came, whatever they hold.
fn joined<'a>(
    values: impl IntoIterator<Item = &'a http::HeaderValue>,
    separator: &[u8],
    more: &[&[u8]],
) -> pingora::Result<http::HeaderValue> {
    let mut out = Vec::new();
    let parts = values
        .into_iter()
        .map(|v| v.as_bytes())
        .chain(more.iter().copied());
    for part in parts {
        if !out.is_empty() {
            out.extend_from_slice(separator);
        }
        out.extend_from_slice(part);
    }
    http::HeaderValue::from_bytes(&out).map_err(|e| {
        pingora::Error::because(pingora::ErrorType::InvalidHTTPHeader, "a joined header", e)
    })
}
