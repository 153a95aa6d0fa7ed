//! Admission, high-water marks and the epoch barrier.
//!
//! For each lock the filter keeps:
//!
//! * `highest`: the highest token it has accepted. Anything lower is refused.
//! * `durable`: the highest token known to be on disk. Nothing with a token
//!   above `durable` is forwarded: the mark is made durable first.
//! * `inflight`: writes already forwarded to the store whose answer has not
//!   come back, grouped by token.
//!
//! The **barrier**: a write with token `t` is forwarded only when no write
//! with a token below `t` is in flight. When a higher token arrives, older
//! writes get `drain_timeout` to finish; then they are aborted (their upstream
//! connections closed) and the barrier holds `abort_grace` longer, since the
//! store may still be applying a write whose connection we just closed.
//!
//! **Start-up barrier**: a filter that was just (re)started cannot know what
//! its previous process had in flight: after `kill -9`, a write whose
//! connection died with the old process may still be applied by the store.
//! So the barrier of every lock with a durable record starts closed: nothing
//! of it is forwarded before `abort_grace` has passed since start-up (writes
//! wait, they are not refused), exactly as after an abort. A lock with no
//! record needs no hold: a record is written before any write of a lock is
//! forwarded, so no earlier process on this state directory sent one.
//!
//! The decisions ([`LockState::admit`] for a write, [`LockState::fence`] for a
//! proactive fence) are pure functions of the state and the clock, tested
//! without sockets; [`LockEntry::admit_write`] and [`LockEntry::fence`] are
//! the async loop around them (persisting, waiting, aborting).
//!
//! **Verified raises**: with a [`Verifier`], a token above `highest` is
//! checked with the lock service *before* the pure decision sees it, so a
//! forged or stale token never touches the state (nothing raised, nothing
//! made durable, nothing forwarded). Concurrent raises of one lock wait for
//! one check and share its outcome (`LockEntry::verify_raise`).
//!
//! **Shared marks** (`--shared-marks`, see [`super::shared`]): "durable"
//! then means "stored in etcd and acknowledged by every live replica", and
//! [`GlobalMarks::raise`] replaces the state file. A raise another replica
//! made is applied with [`LockEntry::observe`]: older tokens are refused at
//! once ([`LockEntry::refuse_below`]) and older writes drained by the same
//! barrier ([`LockState::drain`]), without making anything durable here.
//!
//! Concurrency: each lock has its own short `parking_lot::Mutex` (held only
//! for the decision, never across an await) and its own async mutex that
//! serializes the rare durable writes. There is no lock shared between locks
//! on the request path: the registry is a `DashMap`.
//!
//! Files: `decision` holds the pure decision ([`LockState`]), `entry` the
//! async loop around it for one lock ([`LockEntry`], [`Permit`]), and this
//! file the registry of every lock ([`Locks`]) and what they share.

mod decision;
mod entry;
#[cfg(test)]
mod tests;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use futures_util::future::BoxFuture;
use tokio::time::Instant;

use super::state::{Record, StateDir, StateError};
use super::verify::Verifier;
use crate::token::LockName;

pub use decision::{BarrierConfig, Decision, LockState};
pub use entry::{LockEntry, LockStats, Permit};

/// Where a new highest token is made durable when several filter replicas
/// share their marks (implemented in [`super::shared`]).
pub trait GlobalMarks: Send + Sync + std::fmt::Debug {
    /// Makes `t` the lock's mark for every replica. Returns the mark stored
    /// once it is safe to use: `t` itself when every live replica has
    /// acknowledged it, or a higher mark already stored (then `t` is stale).
    fn raise<'a>(&'a self, lock: &'a LockName, t: u64) -> BoxFuture<'a, Result<u64, StateError>>;
}

/// Why a write was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    #[error("fencing token {token} is older than the highest token {highest} admitted for lock {lock}")]
    Stale { lock: LockName, token: u64, highest: u64 },
    #[error("could not make the new highest token durable: {0}")]
    State(#[from] StateError),
    #[error("older writes for lock {lock} are still draining; retry in {retry_after:?}")]
    BarrierTimeout { lock: LockName, retry_after: Duration },
    #[error("fencing token {token} is above the highest admitted for lock {lock} but is not its current holder's in etcd ({}); refused", holder_text(*holder))]
    Unverified { lock: LockName, token: u64, holder: Option<u64> },
    #[error(
        "fencing token {token} of lock {lock} is no longer the holder's: etcd's holder has the newer token {holder}"
    )]
    Superseded { lock: LockName, token: u64, holder: u64, highest: u64 },
    #[error("could not verify fencing token {token} for lock {lock} with etcd: {reason}")]
    VerifyUnavailable { lock: LockName, token: u64, reason: String },
}

fn holder_text(holder: Option<u64>) -> String {
    match holder {
        Some(h) => format!("the holder's token is {h}"),
        None => "nobody holds it".into(),
    }
}

/// What every lock's entry needs of the registry: the barrier settings and
/// where raises go. One pointer per entry instead of a copy in each (72
/// bytes a lock, on cache lines of their own), and a pointer every write
/// follows to the same place, which stays in cache however many locks there
/// are.
#[derive(Debug)]
pub(super) struct Common {
    pub(super) barrier: BarrierConfig,
    /// `None` in unit tests and with shared marks: nothing on local disk.
    pub(super) dir: Option<Arc<StateDir>>,
    /// Checks raises with the lock service (see [`LockEntry::verify_raise`]).
    pub(super) verifier: Option<Arc<Verifier>>,
    /// Shared marks: raises go through etcd and every replica.
    pub(super) global: Option<Arc<dyn GlobalMarks>>,
}

/// Every lock the filter knows, with its durable store.
#[derive(Debug)]
pub struct Locks {
    /// Hashed with foldhash, not SipHash: a few ns a write instead of about
    /// 20. Resistance to chosen collisions buys nothing here: a write's lock
    /// is one the rules gave its path, and the other keys come from the
    /// state directory and the marks prefix in etcd, which only the operator
    /// and the replicas write. (foldhash's seed differs per process, from
    /// its address space layout; it does not claim to resist a HashDoS.)
    ///
    /// Once built, an entry is never removed or replaced: the rules keep
    /// the entries they were given ([`Locks::entry_of`]), and an entry
    /// dropped from here while a rule kept it would admit writes against a
    /// mark this registry no longer holds. Evicting idle locks would need
    /// the rules' entries dropped too.
    map: DashMap<LockName, Arc<LockEntry>, foldhash::fast::RandomState>,
    common: Arc<Common>,
    /// The start-up barrier: nothing is forwarded before this instant.
    ready_at: Instant,
}

impl Locks {
    /// The registry at start-up: the barrier of every lock with a record is
    /// held for `abort_grace` from now (see the module docs).
    pub fn new(dir: Option<StateDir>, records: impl IntoIterator<Item = Record>, barrier: BarrierConfig) -> Self {
        Self::verified(dir, records, barrier, None)
    }

    /// [`Locks::new`], with raises checked by `verifier` (`None`: trusted).
    pub fn verified(
        dir: Option<StateDir>,
        records: impl IntoIterator<Item = Record>,
        barrier: BarrierConfig,
        verifier: Option<Arc<Verifier>>,
    ) -> Self {
        let now = Instant::now();
        let common = Common { barrier, dir: dir.map(Arc::new), verifier, global: None };
        let mut locks = Locks { map: DashMap::default(), common: Arc::new(common), ready_at: now };
        for r in records {
            let set_at = SystemTime::UNIX_EPOCH + Duration::from_millis(r.set_at_ms);
            locks.ready_at = now + locks.abort_grace();
            let state = LockState::with_durable(r.highest, Some(set_at)).hold_until(locks.ready_at);
            locks.map.insert(r.lock.clone(), locks.new_entry(r.lock, state));
        }
        locks
    }

    /// The registry of a replica sharing its marks: `marks` were read from
    /// etcd at start-up. Each is refused below at once but not durable here:
    /// a raise may still be waiting for other replicas' acknowledgements, so
    /// the first write with the mark's own token goes through
    /// [`GlobalMarks::raise`] (which then returns at once if all acked).
    /// The start-up barrier holds as in [`Locks::new`].
    pub fn shared(
        marks: impl IntoIterator<Item = (LockName, u64)>,
        barrier: BarrierConfig,
        global: Arc<dyn GlobalMarks>,
        verifier: Option<Arc<Verifier>>,
    ) -> Self {
        let now = Instant::now();
        let common = Common { barrier, dir: None, verifier, global: Some(global) };
        let mut locks = Locks { map: DashMap::default(), common: Arc::new(common), ready_at: now };
        for (lock, highest) in marks {
            locks.ready_at = now + locks.abort_grace();
            let state = LockState::refusing_below(highest).hold_until(locks.ready_at);
            locks.map.insert(lock.clone(), locks.new_entry(lock, state));
        }
        locks
    }

    fn new_entry(&self, name: LockName, state: LockState) -> Arc<LockEntry> {
        Arc::new(LockEntry::new(name, state, self.common.clone()))
    }

    /// The verifier, if raises are checked.
    pub fn verifier(&self) -> Option<&Arc<Verifier>> {
        self.common.verifier.as_ref()
    }

    /// How long the store may still apply a write after its connection was
    /// closed (`--abort-grace`).
    pub fn abort_grace(&self) -> std::time::Duration {
        self.common.barrier.abort_grace
    }

    /// When the start-up barrier opens (now, when there were no records).
    pub fn ready_at(&self) -> Instant {
        self.ready_at
    }

    /// The entry for `lock`, created (at highest 0) on first use. The same
    /// one for the life of this registry (see `map`), which
    /// [`Locks::entry_of`]'s shortcut relies on.
    pub fn entry(&self, lock: &LockName) -> Arc<LockEntry> {
        if let Some(e) = self.map.get(lock) {
            return e.clone();
        }
        self.map.entry(lock.clone()).or_insert_with(|| self.new_entry(lock.clone(), LockState::default())).clone()
    }

    /// [`Locks::entry`] for `lock.name()`, through the entry `lock` keeps
    /// once it has looked it up here: what [`Locks::entry`] returns for a
    /// name never changes, so the kept one is the entry a lookup would
    /// find, provided it is this registry's (another registry's, as after a
    /// `NamedLock` moved between filters, is passed over for a lookup).
    pub fn entry_of(&self, lock: &NamedLock) -> Arc<LockEntry> {
        if let Some(e) = lock.entry.get() {
            if e.is_of(&self.common) {
                // Every write of the tests checks the premise.
                debug_assert!(Arc::ptr_eq(e, &self.entry(&lock.name)), "a lock's entry was replaced");
                return e.clone();
            }
        }
        let e = self.entry(&lock.name);
        // A lost race left the same entry (or another registry's) there.
        let _ = lock.entry.set(e.clone());
        e
    }

    /// Aborts every write in flight, of every lock (a replica leaving: see
    /// `filter::serve`). Their permits' `aborted()` resolve; the writes are
    /// released after `abort_grace`, as after any abort.
    pub fn abort_all(&self) {
        for e in self.map.iter() {
            e.value().abort_all();
        }
    }

    /// All entries, sorted by name.
    pub fn all(&self) -> Vec<Arc<LockEntry>> {
        let mut v: Vec<_> = self.map.iter().map(|e| e.value().clone()).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

/// A lock's name as a `--protect` rule (or `--lock`) holds it, with the
/// lock's entry once a write has looked it up ([`Locks::entry_of`]).
///
/// Why: with many locks, a write's rule and its lock's entry are each out of
/// cache, and a second hashed lookup between them, in the registry, cost a
/// write its misses on that table's slots too (the registry's shard lock is
/// one more line every write of every lock writes to). The rule's entry is
/// in the same line as its name; the registry stays the one owner of which
/// entry is a lock's, and this keeps only what it answered.
pub struct NamedLock {
    name: LockName,
    entry: OnceLock<Arc<LockEntry>>,
}

impl NamedLock {
    pub fn new(name: LockName) -> Self {
        NamedLock { name, entry: OnceLock::new() }
    }

    pub fn name(&self) -> &LockName {
        &self.name
    }
}

/// The name only: a copy starts with no entry, so that a configuration
/// cloned for another filter (another registry) never carries this one's.
impl Clone for NamedLock {
    fn clone(&self) -> Self {
        NamedLock::new(self.name.clone())
    }
}

impl std::fmt::Debug for NamedLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.name, f)
    }
}
