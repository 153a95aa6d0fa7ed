//! An in-process lease backend with etcd's semantics (a global revision,
//! leases with TTLs, keys bound to leases), for the demo and unit tests.
//!
//! Time is `tokio::time`, so tests can pause it. Expiry is lazy: every call
//! first expires overdue leases, and waiters sleep until the next expiry or
//! until the revision changes (published on a `watch` channel), whichever
//! comes first.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{Granted, LeaseBackend, LeaseError};

#[derive(Debug)]
struct LeaseRec {
    ttl: Duration,
    expires: Instant,
}

#[derive(Debug)]
struct KeyRec {
    create_rev: i64,
    lease: i64,
}

#[derive(Debug, Default)]
struct St {
    rev: i64,
    next_lease: i64,
    leases: HashMap<i64, LeaseRec>,
    keys: BTreeMap<String, KeyRec>,
}

impl St {
    fn delete_lease(&mut self, id: i64) -> bool {
        self.leases.remove(&id);
        let before = self.keys.len();
        self.keys.retain(|_, k| k.lease != id);
        if self.keys.len() != before {
            self.rev += 1;
            true
        } else {
            false
        }
    }

    fn expire(&mut self, now: Instant) -> bool {
        let overdue: Vec<i64> = self.leases.iter().filter(|(_, l)| l.expires <= now).map(|(id, _)| *id).collect();
        overdue.into_iter().fold(false, |changed, id| self.delete_lease(id) | changed)
    }

    fn next_expiry(&self) -> Option<Instant> {
        self.leases.values().map(|l| l.expires).min()
    }
}

/// The in-process backend. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Embedded {
    st: Mutex<St>,
    rev: watch::Sender<i64>,
}

impl Default for Embedded {
    fn default() -> Self {
        Embedded { st: Mutex::new(St { rev: 1, next_lease: 0x1000, ..Default::default() }), rev: watch::Sender::new(1) }
    }
}

impl Embedded {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `f` on the state after expiring overdue leases; publishes the
    /// revision if anything changed.
    fn with<T>(&self, f: impl FnOnce(&mut St) -> T) -> T {
        let mut st = self.st.lock();
        let before = st.rev;
        st.expire(Instant::now());
        let out = f(&mut st);
        if st.rev != before {
            self.rev.send_replace(st.rev);
        }
        out
    }

    /// Waits until `check` returns `Some`, re-checking on every revision
    /// change and at every lease expiry.
    async fn wait_until<T>(&self, mut check: impl FnMut(&St) -> Option<T>) -> T {
        let mut rx = self.rev.subscribe();
        loop {
            rx.mark_unchanged();
            let (out, next) = self.with(|st| (check(st), st.next_expiry()));
            if let Some(v) = out {
                return v;
            }
            let next = next.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                _ = rx.changed() => {}
                _ = tokio::time::sleep_until(next) => {}
            }
        }
    }

    /// The current revision (the demo prints it).
    pub fn revision(&self) -> i64 {
        self.with(|st| st.rev)
    }

    /// Deletes `key` as an operator (or another client) would; true if it existed.
    pub fn delete_key(&self, key: &str) -> bool {
        self.with(|st| {
            let existed = st.keys.remove(key).is_some();
            if existed {
                st.rev += 1;
            }
            existed
        })
    }

    /// Sets the revision counter back, as an etcd restored from an old
    /// snapshot would be (tests of tokens going backwards).
    pub fn rewind_revision(&self, rev: i64) {
        self.with(|st| st.rev = rev);
    }
}

impl LeaseBackend for Embedded {
    fn grant(&self, ttl: Duration) -> BoxFuture<'_, Result<Granted, LeaseError>> {
        let g = self.with(|st| {
            st.next_lease += 1;
            let id = st.next_lease;
            st.leases.insert(id, LeaseRec { ttl, expires: crate::duration::after(ttl) });
            Granted { id, ttl }
        });
        async move { Ok(g) }.boxed()
    }

    fn keep_alive(&self, lease: i64) -> BoxFuture<'_, Result<Option<Duration>, LeaseError>> {
        let r = self.with(|st| {
            st.leases.get_mut(&lease).map(|l| {
                l.expires = crate::duration::after(l.ttl);
                l.ttl
            })
        });
        async move { Ok(r) }.boxed()
    }

    fn revoke(&self, lease: i64) -> BoxFuture<'_, Result<(), LeaseError>> {
        self.with(|st| st.delete_lease(lease));
        async { Ok(()) }.boxed()
    }

    fn enqueue<'a>(&'a self, key: &'a str, _value: &'a str, lease: i64) -> BoxFuture<'a, Result<i64, LeaseError>> {
        let r = self.with(|st| {
            if let Some(k) = st.keys.get(key) {
                return Ok(k.create_rev);
            }
            if !st.leases.contains_key(&lease) {
                return Err(LeaseError::Gone(format!("lease {lease:x} expired")));
            }
            st.rev += 1;
            let create_rev = st.rev;
            st.keys.insert(key.to_owned(), KeyRec { create_rev, lease });
            Ok(create_rev)
        });
        async move { r }.boxed()
    }

    fn wait_turn<'a>(&'a self, prefix: &'a str, key: &'a str, rev: i64) -> BoxFuture<'a, Result<(), LeaseError>> {
        async move {
            self.wait_until(|st| {
                if !st.keys.contains_key(key) {
                    return Some(Err(LeaseError::Gone(format!("{key} was deleted"))));
                }
                let older = st
                    .keys
                    .range(prefix.to_owned()..)
                    .take_while(|(k, _)| k.starts_with(prefix))
                    .any(|(_, k)| k.create_rev < rev);
                (!older).then_some(Ok(()))
            })
            .await
        }
        .boxed()
    }

    fn key_revision<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<i64>, LeaseError>> {
        let r = self.with(|st| st.keys.get(key).map(|k| k.create_rev));
        async move { Ok(r) }.boxed()
    }

    fn watch_gone<'a>(&'a self, key: &'a str, rev: i64) -> BoxFuture<'a, Result<(), LeaseError>> {
        async move {
            self.wait_until(|st| match st.keys.get(key) {
                Some(k) if k.create_rev == rev => None,
                _ => Some(()),
            })
            .await;
            Ok(())
        }
        .boxed()
    }
}
