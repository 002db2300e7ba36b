//! `turnpike check` on the fixtures under `tests/fixtures/`: one directory per kind of
//! mistake, each with a config, its policy files and `expected.txt`, the exact errors (file,
//! line, column, key path, message) check must print, one per line, and nothing else. The
//! fixture `valid` has none and must pass.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::gateway::BINARY;

/// The config fixtures: every directory of `tests/fixtures` with a `turnpike.yaml` (`http/`
/// is the raw HTTP corpus).
fn fixtures() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("tests/fixtures")
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("turnpike.yaml").is_file())
        .collect();
    dirs.sort();
    dirs
}

#[test]
fn each_fixture_gives_exactly_its_errors() {
    let dirs = fixtures();
    assert!(dirs.len() >= 15, "fixtures missing: {dirs:?}");
    for dir in dirs {
        let expected = std::fs::read_to_string(dir.join("expected.txt")).unwrap();
        let expected: Vec<&str> = expected.lines().filter(|l| !l.is_empty()).collect();
        let out = Command::new(BINARY)
            .arg("check")
            .arg("--config")
            .arg(dir.join("turnpike.yaml"))
            .output()
            .unwrap();
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let name = dir.file_name().unwrap().to_string_lossy();
        if expected.is_empty() {
            assert!(out.status.success(), "{name}: check failed:\n{printed}");
            continue;
        }
        assert_eq!(out.status.code(), Some(1), "{name}: {printed}");
        let prefix = format!("{}/", dir.display());
        let errors: Vec<&str> = printed
            .lines()
            .filter(|l| !l.ends_with("error(s)"))
            .map(|l| l.strip_prefix(&prefix).unwrap_or(l))
            .collect();
        assert_eq!(errors, expected, "{name}");
        assert!(
            printed.contains(&format!("{} error(s)", expected.len())),
            "{name}: {printed}"
        );
    }
}

#[test]
fn check_shows_what_a_proposed_policy_directory_would_change_on_the_running_gateway() {
    let gw = crate::support::TestGateway::builder()
        .endpoint("127.0.0.1:9")
        .policy(
            "legacy",
            serde_json::json!({"requests": {"rate": 5, "per": "1s"}}),
        )
        .start();
    let proposed = gw.files.dir.path().join("proposed");
    std::fs::create_dir_all(&proposed).unwrap();
    std::fs::write(
        proposed.join("tiers.yaml"),
        "policies:\n  standard:\n    requests: {rate: 2000, per: 1s}\n  \
         trial:\n    requests: {rate: 3, per: 1m}\n    mode: shadow\n",
    )
    .unwrap();
    let check = |policies: &Path| {
        Command::new(BINARY)
            .arg("check")
            .arg("--config")
            .arg(&gw.files.config_path)
            .arg("--policies")
            .arg(policies)
            .arg("--against")
            .arg(gw.admin_url(""))
            .env("TURNPIKE_ADMIN_TOKEN", gw.admin_token())
            .output()
            .unwrap()
    };
    let out = check(&proposed);
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected = [
        "3 change(s) against the set in force at",
        "- legacy: requests 5/1s burst 5",
        "~ standard: requests 1000/1s burst 1000",
        "    -> requests 2000/1s burst 2000",
        "+ trial: requests 3/1m burst 3, shadow",
    ];
    for line in expected {
        assert!(printed.contains(line), "{line:?} in:\n{printed}");
    }

    std::fs::write(
        proposed.join("tiers.yaml"),
        "policies:\n  standard:\n    requests: {rate: 0, per: 1s}\n",
    )
    .unwrap();
    let out = check(&proposed);
    assert_eq!(out.status.code(), Some(1));
    let printed = String::from_utf8_lossy(&out.stderr);
    assert!(
        printed.contains(
            "tiers.yaml:3:16: policies.standard.requests.rate: must be a positive integer"
        ),
        "{printed}"
    );
    // Checking changed nothing in force.
    let running = gw.admin_get("/admin/policies");
    running.assert_status(200);
    assert_eq!(
        running.json()["policies"]["standard"]["requests"]["rate"],
        1000
    );
}
