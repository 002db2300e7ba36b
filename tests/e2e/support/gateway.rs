//! `TestGateway`: writes a config per SPEC §3 into a temp dir, runs `turnpike serve` on free
//! loopback ports, waits for `/readyz`, and kills the process when dropped.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub use super::builder::GatewayBuilder;
use super::redis::Backing;
use super::{free_port, random_hex};

/// The turnpike binary Cargo built for these tests.
pub const BINARY: &str = env!("CARGO_BIN_EXE_turnpike");

/// Starting balance of both accounts unless a test says otherwise.
pub const DEFAULT_BALANCE: i64 = 10_000_000;

/// A temp dir removed on drop, kept (and printed) when the test failed.
pub struct TempDir(PathBuf);

impl TempDir {
    pub(super) fn new() -> TempDir {
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
    /// Set when the admin listener serves HTTPS: the CA its certificate chains to, so the
    /// readiness probe can reach it.
    pub admin_ca_pem: Option<String>,
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
            admin_ca_pem: self.admin_ca_pem.clone(),
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
    pub(super) http: ureq::Agent,
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

    pub(super) fn log_tail(&self) -> String {
        let log = self.log();
        let start = log.len().saturating_sub(3000);
        let start = (start..log.len())
            .find(|i| log.is_char_boundary(*i))
            .unwrap_or(log.len());
        log[start..].to_string()
    }

    /// Kills the gateway (SIGKILL: nothing of its own shutdown runs).
    pub fn kill(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the gateway if it runs, and starts it again on the same files and ports.
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
            let ready = match &self.files.admin_ca_pem {
                Some(ca) => super::tls::https_status(self.admin_port(), ca, "/readyz") == Some(200),
                None => probe
                    .get(self.admin_url("/readyz"))
                    .call()
                    .map(|r| r.status().as_u16() == 200)
                    .unwrap_or(false),
            };
            if ready && std::net::TcpStream::connect(("127.0.0.1", self.port())).is_ok() {
                return;
            }
            if Instant::now() > deadline {
                panic!("gateway not ready after 20 s; log:\n{}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
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
