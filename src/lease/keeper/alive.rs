//! Keeping the lease: keep-alives that move the self-fencing deadline, and
//! the watch (and reads) on our own queue key. Both run for a whole round,
//! owned by it (see the parent module's rules).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::status::{KeeperStats, LockStatus};
use crate::lease::backoff::Backoff;
use crate::lease::deadline::{Deadline, Stamp};
use crate::lease::{LeaseBackend, LeaseError};

/// Keep-alives go every TTL/3.
pub(super) fn keepalive_interval(ttl: Duration) -> Duration {
    (ttl / 3).max(Duration::from_millis(100))
}

/// Keeps `lease` alive until it is lost; returns why. Moves the
/// self-fencing deadline after every acknowledged keep-alive.
pub(super) async fn keep_lease(
    backend: Arc<dyn LeaseBackend>,
    lease: i64,
    asked: Stamp,
    margin: Duration,
    tx: Arc<watch::Sender<LockStatus>>,
    stats: Arc<KeeperStats>,
) -> String {
    let interval = keepalive_interval(tx.borrow().ttl);
    // The deadline counts from when the lease was asked for; so does the first keep-alive.
    let mut next = asked.mono + interval;
    loop {
        if let Err(why) = sleep_watching_deadline(next, &tx).await {
            return why;
        }
        let sent = Stamp::now();
        let deadline = tx.borrow().valid_until;
        // Never wait on one keep-alive past the moment we would self-fence.
        let budget =
            deadline.map(|d| d.remaining(sent)).unwrap_or_default().clamp(Duration::from_millis(100), interval);
        match tokio::time::timeout(budget, backend.keep_alive(lease)).await {
            Ok(Ok(Some(granted))) => {
                let rtt = sent.mono.elapsed();
                stats.keepalives.fetch_add(1, Ordering::Relaxed);
                stats.last_keepalive_us.store(rtt.as_micros() as u64, Ordering::Relaxed);
                stats.keepalive_us_total.fetch_add(rtt.as_micros() as u64, Ordering::Relaxed);
                // Timed from this request's own send (see the module docs).
                let until = Deadline::after(sent, granted.saturating_sub(margin));
                tx.send_if_modified(|s| {
                    if s.lease_id == Some(lease) && s.valid_until.is_none_or(|u| u.mono() < until.mono()) {
                        s.valid_until = Some(until);
                    }
                    // A keep-alive's success answers only a keep-alive's failure (queueing errors stay).
                    if s.last_error.as_deref().is_some_and(|e| e.starts_with("keep-alive")) {
                        s.last_error = None;
                    }
                    false // a deadline moving is not a state change worth waking watchers for
                });
                next = sent.mono + interval;
            }
            Ok(Ok(None)) => return "the lease expired in the backend".into(),
            Ok(Err(e)) => {
                stats.keepalive_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "keep-alive failed");
                tx.send_if_modified(|s| {
                    s.last_error = Some(format!("keep-alive: {e}"));
                    false
                });
                if let LeaseError::Gone(_) = e {
                    return e.to_string();
                }
                next = tokio::time::Instant::now() + interval / 4;
            }
            Err(_) => {
                stats.keepalive_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(?budget, "keep-alive timed out");
                tx.send_if_modified(|s| {
                    s.last_error = Some(format!("keep-alive timed out after {budget:?}"));
                    false
                });
                next = tokio::time::Instant::now() + interval / 4;
            }
        }
        if tx.borrow().valid_until.is_none_or(|d| d.passed(Stamp::now())) {
            return "no keep-alive acknowledged within the TTL (self-fenced)".into();
        }
    }
}

/// Sleeps until `until`, in short steps, checking the self-fencing deadline on
/// both clocks at each: a sleep is measured on CLOCK_MONOTONIC, which stops
/// during a suspend, so a round must not sleep through a deadline that passed
/// on CLOCK_BOOTTIME. `Err` once the deadline has passed.
async fn sleep_watching_deadline(until: tokio::time::Instant, tx: &watch::Sender<LockStatus>) -> Result<(), String> {
    const STEP: Duration = Duration::from_millis(100);
    loop {
        if tx.borrow().valid_until.is_none_or(|d| d.passed(Stamp::now())) {
            return Err("no keep-alive acknowledged within the TTL (self-fenced)".into());
        }
        let now = tokio::time::Instant::now();
        if now >= until {
            return Ok(());
        }
        tokio::time::sleep_until(until.min(now + STEP)).await;
    }
}

/// Resolves once our key (created at `rev`) is gone: seen by a watch (the
/// fast path), or by a linearizable read every `every` (a watch parked on an
/// etcd member cut off from the quorum can miss the deletion).
pub(super) async fn key_gone(backend: Arc<dyn LeaseBackend>, key: String, rev: i64, every: Duration) -> String {
    let watch = async {
        let mut backoff = Backoff::default_retry();
        loop {
            match backend.watch_gone(&key, rev).await {
                Ok(()) => return "our lock key was deleted".to_string(),
                Err(e) => {
                    // Losing the watch is not losing the lock: keep-alives, the
                    // reads below and the deadline still decide.
                    tracing::debug!(error = %e, "watch on our key failed; retrying");
                    backoff.wait().await;
                }
            }
        }
    };
    let read = async {
        loop {
            tokio::time::sleep(every).await;
            match backend.key_revision(&key).await {
                Ok(Some(r)) if r == rev => {}
                Ok(_) => return "our lock key is gone (read)".to_string(),
                Err(e) => tracing::debug!(error = %e, "could not read our key"),
            }
        }
    };
    tokio::select! {
        why = watch => why,
        why = read => why,
    }
}
