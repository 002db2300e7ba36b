//! Turnpike's decision core: everything a call is judged by, as plain functions of plain
//! data. No I/O, no clock reads (time is passed in), no Pingora, Tokio or Redis: the stores
//! and the proxy depend on this crate, never the reverse, and every rule here is tested alone.
//!
//! - [`head`]: where an HTTP/1 request head ends, and whether it is too large.
//! - [`h2_watch`]: which HTTP/2 requests sent a `:path` with a fragment (HPACK decoded).
//! - [`route`]: which route a request line names; upstream path templates.
//! - [`ids`]: the shapes of agent, session and request ids, and new random ids.
//! - [`keys`]: `Authorization` parsing, key hashing and checksums, what a key may call.
//! - [`body`]: the chat request body, judged before anything is spent.
//! - [`limits`]: token buckets in exact integer units.
//! - [`admission`]: the admission and settlement decisions over buckets, slots and balance.
//! - [`slices`]: slices of a shared token bucket, decided against locally (issue 23; the
//!   Redis store's ledger).
//! - [`escrow`]: slices of an account's balance, reserved and charged against locally
//!   (issue 23; not yet used by the stores).
//! - [`slot_blocks`]: blocks of a concurrency limit's slots, leased and seated in locally
//!   (issue 23; not yet used by the stores).
//! - [`billing`]: prices, cost and the balance rule.
//! - [`usage`]: reading and judging the `usage` a worker reports.
//! - [`sse`]: a streamed answer cut into events, and what they report.
//! - [`units`]: durations and times as operators write them.
//! - [`trace`]: the W3C `traceparent` a worker receives.

pub mod admission;
pub mod billing;
pub mod body;
pub mod escrow;
pub mod h2_watch;
pub mod head;
pub mod ids;
pub mod keys;
pub mod limits;
pub mod route;
pub mod slices;
pub mod slot_blocks;
pub mod sse;
pub mod trace;
pub mod units;
pub mod usage;

/// The fleet simulations' dice (escrow, slot blocks): xorshift, the same rolls on every run.
#[cfg(test)]
mod test_dice {
    pub struct Dice(pub u64);

    impl Dice {
        pub fn roll(&mut self, sides: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % sides
        }
    }
}
