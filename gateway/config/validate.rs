//! The rules a key must follow, shared by the config file's keys and the admin API's
//! `POST /admin/keys`, so both refuse the same things with the same words.

use std::fmt;

use turnpike_core::ids::is_session_id;
use turnpike_core::keys::AgentScope;
use turnpike_core::units::parse_rfc3339;

use super::spec::AgentsSpec;

/// What is wrong with one field of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyProblem {
    NotWildcard(String),
    UnknownAgent(String),
    UnknownPolicy(String),
    UnknownAccount(String),
    NotATime(String),
    BadId(String),
}

impl fmt::Display for KeyProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyProblem::NotWildcard(other) => {
                write!(f, "'{other}' is neither \"*\" nor a list of agent ids")
            }
            KeyProblem::UnknownAgent(name) => write!(f, "no agent named '{name}'"),
            KeyProblem::UnknownPolicy(name) => write!(f, "no policy named '{name}'"),
            KeyProblem::UnknownAccount(name) => write!(f, "no account named '{name}'"),
            KeyProblem::NotATime(text) => write!(
                f,
                "'{text}' is not an RFC 3339 time such as 2027-01-31T00:00:00Z"
            ),
            KeyProblem::BadId(id) => write!(f, "'{id}' does not match ^[A-Za-z0-9_.:-]{{1,128}}$"),
        }
    }
}

/// The agents a key may call, and each listed agent that does not exist (by its index).
pub fn agent_scope(
    spec: AgentsSpec,
    agent_exists: impl Fn(&str) -> bool,
) -> (AgentScope, Vec<(Option<usize>, KeyProblem)>) {
    match spec {
        AgentsSpec::Wildcard(star) if star == "*" => (AgentScope::All, Vec::new()),
        AgentsSpec::Wildcard(other) => (
            AgentScope::Only(Vec::new()),
            vec![(None, KeyProblem::NotWildcard(other))],
        ),
        AgentsSpec::List(list) => {
            let unknown = list
                .iter()
                .enumerate()
                .filter(|(_, agent)| !agent_exists(agent))
                .map(|(i, agent)| (Some(i), KeyProblem::UnknownAgent(agent.clone())))
                .collect();
            (AgentScope::Only(list), unknown)
        }
    }
}

/// The policy a key names must be defined.
pub fn policy(name: &str, policy_exists: impl Fn(&str) -> bool) -> Result<(), KeyProblem> {
    if policy_exists(name) {
        Ok(())
    } else {
        Err(KeyProblem::UnknownPolicy(name.to_owned()))
    }
}

/// Unix seconds of a key's `expires_at`.
pub fn expires_at(text: &str) -> Result<i64, KeyProblem> {
    parse_rfc3339(text).ok_or_else(|| KeyProblem::NotATime(text.to_owned()))
}

/// An id an operator chooses for a new key through the admin API: URL- and header-safe.
pub fn new_key_id(id: &str) -> Result<(), KeyProblem> {
    if is_session_id(id) {
        Ok(())
    } else {
        Err(KeyProblem::BadId(id.to_owned()))
    }
}
