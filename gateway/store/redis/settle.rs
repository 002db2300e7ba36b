//! Settlement on Redis: the sides' scripts (and, on a Cluster, the usage log entry after
//! them), written now or held in the queue until Redis answers again, each exactly once.

use redis::Value;
use std::sync::Weak;
use std::time::Duration;

use turnpike_core::admission::Settlement;

use super::link::Op;
use super::names::USAGE_STREAM;
use super::protocol::SETTLED_APPLIED;
use super::queue::Step;
use super::split::{self, Purpose};
use super::RedisStore;
use crate::clock::unix_ms;
use crate::store::{StoreError, StoreErrorKind};

/// How often held settlements are retried.
const FLUSH_EVERY: Duration = Duration::from_millis(200);

impl RedisStore {
    pub(super) async fn settle_on_redis(&self, call: &Settlement<'_>) {
        self.fail_open.settle(call).await;
        self.write_or_hold(call, Purpose::Settle).await;
    }

    /// Writes the settlement's steps, or holds what could not be written: the call's usage
    /// is not lost while Redis is away.
    pub(super) async fn write_or_hold(&self, call: &Settlement<'_>, purpose: Purpose) {
        let mut steps = self.settle_steps(call, purpose);
        if self.write(&mut steps).await.is_err() {
            self.queue.push(steps);
        }
    }

    fn settle_steps(&self, call: &Settlement, purpose: Purpose) -> Vec<Step> {
        split::settle_sides(call, self.plan, self.stream_maxlen, purpose)
            .into_iter()
            .map(|side| Step::Script {
                stream_after: (side.account_side && !side.writes_stream && call.usage.is_some())
                    .then(|| stream_entry(call, self.stream_maxlen, unix_ms())),
                invocation: side.invocation,
            })
            .collect()
    }

    /// Writes the steps of one settlement in order; what could not be written is left in
    /// `steps`.
    async fn write(&self, steps: &mut Vec<Step>) -> Result<(), StoreError> {
        let mut outcome = Ok(());
        let mut left = Vec::new();
        for step in steps.drain(..) {
            if outcome.is_err() {
                left.push(step);
                continue;
            }
            let (failed, error) = match step {
                Step::Script {
                    invocation,
                    stream_after,
                } => match self
                    .link
                    .invoke::<i64>(Op::Settle, &self.settle_script, &invocation)
                    .await
                {
                    Ok(applied) => match stream_after.filter(|_| applied == SETTLED_APPLIED) {
                        Some(entry) => match self.append(&entry).await {
                            Ok(()) => continue,
                            Err(error) => (Step::Stream(entry), error),
                        },
                        None => continue,
                    },
                    Err(error) => (
                        Step::Script {
                            invocation,
                            stream_after,
                        },
                        error,
                    ),
                },
                Step::Stream(entry) => match self.append(&entry).await {
                    Ok(()) => continue,
                    Err(error) => (Step::Stream(entry), error),
                },
            };
            left.push(failed);
            outcome = Err(error);
        }
        *steps = left;
        outcome
    }

    async fn append(&self, entry: &redis::Cmd) -> Result<(), StoreError> {
        self.link
            .query::<Value>(Op::Settle, self.link.timeout, entry)
            .await
            .map(drop)
    }
}

/// The `XADD` of a metered call, for a Cluster where the stream lives in its own slot.
fn stream_entry(call: &Settlement, stream_maxlen: u64, time_ms: u64) -> redis::Cmd {
    let usage = call.usage.unwrap_or_default();
    let mut cmd = redis::cmd("XADD");
    cmd.arg(USAGE_STREAM)
        .arg("MAXLEN")
        .arg("~")
        .arg(stream_maxlen)
        .arg("*")
        .arg("request_id")
        .arg(call.request_id)
        .arg("time_ms")
        .arg(time_ms)
        .arg("account")
        .arg(call.account)
        .arg("key_id")
        .arg(call.key_id)
        .arg("agent")
        .arg(call.agent)
        .arg("session_id")
        .arg(call.session_id)
        .arg("status")
        .arg(call.status)
        .arg("input_tokens")
        .arg(usage.input_tokens)
        .arg("output_tokens")
        .arg(usage.output_tokens)
        .arg("total_tokens")
        .arg(usage.total_tokens)
        .arg("cost")
        .arg(call.cost);
    cmd
}

/// Writes held settlements, oldest first, whenever Redis answers; brings the link back up.
pub(super) async fn flush_held_settlements(store: Weak<RedisStore>) {
    loop {
        tokio::time::sleep(FLUSH_EVERY).await;
        let Some(store) = store.upgrade() else { return };
        if store.link.is_down() || !store.queue.is_empty() {
            if store.link.ping().await.is_err() {
                continue;
            }
            store.link.mark_up();
        }
        while let Some(mut steps) = store.queue.pop() {
            match store.write(&mut steps).await {
                Ok(()) => {}
                // Redis answered with an error: retrying cannot help, and must not hold up
                // everything queued behind it.
                Err(error) if error.kind == StoreErrorKind::Refused => store.queue.give_up(&error),
                Err(_) => {
                    store.queue.put_back(steps);
                    break;
                }
            }
        }
    }
}
