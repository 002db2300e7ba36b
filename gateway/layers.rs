//! The layering of `lib.rs`, held to the source: every `crate::` path a module names must
//! lead to a layer above it, sibling submodules must not name each other in a circle, and
//! the core crate depends on nothing that does I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The top-level modules, each allowed to use only those before it.
const LAYERS: [&str; 22] = [
    "clock",
    "headers",
    "lifecycle",
    "logging",
    "metrics",
    "policy_diff",
    "tls",
    "h2_paths",
    "config",
    "error",
    "store",
    "upstream",
    "services",
    "pipeline",
    "proxy",
    "edge",
    "reload",
    "admin",
    "demo",
    "drain",
    "server",
    "cli",
];

/// The crate's source files with their module paths (`["store", "redis", "admit"]`).
fn modules() -> Vec<(Vec<String>, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("gateway");
    let mut files = Vec::new();
    collect(&root, &root, &mut files);
    files
        .into_iter()
        .filter_map(|path| {
            let relative = path.strip_prefix(&root).ok()?;
            let mut parts: Vec<String> = relative
                .with_extension("")
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            if parts.last().is_some_and(|p| p == "mod") {
                parts.pop();
            }
            let top = parts.first()?.clone();
            if top == "core" || top == "lib" || top == "main" || top == "layers" {
                return None;
            }
            let text = std::fs::read_to_string(&path).ok()?;
            Some((parts, text))
        })
        .collect()
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            if path != root.join("core") {
                collect(root, &path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Code without `//` comments, so doc text naming a module is not a use of it.
fn code(text: &str) -> String {
    text.lines()
        .map(|line| line.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every module path named after `prefix` (`crate::`, `super::`), as its segments; a group
/// (`crate::{a, b::c}`) gives one path per item.
fn paths_after<'a>(code: &'a str, prefix: &str) -> Vec<Vec<&'a str>> {
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find(prefix) {
        let before = rest[..at].chars().last();
        rest = &rest[at + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let inside = &group[..matching_brace(group)];
            found.extend(top_level_items(inside).into_iter().map(path_segments));
        } else {
            found.push(path_segments(rest));
        }
    }
    found
}

/// The `a::b::c` at the start of `text`.
fn path_segments(text: &str) -> Vec<&str> {
    let text = text.trim_start();
    let end = text
        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(text.len());
    text[..end].split("::").filter(|s| !s.is_empty()).collect()
}

/// Where the group that `text` opens ends: the index of its closing brace.
fn matching_brace(text: &str) -> usize {
    let mut depth = 0;
    for (i, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => return i,
            '}' => depth -= 1,
            _ => {}
        }
    }
    text.len()
}

/// The comma-separated items of a group, nested groups kept whole.
fn top_level_items(group: &str) -> Vec<&str> {
    let (mut items, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&group[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&group[start..]);
    items
}

#[test]
fn paths_are_read_from_uses_and_groups() {
    let code = "use crate::a::B;\nuse crate::{c, d::{E, F}, g::H};\nlet x = my_crate::z;";
    assert_eq!(
        paths_after(code, "crate::"),
        vec![vec!["a", "B"], vec!["c"], vec!["d"], vec!["g", "H"]]
    );
}

#[test]
fn layers_point_one_way() {
    let rank = |name: &str| LAYERS.iter().position(|l| *l == name);
    let mut wrong = Vec::new();
    for (module, text) in modules() {
        let own = rank(&module[0])
            .unwrap_or_else(|| panic!("module {} is not in LAYERS (gateway/layers.rs)", module[0]));
        let code = code(&text);
        for path in paths_after(&code, "crate::") {
            let Some(used) = path.first().and_then(|name| rank(name)) else {
                continue;
            };
            if used >= own && path[0] != module[0] {
                wrong.push(format!(
                    "{} uses crate::{}",
                    module.join("::"),
                    path.join("::")
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "uses against the layering:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn modules_do_not_name_each_other_in_a_circle() {
    let modules = modules();
    let known: BTreeSet<Vec<String>> = modules.iter().map(|(m, _)| m.clone()).collect();
    // The deepest known module a path names.
    let resolve = |mut path: Vec<String>| {
        while !path.is_empty() && !known.contains(&path) {
            path.pop();
        }
        path
    };
    // Between the children of a common parent: which child names which. A module naming
    // its own ancestor (a trait or type its parent defines) is the normal shape of a tree.
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (module, text) in &modules {
        let code = code(text);
        let absolute = paths_after(&code, "crate::")
            .into_iter()
            .map(|path| path.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let relative = paths_after(&code, "super::").into_iter().map(|path| {
            let mut base = module[..module.len() - 1].to_vec();
            let mut rest = path.as_slice();
            while rest.first() == Some(&"super") {
                base.pop();
                rest = &rest[1..];
            }
            base.extend(rest.iter().map(|s| s.to_string()));
            base
        });
        for target in absolute.chain(relative).map(&resolve) {
            let common = module
                .iter()
                .zip(&target)
                .take_while(|(a, b)| a == b)
                .count();
            if common < module.len() && common < target.len() {
                let from = module[..=common].to_vec();
                let to = target[..=common].to_vec();
                edges.entry(from).or_default().insert(to);
            }
        }
    }
    for start in edges.keys() {
        let mut stack = vec![(start.clone(), vec![start.join("::")])];
        let mut seen = BTreeSet::new();
        while let Some((at, trail)) = stack.pop() {
            for next in edges.get(&at).into_iter().flatten() {
                let mut trail = trail.clone();
                trail.push(next.join("::"));
                assert!(next != start, "a circle: {}", trail.join(" -> "));
                if seen.insert(next.clone()) {
                    stack.push((next.clone(), trail));
                }
            }
        }
    }
}

#[test]
fn the_core_crate_needs_no_io() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("gateway/core/Cargo.toml");
    let text = std::fs::read_to_string(manifest).unwrap();
    let dependencies = text.split("[dependencies]").nth(1).unwrap_or_default();
    for forbidden in [
        "pingora",
        "tokio",
        "redis",
        "serde_yaml",
        "prometheus",
        "http",
    ] {
        assert!(
            !dependencies
                .lines()
                .any(|l| l.trim_start().starts_with(forbidden)),
            "the core crate depends on {forbidden}"
        );
    }
}
