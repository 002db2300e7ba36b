//! The config file's sections compiled into the types the gateway runs on. Every problem
//! is reported, each once: a name whose definition is broken still counts as defined, so
//! what refers to it is not reported as well.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use turnpike_core::billing::Pricing;
use turnpike_core::ids::is_agent_id;
use turnpike_core::keys::{KeyHash, KeyRecord};
use turnpike_core::route::PathTemplate;
use turnpike_core::units::parse_duration;

use crate::lifecycle::Shutdown;
use crate::tls::CertFiles;

use super::endpoint::{parse_endpoint, Endpoint};
use super::errors::Report;
use super::files::beside_config;
use super::https::compile_upstream_tls;
use super::policy::PolicySet;
use super::spec::{
    AccountSpec, AgentSpec, ConfigFile, InvalidUsageRule, KeySpec, LimitsSpec, OneOrMany,
    StoreSpec, TlsSpec, UpstreamSpec,
};
use super::validate;
use super::{
    AccountSeed, Agent, CallConfig, ConfigKeys, Limits, PoolConfig, ProcessConfig, StoreConfig,
    StoreKind, TlsListenerConfig, MAX_BODY_BYTES_CEILING, MAX_HEADER_BYTES_CEILING,
};

/// Headers a pool may not set for its workers: the gateway frames each request itself (one
/// write of head and body, `Content-Length` exact) and owns the connection, so a pool's
/// `Content-Length` or `Connection` would make the worker read the body or the connection
/// otherwise than it was sent.
const FRAMING_HEADERS: [&str; 9] = [
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "expect",
];

/// Compiles the whole file against the policies already compiled from its directory;
/// `compiled_keys`, when given, are the file's keys as a load of the same text compiled them.
pub fn compile(
    file: ConfigFile,
    policies: PolicySet,
    compiled_keys: Option<Arc<ConfigKeys>>,
    report: &mut Report,
) -> (ProcessConfig, CallConfig) {
    check_addr(report, "listen", &file.listen);
    check_addr(report, "admin.listen", &file.admin.listen);
    let tls = file
        .tls
        .as_ref()
        .and_then(|spec| compile_tls_listener(spec, &file.listen, &file.admin.listen, report));
    let admin_tls = file
        .admin
        .tls
        .as_ref()
        .map(|spec| compile_cert(&spec.cert, &spec.key, report));
    let limits = compile_limits(&file.limits, report);
    let trusted_proxies = compile_trusted_proxies(&file.trusted_proxies, report);
    let admin_token = file.admin.token_sha256.as_deref().and_then(|hex_digits| {
        let hash = KeyHash::from_hex(hex_digits);
        if hash.is_none() {
            report.error(
                "admin.token_sha256",
                "must be 64 hex digits (the SHA-256 of the admin token)",
            );
        }
        hash
    });
    let store = compile_store(file.store, report);
    let shutdown = compile_shutdown(&file.shutdown_grace, &file.shutdown_delay, report);
    let pool_rules: HashMap<String, InvalidUsageRule> = file
        .upstreams
        .iter()
        .map(|(name, spec)| (name.clone(), spec.on_invalid_usage))
        .collect();
    let pools: BTreeMap<String, PoolConfig> = file
        .upstreams
        .into_iter()
        .filter_map(|(name, spec)| compile_pool(&name, spec, report).map(|p| (name, p)))
        .collect();
    let agents = compile_agents(file.agents, &pool_rules, &policies, report);
    let accounts = compile_accounts(file.accounts, report);
    let keys = compiled_keys.unwrap_or_else(|| {
        Arc::new(ConfigKeys::new(compile_keys(
            file.keys, &agents, &accounts, &policies, report,
        )))
    });
    let process = ProcessConfig {
        listen: file.listen,
        admin_listen: file.admin.listen,
        threads: file
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        store,
        shutdown,
        tls,
        admin_tls,
    };
    let calls = CallConfig {
        limits,
        admin_token,
        metrics_per_key: file.metrics.per_key,
        trusted_proxies,
        pools,
        agents,
        policies: policies.policies,
        keys,
        accounts,
    };
    (process, calls)
}

fn check_addr(report: &mut Report, key: &str, addr: &str) {
    if addr.parse::<SocketAddr>().is_err() {
        report.error(
            key,
            format!("'{addr}' is not an address such as 0.0.0.0:8080"),
        );
    }
}

fn compile_tls_listener(
    spec: &TlsSpec,
    listen: &str,
    admin_listen: &str,
    report: &mut Report,
) -> Option<TlsListenerConfig> {
    check_addr(report, "tls.listen", &spec.listen);
    if spec.listen == listen || spec.listen == admin_listen {
        report.error(
            "tls.listen",
            format!(
                "'{}' is already the plain or the admin listener",
                spec.listen
            ),
        );
    }
    let files = compile_cert(&spec.cert, &spec.key, report);
    Some(TlsListenerConfig {
        listen: spec.listen.clone(),
        files,
    })
}

/// The pair's paths. They are loaded and checked by `check` and at start, not here: a reload
/// cannot change a listener (it warns), and must not be refused for a pair caught halfway
/// through a rotation.
fn compile_cert(cert: &str, key: &str, report: &Report) -> CertFiles {
    CertFiles {
        cert: beside_config(report, cert),
        key: beside_config(report, key),
    }
}

fn compile_shutdown(grace: &str, delay: &str, report: &mut Report) -> Shutdown {
    // Zero means something here (no delay, no grace), unlike the durations elsewhere.
    let mut duration = |key: &str, text: &str| match text {
        "0" | "0s" | "0ms" => Duration::ZERO,
        text => parse_duration(text).unwrap_or_else(|m| {
            report.error(key, m);
            Duration::ZERO
        }),
    };
    Shutdown {
        grace: duration("shutdown_grace", grace),
        delay: duration("shutdown_delay", delay),
    }
}

fn compile_limits(spec: &LimitsSpec, report: &mut Report) -> Limits {
    if spec.max_body_bytes == 0 || spec.max_body_bytes > MAX_BODY_BYTES_CEILING {
        report.error(
            "limits.max_body_bytes",
            format!("must be between 1 and {MAX_BODY_BYTES_CEILING}"),
        );
    }
    if spec.max_header_bytes == 0 || spec.max_header_bytes > MAX_HEADER_BYTES_CEILING {
        report.error(
            "limits.max_header_bytes",
            format!("must be between 1 and {MAX_HEADER_BYTES_CEILING}"),
        );
    }
    if spec.max_response_bytes == 0 {
        report.error("limits.max_response_bytes", "must be a positive integer");
    }
    let mut timeout = |field: &str, text: &str| match parse_duration(text) {
        Ok(d) if !d.is_zero() => d,
        Ok(_) => {
            report.error(format!("limits.{field}"), "must be longer than zero");
            Duration::ZERO
        }
        Err(m) => {
            report.error(format!("limits.{field}"), m);
            Duration::ZERO
        }
    };
    Limits {
        max_body_bytes: spec.max_body_bytes,
        max_header_bytes: spec.max_header_bytes,
        max_response_bytes: spec.max_response_bytes,
        write_timeout: timeout("write_timeout", &spec.write_timeout),
        header_timeout: timeout("header_timeout", &spec.header_timeout),
        body_timeout: timeout("body_timeout", &spec.body_timeout),
    }
}

/// `trusted_proxies`: each an address or a CIDR block (`10.0.0.0/8`, `2001:db8::/32`).
fn compile_trusted_proxies(specs: &[String], report: &mut Report) -> Vec<ipnet::IpNet> {
    specs
        .iter()
        .enumerate()
        .filter_map(|(i, text)| {
            let net = text
                .parse::<ipnet::IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
            net.map_err(|_| {
                report.error(
                    format!("trusted_proxies[{i}]"),
                    format!("'{text}' is not an address or a CIDR block such as 10.0.0.0/8"),
                )
            })
            .ok()
        })
        .collect()
}

/// Long enough for a busy Redis on a loaded machine; with one resend of a lost answer, a call
/// waits at most twice this before the store counts as unavailable.
const DEFAULT_STORE_TIMEOUT_MS: u64 = 250;
const DEFAULT_LEASE_GRACE_MS: u64 = 60_000;

fn compile_store(spec: StoreSpec, report: &mut Report) -> StoreConfig {
    let (urls, cluster) = match spec.url {
        None => (Vec::new(), false),
        Some(OneOrMany::One(url)) => (vec![url], false),
        Some(OneOrMany::Many(urls)) => (urls, true),
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
    let timeout = duration("timeout", spec.timeout, DEFAULT_STORE_TIMEOUT_MS);
    let key_cache_ttl = duration("key_cache_ttl", spec.key_cache_ttl, 1000);
    let lease_grace = duration("lease_grace", spec.lease_grace, DEFAULT_LEASE_GRACE_MS);
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
        lease_grace,
        usage_stream_maxlen: spec.usage_stream_maxlen.unwrap_or(1_000_000),
        settlement_queue: spec.settlement_queue.unwrap_or(100_000),
        journal_dir: spec.journal_dir.map(|dir| beside_config(report, &dir)),
    }
}

fn compile_pool(name: &str, spec: UpstreamSpec, report: &mut Report) -> Option<PoolConfig> {
    let key = format!("upstreams.{name}");
    let before = report.count();
    if spec.endpoints.is_empty() {
        report.error(format!("{key}.endpoints"), "needs at least one endpoint");
    }
    let parsed: Vec<Endpoint> = spec
        .endpoints
        .iter()
        .enumerate()
        .filter_map(|(i, text)| {
            parse_endpoint(text)
                .map_err(|m| report.error(format!("{key}.endpoints[{i}]"), m))
                .ok()
        })
        .collect();
    let endpoints: Vec<SocketAddr> = parsed.iter().map(|e| e.addr).collect();
    let tls = compile_upstream_tls(&key, &spec, &parsed, report);
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
    let stream_idle_timeout = duration("stream_idle_timeout", &spec.stream_idle_timeout);
    let max_stream = duration("max_stream", &spec.max_stream);
    let mut headers = Vec::new();
    for (header, value) in &spec.headers {
        match (
            http::HeaderName::try_from(header.as_str()),
            http::HeaderValue::try_from(value.as_str()),
        ) {
            (Ok(n), _) if FRAMING_HEADERS.contains(&n.as_str()) => report.error(
                format!("{key}.headers.{header}"),
                "describes the connection or the body's framing, which the gateway sets itself",
            ),
            (Ok(n), Ok(v)) => headers.push((n, v)),
            _ => report.error(
                format!("{key}.headers.{header}"),
                "not a valid HTTP header name and value",
            ),
        }
    }
    if report.count() != before {
        return None;
    }
    Some(PoolConfig {
        name: name.to_owned(),
        endpoints,
        balance: spec.balance,
        path: path?,
        connect_timeout: connect_timeout?,
        timeout: timeout?,
        stream_idle_timeout: stream_idle_timeout?,
        max_stream: max_stream?,
        headers,
        on_invalid_usage: spec.on_invalid_usage,
        tls,
    })
}

/// `pool_rules`: each pool's `on_invalid_usage`, by name.
fn compile_agents(
    specs: Vec<AgentSpec>,
    pool_rules: &HashMap<String, InvalidUsageRule>,
    policies: &PolicySet,
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
        let rule = pool_rules.get(&spec.upstream);
        if rule.is_none() {
            report.error(
                format!("{key}.upstream"),
                format!("no upstream named '{}'", spec.upstream),
            );
        }
        let policy = spec.policy.as_ref().and_then(|name| {
            if !policies.names.contains(name) {
                report.error(format!("{key}.policy"), format!("no policy named '{name}'"));
            }
            policies.policies.get(name).cloned()
        });
        if let Some(pricing) = &spec.pricing {
            if pricing.reserve < 0 {
                report.error(format!("{key}.pricing.reserve"), "must not be negative");
            }
            // Invalid usage charged the reservation must cost something (SPEC §2).
            if pricing.reserve == 0 && rule == Some(&InvalidUsageRule::ChargeReserve) {
                report.error(
                    format!("{key}.pricing.reserve"),
                    format!(
                        "must be positive: upstream '{}' has on_invalid_usage: charge_reserve, which would make an invalid usage free",
                        spec.upstream
                    ),
                );
            }
        }
        let agent = Agent {
            id: spec.id.clone(),
            pool: spec.upstream,
            policy,
            on_exhaustion: spec.on_exhaustion,
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

fn compile_accounts(specs: Vec<AccountSpec>, report: &mut Report) -> Vec<AccountSeed> {
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
    specs: Vec<KeySpec>,
    agents: &HashMap<String, Arc<Agent>>,
    accounts: &[AccountSeed],
    policies: &PolicySet,
    report: &mut Report,
) -> Vec<(KeyHash, KeyRecord)> {
    let account_ids: HashSet<&str> = accounts.iter().map(|a| a.id.as_str()).collect();
    let mut ids = HashSet::new();
    let mut hashes = HashSet::new();
    let mut keys = Vec::with_capacity(specs.len());
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
        if !account_ids.contains(spec.account.as_str()) {
            report.error(
                format!("{key}.account"),
                validate::KeyProblem::UnknownAccount(spec.account.clone()),
            );
        }
        let (scope, unknown) = validate::agent_scope(spec.agents, |a| agents.contains_key(a));
        for (at, problem) in unknown {
            let field = match at {
                Some(j) => format!("{key}.agents[{j}]"),
                None => format!("{key}.agents"),
            };
            report.error(field, problem);
        }
        // A config key may name no policy: it is then not rate limited.
        let policy = spec.policy.unwrap_or_default();
        if !policy.is_empty() {
            if let Err(problem) = validate::policy(&policy, |n| policies.names.contains(n)) {
                report.error(format!("{key}.policy"), problem);
            }
        }
        let expires_at = spec.expires_at.as_deref().and_then(|text| {
            validate::expires_at(text)
                .map_err(|problem| report.error(format!("{key}.expires_at"), problem))
                .ok()
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
