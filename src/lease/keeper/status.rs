//! What the keeper publishes: the lock's phase and state on its watch
//! channel ([`LockStatus`]), read by the proxy on every write, and its
//! counters for metrics ([`KeeperStats`]).

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use serde::Serialize;

use crate::lease::deadline::{Deadline, Stamp};
use crate::token::Token;

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
