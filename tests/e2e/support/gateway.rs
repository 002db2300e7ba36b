//! `TestGateway`: writes a config per SPEC §3 into a temp dir, runs `turnpike serve` on free
//! loopback ports, waits for `/readyz`, and kills the process when dropped.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use super::redis::{Backing, StoreUnderTest};
use super::{
    chat_path, free_port, new_key, random_hex, raw, sha256_hex, Reply, Worker, AGENT, OTHER_AGENT,
};

/// The turnpike binary Cargo built for these tests.
pub const BINARY: &str = env!("CARGO_BIN_EXE_turnpike");

/// Starting balance of both accounts unless a test says otherwise.
pub const DEFAULT_BALANCE: i64 = 10_000_000;

/// A temp dir removed on drop, kept (and printed) when the test failed.
pub struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "turnpike-e2e-{}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst),
            random_hex(4)
        ));
        fs::create_dir_all(path.join("policies")).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept the test's gateway files in {}", self.0.display());
        } else {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

type Tweak = Box<dyn FnOnce(&mut Value)>;

/// Builds a gateway config: one pool `pool`, the priced agent [`AGENT`], the free agent
/// [`OTHER_AGENT`], accounts `acct_jane` / `acct_bob`, keys `key_jane` (only [`AGENT`]) and
/// `key_bob` (`"*"`).
pub struct GatewayBuilder {
    endpoints: Vec<String>,
    balance_mode: String,
    policies: Map<String, Value>,
    key_policy: String,
    agent_policy: Option<String>,
    balances: Vec<(String, i64)>,
    pricing: Value,
    timeout: String,
    connect_timeout: String,
    limits: Map<String, Value>,
    /// `None`: the store `TURNPIKE_TEST_STORE` names, on a fresh server of its own.
    store: Option<Value>,
    tweaks: Vec<Tweak>,
}

impl Default for GatewayBuilder {
    fn default() -> Self {
        let mut policies = Map::new();
        policies.insert(
            "standard".into(),
            json!({"requests": {"rate": 1000, "per": "1s"}}),
        );
        GatewayBuilder {
            endpoints: Vec::new(),
            balance_mode: "round_robin".into(),
            policies,
            key_policy: "standard".into(),
            agent_policy: None,
            balances: vec![
                ("acct_jane".into(), DEFAULT_BALANCE),
                ("acct_bob".into(), DEFAULT_BALANCE),
            ],
            pricing: json!({"input_per_mtok": 1_000_000, "output_per_mtok": 2_000_000}),
            timeout: "3s".into(),
            connect_timeout: "500ms".into(),
            limits: Map::new(),
            store: None,
            tweaks: Vec::new(),
        }
    }
}

impl GatewayBuilder {
    /// Adds `worker` to the pool.
    pub fn worker(mut self, worker: &Worker) -> Self {
        self.endpoints.push(worker.addr());
        self
    }

    /// Adds every worker to the pool.
    pub fn workers(mut self, workers: &[Worker]) -> Self {
        self.endpoints.extend(workers.iter().map(Worker::addr));
        self
    }

    /// Adds a raw endpoint (e.g. a port nothing listens on).
    pub fn endpoint(mut self, addr: &str) -> Self {
        self.endpoints.push(addr.to_string());
        self
    }

    /// `round_robin` or `session`.
    pub fn balance_mode(mut self, mode: &str) -> Self {
        self.balance_mode = mode.to_string();
        self
    }

    /// Adds or replaces policy `name` (the YAML value under `policies:`).
    pub fn policy(mut self, name: &str, spec: Value) -> Self {
        self.policies.insert(name.to_string(), spec);
        self
    }

    /// The policy both config keys use (default `standard`).
    pub fn key_policy(mut self, name: &str) -> Self {
        self.key_policy = name.to_string();
        self
    }

    /// An agent-wide policy on [`AGENT`].
    pub fn agent_policy(mut self, name: &str) -> Self {
        self.agent_policy = Some(name.to_string());
        self
    }

    /// Starting balance of both accounts.
    pub fn balance(mut self, n: i64) -> Self {
        for b in &mut self.balances {
            b.1 = n;
        }
        self
    }

    /// Starting balance of one account.
    pub fn account_balance(mut self, account: &str, n: i64) -> Self {
        for b in &mut self.balances {
            if b.0 == account {
                b.1 = n;
            }
        }
        self
    }

    /// `pricing.reserve` of [`AGENT`].
    pub fn reserve(mut self, n: i64) -> Self {
        self.pricing["reserve"] = json!(n);
        self
    }

    /// Replaces the whole `pricing` of [`AGENT`].
    pub fn pricing(mut self, pricing: Value) -> Self {
        self.pricing = pricing;
        self
    }

    /// The pool's whole-response timeout.
    pub fn timeout(mut self, t: &str) -> Self {
        self.timeout = t.to_string();
        self
    }

    pub fn max_body_bytes(mut self, n: u64) -> Self {
        self.limits.insert("max_body_bytes".into(), json!(n));
        self
    }

    pub fn max_header_bytes(mut self, n: u64) -> Self {
        self.limits.insert("max_header_bytes".into(), json!(n));
        self
    }

    pub fn max_response_bytes(mut self, n: u64) -> Self {
        self.limits.insert("max_response_bytes".into(), json!(n));
        self
    }

    /// The whole `store:` section, e.g. a Redis another gateway shares.
    pub fn store(mut self, store: Value) -> Self {
        self.store = Some(store);
        self
    }

    /// The escape hatch: edit the config (as JSON) after the builder wrote it.
    pub fn config(mut self, f: impl FnOnce(&mut Value) + 'static) -> Self {
        self.tweaks.push(Box::new(f));
        self
    }

    /// Writes the files without starting anything.
    pub fn write(self) -> GatewayFiles {
        let dir = TempDir::new();
        let port = free_port();
        let admin_port = free_port();
        let admin_token = format!("admin-{}", random_hex(12));
        let jane_key = new_key();
        let bob_key = new_key();
        let mut pricing = self.pricing.clone();
        if pricing.is_null() {
            pricing = json!({});
        }
        let mut priced = json!({"id": AGENT, "upstream": "pool", "pricing": pricing});
        let (store, backing) = match self.store {
            Some(store) => (store, None),
            None => match Backing::for_store(StoreUnderTest::from_env()) {
                // A loaded test machine can be slower than the production default of 100ms.
                Some(backing) => (
                    json!({"kind": "redis", "url": backing.url_value(), "timeout": "2s"}),
                    Some(backing),
                ),
                None => (json!({"kind": "memory"}), None),
            },
        };
        if let Some(p) = &self.agent_policy {
            priced["policy"] = json!(p);
        }
        let mut config = json!({
            "listen": format!("127.0.0.1:{port}"),
            "admin": {
                "listen": format!("127.0.0.1:{admin_port}"),
                "token_sha256": sha256_hex(&admin_token),
            },
            "store": store,
            "policies_dir": "policies",
            "upstreams": {
                "pool": {
                    "endpoints": self.endpoints,
                    "balance": self.balance_mode,
                    "path": "/internal/{agent_id}/invoke",
                    "connect_timeout": self.connect_timeout,
                    "timeout": self.timeout,
                    "headers": {"X-Upstream-Token": "s3cret"},
                }
            },
            "agents": [priced, {"id": OTHER_AGENT, "upstream": "pool"}],
            "accounts": self.balances.iter()
                .map(|(id, b)| json!({"id": id, "balance": b}))
                .collect::<Vec<_>>(),
            "keys": [
                {"id": "key_jane", "sha256": sha256_hex(&jane_key), "account": "acct_jane",
                 "agents": [AGENT], "policy": self.key_policy},
                {"id": "key_bob", "sha256": sha256_hex(&bob_key), "account": "acct_bob",
                 "agents": "*", "policy": self.key_policy},
            ],
        });
        if !self.limits.is_empty() {
            config["limits"] = Value::Object(self.limits);
        }
        for tweak in self.tweaks {
            tweak(&mut config);
        }
        let config_path = dir.path().join("turnpike.yaml");
        fs::write(&config_path, serde_yaml_ng::to_string(&config).unwrap()).unwrap();
        let files = GatewayFiles {
            backing,
            dir,
            config_path,
            config,
            port,
            admin_port,
            admin_token,
            jane_key,
            bob_key,
        };
        files.write_policies(&Value::Object(self.policies));
        files
    }

    /// Writes the files, starts `turnpike serve` and waits until it is ready.
    pub fn start(self) -> TestGateway {
        self.write().start()
    }
}

/// A written config, not (yet) running.
pub struct GatewayFiles {
    /// The Redis the store runs on, when the test owns one; dropped after the gateway.
    pub backing: Option<Backing>,
    pub dir: TempDir,
    pub config_path: PathBuf,
    /// The config as written (JSON form of the YAML).
    pub config: Value,
    pub port: u16,
    pub admin_port: u16,
    pub admin_token: String,
    pub jane_key: String,
    pub bob_key: String,
}

impl GatewayFiles {
    /// Replaces `policies/policies.yaml` atomically with `{policies: <policies>}`.
    pub fn write_policies(&self, policies: &Value) {
        let yaml = serde_yaml_ng::to_string(&json!({ "policies": policies })).unwrap();
        self.write_policies_text(&yaml);
    }

    /// Replaces `policies/policies.yaml` atomically with `text`.
    pub fn write_policies_text(&self, text: &str) {
        let path = self.dir.path().join("policies/policies.yaml");
        let tmp = self.dir.path().join("policies/.policies.yaml.tmp");
        fs::write(&tmp, text).unwrap();
        fs::rename(&tmp, &path).unwrap();
    }

    /// Rewrites `turnpike.yaml` from `config`.
    pub fn write_config(&self, config: &Value) {
        fs::write(&self.config_path, serde_yaml_ng::to_string(config).unwrap()).unwrap();
    }

    /// Runs `turnpike check --config <file>`.
    pub fn check(&self) -> Output {
        Command::new(BINARY)
            .arg("check")
            .arg("--config")
            .arg(&self.config_path)
            .output()
            .expect("run turnpike check")
    }

    /// The same config (same keys, same store) for a second instance on ports of its own.
    pub fn sibling(&self) -> GatewayFiles {
        let dir = TempDir::new();
        let (port, admin_port) = (free_port(), free_port());
        let mut config = self.config.clone();
        config["listen"] = json!(format!("127.0.0.1:{port}"));
        config["admin"]["listen"] = json!(format!("127.0.0.1:{admin_port}"));
        let config_path = dir.path().join("turnpike.yaml");
        fs::write(&config_path, serde_yaml_ng::to_string(&config).unwrap()).unwrap();
        let policies = fs::read(self.dir.path().join("policies/policies.yaml")).unwrap();
        fs::write(dir.path().join("policies/policies.yaml"), policies).unwrap();
        GatewayFiles {
            backing: None,
            dir,
            config_path,
            config,
            port,
            admin_port,
            admin_token: self.admin_token.clone(),
            jane_key: self.jane_key.clone(),
            bob_key: self.bob_key.clone(),
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("gateway.log")
    }

    /// Runs `turnpike serve --config <file>`, appending to its log.
    fn spawn(&self) -> Child {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        Command::new(BINARY)
            .arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {BINARY}: {e}"))
    }

    /// Starts `turnpike serve --config <file>` and waits for `/readyz`.
    pub fn start(self) -> TestGateway {
        let log_path = self.log_path();
        let child = self.spawn();
        let http: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_idle_connections(0)
            .max_idle_connections_per_host(0)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        let gw = TestGateway {
            files: self,
            log_path,
            child: Mutex::new(Some(child)),
            http,
        };
        gw.wait_ready();
        gw
    }
}

/// A running gateway.
pub struct TestGateway {
    pub files: GatewayFiles,
    log_path: PathBuf,
    child: Mutex<Option<Child>>,
    http: ureq::Agent,
}

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
    pub fn builder() -> GatewayBuilder {
        GatewayBuilder::default()
    }

    /// The data-plane port.
    pub fn port(&self) -> u16 {
        self.files.port
    }

    pub fn admin_port(&self) -> u16 {
        self.files.admin_port
    }

    /// The `ak_` key of `key_jane` (account `acct_jane`, only [`AGENT`]).
    pub fn jane(&self) -> &str {
        &self.files.jane_key
    }

    /// The `ak_` key of `key_bob` (account `acct_bob`, every agent).
    pub fn bob(&self) -> &str {
        &self.files.bob_key
    }

    pub fn admin_token(&self) -> &str {
        &self.files.admin_token
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port())
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port())
    }

    /// Everything the gateway wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(&self.log_path) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let start = log.len().saturating_sub(3000);
        let start = (start..log.len())
            .find(|i| log.is_char_boundary(*i))
            .unwrap_or(log.len());
        log[start..].to_string()
    }

    /// Kills the gateway and starts it again on the same files and ports.
    pub fn restart(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        *self.child.lock().unwrap() = Some(self.files.spawn());
        self.wait_ready();
    }

    /// The process id, for signals.
    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap().as_ref().expect("running").id()
    }

    /// Sends signal `name` (`"HUP"`, `"TERM"`, ...) to the gateway process with `kill -<name>`.
    pub fn signal(&self, name: &str) {
        let pid = self.pid();
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()
            .unwrap_or_else(|e| panic!("run kill -{name} {pid}: {e}"));
        assert!(status.success(), "kill -{name} {pid}: {status}");
    }

    /// The exit status if the gateway process has ended, `None` while it runs.
    pub fn exited(&self) -> Option<std::process::ExitStatus> {
        self.child
            .lock()
            .unwrap()
            .as_mut()
            .expect("not reaped yet")
            .try_wait()
            .expect("try_wait on the gateway")
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let probe: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_idle_connections(0)
            .timeout_global(Some(Duration::from_secs(1)))
            .build()
            .into();
        loop {
            if let Some(status) = self
                .child
                .lock()
                .unwrap()
                .as_mut()
                .unwrap()
                .try_wait()
                .unwrap()
            {
                panic!(
                    "gateway exited with {status} before it was ready; log:\n{}",
                    self.log_tail()
                );
            }
            let ready = probe
                .get(self.admin_url("/readyz"))
                .call()
                .map(|r| r.status().as_u16() == 200)
                .unwrap_or(false);
            if ready && std::net::TcpStream::connect(("127.0.0.1", self.port())).is_ok() {
                return;
            }
            if Instant::now() > deadline {
                panic!("gateway not ready after 20 s; log:\n{}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

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
    pub fn chat(&self, agent: &str, key: &str, message: &str) -> Reply {
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

impl Drop for TestGateway {
    fn drop(&mut self) {
        // A panic while the lock was held (say, in `wait_ready`) must not hide the process.
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mut child) = child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- gateway log tail ----\n{}\n---- end of gateway log ----",
                self.log_tail()
            );
        }
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

    pub fn message(mut self, m: &str) -> Self {
        self.body["message"] = json!(m);
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
