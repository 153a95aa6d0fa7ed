//! What a replica counts of the shared marks, for `/metrics` and
//! `/v1/locks`: raises (how many, how long, how many now waiting and on
//! whom, how many only ended because a replica's registration expired) and
//! the replica set with every replica's acknowledged token per lock, as last
//! read from etcd (read at scrape time, see [`super::Shared::refresh_view`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use prometheus_client::encoding::DescriptorEncoder;

use crate::metrics;

/// Counters and the last view of the replica set.
#[derive(Debug)]
pub struct SharedStats {
    /// Raises that completed (every live replica acknowledged), timed from
    /// the CAS to the last acknowledgement: its count is the number of
    /// raises, its sum their total time.
    pub raise_latency: metrics::LatencyHistogram,
    /// Raises now waiting for some replica's acknowledgement.
    pub raises_waiting: AtomicU64,
    /// Raises that completed only because a replica that had not
    /// acknowledged lost its registration: they waited on a dead replica.
    pub raises_expired: AtomicU64,
    pub raise_timeouts: AtomicU64,
    pub keepalive_failures: AtomicU64,
    /// Replica id -> raises now waiting on its acknowledgement.
    waiting_on: Mutex<BTreeMap<String, u64>>,
    /// Last read of the replica set and acknowledgements.
    pub view: Mutex<View>,
}

impl Default for SharedStats {
    fn default() -> Self {
        SharedStats {
            raise_latency: metrics::LatencyHistogram::default(),
            raises_waiting: AtomicU64::new(0),
            raises_expired: AtomicU64::new(0),
            raise_timeouts: AtomicU64::new(0),
            keepalive_failures: AtomicU64::new(0),
            waiting_on: Mutex::new(BTreeMap::new()),
            view: Mutex::new(View::default()),
        }
    }
}

/// The replica set and acknowledgements as read at one etcd revision.
#[derive(Clone, Debug, Default)]
pub struct View {
    /// False until a read succeeded.
    pub read: bool,
    pub replicas: Vec<String>,
    /// Lock -> replica -> acknowledged token. Empty when there were more
    /// acknowledgements than a scrape should carry (see the metrics limit).
    pub acks: BTreeMap<String, BTreeMap<String, u64>>,
}

impl SharedStats {
    /// Replicas that raises are waiting on now, and how many raises each.
    pub fn waiting_on(&self) -> BTreeMap<String, u64> {
        self.waiting_on.lock().clone()
    }

    /// The replica series of `/metrics`.
    pub fn encode(&self, enc: &mut DescriptorEncoder, writable: bool) -> std::fmt::Result {
        let ld = |v: &AtomicU64| v.load(Ordering::Relaxed);
        metrics::encode_gauge(
            enc,
            "fencegate_filter_replica_writable",
            "1 while this replica may forward writes (registration confirmed and marks watch up)",
            writable as i64,
        )?;
        let view = self.view.lock().clone();
        if view.read {
            metrics::encode_gauge(
                enc,
                "fencegate_filter_replicas",
                "Replicas registered in etcd, as read at this scrape",
                view.replicas.len() as i64,
            )?;
        }
        metrics::encode_gauges(
            enc,
            "fencegate_filter_replica_acked_token",
            "Highest token each replica has acknowledged (refuses everything below, older writes drained), per lock",
            view.acks.iter().flat_map(|(lock, per)| {
                per.iter().map(move |(r, t)| (vec![("lock", lock.clone()), ("replica", r.clone())], *t as i64))
            }),
        )?;
        metrics::encode_counter(
            enc,
            "fencegate_filter_mark_raises",
            "Mark raises acknowledged by every live replica",
            self.raise_latency.count(),
        )?;
        let counters = [
            (
                "fencegate_filter_mark_raises_expired",
                "Raises that completed only when a replica's registration went away: expired (they waited on a dead replica) or revoked by its graceful exit",
                &self.raises_expired,
            ),
            (
                "fencegate_filter_mark_raise_timeouts",
                "Raises that gave up waiting for acknowledgements",
                &self.raise_timeouts,
            ),
            (
                "fencegate_filter_replica_keepalive_failures",
                "Registration keep-alives that failed or timed out",
                &self.keepalive_failures,
            ),
        ];
        for (name, help, v) in counters {
            metrics::encode_counter(enc, name, help, ld(v))?;
        }
        metrics::encode_gauge(
            enc,
            "fencegate_filter_mark_raises_waiting",
            "Raises now waiting for acknowledgements",
            ld(&self.raises_waiting) as i64,
        )?;
        metrics::encode_gauges(
            enc,
            "fencegate_filter_mark_raises_waiting_on",
            "Raises now waiting on this replica's acknowledgement (a dead replica shows here until it expires)",
            self.waiting_on().into_iter().map(|(r, n)| (vec![("replica", r)], n as i64)),
        )
    }
}

/// One raise while it waits for acknowledgements: counted in
/// `raises_waiting` and under each replica it waits on, and uncounted when
/// dropped, so a raise whose caller went away is not counted forever.
pub struct Waiting<'a> {
    stats: &'a SharedStats,
    on: BTreeSet<String>,
    ever_missing: BTreeSet<String>,
}

impl<'a> Waiting<'a> {
    pub fn new(stats: &'a SharedStats) -> Self {
        stats.raises_waiting.fetch_add(1, Ordering::Relaxed);
        Waiting { stats, on: BTreeSet::new(), ever_missing: BTreeSet::new() }
    }

    /// The replicas this raise waits on now.
    pub fn set_missing(&mut self, missing: &[String]) {
        let now: BTreeSet<String> = missing.iter().cloned().collect();
        let mut w = self.stats.waiting_on.lock();
        for gone in self.on.difference(&now) {
            decrement(&mut w, gone);
        }
        for new in now.difference(&self.on) {
            *w.entry(new.clone()).or_default() += 1;
        }
        drop(w);
        self.ever_missing.extend(now.iter().cloned());
        self.on = now;
    }

    /// True if a replica this raise waited on is no longer registered:
    /// the raise completed by its expiry, not by its acknowledgement.
    pub fn ended_by_expiry(&self, registered: &BTreeMap<String, u64>) -> bool {
        self.ever_missing.iter().any(|r| !registered.contains_key(r))
    }
}

fn decrement(w: &mut BTreeMap<String, u64>, r: &str) {
    if let Some(n) = w.get_mut(r) {
        *n -= 1;
        if *n == 0 {
            w.remove(r);
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.stats.raises_waiting.fetch_sub(1, Ordering::Relaxed);
        let mut w = self.stats.waiting_on.lock();
        for r in &self.on {
            decrement(&mut w, r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn waiting_counts_follow_the_raise_and_end_with_it() {
        let s = SharedStats::default();
        {
            let mut a = Waiting::new(&s);
            let mut b = Waiting::new(&s);
            a.set_missing(&ids(&["r2", "r3"]));
            b.set_missing(&ids(&["r3"]));
            assert_eq!(s.waiting_on(), BTreeMap::from([("r2".into(), 1), ("r3".into(), 2)]));
            a.set_missing(&ids(&["r3"]));
            assert_eq!(s.waiting_on(), BTreeMap::from([("r3".into(), 2)]));
            assert_eq!(s.raises_waiting.load(Ordering::Relaxed), 2);
            // r2 acknowledged; r3 expired.
            let registered = BTreeMap::from([("r1".into(), 7), ("r2".into(), 7)]);
            assert!(a.ended_by_expiry(&registered));
            let all = BTreeMap::from([("r1".into(), 7), ("r2".into(), 7), ("r3".into(), 7)]);
            assert!(!b.ended_by_expiry(&all));
        }
        assert!(s.waiting_on().is_empty());
        assert_eq!(s.raises_waiting.load(Ordering::Relaxed), 0);
    }
}
