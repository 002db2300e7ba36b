//! Settlements that could not be written because Redis was unreachable, held in order until
//! it is back. Replaying one is safe: each script run is idempotent per call id.

use parking_lot::Mutex;
use prometheus::{IntCounter, IntGauge};
use std::collections::VecDeque;

use super::protocol::Invocation;
use crate::store::StoreError;

/// One write a settlement still owes.
#[derive(Debug, Clone)]
pub enum Step {
    /// A settlement script run, then (on a Cluster) the usage log entry if it applied.
    Script {
        invocation: Invocation,
        stream_after: Option<redis::Cmd>,
    },
    /// A usage log entry whose settlement already applied.
    Stream(redis::Cmd),
}

pub struct SettlementQueue {
    items: Mutex<VecDeque<Vec<Step>>>,
    capacity: usize,
    queued: IntGauge,
    dropped: IntCounter,
}

impl SettlementQueue {
    pub fn new(capacity: usize, queued: IntGauge, dropped: IntCounter) -> Self {
        Self {
            items: Mutex::new(VecDeque::new()),
            capacity,
            queued,
            dropped,
        }
    }

    /// Holds `steps`; when the queue is full they are dropped, counted and logged.
    pub fn push(&self, steps: Vec<Step>) {
        let mut items = self.items.lock();
        if items.len() >= self.capacity {
            drop(items);
            self.dropped.inc();
            tracing::error!(
                capacity = self.capacity,
                "settlement queue full: a settlement was dropped"
            );
            return;
        }
        items.push_back(steps);
        self.queued.set(items.len() as i64);
    }

    /// Counts and logs a held settlement Redis refused, which is dropped.
    pub fn give_up(&self, error: &StoreError) {
        self.dropped.inc();
        tracing::error!(%error, "Redis refused a held settlement; it was dropped");
    }

    /// The oldest held settlement, taken out.
    pub fn pop(&self) -> Option<Vec<Step>> {
        let mut items = self.items.lock();
        let steps = items.pop_front();
        self.queued.set(items.len() as i64);
        steps
    }

    /// Puts back a settlement that still could not be written, first in line.
    pub fn put_back(&self, steps: Vec<Step>) {
        let mut items = self.items.lock();
        items.push_front(steps);
        self.queued.set(items.len() as i64);
    }

    pub fn is_empty(&self) -> bool {
        self.items.lock().is_empty()
    }
}
