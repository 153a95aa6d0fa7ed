//! Leases, lock queues and fencing tokens.
//!
//! The lock recipe is etcd's own: every candidate grants a lease and creates
//! the key `<prefix>/<lock>/<lease id>` bound to it (a transaction that only
//! creates). The candidate whose key has the lowest create revision holds the
//! lock; every other candidate watches only the key just ahead of its own, so
//! a release wakes one waiter, not the herd. The **fencing token** is the
//! holder key's create revision: etcd's revision counter only grows, so each
//! new holder's token is higher than every earlier one, across crashes and
//! restarts of any sidecar.
//!
//! [`LeaseBackend`] is that recipe's storage: [`etcd::EtcdBackend`] in
//! production, [`embedded::Embedded`] in-process for the demo and unit tests.
//! [`keeper`] runs the recipe and publishes the lock's state on a
//! `tokio::sync::watch` channel that the proxy reads on every write. On
//! takeover it fences the filters through a [`Fencer`] it is given (the
//! sidecar's speaks HTTP; the keeper does not). [`sequencer`] answers the
//! filter's question "is this token the current holder's?" from the same
//! recipe (the lowest create revision under the lock's queue).

pub mod backoff;
pub mod deadline;
pub mod embedded;
pub mod etcd;
pub mod keeper;
pub mod sequencer;

use std::time::Duration;

use futures_util::future::BoxFuture;

pub use crate::fence::Outcome;
use crate::token::{LockName, Token};

/// A granted lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Granted {
    pub id: i64,
    /// The TTL the server granted (it may round the request up).
    pub ttl: Duration,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum LeaseError {
    /// The backend could not be reached or refused the call; retry.
    #[error("lease backend: {0}")]
    Backend(String),
    /// Our candidate key or lease no longer exists: this campaign is over.
    #[error("our lease or lock key is gone: {0}")]
    Gone(String),
}

/// Storage for the lock recipe. Object-safe so the backend can be chosen at
/// run time; every method is one logical operation that the keeper may retry.
pub trait LeaseBackend: Send + Sync + 'static {
    /// Grants a lease of (at least) `ttl`.
    fn grant(&self, ttl: Duration) -> BoxFuture<'_, Result<Granted, LeaseError>>;
    /// One keep-alive round trip: the lease's TTL on success, `None` if the
    /// lease no longer exists.
    fn keep_alive(&self, lease: i64) -> BoxFuture<'_, Result<Option<Duration>, LeaseError>>;
    /// Revokes the lease, deleting every key bound to it.
    fn revoke(&self, lease: i64) -> BoxFuture<'_, Result<(), LeaseError>>;
    /// Creates `key` bound to `lease` unless it exists; returns its create revision.
    fn enqueue<'a>(&'a self, key: &'a str, value: &'a str, lease: i64) -> BoxFuture<'a, Result<i64, LeaseError>>;
    /// Resolves once no key under `prefix` is older than `rev` (we hold the
    /// lock), or with [`LeaseError::Gone`] if `key` itself disappears.
    fn wait_turn<'a>(&'a self, prefix: &'a str, key: &'a str, rev: i64) -> BoxFuture<'a, Result<(), LeaseError>>;
    /// Resolves when `key` (created at `rev`) has been deleted.
    fn watch_gone<'a>(&'a self, key: &'a str, rev: i64) -> BoxFuture<'a, Result<(), LeaseError>>;
    /// The create revision of `key` now (a linearizable read), `None` if it does not exist.
    fn key_revision<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<i64>, LeaseError>>;
}

/// Raises the filters' marks to a new holder's token before it takes writes.
///
/// Each target is fenced by its own call, so the keeper can bound, retry and
/// report each one; what a target is (a URL, for the sidecar's HTTP fencer)
/// is the implementation's business.
pub trait Fencer: Send + Sync + 'static {
    /// The targets, by name (for logs and retries).
    fn targets(&self) -> &[String];
    /// Fences one target with `token`, waiting at most `timeout` for it.
    fn fence<'a>(
        &'a self,
        target: &'a str,
        lock: &'a LockName,
        token: Token,
        timeout: Duration,
    ) -> BoxFuture<'a, Outcome>;
}

/// A fencer with no targets (no `--fence`).
#[derive(Debug, Default)]
pub struct NoFence;

impl Fencer for NoFence {
    fn targets(&self) -> &[String] {
        &[]
    }
    fn fence<'a>(&'a self, _: &'a str, _: &'a LockName, _: Token, _: Duration) -> BoxFuture<'a, Outcome> {
        Box::pin(async { Outcome::Fenced })
    }
}

/// The key prefix of a lock's queue: `<key_prefix>/<lock>/`.
pub fn queue_prefix(key_prefix: &str, lock: &str) -> String {
    format!("{}/{lock}/", key_prefix.trim_end_matches('/'))
}
