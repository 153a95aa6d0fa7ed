//! Applying other replicas' raises: a watch on the marks prefix. For each
//! raise to `t`: refuse every older token at once, drain this replica's own
//! older in-flight writes (the barrier's drain timeout, abort and grace),
//! then acknowledge `t` in `<prefix>/acks/<lock>/<id>`. The acknowledgement
//! is what lets the raiser forward `t`'s writes, so it is never written
//! before the drain is done.
//!
//! If the watch fails, the replica stops forwarding writes (`writable` is
//! false), reads every mark afresh at one revision, applies them, and
//! watches again from the next revision. Its raises are still waited for by
//! the others meanwhile, so nothing is missed, only delayed. A read that
//! shows etcd lost state this replica saw (restored from a snapshot) makes
//! it fail closed (`rollback`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, WatchOptions};
use tokio::time::Instant;

use super::keys::decode;
use super::{rollback, Shared};
use crate::filter::admission::{AdmitError, Locks};
use crate::token::LockName;

/// How long one drain may take at most; the barrier's own drain timeout and
/// abort end it well before (this only bounds a bug).
const DRAIN_BOUND: Duration = Duration::from_secs(3600);

/// Applies the marks read at start-up (revision `rev`) and watches from `rev + 1`.
pub fn start(shared: Arc<Shared>, locks: Arc<Locks>, marks: Vec<(LockName, u64)>, rev: i64) {
    for (lock, t) in marks {
        apply(&shared, &locks, lock, t);
    }
    tokio::spawn(watch_loop(shared, locks, rev + 1));
}

/// One raise seen: refuse below now, drain and acknowledge in the background.
fn apply(shared: &Arc<Shared>, locks: &Arc<Locks>, lock: LockName, t: u64) {
    shared.seen.mark(&lock, t);
    let entry = locks.entry(&lock);
    entry.refuse_below(t);
    let shared = shared.clone();
    tokio::spawn(async move {
        match entry.observe(t, Instant::now() + DRAIN_BOUND).await {
            Ok(()) => {}
            // A newer mark arrived meanwhile: its own acknowledgement covers this one.
            Err(AdmitError::Stale { .. }) => return,
            Err(e) => {
                tracing::error!(%lock, t, error = %e, "could not drain older writes; not acknowledging");
                return;
            }
        }
        let key = shared.keys.ack(&lock, shared.id());
        loop {
            match shared.cas_up(&key, t, Some(shared.lease)).await {
                Ok(_) => {
                    tracing::debug!(%lock, t, "acknowledged raise");
                    return;
                }
                Err(e) if shared.valid_until.lock().is_some() => {
                    tracing::warn!(%lock, t, error = %e, "acknowledging a raise failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(_) => return,
            }
        }
    });
}

async fn watch_loop(shared: Arc<Shared>, locks: Arc<Locks>, mut from: i64) {
    loop {
        if let Err(e) = watch_from(&shared, &locks, from).await {
            tracing::warn!(replica = shared.id(), error = %e, "marks watch ended; re-reading the marks");
        }
        shared.watching.store(false, Ordering::Release);
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let before = shared.seen.before();
            match shared.read_marks().await {
                Ok(read) => {
                    let lost = rollback::lost(&shared.seen, &before, &read);
                    if let (Some(why), false) = (lost, shared.cfg.unsafe_no_rollback_check) {
                        rollback::fail_closed(&shared, &locks, why);
                    }
                    for (lock, t) in read.marks {
                        apply(&shared, &locks, lock, t);
                    }
                    from = read.revision + 1;
                    break;
                }
                Err(e) => tracing::warn!(replica = shared.id(), error = %e, "reading the marks failed"),
            }
        }
    }
}

/// Watches the marks prefix from `from` until the watch fails.
async fn watch_from(shared: &Arc<Shared>, locks: &Arc<Locks>, from: i64) -> Result<(), String> {
    let mut c = shared.client.clone();
    let opts = WatchOptions::new().with_prefix().with_start_revision(from);
    let mut stream = tokio::time::timeout(shared.cfg.etcd.call_timeout, c.watch(shared.keys.marks(), Some(opts)))
        .await
        .map_err(|_| "creating the watch timed out".to_string())?
        .map_err(|e| e.to_string())?;
    shared.watching.store(true, Ordering::Release);
    loop {
        let Some(m) = stream.message().await.map_err(|e| e.to_string())? else {
            return Err("watch stream closed".into());
        };
        if m.canceled() {
            return Err(format!("watch cancelled: {}", m.cancel_reason()));
        }
        for ev in m.events() {
            let Some(kv) = ev.kv() else { continue };
            if ev.event_type() != EventType::Put {
                continue;
            }
            match (shared.keys.lock_of(kv.key()), decode(kv.value())) {
                (Some(lock), Some(t)) => apply(shared, locks, lock, t),
                // Fail closed: a mark we cannot read might be a raise.
                _ => return Err(format!("unreadable mark {:?}", kv.key_str())),
            }
        }
    }
}
