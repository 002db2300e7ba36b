//! What a worker receives: the client's request head rewritten for it.

use pingora::http::RequestHeader;
use std::net::IpAddr;

use turnpike_core::trace::TraceParent;

use crate::config::PoolConfig;
use crate::headers::{
    connection_options, IDEMPOTENCY_KEY, TRACEPARENT, TRACESTATE, X_ACCOUNT_ID, X_AGENT_ID,
    X_FORWARDED_FOR, X_KEY_ID, X_REQUEST_ID, X_SESSION_ID,
};

/// Client headers a worker never sees: credentials, identities the gateway asserts itself,
/// and hop-by-hop headers that belong to the client's connection.
const DROPPED_HEADERS: [&str; 18] = [
    "accept-encoding",
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

/// Whether a client header is kept from the worker. A name with `_` counts as the one it
/// folds to (`X_Account_Id` is `x-account-id` to a CGI or WSGI worker), so no spelling of
/// an identity header gets past.
fn is_dropped(name: &str) -> bool {
    if DROPPED_HEADERS.contains(&name) {
        return true;
    }
    if !name.contains('_') {
        return false;
    }
    let folded = name.replace('_', "-");
    DROPPED_HEADERS.contains(&folded.as_str()) || folded == X_FORWARDED_FOR.as_str()
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
    pub client_ip: Option<IpAddr>,
    /// The client's valid `traceparent` (sent on unchanged), or a new trace.
    pub trace: &'a TraceParent,
}

/// The request head a worker receives: the rewritten path, the client's other headers, the
/// gateway's identity headers, `X-Forwarded-For` with the client's address appended, the
/// pool's configured headers, and the length of the body it will be sent. Fails only on a
/// header value no HTTP head can carry.
pub fn outgoing_head(
    client: &RequestHeader,
    who: &Identity,
    body_len: usize,
    pool: &PoolConfig,
) -> pingora::Result<RequestHeader> {
    let path = pool.path.render(who.agent_id);
    let mut header = RequestHeader::build_no_case(
        http::Method::POST,
        path.as_bytes(),
        Some(client.headers.len() + 8),
    )?;
    let connection_options = connection_options(&client.headers);
    for (name, value) in &client.headers {
        let name_str = name.as_str();
        if !is_dropped(name_str)
            && name != http::header::CONTENT_LENGTH
            && !connection_options.iter().any(|o| o == name_str)
        {
            header.append_header(name.clone(), value.clone())?;
        }
    }
    // An HTTP/2 client names the host in `:authority`, not `Host`; a worker gets `Host`
    // either way (and an HTTP/2 worker's `:authority` is made from it).
    if !client.headers.contains_key(http::header::HOST) {
        if let Some(authority) = client.uri.authority() {
            header.insert_header(http::header::HOST, authority.as_str())?;
        }
    }
    if let Some(ip) = who.client_ip {
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
    header.insert_header(X_REQUEST_ID, who.request_id)?;
    header.insert_header(IDEMPOTENCY_KEY, who.call_id)?;
    header.insert_header(X_AGENT_ID, who.agent_id)?;
    header.insert_header(X_SESSION_ID, who.session_id)?;
    header.insert_header(X_KEY_ID, who.key_id)?;
    header.insert_header(X_ACCOUNT_ID, who.account)?;
    header.insert_header(TRACEPARENT, who.trace.as_str())?;
    // `tracestate` belongs to the client's trace: kept with it, dropped with a new one.
    if !who.trace.is_from_client() {
        header.remove_header(&TRACESTATE);
    }
    header.insert_header(
        http::header::CONTENT_LENGTH,
        http::HeaderValue::from(body_len),
    )?;
    for (name, value) in &pool.headers {
        header.insert_header(name.clone(), value.clone())?;
    }
    Ok(header)
}
