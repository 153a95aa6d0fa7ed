//! The pure decision for one lock: given its state, a token and the clock,
//! forward, refuse, persist first, or wait. No I/O, no awaiting: tested on
//! decisions alone with a paused clock (see the module docs of
//! [`super`] for the rules).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use smallvec::SmallVec;
use tokio::time::Instant;

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
    /// the entry's abort signal by [`LockEntry::decide`].
    pub(super) aborted_below: u64,
    /// Admissions now in their wait loop (see [`LockEntry::release`]).
    pub(super) waiters: usize,
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

    /// `highest` known (refused below) but not durable here: a shared mark
    /// read at start-up, which this replica still has to see acknowledged.
    pub fn refusing_below(highest: u64) -> Self {
        LockState { highest, ..Default::default() }
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
    pub(super) fn refuse_below(&mut self, t: u64, now: Instant) {
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
                // Drain timeout passed: abort every older write still in
                // flight, and hold `abort_grace` from the abort. Only a new
                // abort moves the hold on: writes aborted before stay in
                // flight for their own grace after they stop (their
                // permits), and their release wakes this wait. Moving it on
                // at each decision made a new holder wait the grace twice.
                if t > self.aborted_below {
                    self.aborted_below = t;
                    let hold = now + cfg.abort_grace;
                    self.hold_until = Some(self.hold_until.map_or(hold, |h| h.max(hold)));
                }
                let until = self.hold_until.filter(|h| *h > now).unwrap_or(now + cfg.abort_grace);
                return Decision::Wait { until };
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
    pub(super) fn release(&mut self, t: u64) {
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
