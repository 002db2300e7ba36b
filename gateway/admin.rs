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

use crate::auth::{bearer_token, KeyHash};
use crate::error::GatewayError;
use crate::state::Shared;
use crate::store::{BalanceChange, Store, UsageFilter};

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
        let (status, body, content_type) = match answer {
            Ok(ok) => ok,
            Err(error) => {
                let status = StatusCode::from_u16(error.status())
                    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                (status, error.body(&request_id), "application/json")
            }
        };
        let mut response = Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, content_type)
            .header(http::header::CONTENT_LENGTH, body.len())
            .header("x-request-id", request_id);
        if status == StatusCode::UNAUTHORIZED {
            response = response.header(http::header::WWW_AUTHENTICATE, "Bearer");
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

    async fn admin(
        &self,
        session: &mut ServerSession,
        method: &Method,
        path: &str,
        query: &str,
    ) -> Answer {
        let store: &dyn Store = self.shared.store.as_ref();
        let unavailable = |_| GatewayError::StoreUnavailable;
        if let Some(account) = path
            .strip_prefix("/admin/accounts/")
            .and_then(|rest| rest.strip_suffix("/balance"))
        {
            let state = match *method {
                Method::GET => store.balance(account).await.map_err(unavailable)?,
                Method::POST => {
                    let change = read_json::<BalanceRequest>(session).await?.change()?;
                    store
                        .change_balance(account, change)
                        .await
                        .map_err(unavailable)?
                }
                _ => return Err(GatewayError::MethodNotAllowed),
            };
            let state = state.ok_or(GatewayError::NotFound)?;
            return json_ok(
                json!({"account": account, "balance": state.balance, "reserved": state.reserved}),
            );
        }
        if path == "/admin/usage" {
            if method != Method::GET {
                return Err(GatewayError::MethodNotAllowed);
            }
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
            let totals = store.usage(&filter).await.map_err(unavailable)?;
            return json_ok(serde_json::to_value(totals).unwrap_or_default());
        }
        Err(GatewayError::NotFound)
    }
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
