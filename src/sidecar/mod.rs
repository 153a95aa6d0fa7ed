//! `fencegate sidecar`: holds the app's lock and is its proxy on localhost.
//!
//! * The egress proxy (`--listen`) forwards every request to `--upstream`,
//!   streaming both ways, after [`layers::StripFencing`] and
//!   [`layers::InjectToken`].
//! * The local API (`--admin-listen`) tells the app about the lock:
//!   `GET /v1/lock`, `GET /v1/lock/events` (Server-Sent Events),
//!   `POST /v1/lock/release`, `POST /v1/lock/rejoin` (after a loss with
//!   `--rejoin manual`), `/healthz`, `/readyz`, `/metrics`.
//!
//! Shutdown order matters for a fast, safe handoff: refuse new writes, let
//! in-flight ones finish (bounded), *then* revoke the lease so the next
//! candidate takes over at once, then stop the local API.

mod api;
mod collector;
pub mod fence;
pub mod layers;
pub mod safe;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use http::Request;
use hyper::body::Incoming;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tower::{Service, ServiceBuilder, ServiceExt};

use crate::lease::keeper::{Keeper, KeeperConfig, LockStatus};
use crate::lease::LeaseBackend;
use crate::proxy::{self, ServerLimits, Upstream};
use crate::token::ReadMethods;
use collector::SidecarCollector;
use layers::{BoundWritesLayer, InjectConfig, InjectTokenLayer, ProxyStats, StripFencingLayer};

/// Everything `fencegate sidecar` is configured with.
#[derive(Clone, Debug)]
pub struct SidecarConfig {
    pub keeper: KeeperConfig,
    pub upstream: String,
    /// `--upstream-host`: the `Host` sent upstream instead of the app's.
    pub upstream_host: Option<String>,
    /// Filters' admin base URLs to fence on takeover.
    pub fence_urls: Vec<String>,
    /// Longest a write may stream its body to the upstream after its token
    /// was checked; see [`layers::InjectConfig::write_deadline`].
    pub write_deadline: Duration,
    pub read_methods: ReadMethods,
    pub reads_need_lease: bool,
    /// `/readyz` answers 200 even when not holding.
    pub ready_always: bool,
    /// TESTS ONLY: see [`layers::InjectConfig::unsafe_no_self_fence`].
    pub unsafe_no_self_fence: bool,
    pub connect_timeout: Duration,
    pub upstream_timeout: Duration,
    pub limits: ServerLimits,
    /// Event loops of the egress proxy (`--worker-threads`; 1: one thread
    /// for everything). More run nginx-style, a thread each accepting on
    /// the same socket ([`proxy::loops`]).
    pub workers: usize,
}

impl SidecarConfig {
    pub fn new(keeper: KeeperConfig, upstream: impl Into<String>) -> Self {
        let write_deadline = keeper.ttl;
        SidecarConfig {
            keeper,
            upstream: upstream.into(),
            upstream_host: None,
            fence_urls: vec![],
            write_deadline,
            read_methods: ReadMethods::default(),
            reads_need_lease: false,
            ready_always: false,
            unsafe_no_self_fence: false,
            connect_timeout: Duration::from_secs(5),
            upstream_timeout: Duration::from_secs(60),
            limits: ServerLimits::default(),
            workers: 1,
        }
    }
}

/// The running sidecar's shared state (for the local API).
#[derive(Debug)]
pub struct Sidecar {
    cfg: SidecarConfig,
    status: watch::Receiver<LockStatus>,
    keeper: parking_lot::Mutex<Option<Keeper>>,
    proxy_stats: Arc<ProxyStats>,
    stopping: Arc<AtomicBool>,
    registry: Registry,
}

impl Sidecar {
    /// Starts the keeper (campaigning at once).
    pub fn start(cfg: SidecarConfig, backend: Arc<dyn LeaseBackend>) -> Arc<Sidecar> {
        let fencer = Arc::new(fence::HttpFencer::new(cfg.fence_urls.clone()));
        let keeper = Keeper::spawn(backend, fencer, cfg.keeper.clone());
        let status = keeper.subscribe();
        let proxy_stats = Arc::new(ProxyStats::default());
        let mut registry = Registry::default();
        registry.register_collector(Box::new(SidecarCollector {
            lock: cfg.keeper.lock.clone(),
            status: status.clone(),
            keeper: keeper.stats.clone(),
            proxy: proxy_stats.clone(),
        }));
        Arc::new(Sidecar {
            cfg,
            status,
            keeper: parking_lot::Mutex::new(Some(keeper)),
            proxy_stats,
            stopping: Arc::new(AtomicBool::new(false)),
            registry,
        })
    }

    pub fn status(&self) -> watch::Receiver<LockStatus> {
        self.status.clone()
    }
}

/// Runs the sidecar on bound listeners until `shutdown` resolves.
pub async fn run(
    cfg: SidecarConfig,
    backend: Arc<dyn LeaseBackend>,
    listener: TcpListener,
    admin: TcpListener,
    health: Option<TcpListener>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let upstream = upstream_of(&cfg)?;
    let sc = Sidecar::start(cfg, backend);
    serve(sc, upstream, listener, admin, health, shutdown).await.map_err(|e| format!("the proxy's socket: {e}"))
}

/// A new upstream client (with its own pool) for `cfg`'s `--upstream`.
fn upstream_of(cfg: &SidecarConfig) -> Result<Upstream, String> {
    Upstream::new(&cfg.upstream, cfg.connect_timeout, cfg.upstream_timeout)?.with_host(cfg.upstream_host.as_deref())
}

/// Serves a started sidecar (see [`run`]); `upstream` is the first event
/// loop's (each other loop, `--worker-threads`, makes its own from the
/// config, with its own pool).
pub async fn serve(
    sc: Arc<Sidecar>,
    upstream: Upstream,
    listener: TcpListener,
    admin: TcpListener,
    health: Option<TcpListener>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = sc.cfg.limits.clone();
    // Which token the writes in flight may go on under, kept by one task for
    // all of them; owned here, closed and aborted once the proxy and the
    // keeper have stopped.
    let safe = safe::SafeToken::new(sc.status());
    let svc = proxy_service(&sc, upstream, &safe);

    let stop_proxy = CancellationToken::new();
    // The extra loops stop whenever this does, returning early (an error) or
    // dropped, and not only at the shutdown.
    let _stop_loops = stop_proxy.clone().drop_guard();
    let stop_admin = CancellationToken::new();
    tracing::info!(
        listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        admin = %admin.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        lock = %sc.cfg.keeper.lock, holder = %sc.cfg.keeper.holder, "sidecar serving"
    );
    // One connection cap for every loop accepting on the proxy's socket
    // (the admin port has its own, so probes get through a full proxy).
    let cap = proxy::connection_cap(&limits);
    let (listener, loops) = match sc.cfg.workers {
        0 | 1 => (listener, proxy::loops::Loops::default()),
        n => {
            let listening = listener.into_std()?;
            let listener = TcpListener::from_std(listening.try_clone()?)?;
            // Each other loop makes its own (with its own pool), from the config.
            upstream_of(&sc.cfg).map_err(std::io::Error::other)?;
            let (sc2, limits2, cap2, stop2) = (sc.clone(), limits.clone(), cap.clone(), stop_proxy.clone());
            let loops = proxy::loops::spawn(&listening, n - 1, "fencegate-sidecar", move |listener| async move {
                // The token watch of this loop's writes, on this loop's own
                // runtime: its cut-offs and deadlines fire with the writes'
                // timers, whatever the main thread is doing (stalled on a
                // full log pipe, say, as the keeper fails).
                let safe = safe::SafeToken::new(sc2.status());
                let keep = tokio::spawn(safe.clone().keep());
                let svc = proxy_service(&sc2, upstream_of(&sc2.cfg).expect("checked before the loops"), &safe);
                serve_proxy(listener, limits2, cap2, svc, stop2.cancelled_owned()).await;
                safe.close();
                keep.abort();
            })?;
            (listener, loops)
        }
    };
    let safe_task = tokio::spawn(safe.clone().keep());
    let proxy_task = serve_proxy(listener, limits.clone(), cap, svc, stop_proxy.clone().cancelled_owned());
    let sc2 = sc.clone();
    let admin_task =
        proxy::serve(admin, limits, move |req, _| sc2.clone().admin(req), stop_admin.clone().cancelled_owned());
    let admin_task = tokio::spawn(admin_task);
    let health_task = health.map(|h| {
        let sc = sc.clone();
        let limits = sc.cfg.limits.clone();
        let stop = stop_admin.clone().cancelled_owned();
        tokio::spawn(proxy::serve(h, limits, move |req, _| sc.clone().health(req), stop))
    });

    // Shutdown order: no new writes, drain the proxy, revoke, stop the API.
    let sc3 = sc.clone();
    let sp = stop_proxy.clone();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down: refusing new writes, draining");
        sc3.stopping.store(true, Ordering::Relaxed);
        sp.cancel();
    });
    proxy_task.await;
    // Every loop's writes in flight are over before the lease is revoked.
    loops.join().await;
    let keeper = sc.keeper.lock().take();
    if let Some(k) = keeper {
        k.shutdown().await;
    }
    // Still watching until here: a write that outlived the proxy's grace (a
    // connection still open a second after it) is cut off by the keeper's
    // last status, and by this at the latest.
    safe.close();
    safe_task.abort();
    stop_admin.cancel();
    let _ = admin_task.await;
    if let Some(h) = health_task {
        let _ = h.await;
    }
    tracing::info!("sidecar stopped");
    Ok(())
}

/// One event loop of the egress proxy: `svc` for each request.
fn serve_proxy<S>(
    listener: TcpListener,
    limits: ServerLimits,
    cap: Arc<tokio::sync::Semaphore>,
    svc: S,
    stop: impl std::future::Future<Output = ()>,
) -> impl std::future::Future<Output = ()>
where
    S: Service<Request<Incoming>, Response = http::Response<proxy::Body>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let handler = move |req: Request<Incoming>, _peer| {
        // Every layer here passes `poll_ready` on to a `service_fn`, which
        // is always ready: the call is made at once, and the future is the
        // layers' (boxed). A `oneshot` future would hold the service and the
        // request until its first poll, and this future is copied whole at
        // each move.
        let mut svc = svc.clone();
        let ready = svc.poll_ready(&mut std::task::Context::from_waker(std::task::Waker::noop()));
        let fut = match ready {
            std::task::Poll::Ready(Ok(())) => futures_util::future::Either::Left(svc.call(req)),
            _ => futures_util::future::Either::Right(svc.oneshot(req)),
        };
        fut.map(|r| r.unwrap_or_else(|never| match never {}))
    };
    proxy::serve_capped(listener, None, limits, cap, handler, stop)
}

/// The egress proxy's service: the app's fencing headers stripped, the
/// token injected into writes (or the write refused), each write bound to
/// the token it went with, then the request forwarded.
fn proxy_service(
    sc: &Sidecar,
    upstream: Upstream,
    safe: &Arc<safe::SafeToken>,
) -> impl Service<Request<Incoming>, Response = http::Response<proxy::Body>, Error = Infallible, Future: Send + 'static>
       + Clone
       + Send
       + 'static {
    // The app is on localhost: no X-Forwarded-For. The upstream is shared
    // behind an Arc so a request costs one reference count, not a client clone.
    let upstream = Arc::new(upstream);
    // The send's own future, mapped: an `async` block awaiting it would keep
    // the request twice (captured, then in the awaited future), and this
    // future is copied whole at each move through the layers.
    let forward = tower::service_fn(move |req: Request<Incoming>| {
        upstream.clone().send_owned(req, None).map(|r| {
            Ok::<_, Infallible>(match r {
                Ok(r) => r.map(proxy::stream),
                Err(e) => e.into_response(),
            })
        })
    });
    let inject = InjectConfig {
        lock: sc.cfg.keeper.lock.clone(),
        read_methods: sc.cfg.read_methods.clone(),
        reads_need_lease: sc.cfg.reads_need_lease,
        unsafe_no_self_fence: sc.cfg.unsafe_no_self_fence,
        write_deadline: sc.cfg.write_deadline,
    };
    ServiceBuilder::new()
        .layer(StripFencingLayer)
        .layer(InjectTokenLayer::new(inject.clone(), sc.status(), sc.proxy_stats.clone(), sc.stopping.clone()))
        .layer(BoundWritesLayer::new(inject, safe.clone()))
        .service(forward)
}
