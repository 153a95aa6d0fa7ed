//! Shared high-water marks: N filter replicas in front of one store keep
//! every lock's mark in etcd (`fencegate filter --shared-marks`).
//!
//! The discipline is the one of HDFS's JournalNodes: persist the epoch before
//! acknowledging it, fence every replica that could still write, and make
//! every later operation conditional on it.
//!
//! * **Marks live in etcd** (layout in [`keys`]). A mark is raised only by a
//!   compare-and-swap transaction (`stored < t`); etcd's fsync replaces the
//!   local state file. The returned mark is never lower than what is stored.
//! * **Every replica is registered** on a lease of its own and self-fences
//!   like the sidecar ([`replica`]): past the last confirmed keep-alive +
//!   TTL - margin it forwards no write, and cuts off those in flight
//!   ([`cutoff`]; the margin includes `--abort-grace`). So once etcd has
//!   expired a replica's registration, that replica has already stopped
//!   writing, and what it cut off has had its grace.
//! * **A raise is global before it is used** ([`Shared::raise`], behind
//!   [`GlobalMarks`]): after the CAS, the raiser waits until every registered
//!   replica has acknowledged `t` (its ack key holds `t` or more) or its
//!   registration is gone. A replica acknowledges only after it refuses every
//!   older token and its own older in-flight writes have drained ([`watch`]).
//!   A token's write is forwarded, at any replica, only once that replica's
//!   local mark is "durable", which here means exactly that.
//!
//! Why that is enough (guarantees 1-3 across replicas): a write with `t` is
//! forwarded only after each live replica has refused everything below `t`
//! and answered (or aborted, with grace) its older writes. A replica that
//! joins later reads the marks after it registered, so it either sees `t` or
//! is counted among those that must acknowledge it. A replica that lost etcd
//! is counted until its lease expires, and stops writing before that.

pub mod cutoff;
pub mod keys;
pub mod replica;
mod rollback;
pub mod stats;
pub mod watch;

pub use cutoff::CutCheck;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use parking_lot::Mutex;
use serde_json::json;
use tokio::time::Instant;

use super::admission::GlobalMarks;
use super::state::StateError;
use crate::lease::deadline::{Deadline, Stamp};
use crate::lease::etcd::{EtcdBackend, EtcdOptions};
use crate::token::LockName;
use keys::{decode, encode, name_below, Keys};
use stats::{SharedStats, Waiting};

/// How a replica shares its marks.
#[derive(Clone, Debug)]
pub struct SharedConfig {
    pub etcd: EtcdOptions,
    /// This replica's name (unique among the replicas; the pod name).
    pub replica_id: String,
    /// TTL of the replica's registration lease.
    pub ttl: Duration,
    /// Self-fencing margin, below the TTL.
    pub margin: Duration,
    /// Key prefix (see [`keys`]).
    pub prefix: String,
    /// Longest a raise waits for every replica's acknowledgement.
    pub raise_timeout: Duration,
    /// TESTS ONLY (`--unsafe-no-replica-cut-off`): leave writes in flight
    /// running when the replica self-fences, to show what cutting them off
    /// prevents.
    pub unsafe_no_cut_off: bool,
    /// TESTS ONLY (`--unsafe-no-rollback-check`): go on when etcd lost
    /// marks this replica saw, to show what failing closed prevents.
    pub unsafe_no_rollback_check: bool,
}

/// One replica's membership in the shared marks.
pub struct Shared {
    cfg: SharedConfig,
    keys: Keys,
    client: Client,
    /// Lease calls (grant, keep-alive) as the sidecar makes them.
    lease_backend: EtcdBackend,
    lease: i64,
    /// Self-fencing deadline; `None` once the lease is known lost (for good:
    /// this process never writes again, a restart registers afresh).
    valid_until: Mutex<Option<Deadline>>,
    /// The marks watch is established (cleared while it is re-established).
    watching: AtomicBool,
    /// Moved on when the replica self-fences: its writes in flight stop.
    cut: cutoff::CutSignal,
    /// What this replica has seen in etcd, to notice etcd losing it.
    seen: rollback::Seen,
    pub stats: SharedStats,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("replica", &self.cfg.replica_id).field("lease", &self.lease).finish()
    }
}

fn err(e: impl std::fmt::Display) -> StateError {
    StateError::Shared(e.to_string())
}

impl Shared {
    pub fn id(&self) -> &str {
        &self.cfg.replica_id
    }

    /// True while this replica may forward writes: its registration is
    /// confirmed within TTL - margin and its marks watch is up.
    pub fn writable(&self) -> bool {
        let live = self.valid_until.lock().is_some_and(|d| !d.passed(Stamp::now()));
        live && self.watching.load(Ordering::Acquire)
    }

    /// Why [`Shared::writable`] is false, for the 503.
    pub fn unavailable(&self) -> StateError {
        match *self.valid_until.lock() {
            None => err("this replica's etcd registration is gone; it forwards no write until restarted"),
            Some(d) if d.passed(Stamp::now()) => {
                err("this replica could not confirm its etcd registration in time (self-fenced)")
            }
            _ => err("this replica is re-establishing its watch on the marks"),
        }
    }

    async fn timed<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StateError> {
        tokio::time::timeout(self.cfg.etcd.call_timeout, f).await.map_err(|_| err("etcd call timed out"))?.map_err(err)
    }

    /// Raises `key` to `t` unless it already holds `t` or more; returns the
    /// value stored afterwards (`>= t`). A CAS: never lowers a value.
    async fn cas_up(&self, key: &str, t: u64, lease: Option<i64>) -> Result<u64, StateError> {
        let put = |k: &str| TxnOp::put(k, encode(t), lease.map(|l| PutOptions::new().with_lease(l)));
        loop {
            let mut c = self.client.clone();
            // A value compare on a missing key fails, so absent keys take the
            // second transaction (create-only).
            let txn = Txn::new()
                .when([Compare::value(key, CompareOp::Less, encode(t))])
                .and_then([put(key)])
                .or_else([TxnOp::get(key, None)]);
            let r = self.timed(c.txn(txn)).await?;
            if r.succeeded() {
                return Ok(t);
            }
            let stored = r.op_responses().into_iter().find_map(|op| match op {
                TxnOpResponse::Get(g) => Some(g.kvs().first().map(|kv| kv.value().to_vec())),
                _ => None,
            });
            match stored.flatten() {
                Some(v) => {
                    // Fail closed on a value we did not write: never guess a mark.
                    return decode(&v).ok_or_else(|| err(format!("{key} holds a value that is not a token")));
                }
                None => {
                    let txn =
                        Txn::new().when([Compare::create_revision(key, CompareOp::Equal, 0)]).and_then([put(key)]);
                    if self.timed(c.txn(txn)).await?.succeeded() {
                        return Ok(t);
                    }
                }
            }
        }
    }

    /// Every mark, read at one revision, with that revision and whether
    /// this replica's registration was there (one transaction).
    async fn read_marks(&self) -> Result<rollback::MarksRead, StateError> {
        let mut c = self.client.clone();
        let own = self.keys.replica(self.id());
        let txn = Txn::new().and_then([
            TxnOp::get(self.keys.marks(), Some(GetOptions::new().with_prefix())),
            TxnOp::get(own.as_str(), Some(GetOptions::new().with_keys_only())),
        ]);
        let r = self.timed(c.txn(txn)).await?;
        let revision = r.header().map(|h| h.revision()).ok_or_else(|| err("txn answer without a header"))?;
        let mut gets = r.op_responses().into_iter().filter_map(|op| match op {
            TxnOpResponse::Get(g) => Some(g),
            _ => None,
        });
        let (Some(got), Some(registration)) = (gets.next(), gets.next()) else {
            return Err(err("txn answer without its reads"));
        };
        let mut marks = Vec::new();
        for kv in got.kvs() {
            let lock = self.keys.lock_of(kv.key()).ok_or_else(|| err(format!("bad mark key {:?}", kv.key_str())))?;
            let t = decode(kv.value()).ok_or_else(|| err(format!("mark of {lock} is not a token")))?;
            marks.push((lock, t));
        }
        Ok(rollback::MarksRead { marks, revision, registered: !registration.kvs().is_empty() })
    }

    /// The registered replicas' ids and the acknowledgements under
    /// `acks_prefix`, read at one revision (one transaction): what makes a
    /// raise's "everyone acknowledged or gone" a consistent decision.
    async fn replicas_and_acks(
        &self,
        acks_prefix: &str,
        opts: GetOptions,
    ) -> Result<(Vec<String>, etcd_client::GetResponse), StateError> {
        let mut c = self.client.clone();
        let rp = self.keys.replicas();
        let txn = Txn::new().and_then([
            TxnOp::get(rp.as_str(), Some(GetOptions::new().with_prefix().with_keys_only())),
            TxnOp::get(acks_prefix, Some(opts)),
        ]);
        let r = self.timed(c.txn(txn)).await?;
        let mut gets = r.op_responses().into_iter().filter_map(|op| match op {
            TxnOpResponse::Get(g) => Some(g),
            _ => None,
        });
        let (Some(replicas), Some(acks)) = (gets.next(), gets.next()) else {
            return Err(err("txn answer without its reads"));
        };
        let ids = replicas.kvs().iter().filter_map(|kv| name_below(&rp, kv.key())).map(str::to_owned).collect();
        Ok((ids, acks))
    }

    /// Registered replicas and their acknowledgement of `lock`, read at one
    /// revision (one transaction).
    async fn acks(&self, lock: &LockName) -> Result<BTreeMap<String, u64>, StateError> {
        let ap = self.keys.acks(lock);
        let (replicas, acks) = self.replicas_and_acks(&ap, GetOptions::new().with_prefix()).await?;
        let mut out: BTreeMap<String, u64> = replicas.into_iter().map(|id| (id, 0)).collect();
        for kv in acks.kvs() {
            if let (Some(id), Some(t)) = (name_below(&ap, kv.key()), decode(kv.value())) {
                if let Some(a) = out.get_mut(id) {
                    *a = t;
                }
            }
        }
        Ok(out)
    }

    /// [`GlobalMarks::raise`]: CAS the mark, then wait for every registered
    /// replica's acknowledgement (or its registration's expiry).
    async fn raise_to(&self, lock: &LockName, t: u64) -> Result<u64, StateError> {
        if !self.writable() {
            return Err(self.unavailable());
        }
        let started = Instant::now();
        let stored = self.cas_up(&self.keys.mark(lock), t, None).await?;
        self.seen.mark(lock, stored);
        if stored > t {
            return Ok(stored);
        }
        let deadline = started + self.cfg.raise_timeout;
        let mut waiting = Waiting::new(&self.stats);
        // Polled every millisecond at first (acknowledgements follow within
        // a few: each replica's watch sees the mark, drains, CASes its ack),
        // then backing off to every 20 ms (a replica is draining or dead).
        // A raise happens once per new holder, so the reads cost etcd
        // little. Each poll reads the replica set and the acknowledgements
        // at one revision, which is what makes it safe.
        let mut polls = 0u32;
        loop {
            let acks = self.acks(lock).await?;
            let missing: Vec<String> = acks.iter().filter(|(_, a)| **a < t).map(|(id, _)| id.clone()).collect();
            if missing.is_empty() {
                if waiting.ended_by_expiry(&acks) {
                    self.stats.raises_expired.fetch_add(1, Ordering::Relaxed);
                }
                let took = started.elapsed();
                self.stats.raise_latency.observe(took);
                return Ok(t);
            }
            waiting.set_missing(&missing);
            // The raise is no good to a replica that stopped being safe meanwhile.
            if !self.writable() {
                return Err(self.unavailable());
            }
            if Instant::now() >= deadline {
                self.stats.raise_timeouts.fetch_add(1, Ordering::Relaxed);
                return Err(err(format!(
                    "raise of {lock} to {t}: replicas {missing:?} have not acknowledged it (nor has their registration expired) within {:?}",
                    self.cfg.raise_timeout
                )));
            }
            polls += 1;
            let pause = Duration::from_millis(1) * 2u32.pow(polls.saturating_sub(16).min(5));
            tokio::time::sleep(pause.min(Duration::from_millis(20))).await;
        }
    }

    /// Reads the replica set and every acknowledgement at one revision into
    /// [`SharedStats::view`], for a scrape. Acknowledgements are left out
    /// above `max_acks` keys (one per lock and replica), so a scrape stays
    /// small with many locks.
    pub async fn refresh_view(&self, max_acks: usize) -> Result<(), StateError> {
        let limit = i64::try_from(max_acks).unwrap_or(i64::MAX);
        let opts = GetOptions::new().with_prefix().with_limit(limit);
        let (replicas, acks) = self.replicas_and_acks(&self.keys.all_acks(), opts).await?;
        let mut view = stats::View { read: true, replicas, acks: BTreeMap::new() };
        if !acks.more() {
            for kv in acks.kvs() {
                if let (Some((lock, id)), Some(t)) = (self.keys.ack_of(kv.key()), decode(kv.value())) {
                    view.acks.entry(lock.to_string()).or_default().insert(id.to_owned(), t);
                }
            }
        }
        *self.stats.view.lock() = view;
        Ok(())
    }

    /// What `/v1/locks` shows of the replica set: every replica and its
    /// acknowledged token per lock (read from etcd now).
    pub async fn describe(&self, locks: &[LockName]) -> serde_json::Value {
        let mut per_lock = serde_json::Map::new();
        let mut replicas: Option<Vec<String>> = None;
        for l in locks {
            match self.acks(l).await {
                Ok(a) => {
                    replicas.get_or_insert_with(|| a.keys().cloned().collect());
                    per_lock.insert(l.to_string(), json!(a));
                }
                Err(e) => {
                    per_lock.insert(l.to_string(), json!({ "error": e.to_string() }));
                }
            }
        }
        let s = &self.stats;
        json!({
            "replica_id": self.cfg.replica_id,
            "lease": self.lease,
            "writable": self.writable(),
            "replicas": replicas,
            "acks": per_lock,
            "raises": s.raise_latency.count(),
            "raise_seconds_total": s.raise_latency.sum_seconds(),
            "raises_waiting": s.raises_waiting.load(Ordering::Relaxed),
            "raises_expired": s.raises_expired.load(Ordering::Relaxed),
            "raise_timeouts": s.raise_timeouts.load(Ordering::Relaxed),
            "waiting_on": s.waiting_on(),
        })
    }
}

impl GlobalMarks for Shared {
    fn raise<'a>(&'a self, lock: &'a LockName, t: u64) -> BoxFuture<'a, Result<u64, StateError>> {
        self.raise_to(lock, t).boxed()
    }
}

/// Starts this replica's membership: connects, registers (see
/// [`replica`]), reads every mark at one revision. The caller builds its
/// locks from the marks, then calls [`watch::start`] with the revision.
pub async fn join(cfg: SharedConfig) -> Result<(Arc<Shared>, Vec<(LockName, u64)>, i64), StateError> {
    let client = EtcdBackend::connect(&cfg.etcd).await.map_err(err)?;
    let lease_backend = EtcdBackend::new(cfg.etcd.clone());
    let keys = Keys::new(&cfg.prefix);
    let (lease, valid_until) = replica::grant(&lease_backend, &cfg).await?;
    let shared = Arc::new(Shared {
        cfg,
        keys,
        client,
        lease_backend,
        lease,
        valid_until: Mutex::new(Some(valid_until)),
        watching: AtomicBool::new(false),
        cut: cutoff::CutSignal::default(),
        seen: rollback::Seen::default(),
        stats: SharedStats::default(),
    });
    // Keep-alives run from the grant on: registering may wait out a
    // previous process's registration under the same id.
    tokio::spawn(replica::keep_alive(shared.clone()));
    tokio::spawn(cutoff::watch_deadline(shared.clone()));
    shared.register().await?;
    // Read after registering: any raise whose CAS came later waits for our
    // acknowledgement; any earlier one is in what we read.
    let before = shared.seen.before();
    let read = shared.read_marks().await?;
    if let Some(why) = rollback::lost(&shared.seen, &before, &read) {
        return Err(err(format!("just after registering: {why}")));
    }
    Ok((shared, read.marks, read.revision))
}
