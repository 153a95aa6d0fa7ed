//! Cutting off a replica's writes in flight when it self-fences.
//!
//! Refusing new writes at the self-fencing deadline is not enough: a write
//! forwarded before it (a large body still streaming, a slow store) would go
//! on, and once etcd expires this replica's registration the other replicas
//! stop waiting for it, so a newer holder's write can land first and this one
//! after it. So at the deadline (or once the registration is known gone)
//! every write in flight here is cut off: its upstream connection is closed,
//! as the barrier's abort does. The replicas' margin includes
//! `--abort-grace` (see `config`), so a write cut off at the deadline has
//! had its grace before etcd can expire the registration.
//!
//! One signal per replica, not per write: a generation that the watcher task
//! ([`watch_deadline`]) moves on when the deadline passes, and each forwarded
//! write ([`CutOff`]) compares with the one it started under. A write also
//! looks at the deadline itself whenever it is polled, and its body before
//! each chunk it hands on ([`CutCheck`]), so a replica that resumes from a
//! pause (SIGSTOP, a frozen cgroup) sends no more of a write's body than
//! what was already on its way to the socket, before the watcher has run.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::futures::Notified;
use tokio::sync::Notify;

use super::Shared;
use crate::lease::deadline::Stamp;

/// The replica's cut-off generation and the writes waiting on it.
#[derive(Debug, Default)]
pub(super) struct CutSignal {
    generation: AtomicU64,
    notify: Notify,
}

impl CutSignal {
    pub(super) fn cut(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.notify.notify_waiters();
    }
}

impl Shared {
    /// The generation a write is forwarded under; taken before the write's
    /// last [`Shared::writable`] check, so a cut between the two is seen.
    pub fn cut_generation(&self) -> u64 {
        self.cut.generation.load(Ordering::Acquire)
    }

    /// Resolves once a write forwarded under `generation` must be cut off:
    /// the replica self-fenced (or lost its registration) since. Never, with
    /// the test-only `--unsafe-no-replica-cut-off`.
    pub fn cut_off(&self, generation: u64) -> CutOff<'_> {
        CutOff { shared: self, generation, notified: Box::pin(self.cut.notify.notified()) }
    }

    fn must_cut(&self, generation: u64) -> bool {
        if self.cfg.unsafe_no_cut_off {
            return false;
        }
        if self.cut.generation.load(Ordering::Acquire) != generation {
            return true;
        }
        !self.valid_until.lock().is_some_and(|d| !d.passed(Stamp::now()))
    }
}

/// A forwarded write's body stops when the replica must cut it off: see
/// [`crate::proxy::RequestBody::halted_by`].
#[derive(Debug)]
pub struct CutCheck {
    shared: Arc<Shared>,
    generation: u64,
}

impl CutCheck {
    /// For a write forwarded under `generation` (one allocation per write,
    /// replicas only).
    pub fn halt(shared: &Arc<Shared>, generation: u64) -> Arc<dyn crate::proxy::body::Halt> {
        Arc::new(CutCheck { shared: shared.clone(), generation })
    }
}

impl crate::proxy::body::Halt for CutCheck {
    fn halted(&self) -> bool {
        self.shared.must_cut(self.generation)
    }
}

/// See [`Shared::cut_off`].
pub struct CutOff<'a> {
    shared: &'a Shared,
    generation: u64,
    /// Boxed: only replicas forward under a cut-off, and the write's future
    /// (copied at each move) stays the size it is without one.
    notified: Pin<Box<Notified<'a>>>,
}

impl Future for CutOff<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            // Registered before the check, so a cut in between is not missed.
            if self.notified.as_mut().poll(cx).is_ready() {
                let n = self.shared.cut.notify.notified();
                self.notified.set(n);
                continue;
            }
            return match self.shared.must_cut(self.generation) {
                true => Poll::Ready(()),
                false => Poll::Pending,
            };
        }
    }
}

/// Cuts the replica's writes off when its self-fencing deadline passes or its
/// registration is known gone; ends then, for good, or when the replica
/// leaves. Owned by the runtime that joined (spawned in [`super::join`]).
pub(super) async fn watch_deadline(shared: Arc<Shared>) {
    // In steps while the deadline is ahead: it may pass on CLOCK_BOOTTIME
    // during a suspend, which tokio's timer (CLOCK_MONOTONIC) does not see.
    const STEP: Duration = Duration::from_millis(100);
    let mut cut_at = None;
    loop {
        let Some(d) = *shared.valid_until.lock() else {
            shared.cut.cut();
            tracing::debug!(replica = shared.id(), "registration gone: writes in flight cut off");
            return;
        };
        let now = Stamp::now();
        if !d.passed(now) {
            let step = tokio::time::Instant::now() + STEP;
            tokio::time::sleep_until(d.mono().min(step)).await;
            continue;
        }
        // Once per deadline passed: a keep-alive answered late may move the
        // deadline on, and the replica writes again until the next one.
        if cut_at != Some(d) {
            cut_at = Some(d);
            shared.cut.cut();
            tracing::warn!(replica = shared.id(), "self-fenced: writes in flight here cut off");
        }
        tokio::time::sleep(STEP / 2).await;
    }
}
