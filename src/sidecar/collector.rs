//! The sidecar's Prometheus metrics: the lock's state and the keeper's and
//! the proxy's counters, labelled by lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use tokio::sync::watch;

use super::layers::ProxyStats;
use crate::lease::deadline::Stamp;
use crate::lease::keeper::{KeeperStats, LockStatus, Phase};
use crate::metrics;
use crate::token::LockName;

/// The sidecar's gauges and counters, read at each scrape from what the
/// keeper publishes and counts and from the proxy's counters. It holds
/// those, not the sidecar, so that the sidecar's registry does not keep the
/// sidecar alive.
#[derive(Debug)]
pub(super) struct SidecarCollector {
    pub(super) lock: LockName,
    pub(super) status: watch::Receiver<LockStatus>,
    pub(super) keeper: Arc<KeeperStats>,
    pub(super) proxy: Arc<ProxyStats>,
}

impl Collector for SidecarCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let s = self.status.borrow().clone();
        let lock = || vec![("lock", self.lock.to_string())];
        let now = Stamp::now();
        let g = |enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64| {
            metrics::encode_gauges(enc, name, help, [(lock(), v)])
        };
        g(
            &mut enc,
            "fencegate_sidecar_holding",
            "1 while the lock is safely held",
            s.write_token(now).is_some() as i64,
        )?;
        g(
            &mut enc,
            "fencegate_sidecar_token",
            "Current fencing token (0 if none)",
            s.token.map_or(0, |t| t.get() as i64),
        )?;
        g(
            &mut enc,
            "fencegate_sidecar_fenced_out",
            "1 if a filter has seen a higher token than etcd gave us",
            (s.phase == Phase::FencedOut) as i64,
        )?;
        g(
            &mut enc,
            "fencegate_sidecar_valid_for_milliseconds",
            "How long the lock is still safely held",
            s.valid_for(now).as_millis() as i64,
        )?;
        let (ks, ps) = (&self.keeper, &self.proxy);
        let ld = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let c = |enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64| {
            metrics::encode_counters(enc, name, help, [(lock(), v)])
        };
        c(&mut enc, "fencegate_sidecar_acquisitions", "Times this sidecar won the lock", ld(&ks.acquisitions))?;
        c(&mut enc, "fencegate_sidecar_losses", "Times this sidecar lost or released the lock", ld(&ks.losses))?;
        c(&mut enc, "fencegate_sidecar_keepalives", "Keep-alives acknowledged", ld(&ks.keepalives))?;
        c(
            &mut enc,
            "fencegate_sidecar_keepalive_failures",
            "Keep-alives failed or timed out",
            ld(&ks.keepalive_failures),
        )?;
        c(
            &mut enc,
            "fencegate_sidecar_keepalive_latency_microseconds",
            "Sum of keep-alive round trips",
            ld(&ks.keepalive_us_total),
        )?;
        g(
            &mut enc,
            "fencegate_sidecar_last_keepalive_latency_microseconds",
            "Last keep-alive round trip",
            ld(&ks.last_keepalive_us) as i64,
        )?;
        c(&mut enc, "fencegate_sidecar_writes_forwarded", "Writes forwarded with a token", ld(&ps.writes_forwarded))?;
        c(&mut enc, "fencegate_sidecar_writes_refused", "Writes refused (lock not held)", ld(&ps.writes_refused))?;
        c(&mut enc, "fencegate_sidecar_reads_forwarded", "Reads forwarded", ld(&ps.reads_forwarded))?;
        c(
            &mut enc,
            "fencegate_sidecar_reads_refused",
            "Reads refused (--reads-need-lease, lock not held)",
            ld(&ps.reads_refused),
        )?;
        c(
            &mut enc,
            "fencegate_sidecar_fence_timeouts",
            "Takeovers whose fence was not confirmed within --fence-timeout",
            ld(&ks.fence_timeouts),
        )?;
        Ok(())
    }
}
