//! Prometheus plumbing shared by the filter and the sidecar.
//!
//! Per-lock figures live in atomics beside each lock's state and are read by
//! a [`Collector`](prometheus_client::collector::Collector) at scrape time, so
//! the request path never takes a registry-wide lock to bump a labelled
//! counter.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Renders a registry in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut s = String::new();
    prometheus_client::encoding::text::encode(&mut s, registry).expect("writing to a String cannot fail");
    s
}

/// Upper bounds of the latency buckets: 100 µs doubling to about 13 s.
const LATENCY_BUCKETS: usize = 18;

/// Latency buckets from 100 µs to about 13 s.
pub fn latency_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, LATENCY_BUCKETS as u16))
}

/// Writes one counter family: `name{labels} value` for each row.
pub fn encode_counters<'a>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Vec<(&'a str, String)>, u64)>,
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, prometheus_client::metrics::MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Writes one gauge family.
pub fn encode_gauges<'a>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Vec<(&'a str, String)>, i64)>,
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, prometheus_client::metrics::MetricType::Gauge)?;
    for (labels, v) in rows {
        ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Writes one gauge without labels.
pub fn encode_gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let m = enc.encode_descriptor(name, help, None, prometheus_client::metrics::MetricType::Gauge)?;
    ConstGauge::new(v).encode(m)
}

/// Writes one counter without labels.
pub fn encode_counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let m = enc.encode_descriptor(name, help, None, prometheus_client::metrics::MetricType::Counter)?;
    ConstCounter::new(v).encode(m)
}

/// A latency histogram for the request path: [`latency_histogram`]'s
/// buckets, recorded with two relaxed atomic adds and no lock.
/// prometheus-client's `Histogram` takes one mutex per observation, which
/// every worker thread of the filter would share on every request.
#[derive(Clone, Debug, Default)]
pub struct LatencyHistogram(std::sync::Arc<LatencyInner>);

#[derive(Debug, Default)]
struct LatencyInner {
    /// One count per bucket (not cumulative); the last is `+Inf`.
    counts: [AtomicU64; LATENCY_BUCKETS + 1],
    sum_ns: AtomicU64,
}

/// Bucket `i`'s upper bound in nanoseconds (100 µs x 2^i).
fn bound_ns(i: usize) -> u64 {
    100_000u64 << i
}

impl LatencyHistogram {
    pub fn observe(&self, d: std::time::Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = (0..LATENCY_BUCKETS).find(|&i| ns <= bound_ns(i)).unwrap_or(LATENCY_BUCKETS);
        self.0.counts[i].fetch_add(1, Ordering::Relaxed);
        self.0.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.0.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Sum of the observations so far, in seconds.
    pub fn sum_seconds(&self) -> f64 {
        self.0.sum_ns.load(Ordering::Relaxed) as f64 / 1e9
    }
}

impl prometheus_client::metrics::TypedMetric for LatencyHistogram {
    const TYPE: prometheus_client::metrics::MetricType = prometheus_client::metrics::MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: prometheus_client::encoding::MetricEncoder) -> std::fmt::Result {
        let buckets: Vec<(f64, u64)> = (0..=LATENCY_BUCKETS)
            .map(|i| {
                let le = if i < LATENCY_BUCKETS { bound_ns(i) as f64 / 1e9 } else { f64::INFINITY };
                (le, self.0.counts[i].load(Ordering::Relaxed))
            })
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(self.sum_seconds(), count, &buckets, None)
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        <Self as prometheus_client::metrics::TypedMetric>::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn latency_histogram_renders_like_prometheus_clients() {
        let (mine, theirs) = (LatencyHistogram::default(), latency_histogram());
        for us in [50, 100, 101, 250, 3_000, 70_000, 20_000_000] {
            mine.observe(Duration::from_micros(us));
            theirs.observe(us as f64 / 1e6);
        }
        fn render_one(m: impl prometheus_client::registry::Metric) -> String {
            let mut r = Registry::default();
            r.register("h", "h", m);
            render(&r)
        }
        let (a, b) = (render_one(mine), render_one(theirs));
        let buckets = |s: &str| {
            s.lines().filter(|l| l.contains("_bucket") || l.contains("_count")).map(String::from).collect::<Vec<_>>()
        };
        assert_eq!(buckets(&a), buckets(&b), "{a}\n{b}");
        assert!(a.contains("h_sum 20.073501"), "{a}");
        let mine = LatencyHistogram::default();
        mine.observe(Duration::from_millis(250));
        mine.observe(Duration::from_millis(750));
        assert_eq!((mine.count(), mine.sum_seconds()), (2, 1.0));
    }
}
