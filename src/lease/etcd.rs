//! The etcd lease backend (production).
//!
//! Unary calls carry their own deadline (`call_timeout`) so a partition turns
//! into an error the keeper can act on, never a hang; creating a watch is
//! bounded the same way, and a watch is re-checked with a fresh read every
//! `recheck` so a watch parked on a member that lost its quorum cannot hide a
//! deletion for long. Watches require a leader (etcd cancels them on a member
//! that has none instead of letting them go silent).
//!
//! Keep-alives open a fresh stream per call: a keep-alive whose answer was
//! not read (it timed out, or its future was cancelled) must not leave that
//! answer behind for the next call to read and time from its own, later send
//! (which would move the self-fencing deadline later than etcd's expiry).
//!
//! HTTP/2 pings go every 10 s and only while a stream is open: etcd's default
//! `--grpc-keepalive-min-time` is 5 s, and pings more often than that (or on
//! an idle connection) get the connection closed with GOAWAY `too_many_pings`,
//! which drops every watch and keep-alive on it. The client reconnects by
//! itself (tonic balances over every endpoint given).

use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity, PutOptions, SortOrder,
    SortTarget, TlsOptions, Txn, TxnOp, WatchOptions, WatchStream,
};
use futures_util::future::BoxFuture;
use futures_util::FutureExt;

use super::{Granted, LeaseBackend, LeaseError};

/// How to reach etcd.
#[derive(Clone, Debug, Default)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    /// CA bundle to verify etcd's server certificate (PEM).
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Deadline of one unary call.
    pub call_timeout: Duration,
}

pub struct EtcdBackend {
    opts: EtcdOptions,
    // Connected on first use, so a sidecar starts (and reports not ready)
    // while etcd is still down; the keeper's backoff drives the retries.
    conn: tokio::sync::OnceCell<Client>,
    call_timeout: Duration,
}

/// The HTTP/2 ping interval: above etcd's default `--grpc-keepalive-min-time` (5 s).
pub const PING_INTERVAL: Duration = Duration::from_secs(10);

impl std::fmt::Debug for EtcdBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdBackend").finish_non_exhaustive()
    }
}

fn be(e: impl std::fmt::Display) -> LeaseError {
    LeaseError::Backend(e.to_string())
}

impl EtcdBackend {
    /// A backend that connects on first use.
    pub fn new(opts: EtcdOptions) -> EtcdBackend {
        let call_timeout = opts.call_timeout;
        EtcdBackend { opts, conn: tokio::sync::OnceCell::new(), call_timeout }
    }

    async fn client(&self) -> Result<Client, LeaseError> {
        self.conn.get_or_try_init(|| Self::connect(&self.opts)).await.cloned()
    }

    /// One connection attempt.
    pub(crate) async fn connect(o: &EtcdOptions) -> Result<Client, LeaseError> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(o.call_timeout)
            .with_keep_alive(PING_INTERVAL, o.call_timeout.max(Duration::from_secs(1)))
            .with_keep_alive_while_idle(false)
            .with_require_leader(true);
        if let (Some(u), Some(p)) = (&o.user, &o.password) {
            opts = opts.with_user(u, p);
        }
        if o.ca_file.is_some() || o.cert_file.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &o.ca_file {
                let pem = std::fs::read(ca).map_err(|e| be(format!("reading {}: {e}", ca.display())))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            if let (Some(c), Some(k)) = (&o.cert_file, &o.key_file) {
                let cert = std::fs::read(c).map_err(|e| be(format!("reading {}: {e}", c.display())))?;
                let key = std::fs::read(k).map_err(|e| be(format!("reading {}: {e}", k.display())))?;
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            opts = opts.with_tls(tls);
        }
        let client = tokio::time::timeout(o.call_timeout * 2, Client::connect(&o.endpoints, Some(opts)))
            .await
            .map_err(|_| be("timed out connecting to etcd"))?
            .map_err(be)?;
        Ok(client)
    }

    async fn timed<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, LeaseError> {
        tokio::time::timeout(self.call_timeout, f).await.map_err(|_| be("etcd call timed out"))?.map_err(be)
    }

    /// `key`'s create revision (or `None`) and the revision the answer was read at.
    async fn key_at(&self, key: &str) -> Result<(Option<i64>, i64), LeaseError> {
        let mut c = self.client().await?;
        let r = self.timed(c.get(key, None)).await?;
        let at = r.header().map(|h| h.revision()).ok_or_else(|| be("get answer without a header"))?;
        Ok((r.kvs().first().map(|kv| kv.create_revision()), at))
    }

    /// Opens a watch on `key` from revision `from`, bounded like a unary call.
    async fn watch_from(&self, key: impl Into<Vec<u8>>, from: i64) -> Result<WatchStream, LeaseError> {
        let mut c = self.client().await?;
        self.timed(c.watch(key, Some(WatchOptions::new().with_start_revision(from)))).await
    }

    /// How long one watch is trusted before the state is read afresh.
    fn recheck(&self) -> Duration {
        (self.call_timeout * 5).max(Duration::from_secs(5))
    }

    /// Waits for a delete event on an open watch; `Ok(true)` if one came,
    /// `Ok(false)` if the watch was cancelled or `recheck` passed (read again).
    async fn delete_seen(&self, w: &mut WatchStream) -> Result<bool, LeaseError> {
        let wait = async {
            loop {
                match w.message().await.map_err(be)? {
                    Some(m) if m.events().iter().any(|e| e.event_type() == EventType::Delete) => return Ok(true),
                    // Cancelled (compacted, no leader): read again and re-watch from then.
                    Some(m) if m.canceled() => return Ok(false),
                    Some(_) => continue,
                    None => return Err(be("watch stream closed")),
                }
            }
        };
        tokio::time::timeout(self.recheck(), wait).await.unwrap_or(Ok(false))
    }
}

impl LeaseBackend for EtcdBackend {
    fn grant(&self, ttl: Duration) -> BoxFuture<'_, Result<Granted, LeaseError>> {
        async move {
            let mut c = self.client().await?;
            let secs = ttl.as_secs().max(1) as i64;
            let r = self.timed(c.lease_grant(secs, None)).await?;
            Ok(Granted { id: r.id(), ttl: Duration::from_secs(r.ttl().max(0) as u64) })
        }
        .boxed()
    }

    fn keep_alive(&self, lease: i64) -> BoxFuture<'_, Result<Option<Duration>, LeaseError>> {
        async move {
            // A fresh stream per call (see the module docs). etcd-client's
            // `lease_keep_alive` sends one keep-alive and reads its answer
            // itself (an error if the lease is gone) but does not return the
            // TTL; the second round trip on the same stream does. Both were
            // sent after the caller's `sent` instant, which is what counts.
            let mut c = self.client().await?;
            let result = async {
                let (mut keeper, mut stream) = self.timed(c.lease_keep_alive(lease)).await?;
                self.timed(keeper.keep_alive()).await?;
                match self.timed(stream.message()).await? {
                    Some(r) if r.ttl() > 0 => Ok(Some(Duration::from_secs(r.ttl() as u64))),
                    Some(_) => Ok(None),
                    None => Err(be("keep-alive stream closed")),
                }
            }
            .await;
            match result {
                // etcd-client reports a missing lease as an error, not TTL 0.
                Err(LeaseError::Backend(m)) if m.contains("lease not found") => Ok(None),
                r => r,
            }
        }
        .boxed()
    }

    fn revoke(&self, lease: i64) -> BoxFuture<'_, Result<(), LeaseError>> {
        async move {
            let mut c = self.client().await?;
            match self.timed(c.lease_revoke(lease)).await {
                Ok(_) => Ok(()),
                // Already expired: revoking is done.
                Err(LeaseError::Backend(m)) if m.contains("not found") => Ok(()),
                Err(e) => Err(e),
            }
        }
        .boxed()
    }

    fn enqueue<'a>(&'a self, key: &'a str, value: &'a str, lease: i64) -> BoxFuture<'a, Result<i64, LeaseError>> {
        async move {
            let mut c = self.client().await?;
            let txn = Txn::new()
                .when([Compare::create_revision(key, CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key, value, Some(PutOptions::new().with_lease(lease)))])
                .or_else([TxnOp::get(key, None)]);
            let r = match self.timed(c.txn(txn)).await {
                Ok(r) => r,
                Err(LeaseError::Backend(m)) if m.contains("lease not found") => return Err(LeaseError::Gone(m)),
                Err(e) => return Err(e),
            };
            if r.succeeded() {
                // The put happened in this transaction's revision.
                return r.header().map(|h| h.revision()).ok_or_else(|| be("txn answer without a header"));
            }
            self.key_at(key).await?.0.ok_or_else(|| LeaseError::Gone(format!("{key} vanished")))
        }
        .boxed()
    }

    fn wait_turn<'a>(&'a self, prefix: &'a str, key: &'a str, rev: i64) -> BoxFuture<'a, Result<(), LeaseError>> {
        async move {
            loop {
                let mut c = self.client().await?;
                // The youngest key older than ours: the one just ahead.
                let opts = GetOptions::new()
                    .with_prefix()
                    .with_max_create_revision(rev - 1)
                    .with_sort(SortTarget::Create, SortOrder::Descend)
                    .with_limit(1);
                let r = self.timed(c.get(prefix, Some(opts))).await?;
                let Some(ahead) = r.kvs().first() else {
                    // Nobody ahead; make sure we are still queued.
                    return match self.key_at(key).await?.0 {
                        Some(r0) if r0 == rev => Ok(()),
                        _ => Err(LeaseError::Gone(format!("{key} was deleted"))),
                    };
                };
                let ahead_key = ahead.key().to_vec();
                let from = r.header().map(|h| h.revision() + 1).ok_or_else(|| be("get answer without a header"))?;
                tracing::debug!(ahead = %String::from_utf8_lossy(&ahead_key), "waiting for the key ahead");
                let mut w = self.watch_from(ahead_key, from).await?;
                // Deleted, cancelled or re-check time: read the queue again.
                self.delete_seen(&mut w).await?;
            }
        }
        .boxed()
    }

    fn watch_gone<'a>(&'a self, key: &'a str, rev: i64) -> BoxFuture<'a, Result<(), LeaseError>> {
        // etcd's own `waitDeletes`: read, then watch from the revision of
        // that read + 1. Never from the key's create revision + 1, which a
        // compaction may have removed (the watch would be cancelled at once,
        // every time).
        async move {
            loop {
                let (now, at) = self.key_at(key).await?;
                if now != Some(rev) {
                    return Ok(());
                }
                let mut w = self.watch_from(key, at + 1).await?;
                if self.delete_seen(&mut w).await? {
                    return Ok(());
                }
            }
        }
        .boxed()
    }

    fn key_revision<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<i64>, LeaseError>> {
        async move { Ok(self.key_at(key).await?.0) }.boxed()
    }
}
