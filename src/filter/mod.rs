//! `fencegate filter`: an HTTP reverse proxy in front of a store with no
//! fencing of its own.
//!
//! It refuses every write whose fencing token is older than the highest
//! admitted for that lock, makes each new highest token durable before
//! forwarding anything with it, and holds a newer token's writes until every
//! older write already forwarded has been answered (the epoch barrier, see
//! [`admission`]).
//!
//! # What the filter guarantees, and what it assumes of the store
//!
//! Guarantees, for every lock:
//! 1. No write with token `t` reaches the store after the filter has admitted
//!    a token above `t` (refused with 409 `fencing_token_stale`).
//! 2. No write with token `t` is sent to the store before `t` is fsync'd as
//!    the lock's high-water mark, so a restart never readmits older tokens.
//! 3. A write with token `t` is sent only when every older write already sent
//!    has been answered by the store, or was aborted at least `abort_grace`
//!    earlier.
//!
//! Assumptions about the store:
//! * A write is applied (or definitely not applied) by the time the store
//!   has sent its whole answer (the permit is held until then: [`held`]).
//! * A write whose connection the filter closed before its answer ended is
//!   either applied within `abort_grace` of the close, or never.
//! * Only this filter (one process, one state directory) writes to the
//!   protected paths; or, with `--shared-marks`, only the replicas sharing
//!   one etcd prefix (see [`shared`]).

pub mod admin;
pub mod admission;
pub mod error;
pub mod form;
mod held;
pub mod metrics;
mod orphan;
pub mod query;
pub mod repair;
pub mod rules;
pub mod ruleset;
pub mod s3;
pub mod shared;
pub mod state;
pub mod verify;

mod route;
mod serve;

pub use serve::{run, serve};

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::time::Instant;

use crate::lease::sequencer::HolderCheck;
use crate::proxy::{ServerLimits, Upstream};
use crate::token::ReadMethods;
use admission::{BarrierConfig, Locks};
use metrics::{FilterCollector, Refusals};
pub use rules::Protection;
pub use s3::Store;
use state::{StateDir, StateError};

/// Everything `fencegate filter` is configured with.
#[derive(Clone, Debug)]
pub struct FilterConfig {
    pub upstream: String,
    /// `--upstream-host`: the `Host` sent to the store instead of the client's.
    pub upstream_host: Option<String>,
    pub state_dir: PathBuf,
    pub protection: Protection,
    pub allow_unprotected: bool,
    /// Accept `;` path parameters in protected space (matched with them cut).
    pub allow_path_params: bool,
    /// `--store`: what a write changes beyond its path (see [`s3`]).
    pub store: Store,
    /// `--s3-domain`: `Host: bucket.DOMAIN` is matched as `/bucket/...`.
    pub s3_domain: Option<String>,
    /// Test-only control: match rules on the raw request path, ignore
    /// `Destination` (the filter before issue 12). Never in production.
    pub unsafe_raw_paths: bool,
    /// Test-only control: a write's permit is released when its answer's
    /// head arrives, not at its end (the filter before `held`). Never in
    /// production.
    pub unsafe_release_at_head: bool,
    /// Test-only control: the barrier aborts a write whose request was sent
    /// whole too (the filter before it waited for those). Never in production.
    pub unsafe_abort_sent: bool,
    /// Test-only control: a write whose client leaves before its answer's
    /// head is closed and given `--abort-grace`, even when the store has its
    /// request whole (the filter before `orphan`). Never in production.
    pub unsafe_drop_orphans: bool,
    pub fence_reads: bool,
    pub read_methods: ReadMethods,
    pub barrier: BarrierConfig,
    /// Longest a write may wait at the barrier before a 503 with Retry-After.
    pub max_wait: Duration,
    pub connect_timeout: Duration,
    pub upstream_timeout: Duration,
    pub limits: ServerLimits,
    /// Above this many locks, metrics are totals (`lock="*"`), not per lock.
    pub metrics_lock_limit: usize,
    /// Checks every raise of a lock's mark with the lock service (etcd);
    /// `None`: tokens are trusted as sent.
    pub holder_check: Option<Arc<dyn HolderCheck>>,
    /// `--shared-marks`: marks live in etcd, shared with the other replicas
    /// (the state directory is then not used).
    pub shared: Option<shared::SharedConfig>,
}

impl FilterConfig {
    /// A config with defaults, for tests and the demo.
    pub fn new(upstream: impl Into<String>, state_dir: impl Into<PathBuf>, protection: Protection) -> Self {
        FilterConfig {
            upstream: upstream.into(),
            upstream_host: None,
            state_dir: state_dir.into(),
            protection,
            allow_unprotected: false,
            allow_path_params: false,
            store: Store::Plain,
            s3_domain: None,
            unsafe_raw_paths: false,
            unsafe_release_at_head: false,
            unsafe_abort_sent: false,
            unsafe_drop_orphans: false,
            fence_reads: false,
            read_methods: ReadMethods::default(),
            barrier: BarrierConfig::default(),
            max_wait: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            upstream_timeout: Duration::from_secs(60),
            limits: ServerLimits::default(),
            metrics_lock_limit: 1000,
            holder_check: None,
            shared: None,
        }
    }
}

/// The running filter: configuration, locks and metrics.
#[derive(Debug)]
pub struct Filter {
    cfg: FilterConfig,
    locks: Arc<Locks>,
    /// The upstream's base URL (each worker builds its own pooled client).
    upstream_base: http::Uri,
    refusals: Refusals,
    upstream_latency: crate::metrics::LatencyHistogram,
    shutting_down: AtomicBool,
    registry: Registry,
    shared: Option<Arc<shared::Shared>>,
    /// The tasks carrying writes on after their clients left (see
    /// [`orphan`]); a graceful exit waits for them.
    orphans: tokio_util::task::TaskTracker,
}

/// Why the filter would not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{0}")]
    Config(String),
}

impl Filter {
    /// Opens and locks the state directory and loads every lock's record.
    pub fn open(cfg: FilterConfig) -> Result<Arc<Filter>, StartError> {
        let upstream_base = Self::client(&cfg).map_err(StartError::Config)?.base().clone();
        let (dir, records) = StateDir::open(&cfg.state_dir)?;
        for r in records.values() {
            tracing::info!(lock = %r.lock, highest = r.highest, "loaded high-water mark");
        }
        let verifier = Self::verifier(&cfg);
        let locks = Arc::new(Locks::verified(Some(dir), records.into_values(), cfg.barrier.clone(), verifier.clone()));
        Ok(Self::build(cfg, locks, upstream_base, None, verifier))
    }

    /// Opens a replica sharing its marks through etcd (`--shared-marks`):
    /// registers, reads every mark at one revision, acknowledges them and
    /// watches from the next revision, all before the first request.
    pub async fn open_shared(cfg: FilterConfig) -> Result<Arc<Filter>, StartError> {
        let upstream_base = Self::client(&cfg).map_err(StartError::Config)?.base().clone();
        let scfg = cfg.shared.clone().ok_or_else(|| StartError::Config("no --shared-marks configuration".into()))?;
        let (sh, marks, rev) = shared::join(scfg).await?;
        for (lock, t) in &marks {
            tracing::info!(%lock, highest = t, "loaded shared high-water mark");
        }
        let verifier = Self::verifier(&cfg);
        let locks = Arc::new(Locks::shared(marks.clone(), cfg.barrier.clone(), sh.clone(), verifier.clone()));
        shared::watch::start(sh.clone(), locks.clone(), marks, rev);
        Ok(Self::build(cfg, locks, upstream_base, Some(sh), verifier))
    }

    /// The raise verifier, if `--etcd` gave a holder check (said at start either way).
    fn verifier(cfg: &FilterConfig) -> Option<Arc<verify::Verifier>> {
        let verifier = cfg.holder_check.clone().map(|c| Arc::new(verify::Verifier::new(c)));
        match &verifier {
            Some(v) => tracing::info!(check = ?v, "raises of a lock's mark are verified with etcd"),
            None => tracing::warn!(
                "verification is off (no --etcd): tokens are trusted as sent, so anyone who can reach this filter \
                 can raise a lock's mark"
            ),
        }
        verifier
    }

    fn build(
        cfg: FilterConfig,
        locks: Arc<Locks>,
        upstream_base: http::Uri,
        shared: Option<Arc<shared::Shared>>,
        verifier: Option<Arc<verify::Verifier>>,
    ) -> Arc<Filter> {
        let mut registry = Registry::default();
        if let Some(v) = &verifier {
            registry.register(
                "fencegate_filter_verification_latency_seconds",
                "Time to verify a raise with etcd",
                v.latency.clone(),
            );
        }
        let upstream_latency = crate::metrics::LatencyHistogram::default();
        registry.register(
            "fencegate_filter_upstream_latency_seconds",
            "Time from sending a request to the store until its response head arrived",
            upstream_latency.clone(),
        );
        if let Some(sh) = &shared {
            registry.register(
                "fencegate_filter_mark_raise_seconds",
                "Time from a raise's compare-and-swap in etcd until every live replica acknowledged it",
                sh.stats.raise_latency.clone(),
            );
        }
        Arc::new_cyclic(|weak: &std::sync::Weak<Filter>| {
            registry.register_collector(Box::new(FilterCollector(weak.clone())));
            Filter {
                cfg,
                locks,
                upstream_base,
                refusals: Refusals::default(),
                upstream_latency,
                shutting_down: AtomicBool::new(false),
                registry,
                shared,
                orphans: tokio_util::task::TaskTracker::new(),
            }
        })
    }

    /// Before a replica gives up its registration: every write it forwarded
    /// (all aborted by now) must have been answered, or given
    /// `--abort-grace` since the abort to land (an aborted write may still be
    /// applied by the store: the barrier's own abort rule).
    async fn settle_before_leaving(&self) {
        let until = crate::duration::after(self.cfg.barrier.abort_grace);
        let in_flight = || self.locks.all().iter().any(|e| !e.snapshot().3.is_empty());
        while in_flight() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if in_flight() {
            // Aborted at least the grace ago (or never released, their
            // runtime gone): what the store does with them, it has done.
            tracing::info!(grace = ?self.cfg.barrier.abort_grace, "writes still counted in flight after the grace");
        }
    }

    pub fn locks(&self) -> &Locks {
        &self.locks
    }

    /// A new pooled client for the upstream. Each worker thread owns one, so
    /// its connections' tasks live on the worker's own runtime.
    pub fn client(cfg: &FilterConfig) -> Result<Upstream, String> {
        Upstream::new(&cfg.upstream, cfg.connect_timeout, cfg.upstream_timeout)?.with_host(cfg.upstream_host.as_deref())
    }
}
