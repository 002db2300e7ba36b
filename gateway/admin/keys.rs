//! `POST /admin/keys`, `GET` and `DELETE /admin/keys/{id}`: keys made, shown and revoked.
//! A new key follows the same rules as the config file's keys (`config::validate`).

use http::StatusCode;
use pingora::protocols::http::ServerSession;
use serde::Deserialize;
use serde_json::json;

use turnpike_core::ids::random_id;
use turnpike_core::keys::{generate_key, AgentScope, KeyHash, KeyRecord};
use turnpike_core::units::format_rfc3339;

use super::reply::{json, json_ok, read_json, unavailable, Answer};
use crate::config::validate::{self, KeyProblem};
use crate::config::AgentsSpec;
use crate::error::{AdminProblem, GatewayError};
use crate::services::Services;

/// `POST /admin/keys`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    account: String,
    agents: AgentsSpec,
    policy: String,
    expires_at: Option<String>,
    id: Option<String>,
}

/// Issues a new key. The secret is in this answer only: the store keeps its hash.
pub async fn create(services: &Services, session: &mut ServerSession) -> Answer {
    let request = read_json::<NewKey>(session).await?;
    let record = validate_new_key(services, request).await?;
    let secret = generate_key();
    let created = services
        .store
        .create_key(KeyHash::of(&secret), record.clone())
        .await
        .map_err(unavailable)?;
    if !created {
        return Err(GatewayError::Conflict { key_id: record.id });
    }
    let mut body = key_json(&record);
    body["key"] = json!(secret);
    json(StatusCode::CREATED, body)
}

pub async fn show(services: &Services, id: &str) -> Answer {
    let record = services.store.key_by_id(id).await.map_err(unavailable)?;
    let record = record.ok_or(GatewayError::NotFound)?;
    json_ok(key_json(&record))
}

pub async fn revoke(services: &Services, id: &str) -> Answer {
    if !services.store.revoke_key(id).await.map_err(unavailable)? {
        return Err(GatewayError::NotFound);
    }
    json_ok(json!({"id": id, "revoked": true}))
}

async fn validate_new_key(services: &Services, request: NewKey) -> Result<KeyRecord, GatewayError> {
    let refused = |field: &'static str, problem: KeyProblem| {
        GatewayError::from(AdminProblem::Key { field, problem })
    };
    let snapshot = services.snapshot();
    let config = &snapshot.config;
    let (agents, unknown) =
        validate::agent_scope(request.agents, |a| config.agents.contains_key(a));
    if let Some((_, problem)) = unknown.into_iter().next() {
        return Err(refused("agents", problem));
    }
    // A key made through the API always names a policy; only the config file may leave a
    // key unlimited.
    validate::policy(&request.policy, |p| config.policies.contains_key(p))
        .map_err(|problem| refused("policy", problem))?;
    let account_known = services
        .store
        .balance(&request.account)
        .await
        .map_err(unavailable)?
        .is_some();
    if !account_known {
        return Err(refused(
            "account",
            KeyProblem::UnknownAccount(request.account),
        ));
    }
    let expires_at = match request.expires_at.as_deref() {
        None => None,
        Some(text) => {
            Some(validate::expires_at(text).map_err(|problem| refused("expires_at", problem))?)
        }
    };
    let id = match request.id {
        Some(id) => {
            validate::new_key_id(&id).map_err(|problem| refused("id", problem))?;
            id
        }
        None => random_id("key_", 16),
    };
    Ok(KeyRecord {
        id,
        account: request.account,
        agents,
        policy: request.policy,
        expires_at,
        revoked: false,
    })
}

/// A key as the admin API shows it: never the secret, nor its hash.
fn key_json(record: &KeyRecord) -> serde_json::Value {
    let agents = match &record.agents {
        AgentScope::All => json!("*"),
        AgentScope::Only(list) => json!(list),
    };
    json!({
        "id": record.id,
        "account": record.account,
        "agents": agents,
        "policy": record.policy,
        "expires_at": record.expires_at.and_then(format_rfc3339),
        "revoked": record.revoked,
    })
}
