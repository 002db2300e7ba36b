//! The admin listener: health, readiness and metrics in the open; keys, balances, usage,
//! policies and reloads behind the admin token. It reaches state through the same store the
//! proxy uses.

mod accounts;
mod keys;
mod reply;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::json;
use std::sync::Arc;
use subtle::ConstantTimeEq;

use turnpike_core::ids::new_request_id;
use turnpike_core::keys::{bearer_token, KeyHash};

use self::reply::{json, json_ok, segment, Answer};
use crate::error::GatewayError;
use crate::policy_diff::set_json;
use crate::reload::Reloader;
use crate::services::Services;

pub struct AdminApp {
    pub services: Arc<Services>,
    pub reloader: Arc<Reloader>,
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let request_id = new_request_id();
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
                self.services.metrics.render(),
                "text/plain; version=0.0.4",
            )),
            // The open paths take GET only: another method is refused as on every other path.
            (_, "/healthz" | "/readyz" | "/metrics") => {
                Err(GatewayError::MethodNotAllowed { allow: "GET" })
            }
            (_, p) if p.starts_with("/admin/") => {
                self.authorize(session)?;
                self.admin(session, &method, p, &query).await
            }
            _ => Err(GatewayError::NotFound),
        }
    }

    async fn ready(&self) -> Answer {
        // Load balancers take a draining instance out of rotation before it stops accepting.
        if self.services.lifecycle.is_draining() {
            return json(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"status": "draining"}),
            );
        }
        match self.services.store.ping().await {
            Ok(()) => {
                let notes = self.services.store.notes();
                if notes.is_empty() {
                    json_ok(json!({"status": "ready"}))
                } else {
                    json_ok(json!({"status": "ready", "notes": notes}))
                }
            }
            Err(error) => json(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"status": "not ready", "store": error.to_string()}),
            ),
        }
    }

    /// Compares the SHA-256 of the presented token with the configured one in constant time.
    fn authorize(&self, session: &ServerSession) -> Result<(), GatewayError> {
        let snapshot = self.services.snapshot();
        let expected = snapshot
            .config
            .admin_token
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
            self.services
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
        let services = &self.services;
        let route = path.strip_prefix("/admin/").unwrap_or_default();
        match (method, route.split_once('/')) {
            (&Method::POST, None) if route == "reload" => self.reload().await,
            (&Method::GET, None) if route == "usage" => accounts::usage(services, query).await,
            (&Method::GET, None) if route == "policies" => self.policies(),
            (&Method::POST, None) if route == "keys" => keys::create(services, session).await,
            (&Method::GET, Some(("keys", id))) => keys::show(services, &segment(id)?).await,
            (&Method::DELETE, Some(("keys", id))) => keys::revoke(services, &segment(id)?).await,
            (_, Some(("accounts", rest)))
                if rest
                    .strip_suffix("/balance")
                    .is_some_and(|a| !a.contains('/')) =>
            {
                let account = segment(rest.strip_suffix("/balance").unwrap_or_default())?;
                accounts::balance(services, session, method, &account).await
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
        match self.reloader.reload().await {
            Ok(generation) => json_ok(json!({"status": "reloaded", "generation": generation})),
            Err(errors) => Err(GatewayError::InvalidConfig(errors)),
        }
    }

    /// The policies in force, for `turnpike check --against`.
    fn policies(&self) -> Answer {
        let snapshot = self.services.snapshot();
        let policies = set_json(
            snapshot
                .config
                .policies
                .iter()
                .map(|(name, p)| (name, p.as_ref())),
        );
        json_ok(json!({
            "generation": snapshot.generation,
            "policies": policies,
        }))
    }
}
