//! The ledger at the edge, its second part (issue 23): this instance's blocks of concurrency
//! slots. A call seated in the block of its scope's limit takes no slot in Redis
//! (`Sliced::key_seat`), and leaves it here when settled. A block grows when a call finds
//! it full, is synced four times a second while it holds slots (renewed, trimmed to its
//! peak once a second, and given back whole in the end game), and goes when idle. The arithmetic is
//! `turnpike_core::slot_blocks`; the shared side is block.lua.
//!
//! Only enforced limits large enough to block are (`BLOCK_SIZING`: a quarter of the cap is
//! at least four slots); the others, and calls a block cannot seat, take their slot in Redis
//! one by one, as before, counted there with every block.

use parking_lot::{Mutex, RwLock};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use turnpike_core::admission::{Admission, Scope, Settlement, Sliced};
use turnpike_core::limits::{BucketKind, Mode, Policy};
use turnpike_core::slices::RateMeter;
use turnpike_core::slot_blocks::{SlotBlock, BLOCK_SIZING};

use super::ledger::MIN_CALLS_PER_SEC;
use super::names::Limiter;
use super::protocol::BlockReply;

/// Which limit a block is of: its in-flight lease set, and its cap (a reload that changes
/// the cap starts a new block; the old one goes when its calls have left).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BlockOf {
    pub inflight: String,
    pub cap: u32,
}

/// One block as this instance holds it.
#[derive(Debug, Default)]
pub struct HeldBlock {
    block: SlotBlock,
    /// The calls seated: a settlement sent twice (a cancelled one, then its retry) leaves
    /// once.
    calls: HashSet<Box<str>>,
    /// The most slots the store may count as this instance's: more than `block.leased`
    /// while a grow is on its way, or after one whose answer was lost.
    upper: u32,
    /// A sync of this block is under way: no second one is sent.
    syncing: bool,
    /// The limit had too few slots free for blocks at the last sync: what this block does
    /// not seat goes back, and calls it cannot seat are judged one by one in the store.
    end_game: bool,
    /// After a sync that could not grow the block, the next grow waits until then.
    no_grow_before_ms: u64,
    synced_ms: u64,
    /// Calls seated or not, per second: a block is taken only for a limit this instance
    /// calls on often enough.
    rate: RateMeter,
    /// When the block was last trimmed to its peak.
    trimmed_ms: u64,
    used_ms: u64,
}

/// A sync to send: the block to go to `target` slots, from at most `upper`.
pub struct BlockSync {
    pub of: BlockOf,
    pub held: Arc<Mutex<HeldBlock>>,
    pub target: u32,
    pub upper: u32,
}

/// Taken off the lease here: the store starts it when the sync runs, a little after it was
/// sent.
const LEASE_MARGIN_MS: u64 = 100;
/// How often a block in use is trimmed to its peak.
const TRIM_EVERY_MS: u64 = 1_000;
/// A block no call has used for this long goes back (but for the calls still seated).
const IDLE_RETURN_MS: u64 = 750;
/// How long an empty, idle block is kept before it is forgotten.
const FORGET_AFTER_MS: u64 = 10_000;

#[derive(Default)]
pub struct Seats {
    blocks: RwLock<HashMap<BlockOf, Arc<Mutex<HeldBlock>>>>,
}

/// Each scope's enforced concurrency cap large enough to block, and its block.
fn blocked(
    call_scopes: [(Scope, Option<&Policy>); 2],
    account: &str,
    key_id: &str,
    agent: &str,
) -> impl Iterator<Item = (Scope, BlockOf)> {
    call_scopes
        .into_iter()
        .filter_map(move |(scope, policy)| {
            let cap = policy
                .filter(|p| p.mode == Mode::Enforce)?
                .concurrency
                .filter(|&cap| BLOCK_SIZING.blocks(cap))?;
            let limiter = match scope {
                Scope::Key => Limiter::Key { account, key_id },
                Scope::Agent => Limiter::Agent(agent),
            };
            let [_, inflight] = limiter.keys();
            Some((scope, BlockOf { inflight, cap }))
        })
        .collect::<Vec<_>>()
        .into_iter()
}

impl Seats {
    /// The block of `of`, made (empty) on first use.
    fn held(&self, of: &BlockOf) -> Arc<Mutex<HeldBlock>> {
        if let Some(held) = self.blocks.read().get(of) {
            return Arc::clone(held);
        }
        Arc::clone(self.blocks.write().entry(of.clone()).or_default())
    }

    /// Seats `call` in the block of each scope whose limit is blocked and whose block has a
    /// free slot (marked in `sliced`); `syncs` gets the grows now due. A scope whose block
    /// cannot seat the call is left to the store.
    pub fn take(
        &self,
        call: &Admission<'_>,
        now: u64,
        sliced: &mut Sliced,
        syncs: &mut Vec<BlockSync>,
    ) {
        let scopes = [
            (Scope::Key, call.key_policy),
            (Scope::Agent, call.agent_policy),
        ];
        for (scope, of) in blocked(scopes, call.account, call.key_id, call.agent) {
            let held = self.held(&of);
            let mut h = held.lock();
            h.used_ms = now;
            h.rate.record(1, now);
            if h.block.seat(now) {
                h.calls.insert(call.call_id.into());
                sliced.set(scope, BucketKind::Concurrency);
            }
            // Grown once full (the store seats the calls that come meanwhile): to the seats
            // and a quarter, by two slots at least. In the end game, asked at most once per
            // sync period: the answer says whether the end game is over.
            let (seated, leased) = (h.block.seated, h.block.leased);
            let busy = h.rate.per_sec(now) >= MIN_CALLS_PER_SEC;
            if busy && seated >= leased && now >= h.no_grow_before_ms {
                let largest = BLOCK_SIZING.want(of.cap, u32::MAX);
                let target = BLOCK_SIZING
                    .want(of.cap, seated + 1)
                    .max(leased + 2)
                    .min(largest);
                if target > leased {
                    h.sync(&of, &held, target, now, syncs);
                }
            }
        }
    }

    /// A call seated here is done (settled, or not admitted after all).
    pub fn leave(
        &self,
        call_id: &str,
        scopes: [(Scope, Option<&Policy>); 2],
        account: &str,
        key_id: &str,
        agent: &str,
        sliced: Sliced,
    ) {
        for (scope, of) in blocked(scopes, account, key_id, agent) {
            if !sliced.seated(scope) {
                continue;
            }
            let Some(held) = self.blocks.read().get(&of).cloned() else {
                continue;
            };
            let mut h = held.lock();
            if h.calls.remove(call_id) {
                h.block.leave();
            }
        }
    }

    /// Gives back the seats `take` gave a call that was not admitted after all.
    pub fn untake(&self, call: &Admission<'_>, sliced: Sliced) {
        let scopes = [
            (Scope::Key, call.key_policy),
            (Scope::Agent, call.agent_policy),
        ];
        self.leave(
            call.call_id,
            scopes,
            call.account,
            call.key_id,
            call.agent,
            sliced,
        );
    }

    /// A settled call leaves its seats.
    pub fn settle(&self, call: &Settlement<'_>) {
        let scopes = [
            (Scope::Key, call.key_policy),
            (Scope::Agent, call.agent_policy),
        ];
        let sliced = call.reservation.sliced;
        self.leave(
            call.call_id,
            scopes,
            call.account,
            call.key_id,
            call.agent,
            sliced,
        );
    }

    /// Four times a second: every block that holds slots is synced (renewed, trimmed to what
    /// its peak needs once a second, given back in the end game); empty ones idle for long
    /// are forgotten.
    pub fn tick(&self, now_ms: u64, syncs: &mut Vec<BlockSync>) {
        let mut forget = Vec::new();
        let blocks = self.blocks.read();
        for (of, held) in blocks.iter() {
            let mut h = held.lock();
            let due = now_ms.saturating_sub(h.synced_ms) >= BLOCK_SIZING.sync_every_ms;
            if h.upper > 0 && due {
                // Renewed while in use, and once a second trimmed to the most seated in
                // that second and a quarter; what no call sits in goes back in the end game
                // and once no call came for 750 ms (within a second).
                let idle = now_ms.saturating_sub(h.used_ms) >= IDLE_RETURN_MS;
                let trim = now_ms.saturating_sub(h.trimmed_ms) >= TRIM_EVERY_MS;
                let target = if h.end_game || idle {
                    h.block.seated
                } else if trim {
                    h.trimmed_ms = now_ms;
                    let seated = h.block.seated;
                    let peak = std::mem::replace(&mut h.block.peak, seated);
                    BLOCK_SIZING.want(of.cap, peak).min(h.block.leased)
                } else {
                    h.block.leased
                };
                h.sync(of, held, target, now_ms, syncs);
            } else if h.upper == 0
                && h.block.seated == 0
                && !h.syncing
                && now_ms.saturating_sub(h.used_ms) >= FORGET_AFTER_MS
            {
                forget.push(of.clone());
            }
        }
        drop(blocks);
        if !forget.is_empty() {
            let mut blocks = self.blocks.write();
            for of in forget {
                // Only if still unused: a call may have come meanwhile.
                let unused = blocks.get(&of).is_some_and(|held| {
                    let h = held.lock();
                    h.upper == 0
                        && h.block.seated == 0
                        && !h.syncing
                        && Arc::strong_count(held) == 1
                });
                if unused {
                    blocks.remove(&of);
                }
            }
        }
    }
}

impl Seats {
    /// Before the process exits: every block given back but for the seats still taken,
    /// rather than left to its lease.
    pub fn give_back_all(&self, now_ms: u64, syncs: &mut Vec<BlockSync>) {
        for (of, held) in self.blocks.read().iter() {
            let mut h = held.lock();
            if h.upper > 0 {
                let seated = h.block.seated;
                h.sync(of, held, seated, now_ms, syncs);
            }
        }
    }
}

impl HeldBlock {
    /// Sends a sync, unless one is under way: the block to go to `target` slots (never
    /// fewer than it seats). Slots given back are given up here first, so none of them
    /// seats a call the store no longer counts.
    fn sync(
        &mut self,
        of: &BlockOf,
        held: &Arc<Mutex<HeldBlock>>,
        target: u32,
        now_ms: u64,
        syncs: &mut Vec<BlockSync>,
    ) {
        if self.syncing {
            return;
        }
        let target = target.max(self.block.seated);
        if target < self.block.leased {
            self.block.leased = target;
        }
        self.upper = self.upper.max(target);
        self.syncing = true;
        self.synced_ms = now_ms;
        syncs.push(BlockSync {
            of: of.clone(),
            held: Arc::clone(held),
            target,
            upper: self.upper,
        });
    }

    /// The store's answer to `sync`, sent at `asked_ms`: the block now holds `reply.held`
    /// slots, leased from the moment it was asked.
    pub fn synced(&mut self, sync: &BlockSync, reply: BlockReply, asked_ms: u64) {
        self.block.leased = reply.held;
        self.upper = reply.held;
        self.block.lease_until_ms = asked_ms + BLOCK_SIZING.lease_ms - LEASE_MARGIN_MS;
        self.end_game = reply.free < i64::from(BLOCK_SIZING.min_slots);
        // A block that could not grow, or may not, asks again only after a while: calls
        // meanwhile take their slot in the store, one by one.
        self.no_grow_before_ms = if reply.held < sync.target || self.end_game {
            asked_ms + BLOCK_SIZING.sync_every_ms
        } else {
            0
        };
        self.syncing = false;
    }

    /// A sync that got no answer: the store may hold up to `upper` slots of this instance's
    /// (until the next sync sets it right, or their lease runs out); this block seats no
    /// more than it held before.
    pub fn unsynced(&mut self, asked_ms: u64) {
        self.no_grow_before_ms = asked_ms + BLOCK_SIZING.sync_every_ms;
        self.syncing = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capped(cap: u32) -> Policy {
        Policy {
            name: "p".into(),
            requests: None,
            tokens: None,
            concurrency: Some(cap),
            mode: Mode::Enforce,
        }
    }

    fn admission<'a>(id: &'a str, key: &'a Policy) -> Admission<'a> {
        Admission {
            call_id: id,
            key_id: "key_1",
            account: "acct",
            agent: "ag",
            key_policy: Some(key),
            agent_policy: None,
            pricing: None,
            now_ms: 0,
            lease_ms: 1000,
        }
    }

    /// Seven calls at `now`, none seated (no block yet, none asked for): the eighth finds the
    /// limit busy enough to block.
    fn busy(seats: &Seats, policy: &Policy, now: u64) {
        let mut syncs = Vec::new();
        for i in 1..MIN_CALLS_PER_SEC {
            let mut sliced = Sliced::default();
            seats.take(
                &admission(&format!("w{i}"), policy),
                now,
                &mut sliced,
                &mut syncs,
            );
            assert!(!sliced.key_seat);
        }
        assert!(syncs.is_empty(), "a quiet limit is judged call by call");
    }

    fn answer(syncs: Vec<BlockSync>, free_after: i64, granted: Option<u32>, at: u64) {
        for sync in syncs {
            let held = granted.unwrap_or(sync.target);
            let reply = BlockReply {
                held,
                free: free_after,
            };
            sync.held.lock().synced(&sync, reply, at);
        }
    }

    #[test]
    fn a_call_is_seated_once_a_block_arrives_and_leaves_once() {
        let seats = Seats::default();
        let policy = capped(40);
        let mut syncs = Vec::new();
        let mut sliced = Sliced::default();
        busy(&seats, &policy, 0);
        seats.take(&admission("c0", &policy), 0, &mut sliced, &mut syncs);
        assert!(!sliced.key_seat, "no block yet: the store seats it");
        assert_eq!(syncs.len(), 1);
        assert_eq!(syncs[0].target, 4, "the smallest block");
        answer(std::mem::take(&mut syncs), 30, None, 0);
        let mut seated = Vec::new();
        for i in 1..=4 {
            let id = format!("c{i}");
            let mut sliced = Sliced::default();
            seats.take(&admission(&id, &policy), 1, &mut sliced, &mut syncs);
            seated.push((id, sliced));
        }
        assert!(seated.iter().all(|(_, s)| s.key_seat), "four seats");
        assert_eq!(syncs.len(), 1, "full: one grow, not one per call");
        assert_eq!(syncs[0].target, 7, "full: the seats and a quarter");
        let mut fifth = Sliced::default();
        seats.take(&admission("c5", &policy), 1, &mut fifth, &mut syncs);
        assert!(!fifth.key_seat, "full while the grow is on its way");
        let (id, sliced) = &seated[0];
        let settlement = |id| Settlement {
            call_id: id,
            key_id: "key_1",
            account: "acct",
            agent: "ag",
            key_policy: Some(&policy),
            agent_policy: None,
            reservation: turnpike_core::admission::Reservation {
                sliced: *sliced,
                ..Default::default()
            },
            usage: None,
            cost: 0,
            now_ms: 2,
            request_id: "",
            session_id: "",
            status: 200,
        };
        seats.settle(&settlement(id));
        seats.settle(&settlement(id));
        let of = BlockOf {
            inflight: Limiter::Key {
                account: "acct",
                key_id: "key_1",
            }
            .keys()[1]
                .clone(),
            cap: 40,
        };
        assert_eq!(seats.held(&of).lock().block.seated, 3, "left once");
    }

    #[test]
    fn in_the_end_game_unseated_slots_go_back_first_here() {
        let seats = Seats::default();
        let policy = capped(40);
        let mut syncs = Vec::new();
        let mut sliced = Sliced::default();
        busy(&seats, &policy, 0);
        seats.take(&admission("c0", &policy), 0, &mut sliced, &mut syncs);
        // Granted 4, but only 2 left free: the end game.
        answer(std::mem::take(&mut syncs), 2, None, 0);
        let mut one = Sliced::default();
        seats.take(&admission("c1", &policy), 1, &mut one, &mut syncs);
        assert!(one.key_seat);
        syncs.clear();
        seats.tick(BLOCK_SIZING.sync_every_ms, &mut syncs);
        assert_eq!(syncs.len(), 1);
        assert_eq!(syncs[0].target, 1, "all but the seated slot given back");
        let held = Arc::clone(&syncs[0].held);
        assert_eq!(
            held.lock().block.leased,
            1,
            "given up here before the store hears"
        );
        let mut two = Sliced::default();
        seats.take(&admission("c2", &policy), 260, &mut two, &mut Vec::new());
        assert!(!two.key_seat, "judged one by one in the store");
    }

    #[test]
    fn small_limits_and_shadow_policies_are_not_blocked() {
        let seats = Seats::default();
        let mut syncs = Vec::new();
        for policy in [capped(15), {
            let mut p = capped(100);
            p.mode = Mode::Shadow;
            p
        }] {
            let mut sliced = Sliced::default();
            seats.take(&admission("c0", &policy), 0, &mut sliced, &mut syncs);
            assert!(!sliced.key_seat);
        }
        assert!(syncs.is_empty());
    }
}
