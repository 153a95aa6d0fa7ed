//! The sidecar's request path as two layers, each doing one thing before
//! calling the next (the shape of linkerd2-proxy's header layers):
//!
//! * [`StripFencing`] removes every `Fencing-*` header the app sent: the app
//!   is outside the trust boundary and must not forge tokens.
//! * [`InjectToken`] adds the lock and current token to writes, or answers
//!   503 `lease_not_held` without forwarding when the lock is not safely held.
//! * [`BoundWrites`] bounds a forwarded write's life: a token checked when the
//!   request starts could otherwise reach the filter long after (a slow
//!   connect, a long body). When the lock stops being safely held, or
//!   `write_deadline` passes (both watched for every write at once by
//!   [`super::safe::SafeToken`]), the upstream request is dropped: hyper
//!   closes its connection, so no more of the body goes out under that token.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response, StatusCode};
use serde_json::json;
use std::time::Duration;

use tokio::sync::watch;
use tower::{Layer, Service};

use crate::lease::deadline::Stamp;
use crate::lease::keeper::{LockStatus, Phase};
use crate::proxy::{json_error, Body};
use crate::token::{self, LockName, ReadMethods};

use super::safe::{Cutoff, SafeToken};

/// Removes app-sent `Fencing-*` headers.
#[derive(Clone, Debug, Default)]
pub struct StripFencingLayer;

impl<S> Layer<S> for StripFencingLayer {
    type Service = StripFencing<S>;
    fn layer(&self, inner: S) -> StripFencing<S> {
        StripFencing { inner }
    }
}

#[derive(Clone, Debug)]
pub struct StripFencing<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for StripFencing<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> S::Future {
        // Hop-by-hop headers first: an app's `Connection: fencing-token` would
        // otherwise make the upstream hop strip the injected token.
        crate::proxy::strip_hop_by_hop(req.headers_mut());
        token::strip_headers(req.headers_mut());
        self.inner.call(req)
    }
}

/// Counters of the sidecar's request path.
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub writes_forwarded: AtomicU64,
    pub writes_refused: AtomicU64,
    pub reads_forwarded: AtomicU64,
    pub reads_refused: AtomicU64,
}

/// What [`InjectToken`] needs to decide.
#[derive(Clone, Debug)]
pub struct InjectConfig {
    pub lock: LockName,
    pub read_methods: ReadMethods,
    /// Refuse reads too while the lock is not held.
    pub reads_need_lease: bool,
    /// TESTS ONLY: inject the last token held, whatever the lease's state,
    /// like a naive lock client; the filter is then the only defence.
    pub unsafe_no_self_fence: bool,
    /// See [`BoundWrites`].
    pub write_deadline: Duration,
}

#[derive(Clone, Debug)]
pub struct InjectTokenLayer {
    cfg: Arc<InjectConfig>,
    status: watch::Receiver<LockStatus>,
    stats: Arc<ProxyStats>,
    /// Set when the sidecar is shutting down: no new writes.
    stopping: Arc<std::sync::atomic::AtomicBool>,
    /// `Fencing-Lock`'s value, made once.
    lock_value: http::HeaderValue,
    /// `Fencing-Token`'s value, made once per token (see [`Self::token_value`]).
    token_value: Arc<parking_lot::Mutex<Option<(token::Token, http::HeaderValue)>>>,
}

impl InjectTokenLayer {
    pub fn new(
        cfg: InjectConfig,
        status: watch::Receiver<LockStatus>,
        stats: Arc<ProxyStats>,
        stopping: Arc<std::sync::atomic::AtomicBool>,
    ) -> Self {
        let lock_value = token::lock_header_value(&cfg.lock);
        let token_value = Arc::default();
        InjectTokenLayer { cfg: Arc::new(cfg), status, stats, stopping, lock_value, token_value }
    }

    /// `Fencing-Token`'s value for `t`: the one made for the last token if
    /// it is `t` (a lock changes hands rarely), else made and kept. Made
    /// afresh on every write it was an allocation and a formatting each.
    fn token_value(&self, t: token::Token) -> http::HeaderValue {
        let mut kept = self.token_value.lock();
        match &*kept {
            Some((k, v)) if *k == t => v.clone(),
            _ => {
                let v = token::token_header_value(t);
                *kept = Some((t, v.clone()));
                v
            }
        }
    }
}

impl<S> Layer<S> for InjectTokenLayer {
    type Service = InjectToken<S>;
    fn layer(&self, inner: S) -> InjectToken<S> {
        InjectToken { inner, layer: self.clone() }
    }
}

#[derive(Clone, Debug)]
pub struct InjectToken<S> {
    inner: S,
    layer: InjectTokenLayer,
}

type BoxFut<E> = Pin<Box<dyn Future<Output = Result<Response<Body>, E>> + Send>>;

impl<S, B> Service<Request<B>> for InjectToken<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFut<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let l = &self.layer;
        let is_write = l.cfg.read_methods.is_write(req.method());
        // Decide on the state as of now: the deadline is checked per request,
        // so a keeper that has not yet noticed a loss cannot leak a write.
        let (token, status) = {
            let s = l.status.borrow();
            let t = if l.cfg.unsafe_no_self_fence { s.last_token } else { s.write_token(Stamp::now()) };
            (t, s.phase)
        };
        let stopping = l.stopping.load(Ordering::Relaxed);
        if is_write || l.cfg.reads_need_lease {
            match token {
                Some(t) if !stopping => {
                    token::insert_header_values(req.headers_mut(), l.lock_value.clone(), l.token_value(t))
                }
                _ => {
                    let counter = if is_write { &l.stats.writes_refused } else { &l.stats.reads_refused };
                    counter.fetch_add(1, Ordering::Relaxed);
                    let resp = refusal(&l.cfg.lock, status, stopping);
                    return Box::pin(async move { Ok(resp) });
                }
            }
        }
        let counter = if is_write { &l.stats.writes_forwarded } else { &l.stats.reads_forwarded };
        counter.fetch_add(1, Ordering::Relaxed);
        Box::pin(self.inner.call(req))
    }
}

fn refusal(lock: &LockName, phase: Phase, stopping: bool) -> Response<Body> {
    let why = if stopping {
        "the sidecar is shutting down".to_string()
    } else {
        match phase {
            Phase::FencedOut => "a filter has seen a higher token than etcd gave this holder (etcd restored from an old snapshot?); see /v1/lock".into(),
            Phase::Holding => "the lease may have expired (no keep-alive acknowledged in time): self-fenced".into(),
            Phase::Fencing => "the lock was just won; the filters are being fenced".into(),
            Phase::AwaitingRejoin => {
                "the lock was lost and --rejoin is manual: re-read your state, then POST /v1/lock/rejoin".into()
            }
            _ => "this instance does not hold the lock".into(),
        }
    };
    let mut r = json_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "lease_not_held",
        &format!("write not forwarded: {why}"),
        Some(json!({ "lock": lock, "state": phase })),
    );
    r.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from_static("1"));
    r
}

/// Bounds writes that carry a token; see the module docs.
#[derive(Clone, Debug)]
pub struct BoundWritesLayer {
    cfg: Arc<InjectConfig>,
    safe: Arc<SafeToken>,
}

impl BoundWritesLayer {
    /// `safe` is kept by its task ([`SafeToken::keep`]), which the caller runs.
    pub fn new(cfg: InjectConfig, safe: Arc<SafeToken>) -> Self {
        BoundWritesLayer { cfg: Arc::new(cfg), safe }
    }
}

impl<S> Layer<S> for BoundWritesLayer {
    type Service = BoundWrites<S>;
    fn layer(&self, inner: S) -> BoundWrites<S> {
        BoundWrites { inner, layer: self.clone() }
    }
}

#[derive(Clone, Debug)]
pub struct BoundWrites<S> {
    inner: S,
    layer: BoundWritesLayer,
}

impl<S, B> Service<Request<B>> for BoundWrites<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFut<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let l = &self.layer;
        // Only requests that InjectToken gave a token (the app's own were stripped).
        let token = token::token_of(req.headers());
        let fut = self.inner.call(req);
        let Some(token) = token.filter(|_| !l.cfg.unsafe_no_self_fence) else { return Box::pin(fut) };
        let guard = l.safe.guard(token, crate::duration::after(l.cfg.write_deadline));
        Box::pin(CutOff { write: Write::Sending { fut }, guard, lock: l.cfg.lock.clone(), token })
    }
}

pin_project_lite::pin_project! {
    /// A forwarded write, or the answer that it was cut off once `guard`
    /// resolves. A struct, not an `async` block with a `select!`: that block
    /// keeps the write's future twice (captured, then pinned to be polled),
    /// and boxing it copied twice its size on every write.
    struct CutOff<F, G> {
        #[pin]
        write: Write<F>,
        #[pin]
        guard: G,
        lock: LockName,
        token: token::Token,
    }
}

pin_project_lite::pin_project! {
    /// The write's own future, dropped the moment it is cut off (that closes
    /// its upstream connection: no more of its body goes out).
    #[project = WriteProj]
    enum Write<F> {
        Sending { #[pin] fut: F },
        Dropped,
    }
}

impl<F, G, E> Future for CutOff<F, G>
where
    F: Future<Output = Result<Response<Body>, E>>,
    G: Future<Output = Cutoff>,
{
    type Output = Result<Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        // The guard first: when it fires on the same wake-up that lets the
        // write make progress, the write is dropped before it can hand
        // anything more to the upstream under a token no longer safe. The
        // price: a write whose answer arrived on that same wake-up is
        // reported cut off although the store answered it; the answer says
        // `"outcome": "unknown"`, which stays true.
        let Poll::Ready(why) = this.guard.poll(cx) else {
            return match this.write.as_mut().project() {
                WriteProj::Sending { fut } => fut.poll(cx),
                WriteProj::Dropped => Poll::Pending,
            };
        };
        this.write.set(Write::Dropped);
        let (lock, token) = (&*this.lock, this.token.get());
        tracing::warn!(%lock, token, reason = code(why), "write aborted while streaming to the upstream");
        Poll::Ready(Ok(answer(why, lock)))
    }
}

fn code(why: Cutoff) -> &'static str {
    match why {
        Cutoff::LeaseLost => "lease_not_held",
        Cutoff::Deadline => "write_deadline_exceeded",
    }
}

/// The answer to a write cut off mid-way.
fn answer(why: Cutoff, lock: &LockName) -> Response<Body> {
    let (status, text) = match why {
        Cutoff::LeaseLost => (StatusCode::SERVICE_UNAVAILABLE, "the lock stopped being safely held"),
        Cutoff::Deadline => (StatusCode::GATEWAY_TIMEOUT, "the write outlived --write-deadline"),
    };
    json_error(
        status,
        code(why),
        &format!("write aborted mid-way ({text}); it may or may not have been applied"),
        Some(json!({ "lock": lock, "outcome": "unknown" })),
    )
}
