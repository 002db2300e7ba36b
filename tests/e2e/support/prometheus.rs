//! A real Prometheus server (Debian's `prometheus`; scripts/test installs it) on a free port,
//! scraping one gateway's admin listener every second and evaluating the shipped alert rules.

use serde_json::Value;
use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::gateway::TempDir;
use super::{free_port, wait_until};

pub struct Prometheus {
    port: u16,
    child: Child,
    http: ureq::Agent,
    _dir: TempDir,
}

impl Prometheus {
    /// Starts scraping `127.0.0.1:admin_port` as job `turnpike`, with the rules in `rules`.
    pub fn scraping(admin_port: u16, rules: &Path) -> Prometheus {
        let dir = TempDir::new();
        let port = free_port();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: turnpike\n    static_configs:\n      - targets: ['127.0.0.1:{admin_port}']\n",
            rules.display()
        );
        let config_path = dir.path().join("prometheus.yml");
        fs::write(&config_path, config).unwrap();
        let log = fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus (Debian's `prometheus` package; scripts/test installs it)");
        let http: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let prometheus = Prometheus {
            port,
            child,
            http,
            _dir: dir,
        };
        wait_until(Duration::from_secs(30), "Prometheus is ready", || {
            prometheus
                .http
                .get(format!("http://127.0.0.1:{port}/-/ready"))
                .call()
                .is_ok_and(|r| r.status() == 200)
        });
        prometheus
    }

    /// `GET /api/v1/<path>`, as JSON; panics unless Prometheus answered `success`.
    pub fn api(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let mut request = self
            .http
            .get(format!("http://127.0.0.1:{}/api/v1/{path}", self.port));
        for (k, v) in query {
            request = request.query(*k, *v);
        }
        let mut reply = request
            .call()
            .unwrap_or_else(|e| panic!("Prometheus {path}: {e}"));
        let body: Value = reply.body_mut().read_json().unwrap();
        assert_eq!(body["status"], "success", "{path} {query:?}: {body}");
        body["data"].clone()
    }

    /// An instant query's result vector (or scalar, as a one-element list).
    pub fn query(&self, expr: &str) -> Vec<Value> {
        let data = self.api("query", &[("query", expr)]);
        match data["resultType"].as_str() {
            Some("vector") | Some("matrix") => data["result"].as_array().cloned().unwrap(),
            _ => vec![data["result"].clone()],
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
