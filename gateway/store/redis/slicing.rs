//! The ledger's syncs sent to Redis (slice.lua, block.lua, escrow.lua), each in a task of
//! its own so that no call waits for one; idle slices given back, blocks and escrows synced
//! four times a second.

use redis::Script;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use turnpike_core::slot_blocks::BLOCK_SIZING;

use super::escrows::{EscrowSync, Escrows, ESCROW_LEASE_MS};
use super::ledger::{Ledger, Sync};
use super::link::{Link, Op};
use super::names::account_hash;
use super::protocol::{
    decode_block, decode_escrow, decode_slice, BlockArgs, EscrowArgs, Invocation, SliceArgs,
    BLOCK_LUA, ESCROW_LUA, SLICE_LEASE_MS, SLICE_LUA,
};
use super::seats::{BlockSync, Seats};
use crate::clock::Clock;
use turnpike_core::escrow::ESCROW_SIZING;

/// How often idle slices are looked for.
const IDLE_CHECK_EVERY: Duration = Duration::from_millis(250);

pub struct Slicer {
    pub ledger: Ledger,
    pub seats: Seats,
    pub escrows: Escrows,
    /// Names this instance's slices in Redis, new at every start.
    instance: String,
    /// Numbers this instance's syncs, each marked done in Redis by its number.
    syncs_sent: AtomicU64,
    /// The ledger's own clock: every time it is given is read here.
    pub clock: Clock,
    link: Arc<Link>,
    script: Script,
    block_script: Script,
    escrow_script: Script,
}

impl Slicer {
    pub fn new(link: Arc<Link>) -> Arc<Self> {
        Arc::new(Self {
            ledger: Ledger::default(),
            seats: Seats::default(),
            escrows: Escrows::default(),
            instance: turnpike_core::ids::random_id("gw_", 12),
            syncs_sent: AtomicU64::new(0),
            clock: Clock::start(),
            link,
            script: Script::new(SLICE_LUA),
            block_script: Script::new(BLOCK_LUA),
            escrow_script: Script::new(ESCROW_LUA),
        })
    }

    /// Sends each sync in a task of its own.
    pub fn send(self: &Arc<Self>, syncs: Vec<Sync>) {
        for sync in syncs {
            tokio::spawn(Arc::clone(self).run(sync));
        }
    }

    /// Sends each block's sync in a task of its own.
    pub fn send_blocks(self: &Arc<Self>, syncs: Vec<BlockSync>) {
        for sync in syncs {
            tokio::spawn(Arc::clone(self).run_block(sync));
        }
    }

    async fn run_block(self: Arc<Self>, sync: BlockSync) {
        let asked_ms = self.clock.now_ms();
        let invocation = Invocation {
            keys: vec![sync.of.inflight.clone()],
            args: BlockArgs {
                instance: &self.instance,
                cap: sync.of.cap,
                target: sync.target,
                upper: sync.upper,
                lease_ms: BLOCK_SIZING.lease_ms,
                min_slots: BLOCK_SIZING.min_slots,
            }
            .encode(),
        };
        let reply = self
            .link
            .invoke_within::<Vec<i64>>(
                Op::Slice,
                self.link.timeout,
                &self.block_script,
                &invocation,
            )
            .await;
        let mut held = sync.held.lock();
        match reply.as_deref().map(decode_block) {
            Ok(Some(reply)) => held.synced(&sync, reply, asked_ms),
            Ok(None) | Err(_) => held.unsynced(asked_ms),
        }
    }

    /// Sends each escrow's sync in a task of its own.
    pub fn send_escrows(self: &Arc<Self>, syncs: Vec<EscrowSync>) {
        for sync in syncs {
            tokio::spawn(Arc::clone(self).run_escrow(sync));
        }
    }

    async fn run_escrow(self: Arc<Self>, sync: EscrowSync) {
        let asked_ms = self.clock.now_ms();
        let number = sync
            .number
            .unwrap_or_else(|| self.syncs_sent.fetch_add(1, Ordering::Relaxed));
        let account = account_hash(&sync.account);
        let invocation = Invocation {
            keys: vec![
                account.clone(),
                super::names::account_leases(&sync.account),
                format!("{account}:escrow:{}:{number}", self.instance),
            ],
            args: EscrowArgs {
                id: &format!("escrow:{}", self.instance),
                ask: sync.ask,
                released: sync.flush.released,
                reserve: sync.reserve,
                lease_ms: ESCROW_LEASE_MS,
                sizing: ESCROW_SIZING,
            }
            .encode(),
        };
        let reply = self
            .link
            .invoke_within::<Vec<i64>>(
                Op::Slice,
                self.link.timeout,
                &self.escrow_script,
                &invocation,
            )
            .await;
        let mut held = sync.held.lock();
        match reply.as_deref().map(decode_escrow) {
            Ok(Some(reply)) => held.synced(&sync, reply, asked_ms),
            Ok(None) => held.unsynced(&sync, number, false),
            Err(error) => held.unsynced(&sync, number, !error.kind.may_have_applied()),
        }
    }

    /// Before the process exits: its escrows and blocks given back, and their syncs waited
    /// for (slices need not be: what they hold stops counting 2 s after the last sync).
    pub async fn give_back_all(self: &Arc<Self>) {
        let mut escrow_syncs = Vec::new();
        self.escrows.give_back_all(&mut escrow_syncs);
        let mut block_syncs = Vec::new();
        self.seats
            .give_back_all(self.clock.now_ms(), &mut block_syncs);
        let escrows = escrow_syncs
            .into_iter()
            .map(|sync| Arc::clone(self).run_escrow(sync));
        let blocks = block_syncs
            .into_iter()
            .map(|sync| Arc::clone(self).run_block(sync));
        futures_util::future::join(
            futures_util::future::join_all(escrows),
            futures_util::future::join_all(blocks),
        )
        .await;
    }

    async fn run(self: Arc<Self>, sync: Sync) {
        let asked_ms = self.clock.now_ms();
        let invocation = Invocation {
            keys: vec![
                sync.of.keys[0].clone(),
                sync.of.keys[1].clone(),
                format!(
                    "{}:sync:{}:{}",
                    sync.of.keys[0],
                    self.instance,
                    self.syncs_sent.fetch_add(1, Ordering::Relaxed)
                ),
            ],
            args: SliceArgs {
                bucket: sync.of.bucket,
                // A slice taken under another spec (before a reload) is held apart.
                instance: &format!(
                    "{}.{}.{}.{}",
                    self.instance, sync.of.spec.rate, sync.of.spec.period_ms, sync.of.spec.burst
                ),
                spec: sync.of.spec,
                ask_tokens: sync.ask_tokens,
                give_units: sync.give_units,
                keep_units: sync.keep_units,
                lease_ms: SLICE_LEASE_MS,
            }
            .encode(),
        };
        let reply = self
            .link
            .invoke_within::<Vec<i64>>(Op::Slice, self.link.timeout, &self.script, &invocation)
            .await;
        let mut held = sync.held.lock();
        match reply.as_deref().map(decode_slice) {
            Ok(Some(reply)) => held.synced(&sync, reply, asked_ms),
            Ok(None) => held.unsynced(sync.give_units, false),
            Err(error) => held.unsynced(sync.give_units, !error.kind.may_have_applied()),
        }
    }
}

/// Gives back what idle slices hold, and syncs the blocks, until the store is gone.
pub async fn give_back_idle_slices(slicer: Weak<Slicer>) {
    let mut every = tokio::time::interval(IDLE_CHECK_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(slicer) = slicer.upgrade() else {
            return;
        };
        let mut syncs = Vec::new();
        let now = slicer.clock.now_ms();
        slicer.ledger.idle(now, &mut syncs);
        slicer.send(syncs);
        let mut block_syncs = Vec::new();
        slicer.seats.tick(now, &mut block_syncs);
        slicer.send_blocks(block_syncs);
        let mut escrow_syncs = Vec::new();
        slicer.escrows.tick(now, &mut escrow_syncs);
        slicer.send_escrows(escrow_syncs);
    }
}
