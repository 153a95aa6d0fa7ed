//! Noticing that etcd lost what this replica relied on.
//!
//! The marks, registrations and acknowledgements live only in etcd. An etcd
//! restored from a snapshot (or replaced) takes them back in time: marks
//! raised since are lower again, so a token between the snapshot's mark and
//! the real one would be admitted by a replica that reads the marks afresh,
//! and a replica registered since is no longer counted by raises. A live
//! replica can see it when it reads the marks again (its watch breaks on
//! such a restore): etcd's revision went back, its own registration is gone,
//! or a mark is below one it saw in etcd before (marks never go down
//! otherwise). Then it fails closed: it forwards no write until restarted,
//! cuts off those in flight (`cutoff`), keeps acknowledging raises (so the
//! others are not held up), and puts back the marks it saw, so that a
//! replica started afterwards reads them (`README`: restoring etcd).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use parking_lot::Mutex;

use super::Shared;
use crate::token::LockName;

/// The highest mark of each lock this replica has seen stored in etcd (read,
/// watched, or stored by its own compare-and-swap), and the highest revision
/// of its reads of the marks.
#[derive(Debug, Default)]
pub(super) struct Seen {
    marks: Mutex<HashMap<LockName, u64>>,
    revision: std::sync::atomic::AtomicI64,
}

impl Seen {
    /// `lock`'s mark was `t` in etcd.
    pub(super) fn mark(&self, lock: &LockName, t: u64) {
        let mut m = self.marks.lock();
        match m.get_mut(lock) {
            Some(v) => *v = (*v).max(t),
            None => {
                m.insert(lock.clone(), t);
            }
        }
    }
}

/// What one read of the marks found.
#[derive(Debug)]
pub(super) struct MarksRead {
    pub marks: Vec<(LockName, u64)>,
    pub revision: i64,
    /// This replica's registration key was there.
    pub registered: bool,
}

/// Why `read` shows etcd lost state this replica saw, if it does. Records
/// what it read as seen either way.
pub(super) fn lost(seen: &Seen, read: &MarksRead) -> Option<String> {
    let before = seen.revision.fetch_max(read.revision, Ordering::AcqRel);
    let mut why = None;
    if read.revision < before {
        why = Some(format!("etcd's revision went back from {before} to {}", read.revision));
    } else if !read.registered {
        why = Some("this replica's registration is gone from etcd".to_string());
    } else {
        let now: HashMap<&LockName, u64> = read.marks.iter().map(|(l, t)| (l, *t)).collect();
        let m = seen.marks.lock();
        if let Some((lock, was)) = m.iter().find(|(l, t)| now.get(l).copied().unwrap_or(0) < **t) {
            let is = now.get(lock).copied().unwrap_or(0);
            why = Some(format!("lock {lock}'s mark in etcd is {is}, below the {was} it held before"));
        }
    }
    for (lock, t) in &read.marks {
        seen.mark(lock, *t);
    }
    why
}

/// Fails closed after etcd lost state (see the module docs): stops writing
/// for good, then puts back every mark it saw that etcd no longer holds.
pub(super) async fn fail_closed(shared: Arc<Shared>, why: String) {
    tracing::error!(
        replica = shared.id(),
        "{why}: etcd lost state this replica relied on (restored from a snapshot?). This replica forwards no write \
         until it is restarted; its marks are put back in etcd. See the README, restoring etcd with --shared-marks."
    );
    shared.stop_writing();
    let marks: Vec<(LockName, u64)> = shared.seen.marks.lock().iter().map(|(l, t)| (l.clone(), *t)).collect();
    for (lock, t) in marks {
        // A bare compare-and-swap, not a raise: nothing is forwarded at `t`
        // here; the replicas that see it refuse below it and acknowledge.
        match shared.cas_up(&shared.keys.mark(&lock), t, None).await {
            Ok(_) => tracing::warn!(%lock, t, "mark put back in etcd"),
            Err(e) => tracing::error!(%lock, t, error = %e, "could not put the mark back in etcd"),
        }
    }
}
