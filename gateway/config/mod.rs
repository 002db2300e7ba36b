//! Configuration: the YAML file and policy directory an operator writes, validated all at
//! once and compiled into [`Runtime`], the read-only form the gateway runs on.
//!
//! - [`spec`]: the file formats, exactly as written.
//! - [`files`]: reading files and parsing their YAML, with the parser's positions.
//! - [`policy`] and `compile`: the formats compiled into runtime types, every problem reported.
//! - [`errors`] and `locate`: problems, each with its file, line, column and key path.
//! - [`validate`]: the rules for keys, shared with the admin API.

mod compile;
mod endpoint;
pub mod errors;
pub mod files;
mod https;
mod locate;
pub mod policy;
pub mod spec;
pub mod validate;

pub use errors::{ConfigError, ConfigErrors};
pub use files::Source;
pub use spec::{
    AgentsSpec, BalanceSpec as Balance, ExhaustionRule, FailMode, InvalidUsageRule, StoreKind,
};

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use turnpike_core::billing::Pricing;
use turnpike_core::keys::{KeyHash, KeyRecord};
use turnpike_core::limits::Policy;
use turnpike_core::route::PathTemplate;

use crate::lifecycle::Shutdown;
use crate::tls::{CaBundle, CertFiles};

use errors::Report;
use spec::ConfigFile;

/// The largest request body a call may carry: each call holds its body in memory until the
/// worker has it, so the bound keeps a burst of large calls from exhausting memory.
pub const MAX_BODY_BYTES_CEILING: usize = 16 * 1024 * 1024;

/// The largest request head a call may carry: Pingora's HTTP/1 parser refuses any head over
/// 1 MiB with a bare 400, so the gateway's own 431 must come first.
pub const MAX_HEADER_BYTES_CEILING: usize = 1024 * 1024 - 1;

/// Everything the gateway runs on, compiled from one config file and its policies.
#[derive(Debug)]
pub struct Runtime {
    pub sources: Sources,
    pub process: ProcessConfig,
    pub calls: CallConfig,
    /// The config file as parsed, for the next load to reuse.
    pub parsed: ParsedFile,
}

/// What a load keeps of its config file so the next load of the same text (a reload after a
/// policy edit) neither parses it nor compiles its keys again: for 100,000 keys those are
/// most of a reload's time. The keys are the ones in force, so this holds no second copy.
#[derive(Debug, Clone)]
pub struct ParsedFile {
    text_sha256: [u8; 32],
    /// The file as parsed, its keys left out.
    keyless: Arc<ConfigFile>,
    /// The file's fields the format has no place for.
    unknown_keys: Arc<Vec<String>>,
    keys: Arc<ConfigKeys>,
}

impl ParsedFile {
    /// Whether every policy the keys name is in `policies`: reused keys were validated
    /// against the policies of their own load.
    fn keys_fit(&self, policies: &policy::PolicySet) -> bool {
        self.keys
            .records()
            .all(|record| record.policy.is_empty() || policies.names.contains(&record.policy))
    }
}

/// The files a load read: what a reload reads again and the watcher watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sources {
    pub config: PathBuf,
    pub policies_dir: PathBuf,
}

/// How the process is set up: read once at start; a reload that changes them only warns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessConfig {
    /// The public API.
    pub listen: String,
    /// `/metrics`, `/healthz`, `/readyz`, `/admin/*`.
    pub admin_listen: String,
    pub threads: usize,
    pub store: StoreConfig,
    /// What SIGTERM's drain waits for (`shutdown_delay`, `shutdown_grace`).
    pub shutdown: Shutdown,
    /// The HTTPS listener, beside the plain one.
    pub tls: Option<TlsListenerConfig>,
    /// The admin listener's certificate, when it serves HTTPS.
    pub admin_tls: Option<CertFiles>,
}

/// `tls:`: where the HTTPS listener listens and what it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsListenerConfig {
    pub listen: String,
    pub files: CertFiles,
}

/// How a pool reaches its workers over HTTPS.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    /// Each endpoint's host as written (`https://NAME:port`), in `endpoints` order: sent as
    /// SNI and checked against its certificate.
    pub server_names: Vec<String>,
    /// `ca:`; `None`: the system's roots.
    pub ca: Option<CaBundle>,
    /// `verify: false` accepts any certificate.
    pub verify: bool,
    /// Tells apart connections made under different `ca:` bundles in the shared keep-alive
    /// pool (Pingora's reuse key has no CA of its own): a digest of the bundle.
    pub trust_key: u64,
}

/// What every call is judged and routed by; a reload replaces it whole.
#[derive(Debug)]
pub struct CallConfig {
    pub limits: Limits,
    /// SHA-256 of the admin bearer token; `None`: every `/admin/*` call is refused.
    pub admin_token: Option<KeyHash>,
    /// `metrics.per_key`: also count requests and tokens per key id (a series set per key).
    pub metrics_per_key: bool,
    /// `trusted_proxies`: the peers whose forwarding headers are believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub pools: BTreeMap<String, PoolConfig>,
    pub agents: HashMap<String, Arc<Agent>>,
    pub policies: HashMap<String, Arc<Policy>>,
    /// The file's keys: looked up by every instance in its own copy, never written to a
    /// shared store (only their revocations are).
    pub keys: Arc<ConfigKeys>,
    /// Each account's starting balance, given it where the store has no balance.
    pub accounts: Vec<AccountSeed>,
}

/// The config file's keys, by hash (a call's lookup) and by public id (the admin API's).
#[derive(Debug, Default)]
pub struct ConfigKeys {
    by_hash: HashMap<KeyHash, Arc<KeyRecord>>,
    by_id: HashMap<String, KeyHash>,
}

impl ConfigKeys {
    pub fn new(keys: Vec<(KeyHash, KeyRecord)>) -> Self {
        let mut by_hash = HashMap::with_capacity(keys.len());
        let mut by_id = HashMap::with_capacity(keys.len());
        for (hash, record) in keys {
            by_id.insert(record.id.clone(), hash);
            by_hash.insert(hash, Arc::new(record));
        }
        Self { by_hash, by_id }
    }

    pub fn get(&self, hash: &KeyHash) -> Option<&Arc<KeyRecord>> {
        self.by_hash.get(hash)
    }

    /// The key with this public id, and its hash.
    pub fn by_id(&self, id: &str) -> Option<(KeyHash, &Arc<KeyRecord>)> {
        let hash = self.by_id.get(id)?;
        Some((*hash, self.by_hash.get(hash)?))
    }

    pub fn records(&self) -> impl Iterator<Item = &Arc<KeyRecord>> {
        self.by_hash.values()
    }

    /// Whether a config key has this hash or this id: an admin-made key may take neither.
    pub fn claims(&self, hash: &KeyHash, id: &str) -> bool {
        self.by_hash.contains_key(hash) || self.by_id.contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_header_bytes: usize,
    pub max_response_bytes: usize,
    /// A client that reads none of its answer for this long is closed.
    pub write_timeout: Duration,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    pub kind: StoreKind,
    /// The Redis server, or the seed nodes of a Redis Cluster.
    pub urls: Vec<String>,
    /// `url` was a list: Redis Cluster, even with one seed node.
    pub cluster: bool,
    pub on_unavailable: FailMode,
    pub timeout: Duration,
    pub key_cache_ttl: Duration,
    /// How much longer than its pool's `timeout` a call's slots and reservation are leased,
    /// so a lease never runs out under a call that is still being settled.
    pub lease_grace: Duration,
    pub usage_stream_maxlen: u64,
    pub settlement_queue: usize,
    /// Where held settlements are journalled, resolved against the config file's directory.
    pub journal_dir: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub name: String,
    pub endpoints: Vec<SocketAddr>,
    pub balance: Balance,
    pub path: PathTemplate,
    pub connect_timeout: Duration,
    /// The whole JSON answer; for a stream, until its head.
    pub timeout: Duration,
    /// A stream: the longest wait for its next event.
    pub stream_idle_timeout: Duration,
    /// A stream: the longest it may run in all.
    pub max_stream: Duration,
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    pub on_invalid_usage: InvalidUsageRule,
    /// Set when the endpoints are `https://`.
    pub tls: Option<UpstreamTls>,
}

#[derive(Debug)]
pub struct Agent {
    pub id: String,
    /// The name of its upstream pool.
    pub pool: String,
    pub policy: Option<Arc<Policy>>,
    pub pricing: Option<Pricing>,
    pub on_exhaustion: ExhaustionRule,
}

/// An account as the config file declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountSeed {
    pub id: String,
    pub balance: i64,
}

/// Reads and validates `path` and the policy directory it names.
pub fn load(path: &Path) -> Result<Runtime, ConfigErrors> {
    load_with(path, None, None)
}

/// As [`load`], reusing `last`'s parse when the config text is the one it was parsed from.
pub fn load_reusing(path: &Path, last: Option<&ParsedFile>) -> Result<Runtime, ConfigErrors> {
    load_with(path, None, last)
}

/// Reads and validates `path` with the policies of `policies_dir` instead of its own.
pub fn load_with_policies(path: &Path, policies_dir: &Path) -> Result<Runtime, ConfigErrors> {
    load_with(path, Some(policies_dir), None)
}

/// Validates a config text and policy texts already in memory: what `load` does after
/// reading the files.
pub fn parse(config: &Source, policies: &[Source]) -> Result<Runtime, ConfigErrors> {
    let (file, unknown) = files::parse_yaml_and_unknown_keys(config).map_err(ConfigErrors::one)?;
    let policies_dir = own_policies_dir(&config.path, &file);
    let parse = Parse::Fresh(Box::new(file), unknown);
    let text_sha256 = KeyHash::of(&config.text).0;
    build(
        config,
        text_sha256,
        parse,
        policies_dir,
        policies,
        Vec::new(),
    )
}

/// A config file read for a load: parsed now, or the same text as the last load's.
enum Parse {
    Fresh(Box<ConfigFile>, Vec<String>),
    Same(ParsedFile),
}

fn load_with(
    path: &Path,
    policies_dir: Option<&Path>,
    last: Option<&ParsedFile>,
) -> Result<Runtime, ConfigErrors> {
    let source = Source::read(path).map_err(ConfigErrors::one)?;
    let text_sha256 = KeyHash::of(&source.text).0;
    let parse = match last.filter(|last| last.text_sha256 == text_sha256) {
        Some(last) => Parse::Same(last.clone()),
        None => {
            let (file, unknown) =
                files::parse_yaml_and_unknown_keys(&source).map_err(ConfigErrors::one)?;
            Parse::Fresh(Box::new(file), unknown)
        }
    };
    let policies_dir = match (policies_dir, &parse) {
        (Some(dir), _) => dir.to_path_buf(),
        (None, Parse::Fresh(file, _)) => own_policies_dir(path, file),
        (None, Parse::Same(last)) => own_policies_dir(path, &last.keyless),
    };
    let (policies, errors) = files::read_policy_dir(&policies_dir);
    build(&source, text_sha256, parse, policies_dir, &policies, errors)
}

/// `policies_dir`, relative to the config file.
fn own_policies_dir(config: &Path, file: &ConfigFile) -> PathBuf {
    config
        .parent()
        .unwrap_or(Path::new("."))
        .join(&file.policies_dir)
}

/// Compiles the file and its policies; the file's fields the format has no place for are
/// reported with everything else found wrong.
fn build(
    source: &Source,
    text_sha256: [u8; 32],
    parse: Parse,
    policies_dir: PathBuf,
    policy_files: &[Source],
    mut errors: Vec<ConfigError>,
) -> Result<Runtime, ConfigErrors> {
    let policies = policy::compile_files(policy_files, &mut errors);
    // The last load's keys, while every policy they name is still there; else the text is
    // parsed again, so a key naming a policy that went is reported at its line.
    let (mut file, unknown, compiled_keys) = match parse {
        Parse::Same(last) if last.keys_fit(&policies) => (
            ConfigFile::clone(&last.keyless),
            last.unknown_keys,
            Some(last.keys),
        ),
        Parse::Same(_) => {
            let (file, unknown) =
                files::parse_yaml_and_unknown_keys(source).map_err(ConfigErrors::one)?;
            (file, Arc::new(unknown), None)
        }
        Parse::Fresh(file, unknown) => (*file, Arc::new(unknown), None),
    };
    let mut report = Report::new(&source.path, &source.text, &mut errors);
    for key in unknown.iter() {
        report.error(key.as_str(), "unknown field");
    }
    let key_specs = std::mem::take(&mut file.keys);
    let keyless = Arc::new(file.clone());
    file.keys = key_specs;
    let (process, calls) = compile::compile(file, policies, compiled_keys, &mut report);
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    let parsed = ParsedFile {
        text_sha256,
        keyless,
        unknown_keys: unknown,
        keys: Arc::clone(&calls.keys),
    };
    Ok(Runtime {
        sources: Sources {
            config: source.path.clone(),
            policies_dir,
        },
        process,
        calls,
        parsed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "upstreams:\n  pool:\n    endpoints: [\"127.0.0.1:9001\"]\n    timeout: soon\n\
         agents:\n  - id: ag_one\n    upstream: pool\n    policy: broken\n  - id: ag_two\n    upstream: nowhere\n";

    #[test]
    fn every_error_is_reported_once_with_its_line() {
        let errors = parse(
            &Source::new("turnpike.yaml", CONFIG),
            &[Source::new(
                "policies/p.yaml",
                "policies:\n  broken:\n    requests: {rate: 0, per: 1s}\n",
            )],
        )
        .unwrap_err()
        .0;
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
    fn a_pool_cannot_set_a_header_that_frames_the_request() {
        let config = "upstreams:\n  pool:\n    endpoints: [\"127.0.0.1:9001\"]\n    \
             headers: {Content-Length: \"5\", Transfer-Encoding: chunked, Connection: close, \
             X-Upstream-Token: t}\nagents:\n  - {id: ag_one, upstream: pool}\n";
        let errors = parse(&Source::new("turnpike.yaml", config), &[])
            .unwrap_err()
            .0;
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "upstreams.pool.headers.Connection",
                "upstreams.pool.headers.Content-Length",
                "upstreams.pool.headers.Transfer-Encoding",
            ]
        );
        assert!(errors[0].message.contains("framing"), "{:?}", errors[0]);
    }

    #[test]
    fn a_file_wrong_everywhere_lists_every_error_and_places_the_first_ones() {
        let mut config =
            String::from("upstreams:\n  pool: {endpoints: [\"127.0.0.1:9001\"]}\nagents:\n");
        for i in 0..1000 {
            config.push_str(&format!("  - {{id: ag_{i}, upstream: nowhere}}\n"));
        }
        let errors = parse(&Source::new("turnpike.yaml", &config), &[])
            .unwrap_err()
            .0;
        assert_eq!(errors.len(), 1000, "every error listed");
        assert_eq!(errors[0].location, Some((4, 16)));
        assert_eq!(errors[199].location, Some((203, 18)));
        // Placing each of thousands would walk the file thousands of times.
        assert_eq!(errors[200].key, "agents[200].upstream");
        assert_eq!(errors[200].location, None);
    }
    #[test]
    fn a_load_of_the_same_text_reuses_the_last_ones_keys_while_their_policies_last() {
        let dir = std::env::temp_dir().join(format!("turnpike-reuse-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("policies")).unwrap();
        let config = dir.join("turnpike.yaml");
        let text = "upstreams:\n  pool: {endpoints: [\"127.0.0.1:9001\"]}\n\
            agents:\n  - {id: ag_one, upstream: pool}\naccounts:\n  - {id: acct_a, balance: 5}\n\
            keys:\n  - {id: key_a, sha256: \"c7b8b1e1d1e9f3a6a6f4b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2\", account: acct_a, agents: \"*\", policy: p}\n";
        std::fs::write(&config, text).unwrap();
        let policies = dir.join("policies/p.yaml");
        std::fs::write(&policies, "policies:\n  p: {concurrency: 2}\n").unwrap();
        let first = load(&config).unwrap();

        // A policy edit: the same keys, not compiled again.
        std::fs::write(&policies, "policies:\n  p: {concurrency: 3}\n").unwrap();
        let second = load_reusing(&config, Some(&first.parsed)).unwrap();
        assert!(Arc::ptr_eq(&second.calls.keys, &first.calls.keys));
        assert_eq!(second.calls.policies["p"].concurrency, Some(3));

        // The policy a key names is gone: the text is read again and the key's line named.
        std::fs::write(&policies, "policies:\n  q: {concurrency: 3}\n").unwrap();
        let errors = load_reusing(&config, Some(&second.parsed)).unwrap_err().0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].key, "keys[0].policy");
        assert_eq!(
            errors[0].location,
            Some((8, 1 + text.lines().nth(7).unwrap().find("policy").unwrap()))
        );

        // A changed text is parsed and compiled anew.
        std::fs::write(&policies, "policies:\n  p: {concurrency: 2}\n").unwrap();
        std::fs::write(&config, text.replace("balance: 5", "balance: 6")).unwrap();
        let third = load_reusing(&config, Some(&second.parsed)).unwrap();
        assert!(!Arc::ptr_eq(&third.calls.keys, &first.calls.keys));
        assert_eq!(third.calls.accounts[0].balance, 6);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_valid_text_compiles_apart_from_its_files() {
        let config =
            "listen: \"127.0.0.1:8080\"\nupstreams:\n  pool: {endpoints: [\"127.0.0.1:9001\"]}\n\
            agents:\n  - {id: ag_one, upstream: pool, policy: p}\n";
        let runtime = parse(
            &Source::new("/etc/turnpike/turnpike.yaml", config),
            &[Source::new("p.yaml", "policies:\n  p: {concurrency: 2}\n")],
        )
        .unwrap();
        assert_eq!(runtime.process.listen, "127.0.0.1:8080");
        assert_eq!(
            runtime.sources.policies_dir,
            Path::new("/etc/turnpike/policies")
        );
        let agent = &runtime.calls.agents["ag_one"];
        assert_eq!(agent.policy.as_ref().unwrap().concurrency, Some(2));
    }

    /// A valid config, line by line, for the properties below to break.
    const VALID: &str = concat!(
        "listen: \"127.0.0.1:8080\"\n",
        "limits:\n",
        "  max_body_bytes: 1024\n",
        "  header_timeout: 2s\n",
        "upstreams:\n",
        "  pool:\n",
        "    endpoints: [\"127.0.0.1:9001\"]\n",
        "    timeout: 3s\n",
        "    on_invalid_usage: reject\n",
        "agents:\n",
        "  - id: ag_one\n",
        "    upstream: pool\n",
        "    pricing: {input_per_mtok: 1, output_per_mtok: 2}\n",
        "accounts:\n",
        "  - {id: acct_a, balance: 10}\n",
        "keys:\n",
        "  - id: key_a\n",
        "    sha256: \"c7b8b1e1d1e9f3a6a6f4b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2\"\n",
        "    account: acct_a\n",
        "    agents: \"*\"\n",
    );

    fn load_text(text: &str) -> Result<Runtime, ConfigErrors> {
        parse(&Source::new("turnpike.yaml", text), &[])
    }

    #[test]
    fn the_valid_config_loads() {
        load_text(VALID).unwrap();
    }

    proptest::proptest! {
        /// No text panics the loader, and a refusal always says what is wrong.
        #[test]
        fn no_text_panics_the_loader(text in "[ -~\n\t]{0,300}") {
            if let Err(errors) = load_text(&text) {
                proptest::prop_assert!(!errors.0.is_empty());
                proptest::prop_assert!(errors.0.iter().all(|e| !e.message.is_empty()));
            }
        }

        /// A valid file with one line cut short, doubled, dropped or with a byte changed never
        /// panics the loader; a refusal names at least one problem.
        #[test]
        fn a_broken_line_never_panics_the_loader(
            line in 0usize..20,
            how in 0u8..4,
            at in 0usize..40,
            byte in proptest::prelude::any::<u8>(),
        ) {
            let mut lines: Vec<String> = VALID.lines().map(str::to_owned).collect();
            let line = line % lines.len();
            match how {
                0 => {
                    let keep = at.min(lines[line].len());
                    lines[line].truncate(keep)
                }
                1 => { let copy = lines[line].clone(); lines.insert(line, copy) }
                2 => { lines.remove(line); }
                _ => {
                    let mut bytes = lines[line].clone().into_bytes();
                    if !bytes.is_empty() {
                        let at = at % bytes.len();
                        bytes[at] = byte;
                    }
                    lines[line] = String::from_utf8_lossy(&bytes).into_owned();
                }
            }
            if let Err(errors) = load_text(&lines.join("\n")) {
                proptest::prop_assert!(!errors.0.is_empty());
            }
        }
    }
}
