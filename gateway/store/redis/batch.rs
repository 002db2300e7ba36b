//! Group commit: admissions and settlements waiting on Redis at the same moment go as one
//! `batch.lua` run, which reads and writes each bucket, account and usage row once for all
//! of them. One run per lane is under way at a time; what arrives meanwhile waits and goes
//! next, together, so batches grow with load and a quiet gateway sends each call alone.
//! Each caller is answered with its own call's reply, only after the run that carried it.
//!
//! A settlement may also go unmarked (`Kind::Record`, on one server): it sets no marker of
//! its own, and the run that carries it sets one mark for all (so a run sent again records
//! nothing twice). A record whose run's answer was lost is told the run's mark, which its
//! retry checks.
//!
//! A lane is where a run may go: on one server everything shares one; on a Cluster each
//! hash tag has its own, since one script's keys must share a slot.

use prometheus::Histogram;
use redis::{FromRedisValue, Script, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::oneshot;

use super::link::{reply_kind, Link, Op};
use super::names::{hash_tag, MARKER_GRACE_MS, SETTLED_MARKER_MS};
use super::protocol::{ForgetArgs, Invocation, BATCH_LUA};
use crate::store::{StoreError, StoreErrorKind};

/// The most calls one run carries: enough to share the work, few enough that no run holds
/// Redis (which runs one script at a time) for long.
const MOST_PER_RUN: usize = 64;

/// What a call in a run is: which script function runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Admit,
    Settle,
    /// A settlement without its own marker, applied once by its run's mark.
    Record,
    /// A settlement of a call that holds nothing in Redis: recorded only, unmarked too.
    Tally,
    /// A Cluster's usage log entry, in the stream's slot.
    LogUsage,
    /// A settled call's marker given its last grace ([`GroupCommit::forget`]).
    Forget,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Admit => "admit",
            Kind::Settle => "settle",
            Kind::Record => "record",
            Kind::Tally => "tally",
            Kind::LogUsage => "log_usage",
            Kind::Forget => "forget",
        }
    }

    /// Whether it sets no marker of its own: its run's mark says whether it was applied.
    fn unmarked(self) -> bool {
        matches!(self, Kind::Record | Kind::Tally)
    }

    /// The operation it is timed and counted as.
    fn op(self) -> Op {
        match self {
            Kind::Admit => Op::Admit,
            Kind::Settle | Kind::Record | Kind::Tally | Kind::LogUsage | Kind::Forget => Op::Settle,
        }
    }
}

/// A call waiting for a run.
struct Waiting {
    kind: Kind,
    invocation: Invocation,
    since: Instant,
    answer: oneshot::Sender<Answer>,
}

/// A call's reply, and the mark of the run that carried it when it was a record's and the
/// run's answer was lost.
struct Answer {
    reply: Result<Value, StoreError>,
    lost_run_mark: Option<String>,
}

#[derive(Default)]
struct Lane {
    waiting: Vec<Waiting>,
    /// A run of this lane is under way (its task sends what waits when it is back).
    running: bool,
}

pub struct GroupCommit {
    link: Arc<Link>,
    script: Script,
    /// Lanes by hash tag; on one server, the one lane `""`.
    lanes: Mutex<HashMap<String, Lane>>,
    by_tag: bool,
    /// Calls per run.
    sizes: Histogram,
    /// Names this gateway's run marks, new at every start, and numbers them.
    id: String,
    marks: AtomicU64,
}

impl GroupCommit {
    pub fn new(link: Arc<Link>, cluster: bool, sizes: Histogram) -> Arc<Self> {
        Arc::new(Self {
            link,
            script: Script::new(BATCH_LUA),
            lanes: Mutex::new(HashMap::new()),
            by_tag: cluster,
            sizes,
            id: turnpike_core::ids::random_id("gc_", 12),
            marks: AtomicU64::new(0),
        })
    }

    /// Runs `invocation` (an admit.lua, settle.lua or log_usage.lua call) in the next run of
    /// its lane, and answers with its own reply.
    pub async fn call<T: FromRedisValue>(
        self: &Arc<Self>,
        kind: Kind,
        invocation: Invocation,
    ) -> Result<T, StoreError> {
        self.call_marked(kind, invocation)
            .await
            .map_err(|(error, _)| error)
    }

    /// As [`GroupCommit::call`]; a failed record's error comes with the mark of its run
    /// when that run may have applied it.
    pub async fn call_marked<T: FromRedisValue>(
        self: &Arc<Self>,
        kind: Kind,
        invocation: Invocation,
    ) -> Result<T, (StoreError, Option<String>)> {
        let answered = self.enqueue(kind, invocation);
        let Answer {
            reply,
            lost_run_mark,
        } = answered.await.unwrap_or_else(|_| Answer {
            reply: Err(StoreError::new(
                StoreErrorKind::Unanswered,
                "the group commit carrying this call ended without an answer",
            )),
            lost_run_mark: None,
        });
        let reply = reply.map_err(|error| (error, lost_run_mark))?;
        T::from_redis_value(reply).map_err(|e| {
            let error = StoreError::new(StoreErrorKind::Refused, format!("unexpected reply: {e}"));
            (error, None)
        })
    }

    /// Gives a settled call's marker its last [`MARKER_GRACE_MS`], riding the next run of its
    /// lane (one that [`GroupCommit::start_idle`] starts, if no call comes): it costs no run
    /// of its own while calls flow. One lost is a marker that lives its full time, never a
    /// settlement applied twice.
    pub fn forget(self: &Arc<Self>, marker: String) {
        let invocation = Invocation {
            keys: vec![marker],
            args: ForgetArgs {
                grace_ms: MARKER_GRACE_MS,
            }
            .encode(),
        };
        let lane = self.lane_of(&invocation);
        let (answer, _) = oneshot::channel();
        let waiting = Waiting {
            kind: Kind::Forget,
            invocation,
            since: Instant::now(),
            answer,
        };
        let mut lanes = self.lanes.lock().expect("lanes");
        lanes.entry(lane).or_default().waiting.push(waiting);
    }

    /// Starts a run in every lane where something waits and nothing runs (forgets no call
    /// took along).
    pub fn start_idle(self: &Arc<Self>) {
        let idle: Vec<String> = {
            let mut lanes = self.lanes.lock().expect("lanes");
            lanes
                .iter_mut()
                .filter(|(_, lane)| !lane.running && !lane.waiting.is_empty())
                .map(|(name, lane)| {
                    lane.running = true;
                    name.clone()
                })
                .collect()
        };
        for lane in idle {
            self.spawn_runner(lane);
        }
    }

    fn lane_of(&self, invocation: &Invocation) -> String {
        match (self.by_tag, invocation.keys.first()) {
            (true, Some(key)) => hash_tag(key).to_owned(),
            _ => String::new(),
        }
    }

    fn spawn_runner(self: &Arc<Self>, lane: String) {
        // Its own task: a caller that goes away does not stop the run the others wait on.
        let runner = Runner {
            commit: Arc::clone(self),
            lane,
            done: false,
        };
        tokio::spawn(runner.run_lane());
    }

    /// Puts `invocation` in its lane, starting the lane's runner when none runs; the
    /// receiver has its reply once the run that carried it is back.
    fn enqueue(self: &Arc<Self>, kind: Kind, invocation: Invocation) -> oneshot::Receiver<Answer> {
        let lane = self.lane_of(&invocation);
        let (answer, answered) = oneshot::channel();
        let start = {
            let mut lanes = self.lanes.lock().expect("lanes");
            let waiting = lanes.entry(lane.clone()).or_default();
            waiting.waiting.push(Waiting {
                kind,
                invocation,
                since: Instant::now(),
                answer,
            });
            !std::mem::replace(&mut waiting.running, true)
        };
        if start {
            self.spawn_runner(lane);
        }
        answered
    }

    async fn run(self: &Arc<Self>, batch: Vec<Waiting>) {
        self.sizes.observe(batch.len() as f64);
        let mut call = self.script.prepare_invoke();
        let mark = batch.iter().any(|w| w.kind.unmarked()).then(|| {
            let n = self.marks.fetch_add(1, Ordering::Relaxed);
            format!("turnpike:run:{}:{n}", self.id)
        });
        if let Some(mark) = &mark {
            call.arg("mark").arg(1).arg(1).arg(SETTLED_MARKER_MS);
            call.key(mark);
        }
        for waiting in &batch {
            let Invocation { keys, args } = &waiting.invocation;
            call.arg(waiting.kind.name())
                .arg(keys.len())
                .arg(args.len());
            for arg in args {
                call.arg(arg);
            }
            for key in keys {
                call.key(key);
            }
        }
        let marked = usize::from(mark.is_some());
        let replies = match self.link.invoke_batch(&call).await {
            Ok(Value::Array(mut replies)) if replies.len() == batch.len() + marked => {
                replies.drain(..marked);
                Ok(replies)
            }
            Ok(other) => Err((
                StoreErrorKind::Refused,
                format!("unexpected group commit reply {other:?}"),
            )),
            Err(error) => Err((error.kind, error.to_string())),
        };
        match replies {
            Ok(replies) => {
                for (waiting, reply) in batch.into_iter().zip(replies) {
                    let reply = own_reply(reply);
                    self.answer(waiting, reply, None);
                }
                // Answered: no retry will look for the mark.
                if let Some(mark) = mark {
                    self.forget(mark);
                }
            }
            Err((kind, message)) => {
                // The run may have applied (an answer lost, a script that failed part-way):
                // a record's retry must check its mark.
                let maybe = StoreError::new(kind, message.clone())
                    .kind
                    .may_have_applied();
                for waiting in batch {
                    let lost_run_mark = mark.clone().filter(|_| maybe && waiting.kind.unmarked());
                    self.answer(
                        waiting,
                        Err(StoreError::new(kind, message.clone())),
                        lost_run_mark,
                    );
                }
            }
        }
    }

    fn answer(
        &self,
        waiting: Waiting,
        reply: Result<Value, StoreError>,
        lost_run_mark: Option<String>,
    ) {
        // A forget is no operation of a call's: it is neither timed nor counted.
        if waiting.kind != Kind::Forget {
            self.link
                .observe(waiting.kind.op(), waiting.since.elapsed(), reply.is_err());
        }
        // A caller that stopped waiting (its client went away) needs no answer.
        drop(waiting.answer.send(Answer {
            reply,
            lost_run_mark,
        }));
    }
}

/// The task sending a lane's runs. If it ends before the lane is empty (its runtime shuts
/// down, or it panics), the lane is marked idle, so the next caller starts another: no call
/// waits on a runner that is gone. The calls of a run it dropped are answered as unanswered.
struct Runner {
    commit: Arc<GroupCommit>,
    lane: String,
    done: bool,
}

impl Runner {
    /// Sends what waits in the lane, run after run, until nothing does.
    async fn run_lane(mut self) {
        loop {
            let batch = {
                let mut lanes = self.commit.lanes.lock().expect("lanes");
                let Some(waiting) = lanes.get_mut(&self.lane) else {
                    self.done = true;
                    return;
                };
                if waiting.waiting.is_empty() {
                    lanes.remove(&self.lane);
                    self.done = true;
                    return;
                }
                let take = waiting.waiting.len().min(MOST_PER_RUN);
                waiting.waiting.drain(..take).collect::<Vec<_>>()
            };
            self.commit.run(batch).await;
        }
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        if !self.done {
            let mut lanes = self
                .commit
                .lanes
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(lane) = lanes.get_mut(&self.lane) {
                lane.running = false;
            }
        }
    }
}

/// One call's reply within a run: a call whose script failed has its error's text there
/// (`WRONGTYPE ...`), read as Redis's error reply would be.
fn own_reply(reply: Value) -> Result<Value, StoreError> {
    let text = match &reply {
        Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        Value::SimpleString(text) => text.clone(),
        _ => return Ok(reply),
    };
    let (code, detail) = text.split_once(' ').unwrap_or((&text, ""));
    Err(StoreError::new(reply_kind(code, detail), text.clone()))
}
