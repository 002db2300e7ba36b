//! The ledger's syncs sent to Redis (slice.lua), each in a task of its own so that no call
//! waits for one, and idle slices given back four times a second.

use redis::Script;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::ledger::{Ledger, Sync};
use super::link::{Link, Op};
use super::protocol::{decode_slice, Invocation, SliceArgs, SLICE_LEASE_MS, SLICE_LUA};
use crate::clock::Clock;

/// How often idle slices are looked for.
const IDLE_CHECK_EVERY: Duration = Duration::from_millis(250);

pub struct Slicer {
    pub ledger: Ledger,
    /// Names this instance's slices in Redis, new at every start.
    instance: String,
    /// Numbers this instance's syncs, each marked done in Redis by its number.
    syncs_sent: AtomicU64,
    /// The ledger's own clock: every time it is given is read here.
    pub clock: Clock,
    link: Arc<Link>,
    script: Script,
}

impl Slicer {
    pub fn new(link: Arc<Link>) -> Arc<Self> {
        Arc::new(Self {
            ledger: Ledger::default(),
            instance: turnpike_core::ids::random_id("gw_", 12),
            syncs_sent: AtomicU64::new(0),
            clock: Clock::start(),
            link,
            script: Script::new(SLICE_LUA),
        })
    }

    /// Sends each sync in a task of its own.
    pub fn send(self: &Arc<Self>, syncs: Vec<Sync>) {
        for sync in syncs {
            tokio::spawn(Arc::clone(self).run(sync));
        }
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

/// Gives back what idle slices hold, until the store is gone.
pub async fn give_back_idle_slices(slicer: Weak<Slicer>) {
    let mut every = tokio::time::interval(IDLE_CHECK_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(slicer) = slicer.upgrade() else {
            return;
        };
        let mut syncs = Vec::new();
        slicer.ledger.idle(slicer.clock.now_ms(), &mut syncs);
        slicer.send(syncs);
    }
}
