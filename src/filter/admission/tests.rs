use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use super::*;
use crate::token::Token;

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

/// An aborted write stays in flight for its permit's grace after it stops,
/// a little after the abort's hold ends: the decision at the end of the hold
/// must not start a second hold. Before, it did, and the new holder waited
/// twice `abort_grace`.
#[tokio::test(start_paused = true)]
async fn an_abort_holds_once() {
    let c = cfg();
    let mut s = LockState::with_durable(5, None);
    let now = Instant::now();
    assert_eq!(s.admit(5, now, &c), Decision::Forward);
    assert_eq!(s.admit(6, now, &c), Decision::Persist);
    s.durable = 6;
    let aborted = now + c.drain_timeout;
    assert_eq!(s.admit(6, aborted, &c), Decision::Wait { until: aborted + c.abort_grace });
    // The hold is over, the aborted write's grace not yet: wait for it
    // (its release wakes the waiter) ...
    let held = aborted + c.abort_grace;
    assert!(matches!(s.admit(6, held, &c), Decision::Wait { .. }));
    // ... and once it is released, forward at once.
    s.release(5);
    assert_eq!(s.admit(6, held + Duration::from_millis(1), &c), Decision::Forward);
    // A newer raise aborting more writes holds again.
    assert_eq!(s.admit(7, held, &c), Decision::Persist);
    s.durable = 7;
    let t = held + c.drain_timeout;
    assert_eq!(s.admit(7, t, &c), Decision::Wait { until: t + c.abort_grace });
    assert!(s.is_aborted(6));
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
    let newer = tokio::spawn(async move { e2.admit_write(Token::new(2).unwrap(), far).await.map(|_| Instant::now()) });
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

/// Raises with many different tokens (forged, above the holder's) queued
/// behind one check share it: one etcd read, not one each in a row, and the
/// genuine holder's raise among them is not held up behind the rest (on the
/// old code, every distinct token made its own check: 33 here).
#[tokio::test(start_paused = true)]
async fn raises_with_many_tokens_share_a_check_asked_after_they_arrived() {
    let check = Arc::new(FakeCheck { holder: 9.into(), delay: Duration::from_millis(50), ..Default::default() });
    let locks = verified_locks(check.clone(), 5);
    let e = locks.entry(&"l".parse().unwrap());
    let far = Instant::now() + Duration::from_secs(60);
    let spawn = |t: u64| {
        let e = e.clone();
        tokio::spawn(async move { (t, e.admit_write(Token::new(t).unwrap(), far).await.map(Permit::complete)) })
    };
    // The first starts a check; the rest arrive while it runs.
    let mut tasks = vec![spawn(40)];
    tokio::time::sleep(Duration::from_millis(1)).await;
    tasks.extend((6..40u64).filter(|t| *t != 9).chain([9]).map(spawn));
    for task in tasks {
        let (t, r) = task.await.unwrap();
        match t {
            9 => assert!(r.is_ok(), "{r:?}"),
            t if t < 9 => assert!(matches!(r, Err(AdmitError::Superseded { holder: 9, .. })), "{t}: {r:?}"),
            t => assert!(matches!(r, Err(AdmitError::Unverified { holder: Some(9), .. })), "{t}: {r:?}"),
        }
    }
    assert!(check.calls.load(Ordering::Relaxed) <= 2, "{} checks", check.calls.load(Ordering::Relaxed));
    assert_eq!(e.snapshot().0, 9);
}

/// A check asked before a raise arrived does not answer for another token:
/// a new holder that won meanwhile is asked about afresh, not refused.
#[tokio::test(start_paused = true)]
async fn a_new_holder_arriving_during_a_check_is_asked_about_afresh() {
    let check = Arc::new(FakeCheck { holder: 9.into(), delay: Duration::from_millis(50), ..Default::default() });
    let locks = verified_locks(check.clone(), 5);
    let e = locks.entry(&"l".parse().unwrap());
    let far = Instant::now() + Duration::from_secs(60);
    let forged = {
        let e = e.clone();
        tokio::spawn(async move { e.admit_write(Token::new(11).unwrap(), far).await.map(Permit::complete) })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    check.holder.store(10, Ordering::Relaxed);
    let genuine = e.admit_write(Token::new(10).unwrap(), far).await.map(Permit::complete);
    assert!(genuine.is_ok(), "{genuine:?}");
    assert!(matches!(forged.await.unwrap(), Err(AdmitError::Unverified { .. })));
    assert_eq!(e.snapshot().0, 10);
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

/// A rule's lock leads to its entry without the registry's lookup, but only
/// to the entry of the registry asked: one kept from another registry (a
/// configuration shared by two filters) would admit writes against the
/// other filter's marks.
#[test]
fn a_named_lock_leads_to_the_asked_registrys_entry() {
    let name: LockName = "l".parse().unwrap();
    let named = NamedLock::new(name.clone());
    let kept = |n: &NamedLock| n.entry.get().cloned();
    let (a, b) = (Locks::new(None, [], cfg()), Locks::new(None, [], cfg()));
    let from_a = a.entry_of(&named);
    assert!(Arc::ptr_eq(&from_a, &a.entry(&name)));
    assert!(kept(&named).is_some_and(|e| Arc::ptr_eq(&e, &from_a)), "kept");
    assert!(Arc::ptr_eq(&a.entry_of(&named), &from_a));
    let from_b = b.entry_of(&named);
    assert!(Arc::ptr_eq(&from_b, &b.entry(&name)), "the other registry's own entry");
    assert!(!Arc::ptr_eq(&from_b, &from_a));
    assert!(Arc::ptr_eq(&a.entry_of(&named), &from_a), "still the first's");
    // A copy keeps no entry: the second registry's is found, and kept, first.
    let copy = named.clone();
    assert!(kept(&copy).is_none());
    assert!(Arc::ptr_eq(&b.entry_of(&copy), &from_b));
    assert!(kept(&copy).is_some_and(|e| Arc::ptr_eq(&e, &from_b)));
    assert!(Arc::ptr_eq(&a.entry_of(&copy), &from_a));
}
