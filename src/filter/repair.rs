//! `fencegate filter set-mark`: the way back from a wrong high-water mark.
//!
//! A mark raised by a forged token (before verification, or with it off)
//! refuses every genuine holder, and it is durable, so a restart keeps it.
//! This rewrites one lock's record offline. It takes the state directory's
//! `flock` first, exactly as a filter does, so it refuses while a filter runs
//! on the directory: a running filter would keep (and re-persist) its own
//! in-memory mark, and could have forwarded writes above the new one.

use std::path::Path;
use std::time::SystemTime;

use super::state::{Record, StateDir, StateError};
use crate::token::{LockName, Token};

/// What `set-mark` changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MarkChange {
    pub lock: LockName,
    /// The mark before (`None`: the lock had no record).
    pub old: Option<u64>,
    pub new: u64,
}

/// Sets `lock`'s durable mark in `dir` to `token` (up or down).
pub fn set_mark(dir: &Path, lock: &LockName, token: Token) -> Result<MarkChange, StateError> {
    let (state, records) = StateDir::open_repairing(dir, Some(lock))?;
    let old = records.get(lock).map(|r| r.highest);
    state.set(&Record::new(lock.clone(), token.get(), SystemTime::now()))?;
    tracing::warn!(%lock, old, new = token.get(), dir = %dir.display(), "high-water mark set by hand");
    Ok(MarkChange { lock: lock.clone(), old, new: token.get() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_the_mark_and_refuses_while_the_directory_is_held() {
        let d = tempfile::tempdir().unwrap();
        let lock: LockName = "l".parse().unwrap();
        let c = set_mark(d.path(), &lock, Token::new(9).unwrap()).unwrap();
        assert_eq!((c.old, c.new), (None, 9));
        let c = set_mark(d.path(), &lock, Token::new(3).unwrap()).unwrap();
        assert_eq!((c.old, c.new), (Some(9), 3), "lowered");
        let (_held, recs) = StateDir::open(d.path()).unwrap();
        assert_eq!(recs[&lock].highest, 3);
        assert!(matches!(set_mark(d.path(), &lock, Token::new(1).unwrap()), Err(StateError::InUse(_))));
    }

    /// A corrupt record stops a filter's start; set-mark can still replace
    /// it (but not while another lock's record is corrupt too).
    #[test]
    fn replaces_a_corrupt_record() {
        let d = tempfile::tempdir().unwrap();
        let lock: LockName = "l".parse().unwrap();
        std::fs::write(d.path().join("lock-l.json"), b"{ torn").unwrap();
        assert!(matches!(StateDir::open(d.path()), Err(StateError::Corrupt { .. })));
        let c = set_mark(d.path(), &lock, Token::new(9).unwrap()).unwrap();
        assert_eq!((c.old, c.new), (None, 9));
        assert_eq!(StateDir::open(d.path()).unwrap().1[&lock].highest, 9);
        std::fs::write(d.path().join("lock-m.json"), b"{ torn").unwrap();
        assert!(matches!(set_mark(d.path(), &lock, Token::new(3).unwrap()), Err(StateError::Corrupt { .. })));
    }
}
