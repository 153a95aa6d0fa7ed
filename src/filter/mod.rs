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
//!   protected paths; or, with `--shared-marks`, only the replicas sharing
//!   one etcd prefix (see [`shared`]).

pub mod admin;
pub mod admission;
pub mod error;
pub mod metrics;
pub mod repair;
pub mod rules;
pub mod s3;
pub mod shared;
pub mod state;
pub mod verify;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use http::{Request, Response};
use hyper::body::Incoming;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::lease::sequencer::HolderCheck;
use crate::proxy::{self, Body, RequestBody, ServerLimits, Upstream};
use crate::token::{self, LockName, ReadMethods};
use admission::{BarrierConfig, Locks};
use error::FilterError;
use metrics::{FilterCollector, Refusals};
pub use rules::Protection;
use rules::Targets;
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
                self.refusals.count(&self.locks, lock.as_ref(), &e);
                tracing::info!(reason = e.reason(), lock = lock.as_ref().map(|l| l.as_str()), error = %e, "refused");
                e.into_response()
            }
        }
    }

    /// The write's targets (request path, `Destination`; with `--store s3`
    /// also what the body names, see [`s3`]), checked against the rules;
    /// see [`rules`]. Returns the request to forward, its body unchanged
    /// (whatever was read of it goes first).
    async fn targets(&self, req: Request<Incoming>) -> Result<(Targets, Request<RequestBody>), FilterError> {
        let path = req.uri().path();
        if self.cfg.unsafe_raw_paths {
            let lock = self.cfg.protection.lock_for(path).cloned();
            let t = Targets { paths: vec![(path.to_owned(), lock)] };
            return Ok((t, req.map(RequestBody::stream)));
        }
        if self.cfg.store == Store::S3 {
            return self.s3_targets(req).await;
        }
        let dest = rules::destination(req.headers())?;
        let raw: Vec<&str> = std::iter::once(path).chain(dest.as_deref()).collect();
        let t = Targets::resolve(&self.cfg.protection, &raw, self.cfg.allow_path_params)?;
        Ok((t, req.map(RequestBody::stream)))
    }

    /// [`targets`](Self::targets) for `--store s3`. The two bodies read here
    /// (DeleteObjects, a form POST) are read in boxed futures: rare requests,
    /// whose futures would otherwise make every request's future bigger.
    async fn s3_targets(&self, req: Request<Incoming>) -> Result<(Targets, Request<RequestBody>), FilterError> {
        let path = s3::request_path(
            req.uri().path(),
            req.headers(),
            req.uri().authority().map(|a| a.as_str()),
            self.cfg.s3_domain.as_deref(),
        );
        let resolve = |raw: &[&str]| Targets::resolve(&self.cfg.protection, raw, self.cfg.allow_path_params);
        let bucket = s3::bucket_of(&path).map(str::to_owned);
        if let (&http::Method::POST, Some(bucket)) = (req.method(), bucket) {
            if s3::is_delete_objects(req.uri().query()) {
                let (body, req) =
                    Box::pin(read_prefix(req, self.cfg.limits.header_read_timeout, |_, complete| complete)).await?;
                let keys = s3::delete_keys(&body).map_err(|e| match e {
                    s3::KeysError::TooMany => {
                        FilterError::BodyTooLarge(format!("a DeleteObjects names more than {} keys", s3::MAX_KEYS))
                    }
                    s3::KeysError::Malformed(why) => FilterError::BodyMalformed(why),
                })?;
                let raw: Vec<String> = keys.iter().map(|k| s3::key_path(&bucket, k)).collect();
                return Ok((resolve(&raw.iter().map(String::as_str).collect::<Vec<_>>())?, req));
            }
            if let Some(boundary) = s3::form_boundary(req.headers()) {
                let decided = |b: &[u8], complete| s3::form_key(b, &boundary, complete) != s3::FormKey::NeedMore;
                let (body, req) = Box::pin(read_prefix(req, self.cfg.limits.header_read_timeout, decided)).await?;
                // Unreadable: checked as a write to the whole bucket, which
                // is refused (path_spans_locks) when the bucket is split.
                let raw = match s3::form_key(&body, &boundary, true) {
                    s3::FormKey::Found(key) => s3::key_path(&bucket, &key),
                    _ => format!("/{bucket}/"),
                };
                return Ok((resolve(&[&raw])?, req));
            }
        }
        // A bucket-level request is a write to the collection `/bucket/`.
        let path = if s3::bucket_level(&path).is_some() { format!("{path}/") } else { path };
        let dest = rules::destination(req.headers())?;
        let raw: Vec<&str> = std::iter::once(path.as_str()).chain(dest.as_deref()).collect();
        Ok((resolve(&raw)?, req.map(RequestBody::stream)))
    }

    async fn route(
        self: Arc<Self>,
        up: &Upstream,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<Body>, (Option<LockName>, FilterError)> {
        let mut req = req;
        // Hop-by-hop headers go before anything is matched: the target is
        // decided on the request as it will be forwarded. A `Connection:
        // host` would otherwise have its `Host` matched here (an S3 virtual
        // host naming one lock's bucket) and then dropped on the way out, so
        // that the store read the path as another bucket, another lock's.
        proxy::strip_hop_by_hop(req.headers_mut());
        let is_write = self.cfg.read_methods.is_write(req.method());
        if !is_write && !self.cfg.fence_reads {
            return self.pass(up, req.map(RequestBody::stream), peer).await.map_err(|e| (None, e));
        }
        let (targets, req) = self.targets(req).await.map_err(|e| (None, e))?;
        let Some(lock) = targets.lock().cloned() else {
            return if self.cfg.allow_unprotected || !is_write {
                self.pass(up, req, peer).await.map_err(|e| (None, e))
            } else {
                let path = targets.unprotected().unwrap_or(req.uri().path()).to_owned();
                Err((None, FilterError::Unprotected(path)))
            };
        };
        if let (Some(path), false) = (targets.unprotected(), self.cfg.allow_unprotected) {
            return Err((None, FilterError::Unprotected(path.to_owned())));
        }
        let fence = token::parse_headers(req.headers()).map_err(|e| (None, e.into()))?;
        targets.check_lock(&fence.lock).map_err(|e| (Some(lock.clone()), e))?;
        let entry = self.locks.entry(&lock);
        let deadline = crate::duration::after(self.cfg.max_wait);
        self.check_shared().map_err(|e| (Some(lock.clone()), e))?;
        let permit = entry.admit_write(fence.token, deadline).await.map_err(|e| (Some(lock.clone()), e.into()))?;
        // Checked again right before forwarding: the admission may have
        // waited past the moment this replica had to self-fence.
        self.check_shared().map_err(|e| (Some(lock.clone()), e))?;
        entry.stats.admitted.fetch_add(1, Ordering::Relaxed);
        let started = StdInstant::now();
        let sent = tokio::select! {
            r = up.send_body(req, Some(peer)) => r,
            _ = permit.aborted() => return Err((Some(lock.clone()), FilterError::Aborted(lock))),
        };
        self.upstream_latency.observe(started.elapsed());
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

    /// With shared marks: refuses (503 `fencing_state_unavailable`) while
    /// this replica is self-fenced. Reads never come here.
    fn check_shared(&self) -> Result<(), FilterError> {
        match &self.shared {
            Some(s) if !s.writable() => Err(FilterError::Admit(admission::AdmitError::State(s.unavailable()))),
            _ => Ok(()),
        }
    }

    async fn pass(
        &self,
        up: &Upstream,
        req: Request<RequestBody>,
        peer: SocketAddr,
    ) -> Result<Response<Body>, FilterError> {
        let started = StdInstant::now();
        let resp = up.send_body(req, Some(peer)).await?;
        self.upstream_latency.observe(started.elapsed());
        Ok(resp.map(proxy::stream))
    }
}

/// Reads the start of a request's body until `decided(bytes so far, body
/// complete)` (at most [`s3::MAX_BODY`]: beyond, 413), and gives back the
/// bytes read and the request with its body whole again (those bytes, then
/// the rest as the client sends it). All of it within `within` (the header
/// timeout: this start decides the write as its head does elsewhere), else
/// 408: a client that sends a head and then no body would otherwise hold
/// its connection for ever.
async fn read_prefix(
    req: Request<Incoming>,
    within: Duration,
    decided: impl Fn(&[u8], bool) -> bool,
) -> Result<(bytes::Bytes, Request<RequestBody>), FilterError> {
    use http_body_util::BodyExt;
    let (parts, mut body) = req.into_parts();
    let mut buf = bytes::BytesMut::new();
    let (mut complete, mut trailers) = (false, None);
    let deadline = crate::duration::after(within);
    while !decided(&buf, complete) && !complete {
        let frame = tokio::time::timeout_at(deadline, body.frame()).await.map_err(|_| {
            FilterError::BodyTimeout(format!(
                "the filter reads the start of this body to see what the write changes, and it did not arrive \
                 within {within:?} (--header-timeout)"
            ))
        })?;
        match frame {
            None => complete = true,
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => buf.extend_from_slice(&data),
                Err(frame) => (trailers, complete) = (frame.into_trailers().ok(), true),
            },
            Some(Err(e)) => return Err(FilterError::BadRequest(format!("the request body could not be read: {e}"))),
        }
        if buf.len() > s3::MAX_BODY {
            return Err(FilterError::BodyTooLarge(format!(
                "the filter reads at most {} bytes of this body to see what the write changes",
                s3::MAX_BODY
            )));
        }
    }
    let buf = buf.freeze();
    let rest = (!complete).then_some(body);
    Ok((buf.clone(), Request::from_parts(parts, RequestBody::prefixed(buf, rest, trailers))))
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
    let filter = if cfg.shared.is_some() { Filter::open_shared(cfg).await? } else { Filter::open(cfg)? };
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
    // One connection cap for every worker accepting on the proxy's socket
    // (the admin port has its own, so probes get through a full proxy).
    let cap = proxy::connection_cap(&limits);
    let std_listener = listener.into_std()?;
    let mut threads = Vec::new();
    for i in 1..workers.max(1) {
        let l = std_listener.try_clone()?;
        let (f, stop, limits, cap) = (filter.clone(), stop.clone(), limits.clone(), cap.clone());
        threads.push(std::thread::Builder::new().name(format!("fencegate-filter-{i}")).spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a worker runtime");
            rt.block_on(async move {
                let listener = TcpListener::from_std(l).expect("a listener registered with this runtime");
                let up = Arc::new(Filter::client(&f.cfg).expect("validated at open"));
                proxy::serve_capped(
                    listener,
                    None,
                    limits,
                    cap,
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
    let main = proxy::serve_capped(
        listener,
        None,
        limits.clone(),
        cap,
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
    if let Some(sh) = &filter.shared {
        // Connection tasks of this runtime can outlive their server's grace
        // (the graceful watcher does not cancel them), so a write may still
        // be streaming to the store. Stop admitting, abort what is in
        // flight, give it `--abort-grace`, and only then let the other
        // replicas stop waiting for this one.
        sh.stop_writing();
        filter.locks.abort_all();
        filter.settle_before_leaving().await;
        sh.revoke().await;
    }
    tracing::info!("filter stopped");
    Ok(())
}
