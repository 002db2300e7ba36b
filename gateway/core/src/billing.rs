//! Prices, cost and the balance rule. Integers only: amounts are in the operator's unit.

use crate::usage::Usage;

/// An agent's prices, per million tokens, and the amount reserved while a call is in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pricing {
    pub input_per_mtok: u64,
    pub output_per_mtok: u64,
    pub reserve: i64,
}

/// An account's balance and the part of it held by calls in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AccountState {
    pub balance: i64,
    pub reserved: i64,
}

/// ceil((input × input_per_mtok + output × output_per_mtok) / 1,000,000), saturating.
pub fn cost(usage: &Usage, pricing: &Pricing) -> i64 {
    let micro = usage.input_tokens as u128 * pricing.input_per_mtok as u128
        + usage.output_tokens as u128 * pricing.output_per_mtok as u128;
    micro.div_ceil(1_000_000).min(i64::MAX as u128) as i64
}

impl AccountState {
    /// A call is admitted only if what is not yet held covers its reservation.
    pub fn can_reserve(&self, reserve: i64) -> bool {
        self.balance.saturating_sub(self.reserved) >= reserve
    }

    pub fn reserve(&mut self, reserve: i64) {
        self.reserved = self.reserved.saturating_add(reserve);
    }

    /// Releases a reservation and debits the actual cost; the balance may go below zero by
    /// at most (cost − reserve).
    pub fn settle(&mut self, reserve: i64, cost: i64) {
        self.reserved = self.reserved.saturating_sub(reserve).max(0);
        self.balance = self.balance.saturating_sub(cost);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(input: u64, output: u64) -> Usage {
        Usage {
            input_tokens: input,
            output_tokens: output,
            total_tokens: input + output,
        }
    }

    #[test]
    fn cost_table() {
        let pricing = Pricing {
            input_per_mtok: 3_000_000,
            output_per_mtok: 15_000_000,
            reserve: 50_000,
        };
        let cases = [
            (usage(0, 0), 0),
            (usage(1, 0), 3),
            (usage(0, 1), 15),
            (usage(45, 32), 45 * 3 + 32 * 15),
        ];
        for (u, expected) in cases {
            assert_eq!(cost(&u, &pricing), expected, "{u:?}");
        }
        let fractional = Pricing {
            input_per_mtok: 1,
            output_per_mtok: 2,
            reserve: 1,
        };
        assert_eq!(cost(&usage(1, 0), &fractional), 1, "a fraction rounds up");
        assert_eq!(cost(&usage(0, 0), &fractional), 0);
        assert_eq!(cost(&usage(1_000_000, 0), &fractional), 1);
        assert_eq!(cost(&usage(1_000_001, 0), &fractional), 2);
    }

    #[test]
    fn cost_never_overflows() {
        let pricing = Pricing {
            input_per_mtok: u64::MAX,
            output_per_mtok: u64::MAX,
            reserve: 1,
        };
        assert_eq!(cost(&usage(u64::MAX / 2, u64::MAX / 2), &pricing), i64::MAX);
    }

    #[test]
    fn reservation_rule() {
        let cases = [
            // (balance, reserved, reserve, admitted)
            (100, 0, 100, true),
            (100, 1, 100, false),
            (100, 50, 50, true),
            (0, 0, 1, false),
            (-5, 0, 1, false),
            (0, 0, 0, true),
        ];
        for (balance, reserved, reserve, admitted) in cases {
            let state = AccountState { balance, reserved };
            assert_eq!(state.can_reserve(reserve), admitted, "{state:?} {reserve}");
        }
    }

    #[test]
    fn settle_releases_and_debits() {
        let mut state = AccountState {
            balance: 100,
            reserved: 0,
        };
        state.reserve(30);
        assert_eq!(state.reserved, 30);
        state.settle(30, 45);
        assert_eq!(
            state,
            AccountState {
                balance: 55,
                reserved: 0
            }
        );
    }
}
