//! A mock agent worker: HTTP/1.1 with keep-alive on a loopback port, a thread per connection.
//!
//! What it answers is steered by a typed [`Script`] in the request's `message` (see
//! `script.rs`); any other message gets the default answer
//! `{"response": "<name>: <message>", "session_id": ..., "usage": 45 / 32}`. It records every
//! request it received.

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::script::{BadUsage, Ending, Script, StreamScript};

/// One request as the worker received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// Lowercase names, in arrival order, repeats kept.
    pub headers: Vec<(String, String)>,
    /// The body parsed as JSON (`{"_raw": ...}` when it was not JSON).
    pub body: Value,
    pub raw_body: String,
}

impl Seen {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.header_values(name).first().copied()
    }

    /// Every value of header `name`.
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .filter(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

#[derive(Default)]
struct Shared {
    seen: Mutex<Vec<Seen>>,
    /// Requests the worker has finished with (answered, dropped or failed to answer).
    finished: AtomicUsize,
    stopping: AtomicBool,
    conns: Mutex<Vec<TcpStream>>,
    /// When the gateway closed a connection while the worker was still thinking over a call.
    hung_up: Mutex<Vec<Instant>>,
    /// Calls the worker is thinking over now, and the most it ever was at once.
    thinking: AtomicUsize,
    most_thinking: AtomicUsize,
    /// Scripts the worker could not follow: each fails the test.
    script_errors: Mutex<Vec<String>>,
}

pub struct Worker {
    name: String,
    port: u16,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts a worker named `name` on a free loopback port.
    pub fn start(name: &str) -> Worker {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind worker");
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared::default());
        let acceptor = {
            let shared = shared.clone();
            let name = name.to_string();
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if shared.stopping.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(stream) = stream else { continue };
                    if let Ok(clone) = stream.try_clone() {
                        shared.conns.lock().unwrap().push(clone);
                    }
                    let shared = shared.clone();
                    let name = name.clone();
                    std::thread::spawn(move || serve_connection(stream, &name, &shared));
                }
            })
        };
        Worker {
            name: name.to_string(),
            port,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// Several workers named `w0`, `w1`, ...
    pub fn start_many(n: usize) -> Vec<Worker> {
        (0..n).map(|i| Worker::start(&format!("w{i}"))).collect()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `127.0.0.1:port`, as an upstream endpoint.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Every request received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }

    /// The last request received; panics if there was none.
    pub fn last(&self) -> Seen {
        self.seen()
            .pop()
            .unwrap_or_else(|| panic!("worker {} received nothing", self.name))
    }

    /// How many requests arrived.
    pub fn count(&self) -> usize {
        self.shared.seen.lock().unwrap().len()
    }

    /// When the gateway closed a connection while the worker was thinking over its call.
    pub fn hang_ups(&self) -> Vec<Instant> {
        self.shared.hung_up.lock().unwrap().clone()
    }

    /// The most calls the worker was ever thinking over at once (a script's `sleep`): a
    /// lower bound on the most the gateways let through at once, since a call's slot is
    /// free again only once its answer, written after the thinking, has reached them.
    pub fn most_at_once(&self) -> usize {
        self.shared.most_thinking.load(Ordering::SeqCst)
    }

    /// How many requests the worker has finished with (answered or dropped).
    pub fn finished(&self) -> usize {
        self.shared.finished.load(Ordering::SeqCst)
    }

    /// Stops accepting and drops every open connection.
    pub fn stop(&mut self) {
        if self.shared.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        let _ = TcpStream::connect(("127.0.0.1", self.port)); // wakes the accept loop
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        for c in self.shared.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
        let errors = self.shared.script_errors.lock().unwrap().clone();
        if !errors.is_empty() && !std::thread::panicking() {
            panic!(
                "worker {} was sent scripts it cannot follow: {errors:?}",
                self.name
            );
        }
    }
}

struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn read_request(r: &mut impl BufRead) -> Option<Request> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end_matches(['\r', '\n']);
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.to_ascii_lowercase())
    };
    let body = if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        super::raw::read_chunked(r)
    } else {
        let len: usize = get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        r.read_exact(&mut body).ok()?;
        body
    };
    Some(Request {
        method,
        path,
        headers,
        body,
    })
}

fn serve_connection(stream: TcpStream, name: &str, shared: &Shared) {
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut out = stream;
    while let Some(req) = read_request(&mut reader) {
        let raw_body = String::from_utf8_lossy(&req.body).into_owned();
        let body: Value =
            serde_json::from_slice(&req.body).unwrap_or_else(|_| json!({"_raw": raw_body}));
        let closes = req
            .headers
            .iter()
            .any(|(k, v)| k == "connection" && v.eq_ignore_ascii_case("close"));
        shared.seen.lock().unwrap().push(Seen {
            method: req.method,
            path: req.path,
            headers: req.headers,
            body: body.clone(),
            raw_body,
        });
        let keep_going = answer(&mut out, name, &body, shared);
        shared.finished.fetch_add(1, Ordering::SeqCst);
        if !keep_going || closes {
            let _ = out.shutdown(Shutdown::Both);
            return;
        }
    }
}

/// Writes the answer the message's script asks for; false when the connection must end.
fn answer(out: &mut TcpStream, name: &str, body: &Value, shared: &Shared) -> bool {
    let message = match &body["message"] {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    let script = match Script::parse(&message) {
        Ok(script) => script.unwrap_or_default(),
        Err(problem) => {
            // The test wrote a script the worker cannot follow: fail it, loudly.
            shared.script_errors.lock().unwrap().push(problem.clone());
            return write_answer(out, 500, &json!({ "script_error": problem }), "");
        }
    };
    match script.ending {
        Some(Ending::Close) => return false,
        Some(Ending::Garbage) => {
            let _ = out.write_all(b"\x00\x01 not http at all\r\n\r\n");
            let _ = out.flush();
            return false;
        }
        None => {}
    }
    let mut sleep_s = script.sleep.unwrap_or(0.0);
    if script.hold {
        sleep_s = sleep_s.max(0.3);
    }
    if sleep_s > 0.0 && !think(out, Duration::from_secs_f64(sleep_s), shared) {
        return false;
    }
    let (input, output) = script.usage.unwrap_or((45, 32));
    if let Some(stream) = script.stream {
        return write_stream(out, name, body, &script, stream, shared);
    }
    let mut resp = json!({
        "response": format!("{name}: {message}"),
        "usage": {"input_tokens": input, "output_tokens": output, "total_tokens": input + output},
    });
    match script.bad_usage {
        Some(BadUsage::Negative) => {
            resp["usage"] = json!({"input_tokens": -5, "output_tokens": 3, "total_tokens": -2})
        }
        Some(BadUsage::Strings) => {
            resp["usage"] =
                json!({"input_tokens": "12", "output_tokens": "3", "total_tokens": "15"})
        }
        Some(BadUsage::Absurd) => {
            resp["usage"] = json!({"input_tokens": 200_000_000, "output_tokens": 3, "total_tokens": 200_000_003})
        }
        Some(BadUsage::Inconsistent) => {
            resp["usage"] = json!({"input_tokens": 10, "output_tokens": 3, "total_tokens": 14})
        }
        Some(BadUsage::Missing) => {
            resp.as_object_mut().unwrap().remove("usage");
        }
        None => {}
    }
    if let Some(bytes) = script.padding {
        resp["padding"] = Value::String("x".repeat(bytes));
    }
    if !script.no_session {
        resp["session_id"] = match &body["session_id"] {
            Value::String(s) if !s.is_empty() => Value::String(s.clone()),
            _ => Value::String("sess_worker_made".into()),
        };
    }
    let extra = if script.hop_header {
        "Connection: X-Worker-Hop\r\nX-Worker-Hop: secret\r\nX-Worker-Kept: yes\r\nServer: mock-worker/1.0\r\n"
    } else {
        ""
    };
    write_answer(out, script.status.unwrap_or(200), &resp, extra)
}

/// Streams the answer `script` asks for as chunked `text/event-stream`, an event per chunk,
/// each flushed; records a hang-up when the gateway closes the connection mid-stream.
/// False when the connection must end.
fn write_stream(
    out: &mut TcpStream,
    name: &str,
    body: &Value,
    script: &Script,
    stream: StreamScript,
    shared: &Shared,
) -> bool {
    let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n";
    if out.write_all(head.as_bytes()).is_err() {
        return false;
    }
    let (input, output) = script.usage.unwrap_or((45, 32));
    let session = match &body["session_id"] {
        Value::String(s) if !s.is_empty() => s.clone(),
        _ => "sess_worker_made".into(),
    };
    let send = |out: &mut TcpStream, data: &str| -> bool {
        let event = format!("data: {data}\n\n");
        let chunk = format!("{:x}\r\n{event}\r\n", event.len());
        let ok = out.write_all(chunk.as_bytes()).is_ok() && out.flush().is_ok();
        if !ok {
            shared.hung_up.lock().unwrap().push(Instant::now());
        }
        ok
    };
    for i in 0..stream.events {
        if i > 0 && !think(out, Duration::from_millis(stream.gap_ms), shared) {
            return false;
        }
        let mut delta = json!({"delta": format!("{name}-{i} ")});
        if i == 0 && !script.no_session {
            delta["session_id"] = Value::String(session.clone());
        }
        if let (0, Some(bytes)) = (i, script.padding) {
            delta["padding"] = Value::String("x".repeat(bytes));
        }
        if stream.running_usage {
            let so_far = output * (i as i64 + 1) / stream.events as i64;
            delta["usage"] = json!({"input_tokens": input, "output_tokens": so_far, "total_tokens": input + so_far});
        }
        if !send(out, &delta.to_string()) {
            return false;
        }
    }
    if stream.stall {
        // Holds the connection until the gateway gives up on it.
        think(out, Duration::from_secs(120), shared);
        return false;
    }
    let usage = match script.bad_usage {
        Some(BadUsage::Missing) => None,
        Some(BadUsage::Negative) => Some(json!({"input_tokens": -5, "output_tokens": 3})),
        Some(_) => Some(json!({"input_tokens": 10, "output_tokens": 3, "total_tokens": 14})),
        None => Some(
            json!({"input_tokens": input, "output_tokens": output, "total_tokens": input + output}),
        ),
    };
    if let Some(usage) = usage {
        if !send(out, &json!({ "usage": usage }).to_string()) {
            return false;
        }
    }
    if !send(out, "[DONE]") {
        return false;
    }
    if stream.linger {
        think(out, Duration::from_secs(120), shared);
        return false;
    }
    out.write_all(b"0\r\n\r\n").is_ok() && out.flush().is_ok()
}

/// Thinks for `time` while watching the connection, as an agent that stops working when its
/// caller hangs up; false (and the moment recorded) when the gateway closed it meanwhile.
fn think(out: &TcpStream, time: Duration, shared: &Shared) -> bool {
    let now = shared.thinking.fetch_add(1, Ordering::SeqCst) + 1;
    shared.most_thinking.fetch_max(now, Ordering::SeqCst);
    let done = thought(out, time, shared);
    shared.thinking.fetch_sub(1, Ordering::SeqCst);
    done
}

fn thought(out: &TcpStream, time: Duration, shared: &Shared) -> bool {
    let until = Instant::now() + time;
    let mut probe = [0u8; 1];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let _ = out.set_read_timeout(None);
            return true;
        }
        let _ = out.set_read_timeout(Some(left.min(Duration::from_millis(50))));
        match out.peek(&mut probe) {
            Ok(0) | Err(_) if closed(out) => {
                shared.hung_up.lock().unwrap().push(Instant::now());
                return false;
            }
            // Bytes of a next request, or the wait timed out: keep thinking.
            _ => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// Whether the peer has closed the connection (a peek reads end of stream or a reset).
fn closed(out: &TcpStream) -> bool {
    let _ = out.set_nonblocking(true);
    let mut probe = [0u8; 1];
    let gone = match out.peek(&mut probe) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    let _ = out.set_nonblocking(false);
    gone
}

/// Writes one JSON answer; false when the connection broke.
/// `extra`: more header lines, each ending in CRLF.
fn write_answer(out: &mut TcpStream, status: u16, body: &Value, extra: &str) -> bool {
    let data = serde_json::to_vec(body).unwrap();
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}\r\n",
        reason(status),
        data.len()
    );
    let ok = out.write_all(head.as_bytes()).is_ok() && out.write_all(&data).is_ok();
    let _ = out.flush();
    ok
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

#[test]
fn the_mock_worker_answers_as_its_message_says() {
    let w = Worker::start("w7");
    let port: u16 = w.addr().rsplit(':').next().unwrap().parse().unwrap();
    let ask = |body: &str| {
        super::raw::send(
            port,
            &super::raw::request(
                "POST",
                "/x",
                &[("Content-Type", "application/json")],
                body.as_bytes(),
            ),
        )
    };
    let message = |script: Script| json!({"message": script.to_string()}).to_string();
    let r =
        ask(&json!({"message": Script::usage(3, 4).to_string(), "session_id": "s1"}).to_string());
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        json!({"response": format!("w7: {}", Script::usage(3, 4)), "session_id": "s1",
               "usage": {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7}})
    );
    let r = ask(&message(Script {
        status: Some(503),
        no_session: true,
        ..Script::default()
    }));
    assert_eq!(r.status, 503);
    assert!(r.json().get("session_id").is_none());
    let r = ask(&message(Script::bad_usage(BadUsage::Missing)));
    assert!(r.json().get("usage").is_none());
    assert_eq!(r.json()["session_id"], "sess_worker_made");
    let r = ask(r#"{"message": "hi"}"#);
    assert_eq!(r.json()["response"], "w7: hi");
    assert_eq!(w.count(), 4);
    assert_eq!(w.last().path, "/x");
    assert_eq!(w.last().header("content-type"), Some("application/json"));
}

#[test]
#[should_panic(expected = "scripts it cannot follow")]
fn a_script_the_worker_cannot_follow_fails_the_test() {
    let w = Worker::start("w8");
    let port: u16 = w.addr().rsplit(':').next().unwrap().parse().unwrap();
    let r = super::raw::send(
        port,
        &super::raw::request(
            "POST",
            "/x",
            &[("Content-Type", "application/json")],
            br#"{"message": "worker: sleeep 1"}"#,
        ),
    );
    assert_eq!(r.status, 500, "the worker says what it could not follow");
    assert!(r.body.contains("sleeep"), "{}", r.body);
    drop(w);
}
