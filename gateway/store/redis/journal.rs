//! The settlement journal: an append-only file of JSON lines in `store.journal_dir`, one
//! `{"held":{"seq":N,"owed":...}}` per settlement held and one `{"done":N}` once it is
//! written. The file belongs to a thread of its own, so a slow disk never stalls the calls:
//! a held settlement's line is handed to it, and the caller waits (without blocking its
//! thread) until the line is written to the OS, so it survives the gateway being killed.
//! The thread fsyncs what was written within [`SYNC_EVERY`], so a machine crash can lose at
//! most that window. When nothing is owed the file is emptied. One gateway at a time: the
//! directory is locked while the journal is open.

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
    Held { seq: u64, owed: T },
    Done(u64),
}

/// What a journal still owes from an earlier run, by sequence number, oldest first.
pub type Owing<T> = Vec<(u64, T)>;

/// Resolves once a held settlement's line is written to the OS (or could not be: the
/// error is logged, and the settlement is then held in memory only).
pub type Written = oneshot::Receiver<()>;

/// What the writer thread is asked to do, in order.
enum Command {
    Append {
        text: String,
        written: oneshot::Sender<()>,
    },
    Empty,
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
    /// Opens (or creates) the journal in `dir`, returning with it what it still owes; the
    /// file is rewritten to hold only that.
    pub fn open(dir: &Path) -> std::io::Result<(Self, Owing<T>)> {
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
        Ok((journal, owed.into_iter().collect()))
    }

    /// Appends a held settlement; returns its sequence number, and when its line is written.
    pub fn append(&self, owed: &T) -> (u64, Written) {
        let (written, done) = oneshot::channel();
        let mut state = self.state.lock();
        let seq = state.0;
        state.0 += 1;
        let text = line_text(&Line::Held { seq, owed });
        let _ = state.1.send(Command::Append { text, written });
        (seq, done)
    }

    /// Marks a settlement written (or given up); when `nothing_owed`, empties the file.
    pub fn done(&self, seq: u64, nothing_owed: bool) {
        let state = self.state.lock();
        let command = if nothing_owed {
            Command::Empty
        } else {
            let (written, _) = oneshot::channel();
            Command::Append {
                text: line_text(&Line::<&T>::Done(seq)),
                written,
            }
        };
        let _ = state.1.send(command);
    }
}

fn line_text<T: Serialize>(line: &Line<T>) -> String {
    let mut text = serde_json::to_string(line).unwrap_or_default();
    text.push('\n');
    text
}

/// The thread that owns the file: writes what it is handed, in order, and fsyncs what it
/// wrote within [`SYNC_EVERY`]. It ends when the journal is dropped.
fn spawn_writer(
    mut file: File,
    path: PathBuf,
) -> std::io::Result<(mpsc::Sender<Command>, std::thread::JoinHandle<()>)> {
    let (commands, incoming) = mpsc::channel::<Command>();
    let writer = std::thread::Builder::new()
        .name("turnpike-journal".into())
        .spawn(move || {
            let mut unsynced_since: Option<Instant> = None;
            loop {
                let wait = unsynced_since.map_or(Duration::from_secs(3600), |since| {
                    SYNC_EVERY.saturating_sub(since.elapsed())
                });
                match incoming.recv_timeout(wait) {
                    Ok(Command::Append { text, written }) => {
                        if let Err(error) = file.write_all(text.as_bytes()) {
                            tracing::error!(
                                %error,
                                path = %path.display(),
                                line = %text.trim_end(),
                                "could not write the settlement journal: this settlement is held in memory only"
                            );
                        }
                        let _ = written.send(());
                        unsynced_since.get_or_insert_with(Instant::now);
                    }
                    Ok(Command::Empty) => {
                        if let Err(error) = file.set_len(0) {
                            tracing::error!(%error, path = %path.display(), "could not empty the settlement journal");
                        }
                        unsynced_since.get_or_insert_with(Instant::now);
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        let _ = file.sync_data();
                        return;
                    }
                }
                if unsynced_since.is_some_and(|since| since.elapsed() >= SYNC_EVERY) {
                    if let Err(error) = file.sync_data() {
                        tracing::error!(%error, "could not fsync the settlement journal");
                    }
                    unsynced_since = None;
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
fn read_owed<T: DeserializeOwned>(file: File) -> std::io::Result<BTreeMap<u64, T>> {
    let mut owed = BTreeMap::new();
    for line in BufReader::new(file).lines() {
        let line = line?;
        match serde_json::from_str::<Line<T>>(&line) {
            Ok(Line::Held { seq, owed: writes }) => {
                owed.insert(seq, writes);
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
fn rewrite<T: Serialize>(path: &Path, owed: &BTreeMap<u64, T>) -> std::io::Result<File> {
    let fresh = path.with_extension("journal.new");
    {
        let mut file = File::create(&fresh)?;
        for (seq, writes) in owed {
            let line = Line::Held {
                seq: *seq,
                owed: writes,
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

    type Opened = (Journal<Vec<String>>, Owing<Vec<String>>);

    fn open(dir: &TempDir) -> std::io::Result<Opened> {
        Journal::open(dir.path())
    }

    #[test]
    fn what_was_held_and_not_done_is_owed_after_a_reopen() {
        let dir = TempDir::new("reopen");
        {
            let (journal, owed_now) = open(&dir).unwrap();
            assert!(owed_now.is_empty());
            let (first, _) = journal.append(&owed(1));
            journal.append(&owed(2));
            journal.append(&owed(3));
            journal.done(first, false);
        }
        let (journal, owed_now) = open(&dir).unwrap();
        assert_eq!(owed_now, vec![(2, owed(2)), (3, owed(3))]);
        // Numbering goes on after the highest owed, so no two lines share one.
        assert_eq!(journal.append(&owed(4)).0, 4);
    }

    #[test]
    fn a_torn_last_line_is_skipped_and_an_emptied_journal_owes_nothing() {
        let dir = TempDir::new("torn");
        {
            let (journal, _) = open(&dir).unwrap();
            journal.append(&owed(1));
        }
        let mut file = OpenOptions::new()
            .append(true)
            .open(dir.path().join(FILE))
            .unwrap();
        file.write_all(b"{\"held\":{\"seq\":2,\"ow").unwrap();
        drop(file);
        let (journal, owed_now) = open(&dir).unwrap();
        assert_eq!(owed_now, vec![(1, owed(1))]);
        journal.done(1, true);
        drop(journal);
        let (_, owed_now) = open(&dir).unwrap();
        assert!(owed_now.is_empty());
    }

    #[test]
    fn one_gateway_at_a_time() {
        let dir = TempDir::new("lock");
        let (_journal, _) = open(&dir).unwrap();
        let error = open(&dir).err().expect("the second is refused");
        assert!(error.to_string().contains("another gateway"), "{error}");
    }
}
