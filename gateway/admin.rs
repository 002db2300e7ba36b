//! The admin listener: health, readiness and metrics in the open; balances and usage behind
//! the admin token. It reaches state through the same [`Store`] the proxy uses.

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use subtle::ConstantTimeEq;

use crate::auth::{bearer_token, AgentScope, KeyHash, KeyRecord};
use crate::error::GatewayError;
use crate::routing::is_session_id;
use crate::state::Shared;
use crate::store::{BalanceChange, UsageFilter};

/// Admin request bodies are small JSON documents.
const MAX_ADMIN_BODY: usize = 16 * 1024;

pub struct AdminApp {
    pub shared: Arc<Shared>,
}

type Answer = Result<(StatusCode, Vec<u8>, &'static str), GatewayError>;

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let request_id = crate::request::random_id("req_", 24);
        let answer = self.route(session).await;
        let (status, body, content_type, extra) = match answer {
            Ok((status, body, content_type)) => (status, body, content_type, None),
            Err(error) => {
                let status = StatusCode::from_u16(error.status())
                    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                let extra = error.extra_headers();
                (status, error.body(&request_id), "application/json", extra)
            }
        };
        let mut response = Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, content_type)
            .header(http::header::CONTENT_LENGTH, body.len())
            .header("x-request-id", request_id);
        // WWW-Authenticate on 401, Allow on 405, as on the data listener.
        if let Some((name, value)) = extra {
            response = response.header(name, value);
        }
        response.body(body).unwrap_or_default()
    }
}

impl AdminApp {
    async fn route(&self, session: &mut ServerSession) -> Answer {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_owned();
        let query = session
            .req_header()
            .uri
            .query()
            .unwrap_or_default()
            .to_owned();
        match (&method, path.as_str()) {
            (&Method::GET, "/healthz") => json_ok(json!({"status": "ok"})),
            (&Method::GET, "/readyz") => self.ready().await,
            (&Method::GET, "/metrics") => Ok((
                StatusCode::OK,
                self.shared.metrics.render(),
                "text/plain; version=0.0.4",
            )),
            (_, p) if p.starts_with("/admin/") => {
                self.authorize(session)?;
                self.admin(session, &method, p, &query).await
            }
            _ => Err(GatewayError::NotFound),
        }
    }

    async fn ready(&self) -> Answer {
        match self.shared.store.ping().await {
            Ok(()) => json_ok(json!({"status": "ready"})),
            Err(error) => Ok((
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::to_vec(&json!({"status": "not ready", "store": error.to_string()}))
                    .unwrap_or_default(),
                "application/json",
            )),
        }
    }

    /// Compares the SHA-256 of the presented token with the configured one in constant time.
    fn authorize(&self, session: &ServerSession) -> Result<(), GatewayError> {
        let snapshot = self.shared.snapshot.load();
        let expected = snapshot
            .config
            .admin
            .token
            .ok_or(GatewayError::AdminUnauthorized)?;
        let header = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION);
        let token = bearer_token(header.map(|v| v.as_bytes()))
            .map_err(|_| GatewayError::AdminUnauthorized)?;
        let presented = KeyHash::of(token);
        if bool::from(presented.0.ct_eq(&expected.0)) {
            Ok(())
        } else {
            self.shared
                .metrics
                .auth_failures
                .with_label_values(&["admin"])
                .inc();
            Err(GatewayError::AdminUnauthorized)
        }
    }

    /// Routes an authorised `/admin/*` call.
    async fn admin(
        &self,
        session: &mut ServerSession,
        method: &Method,
        path: &str,
        query: &str,
    ) -> Answer {
        let route = path.strip_prefix("/admin/").unwrap_or_default();
        match (method, route.split_once('/')) {
            (&Method::POST, None) if route == "reload" => self.reload().await,
            (&Method::GET, None) if route == "usage" => self.usage(query).await,
            (&Method::GET, None) if route == "policies" => self.policies(),
            (&Method::POST, None) if route == "keys" => self.create_key(session).await,
            (&Method::GET, Some(("keys", id))) => self.show_key(&segment(id)?).await,
            (&Method::DELETE, Some(("keys", id))) => self.revoke_key(&segment(id)?).await,
            (_, Some(("accounts", rest)))
                if rest
                    .strip_suffix("/balance")
                    .is_some_and(|a| !a.contains('/')) =>
            {
                let account = segment(rest.strip_suffix("/balance").unwrap_or_default())?;
                self.balance(session, method, &account).await
            }
            (_, None) if matches!(route, "reload" | "keys") => {
                Err(GatewayError::MethodNotAllowed { allow: "POST" })
            }
            (_, None) if matches!(route, "usage" | "policies") => {
                Err(GatewayError::MethodNotAllowed { allow: "GET" })
            }
            (_, Some(("keys", _))) => Err(GatewayError::MethodNotAllowed {
                allow: "GET, DELETE",
            }),
            _ => Err(GatewayError::NotFound),
        }
    }

    async fn reload(&self) -> Answer {
        match crate::reload::reload(&self.shared).await {
            Ok(generation) => json_ok(json!({"status": "reloaded", "generation": generation})),
            Err(errors) => Err(GatewayError::InvalidConfig(errors.to_string())),
        }
    }

    async fn balance(&self, session: &mut ServerSession, method: &Method, account: &str) -> Answer {
        let store = self.shared.store.as_ref();
        let state = match *method {
            Method::GET => store.balance(account).await.map_err(unavailable)?,
            Method::POST => {
                let change = read_json::<BalanceRequest>(session).await?.change()?;
                store
                    .change_balance(account, change)
                    .await
                    .map_err(unavailable)?
            }
            _ => return Err(GatewayError::MethodNotAllowed { allow: "GET, POST" }),
        };
        let state = state.ok_or(GatewayError::NotFound)?;
        json_ok(json!({"account": account, "balance": state.balance, "reserved": state.reserved}))
    }

    async fn usage(&self, query: &str) -> Answer {
        let mut filter = UsageFilter::default();
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            let slot = match name.as_ref() {
                "account" => &mut filter.account,
                "key" => &mut filter.key,
                "agent" => &mut filter.agent,
                _ => continue,
            };
            *slot = Some(value.into_owned()).filter(|v| !v.is_empty());
        }
        let totals = self
            .shared
            .store
            .usage(&filter)
            .await
            .map_err(unavailable)?;
        json_ok(serde_json::to_value(totals).unwrap_or_default())
    }

    /// The policies in force, for `turnpike check --against`.
    fn policies(&self) -> Answer {
        let snapshot = self.shared.snapshot.load();
        let policies = crate::policy_diff::set_json(
            snapshot
                .config
                .policies
                .iter()
                .map(|(name, p)| (name, p.as_ref())),
        );
        json_ok(json!({
            "generation": self.shared.metrics.config_generation.get(),
            "policies": policies,
        }))
    }

    /// Issues a new key. The secret is in this answer only: the store keeps its hash.
    async fn create_key(&self, session: &mut ServerSession) -> Answer {
        let request = read_json::<NewKey>(session).await?;
        let record = self.validate_new_key(request).await?;
        let secret = crate::auth::generate_key();
        let created = self
            .shared
            .store
            .create_key(KeyHash::of(&secret), record.clone())
            .await
            .map_err(unavailable)?;
        if !created {
            return Err(GatewayError::Conflict(format!(
                "A key with id '{}' already exists",
                record.id
            )));
        }
        let mut body = key_json(&record);
        body["key"] = json!(secret);
        Ok((
            StatusCode::CREATED,
            serde_json::to_vec(&body).unwrap_or_default(),
            "application/json",
        ))
    }

    async fn validate_new_key(&self, request: NewKey) -> Result<KeyRecord, GatewayError> {
        let invalid = |message: String| GatewayError::InvalidRequest(message);
        let snapshot = self.shared.snapshot.load();
        let agents = match request.agents {
            AgentsField::All(star) if star == "*" => AgentScope::All,
            AgentsField::All(other) => {
                return Err(invalid(format!(
                    "'agents' must be \"*\" or a list, not '{other}'"
                )))
            }
            AgentsField::Only(list) => {
                if let Some(unknown) = list
                    .iter()
                    .find(|a| !snapshot.config.agents.contains_key(a.as_str()))
                {
                    return Err(invalid(format!("No agent named '{unknown}'")));
                }
                AgentScope::Only(list)
            }
        };
        if !snapshot.config.policies.contains_key(&request.policy) {
            return Err(invalid(format!("No policy named '{}'", request.policy)));
        }
        if self
            .shared
            .store
            .balance(&request.account)
            .await
            .map_err(unavailable)?
            .is_none()
        {
            return Err(invalid(format!("No account named '{}'", request.account)));
        }
        let expires_at = match request.expires_at.as_deref() {
            None => None,
            Some(text) => Some(crate::config::parse_rfc3339(text).ok_or_else(|| {
                invalid(format!("'expires_at' is not an RFC 3339 time: '{text}'"))
            })?),
        };
        let id = match request.id {
            Some(id) if is_session_id(&id) => id,
            Some(id) => {
                return Err(invalid(format!(
                    "'id' must match ^[A-Za-z0-9_.:-]{{1,128}}$, not '{id}'"
                )))
            }
            None => crate::request::random_id("key_", 16),
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

    async fn show_key(&self, id: &str) -> Answer {
        let record = self.shared.store.key_by_id(id).await.map_err(unavailable)?;
        let record = record.ok_or(GatewayError::NotFound)?;
        json_ok(key_json(&record))
    }

    async fn revoke_key(&self, id: &str) -> Answer {
        if !self
            .shared
            .store
            .revoke_key(id)
            .await
            .map_err(unavailable)?
        {
            return Err(GatewayError::NotFound);
        }
        json_ok(json!({"id": id, "revoked": true}))
    }
}

/// `POST /admin/keys`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    account: String,
    agents: AgentsField,
    policy: String,
    expires_at: Option<String>,
    id: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum AgentsField {
    All(String),
    Only(Vec<String>),
}

/// A key as the admin API shows it: never the secret, nor its hash.
fn key_json(record: &KeyRecord) -> serde_json::Value {
    let agents = match &record.agents {
        AgentScope::All => json!("*"),
        AgentScope::Only(list) => json!(list),
    };
    let expires_at = record.expires_at.and_then(|at| {
        let time = time::OffsetDateTime::from_unix_timestamp(at).ok()?;
        time.format(&time::format_description::well_known::Rfc3339)
            .ok()
    });
    json!({
        "id": record.id,
        "account": record.account,
        "agents": agents,
        "policy": record.policy,
        "expires_at": expires_at,
        "revoked": record.revoked,
    })
}

/// A path segment with its `%XX` escapes decoded (ids may hold any character).
fn segment(raw: &str) -> Result<String, GatewayError> {
    let bad = || GatewayError::InvalidRequest(format!("Bad escape in path segment '{raw}'"));
    let mut bytes = Vec::with_capacity(raw.len());
    let mut rest = raw.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        if byte == b'%' {
            let hex = tail.get(..2).ok_or_else(bad)?;
            let hex = std::str::from_utf8(hex).map_err(|_| bad())?;
            bytes.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            rest = &tail[2..];
        } else {
            bytes.push(byte);
            rest = tail;
        }
    }
    String::from_utf8(bytes).map_err(|_| bad())
}

fn unavailable(_: crate::store::StoreError) -> GatewayError {
    GatewayError::StoreUnavailable
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BalanceRequest {
    add: Option<i64>,
    set: Option<i64>,
}

impl BalanceRequest {
    fn change(&self) -> Result<BalanceChange, GatewayError> {
        match (self.add, self.set) {
            (Some(amount), None) => Ok(BalanceChange::Add(amount)),
            (None, Some(amount)) => Ok(BalanceChange::Set(amount)),
            _ => Err(GatewayError::InvalidRequest(
                "Send exactly one of {\"add\": n} or {\"set\": n}".into(),
            )),
        }
    }
}

async fn read_json<T: serde::de::DeserializeOwned>(
    session: &mut ServerSession,
) -> Result<T, GatewayError> {
    let mut body = Vec::new();
    while let Some(chunk) = session
        .read_request_body()
        .await
        .map_err(|_| GatewayError::InvalidRequest("Could not read the request body".into()))?
    {
        if body.len() + chunk.len() > MAX_ADMIN_BODY {
            return Err(GatewayError::PayloadTooLarge {
                limit: MAX_ADMIN_BODY,
            });
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body)
        .map_err(|e| GatewayError::InvalidRequest(format!("Invalid JSON body: {e}")))
}

fn json_ok(value: serde_json::Value) -> Answer {
    Ok((
        StatusCode::OK,
        serde_json::to_vec(&value).unwrap_or_default(),
        "application/json",
    ))
}
