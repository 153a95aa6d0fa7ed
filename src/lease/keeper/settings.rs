//! What the keeper is configured with ([`KeeperConfig`]) and its defaults.

use std::time::Duration;

use serde::Serialize;

use crate::token::LockName;

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
    /// Wait for [`super::Keeper::rejoin`] (the app's `POST /v1/lock/rejoin`).
    Manual,
}
