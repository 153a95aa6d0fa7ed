//! Durable high-water marks: one small file per lock in the state directory.
//!
//! Each record is written to a temporary file, fsync'd, renamed over the old
//! record, and the directory is fsync'd, so after `kill -9` or power loss a
//! lock's record is either the old one or the new one, never a mix. A
//! checksum in every record catches bit rot that would still parse as JSON:
//! a corrupt record stops the filter at start-up instead of resetting the
//! lock to 0, which would let every zombie back in.
//!
//! The directory is locked with an exclusive `flock` for the life of the
//! process, so two filters cannot share (and race on) one state directory.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::token::LockName;

const RECORD_PREFIX: &str = "lock-";
const RECORD_SUFFIX: &str = ".json";
const TMP_SUFFIX: &str = ".tmp";
const DIR_LOCK: &str = ".fencegate.lock";

/// One lock's durable record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub lock: LockName,
    pub highest: u64,
    /// Milliseconds since the Unix epoch when `highest` was set.
    pub set_at_ms: u64,
    pub checksum: u32,
}

impl Record {
    pub fn new(lock: LockName, highest: u64, set_at: SystemTime) -> Record {
        let set_at_ms = set_at.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let checksum = checksum(&lock, highest, set_at_ms);
        Record { lock, highest, set_at_ms, checksum }
    }
}

fn checksum(lock: &LockName, highest: u64, set_at_ms: u64) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(lock.as_str().as_bytes());
    h.update(&[0]);
    h.update(&highest.to_le_bytes());
    h.update(&set_at_ms.to_le_bytes());
    h.finalize()
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state directory {dir}: {source}")]
    Io { dir: PathBuf, source: std::io::Error },
    #[error("state directory {0} is in use by another fencegate filter (its lock file is held)")]
    InUse(PathBuf),
    #[error("corrupt state record {path}: {why}; refusing to start rather than forget a lock's highest token (restore the file from a backup, or remove it only if you know no holder of that lock has a token above 0)")]
    Corrupt { path: PathBuf, why: String },
    /// `--shared-marks`: the mark could not be raised in etcd, or not every
    /// replica acknowledged it in time, or this replica has self-fenced.
    #[error("shared high-water marks: {0}")]
    Shared(String),
}

/// How many locks' writes may run at once (each lock's are serialized by
/// one of these, chosen by its name's hash).
const WRITE_STRIPES: usize = 64;

/// The state directory, locked for this process.
#[derive(Debug)]
pub struct StateDir {
    dir: PathBuf,
    // Held open for the life of the process: closing it releases the flock.
    _lock: File,
    /// Serializes the writes of each lock, in the blocking write itself: the
    /// admission's own serialization lives in a request's future, and a
    /// request cancelled (client gone) while its write runs would let a
    /// newer write start beside it, sharing its temp file, and the older mark
    /// could end up on disk. Striped, not one per lock: no memory per lock.
    stripes: [std::sync::Mutex<()>; WRITE_STRIPES],
}

impl StateDir {
    /// Opens (creating if needed) and locks `dir`, and reads every record.
    pub fn open(dir: &Path) -> Result<(StateDir, HashMap<LockName, Record>), StateError> {
        StateDir::open_repairing(dir, None)
    }

    /// [`StateDir::open`], for `set-mark` on `repairing`: that lock's record
    /// may be corrupt (it is about to be replaced); any other corrupt record
    /// still stops the open.
    pub fn open_repairing(
        dir: &Path,
        repairing: Option<&LockName>,
    ) -> Result<(StateDir, HashMap<LockName, Record>), StateError> {
        let io = |source| StateError::Io { dir: dir.to_owned(), source };
        create_dir_durably(dir).map_err(io)?;
        let lock = OpenOptions::new().create(true).truncate(false).write(true).open(dir.join(DIR_LOCK)).map_err(io)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(StateError::InUse(dir.to_owned())),
            Err(fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        let mut records = HashMap::new();
        for entry in fs::read_dir(dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let path = entry.path();
            if name.ends_with(TMP_SUFFIX) {
                // A write that crashed before its rename: the old record is intact.
                let _ = fs::remove_file(&path);
                continue;
            }
            if !(name.starts_with(RECORD_PREFIX) && name.ends_with(RECORD_SUFFIX)) {
                continue;
            }
            let rec = match read_record(&path) {
                Err(e) if repairing.is_some_and(|l| name == format!("{RECORD_PREFIX}{l}{RECORD_SUFFIX}")) => {
                    tracing::warn!(error = %e, "the record being repaired is unreadable; replacing it");
                    continue;
                }
                r => r?,
            };
            let expected = format!("{RECORD_PREFIX}{}{RECORD_SUFFIX}", rec.lock);
            if expected != name {
                return Err(StateError::Corrupt { path, why: format!("it names lock {:?}", rec.lock.as_str()) });
            }
            records.insert(rec.lock.clone(), rec);
        }
        let stripes = std::array::from_fn(|_| std::sync::Mutex::new(()));
        Ok((StateDir { dir: dir.to_owned(), _lock: lock, stripes }, records))
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Makes `rec` durable, unless the lock's record already holds a mark at
    /// or above it: a mark on disk never goes down here (only by
    /// [`StateDir::set`]). Blocking (fsync): call it from `spawn_blocking`.
    pub fn write(&self, rec: &Record) -> Result<(), StateError> {
        self.write_record(rec, false)
    }

    /// Makes `rec` durable, up or down (`fencegate filter set-mark`).
    pub fn set(&self, rec: &Record) -> Result<(), StateError> {
        self.write_record(rec, true)
    }

    fn write_record(&self, rec: &Record, down_too: bool) -> Result<(), StateError> {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let io = |source| StateError::Io { dir: self.dir.clone(), source };
        let stripe = BuildHasherDefault::<DefaultHasher>::default().hash_one(rec.lock.as_str()) as usize;
        let _one_at_a_time = self.stripes[stripe % WRITE_STRIPES].lock().unwrap_or_else(|p| p.into_inner());
        let final_path = self.dir.join(format!("{RECORD_PREFIX}{}{RECORD_SUFFIX}", rec.lock));
        if !down_too && final_path.exists() && read_record(&final_path)?.highest >= rec.highest {
            // Already durable at or above it; the directory is synced again
            // in case the write that renamed it failed at that step.
            return File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io);
        }
        let tmp_path = self.dir.join(format!("{RECORD_PREFIX}{}{RECORD_SUFFIX}{TMP_SUFFIX}", rec.lock));
        let mut bytes = serde_json::to_vec(rec).expect("records serialize");
        bytes.push(b'\n');
        let written = write_new(&tmp_path, &bytes).and_then(|()| fs::rename(&tmp_path, &final_path));
        if let Err(e) = written {
            // Never leave a half-written temp file behind for the next write.
            let _ = fs::remove_file(&tmp_path);
            return Err(io(e));
        }
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io)?;
        Ok(())
    }
}

/// Writes `bytes` to a new file at `path` and fsyncs it. The file must not
/// exist yet and is never reached through a symlink (`O_EXCL | O_NOFOLLOW`,
/// mode 0600): a link planted in the state directory cannot redirect the
/// write. A leftover temp file (a write that failed before its rename) is
/// removed once and the create retried.
fn write_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let open = || OpenOptions::new().write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(path);
    let mut f = match open() {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            fs::remove_file(path)?;
            open()?
        }
        r => r?,
    };
    f.write_all(bytes)?;
    f.sync_all()
}

/// Creates `dir` and any missing parents, fsyncing the parent of each one
/// created, so a new state directory survives a power loss along with the
/// records written into it.
fn create_dir_durably(dir: &Path) -> std::io::Result<()> {
    let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.as_os_str().is_empty() && !d.exists()).collect();
    fs::create_dir_all(dir)?;
    for d in missing.iter().rev() {
        let parent = match d.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(parent)?.sync_all()?;
    }
    Ok(())
}

fn read_record(path: &Path) -> Result<Record, StateError> {
    let corrupt = |why: String| StateError::Corrupt { path: path.to_owned(), why };
    let bytes = fs::read(path).map_err(|e| corrupt(format!("unreadable: {e}")))?;
    let rec: Record = serde_json::from_slice(&bytes).map_err(|e| corrupt(format!("not a valid record: {e}")))?;
    if rec.checksum != checksum(&rec.lock, rec.highest, rec.set_at_ms) {
        return Err(corrupt("checksum mismatch".into()));
    }
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock(s: &str) -> LockName {
        s.parse().unwrap()
    }

    #[test]
    fn round_trip_and_reopen() {
        let d = tempfile::tempdir().unwrap();
        {
            let (s, recs) = StateDir::open(d.path()).unwrap();
            assert!(recs.is_empty());
            s.write(&Record::new(lock("a"), 7, SystemTime::now())).unwrap();
            s.write(&Record::new(lock("a"), 9, SystemTime::now())).unwrap();
            s.write(&Record::new(lock(".."), 3, SystemTime::now())).unwrap();
        }
        let (_s, recs) = StateDir::open(d.path()).unwrap();
        assert_eq!(recs[&lock("a")].highest, 9);
        assert_eq!(recs[&lock("..")].highest, 3);
    }

    /// A write cancelled by its request (client gone) runs on beside a newer
    /// one: the older mark must not end up on disk, whichever order the
    /// writes reach the directory in. (Before, the last rename won, and two
    /// writers shared one temp file.)
    #[test]
    fn a_mark_on_disk_never_goes_down_but_by_set_mark() {
        let d = tempfile::tempdir().unwrap();
        let (s, _) = StateDir::open(d.path()).unwrap();
        s.write(&Record::new(lock("a"), 30, SystemTime::now())).unwrap();
        s.write(&Record::new(lock("a"), 20, SystemTime::now())).unwrap();
        assert_eq!(read_record(&d.path().join("lock-a.json")).unwrap().highest, 30);
        s.set(&Record::new(lock("a"), 20, SystemTime::now())).unwrap();
        assert_eq!(read_record(&d.path().join("lock-a.json")).unwrap().highest, 20);

        // Writes of one lock racing from many threads: the highest stays.
        let s = std::sync::Arc::new(s);
        let writers: Vec<_> = (0..8u64)
            .map(|i| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for k in 0..20u64 {
                        let t = 100 + ((k * 8 + i) * 7919) % 160;
                        s.write(&Record::new(lock("b"), t, SystemTime::now())).unwrap();
                    }
                })
            })
            .collect();
        writers.into_iter().for_each(|w| w.join().unwrap());
        let max = (0..8u64).flat_map(|i| (0..20u64).map(move |k| 100 + ((k * 8 + i) * 7919) % 160)).max();
        assert_eq!(Some(read_record(&d.path().join("lock-b.json")).unwrap().highest), max);
    }

    #[test]
    fn second_opener_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let _first = StateDir::open(d.path()).unwrap();
        assert!(matches!(StateDir::open(d.path()), Err(StateError::InUse(_))));
    }

    #[test]
    fn corrupt_records_stop_the_open() {
        let d = tempfile::tempdir().unwrap();
        {
            let (s, _) = StateDir::open(d.path()).unwrap();
            s.write(&Record::new(lock("a"), 12345, SystemTime::now())).unwrap();
        }
        let p = d.path().join("lock-a.json");
        let good = fs::read_to_string(&p).unwrap();
        for bad in [
            good.replace("12345", "12346"),     // bit rot that still parses
            good[..good.len() / 2].to_string(), // torn write
            String::new(),                      // empty file
            "{\"lock\":\"a\"}".to_string(),     // missing fields
            good.replace("\"a\"", "\"b\""),     // record moved to another name
        ] {
            fs::write(&p, &bad).unwrap();
            let err = StateDir::open(d.path()).unwrap_err();
            assert!(matches!(err, StateError::Corrupt { .. }), "{bad:?} -> {err}");
        }
    }

    /// Closes the hole where the temp record was opened with a plain
    /// `File::create`, which follows a symlink planted at its name and
    /// truncates whatever it points to.
    #[test]
    fn the_temp_record_never_follows_a_symlink() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let (s, _) = StateDir::open(&d.path().join("new/state")).unwrap();
        let victim = d.path().join("victim");
        fs::write(&victim, "precious").unwrap();
        std::os::unix::fs::symlink(&victim, d.path().join("new/state/lock-a.json.tmp")).unwrap();
        s.write(&Record::new(lock("a"), 7, SystemTime::now())).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        let rec = d.path().join("new/state/lock-a.json");
        assert_eq!(fs::metadata(&rec).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(read_record(&rec).unwrap().highest, 7);
    }

    #[test]
    fn leftover_tmp_files_are_ignored() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("lock-a.json.tmp"), "garbage").unwrap();
        let (_s, recs) = StateDir::open(d.path()).unwrap();
        assert!(recs.is_empty());
        assert!(!d.path().join("lock-a.json.tmp").exists());
    }
}
