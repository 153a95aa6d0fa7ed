//! The same behavioural checks against both lease backends: the embedded one
//! and a real etcd. Real time, short TTLs.

mod support;

use std::sync::Arc;
use std::time::Duration;

use fencegate::lease::deadline::Stamp;
use fencegate::lease::embedded::Embedded;
use fencegate::lease::etcd::{EtcdBackend, EtcdOptions};
use fencegate::lease::keeper::{Keeper, KeeperConfig, LockStatus, Phase};
use fencegate::lease::{queue_prefix, LeaseBackend, LeaseError, NoFence};
use tokio::sync::watch;

fn cfg(holder: &str) -> KeeperConfig {
    KeeperConfig::new("suite".parse().unwrap(), holder, Duration::from_secs(2))
}

async fn until(rx: &mut watch::Receiver<LockStatus>, p: Phase) -> LockStatus {
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| s.phase == p))
        .await
        .expect("phase in time")
        .unwrap()
        .clone()
}

async fn suite(b: Arc<dyn LeaseBackend>) {
    // Primitive level: grant, enqueue, queue order, revoke.
    let l1 = b.grant(Duration::from_secs(2)).await.unwrap();
    let l2 = b.grant(Duration::from_secs(2)).await.unwrap();
    assert!(l1.ttl >= Duration::from_secs(2));
    let prefix = queue_prefix("/suite", "q");
    let (k1, k2) = (format!("{prefix}{:016x}", l1.id), format!("{prefix}{:016x}", l2.id));
    let r1 = b.enqueue(&k1, "one", l1.id).await.unwrap();
    assert_eq!(b.enqueue(&k1, "one", l1.id).await.unwrap(), r1, "enqueue is idempotent");
    let r2 = b.enqueue(&k2, "two", l2.id).await.unwrap();
    assert!(r2 > r1);
    tokio::time::timeout(Duration::from_secs(2), b.wait_turn(&prefix, &k1, r1))
        .await
        .expect("first in line holds")
        .unwrap();
    let second = tokio::time::timeout(Duration::from_millis(500), b.wait_turn(&prefix, &k2, r2)).await;
    assert!(second.is_err(), "second in line waits");
    b.revoke(l1.id).await.unwrap();
    tokio::time::timeout(Duration::from_secs(2), b.watch_gone(&k1, r1)).await.expect("revoke deletes the key").unwrap();
    tokio::time::timeout(Duration::from_secs(2), b.wait_turn(&prefix, &k2, r2))
        .await
        .expect("next in line holds")
        .unwrap();
    assert_eq!(b.keep_alive(l1.id).await.unwrap(), None, "a revoked lease is gone");
    assert!(b.keep_alive(l2.id).await.unwrap().is_some());
    assert!(matches!(b.enqueue(&format!("{prefix}x"), "x", l1.id).await, Err(LeaseError::Gone(_))));
    b.revoke(l2.id).await.unwrap();

    // An unrenewed lease expires on its own and its key goes with it.
    let l3 = b.grant(Duration::from_secs(2)).await.unwrap();
    let k3 = format!("{prefix}{:016x}", l3.id);
    let r3 = b.enqueue(&k3, "three", l3.id).await.unwrap();
    tokio::time::timeout(Duration::from_secs(8), b.watch_gone(&k3, r3))
        .await
        .expect("expired lease deletes its key")
        .unwrap();

    // Keeper level: one holder, the other takes over with a higher token,
    // and a restarted candidate gets a higher token still.
    let a = Keeper::spawn(b.clone(), Arc::new(NoFence), cfg("a"));
    let mut ra = a.subscribe();
    let sa = until(&mut ra, Phase::Holding).await;
    let c = Keeper::spawn(b.clone(), Arc::new(NoFence), cfg("c"));
    let mut rc = c.subscribe();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(rc.borrow().phase, Phase::Campaigning, "only one holder");
    assert!(a.status().write_token(Stamp::now()).is_some(), "keep-alives keep the lock");
    a.shutdown().await;
    let sc = until(&mut rc, Phase::Holding).await;
    assert!(sc.token > sa.token);
    c.shutdown().await;
    let a2 = Keeper::spawn(b.clone(), Arc::new(NoFence), cfg("a"));
    let mut ra2 = a2.subscribe();
    let sa2 = until(&mut ra2, Phase::Holding).await;
    assert!(sa2.token > sc.token, "tokens grow across restarts");
    a2.shutdown().await;
}

#[tokio::test]
async fn embedded_backend_passes_the_suite() {
    suite(Arc::new(Embedded::new())).await;
}

#[tokio::test]
async fn etcd_backend_passes_the_suite() {
    let etcd = support::Etcd::start();
    let b = EtcdBackend::new(EtcdOptions {
        endpoints: vec![etcd.client_url.clone()],
        call_timeout: Duration::from_secs(2),
        ..Default::default()
    });
    suite(Arc::new(b)).await;
}
