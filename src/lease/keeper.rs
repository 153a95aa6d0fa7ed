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
//! Files: this one is the handle; `task` runs the rounds, `alive` keeps the
//! lease, `fencing` fences the filters; `status` is what the task publishes
//! and `settings` what it is configured with.
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

use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

pub use settings::{default_margin, KeeperConfig, Rejoin, DEFAULT_FENCE_TIMEOUT};
pub use status::{KeeperStats, LockStatus, Phase};
use task::{Command, Task};

use super::{Fencer, LeaseBackend};
use crate::token::Token;

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

mod alive;
mod fencing;
mod settings;
mod status;
mod task;
#[cfg(test)]
mod tests;
