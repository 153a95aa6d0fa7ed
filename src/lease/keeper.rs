//! The keeper: one background task per sidecar that campaigns for the lock,
//! keeps the lease alive, fences the filters on takeover, and publishes the
//! lock's state on a `tokio::sync::watch` channel.
//!
//! The task is owned by [`Keeper`]: [`Keeper::shutdown`] stops it and revokes
//! the lease; dropping the `Keeper` aborts it (and the lease then expires on
//! its own). Background fence retries live in a `JoinSet` owned by the
//! current round, so they end with it.
//!
//! One round is one lease: `Task::acquire` (queue, wait for our turn),
//! `Task::fence` (fence the filters, our key watched), `Task::hold`.
//! The lease is kept alive by `keep_lease` through all three.
//!
//! # Self-fencing
//!
//! The sidecar trusts that it holds the lock only until
//! `instant the last acknowledged keep-alive was sent + TTL - margin`,
//! measured on CLOCK_MONOTONIC and CLOCK_BOOTTIME both (see [`super::deadline`]).
//! etcd starts a lease's new TTL when it *receives* the keep-alive, which is
//! after we sent it, so our deadline falls at least `margin` before etcd could
//! expire the lease and let another candidate in, as long as the two clocks'
//! rates differ by less than `margin / TTL` (10% with the defaults: TTL 10 s,
//! margin 1 s). The rules, as implemented:
//! * only an acknowledged keep-alive moves the deadline, and only forward,
//!   timed from the send of the very request that was acknowledged (the etcd
//!   backend uses a fresh stream per keep-alive, so no stale answer is read);
//! * a keep-alive that fails or times out moves nothing; it is retried at
//!   TTL/12, and never waited on past the deadline;
//! * the round ends (token withdrawn *before* the lease is revoked) when the
//!   deadline passes, the lease is reported gone, or our queue key is deleted
//!   (seen by a watch, or by a read of the key every keep-alive interval);
//! * a token at or below one this sidecar already held is never used
//!   (`fenced_out`): etcd's revision went backwards.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use alive::{keep_lease, keepalive_interval, key_gone};
use fencing::fence_all;

use super::backoff::Backoff;
use super::deadline::{Deadline, Stamp};
use super::{queue_prefix, Fencer, LeaseBackend, LeaseError};
use crate::token::{LockName, Token};

/// Where the keeper stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Waiting for a lease or for its turn in the queue.
    Campaigning,
    /// Won the lock; fencing the filters before taking writes.
    Fencing,
    /// Holding the lock: writes are forwarded with the token.
    Holding,
    /// Holding in etcd, but a filter has seen a higher token than etcd gave
    /// us, or etcd gave us a token at or below one we held before (etcd
    /// restored from an old snapshot?): writes are refused.
    FencedOut,
    /// Lost the lock with `--rejoin manual`: writes are refused and nothing
    /// campaigns until the app calls `POST /v1/lock/rejoin`.
    AwaitingRejoin,
    /// Shut down; the lease was revoked.
    Stopped,
}

/// What the keeper does after it lost the lock (not after a release or a
/// stop: those the app asked for).
///
/// A fencing token cannot protect against an app that keeps a write of its
/// own across a loss and retries it after this instance won the lock again:
/// the retry then carries the new, valid token. `Manual` makes the app
/// acknowledge the loss (re-read its state, drop queued writes) before this
/// instance can hold again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rejoin {
    /// Campaign again at once.
    #[default]
    Auto,
    /// Wait for [`Keeper::rejoin`] (the app's `POST /v1/lock/rejoin`).
    Manual,
}

/// The lock's state as published to the proxy and the local API.
#[derive(Clone, Debug)]
pub struct LockStatus {
    pub phase: Phase,
    pub token: Option<Token>,
    /// The highest token this sidecar has held (kept after a loss).
    pub last_token: Option<Token>,
    pub lease_id: Option<i64>,
    /// TTL granted by the backend.
    pub ttl: Duration,
    /// Self-fencing deadline; see the module docs.
    pub valid_until: Option<Deadline>,
    /// The highest token a filter reported when it refused our fence (or the
    /// token we held before, when etcd's went backwards).
    pub fenced_out_highest: Option<u64>,
    pub last_error: Option<String>,
}

impl LockStatus {
    /// The token to inject in a write at `now`, if the lock is safely held.
    pub fn write_token(&self, now: Stamp) -> Option<Token> {
        match (self.phase, self.token, self.valid_until) {
            (Phase::Holding, Some(t), Some(until)) if !until.passed(now) => Some(t),
            _ => None,
        }
    }

    /// How much longer the lock is safely held (zero if not held).
    pub fn valid_for(&self, now: Stamp) -> Duration {
        match (self.write_token(now), self.valid_until) {
            (Some(_), Some(u)) => u.remaining(now),
            _ => Duration::ZERO,
        }
    }
}

/// Counters for metrics.
#[derive(Debug, Default)]
pub struct KeeperStats {
    pub acquisitions: AtomicU64,
    pub losses: AtomicU64,
    pub keepalives: AtomicU64,
    pub keepalive_failures: AtomicU64,
    /// Microseconds of the last keep-alive round trip.
    pub last_keepalive_us: AtomicU64,
    pub keepalive_us_total: AtomicU64,
    /// Fences that were not confirmed within the fence timeout.
    pub fence_timeouts: AtomicU64,
}

/// What the keeper is configured with.
#[derive(Clone, Debug)]
pub struct KeeperConfig {
    pub lock: LockName,
    pub holder: String,
    pub ttl: Duration,
    /// Self-fencing margin; must be below the TTL.
    pub margin: Duration,
    pub key_prefix: String,
    /// Longest the initial fencing may take before holding anyway.
    pub fence_timeout: Duration,
    /// Hold only once every filter has confirmed the fence (retrying without
    /// bound), instead of holding after `fence_timeout` and retrying in the
    /// background. Closes the window in which a zombie could still write to a
    /// filter that was unreachable at takeover.
    pub fence_required: bool,
    /// After a voluntary release, how long to wait before campaigning again.
    pub release_pause: Duration,
    /// After a loss: campaign again at once, or wait for the app.
    pub rejoin: Rejoin,
}

/// The default fence timeout: above the filter's default drain timeout plus
/// abort grace (5 s + 1 s), so a takeover with a stuck older write waits for
/// the filter's barrier instead of holding before the fence is confirmed.
pub const DEFAULT_FENCE_TIMEOUT: Duration = Duration::from_secs(8);

impl KeeperConfig {
    pub fn new(lock: LockName, holder: impl Into<String>, ttl: Duration) -> Self {
        KeeperConfig {
            lock,
            holder: holder.into(),
            ttl,
            margin: default_margin(ttl),
            key_prefix: "/fencegate/locks".into(),
            fence_timeout: DEFAULT_FENCE_TIMEOUT,
            fence_required: false,
            release_pause: Duration::from_secs(1),
            rejoin: Rejoin::Auto,
        }
    }
}

/// The default margin: a tenth of the TTL, at least 200 ms.
pub fn default_margin(ttl: Duration) -> Duration {
    (ttl / 10).max(Duration::from_millis(200)).min(ttl / 2)
}

enum Command {
    /// Step down from this round, if its token is the one given (`None`:
    /// whichever round is on).
    Release(Option<Token>),
    Rejoin,
}

impl Command {
    /// Whether this is a release of the round with `token`.
    fn releases(&self, token: Token) -> bool {
        matches!(self, Command::Release(None)) || matches!(self, Command::Release(Some(t)) if *t == token)
    }
}

/// Handle on the keeper task.
#[derive(Debug)]
pub struct Keeper {
    status: watch::Receiver<LockStatus>,
    cmd: mpsc::UnboundedSender<Command>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    pub stats: Arc<KeeperStats>,
}

impl Keeper {
    /// Starts campaigning; on takeover, `fencer` fences the filters.
    pub fn spawn(backend: Arc<dyn LeaseBackend>, fencer: Arc<dyn Fencer>, cfg: KeeperConfig) -> Keeper {
        assert!(cfg.margin < cfg.ttl, "the self-fencing margin must be below the TTL");
        let (tx, rx) = watch::channel(LockStatus {
            phase: Phase::Campaigning,
            token: None,
            last_token: None,
            lease_id: None,
            ttl: cfg.ttl,
            valid_until: None,
            fenced_out_highest: None,
            last_error: None,
        });
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let stats = Arc::new(KeeperStats::default());
        let task = Task {
            backend,
            fencer,
            cfg,
            tx: Arc::new(tx),
            cmd: cmd_rx,
            stop: stop.clone(),
            stats: stats.clone(),
            abandoned: Vec::new(),
        };
        let task = tokio::spawn(task.run());
        Keeper { status: rx, cmd: cmd_tx, stop, task: Some(task), stats }
    }

    /// A receiver of the lock's state.
    pub fn subscribe(&self) -> watch::Receiver<LockStatus> {
        self.status.clone()
    }

    pub fn status(&self) -> LockStatus {
        self.status.borrow().clone()
    }

    /// Steps down: revoke, then campaign again after `release_pause`.
    pub fn release(&self) {
        let _ = self.cmd.send(Command::Release(None));
    }

    /// [`release`](Self::release), only if `token` is still this keeper's:
    /// an app that saw `token` asks to give up that one, not a lock lost
    /// and won again (a new token) before the command is read.
    pub fn release_token(&self, token: Token) {
        let _ = self.cmd.send(Command::Release(Some(token)));
    }

    /// After a loss with [`Rejoin::Manual`]: campaign again. Returns whether
    /// the keeper was awaiting it (otherwise nothing happens).
    pub fn rejoin(&self) -> bool {
        let awaiting = self.status.borrow().phase == Phase::AwaitingRejoin;
        if awaiting {
            let _ = self.cmd.send(Command::Rejoin);
        }
        awaiting
    }

    /// Stops the keeper and revokes its lease, so a waiting candidate takes
    /// over at once.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
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

struct Task {
    backend: Arc<dyn LeaseBackend>,
    fencer: Arc<dyn Fencer>,
    cfg: KeeperConfig,
    tx: Arc<watch::Sender<LockStatus>>,
    cmd: mpsc::UnboundedReceiver<Command>,
    stop: CancellationToken,
    stats: Arc<KeeperStats>,
    /// Leases whose revoke failed (etcd unreachable). Revoked once etcd
    /// answers again, so we do not queue behind our own stale key for a TTL.
    abandoned: Vec<i64>,
}

impl Task {
    async fn run(mut self) {
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

mod alive;
mod fencing;
#[cfg(test)]
mod tests;
