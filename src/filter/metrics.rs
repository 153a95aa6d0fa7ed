//! The filter's Prometheus collector: per-lock figures read at scrape time,
//! and the one place refusals are counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Weak;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;

use super::admission::{AdmitError, LockEntry, Locks};
use super::error::FilterError;
use super::Filter;
use crate::metrics;
use crate::token::LockName;

/// Refusals that happen before a lock is known (bad headers, bad paths).
#[derive(Debug, Default)]
pub struct Refusals {
    by_reason: dashmap::DashMap<&'static str, AtomicU64>,
}

impl Refusals {
    /// Counts one refusal: on the lock's own counters when the refusal is
    /// about a lock, else by reason.
    pub fn count(&self, locks: &Locks, lock: Option<&LockName>, e: &FilterError) {
        let stats = lock.map(|l| locks.entry(l));
        let counter = match (&stats, e) {
            (Some(s), FilterError::Admit(AdmitError::Stale { .. } | AdmitError::Superseded { .. })) => {
                &s.stats.refused_stale
            }
            (Some(s), FilterError::Admit(AdmitError::Unverified { .. })) => &s.stats.refused_unverified,
            (Some(s), FilterError::LockMismatch { .. }) => &s.stats.refused_mismatch,
            (Some(s), FilterError::Aborted(_)) => &s.stats.aborted,
            (Some(s), FilterError::Admit(_)) => &s.stats.refused_unavailable,
            _ => {
                self.by_reason.entry(e.reason()).or_default().fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Reads per-lock atomics at scrape time.
#[derive(Debug)]
pub struct FilterCollector(pub Weak<Filter>);

/// One lock's figures as read at scrape time.
#[derive(Default)]
struct LockFigures {
    admitted: u64,
    stale: u64,
    mismatch: u64,
    unavailable: u64,
    unverified: u64,
    aborted: u64,
    highest: u64,
    barrier_waits: u64,
    barrier_wait_us: u64,
    inflight: u64,
}

impl LockFigures {
    fn read(e: &LockEntry) -> Self {
        let ld = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let (highest, _, _, inflight) = e.snapshot();
        LockFigures {
            admitted: ld(&e.stats.admitted),
            stale: ld(&e.stats.refused_stale),
            mismatch: ld(&e.stats.refused_mismatch),
            unavailable: ld(&e.stats.refused_unavailable),
            unverified: ld(&e.stats.refused_unverified),
            aborted: ld(&e.stats.aborted),
            highest,
            barrier_waits: ld(&e.stats.barrier_waits),
            barrier_wait_us: ld(&e.stats.barrier_wait_us),
            inflight: inflight.values().sum::<usize>() as u64,
        }
    }

    fn add(&mut self, o: &LockFigures) {
        self.admitted += o.admitted;
        self.stale += o.stale;
        self.mismatch += o.mismatch;
        self.unavailable += o.unavailable;
        self.unverified += o.unverified;
        self.aborted += o.aborted;
        self.highest = self.highest.max(o.highest);
        self.barrier_waits += o.barrier_waits;
        self.barrier_wait_us += o.barrier_wait_us;
        self.inflight += o.inflight;
    }
}

/// `fencegate_filter_verifications_total{outcome}` (only with a verifier).
fn encode_verifications(enc: &mut DescriptorEncoder, v: &super::verify::Verifier) -> std::fmt::Result {
    metrics::encode_counters(
        enc,
        "fencegate_filter_verifications",
        "Raises checked with etcd, by outcome (holder: admitted; not_holder: refused; unavailable: 503)",
        super::verify::OUTCOMES
            .iter()
            .zip(&v.outcomes)
            .map(|(o, n)| (vec![("outcome", o.to_string())], n.load(Ordering::Relaxed))),
    )
}

impl Collector for FilterCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let Some(f) = self.0.upgrade() else { return Ok(()) };
        let locks = f.locks.all();
        metrics::encode_gauge(
            &mut enc,
            "fencegate_filter_locks",
            "Locks the filter has state for",
            locks.len() as i64,
        )?;
        // Per-lock series up to the limit; above it, totals under lock="*" so
        // a scrape stays small with thousands of locks.
        let rows: Vec<(String, LockFigures)> = if locks.len() <= f.cfg.metrics_lock_limit {
            locks.iter().map(|e| (e.name.to_string(), LockFigures::read(e))).collect()
        } else {
            let mut all = LockFigures::default();
            locks.iter().for_each(|e| all.add(&LockFigures::read(e)));
            vec![("*".to_string(), all)]
        };
        let lk = |l: &str| vec![("lock", l.to_string())];
        metrics::encode_counters(
            &mut enc,
            "fencegate_filter_writes_admitted",
            "Writes admitted and forwarded to the store",
            rows.iter().map(|(l, x)| (lk(l), x.admitted)),
        )?;
        let mut refused = Vec::new();
        for (l, x) in &rows {
            for (reason, v) in [
                ("stale", x.stale),
                ("lock_mismatch", x.mismatch),
                ("unavailable", x.unavailable),
                ("unverified", x.unverified),
                ("aborted", x.aborted),
            ] {
                refused.push((vec![("lock", l.clone()), ("reason", reason.to_string())], v));
            }
        }
        for r in f.refusals.by_reason.iter() {
            refused.push((
                vec![("lock", String::new()), ("reason", r.key().to_string())],
                r.value().load(Ordering::Relaxed),
            ));
        }
        metrics::encode_counters(&mut enc, "fencegate_filter_writes_refused", "Writes refused, by reason", refused)?;
        metrics::encode_gauges(
            &mut enc,
            "fencegate_filter_highest_token",
            "Highest fencing token admitted per lock (the maximum under lock=\"*\")",
            rows.iter().map(|(l, x)| (lk(l), x.highest as i64)),
        )?;
        metrics::encode_counters(
            &mut enc,
            "fencegate_filter_barrier_waits",
            "Writes or fences that waited at the epoch barrier",
            rows.iter().map(|(l, x)| (lk(l), x.barrier_waits)),
        )?;
        metrics::encode_counters(
            &mut enc,
            "fencegate_filter_barrier_wait_microseconds",
            "Total time spent waiting at the epoch barrier",
            rows.iter().map(|(l, x)| (lk(l), x.barrier_wait_us)),
        )?;
        metrics::encode_gauges(
            &mut enc,
            "fencegate_filter_inflight_writes",
            "Writes forwarded and not yet answered, per lock",
            rows.iter().map(|(l, x)| (lk(l), x.inflight as i64)),
        )?;
        if let Some(v) = f.locks.verifier() {
            encode_verifications(&mut enc, v)?;
        }
        match &f.shared {
            Some(s) => s.stats.encode(&mut enc, s.writable()),
            None => Ok(()),
        }
    }
}
