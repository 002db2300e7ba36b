//! `GatewayBuilder`: a test's gateway config, written as SPEC §3 describes it, with one pool,
//! two agents, two accounts and two keys unless the test says otherwise.

use std::fs;

use serde_json::{json, Map, Value};

use super::gateway::{GatewayFiles, TempDir, TestGateway, DEFAULT_BALANCE};
use super::redis::{Backing, StoreUnderTest};
use super::{free_port, new_key, random_hex, sha256_hex, Worker, AGENT, OTHER_AGENT};

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
            admin_ca_pem: None,
        };
        files.write_policies(&Value::Object(self.policies));
        files
    }

    /// Writes the files, starts `turnpike serve` and waits until it is ready.
    pub fn start(self) -> TestGateway {
        self.write().start()
    }
}
