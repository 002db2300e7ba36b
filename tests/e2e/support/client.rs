//! Talking to a running `TestGateway` over plain HTTP: chat calls, raw requests, the admin
//! API and `/metrics`, each answer a [`Reply`].

use serde_json::{json, Value};
use std::time::Duration;

use super::gateway::TestGateway;
use super::{chat_path, raw, Reply};

/// `GET /admin/accounts/{id}/balance`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Balance {
    pub balance: i64,
    pub reserved: i64,
}

/// `GET /admin/usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub requests: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub total_tokens: i64,
    pub cost: i64,
}

impl TestGateway {
    fn reply(
        &self,
        what: String,
        result: Result<http::Response<ureq::Body>, ureq::Error>,
    ) -> Reply {
        let mut resp = result.unwrap_or_else(|e| {
            panic!(
                "{what}: transport error {e}; gateway log:\n{}",
                self.log_tail()
            )
        });
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_ascii_lowercase(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let body = resp
            .body_mut()
            .with_config()
            .limit(64 * 1024 * 1024)
            .read_to_vec()
            .unwrap_or_else(|e| {
                panic!(
                    "{what}: reading body: {e}; gateway log:\n{}",
                    self.log_tail()
                )
            });
        Reply {
            what,
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    /// `POST /v1/agents/{agent}/chat` with `{"message": message}` and `Bearer key`.
    /// `message` is plain text, or a [`super::Script`] for the mock worker.
    pub fn chat(&self, agent: &str, key: &str, message: impl std::fmt::Display) -> Reply {
        self.call(agent).key(key).message(message).send()
    }

    /// A chat call to shape further: `gw.call(AGENT).key(k).session("s").header(..).send()`.
    pub fn call(&self, agent: &str) -> ChatCall<'_> {
        ChatCall {
            gw: self,
            path: chat_path(agent),
            key: None,
            body: json!({"message": "hello"}),
            headers: Vec::new(),
        }
    }

    /// `POST path` with these headers and this exact body.
    pub fn post_bytes(&self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
        let mut req = self.http.post(self.url(path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let what = format!("POST {path} {}", preview(body));
        self.reply(what, req.send(body))
    }

    /// `POST path` with a JSON content type, `Bearer key` and this exact body.
    pub fn post_json_bytes(&self, path: &str, key: &str, body: &[u8]) -> Reply {
        let auth = format!("Bearer {key}");
        self.post_bytes(
            path,
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            body,
        )
    }

    /// Sends a hand-written request to the data port.
    pub fn raw(&self, request: &[u8]) -> Reply {
        raw::send(self.port(), request)
    }

    /// `method target` over a raw socket with these headers and body (adds Host,
    /// Content-Length, `Connection: close`).
    pub fn raw_request(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Reply {
        self.raw(&raw::request(method, target, headers, body))
    }

    /// An admin call with an explicit `Authorization` header value (or none).
    pub fn admin_call(
        &self,
        method: &str,
        path: &str,
        authorization: Option<&str>,
        body: Option<&Value>,
    ) -> Reply {
        let url = self.admin_url(path);
        let what = format!("admin {method} {path}");
        let result = match (method, body) {
            ("GET", _) => {
                let mut r = self.http.get(url);
                if let Some(a) = authorization {
                    r = r.header("Authorization", a);
                }
                r.call()
            }
            ("DELETE", _) => {
                let mut r = self.http.delete(url);
                if let Some(a) = authorization {
                    r = r.header("Authorization", a);
                }
                r.call()
            }
            (m, body) => {
                let mut r = match m {
                    "POST" => self.http.post(url),
                    "PUT" => self.http.put(url),
                    other => panic!("admin_call: unsupported method {other}"),
                };
                if let Some(a) = authorization {
                    r = r.header("Authorization", a);
                }
                match body {
                    Some(b) => r.send_json(b),
                    None => r.send_empty(),
                }
            }
        };
        self.reply(what, result)
    }

    /// `GET path` on the admin listener with the admin token.
    pub fn admin_get(&self, path: &str) -> Reply {
        let auth = format!("Bearer {}", self.admin_token());
        self.admin_call("GET", path, Some(&auth), None)
    }

    /// `POST path` on the admin listener with the admin token and a JSON body.
    pub fn admin_post(&self, path: &str, body: &Value) -> Reply {
        let auth = format!("Bearer {}", self.admin_token());
        self.admin_call("POST", path, Some(&auth), Some(body))
    }

    /// `DELETE path` on the admin listener with the admin token.
    pub fn admin_delete(&self, path: &str) -> Reply {
        let auth = format!("Bearer {}", self.admin_token());
        self.admin_call("DELETE", path, Some(&auth), None)
    }

    /// `GET path` on the admin listener without credentials.
    pub fn open_get(&self, path: &str) -> Reply {
        self.admin_call("GET", path, None, None)
    }

    /// The Prometheus text of `/metrics`.
    pub fn metrics(&self) -> String {
        let r = self.open_get("/metrics");
        r.assert_status(200);
        r.body
    }

    /// The sum of the samples of `name` whose labels include `labels`.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        super::metric_value(&self.metrics(), name, labels)
    }

    /// Waits (up to 5 s) until metric `name` with `labels` reads `value`. A call is counted
    /// when it ends, which is just after its client got the answer.
    pub fn wait_metric(&self, name: &str, labels: &[(&str, &str)], value: f64) {
        super::wait_until(
            Duration::from_secs(5),
            &format!("{name} {labels:?} reads {value}"),
            || self.metric(name, labels) == value,
        );
    }

    /// The account's balance and reservation, now.
    pub fn balance(&self, account: &str) -> Balance {
        let r = self.admin_get(&format!("/admin/accounts/{account}/balance"));
        r.assert_status(200);
        let v = r.json();
        assert_eq!(
            v["account"], account,
            "balance answer names the account: {v}"
        );
        Balance {
            balance: v["balance"]
                .as_i64()
                .unwrap_or_else(|| panic!("balance in {v}")),
            reserved: v["reserved"]
                .as_i64()
                .unwrap_or_else(|| panic!("reserved in {v}")),
        }
    }

    /// The account's balance once nothing is reserved any more (waits up to 5 s).
    pub fn settled_balance(&self, account: &str) -> Balance {
        let mut last = self.balance(account);
        super::wait_until(
            Duration::from_secs(5),
            &format!("{account} has nothing reserved"),
            || {
                last = self.balance(account);
                last.reserved == 0
            },
        );
        last
    }

    /// Asserts that `acct_jane` still has `balance`, nothing reserved, and nothing metered.
    #[track_caller]
    pub fn assert_jane_charged_nothing(&self, balance: i64) {
        assert_eq!(
            self.settled_balance("acct_jane"),
            Balance {
                balance,
                reserved: 0
            }
        );
        assert_eq!(self.usage("account=acct_jane"), Usage::default());
        assert_eq!(
            self.metric("turnpike_tokens_total", &[("agent", super::AGENT)]),
            0.0
        );
    }

    /// `GET /admin/usage?<query>` (e.g. `account=acct_jane&agent=...`, or empty).
    pub fn usage(&self, query: &str) -> Usage {
        let path = if query.is_empty() {
            "/admin/usage".to_string()
        } else {
            format!("/admin/usage?{query}")
        };
        let r = self.admin_get(&path);
        r.assert_status(200);
        let v = r.json();
        let field = |name: &str| {
            v[name]
                .as_i64()
                .unwrap_or_else(|| panic!("{name} in usage answer {v}"))
        };
        Usage {
            requests: field("requests"),
            input_tokens: field("input_tokens"),
            output_tokens: field("output_tokens"),
            total_tokens: field("total_tokens"),
            cost: field("cost"),
        }
    }

    /// Waits (up to 5 s) until `/admin/usage?<query>` counts `requests` metered calls, then
    /// returns it.
    pub fn usage_after(&self, query: &str, requests: i64) -> Usage {
        let mut last = Usage::default();
        super::wait_until(
            Duration::from_secs(5),
            &format!("usage?{query} counts {requests} requests"),
            || {
                last = self.usage(query);
                last.requests >= requests
            },
        );
        last
    }
}

/// A chat call being put together.
pub struct ChatCall<'a> {
    gw: &'a TestGateway,
    path: String,
    key: Option<String>,
    body: Value,
    headers: Vec<(String, String)>,
}

impl ChatCall<'_> {
    /// Sends `Authorization: Bearer <key>`.
    pub fn key(mut self, key: &str) -> Self {
        self.key = Some(key.to_string());
        self
    }

    /// Plain text, or a [`super::Script`] for the mock worker.
    pub fn message(mut self, m: impl std::fmt::Display) -> Self {
        self.body["message"] = json!(m.to_string());
        self
    }

    pub fn session(mut self, s: &str) -> Self {
        self.body["session_id"] = json!(s);
        self
    }

    /// Another body field, forwarded as is.
    pub fn field(mut self, name: &str, v: Value) -> Self {
        self.body[name] = v;
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    pub fn send(self) -> Reply {
        let mut req = self
            .gw
            .http
            .post(self.gw.url(&self.path))
            .content_type("application/json");
        if let Some(k) = &self.key {
            req = req.header("Authorization", format!("Bearer {k}"));
        }
        for (k, v) in &self.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let body = serde_json::to_vec(&self.body).unwrap();
        let what = format!("POST {} {}", self.path, preview(&body));
        self.gw.reply(what, req.send(&body[..]))
    }
}

fn preview(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(&body[..body.len().min(120)]).into_owned();
    if body.len() > 120 {
        format!("{s}... ({} bytes)", body.len())
    } else {
        s
    }
}
