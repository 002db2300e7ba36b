//! Config problems: each names its file, line, column and key path, and all of a load's
//! problems are reported together.

use std::fmt;
use std::path::{Path, PathBuf};

use super::locate::locate;

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

impl ConfigError {
    /// A problem with a whole file (or directory), not with one key in it.
    pub fn whole_file(file: &Path, location: Option<(usize, usize)>, message: String) -> Self {
        Self {
            file: file.to_path_buf(),
            location,
            key: String::new(),
            message,
        }
    }
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

impl ConfigErrors {
    pub fn one(error: ConfigError) -> Self {
        Self(vec![error])
    }
}

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

/// Collects problems against one file, each placed at its key's line and column.
pub struct Report<'a> {
    pub file: &'a Path,
    /// The file's text, to find the line of a key.
    pub text: &'a str,
    pub errors: &'a mut Vec<ConfigError>,
}

impl Report<'_> {
    pub fn error(&mut self, key: impl Into<String>, message: impl fmt::Display) {
        let key = key.into();
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            location: locate(self.text, &key),
            key,
            message: message.to_string(),
        });
    }

    /// How many problems have been found so far, to tell whether a part added any.
    pub fn count(&self) -> usize {
        self.errors.len()
    }
}
