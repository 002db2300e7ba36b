//! Config problems: each names its file, line, column and key path, and all of a load's
//! problems are reported together.

use std::fmt;
use std::path::{Path, PathBuf};

use super::locate::Locator;

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
    /// The file's lines, split when the first problem needs them.
    locator: Option<Locator<'a>>,
    text: &'a str,
    located: usize,
    pub errors: &'a mut Vec<ConfigError>,
}

/// Problems past this many are listed by key path alone: finding a line costs a walk of the
/// file, and a generated file with a mistake on every entry must still be checked in seconds.
const LOCATED_AT_MOST: usize = 200;

impl<'a> Report<'a> {
    pub fn new(file: &'a Path, text: &'a str, errors: &'a mut Vec<ConfigError>) -> Self {
        Self {
            file,
            locator: None,
            text,
            located: 0,
            errors,
        }
    }

    pub fn error(&mut self, key: impl Into<String>, message: impl fmt::Display) {
        let key = key.into();
        let location = if self.located < LOCATED_AT_MOST {
            self.located += 1;
            let text = self.text;
            self.locator
                .get_or_insert_with(|| Locator::new(text))
                .locate(&key)
        } else {
            None
        };
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            location,
            key,
            message: message.to_string(),
        });
    }

    /// How many problems have been found so far, to tell whether a part added any.
    pub fn count(&self) -> usize {
        self.errors.len()
    }
}
