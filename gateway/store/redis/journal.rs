//! The settlement journal: an append-only file of JSON lines in `store.journal_dir`, one
//! `{"held":{"seq":N,"at_ms":T,"owed":...}}` per settlement held (T: when it was held) and
//! one `{"done":N}` once it is written. The file belongs to a thread of its own, so a slow
//! disk never stalls the calls: a held settlement's line is handed to it, and the caller
//! waits (without blocking its thread) until the line is written to the OS, so it survives
//! the gateway being killed; a `done` line is waited for until it is on disk, since what
//! follows it (the settlement's markers let go) must not outrun it. The thread fsyncs
//! everything else within [`SYNC_EVERY`], so a machine crash can lose at most that window.
//! When nothing is owed the file is emptied. One gateway at a time: the directory is locked
//! while the journal is open.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::oneshot;

/// How soon a written line is on disk.
pub const SYNC_EVERY: Duration = Duration::from_millis(50);
const FILE: &str = "settlements.journal";
const LOCK: &str = "journal.lock";

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
enum Line<T> {
    Held {
        seq: u64,
        /// Unix ms when it was held (0 in journals written before this was kept).
        #[serde(default)]
        at_ms: u64,
        owed: T,
    },
    Done(u64),
}

/// A settlement a journal holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<T> {
    pub seq: u64,
    /// Unix ms when it was held; 0 when not known.
    pub at_ms: u64,
    pub owed: T,
}

/// Resolves once a line is written to the OS (a `done` line: on disk), or could not be (the
/// error is logged).
pub type Written = oneshot::Receiver<()>;

/// What the writer thread is asked to do, in order.
enum Command {
    Append {
        text: String,
        /// Fsync before answering.
        durable: bool,
        written: Option<oneshot::Sender<()>>,
    },
    Empty {
        written: oneshot::Sender<()>,
    },
}

/// A journal of `T`, what each held settlement owes.
pub struct Journal<T> {
    /// The next sequence number, and the way to the writer thread: taken together, so
    /// lines reach the file in sequence order.
    state: Mutex<(u64, mpsc::Sender<Command>)>,
    /// Joined on drop, so what was handed to it is in the file before the lock is let go.
    writer: Option<std::thread::JoinHandle<()>>,
    /// Held for the journal's life: the directory's lock.
    _lock: File,
    _owes: PhantomData<fn(T)>,
}

impl<T: Serialize + DeserializeOwned> Journal<T> {
    /// Opens (or creates) the journal in `dir`, returning with it what it still owes, oldest
    /// first; the file is rewritten to hold only that.
    pub fn open(dir: &Path) -> std::io::Result<(Self, Vec<Entry<T>>)> {
        std::fs::create_dir_all(dir)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK))?;
        if lock.try_lock().is_err() {
            return Err(std::io::Error::other(format!(
                "{} is in use by another gateway: each instance needs its own store.journal_dir",
                dir.display()
            )));
        }
        let path = dir.join(FILE);
        let owed = match File::open(&path) {
            Ok(file) => read_owed(file)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e),
        };
        let next_seq = owed.keys().next_back().map_or(1, |last| last + 1);
        let file = rewrite(&path, &owed)?;
        let (commands, writer) = spawn_writer(file, path)?;
        let journal = Self {
            state: Mutex::new((next_seq, commands)),
            writer: Some(writer),
            _lock: lock,
            _owes: PhantomData,
        };
        Ok((journal, owed.into_values().collect()))
    }

    /// Appends a settlement held at `at_ms`; returns its sequence number, and when its line
    /// is written.
    pub fn append(&self, owed: &T, at_ms: u64) -> (u64, Written) {
        let (written, done) = oneshot::channel();
        let mut state = self.state.lock();
        let seq = state.0;
        state.0 += 1;
        let text = line_text(&Line::Held { seq, at_ms, owed });
        let _ = state.1.send(Command::Append {
            text,
            durable: false,
            written: Some(written),
        });
        (seq, done)
    }

    /// Marks a settlement written (or given up); when `nothing_owed`, empties the file.
    /// Returns when that is on disk.
    pub fn done(&self, seq: u64, nothing_owed: bool) -> Written {
        let (written, done) = oneshot::channel();
        let state = self.state.lock();
        let command = if nothing_owed {
            Command::Empty { written }
        } else {
            Command::Append {
                text: line_text(&Line::<&T>::Done(seq)),
                durable: true,
                written: Some(written),
            }
        };
        let _ = state.1.send(command);
        done
    }

    /// Returns once everything handed over so far is on disk.
    pub fn synced(&self) -> Written {
        let (written, done) = oneshot::channel();
        let state = self.state.lock();
        let _ = state.1.send(Command::Append {
            text: String::new(),
            durable: true,
            written: Some(written),
        });
        done
    }
}

fn line_text<T: Serialize>(line: &Line<T>) -> String {
    let mut text = serde_json::to_string(line).unwrap_or_default();
    text.push('\n');
    text
}

/// The thread that owns the file: writes what it is handed, in order, and fsyncs what it
/// wrote within [`SYNC_EVERY`] (at once when asked to). It ends when the journal is dropped.
fn spawn_writer(
    mut file: File,
    path: PathBuf,
) -> std::io::Result<(mpsc::Sender<Command>, std::thread::JoinHandle<()>)> {
    let (commands, incoming) = mpsc::channel::<Command>();
    let sync = move |file: &File| {
        if let Err(error) = file.sync_data() {
            tracing::error!(%error, "could not fsync the settlement journal");
        }
    };
    let writer = std::thread::Builder::new()
        .name("turnpike-journal".into())
        .spawn(move || {
            let mut unsynced_since: Option<Instant> = None;
            loop {
                let wait = unsynced_since.map_or(Duration::from_secs(3600), |since| {
                    SYNC_EVERY.saturating_sub(since.elapsed())
                });
                let (wrote, durable, written) = match incoming.recv_timeout(wait) {
                    Ok(Command::Append {
                        text,
                        durable,
                        written,
                    }) => {
                        if let Err(error) = file.write_all(text.as_bytes()) {
                            tracing::error!(
                                %error,
                                path = %path.display(),
                                line = %text.trim_end(),
                                "could not write the settlement journal: this settlement is held in memory only"
                            );
                        }
                        (true, durable, written)
                    }
                    Ok(Command::Empty { written }) => {
                        if let Err(error) = file.set_len(0) {
                            tracing::error!(%error, path = %path.display(), "could not empty the settlement journal");
                        }
                        (true, true, Some(written))
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => (false, false, None),
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        sync(&file);
                        return;
                    }
                };
                if wrote {
                    unsynced_since.get_or_insert_with(Instant::now);
                }
                let due = unsynced_since.is_some_and(|since| since.elapsed() >= SYNC_EVERY);
                if unsynced_since.is_some() && (durable || due) {
                    sync(&file);
                    unsynced_since = None;
                }
                if let Some(written) = written {
                    let _ = written.send(());
                }
            }
        })?;
    Ok((commands, writer))
}

impl<T> Drop for Journal<T> {
    fn drop(&mut self) {
        // Its end of the channel gone, the writer writes what it holds and stops.
        drop(std::mem::replace(
            &mut self.state.get_mut().1,
            mpsc::channel().0,
        ));
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// What the journal's lines still owe, by sequence number. A torn last line (the gateway
/// died while writing it) is skipped: its settlement was never acknowledged as held.
fn read_owed<T: DeserializeOwned>(file: File) -> std::io::Result<BTreeMap<u64, Entry<T>>> {
    let mut owed = BTreeMap::new();
    for line in BufReader::new(file).lines() {
        let line = line?;
        match serde_json::from_str::<Line<T>>(&line) {
            Ok(Line::Held {
                seq,
                at_ms,
                owed: writes,
            }) => {
                owed.insert(
                    seq,
                    Entry {
                        seq,
                        at_ms,
                        owed: writes,
                    },
                );
            }
            Ok(Line::Done(seq)) => {
                owed.remove(&seq);
            }
            Err(error) if !line.trim().is_empty() => {
                tracing::warn!(%error, %line, "skipped an unreadable settlement journal line");
            }
            Err(_) => {}
        }
    }
    Ok(owed)
}

/// Replaces the journal by one holding only `owed`, on disk before it takes the old one's
/// place; returns it open for appending.
fn rewrite<T: Serialize>(path: &Path, owed: &BTreeMap<u64, Entry<T>>) -> std::io::Result<File> {
    let fresh = path.with_extension("journal.new");
    {
        let mut file = File::create(&fresh)?;
        for entry in owed.values() {
            let line = Line::Held {
                seq: entry.seq,
                at_ms: entry.at_ms,
                owed: &entry.owed,
            };
            let mut text = serde_json::to_string(&line).map_err(std::io::Error::other)?;
            text.push('\n');
            file.write_all(text.as_bytes())?;
        }
        file.sync_all()?;
    }
    std::fs::rename(&fresh, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    OpenOptions::new().append(true).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory of this test's own, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("turnpike-journal-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            Self(dir)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn owed(n: u8) -> Vec<String> {
        vec![format!("write {n}")]
    }

    type Opened = (Journal<Vec<String>>, Vec<Entry<Vec<String>>>);

    fn entry(seq: u64, n: u8) -> Entry<Vec<String>> {
        Entry {
            seq,
            at_ms: 1000 + seq,
            owed: owed(n),
        }
    }

    fn open(dir: &TempDir) -> std::io::Result<Opened> {
        Journal::open(dir.path())
    }

    #[test]
    fn what_was_held_and_not_done_is_owed_after_a_reopen() {
        let dir = TempDir::new("reopen");
        {
            let (journal, owed_now) = open(&dir).unwrap();
            assert!(owed_now.is_empty());
            let (first, _) = journal.append(&owed(1), 1001);
            journal.append(&owed(2), 1002);
            journal.append(&owed(3), 1003);
            journal.done(first, false);
        }
        let (journal, owed_now) = open(&dir).unwrap();
        assert_eq!(owed_now, vec![entry(2, 2), entry(3, 3)]);
        // Numbering goes on after the highest owed, so no two lines share one.
        assert_eq!(journal.append(&owed(4), 1004).0, 4);
    }

    #[test]
    fn a_torn_last_line_is_skipped_and_an_emptied_journal_owes_nothing() {
        let dir = TempDir::new("torn");
        {
            let (journal, _) = open(&dir).unwrap();
            journal.append(&owed(1), 1001);
        }
        let mut file = OpenOptions::new()
            .append(true)
            .open(dir.path().join(FILE))
            .unwrap();
        file.write_all(b"{\"held\":{\"seq\":2,\"ow").unwrap();
        drop(file);
        let (journal, owed_now) = open(&dir).unwrap();
        assert_eq!(owed_now, vec![entry(1, 1)]);
        journal.done(1, true);
        drop(journal);
        let (_, owed_now) = open(&dir).unwrap();
        assert!(owed_now.is_empty());
    }

    #[tokio::test]
    async fn a_done_line_is_on_disk_when_it_is_answered() {
        let dir = TempDir::new("durable");
        let (journal, _) = open(&dir).unwrap();
        let (first, written) = journal.append(&owed(1), 1001);
        written.await.unwrap();
        journal.append(&owed(2), 1002);
        journal.done(first, false).await.unwrap();
        let text = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
        assert!(text.ends_with("{\"done\":1}\n"), "{text}");
    }

    #[test]
    fn a_line_from_before_times_were_kept_reads_as_held_at_zero() {
        let dir = TempDir::new("old-line");
        std::fs::create_dir_all(dir.path()).unwrap();
        std::fs::write(
            dir.path().join(FILE),
            "{\"held\":{\"seq\":7,\"owed\":[\"write 1\"]}}\n",
        )
        .unwrap();
        let (_, owed_now) = open(&dir).unwrap();
        assert_eq!(
            owed_now,
            vec![Entry {
                seq: 7,
                at_ms: 0,
                owed: owed(1)
            }]
        );
    }

    #[test]
    fn one_gateway_at_a_time() {
        let dir = TempDir::new("lock");
        let (_journal, _) = open(&dir).unwrap();
        let error = open(&dir).err().expect("the second is refused");
        assert!(error.to_string().contains("another gateway"), "{error}");
    }
}
