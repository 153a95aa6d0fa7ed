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
//!   sends its response status line.
//! * A write whose connection the filter closed before the answer is either
//!   applied within `abort_grace` of the close, or never.
//! * Only this filter (one process, one state directory) writes to the
//!   protected paths.

pub mod admission;
pub mod error;
pub mod state;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics;
use crate::proxy::{self, json_response, Body, ServerLimits, Upstream};
use crate::token::{self, LockName, ReadMethods, Token};
use admission::{BarrierConfig, Locks};
use error::FilterError;
use state::{StateDir, StateError};

/// Which lock protects which paths.
#[derive(Clone, Debug)]
pub enum Protection {
    /// `--lock NAME`: one lock for every path.
    All(LockName),
    /// `--protect PREFIX=LOCK ...`: the longest matching prefix wins.
    Rules(BTreeMap<String, LockName>),
}

impl Protection {
    pub fn lock_for(&self, path: &str) -> Option<&LockName> {
        match self {
            Protection::All(l) => Some(l),
            Protection::Rules(rules) => {
                // Longest prefix first: one map lookup per candidate length,
                // so thousands of rules cost no more than a handful.
                (0..=path.len()).rev().filter(|&n| path.is_char_boundary(n)).find_map(|n| rules.get(&path[..n]))
            }
        }
    }

    pub fn protects(&self, lock: &LockName) -> bool {
        match self {
            Protection::All(l) => l == lock,
            Protection::Rules(rules) => rules.values().any(|l| l == lock),
        }
    }

    /// Parses `PREFIX=LOCK`.
    pub fn parse_rule(s: &str) -> Result<(String, LockName), String> {
        let (prefix, lock) =
            s.rsplit_once('=').ok_or_else(|| format!("--protect wants PATH_PREFIX=LOCK, got {s:?}"))?;
        if !prefix.starts_with('/') {
            return Err(format!("--protect prefix {prefix:?} must start with '/'"));
        }
        Ok((prefix.to_owned(), lock.parse().map_err(|e| format!("--protect {s:?}: {e}"))?))
    }
}

/// Everything `fencegate filter` is configured with.
#[derive(Clone, Debug)]
pub struct FilterConfig {
    pub upstream: String,
    pub state_dir: PathBuf,
    pub protection: Protection,
    pub allow_unprotected: bool,
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
}

impl FilterConfig {
    /// A config with defaults, for tests and the demo.
    pub fn new(upstream: impl Into<String>, state_dir: impl Into<PathBuf>, protection: Protection) -> Self {
        FilterConfig {
            upstream: upstream.into(),
            state_dir: state_dir.into(),
            protection,
            allow_unprotected: false,
            fence_reads: false,
            read_methods: ReadMethods::default(),
            barrier: BarrierConfig::default(),
            max_wait: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            upstream_timeout: Duration::from_secs(60),
            limits: ServerLimits::default(),
            metrics_lock_limit: 1000,
        }
    }
}

/// Refusals that happen before a lock is known (bad headers, bad paths).
#[derive(Debug, Default)]
struct Refusals {
    by_reason: dashmap::DashMap<&'static str, AtomicU64>,
}

/// The running filter: configuration, locks and metrics.
#[derive(Debug)]
pub struct Filter {
    cfg: FilterConfig,
    locks: Arc<Locks>,
    /// The upstream's base URL (each worker builds its own pooled client).
    upstream_base: http::Uri,
    refusals: Refusals,
    upstream_latency: Histogram,
    shutting_down: AtomicBool,
    registry: Registry,
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
        let locks = Arc::new(Locks::new(Some(dir), records.into_values(), cfg.barrier.clone()));
        let upstream_latency = metrics::latency_histogram();
        let mut registry = Registry::default();
        registry.register(
            "fencegate_filter_upstream_latency_seconds",
            "Time from sending a request to the store until its response head arrived",
            upstream_latency.clone(),
        );
        Ok(Arc::new_cyclic(|weak: &std::sync::Weak<Filter>| {
            registry.register_collector(Box::new(FilterCollector(weak.clone())));
            Filter {
                cfg,
                locks,
                upstream_base,
                refusals: Refusals::default(),
                upstream_latency,
                shutting_down: AtomicBool::new(false),
                registry,
            }
        }))
    }

    pub fn locks(&self) -> &Locks {
        &self.locks
    }

    /// A new pooled client for the upstream. Each worker thread owns one, so
    /// its connections' tasks live on the worker's own runtime.
    pub fn client(cfg: &FilterConfig) -> Result<Upstream, String> {
        Upstream::new(&cfg.upstream, cfg.connect_timeout, cfg.upstream_timeout)
    }

    /// The proxy's request handler.
    pub async fn handle(
        self: Arc<Self>,
        up: Arc<Upstream>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<Body> {
        match self.clone().route(&up, req, peer).await {
            Ok(r) => r,
            Err((lock, e)) => {
                self.count_refusal(lock.as_ref(), &e);
                tracing::info!(reason = e.reason(), lock = lock.as_ref().map(|l| l.as_str()), error = %e, "refused");
                e.into_response()
            }
        }
    }

    fn count_refusal(&self, lock: Option<&LockName>, e: &FilterError) {
        let stats = lock.map(|l| self.locks.entry(l));
        let counter = match (&stats, e) {
            (Some(s), FilterError::Admit(admission::AdmitError::Stale { .. })) => &s.stats.refused_stale,
            (Some(s), FilterError::LockMismatch { .. }) => &s.stats.refused_mismatch,
            (Some(s), FilterError::Aborted(_)) => &s.stats.aborted,
            (Some(s), FilterError::Admit(_)) => &s.stats.refused_unavailable,
            _ => {
                self.refusals.by_reason.entry(e.reason()).or_default().fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    async fn route(
        self: Arc<Self>,
        up: &Upstream,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<Body>, (Option<LockName>, FilterError)> {
        let is_write = self.cfg.read_methods.is_write(req.method());
        if !is_write && !self.cfg.fence_reads {
            return self.pass(up, req, peer).await.map_err(|e| (None, e));
        }
        let path = req.uri().path().to_owned();
        if matches!(self.cfg.protection, Protection::Rules(_)) && !is_canonical(&path) {
            return Err((None, FilterError::NotCanonical(path)));
        }
        let Some(lock) = self.cfg.protection.lock_for(&path).cloned() else {
            return if self.cfg.allow_unprotected || !is_write {
                self.pass(up, req, peer).await.map_err(|e| (None, e))
            } else {
                Err((None, FilterError::Unprotected(path)))
            };
        };
        let fence = token::parse_headers(req.headers()).map_err(|e| (None, e.into()))?;
        if fence.lock != lock {
            return Err((Some(lock.clone()), FilterError::LockMismatch { expected: lock, got: fence.lock }));
        }
        let entry = self.locks.entry(&lock);
        let deadline = Instant::now() + self.cfg.max_wait;
        let permit = entry
            .admit(fence.token, deadline, &self.locks, true)
            .await
            .map_err(|e| (Some(lock.clone()), e.into()))?
            .expect("writes get a permit");
        entry.stats.admitted.fetch_add(1, Ordering::Relaxed);
        let started = StdInstant::now();
        let sent = tokio::select! {
            r = up.send(req, Some(peer)) => r,
            _ = permit.aborted() => return Err((Some(lock.clone()), FilterError::Aborted(lock))),
        };
        self.upstream_latency.observe(started.elapsed().as_secs_f64());
        match sent {
            Ok(resp) => {
                // The store has answered: this write no longer holds the barrier.
                permit.complete();
                Ok(resp.map(proxy::stream))
            }
            // Dropping the permit without complete() keeps it in flight for
            // abort_grace: the store may still apply a write we gave up on.
            Err(e) => Err((Some(lock), e.into())),
        }
    }

    async fn pass(
        &self,
        up: &Upstream,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<Body>, FilterError> {
        let started = StdInstant::now();
        let resp = up.send(req, Some(peer)).await?;
        self.upstream_latency.observe(started.elapsed().as_secs_f64());
        Ok(resp.map(proxy::stream))
    }

    /// The admin API: health, metrics, lock listing and the proactive fence.
    pub async fn admin(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_owned();
        let result = match (req.method(), path.as_str()) {
            (&Method::GET, "/healthz") => Ok(proxy::text_response(StatusCode::OK, "text/plain", "ok\n")),
            (&Method::GET, "/readyz") => Ok(if self.shutting_down.load(Ordering::Relaxed) {
                proxy::text_response(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "shutting down\n")
            } else {
                proxy::text_response(StatusCode::OK, "text/plain", "ready\n")
            }),
            (&Method::GET, "/metrics") => Ok(proxy::text_response(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                metrics::render(&self.registry),
            )),
            (&Method::GET, "/v1/locks") => Ok(self.list_locks()),
            (&Method::POST, p) if p.starts_with("/v1/locks/") && p.ends_with("/fence") => {
                let name = &p["/v1/locks/".len()..p.len() - "/fence".len()];
                self.fence(name, req).await
            }
            _ => Err(FilterError::BadRequest(format!("no such admin endpoint: {} {path}", req.method()))),
        };
        result.unwrap_or_else(|e| match e {
            FilterError::BadRequest(m) if m.starts_with("no such") => {
                proxy::json_error(StatusCode::NOT_FOUND, "not_found", &m, None)
            }
            e => e.into_response(),
        })
    }

    fn list_locks(&self) -> Response<Body> {
        let locks: Vec<_> = self
            .locks
            .all()
            .iter()
            .map(|e| {
                let (highest, durable, set_at, inflight) = e.snapshot();
                let set_at_ms = set_at
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_millis() as u64);
                let inflight: BTreeMap<String, usize> = inflight.into_iter().map(|(t, n)| (t.to_string(), n)).collect();
                json!({ "lock": e.name, "highest": highest, "durable": durable, "set_at_ms": set_at_ms, "inflight": inflight })
            })
            .collect();
        json_response(StatusCode::OK, &json!({ "locks": locks }))
    }

    async fn fence(&self, name: &str, req: Request<Incoming>) -> Result<Response<Body>, FilterError> {
        #[derive(Deserialize)]
        struct FenceBody {
            token: u64,
            timeout_ms: Option<u64>,
        }
        let lock: LockName = name.parse().map_err(FilterError::Token)?;
        if !self.cfg.protection.protects(&lock) {
            return Err(FilterError::UnknownLock(lock.to_string()));
        }
        let bytes = Limited::new(req.into_body(), 4096)
            .collect()
            .await
            .map_err(|e| FilterError::BadRequest(format!("could not read the body: {e}")))?
            .to_bytes();
        let body: FenceBody = serde_json::from_slice(&bytes)
            .map_err(|e| FilterError::BadRequest(format!("body must be {{\"token\": N}}: {e}")))?;
        let token = Token::new(body.token)
            .ok_or_else(|| FilterError::Token(token::TokenError::Malformed("token must be greater than 0".into())))?;
        let wait = body.timeout_ms.map(Duration::from_millis).unwrap_or(self.cfg.max_wait);
        let entry = self.locks.entry(&lock);
        let result = entry.admit(token, Instant::now() + wait, &self.locks, false).await;
        if let Err(e) = result {
            let e = FilterError::from(e);
            self.count_refusal(Some(&lock), &e);
            return Err(e);
        }
        let (highest, ..) = entry.snapshot();
        tracing::info!(%lock, token = token.get(), "fenced");
        Ok(json_response(StatusCode::OK, &json!({ "lock": lock, "token": token, "highest": highest })))
    }
}

/// True if `path` has no dot segments, empty inner segments, backslashes or
/// percent-encoded dots, slashes or backslashes: a path the store cannot
/// normalize into a different one than the filter matched.
pub fn is_canonical(path: &str) -> bool {
    if !path.starts_with('/') || path.contains('\\') {
        return false;
    }
    let lower = path.to_ascii_lowercase();
    if ["%2e", "%2f", "%5c", "%00"].iter().any(|p| lower.contains(p)) {
        return false;
    }
    let segs: Vec<&str> = path[1..].split('/').collect();
    let last = segs.len() - 1;
    segs.iter().enumerate().all(|(i, s)| *s != "." && *s != ".." && (!s.is_empty() || i == last))
}

/// Reads per-lock atomics at scrape time.
#[derive(Debug)]
struct FilterCollector(std::sync::Weak<Filter>);

/// One lock's figures as read at scrape time.
#[derive(Default)]
struct LockFigures {
    admitted: u64,
    stale: u64,
    mismatch: u64,
    unavailable: u64,
    aborted: u64,
    highest: u64,
    barrier_waits: u64,
    barrier_wait_us: u64,
    inflight: u64,
}

impl LockFigures {
    fn read(e: &admission::LockEntry) -> Self {
        let ld = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let (highest, _, _, inflight) = e.snapshot();
        LockFigures {
            admitted: ld(&e.stats.admitted),
            stale: ld(&e.stats.refused_stale),
            mismatch: ld(&e.stats.refused_mismatch),
            unavailable: ld(&e.stats.refused_unavailable),
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
        self.aborted += o.aborted;
        self.highest = self.highest.max(o.highest);
        self.barrier_waits += o.barrier_waits;
        self.barrier_wait_us += o.barrier_wait_us;
        self.inflight += o.inflight;
    }
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
        Ok(())
    }
}

/// Runs the filter on bound listeners until `shutdown` resolves; then stops
/// accepting, lets in-flight requests finish (bounded) and returns.
/// `workers` event loops accept on the listener (see [`serve`]).
pub async fn run(
    cfg: FilterConfig,
    listener: TcpListener,
    admin: Option<TcpListener>,
    workers: usize,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let filter = Filter::open(cfg)?;
    serve(filter, listener, admin, workers, shutdown).await.map_err(|e| StartError::Config(e.to_string()))
}

/// Serves an opened filter (see [`run`]).
///
/// Threading, nginx-style: the caller's runtime runs the admin server and one
/// proxy event loop; `workers - 1` more threads each run a current-thread
/// runtime with their own accept loop on the same listening socket and their
/// own upstream pool. A request then stays on one thread from accept to
/// answer (no work stealing, no cross-thread wake-ups); only the per-lock
/// state is shared, and it is built for that (`DashMap`, per-lock mutexes).
/// The worker threads are owned here and joined before returning.
pub async fn serve(
    filter: Arc<Filter>,
    listener: TcpListener,
    admin: Option<TcpListener>,
    workers: usize,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let stop = CancellationToken::new();
    let stop2 = stop.clone();
    let f2 = filter.clone();
    // This task owns the translation of the caller's shutdown future into a
    // token every server can watch; it ends with the shutdown.
    tokio::spawn(async move {
        shutdown.await;
        f2.shutting_down.store(true, Ordering::Relaxed);
        stop2.cancel();
    });
    tracing::info!(listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        upstream = %filter.upstream_base, state_dir = %filter.cfg.state_dir.display(), workers, "filter serving");
    let limits = filter.cfg.limits.clone();
    let std_listener = listener.into_std()?;
    let mut threads = Vec::new();
    for i in 1..workers.max(1) {
        let l = std_listener.try_clone()?;
        let (f, stop, limits) = (filter.clone(), stop.clone(), limits.clone());
        threads.push(std::thread::Builder::new().name(format!("fencegate-filter-{i}")).spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a worker runtime");
            rt.block_on(async move {
                let listener = TcpListener::from_std(l).expect("a listener registered with this runtime");
                let up = Arc::new(Filter::client(&f.cfg).expect("validated at open"));
                proxy::serve(
                    listener,
                    limits,
                    move |req, peer| f.clone().handle(up.clone(), req, peer),
                    stop.cancelled_owned(),
                )
                .await;
            });
        })?);
    }
    let listener = TcpListener::from_std(std_listener)?;
    let up = Arc::new(Filter::client(&filter.cfg).expect("validated at open"));
    let f = filter.clone();
    let main = proxy::serve(
        listener,
        limits.clone(),
        move |req, peer| f.clone().handle(up.clone(), req, peer),
        stop.clone().cancelled_owned(),
    );
    match admin {
        Some(admin) => {
            let f = filter.clone();
            let admin = proxy::serve(admin, limits, move |req, _| f.clone().admin(req), stop.clone().cancelled_owned());
            tokio::join!(main, admin);
        }
        None => main.await,
    }
    let _ = tokio::task::spawn_blocking(move || {
        threads.into_iter().for_each(|t| {
            let _ = t.join();
        })
    })
    .await;
    tracing::info!("filter stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_wins() {
        let rules: BTreeMap<_, _> =
            ["/a/=x", "/a/b/=y", "/c=z"].iter().map(|r| Protection::parse_rule(r).unwrap()).collect();
        let p = Protection::Rules(rules);
        assert_eq!(p.lock_for("/a/file").unwrap().as_str(), "x");
        assert_eq!(p.lock_for("/a/b/file").unwrap().as_str(), "y");
        assert_eq!(p.lock_for("/cat").unwrap().as_str(), "z");
        assert!(p.lock_for("/d").is_none());
        assert!(p.protects(&"y".parse().unwrap()));
        assert!(Protection::parse_rule("a=x").is_err());
        assert!(Protection::parse_rule("/a=b c").is_err());
    }

    #[test]
    fn canonical_paths() {
        for ok in ["/", "/a", "/a/b/", "/a.b/c..d/.e"] {
            assert!(is_canonical(ok), "{ok}");
        }
        for bad in ["", "a", "//a", "/a//b", "/./a", "/a/../b", "/a/..", "/%2e%2e/a", "/a%2Fb", "/a\\b", "/a%5cb"] {
            assert!(!is_canonical(bad), "{bad}");
        }
    }
}
