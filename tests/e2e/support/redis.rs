//! Redis servers the tests own: a `redis-server` (or a three-master Cluster) on free loopback
//! ports with its files in a temp dir, killed on drop. Never the shared server on 6379.
//!
//! Which store the behaviour tests run on comes from `TURNPIKE_TEST_STORE`: `memory`
//! (default), `redis` or `cluster`; `scripts/test` runs the suite once per store.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{free_port, random_hex, wait_until};

/// The store the behaviour tests run against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreUnderTest {
    Memory,
    Redis,
    Cluster,
}

impl StoreUnderTest {
    pub fn from_env() -> Self {
        match std::env::var("TURNPIKE_TEST_STORE").as_deref() {
            Ok("redis") => StoreUnderTest::Redis,
            Ok("cluster") => StoreUnderTest::Cluster,
            Ok("memory") | Err(_) => StoreUnderTest::Memory,
            Ok(other) => panic!("TURNPIKE_TEST_STORE={other}: expected memory, redis or cluster"),
        }
    }
}

/// One `redis-server` process, persisting every write to its append-only file so that a
/// restart keeps its data, as a production deployment would.
pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    extra: Vec<String>,
    child: Mutex<Option<Child>>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// With extra `redis-server` arguments (e.g. `--cluster-enabled yes`).
    pub fn start_with(extra: &[&str]) -> RedisServer {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!(
            "turnpike-redis-{}-{port}-{}",
            std::process::id(),
            random_hex(4)
        ));
        fs::create_dir_all(&dir).unwrap();
        let server = RedisServer {
            port,
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: Mutex::new(None),
        };
        server.spawn();
        server
    }

    fn spawn(&self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .args(["--maxmemory-policy", "noeviction"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (scripts/test installs it)");
        *self.child.lock().unwrap() = Some(child);
        wait_until(
            Duration::from_secs(10),
            &format!("redis-server on {} answers", self.port),
            || self.try_cli(&["PING"]).is_some_and(|r| r == "PONG"),
        );
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn try_cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "--no-raw"])
            .args(args)
            .output()
            .ok()?;
        out.status.success().then(|| {
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .trim_matches('"')
                .to_string()
        })
    }

    /// Runs `redis-cli` against this server and returns what it printed.
    pub fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args)
            .unwrap_or_else(|| panic!("redis-cli -p {} {args:?} failed", self.port))
    }

    /// How many times this server has run command `name` (`calls=N` of its
    /// `cmdstat_<name>` line in `INFO commandstats`; 0 when it never ran).
    pub fn command_calls(&self, name: &str) -> u64 {
        self.cli(&["INFO", "commandstats"])
            .lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{name}:calls=")))
            .and_then(|rest| rest.split(',').next()?.parse().ok())
            .unwrap_or(0)
    }

    /// Kills the server (its data stays on disk).
    pub fn stop(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port with the same data.
    pub fn restart(&self) {
        self.stop();
        self.spawn();
    }

    /// Starts it again on the same port with nothing: its files are gone, as after a restart
    /// of a Redis that does not persist.
    pub fn restart_empty(&self) {
        self.stop();
        for entry in fs::read_dir(&self.dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                fs::remove_dir_all(&path).unwrap();
            } else {
                fs::remove_file(&path).unwrap();
            }
        }
        self.spawn();
    }

    /// `kill -STOP` / `kill -CONT`: a server that holds connections open and answers nothing.
    pub fn signal(&self, name: &str) {
        let pid = self.child.lock().unwrap().as_ref().expect("running").id();
        let ok = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name} redis-server");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.lock().unwrap().as_ref() {
            // A stopped server would ignore the kill until continued.
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(child.id().to_string())
                .status();
        }
        self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of three masters, no replicas.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                let bus = free_port().to_string();
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    &bus,
                    "--cluster-node-timeout",
                    "2000",
                ])
            })
            .collect();
        let addrs: Vec<String> = nodes.iter().map(RedisServer::addr).collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run redis-cli --cluster create");
        assert!(created.success(), "redis-cli --cluster create failed");
        let deadline = Instant::now() + Duration::from_secs(20);
        for node in &nodes {
            while !node.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok") {
                assert!(Instant::now() < deadline, "cluster never reached state ok");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        RedisCluster { nodes }
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }
}

/// What a test gateway's store runs on; dropped with the gateway's files.
pub enum Backing {
    Server(RedisServer),
    Cluster(RedisCluster),
}

impl Backing {
    /// A fresh backing for `store`, or `None` for the embedded store.
    pub fn for_store(store: StoreUnderTest) -> Option<Backing> {
        match store {
            StoreUnderTest::Memory => None,
            StoreUnderTest::Redis => Some(Backing::Server(RedisServer::start())),
            StoreUnderTest::Cluster => Some(Backing::Cluster(RedisCluster::start())),
        }
    }

    /// The `store.url` value: one URL, or the list that selects Cluster mode.
    pub fn url_value(&self) -> serde_json::Value {
        match self {
            Backing::Server(server) => serde_json::json!(server.url()),
            Backing::Cluster(cluster) => serde_json::json!(cluster.urls()),
        }
    }
}
