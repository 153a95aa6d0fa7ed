//! The keeper's task: rounds of one lease each (`Task::acquire`, queue and
//! wait for our turn; `Task::fence`, fence the filters with our key watched;
//! `Task::hold`), the lease kept alive through all three, and what happens
//! between rounds (the token withdrawn before the revoke, the pause after a
//! release, the wait for a rejoin). Owned by [`super::Keeper`].

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::alive::{keep_lease, keepalive_interval, key_gone};
use super::fencing::fence_all;
use super::settings::{KeeperConfig, Rejoin};
use super::status::{KeeperStats, LockStatus, Phase};
use crate::lease::backoff::Backoff;
use crate::lease::deadline::{Deadline, Stamp};
use crate::lease::{queue_prefix, Fencer, LeaseBackend, LeaseError};
use crate::token::Token;

pub(super) enum Command {
    /// Step down from this round, if its token is the one given (`None`:
    /// whichever round is on).
    Release(Option<Token>),
    Rejoin,
}

impl Command {
    /// Whether this is a release of the round with `token`.
    pub(super) fn releases(&self, token: Token) -> bool {
        matches!(self, Command::Release(None)) || matches!(self, Command::Release(Some(t)) if *t == token)
    }
}

/// Why a round (one lease) ended.
enum RoundEnd {
    Lost(String),
    Released,
    Stopped,
}

/// A granted lease and when it was asked for.
#[derive(Clone, Copy)]
struct Lease {
    id: i64,
    ttl: Duration,
    asked: Stamp,
}

/// A future that ends the round when it resolves (with the reason).
type Ender<'a> = Pin<&'a mut (dyn Future<Output = String> + Send)>;

pub(super) struct Task {
    pub(super) backend: Arc<dyn LeaseBackend>,
    pub(super) fencer: Arc<dyn Fencer>,
    pub(super) cfg: KeeperConfig,
    pub(super) tx: Arc<watch::Sender<LockStatus>>,
    pub(super) cmd: mpsc::UnboundedReceiver<Command>,
    pub(super) stop: CancellationToken,
    pub(super) stats: Arc<KeeperStats>,
    /// Leases whose revoke failed (etcd unreachable). Revoked once etcd
    /// answers again, so we do not queue behind our own stale key for a TTL.
    pub(super) abandoned: Vec<i64>,
}

impl Task {
    pub(super) async fn run(mut self) {
        let mut backoff = Backoff::default_retry();
        while !self.stop.is_cancelled() {
            self.publish(Phase::Campaigning, None);
            let Some(lease) = self.grant(&mut backoff).await else { break };
            // A release or rejoin asked for before this round is not about it.
            while self.cmd.try_recv().is_ok() {}
            let end = self.round(lease).await;
            // The token and the deadline go first, then the revoke: no write
            // may carry the token while we wait (up to 2 s) for etcd.
            // Only a lock held (or being fenced for) is a loss the app must
            // acknowledge; a lease lost while queueing is not.
            let held = matches!(self.tx.borrow().phase, Phase::Holding | Phase::Fencing | Phase::FencedOut);
            let manual = self.cfg.rejoin == Rejoin::Manual && held;
            match &end {
                RoundEnd::Stopped => self.publish(Phase::Stopped, None),
                RoundEnd::Released => self.publish_lost(None, Phase::Campaigning),
                RoundEnd::Lost(why) if manual => {
                    // A rejoin asked for before this loss does not answer it.
                    while self.cmd.try_recv().is_ok() {}
                    self.publish_lost(Some(why.clone()), Phase::AwaitingRejoin)
                }
                RoundEnd::Lost(why) => self.publish_lost(Some(why.clone()), Phase::Campaigning),
            }
            self.revoke(lease.id).await;
            match end {
                RoundEnd::Stopped => break,
                RoundEnd::Released => {
                    tracing::info!(lock = %self.cfg.lock, "released the lock");
                    tokio::select! {
                        _ = tokio::time::sleep(self.cfg.release_pause) => {}
                        _ = self.stop.cancelled() => break,
                    }
                }
                RoundEnd::Lost(why) => {
                    tracing::warn!(lock = %self.cfg.lock, reason = %why, "lost the lease");
                    if manual && !self.await_rejoin().await {
                        break;
                    }
                }
            }
        }
        self.publish(Phase::Stopped, None);
        tracing::info!(lock = %self.cfg.lock, "keeper stopped; lease revoked");
    }

    /// Sets the phase and withdraws (or keeps) the token. Every phase change
    /// goes through here or [`Self::publish_lost`].
    fn publish(&self, phase: Phase, token: Option<Token>) {
        self.tx.send_modify(|s| {
            s.phase = phase;
            s.token = token;
            if token.is_none() {
                s.valid_until = None;
                s.lease_id = None;
            }
        });
    }

    /// With [`Rejoin::Manual`], after a loss: waits for the app's rejoin
    /// (`true`) or the keeper's stop (`false`). Nothing campaigns meanwhile,
    /// so this instance cannot win the lock again under an app that still
    /// has writes of the lost session queued.
    async fn await_rejoin(&mut self) -> bool {
        tracing::warn!(lock = %self.cfg.lock, "awaiting POST /v1/lock/rejoin before campaigning again (--rejoin manual)");
        loop {
            tokio::select! {
                c = self.cmd.recv() => match c {
                    Some(Command::Rejoin) => {
                        tracing::info!(lock = %self.cfg.lock, "the app asked to rejoin; campaigning");
                        return true;
                    }
                    // Nothing is held, so there is nothing to release.
                    Some(Command::Release(_)) => {}
                    None => return false,
                },
                _ = self.stop.cancelled() => return false,
            }
        }
    }

    fn publish_lost(&self, why: Option<String>, next: Phase) {
        let was_holding = matches!(self.tx.borrow().phase, Phase::Holding | Phase::Fencing | Phase::FencedOut);
        if was_holding {
            self.stats.losses.fetch_add(1, Ordering::Relaxed);
        }
        self.publish(next, None);
        if why.is_some() {
            self.tx.send_modify(|s| s.last_error = why);
        }
    }

    fn note_error(&self, e: String) {
        self.tx.send_if_modified(|s| {
            s.last_error = Some(e);
            false
        });
    }

    /// A lease, retried with backoff; `None` once stopped.
    async fn grant(&mut self, backoff: &mut Backoff) -> Option<Lease> {
        loop {
            self.revoke_abandoned().await;
            let asked = Stamp::now();
            let granted = tokio::select! {
                g = self.backend.grant(self.cfg.ttl) => g,
                _ = self.stop.cancelled() => return None,
            };
            match granted {
                Ok(g) => {
                    backoff.reset();
                    return Some(Lease { id: g.id, ttl: g.ttl, asked });
                }
                Err(e) => {
                    let wait = backoff.next_delay();
                    tracing::warn!(error = %e, ?wait, "could not get a lease; retrying");
                    self.note_error(e.to_string());
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.stop.cancelled() => return None,
                    }
                }
            }
        }
    }

    /// Revokes `lease` (bounded); remembers it if etcd did not answer.
    async fn revoke(&mut self, lease: i64) {
        match tokio::time::timeout(Duration::from_secs(2), self.backend.revoke(lease)).await {
            Ok(Ok(())) => {}
            _ => self.abandoned.push(lease),
        }
    }

    async fn revoke_abandoned(&mut self) {
        let mut left = Vec::new();
        for lease in std::mem::take(&mut self.abandoned) {
            match tokio::time::timeout(Duration::from_secs(2), self.backend.revoke(lease)).await {
                Ok(Ok(())) => {
                    tracing::info!(lease = format!("{lease:x}"), "revoked a lease abandoned during an outage")
                }
                _ => left.push(lease),
            }
        }
        self.abandoned = left;
    }

    /// One lease's life: queue, wait, fence, hold.
    async fn round(&mut self, lease: Lease) -> RoundEnd {
        let margin = self.cfg.margin.min(lease.ttl / 2);
        self.tx.send_modify(|s| {
            s.lease_id = Some(lease.id);
            s.ttl = lease.ttl;
            s.valid_until = Some(Deadline::after(lease.asked, lease.ttl - margin));
        });
        let prefix = queue_prefix(&self.cfg.key_prefix, self.cfg.lock.as_str());
        let key = format!("{prefix}{:016x}", lease.id);
        let keep = keep_lease(self.backend.clone(), lease.id, lease.asked, margin, self.tx.clone(), self.stats.clone());
        let mut keep: Pin<Box<dyn Future<Output = String> + Send>> = Box::pin(keep);

        let rev = match self.acquire(&prefix, &key, lease.id, keep.as_mut()).await {
            Ok(rev) => rev,
            Err(end) => return end,
        };
        // A release asked for while queued was answered as about no lock
        // held (`released: false`); it must not step down from this win.
        while self.cmd.try_recv().is_ok() {}
        let Some(token) = u64::try_from(rev).ok().and_then(Token::new) else {
            return RoundEnd::Lost(format!("etcd gave a revision that is no token: {rev}"));
        };
        self.stats.acquisitions.fetch_add(1, Ordering::Relaxed);

        // Our key is watched from before the fence: a key deleted while we
        // fence must not let us hold (another candidate may already).
        let gone = key_gone(self.backend.clone(), key.clone(), rev, keepalive_interval(lease.ttl));
        let mut gone: Pin<Box<dyn Future<Output = String> + Send>> = Box::pin(gone);
        let mut retries = JoinSet::new();
        // A release asked for while fencing ends the round at once: with
        // `--fence-required` and a filter down the fence may never end, and
        // the app asked to step down. Dropping the fence is safe: its token
        // was never injected into a write. (The receiver is moved out for
        // the fence, which borrows the whole task; put back after.)
        let mut cmd = std::mem::replace(&mut self.cmd, mpsc::unbounded_channel().1);
        let released = async {
            loop {
                match cmd.recv().await {
                    Some(c) if c.releases(token) => return RoundEnd::Released,
                    // A rejoin is only meaningful while awaiting one; a
                    // release of an earlier token is not about this round.
                    Some(_) => {}
                    // The handle is gone: `hold` ends the round for it.
                    None => std::future::pending::<()>().await,
                }
            }
        };
        let fenced = tokio::select! {
            end = self.fence(token, &key, rev, &mut retries, keep.as_mut(), gone.as_mut()) => end,
            end = released => Some(end),
        };
        self.cmd = cmd;
        if let Some(end) = fenced {
            return end;
        }
        self.hold(token, keep.as_mut(), gone.as_mut(), &mut retries).await
    }

    /// Queues and waits for our turn; the create revision of our key.
    async fn acquire(&self, prefix: &str, key: &str, lease: i64, keep: Ender<'_>) -> Result<i64, RoundEnd> {
        let backend = self.backend.clone();
        let work = async {
            let mut backoff = Backoff::default_retry();
            let rev = loop {
                match backend.enqueue(key, &self.cfg.holder, lease).await {
                    Ok(rev) => break rev,
                    Err(e @ LeaseError::Gone(_)) => return Err(e),
                    Err(e) => {
                        tracing::warn!(error = %e, "could not queue for the lock; retrying");
                        self.note_error(format!("queueing for the lock: {e}"));
                        backoff.wait().await;
                    }
                }
            };
            backoff.reset();
            loop {
                match backend.wait_turn(prefix, key, rev).await {
                    Ok(()) => return Ok(rev),
                    Err(e @ LeaseError::Gone(_)) => return Err(e),
                    Err(e) => {
                        tracing::debug!(error = %e, "waiting for our turn failed; retrying");
                        self.note_error(format!("waiting for the lock: {e}"));
                        backoff.wait().await;
                    }
                }
            }
        };
        match until_ended(&self.stop, work, keep, None).await? {
            Ok(rev) => Ok(rev),
            Err(e) => Err(RoundEnd::Lost(e.to_string())),
        }
    }

    /// Fences the filters with `token`, then confirms our key still stands;
    /// `None` when the round goes on to holding.
    async fn fence(
        &self,
        token: Token,
        key: &str,
        rev: i64,
        retries: &mut JoinSet<()>,
        mut keep: Ender<'_>,
        mut gone: Ender<'_>,
    ) -> Option<RoundEnd> {
        let last = self.tx.borrow().last_token;
        if let Some(last) = last.filter(|l| token <= *l) {
            tracing::error!(
                token = token.get(),
                last = last.get(),
                "FENCED OUT: etcd gave a token at or below one this sidecar already held; etcd's revision went \
                 backwards (restored from an old snapshot?). Writes are refused. Recover with \
                 `etcdutl snapshot restore --bump-revision`."
            );
            self.tx.send_modify(|s| {
                s.phase = Phase::FencedOut;
                s.token = Some(token);
                s.fenced_out_highest = Some(last.get());
            });
            return None;
        }
        tracing::info!(lock = %self.cfg.lock, token = token.get(), "won the lock; fencing filters");
        self.tx.send_modify(|s| {
            s.phase = Phase::Fencing;
            s.token = Some(token);
            s.last_token = Some(token);
            s.last_error = None;
        });
        let fenced = fence_all(self.fencer.clone(), &self.cfg, token, retries, self.tx.clone(), self.stats.clone());
        if let Err(end) = until_ended(&self.stop, fenced, keep.as_mut(), Some(gone.as_mut())).await {
            return Some(end);
        }
        // Check the key again before holding: a deletion the watch has not
        // reported yet must not let us hold.
        let backend = self.backend.clone();
        let confirm = async {
            let mut backoff = Backoff::default_retry();
            loop {
                match backend.key_revision(key).await {
                    Ok(r) => return r == Some(rev),
                    Err(e) => {
                        tracing::debug!(error = %e, "could not confirm our key before holding; retrying");
                        backoff.wait().await;
                    }
                }
            }
        };
        match until_ended(&self.stop, confirm, keep, Some(gone)).await {
            Ok(true) => {}
            Ok(false) => return Some(RoundEnd::Lost("our lock key was deleted while fencing".into())),
            Err(end) => return Some(end),
        }
        self.tx.send_modify(|s| {
            if s.phase == Phase::Fencing {
                s.phase = Phase::Holding;
            }
        });
        if self.tx.borrow().phase == Phase::Holding {
            tracing::info!(lock = %self.cfg.lock, token = token.get(), "holding the lock");
        }
        None
    }

    /// Holds `token` until something ends the round (stale commands were
    /// dropped when the lock was won).
    async fn hold(
        &mut self,
        token: Token,
        mut keep: Ender<'_>,
        mut gone: Ender<'_>,
        retries: &mut JoinSet<()>,
    ) -> RoundEnd {
        loop {
            tokio::select! {
                why = &mut keep => return RoundEnd::Lost(why),
                why = &mut gone => return RoundEnd::Lost(why),
                _ = self.stop.cancelled() => return RoundEnd::Stopped,
                c = self.cmd.recv() => match c {
                    Some(c) if c.releases(token) => return RoundEnd::Released,
                    // A rejoin is only meaningful while awaiting one; a
                    // release of an earlier token is not about this round.
                    Some(_) => {}
                    None => return RoundEnd::Stopped,
                },
                Some(_) = retries.join_next(), if !retries.is_empty() => {}
            }
        }
    }
}

/// Runs `work` unless the round ends first: the lease is lost (`keep`), our
/// key is gone (`gone`), or the keeper is stopped.
async fn until_ended<T>(
    stop: &CancellationToken,
    work: impl Future<Output = T>,
    keep: Ender<'_>,
    gone: Option<Ender<'_>>,
) -> Result<T, RoundEnd> {
    let gone = async {
        match gone {
            Some(g) => g.await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        v = work => Ok(v),
        why = keep => Err(RoundEnd::Lost(why)),
        why = gone => Err(RoundEnd::Lost(why)),
        _ = stop.cancelled() => Err(RoundEnd::Stopped),
    }
}
