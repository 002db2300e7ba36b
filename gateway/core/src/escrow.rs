//! Escrow of an account's balance (issue 23; not yet used by the stores): an instance holds a
//! slice of what an account has free, reserves and charges its calls against that slice
//! alone, and writes what they spent back in one flush. The shared store counts an escrow as
//! reserved, so no two instances can promise the same units; a call is admitted here only
//! while the escrow's free part covers its reservation, and charged its actual cost, so the
//! fleet keeps the per-call bound of SPEC §2: the balance ends at worst
//! Σ (cost − reserve) below zero, over the calls that cost more than they reserved.
//!
//! The end game: when what an account has free is too little to give out slices of
//! ([`EscrowSizing::grant`] grants nothing), the instance decides that account's calls one by
//! one in the store again, as before escrow, and every instance holding a slice gives back its
//! unreserved part at its next flush. So 402 comes from the same rule as before; a refusal
//! that only escrow held elsewhere causes lasts until those flushes, at most
//! `flush_every_ms` (plus a round trip).

/// How escrow slices are sized and how long they stay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EscrowSizing {
    /// A slice covers this much of the instance's own recent spending.
    pub horizon_ms: u64,
    /// And at most the account's free balance divided by this, so several instances can
    /// each hold one.
    pub free_divisor: i64,
    /// A slice covers at least this many reservations, or it is not given: below that the
    /// account is in its end game.
    pub min_reserves: i64,
    /// An instance holding escrow writes what it spent at least this often, and learns then
    /// whether the account went into its end game.
    pub flush_every_ms: u64,
    /// Escrow no call has used for this long goes back.
    pub idle_return_ms: u64,
    /// An instance asks for escrow only while its calls to the account reserve at least
    /// this many times a second: a quieter account's calls are reserved one by one in the
    /// store, where an escrow would mostly sit idle.
    pub min_reserves_per_sec: i64,
}

pub const ESCROW_SIZING: EscrowSizing = EscrowSizing {
    horizon_ms: 1000,
    free_divisor: 4,
    min_reserves: 4,
    flush_every_ms: 250,
    idle_return_ms: 750,
    min_reserves_per_sec: 8,
};

impl EscrowSizing {
    /// Units to ask for: `horizon_ms` of the instance's spending (`units_per_sec`, what its
    /// calls reserved or cost, the larger), and at least `min_reserves` reservations.
    pub fn ask(&self, reserve: i64, units_per_sec: i64) -> i64 {
        let horizon = (units_per_sec as i128 * self.horizon_ms as i128 / 1000) as i64;
        horizon.max(self.min_reserves.saturating_mul(reserve.max(1)))
    }

    /// Whether an instance whose calls reserve `units_per_sec` of `reserve` each is busy
    /// enough to hold escrow.
    pub fn escrows(&self, reserve: i64, units_per_sec: i64) -> bool {
        units_per_sec >= self.min_reserves_per_sec.saturating_mul(reserve.max(1))
    }

    /// The shared side: what to grant of `ask` when the account has `free` units not yet
    /// reserved (by calls or by other escrows). Nothing when a slice of at least
    /// `min_reserves` reservations would take more than the `free_divisor`th part of it: the
    /// end game.
    pub fn grant(&self, free: i64, reserve: i64, ask: i64) -> i64 {
        let largest = free.max(0) / self.free_divisor.max(1);
        let least = self.min_reserves.saturating_mul(reserve.max(1));
        if largest < least {
            return 0;
        }
        ask.clamp(least, largest)
    }
}

/// What one instance holds of one account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Escrow {
    /// Units the store counts as this instance's escrow.
    pub held: i64,
    /// Reserved by calls in flight here.
    pub reserved: i64,
    /// Charged to calls settled here and not yet flushed.
    pub spent: i64,
    /// When a call last reserved or settled here.
    pub used_ms: u64,
}

/// What a flush writes to the store: `spent` off the balance; `released` off the escrow's
/// hold (and so off the account's reserved), of which `spent` is the part charged and the
/// rest goes back to the account's free balance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EscrowFlush {
    pub spent: i64,
    pub released: i64,
}

impl Escrow {
    /// Units no call here has reserved or spent: below zero once calls cost more than the
    /// escrow held (local debt, paid by the flush).
    pub fn free(&self) -> i64 {
        self.held
            .saturating_sub(self.reserved)
            .saturating_sub(self.spent)
    }

    /// One call's reservation, or `false` when the escrow's free part cannot cover it (the
    /// call then asks the store: a refill, or the end game's per-call rule).
    pub fn reserve(&mut self, reserve: i64, now_ms: u64) -> bool {
        self.used_ms = now_ms;
        if self.free() < reserve {
            return false;
        }
        self.reserved = self.reserved.saturating_add(reserve);
        true
    }

    /// A call settled here: its reservation released, its actual cost spent.
    pub fn settle(&mut self, reserve: i64, cost: i64, now_ms: u64) {
        self.used_ms = now_ms;
        self.reserved = self.reserved.saturating_sub(reserve).max(0);
        self.spent = self.spent.saturating_add(cost.max(0));
    }

    /// A grant arrived.
    pub fn credit(&mut self, units: i64) {
        self.held = self.held.saturating_add(units.max(0));
    }

    /// Whether to ask for more now, when `ask` is what would be asked: at half of it.
    pub fn refill_due(&self, ask: i64) -> bool {
        self.free() <= ask / 2
    }

    /// Whether to give back what no call holds: the account is in its end game, or no call
    /// has used the escrow for `idle_return_ms`.
    pub fn give_back_due(&self, sizing: &EscrowSizing, end_game: bool, now_ms: u64) -> bool {
        end_game || now_ms.saturating_sub(self.used_ms) >= sizing.idle_return_ms
    }

    /// Empties `spent` into a flush and, when `give_back`, everything no call here has
    /// reserved. A debt (spent beyond what was held) releases only what was held: the rest
    /// is charged to the balance with nothing reserved for it, as a call that cost more than
    /// its reservation is.
    pub fn flush(&mut self, give_back: bool) -> EscrowFlush {
        let spent = std::mem::take(&mut self.spent);
        let mut released = spent.min(self.held);
        self.held -= released;
        if give_back {
            let unreserved = (self.held - self.reserved).max(0);
            self.held -= unreserved;
            released += unreserved;
        }
        EscrowFlush { spent, released }
    }
}

/// The shared side of a flush: `escrow` is what the store counts as this instance's hold of
/// `account`. Never releases more than the hold (a flush written twice releases nothing the
/// second time only if the store dedupes it; the store's sync script does, by flush id).
pub fn apply_flush(
    account: &mut crate::billing::AccountState,
    escrow: &mut i64,
    flush: EscrowFlush,
) {
    let released = flush.released.clamp(0, (*escrow).max(0));
    *escrow -= released;
    account.reserved = account.reserved.saturating_sub(released).max(0);
    account.balance = account.balance.saturating_sub(flush.spent);
}

/// The shared side of a grant: `units` (from [`EscrowSizing::grant`]) now held for the
/// instance, and counted as reserved.
pub fn apply_grant(account: &mut crate::billing::AccountState, escrow: &mut i64, units: i64) {
    let units = units.max(0);
    *escrow = escrow.saturating_add(units);
    account.reserved = account.reserved.saturating_add(units);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::AccountState;
    use crate::test_dice::Dice;

    const RESERVE: i64 = 100;

    #[test]
    fn a_slice_is_a_second_of_spending_within_a_quarter_of_what_is_free() {
        let s = ESCROW_SIZING;
        assert_eq!(s.ask(RESERVE, 0), 400, "at least four reservations");
        assert_eq!(s.ask(RESERVE, 5_000), 5_000);
        assert_eq!(s.grant(1_000_000, RESERVE, 5_000), 5_000);
        assert_eq!(
            s.grant(8_000, RESERVE, 5_000),
            2_000,
            "a quarter of what is free"
        );
        assert_eq!(s.grant(1_600, RESERVE, 5_000), 400);
        assert_eq!(s.grant(1_599, RESERVE, 5_000), 0, "the end game");
        assert_eq!(s.grant(-50, RESERVE, 5_000), 0);
        assert_eq!(s.grant(1_000_000, 0, 1), 4, "a free agent reserves nothing");
    }

    #[test]
    fn calls_reserve_and_spend_from_the_escrow_and_a_flush_writes_what_they_spent() {
        let mut account = AccountState {
            balance: 10_000,
            reserved: 0,
        };
        let mut shared = 0;
        let mut escrow = Escrow::default();
        let units = ESCROW_SIZING.grant(account.balance - account.reserved, RESERVE, 1_000);
        apply_grant(&mut account, &mut shared, units);
        escrow.credit(units);
        assert_eq!((account.reserved, escrow.free()), (1_000, 1_000));

        for _ in 0..10 {
            assert!(escrow.reserve(RESERVE, 1));
        }
        assert!(!escrow.reserve(RESERVE, 1), "the escrow is all reserved");
        for _ in 0..10 {
            escrow.settle(RESERVE, 60, 2);
        }
        assert_eq!(escrow.free(), 400);
        let flush = escrow.flush(false);
        assert_eq!(
            flush,
            EscrowFlush {
                spent: 600,
                released: 600
            }
        );
        apply_flush(&mut account, &mut shared, flush);
        assert_eq!(
            account,
            AccountState {
                balance: 9_400,
                reserved: 400
            }
        );
        assert_eq!((shared, escrow.held), (400, 400), "both sides agree");

        let flush = escrow.flush(true);
        apply_flush(&mut account, &mut shared, flush);
        assert_eq!(
            account,
            AccountState {
                balance: 9_400,
                reserved: 0
            }
        );
        assert_eq!(
            (shared, escrow),
            (
                0,
                Escrow {
                    used_ms: 2,
                    ..Escrow::default()
                }
            )
        );
    }

    #[test]
    fn a_call_that_costs_more_than_it_reserved_is_debt_charged_at_the_flush() {
        let mut account = AccountState {
            balance: 400,
            reserved: 0,
        };
        let mut shared = 0;
        let mut escrow = Escrow::default();
        apply_grant(&mut account, &mut shared, 400);
        escrow.credit(400);
        for _ in 0..4 {
            assert!(escrow.reserve(RESERVE, 0));
        }
        for _ in 0..4 {
            escrow.settle(RESERVE, 250, 1);
        }
        assert_eq!(escrow.free(), -600);
        assert!(
            !escrow.reserve(RESERVE, 2),
            "a slice in debt admits nothing"
        );
        apply_flush(&mut account, &mut shared, escrow.flush(true));
        // Below zero by Σ (cost − reserve) = 4 × 150, as four calls admitted one by one
        // against the balance would leave it.
        assert_eq!(
            account,
            AccountState {
                balance: -600,
                reserved: 0
            }
        );
        assert_eq!((shared, escrow.held, escrow.reserved), (0, 0, 0));
    }

    #[test]
    fn what_a_call_still_holds_stays_in_escrow_when_the_rest_goes_back() {
        let mut escrow = Escrow::default();
        escrow.credit(1_000);
        assert!(escrow.reserve(RESERVE, 0));
        let flush = escrow.flush(true);
        assert_eq!(
            flush,
            EscrowFlush {
                spent: 0,
                released: 900
            }
        );
        assert_eq!((escrow.held, escrow.reserved, escrow.free()), (100, 100, 0));
        escrow.settle(RESERVE, 30, 5);
        assert_eq!(
            escrow.flush(true),
            EscrowFlush {
                spent: 30,
                released: 100
            }
        );
        assert_eq!(escrow.held, 0);
    }

    #[test]
    fn escrow_goes_back_when_idle_or_in_the_end_game_and_is_refilled_at_half() {
        let mut escrow = Escrow::default();
        escrow.credit(1_000);
        assert!(!escrow.refill_due(1_000));
        for _ in 0..5 {
            assert!(escrow.reserve(RESERVE, 10));
        }
        assert!(escrow.refill_due(1_000));
        assert!(!escrow.give_back_due(&ESCROW_SIZING, false, 759));
        assert!(escrow.give_back_due(&ESCROW_SIZING, false, 760));
        assert!(escrow.give_back_due(&ESCROW_SIZING, true, 11));
    }

    #[test]
    fn a_flush_never_releases_more_than_the_store_counts_as_held() {
        let mut account = AccountState {
            balance: 1_000,
            reserved: 300,
        };
        let mut shared = 200;
        apply_flush(
            &mut account,
            &mut shared,
            EscrowFlush {
                spent: 50,
                released: 500,
            },
        );
        assert_eq!(
            (account, shared),
            (
                AccountState {
                    balance: 950,
                    reserved: 100
                },
                0
            )
        );
    }

    #[derive(Default)]
    struct Instance {
        escrow: Escrow,
        shared: i64,
        /// Reservations of calls in flight here, in order.
        in_flight: Vec<i64>,
        spending: i64,
        last_flush_ms: u64,
        /// Whether the account was in its end game at this instance's last flush.
        end_game_seen: bool,
    }

    fn in_end_game(account: &AccountState) -> bool {
        let free = account.balance - account.reserved;
        ESCROW_SIZING.grant(free, RESERVE, ESCROW_SIZING.ask(RESERVE, 0)) == 0
    }

    /// Four instances spend one account with random costs (0 to 3 reservations a call) and
    /// random call lengths, refilling, flushing and giving back as the stores will: an
    /// instance learns of the end game at its flushes only. The books: the balance is the
    /// start less every charge; it never goes further below zero than Σ (cost − reserve) over
    /// the calls that cost more than they reserved; nothing stays reserved once every call
    /// has settled and every instance flushed; the account is spent down to less than one
    /// reservation. A call refused while another instance's escrow could have covered it is
    /// refused for at most `flush_every_ms` (a call a millisecond here).
    #[test]
    fn four_instances_on_escrow_keep_the_books_and_the_per_call_bound() {
        let mut longest_wait = 0;
        for seed in 1..=20u64 {
            let start = 200_000 + 10_000 * seed as i64;
            let mut account = AccountState {
                balance: start,
                reserved: 0,
            };
            let mut instances: Vec<Instance> = (0..4).map(|_| Instance::default()).collect();
            let mut dice = Dice(seed * 0x9e37_79b9_7f4a_7c15);
            let (mut charged, mut over) = (0i64, 0i64);
            // Since when calls have been refused while escrow elsewhere was free.
            let mut refused_since: Option<u64> = None;
            for now in 0..20_000u64 {
                let who = dice.roll(4) as usize;
                let i = &mut instances[who];
                // A call arrives.
                let ask = ESCROW_SIZING.ask(RESERVE, i.spending);
                if i.escrow.refill_due(ask) {
                    let units =
                        ESCROW_SIZING.grant(account.balance - account.reserved, RESERVE, ask);
                    apply_grant(&mut account, &mut i.shared, units);
                    i.escrow.credit(units);
                }
                if i.escrow.reserve(RESERVE, now) {
                    i.in_flight.push(RESERVE);
                    i.spending = RESERVE * 100;
                } else if account.can_reserve(RESERVE) {
                    // The end game's per-call rule in the store.
                    account.reserve(RESERVE);
                    let cost = dice.roll(301) as i64;
                    account.settle(RESERVE, cost);
                    charged += cost;
                    over += (cost - RESERVE).max(0);
                } else if instances.iter().any(|i| i.escrow.free() >= RESERVE) {
                    let since = *refused_since.get_or_insert(now);
                    longest_wait = longest_wait.max(now - since);
                }
                if !instances.iter().any(|i| i.escrow.free() >= RESERVE) {
                    refused_since = None;
                }
                // Calls end, in random order, at random moments; instances flush.
                for i in instances.iter_mut() {
                    if !i.in_flight.is_empty() && dice.roll(2) == 0 {
                        let at = dice.roll(i.in_flight.len() as u64) as usize;
                        let reserve = i.in_flight.swap_remove(at);
                        let cost = dice.roll(301) as i64;
                        i.escrow.settle(reserve, cost, now);
                        charged += cost;
                        over += (cost - reserve).max(0);
                    }
                    let give_back = i.escrow.give_back_due(&ESCROW_SIZING, i.end_game_seen, now);
                    if now - i.last_flush_ms >= ESCROW_SIZING.flush_every_ms || give_back {
                        apply_flush(&mut account, &mut i.shared, i.escrow.flush(give_back));
                        i.last_flush_ms = now;
                        i.end_game_seen = in_end_game(&account);
                    }
                }
                assert!(
                    account.balance >= -over,
                    "seed {seed}: balance {} below -{over}",
                    account.balance
                );
            }
            // Every call ends; every instance flushes and gives back.
            for i in instances.iter_mut() {
                for reserve in std::mem::take(&mut i.in_flight) {
                    let cost = dice.roll(301) as i64;
                    i.escrow.settle(reserve, cost, 20_000);
                    charged += cost;
                    over += (cost - reserve).max(0);
                }
                apply_flush(&mut account, &mut i.shared, i.escrow.flush(true));
                assert_eq!((i.shared, i.escrow.held), (0, 0), "seed {seed}");
            }
            assert_eq!(account.balance, start - charged, "seed {seed}");
            assert_eq!(account.reserved, 0, "seed {seed}");
            assert!(account.balance >= -over, "seed {seed}");
            assert!(
                account.balance < RESERVE,
                "seed {seed}: {} left",
                account.balance
            );
        }
        assert!(
            longest_wait <= ESCROW_SIZING.flush_every_ms,
            "refused for {longest_wait} ms while escrow elsewhere was free"
        );
        assert!(
            longest_wait > 0,
            "the simulation never reached the end game"
        );
    }
}
