//! A streaming client: a chat call whose answer is read event by event as it arrives, each
//! event stamped with the moment it was read, over HTTP/1.1 (chunked) or HTTP/2 (h2c).

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::chat_path;
use super::raw::read_head;
use super::tls::{H2Request, H2Session};

/// One server-sent event as the client read it.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub at: Instant,
    pub name: Option<String>,
    pub data: String,
}

impl SseEvent {
    /// The data as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or(Value::Null)
    }
}

/// Cuts the text read so far into whole events (blank-line separated, LF or CRLF).
#[derive(Default)]
struct Events {
    text: String,
}

impl Events {
    fn next(&mut self, at: Instant) -> Option<SseEvent> {
        let normal = self.text.replace("\r\n", "\n");
        let end = normal.find("\n\n")?;
        let block = normal[..end].to_string();
        self.text = normal[end + 2..].to_string();
        let mut name = None;
        let mut data: Vec<&str> = Vec::new();
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                name = Some(v.trim_start().to_string());
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push(v.strip_prefix(' ').unwrap_or(v));
            }
        }
        Some(SseEvent {
            at,
            name,
            data: data.join("\n"),
        })
    }
}

/// A chat call over HTTP/1.1 whose answer is read as it streams.
pub struct StreamCall {
    reader: BufReader<TcpStream>,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub sent_at: Instant,
    chunked: bool,
    events: Events,
    /// True once the answer's last chunk was read.
    pub ended: bool,
}

impl StreamCall {
    /// Sends a chat call with `body` and reads the answer's head.
    pub fn open(port: u16, agent: &str, key: &str, body: &Value) -> StreamCall {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let body = body.to_string();
        let request = format!(
            "POST {} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            chat_path(agent),
            body.len()
        );
        let sent_at = Instant::now();
        (&stream).write_all(request.as_bytes()).unwrap();
        let mut reader = BufReader::new(stream);
        let (status, headers) = read_head(&mut reader, "a streamed chat call");
        let chunked = headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
        let mut call = StreamCall {
            reader,
            status,
            headers,
            sent_at,
            chunked,
            events: Events::default(),
            ended: false,
        };
        if !chunked {
            // A JSON answer or an error: read whole.
            let length = call
                .header("content-length")
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            let mut body = vec![0; length];
            call.reader.read_exact(&mut body).unwrap();
            call.events.text = String::from_utf8_lossy(&body).into_owned();
            call.ended = true;
        }
        call
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The next whole event; `None` once the answer has ended (or the connection broke).
    pub fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(event) = self.events.next(Instant::now()) {
                return Some(event);
            }
            if self.ended || !self.chunked {
                return None;
            }
            let mut size_line = String::new();
            if self.reader.read_line(&mut size_line).unwrap_or(0) == 0 {
                self.ended = true;
                return None;
            }
            let Ok(size) = usize::from_str_radix(size_line.trim(), 16) else {
                self.ended = true;
                return None;
            };
            if size == 0 {
                let mut last = String::new();
                let _ = self.reader.read_line(&mut last);
                self.ended = true;
                continue;
            }
            let mut chunk = vec![0; size + 2];
            if self.reader.read_exact(&mut chunk).is_err() {
                self.ended = true;
                return None;
            }
            chunk.truncate(size);
            self.events.text.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// Every event until the answer ends.
    pub fn all(mut self) -> (Vec<SseEvent>, bool) {
        let mut events = Vec::new();
        while let Some(event) = self.next_event() {
            events.push(event);
        }
        (events, self.ended)
    }
}

/// A chat call over cleartext HTTP/2 (prior knowledge): the status, and every event with
/// the moment its bytes arrived.
pub fn h2_stream(port: u16, agent: &str, key: &str, body: &Value) -> (u16, Vec<SseEvent>) {
    let auth = format!("Bearer {key}");
    let request = H2Request::post(
        &chat_path(agent),
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        body.to_string().as_bytes(),
    );
    let mut events = Events::default();
    let mut out = Vec::new();
    let status = H2Session::cleartext(port).stream(&request, |chunk| {
        events.text.push_str(&String::from_utf8_lossy(chunk));
        while let Some(event) = events.next(Instant::now()) {
            out.push(event);
        }
    });
    (status, out)
}
