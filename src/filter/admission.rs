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
//! one check and share its outcome ([`LockEntry::verify_raise`]).
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

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use smallvec::SmallVec;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::state::{Record, StateDir, StateError};
use super::verify::{Verifier, VerifyFailure};
use crate::token::{LockName, Token};

/// Barrier settings.
#[derive(Clone, Debug)]
pub struct BarrierConfig {
    /// How long older in-flight writes get to finish before they are aborted.
    pub drain_timeout: Duration,
    /// How long the barrier holds after aborting older writes.
    pub abort_grace: Duration,
    /// Test-only: forward without waiting for older writes. Never in production.
    pub disabled: bool,
}

impl Default for BarrierConfig {
    fn default() -> Self {
        BarrierConfig { drain_timeout: Duration::from_secs(5), abort_grace: Duration::from_secs(1), disabled: false }
    }
}

/// Where a new highest token is made durable when several filter replicas
/// share their marks (implemented in [`super::shared`]).
pub trait GlobalMarks: Send + Sync + std::fmt::Debug {
    /// Makes `t` the lock's mark for every replica. Returns the mark stored
    /// once it is safe to use: `t` itself when every live replica has
    /// acknowledged it, or a higher mark already stored (then `t` is stale).
    fn raise<'a>(&'a self, lock: &'a LockName, t: u64) -> BoxFuture<'a, Result<u64, StateError>>;
}

/// The barrier's abort signal for one lock: every in-flight write with a
/// token below `below` must stop. One per lock, inside its entry (permits
/// reach it through the entry they hold), rather than one cancellation
/// token per group of in-flight writes: a write on an idle lock then
/// allocates nothing and touches no extra cache line (with many locks,
/// nearly every write finds its lock idle and cold). Sound because an abort
/// below `t` comes with `highest >= t`, so no write below `t` is admitted
/// after it.
#[derive(Debug, Default)]
struct Abort {
    below: AtomicU64,
    notify: Notify,
}

impl Abort {
    fn abort_below(&self, t: u64) {
        self.below.fetch_max(t, Ordering::AcqRel);
        self.notify.notify_waiters();
    }

    fn is_aborted(&self, t: u64) -> bool {
        self.below.load(Ordering::Acquire) > t
    }

    /// Resolves once writes of token `t` are aborted.
    async fn aborted(&self, t: u64) {
        loop {
            // Registered before the check, so an abort in between is not missed.
            let n = self.notify.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if self.is_aborted(t) {
                return;
            }
            n.await;
        }
    }
}

/// What [`LockState::admit`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Forward now; the write was counted in flight.
    Forward,
    /// Refuse: a higher token has been accepted.
    Stale { highest: u64 },
    /// Make `highest` durable first, then decide again.
    Persist,
    /// Older writes are in flight (or were just aborted): wait until `until`
    /// or until something changes, then decide again.
    Wait { until: Instant },
}

/// One lock's in-memory state. See the module docs.
#[derive(Debug, Default)]
pub struct LockState {
    pub highest: u64,
    pub durable: u64,
    pub set_at: Option<SystemTime>,
    /// In-flight writes per token, sorted by token: rarely more than two
    /// tokens at once, so they live inline (no allocation, no pointer to
    /// chase on a cold lock; a `BTreeMap` allocated a node per idle lock's write).
    inflight: SmallVec<[(u64, usize); 2]>,
    /// Writes below this token were aborted by the barrier; published to
    /// the entry's [`Abort`] signal by [`LockEntry::decide`].
    aborted_below: u64,
    /// Admissions now in their wait loop (see [`LockEntry::release`]).
    waiters: usize,
    /// When the current barrier began: the first time `highest` rose above a
    /// token still in flight.
    barrier_since: Option<Instant>,
    /// After an abort, nothing newer goes before this instant.
    hold_until: Option<Instant>,
}

impl LockState {
    pub fn with_durable(highest: u64, set_at: Option<SystemTime>) -> Self {
        LockState { highest, durable: highest, set_at, ..Default::default() }
    }

    /// Holds the barrier closed until `until` (the start-up barrier).
    pub fn hold_until(mut self, until: Instant) -> Self {
        self.hold_until = Some(until);
        self
    }

    fn older_in_flight(&self, t: u64) -> bool {
        self.inflight.first().is_some_and(|(f, _)| *f < t)
    }

    /// The decision for a write with token `t` at time `now`; on `Forward`
    /// the write is counted in flight.
    pub fn admit(&mut self, t: u64, now: Instant, cfg: &BarrierConfig) -> Decision {
        self.decide(t, now, cfg, true, true)
    }

    /// The decision for a proactive fence with token `t`: the same as a
    /// write's, but nothing is counted in flight (a fence sends nothing to
    /// the store), so it can never hold a newer write at the barrier.
    pub fn fence(&mut self, t: u64, now: Instant, cfg: &BarrierConfig) -> Decision {
        self.decide(t, now, cfg, false, true)
    }

    /// The decision for a raise another replica made durable (shared marks):
    /// a fence that never persists. It raises `highest` and waits for older
    /// writes exactly like a fence; making `t` durable is not this replica's
    /// job (and waiting for it here would wait for this replica's own
    /// acknowledgement).
    pub fn drain(&mut self, t: u64, now: Instant, cfg: &BarrierConfig) -> Decision {
        self.decide(t, now, cfg, false, false)
    }

    /// Raises `highest` to `t` (if below): from now on older tokens are refused.
    fn refuse_below(&mut self, t: u64, now: Instant) {
        if t > self.highest {
            self.highest = t;
            if self.older_in_flight(t) && self.barrier_since.is_none() {
                self.barrier_since = Some(now);
            }
        }
    }

    fn decide(&mut self, t: u64, now: Instant, cfg: &BarrierConfig, count: bool, persist: bool) -> Decision {
        if t < self.highest {
            return Decision::Stale { highest: self.highest };
        }
        // From this moment every older token is refused, even before the new
        // mark is durable: refusing early is always safe.
        self.refuse_below(t, now);
        if persist && self.durable < t {
            return Decision::Persist;
        }
        if !cfg.disabled {
            if self.older_in_flight(t) {
                let since = *self.barrier_since.get_or_insert(now);
                let abort_at = since + cfg.drain_timeout;
                if now < abort_at {
                    return Decision::Wait { until: abort_at };
                }
                // Drain timeout passed: abort every older write still in flight.
                self.aborted_below = self.aborted_below.max(t);
                let hold = now + cfg.abort_grace;
                self.hold_until = Some(self.hold_until.map_or(hold, |h| h.max(hold)));
                return Decision::Wait { until: hold };
            }
            if let Some(h) = self.hold_until {
                if now < h {
                    return Decision::Wait { until: h };
                }
                self.hold_until = None;
            }
        }
        if count {
            match self.inflight.binary_search_by_key(&t, |(f, _)| *f) {
                Ok(i) => self.inflight[i].1 += 1,
                Err(i) => self.inflight.insert(i, (t, 1)),
            }
        }
        Decision::Forward
    }

    /// True once the barrier aborted writes of token `t`.
    pub fn is_aborted(&self, t: u64) -> bool {
        self.aborted_below > t
    }

    /// One write of token `t` is done (answered, or given up on).
    fn release(&mut self, t: u64) {
        if let Ok(i) = self.inflight.binary_search_by_key(&t, |(f, _)| *f) {
            self.inflight[i].1 -= 1;
            if self.inflight[i].1 == 0 {
                self.inflight.remove(i);
            }
        }
        if !self.older_in_flight(self.highest) {
            self.barrier_since = None;
        }
    }

    /// In-flight writes by token, for `/v1/locks`.
    pub fn inflight(&self) -> BTreeMap<u64, usize> {
        self.inflight.iter().copied().collect()
    }
}

/// Counters for one lock, read at scrape time.
#[derive(Debug, Default)]
pub struct LockStats {
    pub admitted: AtomicU64,
    pub refused_stale: AtomicU64,
    pub refused_mismatch: AtomicU64,
    pub refused_unavailable: AtomicU64,
    /// Raises refused because etcd says the token is not the holder's.
    pub refused_unverified: AtomicU64,
    pub aborted: AtomicU64,
    pub barrier_waits: AtomicU64,
    /// Total microseconds writes spent waiting at the barrier.
    pub barrier_wait_us: AtomicU64,
}

/// One lock: its state, its wake-ups, its durable-write serializer, and what
/// its barrier needs (the barrier settings, the state directory).
#[derive(Debug)]
pub struct LockEntry {
    pub name: LockName,
    state: Mutex<LockState>,
    /// The barrier's abort signal, reachable without the state's mutex.
    abort: Abort,
    changed: Notify,
    persist: tokio::sync::Mutex<()>,
    barrier: BarrierConfig,
    /// `None` in unit tests and with shared marks: nothing on local disk.
    dir: Option<Arc<StateDir>>,
    /// Checks raises with the lock service; `None`: tokens trusted as sent.
    verifier: Option<Arc<Verifier>>,
    /// Serializes this lock's verifications and keeps the last one, so the
    /// raises that queued behind it share its outcome.
    last_check: tokio::sync::Mutex<Option<Checked>>,
    /// Shared marks: raises go through etcd and every replica.
    global: Option<Arc<dyn GlobalMarks>>,
    pub stats: LockStats,
}

/// One finished verification: which token, when it finished, what it said.
#[derive(Debug)]
struct Checked {
    token: u64,
    at: Instant,
    outcome: Result<(), VerifyFailure>,
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

/// A forwarded write: counted in flight until released.
///
/// `complete()` releases at once (the store answered). A permit dropped
/// without `complete()` (client gone, upstream timeout, abort) is released
/// only after `abort_grace`, because the store may still apply that write.
#[derive(Debug)]
pub struct Permit {
    entry: Arc<LockEntry>,
    token: u64,
    grace: Duration,
    done: bool,
}

impl Permit {
    /// Resolves when a newer token's barrier aborts this write.
    pub async fn aborted(&self) {
        self.entry.abort.aborted(self.token).await
    }

    pub fn token(&self) -> u64 {
        self.token
    }

    /// The store has answered this write.
    pub fn complete(mut self) {
        self.done = true;
        self.entry.release(self.token);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let (entry, token, grace) = (self.entry.clone(), self.token, self.grace);
        match tokio::runtime::Handle::try_current() {
            Ok(h) if !grace.is_zero() => {
                h.spawn(async move {
                    tokio::time::sleep(grace).await;
                    entry.release(token);
                });
            }
            Ok(_) => entry.release(token),
            // No runtime to wait on: a thread keeps the grace, since the
            // store may still apply this write. (A permit dropped while its
            // runtime shuts down is never released: its spawned task is
            // dropped. That errs on the safe side, a barrier held, and only
            // happens to a process that is exiting.)
            Err(_) if !grace.is_zero() => {
                std::thread::spawn(move || {
                    std::thread::sleep(grace);
                    entry.release(token);
                });
            }
            Err(_) => entry.release(token),
        }
    }
}

impl LockEntry {
    fn new(name: LockName, state: LockState, locks: &Locks) -> Self {
        LockEntry {
            name,
            abort: Abort::default(),
            state: Mutex::new(state),
            changed: Notify::new(),
            persist: tokio::sync::Mutex::new(()),
            barrier: locks.barrier.clone(),
            dir: locks.dir.clone(),
            verifier: locks.verifier.clone(),
            last_check: tokio::sync::Mutex::new(None),
            global: locks.global.clone(),
            stats: LockStats::default(),
        }
    }

    /// With a verifier: checks that a token above the lock's highest is the
    /// current holder's, before anything is raised. Tokens at or below the
    /// highest pass untouched (the pure decision refuses the lower ones).
    ///
    /// Raises queued behind a check that finished after they arrived share
    /// its outcome (one etcd read for a burst of a new holder's writes, and
    /// one timeout, not one each, while etcd is down); a later raise asks
    /// again, so a verdict is never reused once it could be out of date.
    async fn verify_raise(&self, t: Token) -> Result<(), AdmitError> {
        let Some(v) = &self.verifier else { return Ok(()) };
        let raises = |t: u64| t > self.state.lock().highest;
        if !raises(t.get()) {
            return Ok(());
        }
        let arrived = Instant::now();
        let mut last = self.last_check.lock().await;
        let outcome = match last.as_ref() {
            _ if !raises(t.get()) => Ok(()),
            Some(c) if c.token == t.get() && c.at > arrived => c.outcome.clone(),
            _ => {
                let outcome = v.verify(&self.name, t).await;
                *last = Some(Checked { token: t.get(), at: Instant::now(), outcome: outcome.clone() });
                outcome
            }
        };
        let (lock, token) = (self.name.clone(), t.get());
        outcome.map_err(|f| match f {
            // A newer holder exists: this token is stale, whoever sends it
            // (a holder that let go, a zombie); answered like any stale token.
            VerifyFailure::NotHolder { holder: Some(holder) } if holder > token => {
                AdmitError::Superseded { lock, token, holder, highest: self.state.lock().highest }
            }
            VerifyFailure::NotHolder { holder } => AdmitError::Unverified { lock, token, holder },
            VerifyFailure::Unavailable(reason) => AdmitError::VerifyUnavailable { lock, token, reason },
        })
    }

    /// Shared marks: another replica raised the mark to `t`. Older tokens
    /// are refused from this call on (synchronously, before any await).
    pub fn refuse_below(&self, t: u64) {
        self.state.lock().refuse_below(t, Instant::now());
        // Writes waiting with older tokens are stale now: wake them.
        self.changed.notify_waiters();
    }

    /// Shared marks: waits (at most until `deadline`) until every write
    /// older than `t` has drained from this replica, with the barrier's
    /// drain timeout and abort rules. `Stale` if a still newer mark arrived
    /// meanwhile (its own drain covers this one).
    pub async fn observe(self: &Arc<Self>, t: u64, deadline: Instant) -> Result<(), AdmitError> {
        self.refuse_below(t);
        self.wait_for(t, deadline, LockState::drain).await?;
        self.changed.notify_waiters();
        Ok(())
    }

    /// A consistent copy of what `/v1/locks` and metrics show.
    pub fn snapshot(&self) -> (u64, u64, Option<SystemTime>, BTreeMap<u64, usize>) {
        let s = self.state.lock();
        (s.highest, s.durable, s.set_at, s.inflight())
    }

    fn release(&self, t: u64) {
        let waiting = {
            let mut s = self.state.lock();
            s.release(t);
            s.waiters > 0
        };
        // Waking nobody still takes the `Notify`'s own mutex: skipped when no
        // admission is in its wait loop. Sound because a waiter is counted
        // under the state mutex in the same critical section as its first
        // decision in the loop, and registered for wake-ups before it: a
        // release that sees no waiter happened before that decision, which
        // then sees the release.
        if waiting {
            self.changed.notify_waiters();
        }
    }

    /// Admits a write with token `t`, waiting at the barrier at most until
    /// `deadline`. The permit counts the write in flight until released.
    pub async fn admit_write(self: &Arc<Self>, t: Token, deadline: Instant) -> Result<Permit, AdmitError> {
        self.verify_raise(t).await?;
        let t = t.get();
        self.wait_for(t, deadline, LockState::admit).await?;
        Ok(Permit { entry: self.clone(), token: t, grace: self.barrier.abort_grace, done: false })
    }

    /// A proactive fence with token `t`: raises the lock's highest token to
    /// `t` durably and waits (at most until `deadline`) until every older
    /// write has drained; nothing is counted in flight.
    pub async fn fence(self: &Arc<Self>, t: Token, deadline: Instant) -> Result<(), AdmitError> {
        self.verify_raise(t).await?;
        self.wait_for(t.get(), deadline, LockState::fence).await?;
        // Writes already waiting may be stale now, or free to go: let them
        // decide again instead of sleeping until their timer.
        self.changed.notify_waiters();
        Ok(())
    }

    /// One pure decision, then its side effect outside the state: an abort
    /// it decided is signalled to the aborted writes.
    fn decide(
        &self,
        s: &mut LockState,
        decide: fn(&mut LockState, u64, Instant, &BarrierConfig) -> Decision,
        t: u64,
        now: Instant,
    ) -> Decision {
        let d = decide(s, t, now, &self.barrier);
        if s.aborted_below > self.abort.below.load(Ordering::Acquire) {
            self.abort.abort_below(s.aborted_below);
        }
        d
    }

    /// The loop around a pure decision: persist, wait, decide again.
    async fn wait_for(
        &self,
        t: u64,
        deadline: Instant,
        decide: fn(&mut LockState, u64, Instant, &BarrierConfig) -> Decision,
    ) -> Result<(), AdmitError> {
        // The common case first: a write at the current highest with nothing
        // older in flight is forwarded (or a stale one refused) on one
        // decision, without registering for wake-ups (a write to the lock's
        // shared `Notify`). Anything else goes round the loop below, which
        // registers before it decides again, so no wake-up is missed.
        match self.decide(&mut self.state.lock(), decide, t, Instant::now()) {
            Decision::Forward => return Ok(()),
            Decision::Stale { highest } => {
                return Err(AdmitError::Stale { lock: self.name.clone(), token: t, highest })
            }
            Decision::Persist | Decision::Wait { .. } => {}
        }
        let mut waited_since: Option<Instant> = None;
        let mut counted: Option<Waiter<'_>> = None;
        let result = loop {
            // Register for wake-ups before deciding, so a release between the
            // decision and the wait is not missed.
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = Instant::now();
            let decision = {
                let mut s = self.state.lock();
                if counted.is_none() {
                    s.waiters += 1;
                    counted = Some(Waiter(self));
                }
                self.decide(&mut s, decide, t, now)
            };
            match decision {
                Decision::Forward => break Ok(()),
                Decision::Stale { highest } => {
                    break Err(AdmitError::Stale { lock: self.name.clone(), token: t, highest });
                }
                Decision::Persist => {
                    // The highest token just rose: writes waiting with older
                    // tokens are stale from now on; wake them to say so.
                    self.changed.notify_waiters();
                    if let Err(e) = self.persist().await {
                        break Err(e.into());
                    }
                }
                Decision::Wait { until } => {
                    waited_since.get_or_insert(now);
                    if now >= deadline {
                        let retry_after = until.saturating_duration_since(now).max(Duration::from_secs(1));
                        break Err(AdmitError::BarrierTimeout { lock: self.name.clone(), retry_after });
                    }
                    tokio::select! {
                        _ = &mut notified => {}
                        _ = tokio::time::sleep_until(until.min(deadline)) => {}
                    }
                }
            }
        };
        drop(counted);
        if let Some(since) = waited_since {
            self.stats.barrier_waits.fetch_add(1, Ordering::Relaxed);
            self.stats.barrier_wait_us.fetch_add(since.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
        result
    }

    /// Writes the current `highest` to disk and marks it durable.
    async fn persist(&self) -> Result<(), StateError> {
        // One durable write at a time per lock; a waiter behind another's
        // write usually finds its token already durable.
        let _g = self.persist.lock().await;
        let target = {
            let s = self.state.lock();
            if s.durable >= s.highest {
                return Ok(());
            }
            s.highest
        };
        let now = SystemTime::now();
        if let Some(g) = &self.global {
            let stored = g.raise(&self.name, target).await?;
            {
                let mut s = self.state.lock();
                if stored > target {
                    // Another replica raised it further: `target` is stale.
                    s.refuse_below(stored, Instant::now());
                } else if target > s.durable {
                    s.durable = target;
                    s.set_at = Some(now);
                }
            }
            self.changed.notify_waiters();
            return Ok(());
        }
        let rec = Record::new(self.name.clone(), target, now);
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || match &dir {
            Some(d) => d.write(&rec),
            None => Ok(()),
        })
        .await
        .expect("state writer does not panic")?;
        {
            let mut s = self.state.lock();
            if target > s.durable {
                s.durable = target;
                s.set_at = Some(now);
            }
        }
        self.changed.notify_waiters();
        Ok(())
    }
}

/// An admission counted in [`LockState::waiters`] while it is in its wait
/// loop; uncounted when dropped, also when the admission is cancelled.
struct Waiter<'a>(&'a LockEntry);

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.0.state.lock().waiters -= 1;
    }
}

/// Every lock the filter knows, with its durable store.
#[derive(Debug)]
pub struct Locks {
    map: DashMap<LockName, Arc<LockEntry>>,
    /// `None` in unit tests and with shared marks: nothing on local disk.
    dir: Option<Arc<StateDir>>,
    global: Option<Arc<dyn GlobalMarks>>,
    pub barrier: BarrierConfig,
    /// The start-up barrier: nothing is forwarded before this instant.
    ready_at: Instant,
    /// Checks raises with the lock service (see [`LockEntry::verify_raise`]).
    verifier: Option<Arc<Verifier>>,
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
        let mut locks =
            Locks { map: DashMap::new(), dir: dir.map(Arc::new), global: None, barrier, ready_at: now, verifier };
        for r in records {
            let set_at = SystemTime::UNIX_EPOCH + Duration::from_millis(r.set_at_ms);
            locks.ready_at = now + locks.barrier.abort_grace;
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
        let mut locks =
            Locks { map: DashMap::new(), dir: None, global: Some(global), barrier, ready_at: now, verifier };
        for (lock, highest) in marks {
            locks.ready_at = now + locks.barrier.abort_grace;
            let state = LockState { highest, ..Default::default() }.hold_until(locks.ready_at);
            locks.map.insert(lock.clone(), locks.new_entry(lock, state));
        }
        locks
    }

    fn new_entry(&self, name: LockName, state: LockState) -> Arc<LockEntry> {
        Arc::new(LockEntry::new(name, state, self))
    }

    /// The verifier, if raises are checked.
    pub fn verifier(&self) -> Option<&Arc<Verifier>> {
        self.verifier.as_ref()
    }

    /// When the start-up barrier opens (now, when there were no records).
    pub fn ready_at(&self) -> Instant {
        self.ready_at
    }

    /// The entry for `lock`, created (at highest 0) on first use.
    pub fn entry(&self, lock: &LockName) -> Arc<LockEntry> {
        if let Some(e) = self.map.get(lock) {
            return e.clone();
        }
        self.map.entry(lock.clone()).or_insert_with(|| self.new_entry(lock.clone(), LockState::default())).clone()
    }

    /// All entries, sorted by name.
    /// Aborts every write in flight, of every lock (a replica leaving: see
    /// `filter::serve`). Their permits' `aborted()` resolve; the writes are
    /// released after `abort_grace`, as after any abort.
    pub fn abort_all(&self) {
        for e in self.map.iter() {
            e.value().abort.abort_below(u64::MAX);
        }
    }

    pub fn all(&self) -> Vec<Arc<LockEntry>> {
        let mut v: Vec<_> = self.map.iter().map(|e| e.value().clone()).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BarrierConfig {
        BarrierConfig { drain_timeout: Duration::from_secs(5), abort_grace: Duration::from_secs(1), disabled: false }
    }

    #[tokio::test(start_paused = true)]
    async fn pure_decisions() {
        let c = cfg();
        let mut s = LockState::with_durable(5, None);
        let now = Instant::now();
        assert_eq!(s.admit(4, now, &c), Decision::Stale { highest: 5 });
        assert_eq!(s.admit(5, now, &c), Decision::Forward);
        // A newer token: raised at once, must persist first.
        assert_eq!(s.admit(6, now, &c), Decision::Persist);
        assert_eq!(s.highest, 6);
        assert_eq!(s.admit(5, now, &c), Decision::Stale { highest: 6 }, "older refused before 6 is durable");
        s.durable = 6;
        // Token 5 is still in flight: 6 waits until the drain timeout.
        assert_eq!(s.admit(6, now, &c), Decision::Wait { until: now + c.drain_timeout });
        // Past the drain timeout: the older write is aborted, then grace.
        let later = now + c.drain_timeout;
        assert!(!s.is_aborted(5));
        assert_eq!(s.admit(6, later, &c), Decision::Wait { until: later + c.abort_grace });
        assert!(s.is_aborted(5) && !s.is_aborted(6));
        s.release(5);
        assert_eq!(s.admit(6, later, &c), Decision::Wait { until: later + c.abort_grace }, "grace holds");
        assert_eq!(s.admit(6, later + c.abort_grace, &c), Decision::Forward);
        assert_eq!(s.admit(6, later + c.abort_grace, &c), Decision::Forward, "same token: concurrent writes ok");
        assert_eq!(s.inflight(), BTreeMap::from([(6, 2)]));
    }

    #[tokio::test(start_paused = true)]
    async fn drained_barrier_forwards_without_grace() {
        let c = cfg();
        let mut s = LockState::with_durable(1, None);
        let now = Instant::now();
        assert_eq!(s.admit(1, now, &c), Decision::Forward);
        s.durable = 2;
        assert!(matches!(s.admit(2, now, &c), Decision::Wait { .. }));
        s.release(1);
        assert_eq!(s.admit(2, now, &c), Decision::Forward);
    }

    #[tokio::test(start_paused = true)]
    async fn disabled_barrier_forwards_at_once() {
        let c = BarrierConfig { disabled: true, ..cfg() };
        let mut s = LockState::with_durable(1, None);
        let now = Instant::now();
        assert_eq!(s.admit(1, now, &c), Decision::Forward);
        s.durable = 2;
        assert_eq!(s.admit(2, now, &c), Decision::Forward);
    }

    #[tokio::test(start_paused = true)]
    async fn async_admit_waits_for_the_older_write() {
        let locks = Arc::new(Locks::new(None, [], cfg()));
        let lock: LockName = "l".parse().unwrap();
        let e = locks.entry(&lock);
        let far = Instant::now() + Duration::from_secs(60);
        let old = e.admit_write(Token::new(1).unwrap(), far).await.unwrap();
        let e2 = e.clone();
        let newer = tokio::spawn(async move { e2.admit_write(Token::new(2).unwrap(), far).await.map(|_| true) });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!newer.is_finished(), "token 2 must wait while token 1 is in flight");
        assert!(matches!(e.admit_write(Token::new(1).unwrap(), far).await, Err(AdmitError::Stale { highest: 2, .. })));
        old.complete();
        assert!(newer.await.unwrap().unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn async_admit_aborts_after_drain_timeout_and_holds_grace() {
        let locks = Arc::new(Locks::new(None, [], cfg()));
        let e = locks.entry(&"l".parse().unwrap());
        let far = Instant::now() + Duration::from_secs(60);
        let old = e.admit_write(Token::new(1).unwrap(), far).await.unwrap();
        let start = Instant::now();
        let e2 = e.clone();
        let newer =
            tokio::spawn(async move { e2.admit_write(Token::new(2).unwrap(), far).await.map(|_| Instant::now()) });
        old.aborted().await;
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        drop(old); // dropped without complete(): released after abort_grace
        let went = newer.await.unwrap().unwrap();
        assert!(went - start >= Duration::from_secs(6), "{:?}", went - start);
    }

    #[tokio::test(start_paused = true)]
    async fn barrier_timeout_answers_retry_after() {
        let locks = Arc::new(Locks::new(None, [], cfg()));
        let e = locks.entry(&"l".parse().unwrap());
        let far = Instant::now() + Duration::from_secs(60);
        let _old = e.admit_write(Token::new(1).unwrap(), far).await.unwrap();
        let soon = Instant::now() + Duration::from_secs(2);
        match e.admit_write(Token::new(2).unwrap(), soon).await {
            Err(AdmitError::BarrierTimeout { retry_after, .. }) => assert_eq!(retry_after, Duration::from_secs(3)),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn fence_raises_without_counting_in_flight() {
        let locks = Arc::new(Locks::new(None, [], cfg()));
        let e = locks.entry(&"l".parse().unwrap());
        let far = Instant::now() + Duration::from_secs(60);
        e.fence(Token::new(9).unwrap(), far).await.unwrap();
        let (h, d, _, inflight) = e.snapshot();
        assert_eq!((h, d), (9, 9));
        assert!(inflight.is_empty());
    }

    /// Closes the hole where a fence counted itself in flight between its
    /// decision and its release: a newer write deciding in that window waited
    /// at the barrier for the fence, and nothing woke it until the drain
    /// timeout. A fence's decision now never counts anything in flight.
    #[tokio::test(start_paused = true)]
    async fn a_fence_decision_never_holds_a_newer_write() {
        let c = cfg();
        let mut s = LockState::with_durable(5, None);
        let now = Instant::now();
        assert_eq!(s.fence(5, now, &c), Decision::Forward);
        assert!(s.inflight().is_empty());
        assert_eq!(s.admit(6, now, &c), Decision::Persist);
        s.durable = 6;
        assert_eq!(s.admit(6, now, &c), Decision::Forward, "no barrier wait behind the fence");
    }

    /// A fence wakes a write waiting at the barrier with an older token: it is
    /// refused as stale at once, not when its barrier timer fires.
    #[tokio::test(start_paused = true)]
    async fn a_fence_wakes_older_writes_waiting_at_the_barrier() {
        let locks = Arc::new(Locks::new(None, [], cfg()));
        let e = locks.entry(&"l".parse().unwrap());
        let far = Instant::now() + Duration::from_secs(60);
        let _old = e.admit_write(Token::new(1).unwrap(), far).await.unwrap();
        let e2 = e.clone();
        let waiting = tokio::spawn(async move { e2.admit_write(Token::new(2).unwrap(), far).await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let fenced_at = Instant::now();
        let e3 = e.clone();
        let fence = tokio::spawn(async move { e3.fence(Token::new(3).unwrap(), far).await });
        let r = waiting.await.unwrap();
        assert!(matches!(r, Err(AdmitError::Stale { highest: 3, .. })), "{r:?}");
        assert!(fenced_at.elapsed() < Duration::from_secs(1), "woken at once: {:?}", fenced_at.elapsed());
        fence.abort();
    }

    /// Closes the hole where a filter restarted within `abort_grace` of a
    /// `kill -9` forwarded a new token's write at once, while the store could
    /// still apply an older write whose connection died with the old process:
    /// every lock's barrier is held for `abort_grace` from start-up. Writes
    /// wait (up to their deadline), they are not refused.
    #[tokio::test(start_paused = true)]
    async fn start_up_barrier_holds_writes_for_abort_grace() {
        let rec = Record::new("l".parse().unwrap(), 4, SystemTime::now());
        let started = Instant::now();
        let locks = Arc::new(Locks::new(None, [rec], cfg()));
        assert_eq!(locks.ready_at(), started + Duration::from_secs(1));
        let known = locks.entry(&"l".parse().unwrap());
        let soon = Instant::now() + Duration::from_millis(500);
        let r = known.admit_write(Token::new(5).unwrap(), soon).await;
        assert!(matches!(r, Err(AdmitError::BarrierTimeout { .. })), "{r:?}");
        let far = Instant::now() + Duration::from_secs(60);
        known.admit_write(Token::new(5).unwrap(), far).await.unwrap().complete();
        assert_eq!(started.elapsed(), Duration::from_secs(1), "went when the grace was over");
        // A lock with no record never had a write forwarded: it is not held.
        let empty = Arc::new(Locks::new(None, [], cfg()));
        assert_eq!(empty.ready_at(), Instant::now());
        let t = Instant::now();
        empty.entry(&"m".parse().unwrap()).admit_write(Token::new(1).unwrap(), far).await.unwrap().complete();
        assert_eq!(t.elapsed(), Duration::ZERO);
    }

    /// A lock service in memory: `holder` is the current holder's token;
    /// `calls` counts checks; `delay` makes each check slow.
    #[derive(Debug, Default)]
    struct FakeCheck {
        holder: std::sync::atomic::AtomicU64,
        down: std::sync::atomic::AtomicBool,
        calls: AtomicU64,
        delay: Duration,
    }

    impl crate::lease::sequencer::HolderCheck for FakeCheck {
        fn check<'a>(
            &'a self,
            _: &'a LockName,
            t: Token,
        ) -> futures_util::future::BoxFuture<
            'a,
            Result<crate::lease::sequencer::Verdict, crate::lease::sequencer::Unavailable>,
        > {
            use crate::lease::sequencer::{Unavailable, Verdict};
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(self.delay).await;
                if self.down.load(Ordering::Relaxed) {
                    return Err(Unavailable("down".into()));
                }
                let h = self.holder.load(Ordering::Relaxed);
                Ok(if h == t.get() { Verdict::Holder } else { Verdict::NotHolder { holder: Some(h) } })
            })
        }
    }

    fn verified_locks(check: Arc<FakeCheck>, highest: u64) -> Arc<Locks> {
        let rec = Record::new("l".parse().unwrap(), highest, SystemTime::now());
        let c = BarrierConfig { abort_grace: Duration::ZERO, ..cfg() };
        Arc::new(Locks::verified(None, [rec], c, Some(Arc::new(super::super::verify::Verifier::new(check)))))
    }

    /// Issue 13: a token above the highest that is not the holder's is
    /// refused before anything is raised (fails on the old code: the forged
    /// token became the mark).
    #[tokio::test(start_paused = true)]
    async fn an_unverified_raise_changes_nothing() {
        let check = Arc::new(FakeCheck { holder: 7.into(), ..Default::default() });
        let locks = verified_locks(check.clone(), 5);
        let e = locks.entry(&"l".parse().unwrap());
        let far = Instant::now() + Duration::from_secs(60);
        let r = e.admit_write(Token::new(Token::MAX).unwrap(), far).await;
        assert!(matches!(r, Err(AdmitError::Unverified { holder: Some(7), .. })), "{r:?}");
        let r = e.fence(Token::new(8).unwrap(), far).await;
        assert!(matches!(r, Err(AdmitError::Unverified { .. })), "{r:?}");
        let (h, d, ..) = e.snapshot();
        assert_eq!((h, d), (5, 5), "mark unchanged");
        // At the highest: no check at all (the hot path).
        e.admit_write(Token::new(5).unwrap(), far).await.unwrap().complete();
        assert_eq!(check.calls.load(Ordering::Relaxed), 2);
        // The genuine holder raises.
        e.admit_write(Token::new(7).unwrap(), far).await.unwrap().complete();
        let (h, d, ..) = e.snapshot();
        assert_eq!((h, d), (7, 7));
        check.down.store(true, Ordering::Relaxed);
        let r = e.fence(Token::new(9).unwrap(), far).await;
        assert!(matches!(r, Err(AdmitError::VerifyUnavailable { .. })), "{r:?}");
        e.admit_write(Token::new(7).unwrap(), far).await.unwrap().complete();
        assert_eq!(e.snapshot().0, 7);
    }

    /// A burst of a new holder's writes shares one check.
    #[tokio::test(start_paused = true)]
    async fn concurrent_raises_share_one_check() {
        let check = Arc::new(FakeCheck { holder: 9.into(), delay: Duration::from_millis(50), ..Default::default() });
        let locks = verified_locks(check.clone(), 5);
        let e = locks.entry(&"l".parse().unwrap());
        let far = Instant::now() + Duration::from_secs(60);
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let e = e.clone();
                tokio::spawn(async move { e.admit_write(Token::new(9).unwrap(), far).await.map(Permit::complete) })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(check.calls.load(Ordering::Relaxed), 1);
    }

    /// Shared marks: applying another replica's raise refuses older tokens
    /// at once and waits for older in-flight writes, but never asks to make
    /// the mark durable here (that would wait for this replica's own ack).
    #[tokio::test(start_paused = true)]
    async fn drain_never_persists_and_waits_for_older_writes() {
        let c = cfg();
        let mut s = LockState::with_durable(5, None);
        let now = Instant::now();
        assert_eq!(s.admit(5, now, &c), Decision::Forward);
        assert_eq!(s.drain(6, now, &c), Decision::Wait { until: now + c.drain_timeout });
        assert_eq!(s.admit(5, now, &c), Decision::Stale { highest: 6 });
        s.release(5);
        assert_eq!(s.drain(6, now, &c), Decision::Forward);
        assert_eq!(s.durable, 5, "not durable here");
        assert_eq!(s.admit(6, now, &c), Decision::Persist, "a write with 6 still goes through the global raise");
    }
}
