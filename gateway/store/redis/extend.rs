//! A running stream's extension on Redis: one extend.lua run per side (one on a single
//! server), their answers combined. Not part of the group commit: a stream asks when its
//! usage outgrows its hold and at half its lease, not per call.

use parking_lot::Mutex;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};

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
        if call.priced {
            // Before the hold can grow: the call's settlement must now set its marker,
            // which an extension arriving after it checks.
            self.extended_calls.note(call.call_id);
        }
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
        // A call reserved from this instance's escrow holds its reservation there too.
        if call.reservation.sliced.escrowed {
            extended.held = extended.held.max(call.reservation.reserve);
        }
        let now = self.slicer.clock.now_ms();
        if let Some(tokens_left) = self.slicer.ledger.tokens_left(call, now) {
            extended.tokens_left = Some(tokens_left);
        }
        Ok(extended)
    }
}

/// Calls whose hold a stream's extension may have grown in Redis. Their settlement sets the
/// call's own marker (not only its run's mark): extend.lua checks it, so an extension that
/// arrives after the settlement holds nothing for a call already settled.
#[derive(Default)]
pub struct ExtendedCalls {
    /// How many there are: a settlement looks no further while there are none.
    count: AtomicUsize,
    ids: Mutex<HashSet<Box<str>>>,
}

impl ExtendedCalls {
    fn note(&self, call_id: &str) {
        if self.ids.lock().insert(call_id.into()) {
            self.count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether the call was extended; it is forgotten.
    pub fn take(&self, call_id: &str) -> bool {
        if self.count.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let removed = self.ids.lock().remove(call_id);
        if removed {
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
        removed
    }
}
