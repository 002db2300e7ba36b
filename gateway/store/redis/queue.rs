//! Settlements that could not be written yet, held in order until Redis takes them. Replaying
//! one is safe: every write it owes is idempotent per call id. With `store.journal_dir` set,
//! each held settlement is also appended to a journal on disk as it is held, and marked done
//! once written, so a gateway stopped or killed during an outage replays, after its restart,
//! exactly the settlements it still owed. A replay finds a write already applied by its
//! marker, which lives [`SETTLED_MARKER_MS`] unless the gateway shortens it; a journalled
//! settlement older than that is not replayed (it may have been applied, and its marker
//! gone) but logged whole, for an operator to reconcile.

use parking_lot::Mutex;
use prometheus::{IntCounter, IntGauge};
use std::collections::VecDeque;
use std::path::Path;

use super::journal::{Entry, Journal, Written};
use super::names::SETTLED_MARKER_MS;
use super::protocol::Invocation;
use crate::clock::unix_ms;
use crate::store::StoreError;

/// One write a settlement owes Redis.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Owed {
    /// A settle.lua run: releases, charges, counts (and on one server logs the usage).
    Settle(Invocation),
    /// A log_usage.lua run: the usage log entry, on a Cluster.
    LogUsage(Invocation),
}

/// A settlement waiting for Redis: the writes it still owes, in order.
#[derive(Debug)]
pub struct Held {
    /// Its line in the journal (0 without one).
    pub seq: u64,
    pub owed: Vec<Owed>,
}

/// How much younger than its markers' life a journalled settlement must be to be replayed:
/// a margin for clocks and for the time the replay itself takes.
const REPLAY_MARGIN_MS: u64 = 24 * 3_600_000;

pub struct SettlementQueue {
    items: Mutex<VecDeque<Held>>,
    capacity: usize,
    journal: Option<Journal<Vec<Owed>>>,
    queued: IntGauge,
    dropped: IntCounter,
}

impl SettlementQueue {
    /// A queue of at most `capacity` settlements; with a journal directory, it starts with
    /// what the journal there still owes from an earlier run.
    pub fn open(
        capacity: usize,
        journal_dir: Option<&Path>,
        queued: IntGauge,
        dropped: IntCounter,
    ) -> std::io::Result<Self> {
        let (journal, owed) = match journal_dir {
            Some(dir) => {
                let (journal, owed) = Journal::open(dir)?;
                let owed = replayable(&journal, owed, unix_ms(), &dropped);
                (Some(journal), owed)
            }
            None => (None, Vec::new()),
        };
        if !owed.is_empty() {
            tracing::warn!(
                settlements = owed.len(),
                "the settlement journal holds settlements an earlier run could not write; they are replayed once Redis answers"
            );
        }
        let items: VecDeque<Held> = owed
            .into_iter()
            .map(|entry| Held {
                seq: entry.seq,
                owed: entry.owed,
            })
            .collect();
        queued.set(items.len() as i64);
        Ok(Self {
            items: Mutex::new(items),
            capacity,
            journal,
            queued,
            dropped,
        })
    }

    /// Holds a settlement's writes; when the queue is full they are dropped, counted, and
    /// logged whole so they can be replayed by hand. With a journal, returns when its line
    /// will have been written.
    pub fn hold(&self, owed: Vec<Owed>) -> Option<Written> {
        let mut items = self.items.lock();
        if items.len() >= self.capacity {
            drop(items);
            self.dropped.inc();
            tracing::error!(
                capacity = self.capacity,
                settlement = %as_json(&owed),
                "settlement queue full: a settlement was dropped"
            );
            return None;
        }
        let (seq, written) = match &self.journal {
            Some(journal) => {
                let (seq, written) = journal.append(&owed, unix_ms());
                (seq, Some(written))
            }
            None => (0, None),
        };
        items.push_back(Held { seq, owed });
        self.queued.set(items.len() as i64);
        written
    }

    /// The oldest held settlement, taken out.
    pub fn next(&self) -> Option<Held> {
        let mut items = self.items.lock();
        let held = items.pop_front();
        self.queued.set(items.len() as i64);
        held
    }

    /// Puts back a settlement that still could not be written, first in line.
    pub fn put_back(&self, held: Held) {
        let mut items = self.items.lock();
        items.push_front(held);
        self.queued.set(items.len() as i64);
    }

    /// A held settlement is written (or what Redis refused of it given up): the journal
    /// forgets it. With a journal, returns when that is on disk.
    pub fn written(&self, held: Held) -> Option<Written> {
        let journal = self.journal.as_ref()?;
        let items = self.items.lock();
        Some(journal.done(held.seq, items.is_empty()))
    }

    /// Returns when the journal has everything handed to it on disk (at once without one).
    pub async fn synced(&self) {
        if let Some(journal) = &self.journal {
            let _ = journal.synced().await;
        }
    }

    /// Counts and logs, whole, one write of a held settlement that Redis refused for good;
    /// it is dropped.
    pub fn give_up(&self, write: &Owed, error: &StoreError) {
        self.dropped.inc();
        tracing::error!(
            %error,
            write = %serde_json::to_string(write).unwrap_or_default(),
            "Redis refused a held settlement's write for good; it was dropped"
        );
    }

    pub fn is_empty(&self) -> bool {
        self.items.lock().is_empty()
    }

    /// The process is exiting with settlements still held: with a journal they stay in it,
    /// for the next start to replay; without one each is counted as dropped and logged whole,
    /// to be replayed by hand. Returns how many were held.
    pub fn leave_behind(&self) -> usize {
        let items = self.items.lock();
        if self.journal.is_some() {
            if !items.is_empty() {
                tracing::warn!(
                    settlements = items.len(),
                    "exiting with settlements Redis has not taken; the journal keeps them for the next start"
                );
            }
            return items.len();
        }
        for held in items.iter() {
            self.dropped.inc();
            tracing::error!(
                settlement = %as_json(&held.owed),
                "exiting with a settlement Redis has not taken and no journal: it is lost"
            );
        }
        items.len()
    }
}

/// The writes as one JSON line, for a log an operator can replay from.
fn as_json(owed: &[Owed]) -> String {
    serde_json::to_string(owed).unwrap_or_default()
}

/// What a journal owes that may be replayed at `now_ms`: a settlement held longer ago than
/// its markers live is logged whole, counted as dropped and marked done instead.
fn replayable(
    journal: &Journal<Vec<Owed>>,
    owed: Vec<Entry<Vec<Owed>>>,
    now_ms: u64,
    dropped: &IntCounter,
) -> Vec<Entry<Vec<Owed>>> {
    let oldest_safe = now_ms.saturating_sub(SETTLED_MARKER_MS - REPLAY_MARGIN_MS);
    let (replayable, too_old): (Vec<_>, Vec<_>) = owed
        .into_iter()
        .partition(|entry| entry.at_ms == 0 || entry.at_ms >= oldest_safe);
    for entry in too_old {
        dropped.inc();
        tracing::error!(
            held_at_ms = entry.at_ms,
            settlement = %as_json(&entry.owed),
            "a journalled settlement is older than its markers live, so a replay could apply it twice: not replayed; reconcile it by hand (its call id is in it)"
        );
        drop(journal.done(entry.seq, false));
    }
    replayable
}
