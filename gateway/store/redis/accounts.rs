//! Balances and usage totals, for the admin API.

use std::collections::HashMap;

use turnpike_core::billing::AccountState;

use super::link::{Op, ADMIN_TIMEOUT};
use super::names::{account_hash, usage_hash, ACCOUNTS};
use super::protocol::Invocation;
use super::RedisStore;
use crate::store::{BalanceChange, BalanceOutcome, StoreError, UsageFilter, UsageTotals};

/// change_balance.lua's reply codes, ahead of the balance and reservation.
const CHANGED: i64 = 1;
const OVERFLOW: i64 = 2;

impl RedisStore {
    pub(super) async fn read_balance(
        &self,
        account: &str,
    ) -> Result<Option<AccountState>, StoreError> {
        let fields: Vec<Option<i64>> = self
            .link
            .admin(
                redis::cmd("HMGET")
                    .arg(account_hash(account))
                    .arg("balance")
                    .arg("reserved"),
            )
            .await?;
        Ok(account_state(&fields))
    }

    pub(super) async fn apply_balance_change(
        &self,
        account: &str,
        change: BalanceChange,
    ) -> Result<BalanceOutcome, StoreError> {
        let (how, amount) = match change {
            BalanceChange::Add(n) => ("add", n),
            BalanceChange::Set(n) => ("set", n),
        };
        let invocation = Invocation {
            keys: vec![account_hash(account)],
            args: vec![how.to_owned(), amount.to_string()],
        };
        let reply: Vec<Option<i64>> = self
            .link
            .invoke_within(
                Op::AdminOnce,
                ADMIN_TIMEOUT,
                &self.balance_script,
                &invocation,
            )
            .await?;
        Ok(match reply.split_first() {
            Some((Some(CHANGED), fields)) => match account_state(fields) {
                Some(state) => BalanceOutcome::Changed(state),
                None => BalanceOutcome::NoSuchAccount,
            },
            Some((Some(OVERFLOW), _)) => BalanceOutcome::WouldOverflow,
            _ => BalanceOutcome::NoSuchAccount,
        })
    }

    pub(super) async fn sum_usage(&self, filter: &UsageFilter) -> Result<UsageTotals, StoreError> {
        let accounts: Vec<String> = match &filter.account {
            Some(account) => vec![account.clone()],
            None => {
                self.link
                    .admin(redis::cmd("SMEMBERS").arg(ACCOUNTS))
                    .await?
            }
        };
        let wanted = |w: &Option<String>, have: &str| w.as_deref().is_none_or(|w| w == have);
        let mut sum = UsageTotals::default();
        for account in &accounts {
            let rows: HashMap<String, i64> = self
                .link
                .admin(redis::cmd("HGETALL").arg(usage_hash(account)))
                .await?;
            for (field, value) in rows {
                let mut parts = field.split('\x1f');
                let (Some(name), Some(key), Some(agent)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    continue;
                };
                if !wanted(&filter.key, key) || !wanted(&filter.agent, agent) {
                    continue;
                }
                let value = value.max(0) as u64;
                match name {
                    "requests" => sum.requests += value,
                    "input_tokens" => sum.input_tokens += value,
                    "output_tokens" => sum.output_tokens += value,
                    "total_tokens" => sum.total_tokens += value,
                    "cost" => sum.cost = sum.cost.saturating_add(value as i64),
                    _ => {}
                }
            }
        }
        Ok(sum)
    }
}

fn account_state(fields: &[Option<i64>]) -> Option<AccountState> {
    let balance = (*fields.first()?)?;
    Some(AccountState {
        balance,
        reserved: fields.get(1).copied().flatten().unwrap_or(0),
    })
}
