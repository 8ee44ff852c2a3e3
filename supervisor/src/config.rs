//! `mesh.toml`: raw serde types, validation into [`model`] types, and diagnostics.
//!
//! [`load`] (or [`parse`]) reads a file and returns either a valid [`Config`] or every
//! problem found, each a [`Diagnostic`] pointing at a line and column (SPEC §3).
//! [`Service::app_env`] and [`expand_words`] build what an application is given at each
//! start (SPEC §2). [`diff`] turns the running configuration and a new one into a reload
//! [`Plan`] (SPEC §4).
//!
//! Mesh's own environment is always passed in as a map; nothing here reads the process
//! environment, so tests inject what they need.

mod app_env;
mod diff;
mod envfile;
pub mod interpolate;
pub mod model;
mod raw;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

pub use app_env::expand_words;
pub use diff::{Plan, Refusal, Replacement, RestartKey, Scale, ServiceChange, diff};
pub use model::*;

/// The file [`find`] looks for.
pub const FILE_NAME: &str = "mesh.toml";

/// Reads and validates the `mesh.toml` at `path`; `env` is mesh's own environment.
///
/// A file that cannot be read is one diagnostic naming it.
pub fn load(path: &Path, env: &BTreeMap<String, String>) -> Result<Config, ConfigErrors> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text, path, env),
        Err(e) => Err(ConfigErrors(vec![Diagnostic {
            path: path.to_path_buf(),
            line: 0,
            col: 0,
            message: format!("cannot read {}: {e}", path.display()),
            help: None,
        }])),
    }
}

/// Validates `text` as the contents of the `mesh.toml` at `path` (relative paths inside
/// are resolved against its directory; `env_file`s are read).
pub fn parse(
    text: &str,
    path: &Path,
    env: &BTreeMap<String, String>,
) -> Result<Config, ConfigErrors> {
    validate::validate(text, path, env).map_err(ConfigErrors)
}

/// The `mesh.toml` in `start` or the nearest of its parents.
pub fn find(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .map(|dir| dir.join(FILE_NAME))
        .find(|candidate| candidate.is_file())
}

/// Every problem found in a configuration, in file order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<Diagnostic>);

/// One problem in a configuration file.
///
/// Displayed as `PATH:LINE:COL: error: MESSAGE`, followed by a `help: HELP` line when
/// there is a hint (`help: did you mean `command`?`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file, as it was given to [`load`] or [`parse`].
    pub path: PathBuf,
    /// 1-based line; 0 when the problem is the file as a whole (it cannot be read).
    pub line: usize,
    /// 1-based column, in characters; 0 together with `line`.
    pub col: usize,
    /// Lowercase, without a trailing period.
    pub message: String,
    /// The text after `help: `, such as "did you mean `command`?".
    pub help: Option<String>,
}

// === impl ConfigErrors ===

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, diagnostic) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{diagnostic}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

// === impl Diagnostic ===

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: error: {}", self.path.display(), self.message)?;
        } else {
            let (path, line, col) = (self.path.display(), self.line, self.col);
            write!(f, "{path}:{line}:{col}: error: {}", self.message)?;
        }
        if let Some(help) = &self.help {
            write!(f, "\nhelp: {help}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
