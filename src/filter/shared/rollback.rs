//! Noticing that etcd lost what this replica relied on.
//!
//! The marks, registrations and acknowledgements live only in etcd. An etcd
//! restored from a snapshot (or replaced) takes them back in time: marks
//! raised since are lower again, so a token between the snapshot's mark and
//! the real one would be admitted by a replica that reads the marks afresh,
//! and a replica registered since is no longer counted by raises. A live
//! replica can see it when it reads the marks again (its watch breaks on
//! such a restore): etcd's revision went back, its own registration is gone
//! (or expired during a partition), or a mark is below one it saw in etcd
//! before (marks never go down otherwise). Then it fails closed: it forwards
//! no write until restarted, cuts off those in flight (`cutoff`), puts back
//! the marks it saw (so that a replica started afterwards reads them), and
//! once its writes have had `--abort-grace`, leaves the replica set (so the
//! others' raises stop waiting for its acknowledgements), as a graceful exit
//! does.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::Shared;
use crate::filter::admission::Locks;
use crate::token::LockName;

/// The highest mark of each lock this replica has seen stored in etcd (read,
/// watched, or stored by its own compare-and-swap), and the highest revision
/// of its reads of the marks.
#[derive(Debug, Default)]
pub(super) struct Seen {
    marks: Mutex<HashMap<LockName, u64>>,
    revision: AtomicI64,
    /// Set once this replica has failed closed (it does so once).
    failed: AtomicBool,
}

/// What [`Seen`] held before a read was sent.
#[derive(Debug)]
pub(super) struct Before {
    marks: HashMap<LockName, u64>,
    revision: i64,
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

    /// A copy, taken before a read is sent: a mark this replica's own raise
    /// stored while the read was on its way is not a mark the read lost.
    pub(super) fn before(&self) -> Before {
        Before { marks: self.marks.lock().clone(), revision: self.revision.load(Ordering::Acquire) }
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

/// Why `read` shows etcd lost state this replica saw before it was sent, if
/// it does. Records what it read as seen either way.
pub(super) fn lost(seen: &Seen, before: &Before, read: &MarksRead) -> Option<String> {
    seen.revision.fetch_max(read.revision, Ordering::AcqRel);
    for (lock, t) in &read.marks {
        seen.mark(lock, *t);
    }
    if read.revision < before.revision {
        return Some(format!("etcd's revision went back from {} to {}", before.revision, read.revision));
    }
    if !read.registered {
        return Some("this replica's registration is gone from etcd (expired, or etcd restored)".to_string());
    }
    let now: HashMap<&LockName, u64> = read.marks.iter().map(|(l, t)| (l, *t)).collect();
    let (lock, was) = before.marks.iter().find(|(l, t)| now.get(l).copied().unwrap_or(0) < **t)?;
    let is = now.get(lock).copied().unwrap_or(0);
    Some(format!("lock {lock}'s mark in etcd is {is}, below the {was} it held before (etcd restored?)"))
}

/// Fails closed after etcd lost state (see the module docs), once; in the
/// background, so that the watch goes on applying the others' raises.
pub(super) fn fail_closed(shared: &Arc<Shared>, locks: &Arc<Locks>, why: String) {
    if shared.seen.failed.swap(true, Ordering::AcqRel) {
        return;
    }
    tracing::error!(
        replica = shared.id(),
        "{why}: this replica forwards no write until it is restarted; it puts its marks back in etcd and leaves the \
         replica set. See the README: etcd restored from a snapshot."
    );
    // Writes in flight are cut off here too (`stop_writing`).
    shared.stop_writing();
    let (shared, locks) = (shared.clone(), locks.clone());
    tokio::spawn(async move {
        put_marks_back(&shared).await;
        // As a graceful exit: only once no write of this replica can still
        // land (answered, or cut off `--abort-grace` ago).
        let until = tokio::time::Instant::now() + locks.abort_grace() + Duration::from_millis(200);
        while locks.all().iter().any(|e| !e.snapshot().3.is_empty()) && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep_until(until).await;
        shared.revoke().await;
    });
}

/// Compare-and-swaps every mark seen back up (never lowering one), retried
/// until etcd takes each: nothing is forwarded at them here; the replicas
/// that see them refuse below and acknowledge.
async fn put_marks_back(shared: &Shared) {
    let marks: Vec<(LockName, u64)> = shared.seen.marks.lock().iter().map(|(l, t)| (l.clone(), *t)).collect();
    for (lock, t) in marks {
        let mut wait = Duration::from_millis(100);
        loop {
            match shared.cas_up(&shared.keys.mark(&lock), t, None).await {
                Ok(stored) => {
                    tracing::warn!(%lock, t, stored, "mark put back in etcd");
                    break;
                }
                Err(e) => {
                    tracing::warn!(%lock, t, error = %e, "putting the mark back in etcd failed; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}
