//! The ledger at the edge, its third part (issue 23): this instance's escrows of accounts'
//! balances. A priced call whose reservation the escrow of its account covers reserves it
//! here (`Sliced::escrowed`), without Redis; its cost is charged to the balance by its
//! settlement as before, and what escrowed calls spent is released from the escrow at the
//! next sync (four times a second while there is some). Only an account this instance calls
//! for at least 8 times a second is escrowed. An escrow is refilled at half, given
//! back after 750 ms idle (within a second), and given back (all no call holds) in the end game, when the
//! account has too little free to give out escrows: its calls are then reserved one by one in
//! Redis, by today's rule. The arithmetic is `turnpike_core::escrow`; the shared side is
//! escrow.lua.
//!
//! The store's escrow is never less than this instance's: what it releases it stops using
//! here first, and what it is granted it uses only once the store says so.

use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::sync::Arc;

use turnpike_core::admission::{Admission, Settlement, Sliced};
use turnpike_core::escrow::{Escrow, EscrowFlush, ESCROW_SIZING};
use turnpike_core::slices::RateMeter;

use super::protocol::EscrowReply;

/// How long the store keeps an escrow its instance stops renewing: what a crashed instance
/// held is the account's again this long after its last sync.
pub const ESCROW_LEASE_MS: u64 = 2_000;
/// An escrow still held is renewed when its lease has less than this left.
const RENEW_WITHIN_MS: u64 = 1_000;
/// Taken off the lease here: the store starts it when the sync runs, a little after it was
/// sent.
const LEASE_MARGIN_MS: u64 = 100;
/// How long an empty, idle escrow is kept before it is forgotten.
const FORGET_AFTER_MS: u64 = 10_000;

/// One account's escrow as this instance holds it.
#[derive(Debug, Default)]
pub struct HeldEscrow {
    escrow: Escrow,
    /// The calls reserved here, and what each reserved (a stream's settlement may carry a
    /// larger reservation, its hold grown in the store): a settlement sent twice settles
    /// once.
    calls: HashMap<Box<str>, i64>,
    /// What calls reserved here, or cost when that was more, per second.
    meter: RateMeter,
    /// The last call's reservation, which sizes what is asked.
    reserve: i64,
    /// A sync of this escrow is under way: no second one is sent.
    syncing: bool,
    /// A sync whose answer was lost: sent again, as it was, before anything else (its
    /// marker makes it apply once).
    resend: Option<Resend>,
    /// The account had too little free for escrows at the last sync.
    end_game: bool,
    /// After a sync that got less than half of what it asked, the next refill waits.
    no_refill_before_ms: u64,
    /// When the store may stop counting the escrow, as this instance reckons it.
    lease_until_ms: u64,
}

#[derive(Debug, Clone, Copy)]
struct Resend {
    number: u64,
    ask: i64,
    flush: EscrowFlush,
}

/// A sync to send: `flush.released` released, then up to `ask` more asked. `number` is set
/// for a sync sent again.
pub struct EscrowSync {
    pub account: String,
    pub held: Arc<Mutex<HeldEscrow>>,
    pub ask: i64,
    pub reserve: i64,
    pub flush: EscrowFlush,
    pub number: Option<u64>,
}

#[derive(Default)]
pub struct Escrows {
    accounts: RwLock<HashMap<String, Arc<Mutex<HeldEscrow>>>>,
}

impl Escrows {
    fn held(&self, account: &str) -> Arc<Mutex<HeldEscrow>> {
        if let Some(held) = self.accounts.read().get(account) {
            return Arc::clone(held);
        }
        Arc::clone(self.accounts.write().entry(account.to_owned()).or_default())
    }

    /// Reserves a priced call's reservation from its account's escrow, when that covers it
    /// (marked in `sliced`); `syncs` gets the refill now due. A call the escrow cannot cover
    /// is reserved in the store.
    pub fn take(
        &self,
        call: &Admission<'_>,
        now: u64,
        sliced: &mut Sliced,
        syncs: &mut Vec<EscrowSync>,
    ) {
        let Some(pricing) = call.pricing else {
            return;
        };
        let reserve = pricing.reserve.max(0);
        let held = self.held(call.account);
        let mut h = held.lock();
        h.expire(now);
        h.reserve = reserve;
        h.meter.record(reserve as u64, now);
        if h.escrow.reserve(reserve, now) {
            h.calls.insert(call.call_id.into(), reserve);
            sliced.escrowed = true;
        }
        let rate = h.meter.per_sec(now) as i64;
        let ask = ESCROW_SIZING.ask(reserve, rate);
        let due = h.escrow.refill_due(ask) && now >= h.no_refill_before_ms;
        if due && ESCROW_SIZING.escrows(reserve, rate) {
            h.sync(call.account, &held, ask, false, syncs);
        }
    }

    /// Gives back the reservation `take` made for a call that was not admitted after all.
    pub fn untake(&self, call: &Admission<'_>, sliced: Sliced) {
        if !sliced.escrowed {
            return;
        }
        let Some(held) = self.accounts.read().get(call.account).cloned() else {
            return;
        };
        let mut h = held.lock();
        if let Some(reserved) = h.calls.remove(call.call_id) {
            h.escrow.settle(reserved, 0, call.now_ms);
        }
    }

    /// A settled call reserved here: its reservation released, its cost spent (released
    /// from the store's escrow at the next sync; the balance is charged by the settlement).
    pub fn settle(&self, call: &Settlement<'_>, now: u64) {
        if !call.reservation.sliced.escrowed {
            return;
        }
        let Some(held) = self.accounts.read().get(call.account).cloned() else {
            return;
        };
        let mut h = held.lock();
        if let Some(reserved) = h.calls.remove(call.call_id) {
            h.escrow.settle(reserved, call.cost, now);
            // The escrow is sized to what calls reserve or cost, the larger.
            h.meter
                .record(call.cost.saturating_sub(reserved).max(0) as u64, now);
        }
    }

    /// Four times a second: what escrowed calls spent is released, idle escrows (all of them
    /// in the end game) are given back, those still held renewed; empty, idle ones forgotten.
    pub fn tick(&self, now_ms: u64, syncs: &mut Vec<EscrowSync>) {
        let mut forget = Vec::new();
        let accounts = self.accounts.read();
        for (account, held) in accounts.iter() {
            let mut h = held.lock();
            h.expire(now_ms);
            let e = h.escrow;
            let give_back =
                e.held > e.reserved && e.give_back_due(&ESCROW_SIZING, h.end_game, now_ms);
            let renew = e.held > 0 && h.lease_until_ms.saturating_sub(now_ms) <= RENEW_WITHIN_MS;
            if h.resend.is_some() || e.spent > 0 || give_back || renew {
                h.sync(account, held, 0, give_back, syncs);
            } else if e.held == 0
                && e.reserved == 0
                && !h.syncing
                && now_ms.saturating_sub(e.used_ms) >= FORGET_AFTER_MS
            {
                forget.push(account.clone());
            }
        }
        drop(accounts);
        if !forget.is_empty() {
            let mut accounts = self.accounts.write();
            for account in forget {
                // Only if still unused: a call may have come meanwhile.
                let unused = accounts.get(&account).is_some_and(|held| {
                    let h = held.lock();
                    h.escrow.held == 0
                        && h.escrow.reserved == 0
                        && !h.syncing
                        && Arc::strong_count(held) == 1
                });
                if unused {
                    accounts.remove(&account);
                }
            }
        }
    }
}

impl Escrows {
    /// Before the process exits: every escrow given back (what no call holds, which is all
    /// once the calls have drained), rather than left to its lease.
    pub fn give_back_all(&self, syncs: &mut Vec<EscrowSync>) {
        for (account, held) in self.accounts.read().iter() {
            let mut h = held.lock();
            if h.escrow.held > 0 {
                h.sync(account, held, 0, true, syncs);
            }
        }
    }
}

impl HeldEscrow {
    /// Sends a sync, unless one is under way: a lost one again if there is one, else what
    /// was spent released (and, when `give_back`, all no call holds) and `ask` more asked.
    /// What it releases is no longer used here from now.
    fn sync(
        &mut self,
        account: &str,
        held: &Arc<Mutex<HeldEscrow>>,
        ask: i64,
        give_back: bool,
        syncs: &mut Vec<EscrowSync>,
    ) {
        if self.syncing {
            return;
        }
        let (ask, flush, number) = match self.resend.take() {
            Some(lost) => (lost.ask, lost.flush, Some(lost.number)),
            None => (ask, self.escrow.flush(give_back), None),
        };
        self.syncing = true;
        syncs.push(EscrowSync {
            account: account.to_owned(),
            held: Arc::clone(held),
            ask,
            reserve: self.reserve,
            flush,
            number,
        });
    }

    /// An escrow whose lease may have run out holds nothing: the store may have given it
    /// back. (What was spent needs no release then.)
    fn expire(&mut self, now_ms: u64) {
        if now_ms >= self.lease_until_ms && self.escrow.held > 0 {
            self.escrow.held = 0;
            self.escrow.spent = 0;
        }
    }

    /// The store's answer to a sync sent at `asked_ms`: the escrow the store now counts
    /// (what it released, this instance stopped using when it sent it; it uses what was
    /// granted from now).
    pub fn synced(&mut self, sync: &EscrowSync, reply: EscrowReply, asked_ms: u64) {
        self.escrow.held = reply.held;
        self.lease_until_ms = asked_ms + ESCROW_LEASE_MS - LEASE_MARGIN_MS;
        self.end_game = ESCROW_SIZING.grant(reply.free, self.reserve, 1) == 0;
        self.no_refill_before_ms = if reply.granted * 2 < sync.ask || self.end_game {
            asked_ms + ESCROW_SIZING.flush_every_ms
        } else {
            0
        };
        self.syncing = false;
    }

    /// A sync that got no answer: sent again as it was (`number`), unless the store surely
    /// did not apply it, when what it released is this escrow's again.
    pub fn unsynced(&mut self, sync: &EscrowSync, number: u64, surely_not_applied: bool) {
        if surely_not_applied {
            self.escrow.held += sync.flush.released;
            self.escrow.spent += sync.flush.spent;
        } else {
            self.resend = Some(Resend {
                number,
                ask: sync.ask,
                flush: sync.flush,
            });
        }
        self.syncing = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use turnpike_core::admission::Reservation;
    use turnpike_core::billing::Pricing;

    fn admission<'a>(id: &'a str, pricing: &'a Pricing) -> Admission<'a> {
        Admission {
            call_id: id,
            key_id: "key_1",
            account: "acct",
            agent: "ag",
            key_policy: None,
            agent_policy: None,
            pricing: Some(pricing),
            now_ms: 0,
            lease_ms: 1000,
        }
    }

    fn settlement(id: &str, sliced: Sliced, cost: i64) -> Settlement<'_> {
        Settlement {
            call_id: id,
            key_id: "key_1",
            account: "acct",
            agent: "ag",
            key_policy: None,
            agent_policy: None,
            reservation: Reservation {
                reserve: 100,
                sliced,
                ..Reservation::default()
            },
            usage: None,
            cost,
            now_ms: 0,
            request_id: "",
            session_id: "",
            status: 200,
        }
    }

    fn answer(syncs: Vec<EscrowSync>, held: i64, free: i64, at: u64) {
        for sync in syncs {
            let granted = (held - sync.held.lock().escrow.held).max(0);
            let reply = EscrowReply {
                granted,
                held,
                free,
            };
            sync.held.lock().synced(&sync, reply, at);
        }
    }

    fn pricing() -> Pricing {
        Pricing {
            input_per_mtok: 1,
            output_per_mtok: 1,
            reserve: 100,
        }
    }

    /// Eight calls at once, reserved in the store: busy enough for escrow, which the last
    /// one asks for (returned in `syncs`).
    fn busy(escrows: &Escrows, pricing: &Pricing, syncs: &mut Vec<EscrowSync>) {
        for i in 0..8 {
            let mut sliced = Sliced::default();
            escrows.take(&admission(&format!("c{i}"), pricing), 0, &mut sliced, syncs);
            assert!(!sliced.escrowed, "no escrow yet: the store reserves it");
            assert_eq!(syncs.len(), usize::from(i == 7), "asked for at 8 a second");
        }
    }

    #[test]
    fn calls_are_reserved_here_once_escrow_arrives_and_what_they_spent_is_released() {
        let escrows = Escrows::default();
        let pricing = pricing();
        let mut syncs = Vec::new();
        busy(&escrows, &pricing, &mut syncs);
        assert_eq!(syncs[0].ask, 800, "a second of these calls");
        answer(std::mem::take(&mut syncs), 800, 10_000, 0);
        let mut second = Sliced::default();
        escrows.take(&admission("c8", &pricing), 1, &mut second, &mut syncs);
        assert!(second.escrowed);
        assert!(syncs.is_empty(), "seven reservations left: no refill yet");
        escrows.settle(&settlement("c8", second, 30), 2);
        escrows.settle(&settlement("c8", second, 30), 2);
        escrows.tick(3, &mut syncs);
        assert_eq!(syncs.len(), 1);
        assert_eq!(
            (syncs[0].flush.spent, syncs[0].flush.released),
            (30, 30),
            "settled once, released at the next sync"
        );
        let held = Arc::clone(&syncs[0].held);
        assert_eq!(held.lock().escrow.held, 770, "no longer used here");
    }

    #[test]
    fn a_quiet_account_is_not_escrowed() {
        let escrows = Escrows::default();
        let pricing = pricing();
        let mut syncs = Vec::new();
        for i in 0..20 {
            let mut sliced = Sliced::default();
            escrows.take(&admission("c", &pricing), i * 200, &mut sliced, &mut syncs);
        }
        assert!(syncs.is_empty(), "five calls a second");
    }

    #[test]
    fn a_lost_sync_is_sent_again_as_it_was() {
        let escrows = Escrows::default();
        let pricing = pricing();
        let mut syncs = Vec::new();
        busy(&escrows, &pricing, &mut syncs);
        answer(std::mem::take(&mut syncs), 800, 10_000, 0);
        let mut sliced = Sliced::default();
        escrows.take(&admission("c8", &pricing), 1, &mut sliced, &mut syncs);
        escrows.settle(&settlement("c8", sliced, 50), 2);
        escrows.tick(3, &mut syncs);
        let lost = syncs.pop().unwrap();
        lost.held.lock().unsynced(&lost, 7, false);
        escrows.tick(4, &mut syncs);
        assert_eq!(syncs.len(), 1);
        assert_eq!(syncs[0].number, Some(7));
        assert_eq!(syncs[0].flush.released, 50);
        assert_eq!(syncs[0].held.lock().escrow.held, 750);
    }

    #[test]
    fn in_the_end_game_what_no_call_holds_goes_back() {
        let escrows = Escrows::default();
        let pricing = pricing();
        let mut syncs = Vec::new();
        busy(&escrows, &pricing, &mut syncs);
        // Granted 800, and 300 left free: too little for another escrow.
        answer(std::mem::take(&mut syncs), 800, 300, 0);
        let mut sliced = Sliced::default();
        escrows.take(&admission("c8", &pricing), 1, &mut sliced, &mut syncs);
        assert!(sliced.escrowed);
        syncs.clear();
        escrows.tick(2, &mut syncs);
        assert_eq!(syncs.len(), 1);
        assert_eq!(syncs[0].flush.released, 700, "all but c8's reservation");
    }
}
