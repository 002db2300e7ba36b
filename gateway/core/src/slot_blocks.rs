//! Blocks of concurrency slots (issue 23; the Redis store's `seats`): an instance leases a
//! block of a concurrency limit's slots from the store, seats its calls in it alone, renews
//! the block's lease at every sync while it holds it, and gives back the slots it does not
//! need. The store counts a block as that many slots taken, so the fleet never seats more
//! than the cap. A crashed instance's block goes back when its lease runs out.
//!
//! The end game, as for balances: once the free slots are too few to give out blocks
//! ([`BlockSizing::grant`] grants nothing), every instance gives back its unseated slots at its
//! next sync and seats calls one by one in the store again. A refusal caused only by a slot
//! free in another instance's block lasts until that sync, at most `sync_every_ms`.

/// How blocks are sized and leased.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizing {
    /// A block holds at most the cap divided by this.
    pub cap_divisor: u32,
    /// And never more than this many slots, however large the cap (the store names each).
    pub max_slots: u32,
    /// A limit whose largest block would hold fewer slots than this is not blocked: each
    /// call takes its slot in the store, as before.
    pub min_slots: u32,
    /// How long the store keeps a block for an instance that stops renewing it.
    pub lease_ms: u64,
    /// An instance holding a block syncs at least this often: renews it, trims it, and
    /// learns whether the limit went into its end game.
    pub sync_every_ms: u64,
}

pub const BLOCK_SIZING: BlockSizing = BlockSizing {
    cap_divisor: 4,
    max_slots: 1_000,
    min_slots: 4,
    lease_ms: 2_000,
    sync_every_ms: 250,
};

impl BlockSizing {
    /// Whether a limit of `cap` slots is large enough to lease in blocks.
    pub fn blocks(&self, cap: u32) -> bool {
        self.largest(cap) >= self.min_slots
    }

    /// Slots to hold for a peak of `peak` calls in flight here: a quarter more, at least
    /// `min_slots`, at most the largest block.
    pub fn want(&self, cap: u32, peak: u32) -> u32 {
        let wanted = peak.saturating_add(peak.div_ceil(4));
        wanted.clamp(self.min_slots, self.largest(cap).max(self.min_slots))
    }

    /// The shared side: how many of `ask` more slots to give when `taken` of `cap` are
    /// taken (by calls one by one, and by every block). Nothing once fewer than
    /// `min_slots` are free: the end game.
    pub fn grant(&self, cap: u32, taken: u32, ask: u32) -> u32 {
        let free = cap.saturating_sub(taken);
        if free < self.min_slots {
            return 0;
        }
        ask.min(free)
    }

    fn largest(&self, cap: u32) -> u32 {
        (cap / self.cap_divisor.max(1)).min(self.max_slots)
    }
}

/// What one instance holds of one concurrency limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SlotBlock {
    /// Slots the store counts as this instance's.
    pub leased: u32,
    /// Slots its calls sit in.
    pub seated: u32,
    /// The most seated at once since the last sync.
    pub peak: u32,
    /// When the lease runs out, as this instance reckons it: from the moment it asked, so
    /// never later than the store would say.
    pub lease_until_ms: u64,
}

impl SlotBlock {
    /// Seats one call, or `false` when the block has no free slot or its lease may have run
    /// out (the call then asks the store).
    pub fn seat(&mut self, now_ms: u64) -> bool {
        if self.seated >= self.leased || now_ms >= self.lease_until_ms {
            return false;
        }
        self.seated += 1;
        self.peak = self.peak.max(self.seated);
        true
    }

    /// A call seated here ended.
    pub fn leave(&mut self) {
        self.seated = self.seated.saturating_sub(1);
    }

    /// What to ask of the store at a sync begun at `now_ms`, for a limit of `cap`: the change
    /// in slots held (more when the block is full or nearly, fewer when it holds more than
    /// the peak needs; all unseated slots in the end game). The lease is renewed either way.
    pub fn sync_ask(&mut self, sizing: &BlockSizing, cap: u32, end_game: bool) -> i64 {
        let want = if end_game {
            self.seated
        } else {
            sizing.want(cap, self.peak.max(self.seated))
        };
        self.peak = self.seated;
        want as i64 - self.leased as i64
    }

    /// The store's answer to a sync asked at `asked_ms`: `granted` more slots (or, for a
    /// negative ask, the slots given back), the lease renewed from the moment it was asked.
    pub fn synced(&mut self, sizing: &BlockSizing, change: i64, asked_ms: u64) {
        let leased = (self.leased as i64 + change).max(self.seated as i64);
        self.leased = leased.clamp(0, u32::MAX as i64) as u32;
        self.lease_until_ms = asked_ms.saturating_add(sizing.lease_ms);
    }
}

/// The shared side of a sync: the instance's block goes from `held` slots by `ask` (more
/// only as far as [`BlockSizing::grant`] allows; fewer never below zero). Returns the change
/// made, which the instance applies with [`SlotBlock::synced`].
pub fn apply_sync(
    sizing: &BlockSizing,
    cap: u32,
    taken: &mut u32,
    held: &mut u32,
    ask: i64,
) -> i64 {
    if ask > 0 {
        let granted = sizing.grant(cap, *taken, ask.min(u32::MAX as i64) as u32);
        *taken += granted;
        *held += granted;
        granted as i64
    } else {
        let back = (ask.unsigned_abs().min(*held as u64)) as u32;
        *taken -= back;
        *held -= back;
        -(back as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dice::Dice;

    #[test]
    fn a_limit_is_leased_in_blocks_only_when_a_block_holds_a_few_slots() {
        assert!(BLOCK_SIZING.blocks(16));
        assert!(!BLOCK_SIZING.blocks(15));
        assert!(!BLOCK_SIZING.blocks(1));
        assert_eq!(BLOCK_SIZING.want(100, 0), 4);
        assert_eq!(BLOCK_SIZING.want(100, 8), 10);
        assert_eq!(
            BLOCK_SIZING.want(100, 80),
            25,
            "a quarter of the cap at most"
        );
        assert_eq!(BLOCK_SIZING.grant(100, 90, 8), 8);
        assert_eq!(BLOCK_SIZING.grant(100, 94, 8), 6);
        assert_eq!(BLOCK_SIZING.grant(100, 97, 8), 0, "the end game");
    }

    #[test]
    fn calls_sit_in_the_block_until_it_is_full_or_its_lease_may_have_run_out() {
        let mut block = SlotBlock::default();
        assert!(!block.seat(0), "nothing leased yet");
        let (mut taken, mut held) = (0, 0);
        let ask = block.sync_ask(&BLOCK_SIZING, 40, false);
        assert_eq!(ask, 4);
        let change = apply_sync(&BLOCK_SIZING, 40, &mut taken, &mut held, ask);
        block.synced(&BLOCK_SIZING, change, 100);
        for _ in 0..4 {
            assert!(block.seat(200));
        }
        assert!(!block.seat(200), "full");
        block.leave();
        assert!(block.seat(300));
        assert!(
            !block.seat(100 + BLOCK_SIZING.lease_ms),
            "the lease may be over"
        );
        assert_eq!((taken, held, block.peak), (4, 4, 4));
    }

    #[test]
    fn a_block_grows_to_its_peak_and_a_quarter_and_shrinks_when_the_peak_falls() {
        let mut block = SlotBlock::default();
        let (mut taken, mut held) = (7, 0);
        let mut sync = |block: &mut SlotBlock, end_game: bool, now: u64| {
            let ask = block.sync_ask(&BLOCK_SIZING, 100, end_game);
            let change = apply_sync(&BLOCK_SIZING, 100, &mut taken, &mut held, ask);
            block.synced(&BLOCK_SIZING, change, now);
        };
        sync(&mut block, false, 0);
        for _ in 0..4 {
            assert!(block.seat(1));
        }
        block.peak = 16;
        sync(&mut block, false, 250);
        assert_eq!(block.leased, 20);
        for _ in 0..4 {
            block.leave();
        }
        sync(&mut block, false, 500);
        assert_eq!(block.leased, 5, "back to its peak (4) and a quarter");
        sync(&mut block, true, 750);
        assert_eq!(block.leased, 0, "the end game takes every unseated slot");
        assert_eq!((taken, held), (7, 0));
    }

    #[derive(Default)]
    struct Instance {
        block: SlotBlock,
        held: u32,
        /// When each call seated here ends; `true` for a call seated in the store.
        calls: Vec<(u64, bool)>,
        next_sync_ms: u64,
        end_game_seen: bool,
    }

    /// Three instances under a cap of 40 slots, a call arriving every millisecond at a random
    /// instance: for 10 s calls of 1–40 ms (about half the cap in flight), then for 10 s
    /// calls of 1–400 ms (five times what the cap holds). The fleet never seats more than the
    /// cap; under it, no call is refused and nearly all are seated in blocks, without the
    /// store; over it, a call refused while a slot was free in another instance's block is
    /// refused for at most `sync_every_ms`.
    #[test]
    fn three_instances_on_blocks_never_seat_more_than_the_cap() {
        const CAP: u32 = 40;
        let mut longest_wait = 0;
        for seed in 1..=20u64 {
            let mut dice = Dice(seed * 0x9e37_79b9_7f4a_7c15);
            let mut instances: Vec<Instance> = (0..3)
                .map(|n| Instance {
                    next_sync_ms: n * 80,
                    ..Instance::default()
                })
                .collect();
            // Taken in the store: by calls one by one, and by every block.
            let mut taken = 0u32;
            let mut refused_since: Option<u64> = None;
            let (mut in_blocks, mut refused_under_cap) = (0u64, 0u64);
            for now in 0..20_000u64 {
                // Calls end; instances sync.
                for i in instances.iter_mut() {
                    i.calls.retain(|&(ends, in_store)| {
                        if ends > now {
                            return true;
                        }
                        if in_store {
                            taken -= 1;
                        } else {
                            i.block.leave();
                        }
                        false
                    });
                    if now >= i.next_sync_ms {
                        let ask = i.block.sync_ask(&BLOCK_SIZING, CAP, i.end_game_seen);
                        let change = apply_sync(&BLOCK_SIZING, CAP, &mut taken, &mut i.held, ask);
                        i.block.synced(&BLOCK_SIZING, change, now);
                        i.next_sync_ms = now + BLOCK_SIZING.sync_every_ms;
                        i.end_game_seen = BLOCK_SIZING.grant(CAP, taken, 1) == 0;
                    }
                }
                let under_cap = now < 10_000;
                let length = 1 + dice.roll(if under_cap { 40 } else { 400 });
                let i = &mut instances[dice.roll(3) as usize];
                if i.block.seat(now) {
                    in_blocks += u64::from(under_cap);
                    i.calls.push((now + length, false));
                } else if taken < CAP {
                    taken += 1;
                    i.calls.push((now + length, true));
                } else {
                    refused_under_cap += u64::from(under_cap);
                    if instances.iter().any(|i| i.block.seated < i.block.leased) {
                        let since = *refused_since.get_or_insert(now);
                        longest_wait = longest_wait.max(now - since);
                    }
                }
                if !instances.iter().any(|i| i.block.seated < i.block.leased) {
                    refused_since = None;
                }
                let seated: u32 = instances.iter().map(|i| i.calls.len() as u32).sum();
                assert!(seated <= CAP, "seed {seed}: {seated} seated at {now} ms");
                let leased: u32 = instances.iter().map(|i| i.held).sum();
                assert!(taken <= CAP && leased <= taken, "seed {seed} at {now} ms");
            }
            assert_eq!(refused_under_cap, 0, "seed {seed}");
            assert!(
                in_blocks >= 9_000,
                "seed {seed}: {in_blocks} of 10,000 in blocks"
            );
        }
        assert!(
            longest_wait <= BLOCK_SIZING.sync_every_ms,
            "refused for {longest_wait} ms while a slot elsewhere was free"
        );
    }
}
