//! The file formats, exactly as operators write them. Nothing here is validated beyond
//! its shape: [`super::compile`] turns these into the types the gateway runs on. The config
//! file's fields nobody knows are collected while parsing (`files::parse_yaml_and_unknown_keys`)
//! and reported with its other errors; a policy file refuses them at once.

use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Deserialize)]
pub struct ConfigFile {
    #[serde(default = "default_listen")]
    pub listen: String,
    pub threads: Option<usize>,
    /// Peers (CIDR blocks) whose forwarding headers are believed; from anyone else they are
    /// replaced by the gateway's own.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    #[serde(default)]
    pub limits: LimitsSpec,
    /// On SIGTERM: how long calls in flight get to finish once the listeners stop accepting.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: String,
    /// On SIGTERM: how long `/readyz` fails before the listeners stop accepting.
    #[serde(default = "default_shutdown_delay")]
    pub shutdown_delay: String,
    pub tls: Option<TlsSpec>,
    #[serde(default)]
    pub metrics: MetricsSpec,
    #[serde(default)]
    pub admin: AdminSpec,
    #[serde(default)]
    pub store: StoreSpec,
    #[serde(default = "default_policies_dir")]
    pub policies_dir: String,
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamSpec>,
    #[serde(default)]
    pub agents: Vec<AgentSpec>,
    #[serde(default)]
    pub accounts: Vec<AccountSpec>,
    #[serde(default)]
    pub keys: Vec<KeySpec>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LimitsSpec {
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: usize,
    /// How long a client may read none of its answer before it is closed.
    #[serde(default = "default_write_timeout")]
    pub write_timeout: String,
    /// The whole request head, from the connection's start (or a kept-alive connection's
    /// first byte); the connection is closed after it.
    #[serde(default = "default_header_timeout")]
    pub header_timeout: String,
    /// The whole request body, from the end of its head; 408 after it.
    #[serde(default = "default_body_timeout")]
    pub body_timeout: String,
}

impl Default for LimitsSpec {
    fn default() -> Self {
        Self {
            max_body_bytes: default_max_body_bytes(),
            max_header_bytes: default_max_header_bytes(),
            max_response_bytes: default_max_response_bytes(),
            write_timeout: default_write_timeout(),
            header_timeout: default_header_timeout(),
            body_timeout: default_body_timeout(),
        }
    }
}

/// The HTTPS listener: its address, and its certificate chain and key (PEM), relative to
/// the config file.
#[derive(Debug, Clone, Deserialize)]
pub struct TlsSpec {
    pub listen: String,
    pub cert: String,
    pub key: String,
}

/// A certificate chain and key (PEM), relative to the config file.
#[derive(Debug, Clone, Deserialize)]
pub struct CertSpec {
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Default, Clone, Deserialize)]
pub struct MetricsSpec {
    /// Also count requests and tokens per key id. Off by default: one series set per key.
    #[serde(default)]
    pub per_key: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AdminSpec {
    #[serde(default = "default_admin_listen")]
    pub listen: String,
    pub token_sha256: Option<String>,
    /// Serve the admin listener over HTTPS with this pair.
    pub tls: Option<CertSpec>,
}

impl Default for AdminSpec {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
            token_sha256: None,
            tls: None,
        }
    }
}

#[derive(Debug, Default, Clone, Deserialize)]
pub struct StoreSpec {
    #[serde(default)]
    pub kind: StoreKind,
    pub url: Option<OneOrMany>,
    #[serde(default)]
    pub on_unavailable: FailMode,
    /// Redis only: the longest any one Redis call may take (default 250ms; a call whose
    /// answer was lost is sent once more when that is safe).
    pub timeout: Option<String>,
    /// Redis only: how long a key lookup is cached per instance (default 1s).
    pub key_cache_ttl: Option<String>,
    /// Redis only: how much longer than its pool's `timeout` a call holds its slots and
    /// reservation when its instance dies without settling it (default 60s).
    pub lease_grace: Option<String>,
    /// Redis only: the approximate length `turnpike:usage` is trimmed to.
    pub usage_stream_maxlen: Option<u64>,
    /// Redis only: settlements held while Redis is unreachable before new ones are dropped.
    pub settlement_queue: Option<usize>,
    /// Redis only: where held settlements are journalled on disk, relative to the config
    /// file (default: not journalled).
    pub journal_dir: Option<String>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    #[default]
    Memory,
    Redis,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailMode {
    #[default]
    FailClosed,
    FailOpen,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct UpstreamSpec {
    pub endpoints: Vec<String>,
    #[serde(default)]
    pub balance: BalanceSpec,
    #[serde(default = "default_upstream_path")]
    pub path: String,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: String,
    /// The whole JSON answer; for a stream, until its head.
    #[serde(default = "default_timeout")]
    pub timeout: String,
    /// A stream: the longest wait for its next event.
    #[serde(default = "default_stream_idle_timeout")]
    pub stream_idle_timeout: String,
    /// A stream: the longest it may run in all.
    #[serde(default = "default_max_stream")]
    pub max_stream: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// HTTPS endpoints only: the CA bundle (PEM) their certificates must chain to, instead
    /// of the system's roots.
    pub ca: Option<String>,
    /// HTTPS endpoints only: `false` accepts any certificate (logged loudly at every load).
    #[serde(default = "default_verify")]
    pub verify: bool,
    #[serde(default)]
    pub on_invalid_usage: InvalidUsageRule,
}

/// What a 2xx answer whose `usage` is present but wrong gets: never a free call.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InvalidUsageRule {
    /// 502 `upstream_invalid_usage` to the client, nothing charged.
    #[default]
    Reject,
    /// The answer passes and the call is charged its agent's reservation.
    ChargeReserve,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BalanceSpec {
    #[default]
    RoundRobin,
    Session,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AgentSpec {
    pub id: String,
    pub upstream: String,
    pub policy: Option<String>,
    pub pricing: Option<PricingSpec>,
    #[serde(default)]
    pub on_exhaustion: ExhaustionRule,
}

/// What becomes of a stream whose running usage exhausts its account or its key's token
/// bucket.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExhaustionRule {
    /// It runs to its end, and is charged all it used (the balance may go below zero).
    #[default]
    Finish,
    /// It is ended with `event: error`, and charged what it used until then.
    Cut,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PricingSpec {
    pub input_per_mtok: u64,
    pub output_per_mtok: u64,
    #[serde(default = "default_reserve")]
    pub reserve: i64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AccountSpec {
    pub id: String,
    #[serde(default)]
    pub balance: i64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct KeySpec {
    pub id: String,
    pub sha256: String,
    pub account: String,
    pub agents: AgentsSpec,
    pub policy: Option<String>,
    pub expires_at: Option<String>,
}

/// `"*"` or a list of agent ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum AgentsSpec {
    Wildcard(String),
    List(Vec<String>),
}

/// One policy file: `policies: {name: {...}}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    #[serde(default)]
    pub policies: BTreeMap<String, PolicySpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    pub requests: Option<BucketFileSpec>,
    pub tokens: Option<BucketFileSpec>,
    pub concurrency: Option<u32>,
    #[serde(default)]
    pub mode: ModeSpec,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketFileSpec {
    pub rate: u64,
    pub per: String,
    pub burst: Option<u64>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModeSpec {
    #[default]
    Enforce,
    Shadow,
}

fn default_verify() -> bool {
    true
}

fn default_listen() -> String {
    "0.0.0.0:8080".into()
}
fn default_admin_listen() -> String {
    "127.0.0.1:9090".into()
}
fn default_policies_dir() -> String {
    "policies".into()
}
fn default_max_body_bytes() -> usize {
    64 * 1024
}
fn default_max_header_bytes() -> usize {
    16 * 1024
}
fn default_max_response_bytes() -> usize {
    8 * 1024 * 1024
}
fn default_write_timeout() -> String {
    "30s".into()
}
fn default_header_timeout() -> String {
    "10s".into()
}
fn default_body_timeout() -> String {
    "30s".into()
}
fn default_shutdown_grace() -> String {
    "30s".into()
}
fn default_shutdown_delay() -> String {
    "0s".into()
}
fn default_upstream_path() -> String {
    "/chat".into()
}
fn default_connect_timeout() -> String {
    "1s".into()
}
fn default_stream_idle_timeout() -> String {
    "60s".into()
}

fn default_max_stream() -> String {
    "1h".into()
}

fn default_timeout() -> String {
    "120s".into()
}
fn default_reserve() -> i64 {
    1
}
