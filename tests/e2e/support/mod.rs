//! The black-box harness: the real `turnpike` binary on free loopback ports, mock agent
//! workers, plain HTTP. Everything here speaks only the public contract (SPEC.md).

// Shared by two test binaries, each of which uses a part.
#![allow(dead_code, unused_imports)]

pub mod builder;
pub mod client;
pub mod gateway;
pub mod prometheus;
pub mod raw;
pub mod redis;
pub mod script;
pub mod sse;
pub mod tls;
pub mod tls_worker;
pub mod worker;

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::Value;
use sha2::{Digest, Sha256};

pub use client::{Balance, Usage};
pub use gateway::TestGateway;
pub use script::{BadUsage, Script};
pub use worker::Worker;

/// The priced agent every test gateway serves.
pub const AGENT: &str = "ag_c47e7c97_b2f2";
/// The free agent every test gateway serves.
pub const OTHER_AGENT: &str = "ag_other_1";

/// The chat path of `agent`.
pub fn chat_path(agent: &str) -> String {
    format!("/v1/agents/{agent}/chat")
}

/// Lowercase hex SHA-256, the form the config stores keys and the admin token in.
pub fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// `n` random bytes as lowercase hex.
pub fn random_hex(n: usize) -> String {
    let bytes: Vec<u8> = (0..n).map(|_| rand::thread_rng().gen()).collect();
    hex::encode(bytes)
}

/// A fresh client key.
pub fn new_key() -> String {
    format!("ak_{}", random_hex(16))
}

/// A loopback port nothing listens on. Never hands the same port out twice in this process.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind 127.0.0.1:0")
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap();
        if given.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
}

/// Polls `cond` every 20 ms until it holds; panics with `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An HTTP answer, whichever client fetched it.
#[derive(Debug, Clone)]
pub struct Reply {
    /// What was asked, for failure messages.
    pub what: String,
    pub status: u16,
    /// Lowercase names, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Header `name` parsed as an integer; panics if absent or not a number.
    pub fn int_header(&self, name: &str) -> i64 {
        let v = self
            .header(name)
            .unwrap_or_else(|| panic!("{}: no {name} header in {:?}", self.what, self.headers));
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{}: {name} is not an integer: {v:?}", self.what))
    }

    /// The body as JSON; panics with the body if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!(
                "{}: body is not JSON ({e}); status {} body {:?}",
                self.what, self.status, self.body
            )
        })
    }

    /// Asserts the status, showing the body when it differs.
    #[track_caller]
    pub fn assert_status(&self, status: u16) -> &Self {
        assert_eq!(
            self.status, status,
            "{}: expected {status}, got {} with body {}",
            self.what, self.status, self.body
        );
        self
    }

    /// Asserts the contract's error shape (SPEC §1 Errors) and returns the `error` object.
    #[track_caller]
    pub fn error(&self, status: u16, code: &str) -> Value {
        self.error_in(status, &[code])
    }

    /// Like [`Reply::error`], for rows where the contract allows more than one code.
    #[track_caller]
    pub fn error_in(&self, status: u16, codes: &[&str]) -> Value {
        self.assert_status(status);
        let ct = self.header("content-type").unwrap_or("");
        assert!(
            ct.to_ascii_lowercase().starts_with("application/json"),
            "{}: error content-type is {ct:?}",
            self.what
        );
        let body = self.json();
        let e = body
            .get("error")
            .unwrap_or_else(|| panic!("{}: no `error` object in {}", self.what, self.body))
            .clone();
        assert_eq!(
            e["status"], status,
            "{}: error.status in {}",
            self.what, self.body
        );
        let code = e["code"].as_str().unwrap_or_default();
        assert!(
            codes.contains(&code),
            "{}: error.code {code:?}, expected one of {codes:?}; body {}",
            self.what,
            self.body
        );
        let message = e["message"].as_str().unwrap_or_default();
        assert!(
            !message.is_empty(),
            "{}: empty error.message in {}",
            self.what,
            self.body
        );
        let request_id = e["request_id"].as_str().unwrap_or_default();
        assert!(
            !request_id.is_empty(),
            "{}: empty error.request_id in {}",
            self.what,
            self.body
        );
        assert_eq!(
            self.header("x-request-id"),
            Some(request_id),
            "{}: X-Request-Id header differs from error.request_id",
            self.what
        );
        e
    }
}

/// The sum of the samples of metric `name` (exact sample name) whose labels include `labels`,
/// read from Prometheus text exposition.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut total = 0.0;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((sample, sample_labels, value)) = parse_sample(line) else {
            continue;
        };
        if sample != name {
            continue;
        }
        let all = labels
            .iter()
            .all(|(k, v)| sample_labels.iter().any(|(sk, sv)| sk == k && sv == v));
        if all {
            total += value;
        }
    }
    total
}

/// One sample: its name, its labels and its value.
type Sample = (String, Vec<(String, String)>, f64);

/// `name{a="b",c="d"} value [timestamp]`
fn parse_sample(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' ', '\t']).unwrap_or(line.len());
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if rest.starts_with('{') {
        let mut chars = rest[1..].char_indices();
        let mut key = String::new();
        let mut val = String::new();
        let mut in_val = false;
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            if in_val {
                match c {
                    '\\' => match chars.next() {
                        Some((_, 'n')) => val.push('\n'),
                        Some((_, o)) => val.push(o),
                        None => return None,
                    },
                    '"' => {
                        labels.push((key.trim().to_string(), std::mem::take(&mut val)));
                        key.clear();
                        in_val = false;
                    }
                    o => val.push(o),
                }
            } else {
                match c {
                    '}' => {
                        end = Some(i + 1);
                        break;
                    }
                    '=' => {
                        chars.next(); // the opening quote
                        in_val = true;
                    }
                    ',' | ' ' => {}
                    o => key.push(o),
                }
            }
        }
        rest = &rest[1 + end?..];
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some((name, labels, value))
}

#[test]
fn metric_parser_sums_matching_samples() {
    let text = "# HELP x y\n# TYPE t counter\n\
        t{agent=\"a\",kind=\"input\"} 3\n\
        t{agent=\"a\",kind=\"output\"} 4\n\
        t{agent=\"b\",kind=\"input\"} 5\n\
        t_bucket{le=\"+Inf\"} 9\n\
        u 1.5\n";
    assert_eq!(metric_value(text, "t", &[("agent", "a")]), 7.0);
    assert_eq!(metric_value(text, "t", &[("kind", "input")]), 8.0);
    assert_eq!(metric_value(text, "t", &[]), 12.0);
    assert_eq!(metric_value(text, "u", &[]), 1.5);
    assert_eq!(metric_value(text, "t", &[("agent", "c")]), 0.0);
}
