//! A running stream's extension on Redis: one extend.lua run per side (one on a single
//! server), their answers combined. Not part of the group commit: a stream asks when its
//! usage outgrows its hold and at half its lease, not per call.

use turnpike_core::admission::{Extended, Extension};

use super::link::Op;
use super::split;
use super::RedisStore;
use crate::store::{StoreError, StoreErrorKind};

impl RedisStore {
    pub(super) async fn extend_on_redis(
        &self,
        call: &Extension<'_>,
    ) -> Result<Extended, StoreError> {
        let mut extended = Extended::default();
        for invocation in split::extend_sides(call, self.plan) {
            let reply: Vec<i64> = self
                .link
                .invoke_within(
                    Op::Extend,
                    self.link.timeout,
                    &self.extend_script,
                    &invocation,
                )
                .await?;
            let [held, has_tokens, tokens_left] = reply[..] else {
                return Err(StoreError::new(
                    StoreErrorKind::Refused,
                    format!("unexpected extension reply {reply:?}"),
                ));
            };
            extended.held = extended.held.max(held);
            if has_tokens == 1 {
                extended.tokens_left = Some(tokens_left);
            }
        }
        let now = self.slicer.clock.now_ms();
        if let Some(tokens_left) = self.slicer.ledger.tokens_left(call, now) {
            extended.tokens_left = Some(tokens_left);
        }
        Ok(extended)
    }
}
