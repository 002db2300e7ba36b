//! `turnpike check`: validates a config and its policies, and with `--policies` shows what a
//! proposed policy directory would change, against the config's own or a running gateway's.

use std::path::Path;

use super::admin_client::{running_policies, AdminTarget, ClientError};
use crate::config::{self, ConfigError, ConfigErrors, Runtime};
use crate::policy_diff::{diff, set_json};
use crate::tls::load_cert;

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// Every problem, then how many.
    #[error("{0}\n{n} error(s)", n = .0.0.len())]
    Invalid(ConfigErrors),
    #[error("{0}")]
    Against(#[from] ClientError),
}

impl From<ConfigErrors> for CheckError {
    fn from(errors: ConfigErrors) -> Self {
        CheckError::Invalid(errors)
    }
}

pub fn check(
    path: &Path,
    proposed: Option<&Path>,
    against: Option<&str>,
) -> Result<(), CheckError> {
    let runtime = match proposed {
        Some(dir) => config::load_with_policies(path, dir),
        None => config::load(path),
    }?;
    check_certificates(path, &runtime)?;
    let calls = &runtime.calls;
    println!(
        "{}: ok ({} agents, {} upstreams, {} policies, {} keys)",
        path.display(),
        calls.agents.len(),
        calls.pools.len(),
        calls.policies.len(),
        calls.keys.len()
    );
    if proposed.is_none() && against.is_none() {
        return Ok(());
    }
    let new = policy_set(&runtime);
    let (old, baseline) = match against {
        Some(url) => {
            let target = AdminTarget {
                url: url.to_owned(),
                token: std::env::var("TURNPIKE_ADMIN_TOKEN").unwrap_or_default(),
            };
            (
                running_policies(&target)?,
                format!("the set in force at {url}"),
            )
        }
        None => {
            let current = config::load(path)?;
            let dir = current.sources.policies_dir.display().to_string();
            (policy_set(&current), dir)
        }
    };
    let changes = diff(&old, &new);
    println!("{} change(s) against {baseline}", changes.len());
    for change in changes {
        println!("{change}");
    }
    Ok(())
}

/// The listeners' certificate pairs load and match, as a start needs them to.
fn check_certificates(path: &Path, runtime: &Runtime) -> Result<(), ConfigErrors> {
    let process = &runtime.process;
    let pairs = [
        ("tls", process.tls.as_ref().map(|t| &t.files)),
        ("admin.tls", process.admin_tls.as_ref()),
    ];
    let errors: Vec<ConfigError> = pairs
        .into_iter()
        .filter_map(|(key, files)| {
            let error = load_cert(files?).err()?;
            Some(ConfigError {
                file: path.to_path_buf(),
                location: None,
                key: format!("{key}.{}", error.field()),
                message: error.to_string(),
            })
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ConfigErrors(errors))
    }
}

fn policy_set(runtime: &Runtime) -> std::collections::BTreeMap<String, serde_json::Value> {
    set_json(
        runtime
            .calls
            .policies
            .iter()
            .map(|(name, policy)| (name, policy.as_ref())),
    )
}
