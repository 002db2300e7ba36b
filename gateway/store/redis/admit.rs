//! Admission on Redis: the buckets this instance holds slices of judged here (the ledger),
//! the rest in one script per side (one on a single server), the sides' answers combined
//! into one decision, and what a side took given back when the call is not admitted.

use turnpike_core::admission::{
    rule_text, Admission, Admitted, Refusal, Reservation, Scope, Settlement, Sliced,
};
use turnpike_core::limits::Quota;

use super::batch::Kind;
use super::protocol::Invocation;
use super::split::{self, Purpose, Side, SideOutcome, SideReply};
use super::RedisStore;
use crate::store::{StoreError, StoreErrorKind};

/// What became of one side's script.
enum SideAnswer {
    Replied(SideReply),
    /// No usable answer.
    Lost {
        /// The script may have run, whole or in part (and taken something).
        may_have_run: bool,
        error: StoreError,
    },
}

impl RedisStore {
    /// Judges the call's sliceable buckets against this instance's slices first, seats it
    /// in this instance's blocks of slots, reserves it from this instance's escrow of its
    /// account, and judges what is left (a reservation no escrow covered, slots no block
    /// had, buckets without a slice) in Redis: no round trip when nothing is left.
    pub(super) async fn admit_on_redis(
        &self,
        call: &Admission<'_>,
    ) -> Result<Result<Admitted, Refusal>, StoreError> {
        // Under fail_closed a Redis known to be down refuses every call, also those this
        // instance's slices, blocks and escrows could decide.
        if !self.fail_open.enabled && self.link.is_down() {
            return Err(StoreError::new(
                StoreErrorKind::Unreachable,
                "Redis is unreachable",
            ));
        }
        let mut syncs = Vec::new();
        let ledger = &self.slicer.ledger;
        let now = self.slicer.clock.now_ms();
        let mut taken = ledger.take(call, now, &mut syncs);
        self.slicer.send(syncs);
        let mut block_syncs = Vec::new();
        let seats = &self.slicer.seats;
        seats.take(call, now, &mut taken.sliced, &mut block_syncs);
        self.slicer.send_blocks(block_syncs);
        let mut escrow_syncs = Vec::new();
        let escrows = &self.slicer.escrows;
        // A call Redis judges anyway has its reservation taken by the same script: an escrow
        // would save it no round trip, and cost syncs.
        if !split::judges_a_scope(call, taken.sliced) {
            escrows.take(call, now, &mut taken.sliced, &mut escrow_syncs);
            self.slicer.send_escrows(escrow_syncs);
        }
        let untake = |sliced| {
            ledger.untake(call, sliced);
            seats.untake(call, sliced);
            escrows.untake(call, sliced);
        };
        if let Some(dry) = taken.refusal {
            untake(taken.sliced);
            let policy = match dry.scope {
                Scope::Key => call.key_policy,
                Scope::Agent => call.agent_policy,
            };
            let refusal = Refusal::RateLimited {
                scope: dry.scope,
                bucket: dry.bucket,
                retry_after_ms: dry.retry_after_ms,
                rule: policy.map_or_else(String::new, |p| rule_text(dry.bucket, p)),
                quota: taken.quota,
                shadow_hits: Vec::new(),
            };
            let decision = Err(refusal);
            self.quotas.remember(call, &decision);
            return Ok(decision);
        }
        let decision = match self.admit_shared(call, taken.sliced).await {
            Ok(Ok(mut admitted)) => {
                admitted.reservation.sliced = taken.sliced;
                admitted.quota = tighter(admitted.quota, taken.quota);
                Ok(admitted)
            }
            Ok(Err(refusal)) => {
                untake(taken.sliced);
                Err(refusal)
            }
            Err(error) => {
                untake(taken.sliced);
                // Only a store that cannot answer now is worked around; one that refused
                // the script for good (a bug or a damaged key) fails the call, whatever the
                // mode.
                return if self.fail_open.enabled && error.kind.is_transient() {
                    self.fail_open.admit(call).await
                } else {
                    Err(error)
                };
            }
        };
        self.quotas.remember(call, &decision);
        Ok(decision)
    }

    /// What Redis decides of the call, the `sliced` buckets left out: one script per side
    /// (one on a single server, none when nothing is left to judge), the sides' answers
    /// combined into one decision, and what a side took given back when the call is not
    /// admitted.
    async fn admit_shared(
        &self,
        call: &Admission<'_>,
        sliced: Sliced,
    ) -> Result<Result<Admitted, Refusal>, StoreError> {
        let mut sides = split::admit_sides(call, self.plan, sliced);
        let answers = futures_util::future::join_all(
            sides
                .iter_mut()
                .map(|side| self.ask(std::mem::take(&mut side.invocation))),
        )
        .await;
        let sides: Vec<(Side, SideAnswer)> = sides
            .into_iter()
            .zip(answers)
            .map(|(side, reply)| {
                let answer = Self::answer(&side, reply);
                (side, answer)
            })
            .collect();
        let replies: Vec<SideReply> = sides
            .iter()
            .filter_map(|(_, answer)| match answer {
                SideAnswer::Replied(reply) => Some(reply.clone()),
                SideAnswer::Lost { .. } => None,
            })
            .collect();
        if replies.len() == sides.len() {
            let decision = split::combine(call, &replies);
            if decision.is_err() {
                for (side, answer) in &sides {
                    self.undo(call, sliced, side, answer).await;
                }
            }
            return Ok(decision);
        }
        // Some side's answer was lost: whatever its script may have taken is released, and
        // whatever the other side took is given back.
        for (side, answer) in &sides {
            self.undo(call, sliced, side, answer).await;
        }
        // A refusal Redis did give stands, whatever happened to the other side.
        if replies.iter().any(SideReply::refused) {
            return Ok(split::combine(call, &replies));
        }
        let error = sides.into_iter().find_map(|(_, answer)| match answer {
            SideAnswer::Lost { error, .. } => Some(error),
            SideAnswer::Replied(_) => None,
        });
        Err(error.unwrap_or_else(|| {
            StoreError::new(StoreErrorKind::Unanswered, "an admission answer was lost")
        }))
    }

    /// The `RateLimit-*` numbers of `call`'s key from its last admission on this instance,
    /// refilled since; none when it has had none here (a guess could tell a client to spend
    /// what others took). No round trip: a refusal before admission costs Redis nothing.
    pub(super) fn known_quota(&self, call: &Admission<'_>) -> Option<Quota> {
        let (quota, at_ms) = self.quotas.get(call.key_id)?;
        Some(quota.after(call.now_ms.saturating_sub(at_ms)))
    }

    async fn ask(&self, invocation: Invocation) -> Result<Vec<i64>, StoreError> {
        self.batches.call(Kind::Admit, invocation).await
    }

    fn answer(side: &Side<'_>, reply: Result<Vec<i64>, StoreError>) -> SideAnswer {
        match reply {
            Ok(reply) => match split::decode_admit(side, &reply) {
                Some(reply) => SideAnswer::Replied(reply),
                None => SideAnswer::Lost {
                    may_have_run: true,
                    error: StoreError::new(
                        StoreErrorKind::Refused,
                        format!("unexpected admission reply {reply:?}"),
                    ),
                },
            },
            Err(error) => SideAnswer::Lost {
                may_have_run: error.kind.may_have_applied(),
                error,
            },
        }
    }

    /// Undoes what one side of an admission took, or may have taken: a side that admitted
    /// a call another side refused gives everything back; a side whose answer was lost
    /// releases any reservation and slots its script may have taken.
    async fn undo(
        &self,
        call: &Admission<'_>,
        sliced: Sliced,
        side: &Side<'_>,
        answer: &SideAnswer,
    ) {
        let (key_slot, agent_slot, purpose) = match answer {
            SideAnswer::Replied(SideReply {
                outcome:
                    SideOutcome::Admitted {
                        key_slot,
                        agent_slot,
                    },
                ..
            }) => (
                *key_slot,
                *agent_slot,
                Purpose::Refund {
                    key: side.judges(Scope::Key),
                    agent: side.judges(Scope::Agent),
                },
            ),
            SideAnswer::Replied(_)
            | SideAnswer::Lost {
                may_have_run: false,
                ..
            } => return,
            SideAnswer::Lost {
                may_have_run: true, ..
            } => (
                side.judges(Scope::Key),
                side.judges(Scope::Agent),
                Purpose::Release,
            ),
        };
        let settlement = Settlement {
            call_id: call.call_id,
            key_id: call.key_id,
            account: call.account,
            agent: call.agent,
            key_policy: call.key_policy,
            agent_policy: call.agent_policy,
            reservation: Reservation {
                reserve: if side.priced() {
                    call.pricing.map_or(0, |p| p.reserve)
                } else {
                    0
                },
                key_slot,
                agent_slot,
                sliced,
            },
            usage: None,
            cost: 0,
            now_ms: call.now_ms,
            request_id: "",
            session_id: "",
            status: 0,
        };
        self.write_or_hold(&settlement, purpose).await;
    }
}

/// The quota with fewer requests left, of the store's and the slices'.
fn tighter(store: Option<Quota>, slices: Option<Quota>) -> Option<Quota> {
    match (store, slices) {
        (Some(a), Some(b)) => Some(if b.remaining < a.remaining { b } else { a }),
        (a, b) => a.or(b),
    }
}

/// Bounds the memo: past this many keys it starts over.
const MOST_QUOTAS_KEPT: usize = 100_000;

/// Each key's last `RateLimit-*` numbers and when they were read (the store's clock, ms).
/// Best effort: an update that would wait for the lock is skipped.
#[derive(Default)]
pub struct QuotaMemo {
    by_key: parking_lot::Mutex<std::collections::HashMap<String, (Quota, u64)>>,
}

impl QuotaMemo {
    fn remember(&self, call: &Admission<'_>, decision: &Result<Admitted, Refusal>) {
        let quota = match decision {
            Ok(admitted) => admitted.quota,
            Err(
                Refusal::RateLimited { quota, .. } | Refusal::InsufficientBalance { quota, .. },
            ) => *quota,
        };
        let (Some(quota), Some(mut by_key)) = (quota, self.by_key.try_lock()) else {
            return;
        };
        if let Some(known) = by_key.get_mut(call.key_id) {
            *known = (quota, call.now_ms);
            return;
        }
        if by_key.len() >= MOST_QUOTAS_KEPT {
            by_key.clear();
        }
        by_key.insert(call.key_id.to_owned(), (quota, call.now_ms));
    }

    fn get(&self, key_id: &str) -> Option<(Quota, u64)> {
        self.by_key.lock().get(key_id).copied()
    }
}
