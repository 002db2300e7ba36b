//! Reading config and policy files, and parsing their YAML with the parser's own position
//! of a syntax or type error.

use std::path::{Path, PathBuf};

use super::errors::{ConfigError, Report};

/// One file's path (as it is named in messages) and text.
#[derive(Debug, Clone)]
pub struct Source {
    pub path: PathBuf,
    pub text: String,
}

impl Source {
    pub fn new(path: impl Into<PathBuf>, text: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            text: text.into(),
        }
    }

    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::whole_file(path, None, format!("cannot read: {e}")))?;
        Ok(Self::new(path, text))
    }
}

/// Every `*.yaml`/`*.yml` file of a policy directory, in name order, and the problems
/// reading them.
pub fn read_policy_dir(dir: &Path) -> (Vec<Source>, Vec<ConfigError>) {
    let listed = std::fs::read_dir(dir).map(|entries| {
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
            .collect();
        files.sort();
        files
    });
    let files = match listed {
        Ok(files) => files,
        Err(e) => {
            let message = format!("cannot read policies directory: {e}");
            return (
                Vec::new(),
                vec![ConfigError::whole_file(dir, None, message)],
            );
        }
    };
    let mut sources = Vec::new();
    let mut errors = Vec::new();
    for file in files {
        match Source::read(&file) {
            Ok(source) => sources.push(source),
            Err(error) => errors.push(error),
        }
    }
    (sources, errors)
}

/// The file's YAML as `T`, or one error at the parser's position.
pub fn parse_yaml<T: serde::de::DeserializeOwned>(source: &Source) -> Result<T, ConfigError> {
    serde_yaml_ng::from_str(&source.text).map_err(|typed| yaml_error(source, typed))
}

/// The file's YAML as `T`, and the key path (`agents[0].upstrem`) of every field `T` has no
/// place for: the caller reports those with the file's other problems, so one unknown field
/// does not hide the rest.
pub fn parse_yaml_and_unknown_keys<T: serde::de::DeserializeOwned>(
    source: &Source,
) -> Result<(T, Vec<String>), ConfigError> {
    let mut unknown = Vec::new();
    let document = serde_yaml_ng::Deserializer::from_str(&source.text);
    serde_ignored::deserialize(document, |path| unknown.push(key_path(&path)))
        .map(|parsed| (parsed, unknown))
        .map_err(|typed| yaml_error(source, typed))
}

fn yaml_error(source: &Source, typed: serde_yaml_ng::Error) -> ConfigError {
    // The typed parser may trip over a wrong type before it reaches a syntax error further
    // on; a file that is not YAML at all is reported as such.
    let e = match serde_yaml_ng::from_str::<serde_yaml_ng::Value>(&source.text) {
        Err(syntax) => syntax,
        Ok(_) => typed,
    };
    let location = e.location().map(|l| (l.line(), l.column()));
    ConfigError::whole_file(&source.path, location, without_location(e.to_string()))
}

/// A path as the rest of the config errors name keys: `upstreams.pool.headers`, `keys[2].id`.
fn key_path(path: &serde_ignored::Path) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", key_path(parent)),
        Path::Map { parent, key } => match key_path(parent) {
            parent if parent.is_empty() => key.clone(),
            parent => format!("{parent}.{key}"),
        },
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => key_path(parent),
    }
}

/// A parser message without its trailing "at line L column C": the location is printed
/// in front already.
pub fn without_location(message: String) -> String {
    match message.rfind(" at line ") {
        Some(at) if message[at..].contains(" column ") => message[..at].to_owned(),
        _ => message,
    }
}

/// A path in the config, relative to the config file's directory.
pub(super) fn beside_config(report: &Report, path: &str) -> PathBuf {
    report.file.parent().unwrap_or(Path::new(".")).join(path)
}
