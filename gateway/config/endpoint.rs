//! An upstream endpoint as written: `127.0.0.1:9001`, `http://127.0.0.1:9001`, or
//! `https://worker.internal:8443`. A name is resolved once, when the config loads (as nginx
//! does without a `resolver`); an HTTPS endpoint keeps its name for SNI and the certificate.

use std::net::{SocketAddr, ToSocketAddrs};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// `Some(host)` for `https://host:port`.
    pub https_name: Option<String>,
}

/// Parses and resolves one endpoint; the error says what is wrong with it.
pub fn parse_endpoint(text: &str) -> Result<Endpoint, String> {
    let (https, rest) = if let Some(rest) = text.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = text.strip_prefix("http://") {
        (false, rest)
    } else if text.contains("://") {
        return Err(format!(
            "'{text}': only http:// and https:// endpoints are known"
        ));
    } else {
        (false, text)
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('/') {
        return Err(format!(
            "'{text}' has a path: an endpoint is host:port, and the path goes in `path:`"
        ));
    }
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| format!("'{text}' has no port (host:port, such as 127.0.0.1:9001)"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("'{text}': '{port}' is not a port"))?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err(format!("'{text}' has no host"));
    }
    let addr = match host.parse::<std::net::IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, port),
        Err(_) if !https && !text.starts_with("http://") => {
            return Err(format!("'{text}' is not an address such as 127.0.0.1:9001"))
        }
        Err(_) => {
            resolve(host, port).ok_or_else(|| format!("'{text}': '{host}' does not resolve"))?
        }
    };
    Ok(Endpoint {
        addr,
        https_name: https.then(|| host.to_owned()),
    })
}

/// The name's first address, IPv4 first (a worker bound to `localhost` usually listens there).
fn resolve(host: &str, port: u16) -> Option<SocketAddr> {
    let addrs: Vec<SocketAddr> = (host, port).to_socket_addrs().ok()?.collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_as_operators_write_them() {
        let ok = |text: &str| parse_endpoint(text).unwrap();
        assert_eq!(ok("127.0.0.1:9001").addr, "127.0.0.1:9001".parse().unwrap());
        assert_eq!(ok("127.0.0.1:9001").https_name, None);
        assert_eq!(ok("http://127.0.0.1:9001/").https_name, None);
        let https = ok("https://127.0.0.1:8443");
        assert_eq!(https.addr, "127.0.0.1:8443".parse().unwrap());
        assert_eq!(https.https_name.as_deref(), Some("127.0.0.1"));
        assert_eq!(ok("https://[::1]:8443").addr, "[::1]:8443".parse().unwrap());
        let named = ok("https://localhost:8443");
        assert_eq!(named.https_name.as_deref(), Some("localhost"));
        assert_eq!(named.addr.port(), 8443);
    }

    #[test]
    fn a_wrong_endpoint_says_what_is_wrong() {
        let err = |text: &str| parse_endpoint(text).unwrap_err();
        assert!(err("127.0.0.1").contains("no port"));
        assert!(err("https://w:8443/chat").contains("`path:`"));
        assert!(err("ftp://w:21").contains("only http://"));
        assert!(err("https://w:http").contains("not a port"));
        assert!(err("worker:9001").contains("not an address"));
        assert!(err("https://no-such-host.invalid:8443").contains("does not resolve"));
    }
}
