//! The demo's "process freeze" as a lease-backend wrapper: while frozen,
//! every call to the backend waits for the thaw, as if the sidecar's process
//! were paused (no keep-alive leaves it). It lives here so the core keeper
//! has no demo-only paths.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use tokio::time::Instant;

use crate::lease::{Granted, LeaseBackend, LeaseError};

pub struct Freezable {
    inner: Arc<dyn LeaseBackend>,
    until: parking_lot::Mutex<Option<Instant>>,
}

impl Freezable {
    pub fn new(inner: Arc<dyn LeaseBackend>) -> Freezable {
        Freezable { inner, until: parking_lot::Mutex::new(None) }
    }

    /// Every call waits until `d` from now.
    pub fn freeze(&self, d: Duration) {
        *self.until.lock() = Some(Instant::now() + d);
    }

    async fn thawed(&self) {
        loop {
            let until = *self.until.lock();
            match until {
                Some(u) if Instant::now() < u => tokio::time::sleep_until(u).await,
                _ => return,
            }
        }
    }
}

impl LeaseBackend for Freezable {
    fn grant(&self, ttl: Duration) -> BoxFuture<'_, Result<Granted, LeaseError>> {
        async move {
            self.thawed().await;
            self.inner.grant(ttl).await
        }
        .boxed()
    }
    fn keep_alive(&self, lease: i64) -> BoxFuture<'_, Result<Option<Duration>, LeaseError>> {
        async move {
            self.thawed().await;
            self.inner.keep_alive(lease).await
        }
        .boxed()
    }
    fn revoke(&self, lease: i64) -> BoxFuture<'_, Result<(), LeaseError>> {
        async move {
            self.thawed().await;
            self.inner.revoke(lease).await
        }
        .boxed()
    }
    fn enqueue<'a>(&'a self, key: &'a str, value: &'a str, lease: i64) -> BoxFuture<'a, Result<i64, LeaseError>> {
        async move {
            self.thawed().await;
            self.inner.enqueue(key, value, lease).await
        }
        .boxed()
    }
    fn wait_turn<'a>(&'a self, prefix: &'a str, key: &'a str, rev: i64) -> BoxFuture<'a, Result<(), LeaseError>> {
        async move {
            self.thawed().await;
            self.inner.wait_turn(prefix, key, rev).await
        }
        .boxed()
    }
    fn watch_gone<'a>(&'a self, key: &'a str, rev: i64) -> BoxFuture<'a, Result<(), LeaseError>> {
        async move {
            self.thawed().await;
            self.inner.watch_gone(key, rev).await
        }
        .boxed()
    }
    fn key_revision<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<i64>, LeaseError>> {
        async move {
            self.thawed().await;
            self.inner.key_revision(key).await
        }
        .boxed()
    }
}
