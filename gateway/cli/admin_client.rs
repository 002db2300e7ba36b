//! The operator commands (`turnpike keys|balance|usage`): thin clients of the admin API.
//! Human-readable output by default; `--json` prints the API's answer as it came.

use serde_json::{json, Value};
use std::time::Duration;

/// Why an admin API call gave nothing to print.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("set TURNPIKE_ADMIN_TOKEN to the admin token")]
    NoToken,
    #[error("cannot reach the admin API at {url}: {source}")]
    Unreachable { url: String, source: ureq::Error },
    #[error("the admin API answered {status} with a body that is not JSON: {source}")]
    NotJson { status: u16, source: ureq::Error },
    /// The API's own error, as `{status} {code}: {message}`.
    #[error("{status} {code}: {message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
    },
    #[error("the admin API's /admin/policies answer has no policies")]
    NoPolicies,
}

/// One admin API call the CLI can make.
pub enum AdminCall {
    CreateKey {
        account: String,
        agents: Vec<String>,
        policy: String,
        expires_at: Option<String>,
        id: Option<String>,
    },
    ShowKey(String),
    RevokeKey(String),
    GetBalance(String),
    AddBalance(String, i64),
    SetBalance(String, i64),
    Usage {
        account: Option<String>,
        key: Option<String>,
        agent: Option<String>,
    },
}

/// Where the admin API is and how to prove who we are.
pub struct AdminTarget {
    pub url: String,
    pub token: String,
}

impl AdminTarget {
    /// The admin API at `url`, with the token from `TURNPIKE_ADMIN_TOKEN`.
    pub fn from_env(url: &str) -> Result<Self, ClientError> {
        let token = std::env::var("TURNPIKE_ADMIN_TOKEN").map_err(|_| ClientError::NoToken)?;
        Ok(Self {
            url: url.to_owned(),
            token,
        })
    }
}

/// The policies in force on a running gateway (`GET /admin/policies`), by name.
pub fn running_policies(
    target: &AdminTarget,
) -> Result<std::collections::BTreeMap<String, Value>, ClientError> {
    let answer = send(target, "GET", "/admin/policies", None)?;
    match answer["policies"].as_object() {
        Some(policies) => Ok(policies.clone().into_iter().collect()),
        None => Err(ClientError::NoPolicies),
    }
}

/// Makes the call and returns what to print; `Err` carries the API's error message.
pub fn run(target: &AdminTarget, call: &AdminCall, as_json: bool) -> Result<String, ClientError> {
    let (method, path, body) = request(call);
    let answer = send(target, method, &path, body)?;
    if as_json {
        return Ok(serde_json::to_string_pretty(&answer).unwrap_or_default());
    }
    Ok(render(call, &answer))
}

fn request(call: &AdminCall) -> (&'static str, String, Option<Value>) {
    match call {
        AdminCall::CreateKey {
            account,
            agents,
            policy,
            expires_at,
            id,
        } => {
            let agents = match agents.as_slice() {
                [one] if one == "*" => json!("*"),
                list => json!(list),
            };
            let mut body = json!({"account": account, "agents": agents, "policy": policy});
            if let Some(at) = expires_at {
                body["expires_at"] = json!(at);
            }
            if let Some(id) = id {
                body["id"] = json!(id);
            }
            ("POST", "/admin/keys".into(), Some(body))
        }
        AdminCall::ShowKey(id) => ("GET", format!("/admin/keys/{}", escape(id)), None),
        AdminCall::RevokeKey(id) => ("DELETE", format!("/admin/keys/{}", escape(id)), None),
        AdminCall::GetBalance(account) => ("GET", balance_path(account), None),
        AdminCall::AddBalance(account, n) => {
            ("POST", balance_path(account), Some(json!({"add": n})))
        }
        AdminCall::SetBalance(account, n) => {
            ("POST", balance_path(account), Some(json!({"set": n})))
        }
        AdminCall::Usage {
            account,
            key,
            agent,
        } => {
            let mut query = form_urlencoded::Serializer::new(String::new());
            for (name, value) in [("account", account), ("key", key), ("agent", agent)] {
                if let Some(value) = value {
                    query.append_pair(name, value);
                }
            }
            ("GET", format!("/admin/usage?{}", query.finish()), None)
        }
    }
}

fn balance_path(account: &str) -> String {
    format!("/admin/accounts/{}/balance", escape(account))
}

/// Percent-encodes everything but RFC 3986's unreserved characters, so any id survives
/// as one path segment.
fn escape(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

fn send(
    target: &AdminTarget,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<Value, ClientError> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let url = format!("{}{path}", target.url.trim_end_matches('/'));
    let auth = format!("Bearer {}", target.token);
    let result = match (method, body) {
        ("GET", _) => agent.get(&url).header("Authorization", &auth).call(),
        ("DELETE", _) => agent.delete(&url).header("Authorization", &auth).call(),
        (_, Some(body)) => agent
            .post(&url)
            .header("Authorization", &auth)
            .send_json(body),
        (_, None) => agent.post(&url).header("Authorization", &auth).send_empty(),
    };
    let mut response = result.map_err(|source| ClientError::Unreachable {
        url: target.url.clone(),
        source,
    })?;
    let status = response.status().as_u16();
    let answer: Value = response
        .body_mut()
        .read_json()
        .map_err(|source| ClientError::NotJson { status, source })?;
    if (200..300).contains(&status) {
        Ok(answer)
    } else {
        let text = |field: &str, default: &str| {
            answer["error"][field]
                .as_str()
                .unwrap_or(default)
                .to_owned()
        };
        Err(ClientError::Refused {
            status,
            code: text("code", "error"),
            message: text("message", "no message"),
        })
    }
}

/// The answer for a person to read.
fn render(call: &AdminCall, answer: &Value) -> String {
    let text = |name: &str| match &answer[name] {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Array(items) => items
            .iter()
            .map(|item| {
                item.as_str()
                    .map_or_else(|| item.to_string(), str::to_owned)
            })
            .collect::<Vec<_>>()
            .join(", "),
        other => other.to_string(),
    };
    match call {
        AdminCall::CreateKey { .. } => format!(
            "Created key {} for account {} (agents: {}, policy: {}, expires: {})\n\
             API key (shown once, store it now): {}",
            text("id"),
            text("account"),
            text("agents"),
            text("policy"),
            text("expires_at"),
            text("key")
        ),
        AdminCall::ShowKey(_) => format!(
            "key       {}\naccount   {}\nagents    {}\npolicy    {}\nexpires   {}\nrevoked   {}",
            text("id"),
            text("account"),
            text("agents"),
            text("policy"),
            text("expires_at"),
            text("revoked")
        ),
        AdminCall::RevokeKey(id) => format!("Revoked key {id}"),
        AdminCall::GetBalance(_) | AdminCall::AddBalance(..) | AdminCall::SetBalance(..) => {
            format!(
                "account {}: balance {}, reserved {}",
                text("account"),
                text("balance"),
                text("reserved")
            )
        }
        AdminCall::Usage { .. } => format!(
            "requests {}\ninput tokens {}\noutput tokens {}\ntotal tokens {}\ncost {}",
            text("requests"),
            text("input_tokens"),
            text("output_tokens"),
            text("total_tokens"),
            text("cost")
        ),
    }
}
