//! Log output: lines are gathered in memory and written to stderr in batches by a thread of
//! their own, so an access-log line costs a call a copy, not a syscall (the same trade as
//! nginx's `access_log ... buffer=64k flush=200ms`), and a slow disk or a full pipe behind
//! stderr never stalls a call. A line reaches stderr within `FLUSH_EVERY`, sooner when
//! `FLUSH_AT_BYTES` have gathered. While stderr takes nothing, at most `MAX_PENDING_BYTES`
//! wait; lines beyond that are dropped, counted, and the count is logged once stderr
//! takes lines again.
//!
//! The access line, one per call, is written by [`AccessLine`] in the same format as the
//! rest (tracing's text or JSON lines), without tracing's formatter: that costs a call
//! about 2 µs of visitors and styling (`cargo bench --bench hot_path`, "access-log line").

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
/// The format `init` chose, for the lines written without tracing.
static FORMAT: OnceLock<Format> = OnceLock::new();

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

/// Installs the process's logger (level from `RUST_LOG`, `info` by default) writing batches
/// to stderr; flush the returned writer before the process exits on its own.
pub fn init(format: Format) -> &'static BatchedStderr {
    init_to(format, Box::new(std::io::stderr()))
}

/// As [`init`], the batches written to `out` instead (a benchmark's sink).
pub fn init_to(format: Format, out: Box<dyn Write + Send>) -> &'static BatchedStderr {
    let writer = BatchedStderr::start(out);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = FORMAT.set(format);
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
    /// Where batches go (stderr), held while writing, so batches reach it in the order they
    /// were taken.
    out: Mutex<Box<dyn Write + Send>>,
    /// Lines dropped while stderr took nothing, not yet reported.
    dropped: AtomicU64,
}

impl BatchedStderr {
    /// The process-wide writer, with its writer thread started and a final flush registered
    /// for process exit (Pingora ends the process with `exit`).
    pub fn start(out: Box<dyn Write + Send>) -> &'static Self {
        let writer: &'static Self = WRITER.get_or_init(|| Self {
            pending: Mutex::new(Vec::with_capacity(FLUSH_AT_BYTES)),
            batch_ready: Condvar::new(),
            out: Mutex::new(out),
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
        let mut out = self.out.lock();
        let batch = std::mem::replace(
            &mut *self.pending.lock(),
            Vec::with_capacity(FLUSH_AT_BYTES),
        );
        if !batch.is_empty() {
            let _ = out.write_all(&batch);
        }
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let _ = writeln!(
                out,
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

/// One access-log line, as tracing's formatter would write an `info!(target: "access", ...)`
/// event with the same fields: text (`2026-12-07T17:39:40.582773Z  INFO access: name=value
/// ...`, strings quoted, `plain` values not) or JSON (`{"timestamp":...,"level":"INFO",
/// "fields":{...},"target":"access"}`). `RUST_LOG` filters it as it filters that event.
pub struct AccessLine {
    buf: Vec<u8>,
    json: bool,
    fields: usize,
}

impl AccessLine {
    /// A line to fill, when the logger is installed and the access target is enabled.
    pub fn start() -> Option<Self> {
        WRITER.get()?;
        let format = FORMAT.get()?;
        if !tracing::enabled!(target: "access", tracing::Level::INFO) {
            return None;
        }
        Some(Self::new(*format, std::time::SystemTime::now()))
    }

    fn new(format: Format, now: std::time::SystemTime) -> Self {
        let json = format == Format::Json;
        let mut buf = Vec::with_capacity(640);
        let now = rfc3339_micros(now);
        if json {
            buf.extend_from_slice(b"{\"timestamp\":\"");
            buf.extend_from_slice(&now);
            buf.extend_from_slice(b"\",\"level\":\"INFO\",\"fields\":{");
        } else {
            buf.extend_from_slice(&now);
            buf.extend_from_slice(b"  INFO access: ");
        }
        Self {
            buf,
            json,
            fields: 0,
        }
    }

    fn name(&mut self, name: &str) {
        if self.fields > 0 {
            self.buf.push(if self.json { b',' } else { b' ' });
        }
        self.fields += 1;
        if self.json {
            self.buf.push(b'"');
            self.buf.extend_from_slice(name.as_bytes());
            self.buf.extend_from_slice(b"\":");
        } else {
            self.buf.extend_from_slice(name.as_bytes());
            self.buf.push(b'=');
        }
    }

    /// A string field (tracing records it quoted, as `Debug` writes it).
    pub fn text(&mut self, name: &str, value: &str) {
        self.name(name);
        if self.json {
            json_string(&mut self.buf, value);
        } else if value
            .bytes()
            .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
        {
            self.buf.push(b'"');
            self.buf.extend_from_slice(value.as_bytes());
            self.buf.push(b'"');
        } else {
            let _ = write!(self.buf, "{value:?}");
        }
    }

    /// A field recorded with `%` (`Display`): unquoted in text, a string in JSON.
    pub fn plain(&mut self, name: &str, value: impl std::fmt::Display) {
        self.name(name);
        if !self.json {
            let _ = write!(self.buf, "{value}");
            return;
        }
        // Written in place between quotes; escaped afresh only when it needs it (ids and
        // addresses never do).
        self.buf.push(b'"');
        let start = self.buf.len();
        let _ = write!(self.buf, "{value}");
        if self.buf[start..]
            .iter()
            .all(|&b| b >= 0x20 && b != b'"' && b != b'\\')
        {
            self.buf.push(b'"');
        } else {
            let shown = self.buf.split_off(start);
            self.buf.pop();
            json_string(&mut self.buf, &String::from_utf8_lossy(&shown));
        }
    }

    pub fn number(&mut self, name: &str, value: impl itoa::Integer) {
        self.name(name);
        self.buf
            .extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
    }

    pub fn float(&mut self, name: &str, value: f64) {
        self.name(name);
        if self.json {
            let _ = serde_json::to_writer(&mut self.buf, &value);
        } else {
            let _ = write!(self.buf, "{value:?}");
        }
    }

    pub fn flag(&mut self, name: &str, value: bool) {
        self.name(name);
        self.buf
            .extend_from_slice(if value { b"true" } else { b"false" });
    }

    /// Ends the line and adds it to the batch.
    pub fn write(self) {
        let line = self.end();
        if let Some(writer) = WRITER.get() {
            let _ = LineWriter(writer).write(&line);
        }
    }

    fn end(mut self) -> Vec<u8> {
        if self.json {
            self.buf.extend_from_slice(b"},\"target\":\"access\"}");
        }
        self.buf.push(b'\n');
        self.buf
    }
}

/// A JSON string, escaped as serde_json escapes it.
fn json_string(buf: &mut Vec<u8>, value: &str) {
    if value.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        buf.push(b'"');
        buf.extend_from_slice(value.as_bytes());
        buf.push(b'"');
    } else {
        let _ = serde_json::to_writer(buf, value);
    }
}

/// `time` as tracing's formatter writes it: RFC 3339, UTC, microseconds
/// (`2026-12-07T17:39:40.582773Z`).
fn rfc3339_micros(time: std::time::SystemTime) -> [u8; 27] {
    let since = time
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let (days, of_day) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_date(days as i64);
    let mut out = *b"0000-00-00T00:00:00.000000Z";
    let mut put = |at: usize, width: usize, mut n: u64| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    put(0, 4, year as u64);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, of_day / 3600);
    put(14, 2, of_day / 60 % 60);
    put(17, 2, of_day % 60);
    put(20, 6, u64::from(since.subsec_micros()));
    out
}

/// The proleptic Gregorian date `days` after 1970-01-01 (the "civil from days" algorithm of
/// Howard Hinnant's date library, in eras of 400 years).
fn civil_date(days: i64) -> (i64, u64, u64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * shifted_month + 2) / 5 + 1) as u64;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    } as u64;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex as StdMutex};
    use std::time::{Duration, UNIX_EPOCH};

    /// What tracing's own formatter writes, captured.
    #[derive(Clone, Default)]
    struct Captured(Arc<StdMutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The same event through tracing's formatter and through `AccessLine`, timestamps
    /// aside: values that need quoting and escaping, in text and in JSON.
    #[test]
    fn the_access_line_is_written_as_tracing_writes_the_same_event() {
        let awkward = "a \"quoted\" back\\slash, tab\t, é, \u{7f} and \u{200b}";
        let addr: std::net::SocketAddr = "[::1]:8080".parse().unwrap();
        for format in [Format::Text, Format::Json] {
            let captured = Captured::default();
            let sink = captured.clone();
            let builder = tracing_subscriber::fmt()
                .with_ansi(false)
                .with_writer(move || sink.clone());
            let subscriber: Box<dyn tracing::Subscriber + Send + Sync> = match format {
                Format::Text => Box::new(builder.finish()),
                Format::Json => Box::new(builder.json().finish()),
            };
            tracing::subscriber::with_default(subscriber, || {
                tracing::info!(
                    target: "access",
                    call_id = %"call_1",
                    agent = awkward,
                    empty = "",
                    upstream = %addr,
                    shown = %awkward,
                    status = 200u16,
                    cost = -3i64,
                    stream = true,
                    first_byte_ms = 12.5f64,
                    whole_ms = 0.0f64,
                );
            });
            let mut line = AccessLine::new(format, UNIX_EPOCH);
            line.plain("call_id", "call_1");
            line.text("agent", awkward);
            line.text("empty", "");
            line.plain("upstream", addr);
            line.plain("shown", awkward);
            line.number("status", 200u16);
            line.number("cost", -3i64);
            line.flag("stream", true);
            line.float("first_byte_ms", 12.5);
            line.float("whole_ms", 0.0);
            let ours = String::from_utf8(line.end()).unwrap();
            let theirs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
            // Text lines begin with the time; JSON lines with `{"timestamp":"<time>`.
            let without_time = |line: &str| match line.strip_prefix("{\"timestamp\":\"") {
                Some(rest) => rest[27..].to_owned(),
                None => line[27..].to_owned(),
            };
            assert_eq!(without_time(&ours), without_time(&theirs), "{format:?}");
        }
    }

    #[test]
    fn timestamps_are_written_as_tracing_writes_them() {
        let at = |secs: u64, micros: u64| {
            let time = UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros);
            String::from_utf8(rfc3339_micros(time).to_vec()).unwrap()
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(1_796_665_180, 582_773), "2026-12-07T17:39:40.582773Z");
        // A leap day, the last second of a century year, and the year 2100 (not a leap year).
        assert_eq!(at(951_782_400, 1), "2000-02-29T00:00:00.000001Z");
        assert_eq!(at(978_307_199, 999_999), "2000-12-31T23:59:59.999999Z");
        assert_eq!(at(4_107_542_400, 0), "2100-03-01T00:00:00.000000Z");
        // Every day for 300 years against the `time` crate's calendar.
        for days in (0..300 * 366).step_by(1) {
            let ours = at(days * 86_400, 0);
            let date = time::OffsetDateTime::from_unix_timestamp(days as i64 * 86_400).unwrap();
            let theirs = format!(
                "{:04}-{:02}-{:02}T00:00:00.000000Z",
                date.year(),
                u8::from(date.month()),
                date.day()
            );
            assert_eq!(ours, theirs);
        }
    }
}
