//! Sequencer checks: is a token the current holder's?
//!
//! Chubby's CheckSequencer, for fencegate's lock recipe: a fencing token is
//! the create revision of the holder's key, and the holder is the key with
//! the lowest create revision under the lock's queue prefix. So a token is
//! genuine *and current* exactly when a linearizable read of that queue finds
//! its lowest key created at that revision. The filter asks this before it
//! lets a token raise a lock's mark, so a client that never held the lock (or
//! a queued candidate, or a holder that already let go) cannot raise it.
//!
//! [`HolderCheck`] is what the filter is given; [`EtcdSequencer`] answers it
//! from etcd (the filter itself knows nothing of etcd), and tests give the
//! filter a fake.

use std::fmt::Debug;

use etcd_client::{Client, GetOptions, SortOrder, SortTarget};
use futures_util::future::BoxFuture;
use futures_util::FutureExt;

use super::etcd::{EtcdBackend, EtcdOptions};
use super::queue_prefix;
use crate::token::{LockName, Token};

/// What the lock service says about a token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The token is the current holder's.
    Holder,
    /// It is not: `holder` is the current holder's token, if anyone holds it.
    NotHolder { holder: Option<u64> },
}

/// The lock service could not answer (unreachable, no leader, too slow).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

/// Answers "is `token` the current holder of `lock`?" with a linearizable read.
pub trait HolderCheck: Send + Sync + Debug + 'static {
    fn check<'a>(&'a self, lock: &'a LockName, token: Token) -> BoxFuture<'a, Result<Verdict, Unavailable>>;
}

/// [`HolderCheck`] against etcd, with the same connection options as the
/// sidecar's (TLS, auth, `--etcd-timeout` as the deadline of one check).
pub struct EtcdSequencer {
    opts: EtcdOptions,
    key_prefix: String,
    // Connected on first use and kept; a failed connect is retried on the
    // next check, so a filter starts while etcd is down.
    conn: tokio::sync::OnceCell<Client>,
}

impl Debug for EtcdSequencer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdSequencer").field("endpoints", &self.opts.endpoints).finish_non_exhaustive()
    }
}

impl EtcdSequencer {
    pub fn new(opts: EtcdOptions, key_prefix: impl Into<String>) -> Self {
        EtcdSequencer { opts, key_prefix: key_prefix.into(), conn: tokio::sync::OnceCell::new() }
    }

    /// The lowest create revision under the lock's queue, read linearizably
    /// (etcd's default read, through a member that has a leader).
    async fn holder(&self, lock: &LockName) -> Result<Option<i64>, Unavailable> {
        let client = self
            .conn
            .get_or_try_init(|| EtcdBackend::connect(&self.opts))
            .await
            .map_err(|e| Unavailable(e.to_string()))?;
        let opts = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_limit(1)
            .with_keys_only();
        let r = client
            .clone()
            .get(queue_prefix(&self.key_prefix, lock.as_str()), Some(opts))
            .await
            .map_err(|e| Unavailable(format!("etcd: {e}")))?;
        Ok(r.kvs().first().map(|kv| kv.create_revision()))
    }
}

impl HolderCheck for EtcdSequencer {
    fn check<'a>(&'a self, lock: &'a LockName, token: Token) -> BoxFuture<'a, Result<Verdict, Unavailable>> {
        async move {
            // One deadline for the whole check, connecting included.
            let deadline = self.opts.call_timeout;
            let holder = tokio::time::timeout(deadline, self.holder(lock))
                .await
                .map_err(|_| Unavailable(format!("etcd did not answer within {deadline:?}")))??;
            Ok(match holder {
                Some(rev) if u64::try_from(rev).ok() == Some(token.get()) => Verdict::Holder,
                other => Verdict::NotHolder { holder: other.and_then(|r| u64::try_from(r).ok()) },
            })
        }
        .boxed()
    }
}
