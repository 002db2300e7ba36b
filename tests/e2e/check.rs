//! `turnpike check` on the fixtures under `tests/fixtures/`: one directory per kind of
//! mistake, each with a config, its policy files and `expected.txt`, the exact errors (file,
//! line, column, key path, message) check must print, one per line, and nothing else. The
//! fixture `valid` has none and must pass.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::gateway::BINARY;

fn fixtures() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("tests/fixtures")
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
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
