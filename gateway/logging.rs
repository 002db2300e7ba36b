//! Log output: lines are gathered in memory and written to stderr in batches by a thread of
//! their own, so an access-log line costs a call a copy, not a syscall (the same trade as
//! nginx's `access_log ... buffer=64k flush=200ms`), and a slow disk or a full pipe behind
//! stderr never stalls a call. A line reaches stderr within `FLUSH_EVERY`, sooner when
//! `FLUSH_AT_BYTES` have gathered. While stderr takes nothing, at most `MAX_PENDING_BYTES`
//! wait; lines beyond that are dropped, counted, and the count is logged once stderr
//! takes lines again.

use parking_lot::{Condvar, Mutex};
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;
use tracing_subscriber::fmt::MakeWriter;

const FLUSH_EVERY: Duration = Duration::from_millis(200);
const FLUSH_AT_BYTES: usize = 64 * 1024;
const MAX_PENDING_BYTES: usize = 16 * 1024 * 1024;

static WRITER: OnceLock<BatchedStderr> = OnceLock::new();

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

/// Installs the process's logger (level from `RUST_LOG`, `info` by default) writing batches
/// to stderr; flush the returned writer before the process exits on its own.
pub fn init(format: Format) -> &'static BatchedStderr {
    let writer = BatchedStderr::start();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    match format {
        Format::Text => builder.init(),
        Format::Json => builder.json().init(),
    }
    writer
}

extern "C" fn flush_at_exit() {
    if let Some(writer) = WRITER.get() {
        writer.flush();
    }
}

pub struct BatchedStderr {
    pending: Mutex<Vec<u8>>,
    /// Wakes the writer thread early, once a batch is large.
    batch_ready: Condvar,
    /// Held while writing, so batches reach stderr in the order they were taken.
    writing: Mutex<()>,
    /// Lines dropped while stderr took nothing, not yet reported.
    dropped: AtomicU64,
}

impl BatchedStderr {
    /// The process-wide writer, with its writer thread started and a final flush registered
    /// for process exit (Pingora ends the process with `exit`).
    pub fn start() -> &'static Self {
        let writer: &'static Self = WRITER.get_or_init(|| Self {
            pending: Mutex::new(Vec::with_capacity(FLUSH_AT_BYTES)),
            batch_ready: Condvar::new(),
            writing: Mutex::new(()),
            dropped: AtomicU64::new(0),
        });
        // SAFETY: `flush_at_exit` is a plain `extern "C" fn` that touches only a static.
        unsafe {
            libc::atexit(flush_at_exit);
        }
        std::thread::Builder::new()
            .name("log writer".into())
            .spawn(move || loop {
                {
                    let mut pending = writer.pending.lock();
                    if pending.len() < FLUSH_AT_BYTES {
                        writer.batch_ready.wait_for(&mut pending, FLUSH_EVERY);
                    }
                }
                writer.flush();
            })
            .expect("spawning the log writer");
        writer
    }

    /// Writes out everything gathered so far, on the calling thread.
    pub fn flush(&self) {
        let _in_order = self.writing.lock();
        let batch = std::mem::replace(
            &mut *self.pending.lock(),
            Vec::with_capacity(FLUSH_AT_BYTES),
        );
        let mut stderr = std::io::stderr().lock();
        if !batch.is_empty() {
            let _ = stderr.write_all(&batch);
        }
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let _ = writeln!(
                stderr,
                "turnpike: {dropped} log lines were dropped: stderr did not take them fast enough"
            );
        }
    }
}

/// One log event's write; appends to the batch.
pub struct LineWriter<'a>(&'a BatchedStderr);

impl Write for LineWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let mut pending = self.0.pending.lock();
        if pending.len() + bytes.len() > MAX_PENDING_BYTES {
            self.0.dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(bytes.len());
        }
        pending.extend_from_slice(bytes);
        if pending.len() >= FLUSH_AT_BYTES {
            self.0.batch_ready.notify_one();
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for &'static BatchedStderr {
    type Writer = LineWriter<'static>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter(self)
    }
}
