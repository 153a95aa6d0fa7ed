//! One lock's async side: the loop around the pure decision (persisting,
//! waiting, aborting), the permits of forwarded writes, and the lock's
//! counters.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::decision::{BarrierConfig, Decision, LockState};
use super::{AdmitError, Common};
use crate::filter::state::{Record, StateError};
use crate::filter::verify::VerifyFailure;
use crate::token::{LockName, Token};

/// Counters for one lock, read at scrape time. `admitted`, the one every
/// write adds to, comes first (`repr(C)`), next to the entry's other hot
/// fields (see [`LockEntry`]).
#[derive(Debug, Default)]
#[repr(C)]
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

/// One lock: its state, its wake-ups, its durable-write serializer, and
/// what its barrier needs (the barrier settings, the state directory).
///
/// Laid out for many locks (`repr(C)`: in this order). Spread over 100,000
/// locks, nearly every write finds its lock's entry out of cache, and each
/// cache line of it that the write reads is a miss of its own, one after
/// another (the atomics on them do not overlap). What every write reads or
/// writes comes first, after the reference counts the `Arc` keeps in front:
/// the shared settings' pointer, the abort signal (its token, and its
/// `Notify`, which every forwarded write registers with), the state and its
/// mutex, the admitted counter. They end 200 bytes into the allocation, 4
/// cache lines, where the compiler's order spread what a write reads over 7
/// of the entry's 9 (the barrier settings, the verifier and the counters
/// each on a line of its own). What only raises, waits and errors touch
/// comes after.
#[derive(Debug)]
#[repr(C)]
pub struct LockEntry {
    /// What every entry shares (the barrier settings, the state directory,
    /// the verifier, the shared marks): the same two lines for every write,
    /// so in cache.
    common: Arc<Common>,
    /// The barrier's abort signal: every in-flight write with a token below
    /// it must stop. One per lock, in its entry (permits reach it through
    /// the entry they hold), rather than one cancellation token per group of
    /// in-flight writes: a write on an idle lock then allocates nothing and
    /// touches no extra cache line. Sound because an abort below `t` comes
    /// with `highest >= t`, so no write below `t` is admitted after it (or
    /// is [`abort_all`](Self::abort_all), a replica leaving, after which
    /// every write is aborted at once).
    abort_below: AtomicU64,
    /// Wakes the writes waiting for `abort_below` to pass their token.
    abort_notify: Notify,
    state: Mutex<LockState>,
    pub stats: LockStats,
    pub name: LockName,
    changed: Notify,
    persist: tokio::sync::Mutex<()>,
    /// With a verifier only (boxed: 8 bytes a lock without one, not 104):
    /// serializes this lock's verifications and keeps the last one, so the
    /// raises that queued behind it share its outcome.
    last_check: Option<Box<tokio::sync::Mutex<Option<Checked>>>>,
}

/// One finished verification: which token, when it was asked and when it
/// finished, and what it said of the holder (`Ok(None)`: no holder;
/// `Err`: the lock service did not answer).
#[derive(Debug)]
struct Checked {
    token: u64,
    started: Instant,
    finished: Instant,
    holder: Result<Option<u64>, String>,
}

impl Checked {
    fn new(token: u64, started: Instant, outcome: Result<(), VerifyFailure>) -> Self {
        let holder = match outcome {
            Ok(()) => Ok(Some(token)),
            Err(VerifyFailure::NotHolder { holder }) => Ok(holder),
            Err(VerifyFailure::Unavailable(e)) => Err(e),
        };
        Checked { token, started, finished: Instant::now(), holder }
    }

    /// What this check says of token `t`.
    fn verdict(&self, t: u64) -> Result<(), VerifyFailure> {
        match &self.holder {
            Ok(Some(h)) if *h == t => Ok(()),
            Ok(holder) => Err(VerifyFailure::NotHolder { holder: *holder }),
            Err(e) => Err(VerifyFailure::Unavailable(e.clone())),
        }
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
    /// Resolves when a newer token's barrier aborts this write. The future
    /// owns what it watches: the permit may move (to a task that reads an
    /// answer on, `filter::orphan`) while it is polled.
    pub fn aborted(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (entry, t) = (self.entry.clone(), self.token);
        async move { entry.aborted(t).await }
    }

    pub fn token(&self) -> u64 {
        self.token
    }

    pub fn lock(&self) -> &LockName {
        &self.entry.name
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
    pub(super) fn new(name: LockName, state: LockState, common: Arc<Common>) -> Self {
        let last_check = common.verifier.as_ref().map(|_| Box::new(tokio::sync::Mutex::new(None)));
        LockEntry {
            common,
            abort_below: AtomicU64::new(0),
            abort_notify: Notify::new(),
            state: Mutex::new(state),
            stats: LockStats::default(),
            name,
            changed: Notify::new(),
            persist: tokio::sync::Mutex::new(()),
            last_check,
        }
    }

    /// Whether this entry belongs to the registry whose shared part is
    /// `common` (each registry has its own).
    pub(super) fn is_of(&self, common: &Arc<Common>) -> bool {
        Arc::ptr_eq(&self.common, common)
    }

    /// Signals an abort of every in-flight write below `t`.
    fn abort_below(&self, t: u64) {
        self.abort_below.fetch_max(t, Ordering::AcqRel);
        self.abort_notify.notify_waiters();
    }

    fn is_aborted(&self, t: u64) -> bool {
        self.abort_below.load(Ordering::Acquire) > t
    }

    /// Resolves once writes of token `t` are aborted.
    async fn aborted(&self, t: u64) {
        loop {
            // Registered before the check, so an abort in between is not missed.
            let n = self.abort_notify.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if self.is_aborted(t) {
                return;
            }
            n.await;
        }
    }

    /// With a verifier: checks that a token above the lock's highest is the
    /// current holder's, before anything is raised. Tokens at or below the
    /// highest pass untouched (the pure decision refuses the lower ones).
    ///
    /// Raises queued behind a check that finished after they arrived share
    /// its outcome (one etcd read for a burst of a new holder's writes, and
    /// one timeout, not one each, while etcd is down); a later raise asks
    /// again, so a verdict is never reused once it could be out of date. A
    /// check asked after a raise arrived answers for any token (it read the
    /// holder as it was after the raise arrived), so raises with many
    /// different tokens (forged, say) cost two etcd reads in a row at most,
    /// not one each, and cannot hold a genuine new holder up behind them.
    async fn verify_raise(&self, t: Token) -> Result<(), AdmitError> {
        let Some(v) = &self.common.verifier else { return Ok(()) };
        let raises = |t: u64| t > self.state.lock().highest;
        if !raises(t.get()) {
            return Ok(());
        }
        // Built with the entry whenever there is a verifier; were it missing,
        // the raise is refused, never let through unverified.
        let Some(last_check) = &self.last_check else {
            let reason = "this lock has no verification state".to_string();
            return Err(AdmitError::VerifyUnavailable { lock: self.name.clone(), token: t.get(), reason });
        };
        let arrived = Instant::now();
        let mut last = last_check.lock().await;
        let outcome = match last.as_ref() {
            _ if !raises(t.get()) => Ok(()),
            Some(c) if c.started > arrived => c.verdict(t.get()),
            Some(c) if c.token == t.get() && c.finished > arrived => c.verdict(t.get()),
            _ => {
                let started = Instant::now();
                let checked = Checked::new(t.get(), started, v.verify(&self.name, t).await);
                let outcome = checked.verdict(t.get());
                *last = Some(checked);
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

    /// Aborts every write of this lock in flight (see [`Locks::abort_all`]).
    pub(super) fn abort_all(&self) {
        self.abort_below(u64::MAX);
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
        Ok(Permit { entry: self.clone(), token: t, grace: self.common.barrier.abort_grace, done: false })
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
        let d = decide(s, t, now, &self.common.barrier);
        if s.aborted_below > self.abort_below.load(Ordering::Acquire) {
            self.abort_below(s.aborted_below);
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
        if let Some(g) = &self.common.global {
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
        let dir = self.common.dir.clone();
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

#[cfg(test)]
mod layout {
    use std::mem::{offset_of, size_of};

    use super::{LockEntry, LockStats};

    /// Every field a write reads or writes lies before every other one,
    /// within the first 200 bytes of the allocation (the `Arc`'s two
    /// counts, 16 bytes, come first): 4 cache lines at 16-byte alignment.
    /// A hot field moved behind a cold one, or a cold one moved in front,
    /// fails here (see [`LockEntry`]).
    #[test]
    fn the_fields_every_write_touches_come_first() {
        let hot = [
            (offset_of!(LockEntry, common), 8),
            (offset_of!(LockEntry, abort_below), 8),
            (offset_of!(LockEntry, abort_notify), size_of::<tokio::sync::Notify>()),
            (offset_of!(LockEntry, state), size_of::<parking_lot::Mutex<super::LockState>>()),
            (offset_of!(LockEntry, stats) + offset_of!(LockStats, admitted), 8),
        ];
        let hot_end = hot.iter().map(|(at, len)| at + len).max().unwrap();
        assert!(16 + hot_end <= 200, "the hot fields end at {hot_end}");
        let cold = [
            offset_of!(LockEntry, name),
            offset_of!(LockEntry, changed),
            offset_of!(LockEntry, persist),
            offset_of!(LockEntry, last_check),
        ];
        for at in cold {
            assert!(at >= hot_end, "a cold field at {at}, among the hot ones (which end at {hot_end})");
        }
        assert!(size_of::<LockEntry>() <= 400, "{} bytes a lock", size_of::<LockEntry>());
    }
}
