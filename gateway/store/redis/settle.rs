//! Settlement on Redis: the writes a settlement owes (the sides' settle.lua runs and, on a
//! Cluster, its usage log entry), written now or held in the queue until Redis takes them.
//! Every write is idempotent per call id, so a held one is retried until it is written, and
//! only a write Redis refuses for good is dropped (counted, and logged whole).

use std::sync::{Arc, Weak};
use std::time::Duration;

use turnpike_core::admission::Settlement;

use super::batch::Kind;
use super::names::{usage_marker, SETTLED_MARKER_MS, USAGE_STREAM};
use super::protocol::{log_usage_args, Invocation};
use super::queue::{Held, Owed, SettlementQueue};
use super::split::{self, Plan, Purpose};
use super::RedisStore;
use crate::clock::unix_ms;
use crate::store::StoreError;

/// How often held settlements are retried while Redis takes them.
const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// The longest wait between retries while Redis keeps failing them.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl RedisStore {
    pub(super) async fn settle_on_redis(&self, call: &Settlement<'_>) {
        let mut syncs = Vec::new();
        let now = self.slicer.clock.now_ms();
        self.slicer.ledger.settle(call, now, &mut syncs);
        self.slicer.send(syncs);
        self.slicer.seats.settle(call);
        self.slicer.escrows.settle(call, now);
        self.fail_open.settle(call).await;
        let extended = self.extended_calls.take(call.call_id);
        if self.plan == Plan::Single && !extended {
            self.record_or_hold(call).await;
        } else {
            self.write_or_hold(call, Purpose::Settle).await;
        }
    }

    /// On one server: the settlement written unmarked, its run's mark making it apply once
    /// (no marker of its own to set, check and let go). What could not be written is held
    /// as [`RedisStore::write_or_hold`] holds it, with its own marker, and with the run's mark
    /// to check when that run may have applied it. A second settlement of a call settled
    /// here changes nothing; the first is written or held whatever becomes of its caller.
    async fn record_or_hold(&self, call: &Settlement<'_>) {
        if !self.recorded.first(call.call_id) {
            return;
        }
        let mut owed = self.owed_by(call, Purpose::Settle);
        if owed.is_empty() {
            return;
        }
        let tally = split::tally(call, self.stream_maxlen);
        let (batches, queue) = (Arc::clone(&self.batches), Arc::clone(&self.queue));
        let recording = tokio::spawn(async move {
            let Owed::Settle(invocation) = &mut owed[0] else {
                unreachable!("one server's settlement is one settle.lua run");
            };
            // A call that holds nothing in Redis is only recorded (a tally); any other is
            // settled by settle.lua, unmarked. Either way a retry is the marked settle.lua.
            let (kind, unmarked) = match tally {
                Some(tally) => (Kind::Tally, tally),
                None => (Kind::Record, invocation.clone()),
            };
            let recorded = batches.call_marked::<i64>(kind, unmarked).await;
            let Err((_, lost_run_mark)) = recorded else {
                return;
            };
            if let Some(mark) = lost_run_mark {
                check_run_mark(invocation, mark);
            }
            // Durable before the call's answer leaves (SPEC §2): its journal line written.
            if let Some(written) = queue.hold(owed) {
                let _ = written.await;
            }
        });
        let _ = recording.await;
    }

    /// Writes what the settlement owes, or holds what could not be written: the call's
    /// usage is not lost while Redis is away.
    pub(super) async fn write_or_hold(&self, call: &Settlement<'_>, purpose: Purpose) {
        let mut owed = self.owed_by(call, purpose);
        let mut markers = Vec::new();
        let outcome = self.write(&mut owed, &mut markers).await;
        // What was written is done (a hold journals only the rest): its markers can go.
        self.forget(markers);
        if outcome.is_err() {
            // Durable before the call's answer leaves (SPEC §2): its journal line written.
            if let Some(written) = self.queue.hold(owed) {
                let _ = written.await;
            }
        }
    }

    fn owed_by(&self, call: &Settlement, purpose: Purpose) -> Vec<Owed> {
        let mut owed = Vec::new();
        for side in split::settle_sides(call, self.plan, self.stream_maxlen, purpose) {
            owed.push(Owed::Settle(side.invocation));
            if side.account_side && !side.writes_stream && call.usage.is_some() {
                owed.push(Owed::LogUsage(self.usage_entry(call, unix_ms())));
            }
        }
        owed
    }

    /// log_usage.lua's run for a metered call, for a Cluster, where the stream lives in its
    /// own slot.
    fn usage_entry(&self, call: &Settlement, time_ms: u64) -> Invocation {
        let usage = call.usage.unwrap_or_default();
        let values = [
            call.call_id.to_owned(),
            call.request_id.to_owned(),
            time_ms.to_string(),
            call.account.to_owned(),
            call.key_id.to_owned(),
            call.agent.to_owned(),
            call.session_id.to_owned(),
            call.status.to_string(),
            usage.input_tokens.to_string(),
            usage.output_tokens.to_string(),
            usage.total_tokens.to_string(),
            call.cost.to_string(),
        ];
        Invocation {
            keys: vec![usage_marker(call.call_id), USAGE_STREAM.to_owned()],
            args: log_usage_args(call.call_id, SETTLED_MARKER_MS, self.stream_maxlen, values),
        }
    }

    /// Writes the owed writes in order; what could not be written is left in `owed`, and the
    /// markers of what was are added to `markers`.
    async fn write(
        &self,
        owed: &mut Vec<Owed>,
        markers: &mut Vec<String>,
    ) -> Result<(), StoreError> {
        let mut written = 0;
        let mut outcome = Ok(());
        for write in owed.iter() {
            // The reply (applied, or already applied) changes nothing here: either way
            // this write is done.
            let (kind, invocation) = match write {
                Owed::Settle(invocation) => (Kind::Settle, invocation),
                Owed::LogUsage(invocation) => (Kind::LogUsage, invocation),
            };
            // A copy goes in the run: the settlement stays held here whatever becomes of it.
            let written_now = self.batches.call::<i64>(kind, invocation.clone()).await;
            if let Err(error) = written_now {
                outcome = Err(error);
                break;
            }
            markers.extend(invocation.keys.first().cloned());
            written += 1;
        }
        owed.drain(..written);
        outcome
    }

    /// Lets the markers of written writes go after their grace: applied now or before, they
    /// have done their work.
    fn forget(&self, markers: Vec<String>) {
        for marker in markers {
            self.batches.forget(marker);
        }
    }

    /// Writes the held settlements, oldest first, until one fails: `Ok` once every one was
    /// written or dropped. One flush at a time (the flusher's, or the last one before exit);
    /// a flush cancelled mid-write puts the settlement it had taken back first in line.
    ///
    /// A held settlement's markers are let go only once it is written whole and the journal
    /// says so on disk: until then a restart replays every write its line lists, and each
    /// already applied must still find its marker.
    async fn flush(&self) -> Result<(), StoreError> {
        let _one_at_a_time = self.flushing.lock().await;
        while let Some(held) = self.queue.next() {
            let mut taken = Taken {
                queue: &self.queue,
                held: Some(held),
            };
            let owed = &mut taken.held.as_mut().expect("just taken").owed;
            let mut markers = Vec::new();
            loop {
                match self.write(owed, &mut markers).await {
                    Ok(()) => break,
                    // Redis refused this write for good: retrying cannot help, and must not
                    // hold up the settlement's other writes or those queued behind it.
                    Err(error) if !error.kind.is_transient() => {
                        let refused = owed.remove(0);
                        self.queue.give_up(&refused, &error);
                    }
                    // Put back by `taken`.
                    Err(error) => return Err(error),
                }
            }
            if let Some(held) = taken.held.take() {
                if let Some(on_disk) = self.queue.written(held) {
                    let _ = on_disk.await;
                }
                self.forget(markers);
            }
        }
        Ok(())
    }
}

/// Has a settle.lua run also check `mark`, of a run that may have applied it unmarked: a
/// key after those it writes.
fn check_run_mark(invocation: &mut Invocation, mark: String) {
    invocation.keys.push(mark);
}

/// How many call ids each generation of [`Recorded`] keeps.
const RECORDED_PER_GENERATION: usize = 50_000;

/// The calls settled here unmarked, lately: the last two generations of call ids (a second
/// settlement of a call comes within seconds of its first, when its first was cancelled).
#[derive(Default)]
pub struct Recorded {
    generations: parking_lot::Mutex<[std::collections::HashSet<Box<str>>; 2]>,
}

impl Recorded {
    /// Whether this is the first settlement of `call_id` here; it is noted.
    fn first(&self, call_id: &str) -> bool {
        let mut generations = self.generations.lock();
        if generations[1].contains(call_id) {
            return false;
        }
        if generations[0].len() >= RECORDED_PER_GENERATION {
            generations[1] = std::mem::take(&mut generations[0]);
        }
        generations[0].insert(call_id.into())
    }
}

/// A held settlement taken out of the queue to be written: back in the queue, first, unless
/// it was written (also when the flush is cancelled).
struct Taken<'a> {
    queue: &'a SettlementQueue,
    held: Option<Held>,
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if let Some(held) = self.held.take() {
            self.queue.put_back(held);
        }
    }
}

impl RedisStore {
    /// Before the process exits: one last try, for at most `within`, at the held
    /// settlements (after the flusher's, if it is writing); returns how many are still held
    /// (left in the journal, or logged as lost without one).
    pub(super) async fn write_held_before_exit(&self, within: Duration) -> usize {
        // What this instance holds of the shared limits goes back now, not at its lease.
        let giving_back = self.slicer.give_back_all();
        if tokio::time::timeout(within.min(Duration::from_secs(1)), giving_back)
            .await
            .is_err()
        {
            tracing::warn!("Redis did not take back every escrow and block before exit");
        }
        if self.queue.is_empty() {
            // The flusher may have one out of the queue: let it finish first.
            drop(tokio::time::timeout(within, self.flushing.lock()).await);
            if self.queue.is_empty() {
                return 0;
            }
        }
        let last_try = async {
            // As the flusher does: a link marked down fails fast until a ping brings it back.
            self.link.ping().await?;
            self.link.mark_up();
            self.flush().await
        };
        match tokio::time::timeout(within, last_try).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, "Redis did not take every held settlement before exit")
            }
            Err(_) => tracing::warn!(
                ?within,
                "Redis did not take every held settlement before exit: out of time"
            ),
        }
        // The process exits next, without dropping the journal: what it was handed goes
        // to disk first.
        self.queue.synced().await;
        self.queue.leave_behind()
    }
}

/// Writes held settlements whenever Redis takes them, backing off while it does not; brings
/// the link back up when Redis answers again. Also sends the markers to let go that no call
/// took along.
pub(super) async fn flush_held_settlements(store: Weak<RedisStore>) {
    let mut wait = FLUSH_EVERY;
    loop {
        tokio::time::sleep(wait).await;
        let Some(store) = store.upgrade() else { return };
        if !store.link.is_down() {
            store.batches.start_idle();
        }
        if !store.link.is_down() && store.queue.is_empty() {
            wait = FLUSH_EVERY;
            continue;
        }
        let flushed = match store.link.ping().await {
            Ok(()) => {
                store.link.mark_up();
                store.flush().await
            }
            Err(error) => Err(error),
        };
        match flushed {
            Ok(()) => wait = FLUSH_EVERY,
            Err(error) => {
                wait = (wait * 2).min(MAX_BACKOFF);
                tracing::debug!(%error, retry_in = ?wait, "held settlements wait for Redis");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the journal holds and a dropped settlement's log line shows: an operator can
    /// replay each write by hand (`EVALSHA`, its keys, its arguments).
    #[test]
    fn a_held_settlement_reads_back_as_it_was_written() {
        let owed = vec![
            Owed::Settle(Invocation {
                keys: vec!["turnpike:{account:a}:settled:call_1".into()],
                args: vec!["call_1".into()],
            }),
            Owed::LogUsage(Invocation {
                keys: vec![usage_marker("call_1"), USAGE_STREAM.into()],
                args: vec!["call_1".into()],
            }),
        ];
        let text = serde_json::to_string(&owed).unwrap();
        assert!(text.starts_with(r#"[{"settle":{"keys":["#), "{text}");
        assert_eq!(serde_json::from_str::<Vec<Owed>>(&text).unwrap(), owed);
    }
}
