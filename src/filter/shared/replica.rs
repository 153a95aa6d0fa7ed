//! A replica's registration and self-fencing, the sidecar's discipline
//! (see `lease::keeper`): the replica trusts its registration only until
//! `send of the last acknowledged keep-alive + TTL - margin`, on two clocks.
//! etcd starts the lease's new TTL when it receives that keep-alive, so the
//! replica stops forwarding writes at least `margin` before etcd can expire
//! its registration and let a raise complete without its acknowledgement.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};

use super::{err, Shared, SharedConfig};
use crate::lease::deadline::{Deadline, Stamp};
use crate::lease::etcd::EtcdBackend;
use crate::lease::LeaseBackend;

/// Grants the registration lease; the deadline runs from before the request.
pub(super) async fn grant(
    backend: &EtcdBackend,
    cfg: &SharedConfig,
) -> Result<(i64, Deadline), crate::filter::state::StateError> {
    let sent = Stamp::now();
    let g = backend.grant(cfg.ttl).await.map_err(err)?;
    // Trust the shorter of the TTL asked for and the one granted.
    let ttl = g.ttl.min(cfg.ttl);
    Ok((g.id, Deadline::after(sent, ttl.saturating_sub(cfg.margin))))
}

impl Shared {
    /// Creates `<prefix>/replicas/<id>` on our lease. If the key exists, a
    /// previous process with this id may still have writes landing in the
    /// store: wait until its lease expires (raises keep waiting for it until
    /// then, as they must) instead of taking its place early.
    pub(super) async fn register(&self) -> Result<(), crate::filter::state::StateError> {
        let key = self.keys.replica(self.id());
        let mut logged = false;
        loop {
            let mut c = self.client.clone();
            let txn =
                Txn::new().when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)]).and_then([TxnOp::put(
                    key.as_str(),
                    self.lease.to_string(),
                    Some(PutOptions::new().with_lease(self.lease)),
                )]);
            if self.timed(c.txn(txn)).await?.succeeded() {
                tracing::info!(replica = self.id(), lease = self.lease, "registered");
                return Ok(());
            }
            if self.valid_until.lock().is_none() {
                return Err(err("registration lease lost while waiting to register"));
            }
            if !logged {
                tracing::warn!(
                    replica = self.id(),
                    "{key} exists: waiting for the previous registration under this id to expire"
                );
                logged = true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The first step of a graceful exit: this replica forwards no write
    /// from now on, for good (`check_shared` refuses). Writes already past
    /// that check are the caller's to abort and wait out (`filter::serve`).
    pub fn stop_writing(&self) {
        *self.valid_until.lock() = None;
        // Cut off at once what is still in flight (answers read on after
        // their clients left too), not at the deadline watcher's next look:
        // the leaving replica's grace counts from here.
        self.cut.cut();
    }

    /// The last step of a graceful exit: revokes the registration, so raises
    /// waiting on this replica's acknowledgement go through now instead of
    /// after its TTL (a rollout otherwise holds every takeover for up to
    /// `--replica-ttl`). Only once no write of this replica can still reach
    /// the store. If the revoke fails, the lease expires on its own.
    pub async fn revoke(&self) {
        debug_assert!(self.valid_until.lock().is_none(), "revoke only after stop_writing");
        match self.lease_backend.revoke(self.lease).await {
            Ok(()) => tracing::info!(replica = self.id(), "registration revoked"),
            Err(e) => {
                tracing::warn!(replica = self.id(), error = %e, "revoking the registration failed; it expires with its TTL")
            }
        }
    }
}

/// Keeps the registration lease alive and moves the self-fencing deadline.
/// Only an acknowledged keep-alive moves it, only forward, timed from its
/// send; a lease reported gone ends the replica's writing for good.
pub(super) async fn keep_alive(shared: Arc<Shared>) {
    let ttl = shared.cfg.ttl;
    let interval = ttl / 3;
    let retry = (ttl / 12).max(Duration::from_millis(50));
    let mut next = interval;
    loop {
        tokio::time::sleep(next).await;
        let sent = Stamp::now();
        let remaining = shared.valid_until.lock().map_or(Duration::ZERO, |d| d.remaining(sent));
        // Never wait on a keep-alive past the deadline it could still save.
        let wait = remaining.max(Duration::from_millis(100));
        match tokio::time::timeout(wait, shared.lease_backend.keep_alive(shared.lease)).await {
            Ok(Ok(Some(granted))) => {
                let d = Deadline::after(sent, granted.min(ttl).saturating_sub(shared.cfg.margin));
                let mut v = shared.valid_until.lock();
                if let Some(cur) = *v {
                    if d.remaining(sent) > cur.remaining(sent) {
                        *v = Some(d);
                    }
                }
                next = interval;
            }
            Ok(Ok(None)) => {
                *shared.valid_until.lock() = None;
                tracing::error!(
                    replica = shared.id(),
                    "registration lease expired: this replica forwards no write until it is restarted"
                );
                return;
            }
            Ok(Err(e)) => {
                shared.stats.keepalive_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(replica = shared.id(), error = %e, "registration keep-alive failed");
                next = retry;
            }
            Err(_) => {
                shared.stats.keepalive_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(replica = shared.id(), "registration keep-alive timed out");
                next = retry;
            }
        }
    }
}
