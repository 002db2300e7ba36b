//! HTTP/1.1 written by hand over a `TcpStream`, for requests a client library would tidy up
//! (`..`, `%2f`, `//`, oversized heads) and for clients that hang up early.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use super::Reply;

/// Sends `request` as is to `127.0.0.1:port` and reads one response.
pub fn send(port: u16, request: &[u8]) -> Reply {
    let what = describe(request);
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("{what}: connect to {port}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    // The server may answer (413, 431) and close before it has read everything: keep going.
    let _ = stream.write_all(request);
    let _ = stream.flush();
    read_response(&mut BufReader::new(stream), what)
}

/// A request line, head and body as bytes; adds Host, Content-Length and `Connection: close`.
pub fn request(method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" || method == "PUT" || method == "PATCH" {
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    out.push_str("Connection: close\r\n\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// A chat call to `agent` with `key` and `body`, closing the connection after it.
pub fn chat_request(agent: &str, key: &str, body: &[u8]) -> Vec<u8> {
    let auth = format!("Bearer {key}");
    request(
        "POST",
        &super::chat_path(agent),
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        body,
    )
}

fn describe(request: &[u8]) -> String {
    let line_end = request
        .windows(2)
        .position(|w| w == b"\r\n")
        .unwrap_or(request.len().min(120));
    format!(
        "raw {}",
        String::from_utf8_lossy(&request[..line_end.min(200)])
    )
}

/// Reads one response: head, then a Content-Length, chunked or read-to-close body.
pub fn read_response(r: &mut impl BufRead, what: String) -> Reply {
    let (status, headers) = read_head(r, &what);
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    if get("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        body = read_chunked(r);
    } else if let Some(len) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.resize(len, 0);
        let mut got = 0;
        while got < len {
            match r.read(&mut body[got..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        body.truncate(got);
    } else if status >= 200 && status != 204 && status != 304 {
        let _ = r.read_to_end(&mut body);
    }
    Reply {
        what,
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// Reads a response head: its status and its headers (lowercase names, in order).
pub fn read_head(r: &mut impl BufRead, what: &str) -> (u16, Vec<(String, String)>) {
    let mut status_line = String::new();
    match r.read_line(&mut status_line) {
        Ok(0) => panic!("{what}: connection closed before any response"),
        Ok(_) => {}
        Err(e) => panic!("{what}: reading the status line: {e}"),
    }
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{what}: bad status line {status_line:?}"));
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    (status, headers)
}

/// A chunked body; stops quietly on a truncated stream.
pub fn read_chunked(r: &mut impl BufRead) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let mut size_line = String::new();
        if r.read_line(&mut size_line).unwrap_or(0) == 0 {
            return body;
        }
        let size_hex = size_line.trim().split(';').next().unwrap_or("");
        let Ok(size) = usize::from_str_radix(size_hex, 16) else {
            return body;
        };
        if size == 0 {
            // trailers until the empty line
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                    return body;
                }
            }
        }
        let start = body.len();
        body.resize(start + size, 0);
        if r.read_exact(&mut body[start..]).is_err() {
            return body;
        }
        let mut crlf = [0u8; 2];
        let _ = r.read_exact(&mut crlf);
    }
}
