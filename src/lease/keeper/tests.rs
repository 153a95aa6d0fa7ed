//! The keeper's decisions on a paused clock, over the embedded backend
//! wrapped to misbehave the way etcd can (stalled keep-alives, a silent
//! watch, a slow revoke).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use tokio::time::Instant;

use super::*;
use crate::lease::deadline::Stamp;
use crate::lease::embedded::Embedded;
use crate::lease::{queue_prefix, Fencer, Granted, LeaseBackend, LeaseError, NoFence, Outcome};
use crate::token::LockName;

fn cfg(holder: &str) -> KeeperConfig {
    KeeperConfig::new("l".parse().unwrap(), holder, Duration::from_secs(3))
}

/// Waits (at most a virtual minute) for phase `p`.
async fn until_phase(rx: &mut watch::Receiver<LockStatus>, p: Phase) -> LockStatus {
    let r = tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|s| s.phase == p)).await;
    r.unwrap_or_else(|_| panic!("no {p:?} within a minute")).unwrap().clone()
}

fn now() -> Stamp {
    Stamp::now()
}

/// The embedded backend, with switches for etcd's misbehaviours.
#[derive(Default)]
struct Flaky {
    inner: Arc<Embedded>,
    stall_keepalives: AtomicBool,
    silent_watches: AtomicBool,
    slow_revoke: AtomicBool,
}

impl LeaseBackend for Flaky {
    fn grant(&self, ttl: Duration) -> BoxFuture<'_, Result<Granted, LeaseError>> {
        self.inner.grant(ttl)
    }
    fn keep_alive(&self, lease: i64) -> BoxFuture<'_, Result<Option<Duration>, LeaseError>> {
        if self.stall_keepalives.load(Ordering::SeqCst) {
            return std::future::pending().boxed();
        }
        self.inner.keep_alive(lease)
    }
    fn revoke(&self, lease: i64) -> BoxFuture<'_, Result<(), LeaseError>> {
        let slow = self.slow_revoke.load(Ordering::SeqCst);
        async move {
            if slow {
                tokio::time::sleep(Duration::from_millis(1900)).await;
            }
            self.inner.revoke(lease).await
        }
        .boxed()
    }
    fn enqueue<'a>(&'a self, key: &'a str, value: &'a str, lease: i64) -> BoxFuture<'a, Result<i64, LeaseError>> {
        self.inner.enqueue(key, value, lease)
    }
    fn wait_turn<'a>(&'a self, prefix: &'a str, key: &'a str, rev: i64) -> BoxFuture<'a, Result<(), LeaseError>> {
        self.inner.wait_turn(prefix, key, rev)
    }
    fn watch_gone<'a>(&'a self, key: &'a str, rev: i64) -> BoxFuture<'a, Result<(), LeaseError>> {
        if self.silent_watches.load(Ordering::SeqCst) {
            return std::future::pending().boxed();
        }
        self.inner.watch_gone(key, rev)
    }
    fn key_revision<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<i64>, LeaseError>> {
        self.inner.key_revision(key)
    }
}

fn key_of(s: &LockStatus) -> String {
    format!("{}{:016x}", queue_prefix("/fencegate/locks", "l"), s.lease_id.expect("a lease"))
}

fn spawn(b: &Arc<Flaky>, holder: &str) -> Keeper {
    Keeper::spawn(b.clone(), Arc::new(NoFence), cfg(holder))
}

/// Another view of the same backend, with switches of its own.
fn beside(b: &Arc<Flaky>) -> Arc<Flaky> {
    Arc::new(Flaky { inner: b.inner.clone(), ..Default::default() })
}

/// Keeper `a` holding the lock (with its status), and keeper `c` queued
/// behind it on its own (well-behaved) view of the backend.
async fn holder_and_waiter(b: &Arc<Flaky>) -> (Keeper, LockStatus, Keeper, watch::Receiver<LockStatus>) {
    let a = spawn(b, "a");
    let sa = until_phase(&mut a.subscribe(), Phase::Holding).await;
    let c = spawn(&beside(b), "c");
    let rc = c.subscribe();
    tokio::time::sleep(Duration::from_millis(100)).await;
    (a, sa, c, rc)
}

#[tokio::test(start_paused = true)]
async fn one_holds_the_other_waits_then_takes_over_with_a_higher_token() {
    let b = Arc::new(Flaky::default());
    let (a, sa, _c, mut rc) = holder_and_waiter(&b).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(rc.borrow().phase, Phase::Campaigning, "only one holder");
    assert!(a.status().write_token(now()).is_some(), "keep-alives keep a holding");
    a.shutdown().await;
    let sc = until_phase(&mut rc, Phase::Holding).await;
    assert!(sc.token > sa.token);
}

#[tokio::test(start_paused = true)]
async fn a_stalled_holder_self_fences_before_its_lease_can_expire() {
    let b = Arc::new(Flaky::default());
    let (a, sa, _c, mut rc) = holder_and_waiter(&b).await;
    let mut ra = a.subscribe();
    b.stall_keepalives.store(true, Ordering::SeqCst);
    let sc = until_phase(&mut rc, Phase::Holding).await;
    let takeover = Instant::now();
    let a_now = ra.borrow_and_update().clone();
    assert_eq!(a_now.write_token(now()), None, "a's deadline has passed by the takeover");
    assert!(sc.token > sa.token);
    // a noticed on its own, at least the margin before c could take over.
    assert!(
        ra.borrow().phase != Phase::Holding
            || a_now.valid_until.unwrap().mono() + Duration::from_millis(250) <= takeover
    );
}

#[tokio::test(start_paused = true)]
async fn release_hands_over_and_campaigns_again() {
    let b = Arc::new(Flaky::default());
    let (a, _, _c, mut rc) = holder_and_waiter(&b).await;
    a.release();
    until_phase(&mut rc, Phase::Holding).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(a.status().phase, Phase::Campaigning, "a queued again behind c");
    assert_eq!(a.stats.losses.load(Ordering::Relaxed), 1);
}

/// A release asked for while queued (answered `released: false`: nothing is
/// held) is not kept for later: winning afterwards, the keeper holds.
#[tokio::test(start_paused = true)]
async fn a_release_asked_for_while_queued_does_not_step_down_after_winning() {
    let b = Arc::new(Flaky::default());
    let (a, _, c, mut rc) = holder_and_waiter(&b).await;
    assert_eq!(rc.borrow().phase, Phase::Campaigning);
    c.release();
    tokio::time::sleep(Duration::from_millis(100)).await;
    a.shutdown().await;
    until_phase(&mut rc, Phase::Holding).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(c.status().phase, Phase::Holding, "still holding: the release was about no lock held");
    assert_eq!(c.stats.losses.load(Ordering::Relaxed), 0);
}

/// A release of a token that is no longer the keeper's (the app saw it,
/// then the lock was lost and won again before the command was read) does
/// not give up the new one.
#[tokio::test(start_paused = true)]
async fn a_release_of_an_earlier_token_does_not_end_a_later_round() {
    let b = Arc::new(Flaky::default());
    let a = spawn(&b, "a");
    let mut ra = a.subscribe();
    let first = until_phase(&mut ra, Phase::Holding).await.token.unwrap();
    a.release();
    let second = tokio::time::timeout(
        Duration::from_secs(60),
        ra.wait_for(|s| s.phase == Phase::Holding && s.token != Some(first)),
    )
    .await
    .expect("held again")
    .unwrap()
    .token
    .unwrap();
    a.release_token(first);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!((a.status().phase, a.status().token), (Phase::Holding, Some(second)), "the later round goes on");
    a.release_token(second);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(a.status().token, None, "a release of the current token is honoured");
}

/// Issue 11, item 2: on release the token and deadline go first, then the
/// (slow) revoke; no write may carry the token meanwhile.
#[tokio::test(start_paused = true)]
async fn on_release_the_token_is_withdrawn_before_the_revoke() {
    let b = Arc::new(Flaky::default());
    let a = spawn(&b, "a");
    let sa = until_phase(&mut a.subscribe(), Phase::Holding).await;
    b.slow_revoke.store(true, Ordering::SeqCst);
    a.release();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let key = key_of(&sa);
    assert!(b.inner.key_revision(&key).await.unwrap().is_some(), "the revoke is still under way");
    assert_eq!(a.status().write_token(now()), None, "but the token is already withdrawn");
    assert_eq!(a.status().token, None);
}

/// Issue 11, item 7: a holder whose watch is silent (parked on an etcd member
/// cut off from the quorum) still notices its key's deletion, by reading it
/// every keep-alive interval.
#[tokio::test(start_paused = true)]
async fn a_holder_with_a_silent_watch_notices_its_key_deleted() {
    let b = Arc::new(Flaky::default());
    b.silent_watches.store(true, Ordering::SeqCst);
    let a = spawn(&b, "a");
    let sa = until_phase(&mut a.subscribe(), Phase::Holding).await;
    assert!(b.inner.delete_key(&key_of(&sa)));
    let deleted = Instant::now();
    let mut ra = a.subscribe();
    // It may win again at once with a new lease: wait for the token to change.
    tokio::time::timeout(Duration::from_secs(30), ra.wait_for(|s| s.token != sa.token))
        .await
        .expect("noticed at all")
        .unwrap();
    assert!(
        deleted.elapsed() <= Duration::from_millis(1100),
        "noticed within one keep-alive interval: {:?}",
        deleted.elapsed()
    );
}

/// A fencer that deletes the holder's key while it fences (as an operator,
/// or a lease expiring in another member's view, might) and answers late.
struct DeletingFencer {
    backend: Arc<Flaky>,
    status: parking_lot::Mutex<Option<watch::Receiver<LockStatus>>>,
    targets: Vec<String>,
}

impl Fencer for DeletingFencer {
    fn targets(&self) -> &[String] {
        &self.targets
    }
    fn fence<'a>(&'a self, _: &'a str, _: &'a LockName, _: Token, _: Duration) -> BoxFuture<'a, Outcome> {
        async move {
            let s = self.status.lock().as_ref().expect("set").borrow().clone();
            self.backend.inner.delete_key(&key_of(&s));
            tokio::time::sleep(Duration::from_millis(500)).await;
            Outcome::Fenced
        }
        .boxed()
    }
}

/// Issue 11, item 8: a key deleted during the fencing phase ends the round;
/// the sidecar never holds with that token.
#[tokio::test(start_paused = true)]
async fn a_key_deleted_while_fencing_is_never_held() {
    let b = Arc::new(Flaky::default());
    b.silent_watches.store(true, Ordering::SeqCst); // the check before holding must catch it on its own
    let fencer = Arc::new(DeletingFencer { backend: b.clone(), status: Default::default(), targets: vec!["f".into()] });
    let a = Keeper::spawn(b.clone(), fencer.clone(), cfg("a"));
    let mut ra = a.subscribe();
    *fencer.status.lock() = Some(a.subscribe());
    until_phase(&mut ra, Phase::Fencing).await;
    let mut held = false;
    let end = Instant::now() + Duration::from_secs(2);
    while Instant::now() < end {
        held |= ra.borrow_and_update().phase == Phase::Holding;
        if tokio::time::timeout_at(end, ra.changed()).await.is_err() {
            break;
        }
    }
    assert!(!held, "held with a token whose key was deleted");
    assert!(a.stats.losses.load(Ordering::Relaxed) >= 1);
}

/// Issue 11, item 9: a token at or below one this sidecar already held
/// (etcd restored from an older snapshot) is never used.
#[tokio::test(start_paused = true)]
async fn a_token_never_goes_backwards() {
    let b = Arc::new(Flaky::default());
    b.inner.rewind_revision(100);
    let a = spawn(&b, "a");
    let mut ra = a.subscribe();
    let first = until_phase(&mut ra, Phase::Holding).await.token.unwrap();
    b.inner.rewind_revision(10); // "restored from an old snapshot"
    a.release();
    let s = until_phase(&mut ra, Phase::FencedOut).await;
    assert!(s.token.unwrap() < first);
    assert_eq!(s.fenced_out_highest, Some(first.get()));
    assert_eq!(s.write_token(now()), None, "writes are refused");
}

/// Issue 14, item 3: with `Rejoin::Manual` a lost lock is not campaigned
/// for again until the app rejoins, so a write the app retries from the lost
/// session cannot get a new, valid token. A release is not a loss: it
/// campaigns again on its own. The control, `Rejoin::Auto` (the old
/// behaviour), holds again by itself; on the old code the manual keeper
/// would hold again too, and this test fails.
#[tokio::test(start_paused = true)]
async fn after_a_loss_manual_rejoin_waits_for_the_app() {
    for rejoin in [Rejoin::Auto, Rejoin::Manual] {
        let b = Arc::new(Flaky::default());
        let a = Keeper::spawn(b.clone(), Arc::new(NoFence), KeeperConfig { rejoin, ..cfg("a") });
        let mut ra = a.subscribe();
        let first = until_phase(&mut ra, Phase::Holding).await;
        assert!(!a.rejoin(), "{rejoin:?}: no rejoin while holding");
        assert!(b.inner.delete_key(&key_of(&first)), "the lock is lost (key deleted)");
        tokio::time::sleep(Duration::from_secs(60)).await;
        let s = a.status();
        if rejoin == Rejoin::Auto {
            assert_eq!(s.phase, Phase::Holding, "the control holds again by itself");
            assert!(s.token > first.token);
            continue;
        }
        assert_eq!(s.phase, Phase::AwaitingRejoin, "a minute later, still waiting for the app");
        assert_eq!((s.token, s.write_token(now()), s.lease_id), (None, None, None));
        assert_eq!(a.stats.acquisitions.load(Ordering::Relaxed), 1, "never campaigned again");
        a.release(); // nothing held: not a rejoin
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(a.status().phase, Phase::AwaitingRejoin);
        assert!(a.rejoin(), "the app rejoins");
        let again = until_phase(&mut ra, Phase::Holding).await;
        assert!(again.token > first.token, "a new session, a higher token");
        // A release is the app's own doing: it campaigns again without a rejoin.
        a.release();
        until_phase(&mut ra, Phase::Campaigning).await;
        let third = until_phase(&mut ra, Phase::Holding).await;
        assert!(third.token > again.token);
        a.shutdown().await;
    }
}

#[test]
fn default_margin_is_a_tenth_with_a_floor() {
    assert_eq!(default_margin(Duration::from_secs(10)), Duration::from_secs(1));
    assert_eq!(default_margin(Duration::from_secs(1)), Duration::from_millis(200));
}
