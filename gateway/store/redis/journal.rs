//! The settlement journal: an append-only file of JSON lines in `store.journal_dir`, one
//! `{"held":{"seq":N,"owed":...}}` per settlement held and one `{"done":N}` once it is
//! written. A line is written to the OS as the settlement is held, so it survives the gateway
//! being killed; a background thread fsyncs what was written within [`SYNC_EVERY`], so a
//! machine crash can lose at most that window. When nothing is owed the file is emptied.
//! One gateway at a time: the directory is locked while the journal is open.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

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

/// A journal of `T`, what each held settlement owes.
pub struct Journal<T> {
    state: Mutex<State>,
    /// Set when a line was written since the last fsync.
    dirty: Arc<AtomicBool>,
    /// Held for the journal's life: the directory's lock.
    _lock: File,
    _owes: PhantomData<fn(T)>,
}

struct State {
    file: File,
    path: PathBuf,
    next_seq: u64,
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
        let dirty = Arc::new(AtomicBool::new(false));
        spawn_syncer(file.try_clone()?, Arc::clone(&dirty));
        let journal = Self {
            state: Mutex::new(State {
                file,
                path,
                next_seq,
            }),
            dirty,
            _lock: lock,
            _owes: PhantomData,
        };
        Ok((journal, owed.into_iter().collect()))
    }

    /// Appends a held settlement; returns its sequence number.
    pub fn append(&self, owed: &T) -> u64 {
        let mut state = self.state.lock();
        let seq = state.next_seq;
        state.next_seq += 1;
        self.write(&mut state, &Line::Held { seq, owed });
        seq
    }

    /// Marks a settlement written (or given up); when `nothing_owed`, empties the file.
    pub fn done(&self, seq: u64, nothing_owed: bool) {
        let mut state = self.state.lock();
        if nothing_owed {
            if let Err(error) = state.file.set_len(0) {
                tracing::error!(%error, path = %state.path.display(), "could not empty the settlement journal");
            }
            self.dirty.store(true, Ordering::Release);
            return;
        }
        self.write(&mut state, &Line::<&T>::Done(seq));
    }

    fn write(&self, state: &mut State, line: &Line<&T>) {
        let mut text = serde_json::to_string(line).unwrap_or_default();
        text.push('\n');
        if let Err(error) = state.file.write_all(text.as_bytes()) {
            tracing::error!(
                %error,
                path = %state.path.display(),
                line = %text.trim_end(),
                "could not write the settlement journal: this settlement is held in memory only"
            );
        }
        self.dirty.store(true, Ordering::Release);
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

/// Fsyncs the journal whenever something was written since the last time.
fn spawn_syncer(file: File, dirty: Arc<AtomicBool>) {
    let weak = Arc::downgrade(&dirty);
    drop(dirty);
    std::thread::Builder::new()
        .name("turnpike-journal".into())
        .spawn(move || loop {
            std::thread::sleep(SYNC_EVERY);
            let Some(dirty) = weak.upgrade() else { return };
            if dirty.swap(false, Ordering::AcqRel) {
                if let Err(error) = file.sync_data() {
                    tracing::error!(%error, "could not fsync the settlement journal");
                }
            }
        })
        .expect("a thread for the settlement journal");
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
            let first = journal.append(&owed(1));
            journal.append(&owed(2));
            journal.append(&owed(3));
            journal.done(first, false);
        }
        let (journal, owed_now) = open(&dir).unwrap();
        assert_eq!(owed_now, vec![(2, owed(2)), (3, owed(3))]);
        // Numbering goes on after the highest owed, so no two lines share one.
        assert_eq!(journal.append(&owed(4)), 4);
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
