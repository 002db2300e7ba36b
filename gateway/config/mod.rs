//! Configuration: the YAML file and policy directory an operator writes, validated all at
//! once and compiled into [`Runtime`], the read-only form the gateway runs on.

mod locate;
mod spec;

pub use spec::{BalanceSpec as Balance, FailMode, StoreKind};

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::auth::{AgentScope, KeyHash, KeyRecord};
use crate::billing::Pricing;
use crate::limits::{BucketSpec, Mode, Policy};
use crate::routing::{is_agent_id, PathTemplate};
use crate::store::AccountSeed;
use spec::{ConfigFile, PolicyFile};

/// The largest request body a call may carry: each call holds its body in memory until the
/// worker has it, so the bound keeps a burst of large calls from exhausting memory.
pub const MAX_BODY_BYTES_CEILING: usize = 16 * 1024 * 1024;

/// Everything the gateway runs on, compiled from one config file and its policies.
#[derive(Debug)]
pub struct Runtime {
    pub source: PathBuf,
    pub policies_dir: PathBuf,
    pub listen: String,
    pub threads: usize,
    pub limits: Limits,
    pub admin: AdminConfig,
    pub store: StoreConfig,
    pub pools: BTreeMap<String, PoolConfig>,
    pub agents: HashMap<String, Arc<Agent>>,
    pub policies: HashMap<String, Arc<Policy>>,
    /// Seeded into the store at start.
    pub keys: Vec<(KeyHash, KeyRecord)>,
    pub accounts: Vec<AccountSeed>,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_header_bytes: usize,
    pub max_response_bytes: usize,
}

#[derive(Debug)]
pub struct AdminConfig {
    pub listen: String,
    /// `None`: every `/admin/*` call is refused.
    pub token: Option<KeyHash>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct StoreConfig {
    pub kind: StoreKind,
    /// The Redis server, or the seed nodes of a Redis Cluster.
    pub urls: Vec<String>,
    /// `url` was a list: Redis Cluster, even with one seed node.
    pub cluster: bool,
    pub on_unavailable: FailMode,
    pub timeout: Duration,
    pub key_cache_ttl: Duration,
    pub usage_stream_maxlen: u64,
    pub settlement_queue: usize,
}

#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub name: String,
    pub endpoints: Vec<SocketAddr>,
    pub balance: Balance,
    pub path: PathTemplate,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

#[derive(Debug)]
pub struct Agent {
    pub id: String,
    pub pool: String,
    pub policy: Option<Arc<Policy>>,
    pub pricing: Option<Pricing>,
}

/// One problem in a config or policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based, when the parser knows it.
    pub location: Option<(usize, usize)>,
    /// Where in the document, e.g. `agents[0].upstream`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((line, column)) = self.location {
            write!(f, ":{line}:{column}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found, reported together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Collects errors against one file.
struct Report<'a> {
    file: &'a Path,
    /// The file's text, to find the line of a key.
    text: &'a str,
    errors: &'a mut Vec<ConfigError>,
}

impl Report<'_> {
    fn error(&mut self, key: impl Into<String>, message: impl Into<String>) {
        let key = key.into();
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            location: locate::locate(self.text, &key),
            key,
            message: message.into(),
        });
    }
}

/// Reads and validates `path` and the policy directory it names.
pub fn load(path: &Path) -> Result<Runtime, ConfigErrors> {
    load_with(path, None)
}

/// Reads and validates `path` with the policies of `policies_dir` instead of its own.
pub fn load_with_policies(path: &Path, policies_dir: &Path) -> Result<Runtime, ConfigErrors> {
    load_with(path, Some(policies_dir))
}

fn load_with(path: &Path, policies_dir: Option<&Path>) -> Result<Runtime, ConfigErrors> {
    let text = read(path)?;
    let file: ConfigFile = parse_yaml(path, &text)?;
    let policies_dir = match policies_dir {
        Some(dir) => dir.to_path_buf(),
        None => path
            .parent()
            .unwrap_or(Path::new("."))
            .join(&file.policies_dir),
    };
    let (policies, policy_names, mut errors) = load_policies(&policies_dir);
    let mut runtime = compile(path, &text, file, policies, &policy_names, &mut errors);
    runtime.policies_dir = policies_dir;
    if errors.is_empty() {
        Ok(runtime)
    } else {
        Err(ConfigErrors(errors))
    }
}

fn one_error(path: &Path, location: Option<(usize, usize)>, message: String) -> ConfigErrors {
    ConfigErrors(vec![ConfigError {
        file: path.to_path_buf(),
        location,
        key: String::new(),
        message,
    }])
}

fn read(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|e| one_error(path, None, format!("cannot read: {e}")))
}

fn parse_yaml<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigErrors> {
    serde_yaml_ng::from_str(text).map_err(|typed| {
        // The typed parser may trip over a wrong type before it reaches a syntax error
        // further on; a file that is not YAML at all is reported as such.
        let e = match serde_yaml_ng::from_str::<serde_yaml_ng::Value>(text) {
            Err(syntax) => syntax,
            Ok(_) => typed,
        };
        let location = e.location().map(|l| (l.line(), l.column()));
        one_error(path, location, without_location(e.to_string()))
    })
}

/// The policy files of a directory.
fn policy_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    Ok(files)
}

/// Every `*.yaml`/`*.yml` file of the directory, merged; a name defined twice is an error.
/// Also returns every name defined, valid or not, for reference checks.
fn load_policies(
    dir: &Path,
) -> (
    HashMap<String, Arc<Policy>>,
    HashSet<String>,
    Vec<ConfigError>,
) {
    let mut policies = HashMap::new();
    let mut names = HashSet::new();
    let mut errors = Vec::new();
    let files = match policy_files(dir) {
        Ok(files) => files,
        Err(e) => {
            let message = format!("cannot read policies directory: {e}");
            Report {
                file: dir,
                text: "",
                errors: &mut errors,
            }
            .error("", message);
            return (policies, names, errors);
        }
    };
    for file in files {
        let text = match read(&file) {
            Ok(text) => text,
            Err(ConfigErrors(mut found)) => {
                errors.append(&mut found);
                continue;
            }
        };
        let parsed = match parse_yaml::<PolicyFile>(&file, &text) {
            Ok(parsed) => parsed,
            Err(first) => {
                // Judge each policy on its own: every broken one is reported, and a policy
                // that failed to parse is still known by name, so references to it are not
                // reported as well.
                let known = (&mut policies, &mut names);
                report_each_policy(&file, &text, first, known, &mut errors);
                continue;
            }
        };
        let mut report = Report {
            file: &file,
            text: &text,
            errors: &mut errors,
        };
        for (name, spec) in parsed.policies {
            if !names.insert(name.clone()) {
                report.error(format!("policies.{name}"), "policy defined twice");
                continue;
            }
            if let Some(policy) = compile_policy(&name, spec, &mut report) {
                policies.insert(name, Arc::new(policy));
            }
        }
    }
    (policies, names, errors)
}

/// Reports the problems of a policy file that did not parse as a whole, one per broken
/// policy: the first with the parser's exact position (`first`), the others at their name.
fn report_each_policy(
    file: &Path,
    text: &str,
    first: ConfigErrors,
    (policies, names): (&mut HashMap<String, Arc<Policy>>, &mut HashSet<String>),
    errors: &mut Vec<ConfigError>,
) {
    #[derive(serde::Deserialize)]
    struct Loose {
        #[serde(default)]
        policies: serde_yaml_ng::Mapping,
    }
    let Ok(loose) = serde_yaml_ng::from_str::<Loose>(text) else {
        // Not YAML (`first` says where); its policies' names are unknown.
        errors.extend(first.0);
        return;
    };
    let mut first = Some(first);
    let mut report = Report { file, text, errors };
    for (name, value) in loose.policies {
        let Some(name) = name.as_str() else { continue };
        if !names.insert(name.to_owned()) {
            report.error(format!("policies.{name}"), "policy defined twice");
            continue;
        }
        match serde_yaml_ng::from_value::<spec::PolicySpec>(value) {
            Ok(spec) => {
                if let Some(policy) = compile_policy(name, spec, &mut report) {
                    policies.insert(name.to_owned(), Arc::new(policy));
                }
            }
            Err(e) => match first.take() {
                Some(first) => report.errors.extend(first.0),
                None => report.error(format!("policies.{name}"), without_location(e.to_string())),
            },
        }
    }
    if let Some(first) = first {
        report.errors.extend(first.0);
    }
}

/// A parser message without its trailing "at line L column C": the location is printed
/// in front already.
fn without_location(message: String) -> String {
    match message.rfind(" at line ") {
        Some(at) if message[at..].contains(" column ") => message[..at].to_owned(),
        _ => message,
    }
}

/// The largest `burst × per` (in milliseconds) a bucket may hold: 2^53, below which the
/// Redis scripts' doubles count every unit exactly.
const MAX_BUCKET_UNITS: u128 = 1 << 53;

fn compile_policy(name: &str, spec: spec::PolicySpec, report: &mut Report) -> Option<Policy> {
    let mut bucket = |which: &str,
                      spec: Option<spec::BucketFileSpec>|
     -> Result<Option<BucketSpec>, ()> {
        let Some(spec) = spec else { return Ok(None) };
        let key = format!("policies.{name}.{which}");
        let period = parse_duration(&spec.per).map_err(|m| report.error(format!("{key}.per"), m));
        if spec.rate == 0 {
            report.error(format!("{key}.rate"), "must be a positive integer");
        }
        if spec.burst == Some(0) {
            report.error(format!("{key}.burst"), "must be a positive integer");
        }
        let period = period?;
        if spec.rate == 0 || spec.burst == Some(0) {
            return Err(());
        }
        let bucket = BucketSpec {
            rate: spec.rate,
            period_ms: period.as_millis() as u64,
            burst: spec.burst.unwrap_or(spec.rate),
        };
        if bucket.burst as u128 * bucket.period_ms as u128 > MAX_BUCKET_UNITS {
            // Redis counts in doubles, exact only below 2^53; both stores keep to that.
            let field = if spec.burst.is_some() {
                "burst"
            } else {
                "rate"
            };
            report.error(
                format!("{key}.{field}"),
                format!(
                    "burst × per is {} token-milliseconds; it must be at most 2^53 ({MAX_BUCKET_UNITS})",
                    bucket.burst as u128 * bucket.period_ms as u128
                ),
            );
            return Err(());
        }
        Ok(Some(bucket))
    };
    let requests = bucket("requests", spec.requests);
    let tokens = bucket("tokens", spec.tokens);
    if spec.concurrency == Some(0) {
        report.error(
            format!("policies.{name}.concurrency"),
            "must be a positive integer",
        );
        return None;
    }
    Some(Policy {
        name: name.to_owned(),
        requests: requests.ok()?,
        tokens: tokens.ok()?,
        concurrency: spec.concurrency,
        mode: match spec.mode {
            spec::ModeSpec::Enforce => Mode::Enforce,
            spec::ModeSpec::Shadow => Mode::Shadow,
        },
    })
}

fn compile(
    path: &Path,
    text: &str,
    file: ConfigFile,
    policies: HashMap<String, Arc<Policy>>,
    policy_names: &HashSet<String>,
    errors: &mut Vec<ConfigError>,
) -> Runtime {
    let mut report = Report {
        file: path,
        text,
        errors,
    };
    check_addr(&mut report, "listen", &file.listen);
    check_addr(&mut report, "admin.listen", &file.admin.listen);
    if file.tls.is_some() {
        report.error("tls", "the TLS listener is not supported by this build yet; terminate TLS in front of Turnpike");
    }
    let limits = compile_limits(&file.limits, &mut report);
    let token = file.admin.token_sha256.as_deref().and_then(|hex_digits| {
        let hash = KeyHash::from_hex(hex_digits);
        if hash.is_none() {
            report.error(
                "admin.token_sha256",
                "must be 64 hex digits (the SHA-256 of the admin token)",
            );
        }
        hash
    });
    let store = compile_store(file.store, &mut report);
    // Names count as defined even when their definition has errors, so one mistake is
    // reported once, not again by everything that refers to it.
    let pool_names: HashSet<String> = file.upstreams.keys().cloned().collect();
    let pools: BTreeMap<String, PoolConfig> = file
        .upstreams
        .into_iter()
        .filter_map(|(name, spec)| compile_pool(&name, spec, &mut report).map(|p| (name, p)))
        .collect();
    let agents = compile_agents(
        file.agents,
        &pool_names,
        &policies,
        policy_names,
        &mut report,
    );
    let accounts = compile_accounts(file.accounts, &mut report);
    let keys = compile_keys(file.keys, &agents, &accounts, policy_names, &mut report);
    Runtime {
        source: path.to_path_buf(),
        policies_dir: PathBuf::new(),
        listen: file.listen,
        threads: file
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        limits,
        admin: AdminConfig {
            listen: file.admin.listen,
            token,
        },
        store,
        pools,
        agents,
        policies,
        keys,
        accounts,
    }
}

fn check_addr(report: &mut Report, key: &str, addr: &str) {
    if addr.parse::<SocketAddr>().is_err() {
        report.error(
            key,
            format!("'{addr}' is not an address such as 0.0.0.0:8080"),
        );
    }
}

fn compile_limits(spec: &spec::LimitsSpec, report: &mut Report) -> Limits {
    if spec.max_body_bytes == 0 || spec.max_body_bytes > MAX_BODY_BYTES_CEILING {
        report.error(
            "limits.max_body_bytes",
            format!("must be between 1 and {MAX_BODY_BYTES_CEILING}"),
        );
    }
    for (key, value) in [
        ("limits.max_header_bytes", spec.max_header_bytes),
        ("limits.max_response_bytes", spec.max_response_bytes),
    ] {
        if value == 0 {
            report.error(key, "must be a positive integer");
        }
    }
    Limits {
        max_body_bytes: spec.max_body_bytes,
        max_header_bytes: spec.max_header_bytes,
        max_response_bytes: spec.max_response_bytes,
    }
}

fn compile_store(spec: spec::StoreSpec, report: &mut Report) -> StoreConfig {
    let (urls, cluster) = match spec.url {
        None => (Vec::new(), false),
        Some(spec::OneOrMany::One(url)) => (vec![url], false),
        Some(spec::OneOrMany::Many(urls)) => (urls, true),
    };
    if spec.kind == StoreKind::Redis {
        if urls.is_empty() {
            report.error(
                "store.url",
                "the Redis store needs a url (a list means Redis Cluster)",
            );
        }
        for (i, url) in urls.iter().enumerate() {
            if !url.starts_with("redis://") {
                let at = if urls.len() > 1 {
                    format!("store.url[{i}]")
                } else {
                    "store.url".into()
                };
                report.error(at, format!("'{url}' is not a redis:// URL"));
            }
        }
    }
    let mut duration = |field: &str, text: Option<String>, default_ms: u64| match text {
        None => Duration::from_millis(default_ms),
        Some(text) => parse_duration(&text).unwrap_or_else(|m| {
            report.error(format!("store.{field}"), m);
            Duration::from_millis(default_ms)
        }),
    };
    let timeout = duration("timeout", spec.timeout, 100);
    let key_cache_ttl = duration("key_cache_ttl", spec.key_cache_ttl, 1000);
    if spec.settlement_queue == Some(0) {
        report.error("store.settlement_queue", "must be a positive integer");
    }
    StoreConfig {
        kind: spec.kind,
        urls,
        cluster,
        on_unavailable: spec.on_unavailable,
        timeout,
        key_cache_ttl,
        usage_stream_maxlen: spec.usage_stream_maxlen.unwrap_or(1_000_000),
        settlement_queue: spec.settlement_queue.unwrap_or(100_000),
    }
}

fn compile_pool(name: &str, spec: spec::UpstreamSpec, report: &mut Report) -> Option<PoolConfig> {
    let key = format!("upstreams.{name}");
    let before = report.errors.len();
    if spec.endpoints.is_empty() {
        report.error(format!("{key}.endpoints"), "needs at least one endpoint");
    }
    let endpoints: Vec<SocketAddr> = spec
        .endpoints
        .iter()
        .enumerate()
        .filter_map(|(i, endpoint)| {
            let parsed = endpoint.parse().ok();
            if parsed.is_none() {
                let message = if endpoint.starts_with("https://") {
                    "HTTPS endpoints are not supported by this build yet".to_owned()
                } else {
                    format!("'{endpoint}' is not an address such as 127.0.0.1:9001")
                };
                report.error(format!("{key}.endpoints[{i}]"), message);
            }
            parsed
        })
        .collect();
    if spec.ca.is_some() {
        report.error(
            format!("{key}.ca"),
            "only applies to HTTPS endpoints, which this build does not support yet",
        );
    }
    let path = PathTemplate::parse(&spec.path)
        .map_err(|m| report.error(format!("{key}.path"), m))
        .ok();
    let mut duration = |field: &str, text: &str| {
        parse_duration(text)
            .map_err(|m| report.error(format!("{key}.{field}"), m))
            .ok()
    };
    let connect_timeout = duration("connect_timeout", &spec.connect_timeout);
    let timeout = duration("timeout", &spec.timeout);
    let mut headers = Vec::new();
    for (header, value) in &spec.headers {
        match (
            http::HeaderName::try_from(header.as_str()),
            http::HeaderValue::try_from(value.as_str()),
        ) {
            (Ok(n), Ok(v)) => headers.push((n, v)),
            _ => report.error(
                format!("{key}.headers.{header}"),
                "not a valid HTTP header name and value",
            ),
        }
    }
    if report.errors.len() != before {
        return None;
    }
    Some(PoolConfig {
        name: name.to_owned(),
        endpoints,
        balance: spec.balance,
        path: path?,
        connect_timeout: connect_timeout?,
        timeout: timeout?,
        headers,
    })
}

fn compile_agents(
    specs: Vec<spec::AgentSpec>,
    pool_names: &HashSet<String>,
    policies: &HashMap<String, Arc<Policy>>,
    policy_names: &HashSet<String>,
    report: &mut Report,
) -> HashMap<String, Arc<Agent>> {
    let mut agents = HashMap::new();
    for (i, spec) in specs.into_iter().enumerate() {
        let key = format!("agents[{i}]");
        if !is_agent_id(&spec.id) {
            report.error(
                format!("{key}.id"),
                format!("'{}' does not match ^ag_[A-Za-z0-9_-]{{1,64}}$", spec.id),
            );
        }
        if agents.contains_key(&spec.id) {
            report.error(
                format!("{key}.id"),
                format!("agent '{}' defined twice", spec.id),
            );
        }
        if !pool_names.contains(&spec.upstream) {
            report.error(
                format!("{key}.upstream"),
                format!("no upstream named '{}'", spec.upstream),
            );
        }
        let policy = spec.policy.as_ref().and_then(|name| {
            if !policy_names.contains(name) {
                report.error(format!("{key}.policy"), format!("no policy named '{name}'"));
            }
            policies.get(name).cloned()
        });
        if let Some(pricing) = &spec.pricing {
            if pricing.reserve < 0 {
                report.error(format!("{key}.pricing.reserve"), "must not be negative");
            }
        }
        let agent = Agent {
            id: spec.id.clone(),
            pool: spec.upstream,
            policy,
            pricing: spec.pricing.map(|p| Pricing {
                input_per_mtok: p.input_per_mtok,
                output_per_mtok: p.output_per_mtok,
                reserve: p.reserve,
            }),
        };
        agents.insert(spec.id, Arc::new(agent));
    }
    agents
}

fn compile_accounts(specs: Vec<spec::AccountSpec>, report: &mut Report) -> Vec<AccountSeed> {
    let mut seen = HashSet::new();
    for (i, spec) in specs.iter().enumerate() {
        if !seen.insert(spec.id.as_str()) {
            report.error(
                format!("accounts[{i}].id"),
                format!("account '{}' defined twice", spec.id),
            );
        }
    }
    specs
        .into_iter()
        .map(|spec| AccountSeed {
            id: spec.id,
            balance: spec.balance,
        })
        .collect()
}

fn compile_keys(
    specs: Vec<spec::KeySpec>,
    agents: &HashMap<String, Arc<Agent>>,
    accounts: &[AccountSeed],
    policy_names: &HashSet<String>,
    report: &mut Report,
) -> Vec<(KeyHash, KeyRecord)> {
    let mut ids = HashSet::new();
    let mut hashes = HashSet::new();
    let mut keys = Vec::new();
    for (i, spec) in specs.into_iter().enumerate() {
        let key = format!("keys[{i}]");
        if !ids.insert(spec.id.clone()) {
            report.error(
                format!("{key}.id"),
                format!("key '{}' defined twice", spec.id),
            );
        }
        let hash = KeyHash::from_hex(&spec.sha256);
        match hash {
            None => report.error(
                format!("{key}.sha256"),
                "must be 64 hex digits (the SHA-256 of the full ak_ key)",
            ),
            Some(hash) if !hashes.insert(hash) => {
                report.error(format!("{key}.sha256"), "the same key hash is listed twice")
            }
            Some(_) => {}
        }
        if !accounts.iter().any(|a| a.id == spec.account) {
            report.error(
                format!("{key}.account"),
                format!("no account named '{}'", spec.account),
            );
        }
        let scope = match spec.agents {
            spec::AgentsSpec::Wildcard(star) if star == "*" => AgentScope::All,
            spec::AgentsSpec::Wildcard(other) => {
                report.error(
                    format!("{key}.agents"),
                    format!("'{other}' is neither \"*\" nor a list of agent ids"),
                );
                AgentScope::Only(Vec::new())
            }
            spec::AgentsSpec::List(list) => {
                for (j, agent) in list.iter().enumerate() {
                    if !agents.contains_key(agent) {
                        report.error(
                            format!("{key}.agents[{j}]"),
                            format!("no agent named '{agent}'"),
                        );
                    }
                }
                AgentScope::Only(list)
            }
        };
        let policy = spec.policy.unwrap_or_default();
        if !policy.is_empty() && !policy_names.contains(&policy) {
            report.error(
                format!("{key}.policy"),
                format!("no policy named '{policy}'"),
            );
        }
        let expires_at = spec.expires_at.as_deref().and_then(|text| {
            let parsed = parse_rfc3339(text);
            if parsed.is_none() {
                report.error(
                    format!("{key}.expires_at"),
                    format!("'{text}' is not an RFC 3339 time such as 2027-01-31T00:00:00Z"),
                );
            }
            parsed
        });
        if let Some(hash) = hash {
            let record = KeyRecord {
                id: spec.id,
                account: spec.account,
                agents: scope,
                policy,
                expires_at,
                revoked: false,
            };
            keys.push((hash, record));
        }
    }
    keys
}

/// Unix seconds of an RFC 3339 time.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    let parsed =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    Some(parsed.unix_timestamp())
}

/// Parses `250ms`, `1s`, `1m`, `1h` (a positive whole number and a unit).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let millis_per_unit = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => 0,
    };
    match number.parse::<u64>() {
        Ok(n) if n > 0 && millis_per_unit > 0 => {
            Ok(Duration::from_millis(n.saturating_mul(millis_per_unit)))
        }
        _ => Err(format!(
            "'{text}' is not a duration such as 250ms, 1s, 1m or 1h"
        )),
    }
}

/// The shortest spelling of a duration in the config's own units, for messages.
pub fn format_duration_ms(ms: u64) -> String {
    match ms {
        0 => "0ms".into(),
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1000 == 0 => format!("{}s", ms / 1000),
        ms => format!("{ms}ms"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        for (text, ms) in [
            ("250ms", 250),
            ("1s", 1000),
            ("1m", 60_000),
            ("2h", 7_200_000),
        ] {
            assert_eq!(parse_duration(text), Ok(Duration::from_millis(ms)));
            assert_eq!(format_duration_ms(ms), text);
        }
        for bad in ["", "1", "s", "0s", "-1s", "1.5s", "1 s", "1d", "1sec"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_error_is_reported_once_with_its_line() {
        let dir = std::env::temp_dir().join(format!("turnpike-config-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("policies")).unwrap();
        std::fs::write(
            dir.join("turnpike.yaml"),
            "upstreams:\n  pool:\n    endpoints: [\"127.0.0.1:9001\"]\n    timeout: soon\n\
             agents:\n  - id: ag_one\n    upstream: pool\n    policy: broken\n  - id: ag_two\n    upstream: nowhere\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("policies/p.yaml"),
            "policies:\n  broken:\n    requests: {rate: 0, per: 1s}\n",
        )
        .unwrap();
        let errors = load(&dir.join("turnpike.yaml")).unwrap_err().0;
        let _ = std::fs::remove_dir_all(&dir);
        let found: Vec<(String, Option<(usize, usize)>)> =
            errors.iter().map(|e| (e.key.clone(), e.location)).collect();
        assert_eq!(
            found,
            vec![
                ("policies.broken.requests.rate".to_string(), Some((3, 16))),
                ("upstreams.pool.timeout".to_string(), Some((4, 5))),
                ("agents[1].upstream".to_string(), Some((10, 5))),
            ],
            "a broken pool or policy is one error, not one per reference"
        );
    }

    #[test]
    fn a_bucket_too_large_to_count_exactly_is_refused() {
        let compile = |per: &str, burst: u64| {
            let text = format!("requests: {{rate: 1, per: {per}, burst: {burst}}}");
            let spec: spec::PolicySpec = serde_yaml_ng::from_str(&text).unwrap();
            let mut errors = Vec::new();
            let mut report = Report {
                file: Path::new("p.yaml"),
                text: &text,
                errors: &mut errors,
            };
            let policy = compile_policy("p", spec, &mut report);
            (policy.is_some(), errors.len())
        };
        // 2^53 ms-tokens is the most: 3,474,999 tokens per 30 days fit, one more does not.
        assert_eq!(compile("720h", 3_474_999), (true, 0));
        assert_eq!(compile("720h", 3_475_000), (false, 1));
    }

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339("1970-01-01T00:01:00Z"), Some(60));
        assert_eq!(parse_rfc3339("1970-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(parse_rfc3339("tomorrow"), None);
    }
}
