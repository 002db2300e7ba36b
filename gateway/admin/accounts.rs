//! `GET`/`POST /admin/accounts/{id}/balance` and `GET /admin/usage`.

use http::Method;
use pingora::protocols::http::ServerSession;
use serde::Deserialize;
use serde_json::json;

use super::reply::{json_ok, read_json, unavailable, Answer};
use crate::error::{AdminProblem, GatewayError};
use crate::services::Services;
use crate::store::{BalanceChange, BalanceOutcome, UsageFilter};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BalanceRequest {
    add: Option<i64>,
    set: Option<i64>,
}

impl BalanceRequest {
    fn change(&self) -> Result<BalanceChange, AdminProblem> {
        match (self.add, self.set) {
            (Some(amount), None) => Ok(BalanceChange::Add(amount)),
            (None, Some(amount)) => Ok(BalanceChange::Set(amount)),
            _ => Err(AdminProblem::BalanceChange),
        }
    }
}

pub async fn balance(
    services: &Services,
    session: &mut ServerSession,
    method: &Method,
    account: &str,
) -> Answer {
    let store = &services.store;
    let state = match *method {
        Method::GET => store.balance(account).await.map_err(unavailable)?,
        Method::POST => {
            let change = read_json::<BalanceRequest>(session).await?.change()?;
            match store
                .change_balance(account, change)
                .await
                .map_err(unavailable)?
            {
                BalanceOutcome::Changed(state) => Some(state),
                BalanceOutcome::NoSuchAccount => None,
                BalanceOutcome::WouldOverflow => return Err(AdminProblem::BalanceOverflow.into()),
            }
        }
        _ => return Err(GatewayError::MethodNotAllowed { allow: "GET, POST" }),
    };
    let state = state.ok_or(GatewayError::NotFound)?;
    json_ok(json!({"account": account, "balance": state.balance, "reserved": state.reserved}))
}

pub async fn usage(services: &Services, query: &str) -> Answer {
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
    let totals = services.store.usage(&filter).await.map_err(unavailable)?;
    json_ok(serde_json::to_value(totals).unwrap_or_default())
}
