//! Log output: lines are gathered in memory and written to stderr in batches, so an
//! access-log line costs a call a copy, not a syscall (the same trade as nginx's
//! `access_log ... buffer=64k flush=200ms`). A line reaches stderr within `FLUSH_EVERY`.

use parking_lot::Mutex;
use std::io::{IsTerminal, Write};
use std::sync::OnceLock;
use std::time::Duration;
use tracing_subscriber::fmt::MakeWriter;

const FLUSH_EVERY: Duration = Duration::from_millis(200);
const FLUSH_AT_BYTES: usize = 64 * 1024;

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
    writing: Mutex<()>,
}

impl BatchedStderr {
    /// The process-wide writer, with its background flusher started and a final flush
    /// registered for process exit (Pingora ends the process with `exit`).
    pub fn start() -> &'static Self {
        let writer: &'static Self = WRITER.get_or_init(|| Self {
            pending: Mutex::new(Vec::with_capacity(FLUSH_AT_BYTES)),
            writing: Mutex::new(()),
        });
        // SAFETY: `flush_at_exit` is a plain `extern "C" fn` that touches only a static.
        unsafe {
            libc::atexit(flush_at_exit);
        }
        std::thread::Builder::new()
            .name("log flusher".into())
            .spawn(move || loop {
                std::thread::sleep(FLUSH_EVERY);
                writer.flush();
            })
            .expect("spawning the log flusher");
        writer
    }

    /// Writes out everything gathered so far.
    pub fn flush(&self) {
        // Held while writing, so batches reach stderr in the order they were taken.
        let _in_order = self.writing.lock();
        let batch = std::mem::replace(
            &mut *self.pending.lock(),
            Vec::with_capacity(FLUSH_AT_BYTES),
        );
        if !batch.is_empty() {
            let _ = std::io::stderr().write_all(&batch);
        }
    }
}

/// One log event's write; appends to the batch.
pub struct LineWriter<'a>(&'a BatchedStderr);

impl Write for LineWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let full = {
            let mut pending = self.0.pending.lock();
            pending.extend_from_slice(bytes);
            pending.len() >= FLUSH_AT_BYTES
        };
        if full {
            self.0.flush();
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
