//! Which token the writes in flight may go on under, kept for all of them at
//! once ([`SafeToken`]), and the guard each forwarded write waits on
//! ([`SafeToken::guard`], used by [`super::layers::BoundWrites`]).
//!
//! A forwarded write is cut off the moment the lock stops being safely held:
//! on a status change, and when the self-fencing deadline passes, which no
//! message announces. Each write used to watch for that itself, with a timer
//! armed at the deadline and a registration on the status watch: about 1.7k
//! instructions per write, 5% of a sidecar's write, most of it the timer's
//! insertion into tokio's wheel and its removal. One task ([`SafeToken::keep`])
//! now does it for every write: it keeps the token that is safe *now* in an
//! atomic, waking at the self-fencing deadline and on every status change,
//! and wakes the writes in flight through one `Notify` each time. A write
//! reads the atomic and registers on the `Notify`: no timer, no clock read.
//!
//! The task also looks every [`STEP`] while the status has a self-fencing
//! deadline (held, or held until a moment ago):
//! * a sleep runs on CLOCK_MONOTONIC, which stops during a suspend, while the
//!   deadline may pass on CLOCK_BOOTTIME meanwhile (`lease::deadline`): after
//!   a resume the deadline is seen within a step;
//! * each look wakes the writes in flight, which check their own
//!   `--write-deadline` then: that bound takes effect up to one step late. It
//!   bounds how long a write streams; the safety deadline is the lease's.
//!
//! Each look wakes every write in flight, which costs them one poll each per
//! step; a sidecar serves one app, whose writes in flight are few.
//!
//! The task runs on the same runtime as the writes (one per event loop:
//! `sidecar::serve`) and its timer fires with theirs, so a write is cut off when it was before, give or take the
//! scheduling of one more task before the writes' own: on a busy runtime,
//! as late as a late timer already was, which the self-fencing margin is
//! there to absorb. When the keeper's status watch closes (the keeper gone,
//! even by a panic, with its last status saying held) nothing is safe any
//! more ([`SafeToken::close`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::futures::OwnedNotified;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::lease::deadline::Stamp;
use crate::lease::keeper::LockStatus;
use crate::token::Token;

/// How often the task looks while the lock is held (see the module docs).
pub const STEP: Duration = Duration::from_millis(100);

/// The token safe to write under now, shared by every write in flight.
#[derive(Debug)]
pub struct SafeToken {
    /// The token, 0 when none is safe (tokens start at 1).
    token: AtomicU64,
    /// Notified at every change of `token` and at every look.
    changed: Arc<Notify>,
    /// The keeper's status, read by a write that finds `token` behind it (a
    /// token just won, before the task has run).
    status: watch::Receiver<LockStatus>,
    /// Set for good when the status watch closes (the keeper gone, even by a
    /// panic, its last status saying held) or the sidecar stops: nothing is
    /// safe after it, whatever `status` last said.
    closed: AtomicBool,
}

/// Why a forwarded write must be cut off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cutoff {
    /// Its token is no longer the safely held one.
    LeaseLost,
    /// It outlived `--write-deadline`.
    Deadline,
}

/// Closes its token when dropped ([`SafeToken::keep`]).
struct CloseOnDrop<'a>(&'a SafeToken);

impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        self.0.close();
    }
}

impl SafeToken {
    /// Nothing safe until [`SafeToken::keep`] has looked at `status`.
    pub fn new(status: watch::Receiver<LockStatus>) -> Arc<SafeToken> {
        Arc::new(SafeToken {
            token: AtomicU64::new(0),
            changed: Arc::new(Notify::new()),
            status,
            closed: AtomicBool::new(false),
        })
    }

    /// Keeps `token` up to date until the status watch closes, then closes
    /// ([`SafeToken::close`]). The sidecar's `serve` spawns it, and closes
    /// and aborts it once its proxy and its keeper have stopped.
    pub async fn keep(self: Arc<Self>) {
        // Nothing is safe without this watch: ended or dropped (aborted, its
        // runtime gone), it closes the token.
        let _closes = CloseOnDrop(&self);
        let mut rx = self.status.clone();
        loop {
            let (t, valid_until) = {
                let s = rx.borrow_and_update();
                (s.write_token(Stamp::now()).map_or(0, Token::get), s.valid_until.map(|d| d.mono()))
            };
            self.token.store(t, SeqCst);
            self.changed.notify_waiters();
            let changed = rx.changed();
            let ended = match valid_until {
                // No deadline: not holding, nothing in flight to cut off or to time.
                None => changed.await.is_err(),
                // A deadline, passed or not, is looked at again at itself and
                // every step. One that has passed can come back with no
                // message: a keep-alive answered late moves it on silently
                // (`keeper::alive`), and the status says held again.
                Some(v) => {
                    let now = Instant::now();
                    let wake = if v > now { v.min(now + STEP) } else { now + STEP };
                    tokio::select! {
                        _ = tokio::time::sleep_until(wake) => false,
                        r = changed => r.is_err(),
                    }
                }
            };
            if ended {
                return self.close();
            }
        }
    }

    /// Nothing is safe any more, for good: every write in flight is cut off
    /// and every guard made later fires at once.
    pub fn close(&self) {
        self.closed.store(true, SeqCst);
        self.token.store(0, SeqCst);
        self.changed.notify_waiters();
    }

    /// Resolves when `token` stops being safe to write under, or at `until`
    /// (within a [`STEP`]). `token` was checked safe just before (the write
    /// was given it).
    pub fn guard(self: &Arc<Self>, token: Token, until: Instant) -> Guard {
        Guard { safe: self.clone(), token, until, notified: None }
    }

    /// Whether `token` is safe now. The atomic is the fast answer; when it
    /// disagrees, the keeper's status decides (the task may not have seen a
    /// token just won yet), as long as its watch is open. Once closed,
    /// nothing is safe.
    fn is_safe(&self, token: Token) -> bool {
        if self.closed.load(SeqCst) {
            return false;
        }
        self.token.load(SeqCst) == token.get()
            || (self.status.has_changed().is_ok() && self.status.borrow().write_token(Stamp::now()) == Some(token))
    }
}

pin_project_lite::pin_project! {
    /// See [`SafeToken::guard`]. A struct, not an `async fn`: it lives inside
    /// every forwarded write's future, which is copied whole when it moves.
    pub struct Guard {
        safe: Arc<SafeToken>,
        token: Token,
        until: Instant,
        #[pin]
        notified: Option<OwnedNotified>,
    }
}

impl Future for Guard {
    type Output = Cutoff;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Cutoff> {
        let mut this = self.project();
        loop {
            if let Some(n) = this.notified.as_mut().as_pin_mut() {
                if n.poll(cx).is_pending() {
                    return Poll::Pending;
                }
                // A change or a look: the deadline is read on the clock only then.
                if Instant::now() >= *this.until {
                    return Poll::Ready(Cutoff::Deadline);
                }
            }
            // Registered before the token is read: a change after this read
            // notifies it (`notify_waiters` reaches every `Notified` made
            // before the call, polled or not).
            this.notified.set(Some(this.safe.changed.clone().notified_owned()));
            if !this.safe.is_safe(*this.token) {
                return Poll::Ready(Cutoff::LeaseLost);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::deadline::Deadline;
    use crate::lease::keeper::Phase;

    fn holding(token: u64, for_: Duration) -> LockStatus {
        LockStatus {
            phase: Phase::Holding,
            token: Token::new(token),
            last_token: Token::new(token),
            lease_id: Some(1),
            ttl: Duration::from_secs(10),
            valid_until: Some(Deadline::after(Stamp::now(), for_)),
            fenced_out_highest: None,
            last_error: None,
        }
    }

    /// A `SafeToken` over `status`, its task started and settled.
    async fn kept(status: LockStatus) -> (watch::Sender<LockStatus>, Arc<SafeToken>, tokio::task::JoinHandle<()>) {
        let (tx, rx) = watch::channel(status);
        let safe = SafeToken::new(rx);
        let task = tokio::spawn(safe.clone().keep());
        settle().await;
        (tx, safe, task)
    }

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    /// No message comes when the self-fencing deadline passes: the write is
    /// cut off then, on the task's timer.
    #[tokio::test(start_paused = true)]
    async fn a_write_is_cut_off_when_the_self_fencing_deadline_passes() {
        let (tx, safe, task) = kept(holding(5, Duration::from_millis(1_050))).await;
        let start = Instant::now();
        let why = safe.guard(Token::new(5).unwrap(), start + Duration::from_secs(60)).await;
        assert_eq!(why, Cutoff::LeaseLost);
        assert_eq!(start.elapsed(), Duration::from_millis(1_050), "cut off at the deadline itself");
        drop(tx);
        task.await.unwrap();
    }

    /// A status change cuts the write off at once; a write under the token
    /// that then became safe goes on.
    #[tokio::test(start_paused = true)]
    async fn a_status_change_cuts_off_the_writes_under_the_old_token() {
        let (tx, safe, _task) = kept(holding(5, Duration::from_secs(10))).await;
        let old = tokio::spawn(safe.guard(Token::new(5).unwrap(), Instant::now() + Duration::from_secs(60)));
        settle().await;
        tx.send(holding(6, Duration::from_secs(10))).unwrap();
        settle().await;
        assert!(old.is_finished(), "cut off on the change");
        assert_eq!(old.await.unwrap(), Cutoff::LeaseLost);
        let new = tokio::spawn(safe.guard(Token::new(6).unwrap(), Instant::now() + Duration::from_secs(60)));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!new.is_finished(), "the new token's write goes on");
    }

    /// A token just won, before the task has looked: the status says it is
    /// safe, so its write is not cut off.
    #[tokio::test(start_paused = true)]
    async fn a_token_just_won_is_safe_before_the_task_has_looked() {
        let (_tx, rx) = watch::channel(holding(7, Duration::from_secs(10)));
        let safe = SafeToken::new(rx);
        let g = tokio::spawn(safe.guard(Token::new(7).unwrap(), Instant::now() + Duration::from_secs(60)));
        settle().await;
        assert!(!g.is_finished());
        // And one the status does not hold is cut off at once.
        let stale = safe.guard(Token::new(6).unwrap(), Instant::now() + Duration::from_secs(60)).await;
        assert_eq!(stale, Cutoff::LeaseLost);
    }

    /// The keeper gone (its watch closed) while its last status says held:
    /// the writes in flight are cut off, and so is any later one, although
    /// that status still calls the token safe.
    #[tokio::test(start_paused = true)]
    async fn a_closed_status_watch_cuts_off_every_write() {
        let (tx, safe, task) = kept(holding(5, Duration::from_secs(10))).await;
        let far = Instant::now() + Duration::from_secs(60);
        let in_flight = tokio::spawn(safe.guard(Token::new(5).unwrap(), far));
        settle().await;
        assert!(!in_flight.is_finished());
        drop(tx);
        settle().await;
        assert!(in_flight.is_finished(), "cut off when the watch closed");
        assert_eq!(in_flight.await.unwrap(), Cutoff::LeaseLost);
        assert_eq!(safe.guard(Token::new(5).unwrap(), far).await, Cutoff::LeaseLost, "and every write after");
        task.await.unwrap();
    }

    /// A self-fencing deadline that passed, then came back with no message (a
    /// keep-alive answered late moves it on silently): the writes under it are
    /// still watched, their `--write-deadline` seen and the new self-fencing
    /// deadline kept to the moment.
    #[tokio::test(start_paused = true)]
    async fn a_deadline_that_comes_back_is_still_watched() {
        let (tx, safe, _task) = kept(holding(5, Duration::from_secs(1))).await;
        let far = Instant::now() + Duration::from_secs(600);
        assert_eq!(safe.guard(Token::new(5).unwrap(), far).await, Cutoff::LeaseLost, "cut off at the first deadline");
        tokio::time::sleep(Duration::from_millis(50)).await;
        tx.send_if_modified(|s| {
            s.valid_until = Some(Deadline::after(Stamp::now(), Duration::from_secs(2)));
            false
        });
        let start = Instant::now();
        let short = tokio::spawn(safe.guard(Token::new(5).unwrap(), start + Duration::from_millis(500)));
        let long = tokio::spawn(safe.guard(Token::new(5).unwrap(), far));
        // Bounded: unwatched, they would wait for ever.
        let within = |f| tokio::time::timeout(Duration::from_secs(30), f);
        let why = within(short).await.expect("the write deadline seen").unwrap();
        assert_eq!(why, Cutoff::Deadline);
        assert!(start.elapsed() <= Duration::from_millis(500) + STEP, "{:?}", start.elapsed());
        assert_eq!(within(long).await.expect("the new deadline kept").unwrap(), Cutoff::LeaseLost);
        assert_eq!(start.elapsed(), Duration::from_secs(2), "cut off at the new deadline itself");
    }

    /// `--write-deadline` is seen at the look after it, within a step.
    #[tokio::test(start_paused = true)]
    async fn the_write_deadline_takes_effect_within_a_step() {
        let (_tx, safe, _task) = kept(holding(5, Duration::from_secs(600))).await;
        let start = Instant::now();
        let why = safe.guard(Token::new(5).unwrap(), start + Duration::from_millis(1_030)).await;
        assert_eq!(why, Cutoff::Deadline);
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(1_030) && took <= Duration::from_millis(1_030) + STEP, "{took:?}");
    }
}
