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

pub mod fence;
pub mod layers;
pub mod safe;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Registry;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tower::{Service, ServiceBuilder, ServiceExt};

use crate::lease::deadline::Stamp;
use crate::lease::keeper::{Keeper, KeeperConfig, KeeperStats, LockStatus, Phase};
use crate::lease::LeaseBackend;
use crate::metrics;
use crate::proxy::{self, json_response, Body, ServerLimits, Upstream};
use crate::token::ReadMethods;
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
        }
    }
}

/// The running sidecar's shared state (for the local API).
#[derive(Debug)]
pub struct Sidecar {
    cfg: SidecarConfig,
    status: watch::Receiver<LockStatus>,
    keeper: parking_lot::Mutex<Option<Keeper>>,
    keeper_stats: Arc<KeeperStats>,
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
        let keeper_stats = keeper.stats.clone();
        Arc::new_cyclic(|weak: &std::sync::Weak<Sidecar>| {
            let mut registry = Registry::default();
            registry.register_collector(Box::new(SidecarCollector(weak.clone())));
            Sidecar {
                cfg,
                status,
                keeper: parking_lot::Mutex::new(Some(keeper)),
                keeper_stats,
                proxy_stats: Arc::new(ProxyStats::default()),
                stopping: Arc::new(AtomicBool::new(false)),
                registry,
            }
        })
    }

    pub fn status(&self) -> watch::Receiver<LockStatus> {
        self.status.clone()
    }

    fn lock_json(&self) -> Value {
        let s = self.status.borrow().clone();
        let now = Stamp::now();
        let holding = s.write_token(now).is_some();
        json!({
            "lock": self.cfg.keeper.lock,
            "holder": self.cfg.keeper.holder,
            "holding": holding,
            "state": s.phase,
            "token": s.token,
            "last_token": s.last_token,
            "lease_id": s.lease_id.map(|l| format!("{l:x}")),
            "ttl_ms": s.ttl.as_millis() as u64,
            "valid_for_ms": s.valid_for(now).as_millis() as u64,
            "safety_margin_ms": self.cfg.keeper.margin.as_millis() as u64,
            "fenced_out": s.phase == Phase::FencedOut,
            "fenced_out_highest": s.fenced_out_highest,
            "rejoin": self.cfg.keeper.rejoin,
            "last_error": s.last_error,
        })
    }

    /// The health port: probes and metrics only, safe to expose on the pod IP
    /// for kubelet while the local API stays on localhost.
    pub async fn health(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/healthz" | "/readyz" | "/metrics") => self.admin(req).await,
            (m, p) => {
                proxy::json_error(StatusCode::NOT_FOUND, "not_found", &format!("no such endpoint: {m} {p}"), None)
            }
        }
    }

    /// The local API.
    pub async fn admin(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/healthz") => proxy::text_response(StatusCode::OK, "text/plain", "ok\n"),
            (&Method::GET, "/readyz") => {
                let holding = self.status.borrow().write_token(Stamp::now()).is_some();
                if holding || self.cfg.ready_always {
                    proxy::text_response(StatusCode::OK, "text/plain", "ready\n")
                } else {
                    proxy::text_response(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not holding the lock\n")
                }
            }
            (&Method::GET, "/metrics") => proxy::text_response(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                metrics::render(&self.registry),
            ),
            (&Method::GET, "/v1/lock") => json_response(StatusCode::OK, &self.lock_json()),
            (&Method::GET, "/v1/lock/events") => self.events(),
            (&Method::POST, "/v1/lock/release") => {
                let mut status = self.status.clone();
                // The token the app may have seen: the release is of that
                // one only, so that a lock lost and won again before the
                // keeper reads the command is not given up, and nothing is
                // released at all when none was held.
                let Some(token) = status.borrow_and_update().token else {
                    return json_response(StatusCode::ACCEPTED, &json!({ "released": false }));
                };
                if let Some(k) = self.keeper.lock().as_ref() {
                    k.release_token(token);
                }
                // Answered once the keeper has withdrawn the token (it does
                // so before it revokes, and a fence under way is ended), so
                // that no write the app sends after this answer carries it,
                // whichever thread serves that write. Bounded, for a keeper
                // that does not answer. A token that changed (withdrawn, or
                // lost and a new one won) is withdrawn.
                let changed = status.wait_for(|s| s.token != Some(token));
                let withdrawn = matches!(tokio::time::timeout(Duration::from_secs(2), changed).await, Ok(Ok(_)));
                // Not null only when the lock was lost and won again meanwhile
                // (or the token was not withdrawn): the app is still the holder.
                let now = self.status.borrow().token.map(|t| t.get());
                json_response(StatusCode::ACCEPTED, &json!({ "released": true, "withdrawn": withdrawn, "token": now }))
            }
            (&Method::POST, "/v1/lock/rejoin") => {
                let rejoined = self.keeper.lock().as_ref().is_some_and(|k| k.rejoin());
                json_response(StatusCode::ACCEPTED, &json!({ "rejoined": rejoined }))
            }
            (m, p) => {
                proxy::json_error(StatusCode::NOT_FOUND, "not_found", &format!("no such endpoint: {m} {p}"), None)
            }
        }
    }

    /// Server-Sent Events: one event per change of state or token, plus a
    /// `self_fenced` event the moment the safety deadline passes without a
    /// keep-alive, which can come before the keeper itself gives up.
    fn events(self: Arc<Self>) -> Response<Body> {
        struct St {
            sc: Arc<Sidecar>,
            rx: watch::Receiver<LockStatus>,
            last: Option<(Phase, Option<u64>, bool)>,
        }
        let rx = self.status.clone();
        let st = St { sc: self, rx, last: None };
        let stream = futures_util::stream::unfold(st, |mut st| async move {
            // A comment line every 15 s keeps idle proxies from closing the stream.
            let keep_alive_at = tokio::time::Instant::now() + Duration::from_secs(15);
            loop {
                let s = st.rx.borrow_and_update().clone();
                let now = Stamp::now();
                let valid = s.write_token(now).is_some();
                let key = (s.phase, s.token.map(|t| t.get()), valid);
                if st.last != Some(key) {
                    let event = match (s.phase, valid) {
                        (Phase::Holding, true) => "acquired",
                        (Phase::Holding, false) => "self_fenced",
                        (Phase::FencedOut, _) => "fenced_out",
                        (Phase::Fencing, _) => "fencing",
                        (Phase::Stopped, _) => "stopped",
                        (Phase::AwaitingRejoin, _) => "awaiting_rejoin",
                        (Phase::Campaigning, _)
                            if matches!(st.last, Some((Phase::Holding | Phase::Fencing | Phase::FencedOut, ..))) =>
                        {
                            "lost"
                        }
                        (Phase::Campaigning, _) => "campaigning",
                    };
                    st.last = Some(key);
                    let data = st.sc.lock_json();
                    let frame = Bytes::from(format!("event: {event}\ndata: {data}\n\n"));
                    return Some((frame, st));
                }
                // Wake at the self-fencing deadline (it passes without a message), in short steps
                // while it is ahead: the deadline may pass on CLOCK_BOOTTIME during a suspend.
                let step = tokio::time::Instant::now() + Duration::from_millis(100);
                let wake = if valid { s.valid_until.map_or(step, |d| d.mono().min(step)) } else { keep_alive_at };
                tokio::select! {
                    r = st.rx.changed() => if r.is_err() { return None },
                    _ = tokio::time::sleep_until(wake.min(keep_alive_at)) => {
                        if tokio::time::Instant::now() >= keep_alive_at {
                            return Some((Bytes::from_static(b": keep-alive\n\n"), st));
                        }
                    }
                }
            }
        });
        let body = StreamBody::new(stream.map(|b| Ok::<_, hyper::Error>(Frame::data(b)))).boxed_unsync();
        let mut r = Response::new(body);
        let h = r.headers_mut();
        h.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/event-stream"));
        h.insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-cache"));
        r
    }
}

#[derive(Debug)]
struct SidecarCollector(std::sync::Weak<Sidecar>);

impl Collector for SidecarCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let Some(sc) = self.0.upgrade() else { return Ok(()) };
        let s = sc.status.borrow().clone();
        let lock = || vec![("lock", sc.cfg.keeper.lock.to_string())];
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
        let ks = &sc.keeper_stats;
        let ps = &sc.proxy_stats;
        let ld = |v: &std::sync::atomic::AtomicU64| v.load(Ordering::Relaxed);
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

/// Runs the sidecar on bound listeners until `shutdown` resolves.
pub async fn run(
    cfg: SidecarConfig,
    backend: Arc<dyn LeaseBackend>,
    listener: TcpListener,
    admin: TcpListener,
    health: Option<TcpListener>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let upstream = Upstream::new(&cfg.upstream, cfg.connect_timeout, cfg.upstream_timeout)?
        .with_host(cfg.upstream_host.as_deref())?;
    let sc = Sidecar::start(cfg, backend);
    serve(sc, upstream, listener, admin, health, shutdown).await;
    Ok(())
}

/// Serves a started sidecar (see [`run`]).
pub async fn serve(
    sc: Arc<Sidecar>,
    upstream: Upstream,
    listener: TcpListener,
    admin: TcpListener,
    health: Option<TcpListener>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let limits = sc.cfg.limits.clone();
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
    // Which token the writes in flight may go on under, kept by one task for
    // all of them; owned here, closed and aborted once the proxy and the
    // keeper have stopped.
    let safe = safe::SafeToken::new(sc.status());
    let safe_task = tokio::spawn(safe.clone().keep());
    let svc = ServiceBuilder::new()
        .layer(StripFencingLayer)
        .layer(InjectTokenLayer::new(inject.clone(), sc.status(), sc.proxy_stats.clone(), sc.stopping.clone()))
        .layer(BoundWritesLayer::new(inject, safe.clone()))
        .service(forward);

    let stop_proxy = CancellationToken::new();
    let stop_admin = CancellationToken::new();
    tracing::info!(
        listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        admin = %admin.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        lock = %sc.cfg.keeper.lock, holder = %sc.cfg.keeper.holder, "sidecar serving"
    );
    let proxy_task = proxy::serve(
        listener,
        limits.clone(),
        move |req: Request<Incoming>, _peer| {
            // Every layer here passes `poll_ready` on to a `service_fn`, which
            // is always ready: the call is made at once, and the future is
            // the layers' (boxed). A `oneshot` future would hold the service
            // and the request until its first poll, and this future is
            // copied whole at each move.
            let mut svc = svc.clone();
            let ready = svc.poll_ready(&mut std::task::Context::from_waker(std::task::Waker::noop()));
            let fut = match ready {
                std::task::Poll::Ready(Ok(())) => futures_util::future::Either::Left(svc.call(req)),
                _ => futures_util::future::Either::Right(svc.oneshot(req)),
            };
            fut.map(|r| r.unwrap_or_else(|never| match never {}))
        },
        stop_proxy.clone().cancelled_owned(),
    );
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
}
