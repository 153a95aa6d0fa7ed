//! Verification of raises: a token above a lock's highest is admitted only
//! if the lock service says it is the current holder's (see
//! [`crate::lease::sequencer`]).
//!
//! Without it, anyone who can reach the filter could raise a lock's mark to
//! a number no holder will ever reach and refuse every genuine holder from
//! then on, durably. Writes at the current highest never get here: only a
//! raise costs a round trip to the lock service, once per new holder.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use prometheus_client::metrics::histogram::Histogram;

use crate::lease::sequencer::{HolderCheck, Verdict};
use crate::token::{LockName, Token};

/// Why a raise was not verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VerifyFailure {
    /// The lock service says the token is not the current holder's.
    NotHolder { holder: Option<u64> },
    /// The lock service did not answer.
    Unavailable(String),
}

/// The holder check plus what the filter counts about it.
pub struct Verifier {
    check: Arc<dyn HolderCheck>,
    /// Verifications by outcome: holder, not_holder, unavailable.
    pub outcomes: [AtomicU64; 3],
    pub latency: Histogram,
}

/// The `outcome` labels, in the order of [`Verifier::outcomes`].
pub const OUTCOMES: [&str; 3] = ["holder", "not_holder", "unavailable"];

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier").field("check", &self.check).finish_non_exhaustive()
    }
}

impl Verifier {
    pub fn new(check: Arc<dyn HolderCheck>) -> Self {
        Verifier { check, outcomes: Default::default(), latency: crate::metrics::latency_histogram() }
    }

    /// Asks the lock service whether `token` holds `lock` now.
    pub async fn verify(&self, lock: &LockName, token: Token) -> Result<(), VerifyFailure> {
        let started = Instant::now();
        let verdict = self.check.check(lock, token).await;
        self.latency.observe(started.elapsed().as_secs_f64());
        let (i, r) = match verdict {
            Ok(Verdict::Holder) => (0, Ok(())),
            Ok(Verdict::NotHolder { holder }) => (1, Err(VerifyFailure::NotHolder { holder })),
            Err(e) => (2, Err(VerifyFailure::Unavailable(e.0))),
        };
        self.outcomes[i].fetch_add(1, Ordering::Relaxed);
        match &r {
            Ok(()) => tracing::info!(%lock, token = token.get(), "raise verified: the current holder's token"),
            Err(e) => tracing::warn!(%lock, token = token.get(), failure = ?e, "raise not verified"),
        }
        r
    }
}
