//! One downstream connection's own upstream connection ([`ConnSlot`]),
//! driven in the downstream connection's task beside it ([`ConnSlot::run`]),
//! and the response timeout that its requests share ([`ConnSlot::within`]).
//! [`super::Upstream`] sends on it; the accept loop creates one per HTTP/1
//! connection.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use http::header::HeaderValue;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::super::body::RequestBody;
use super::joined::Joined;
use super::pool::{IdlePool, Parked};

pub(super) type UpConn = http1::Connection<TokioIo<TcpStream>, RequestBody>;

tokio::task_local! {
    /// The current downstream connection's upstream slot (set by the accept
    /// loop around each HTTP/1 connection's task).
    pub(super) static SLOT: Arc<ConnSlot>;
}

/// One downstream connection's own upstream connection. The accept loop
/// creates one per connection and serves the connection in
/// [`ConnSlot::run`].
#[derive(Debug, Default)]
pub struct ConnSlot {
    inner: parking_lot::Mutex<SlotInner>,
    /// The connection task, woken when a new upstream connection is installed.
    waker: AtomicWaker,
    /// The response timeout's timer, kept from one request to the next
    /// (see [`ConnSlot::within`]).
    timer: parking_lot::Mutex<Timer>,
    /// Set once a request that outlives its client drives this slot's
    /// upstream connection ([`Detached`]): the connection task, about to
    /// end with its client's connection, polls it no more.
    taken: AtomicBool,
    /// A request on it authenticated the upstream connection itself
    /// (`headers::binds_connection`: NTLM, Negotiate): the store now runs
    /// whatever comes on that connection as this client's user, so it is
    /// closed with the slot, never parked for another client.
    bound: AtomicBool,
    /// The downstream connection's place under `--max-connections`, kept
    /// by whoever holds the slot last: the connection's task, or a
    /// [`Detached`] carrying a write on after its client left; then by its
    /// upstream connection while that is parked ([`IdlePool`]). So clients
    /// that send writes and leave, or open a connection per request, cannot
    /// have more upstream connections open than the cap allows.
    _place: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Where the upstream connection goes, idle, when the downstream
    /// connection ends, and where a new one is looked for first
    /// ([`ConnSlot::reuse`]).
    pool: Option<Arc<IdlePool>>,
}

/// The response timeout's timer, and when the last request started (the
/// clock read that sets the timer: an idle connection has been idle since
/// then at most, see [`IdlePool`]).
#[derive(Debug, Default)]
struct Timer {
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    sent: Option<tokio::time::Instant>,
}

#[derive(Default)]
struct SlotInner {
    /// Which upstream the connection goes to (one server, one upstream; a
    /// request for another one uses the pool).
    authority: Option<HeaderValue>,
    sender: Option<http1::SendRequest<RequestBody>>,
    conn: Option<Pin<Box<UpConn>>>,
}

impl std::fmt::Debug for SlotInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotInner").field("authority", &self.authority).field("open", &self.conn.is_some()).finish()
    }
}

impl ConnSlot {
    /// A slot for a connection that holds `place` under the connection cap
    /// (released when the last holder of the slot drops it), sharing idle
    /// upstream connections with the other connections of its accept loop
    /// through `pool`.
    pub fn new(place: tokio::sync::OwnedSemaphorePermit, pool: Arc<IdlePool>) -> Self {
        ConnSlot {
            inner: Default::default(),
            waker: Default::default(),
            timer: Default::default(),
            taken: Default::default(),
            bound: Default::default(),
            _place: Some(place),
            pool: Some(pool),
        }
    }

    /// Runs `serve` (a downstream connection) with this slot as the one
    /// [`super::Upstream::send`] uses, and drives the upstream connection beside it
    /// in the same task; resolves with `serve`. Dropping it closes the
    /// upstream connection. The two halves have a waker each ([`Joined`]),
    /// so that their wake-ups of each other skip the scheduler.
    pub fn run<F: Future>(self: Arc<Self>, serve: F) -> impl Future<Output = F::Output> {
        let serve = Box::pin(SLOT.scope(self.clone(), serve));
        Joined::new(serve, move |cx: &mut Context<'_>| self.poll_drive(cx))
    }

    fn poll_drive(&self, cx: &mut Context<'_>) {
        if !self.taken.load(SeqCst) {
            let _ = self.poll_conn(cx);
        }
    }

    /// Polls the upstream connection, if there is one; `Ready` when it has
    /// just ended.
    fn poll_conn(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.waker.register(cx.waker());
        let mut g = self.inner.lock();
        if let Some(c) = g.conn.as_mut() {
            if let Poll::Ready(r) = c.as_mut().poll(cx) {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "upstream connection ended");
                }
                // Closed (by the store, an error, or an abandoned request):
                // the next request opens a new one.
                g.conn = None;
                g.sender = None;
                return Poll::Ready(());
            }
        }
        Poll::Pending
    }

    /// `fut`, or `Err` if it has not finished `timeout` from now. One timer
    /// serves all of this connection's requests (one at a time): moving its
    /// deadline later is an atomic update in tokio's timer wheel, where a
    /// timer per request (`tokio::time::timeout`) was an insertion into the
    /// wheel and a removal. Once a request is answered the timer stays
    /// armed; if no request moves it on, it fires once, for nothing.
    pub(super) fn within<F: Future>(&self, timeout: Duration, fut: F) -> Within<'_, F> {
        let now = tokio::time::Instant::now();
        let deadline = crate::duration::after_at(now, timeout);
        let mut timer = self.timer.lock();
        timer.sent = Some(now);
        match timer.sleep.as_mut() {
            Some(t) => t.as_mut().reset(deadline),
            None => timer.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
        Within { fut, slot: self }
    }

    pub(super) fn take(&self, authority: &HeaderValue) -> Option<http1::SendRequest<RequestBody>> {
        let mut g = self.inner.lock();
        if g.authority.as_ref() != Some(authority) {
            return None;
        }
        g.sender.take().filter(|s| !s.is_closed())
    }

    /// Installs an idle connection to `authority` from the accept loop's
    /// pool, if there is one, and returns its sender (see [`IdlePool`]).
    pub(super) fn reuse(&self, authority: &HeaderValue) -> Option<http1::SendRequest<RequestBody>> {
        let (sender, conn) = self.pool.as_ref()?.take(authority)?;
        self.install_boxed(authority.clone(), conn);
        Some(sender)
    }

    /// Marks the upstream connection as authenticated for this client
    /// (see `bound`): it is not parked when the slot ends.
    pub(super) fn bind(&self) {
        self.bound.store(true, SeqCst);
    }

    pub(super) fn put(&self, sender: http1::SendRequest<RequestBody>) {
        self.inner.lock().sender = Some(sender);
    }

    /// Closes the upstream connection now, without flushing what hyper
    /// holds of a request or shutting down its write side first (its socket
    /// lingers 0: the close resets it and drops what the kernel still
    /// queues). For a request given up on, before anything else is polled.
    pub(super) fn abandon(&self) {
        let mut g = self.inner.lock();
        let (conn, sender) = (g.conn.take(), g.sender.take());
        drop(g);
        drop((sender, conn));
    }

    /// Hands the driving of this slot's upstream connection, the one open
    /// now and any a request still in flight opens later, to the caller
    /// ([`Detached`]). Only when the client's connection is ending (hyper
    /// drops a request's future only with its HTTP/1 connection).
    pub(super) fn detach(self: &Arc<Self>) -> Detached {
        self.taken.store(true, SeqCst);
        Detached(self.clone())
    }

    pub(super) fn install(&self, authority: HeaderValue, conn: UpConn) {
        self.install_boxed(authority, Box::pin(conn));
    }

    fn install_boxed(&self, authority: HeaderValue, conn: Pin<Box<UpConn>>) {
        let mut g = self.inner.lock();
        g.authority = Some(authority);
        g.sender = None;
        // Replaces (closes) an older connection.
        g.conn = Some(conn);
        drop(g);
        self.waker.wake();
    }
}

impl Drop for ConnSlot {
    /// The downstream connection is over (and any write carried on after
    /// its client left, which took the slot): its upstream connection, if
    /// idle, goes to the pool. A request given up on closed it already
    /// (`abandon`), and a taken slot's was closed by its [`Detached`]; one
    /// a client authenticated (`bound`) closes here.
    fn drop(&mut self) {
        let (Some(pool), false, false) = (&self.pool, *self.taken.get_mut(), *self.bound.get_mut()) else { return };
        let since = self.timer.get_mut().sent;
        let g = self.inner.get_mut();
        if let (Some(authority), Some(sender), Some(conn), Some(since)) =
            (g.authority.take(), g.sender.take(), g.conn.take(), since)
        {
            // The connection keeps the client connection's place under the
            // cap while it is parked.
            pool.park(Parked { authority, sender, conn, since, _place: self._place.take() });
        }
    }
}

/// A slot whose upstream connection outlives its client
/// ([`super::detach_current`]): what it was answering is read on, in
/// another task. Dropping it closes the connection.
pub struct Detached(Arc<ConnSlot>);

impl Detached {
    /// Drives the slot's upstream connection (one a request in flight opens
    /// later too: installing it wakes this) until `fut` (which reads its
    /// answer) resolves; the connection is then closed. A connection that
    /// ends first breaks its answer off, which `fut` then sees.
    pub async fn drive_until<F: Future>(self, fut: F) -> F::Output {
        let mut fut = std::pin::pin!(fut);
        std::future::poll_fn(|cx| loop {
            if let Poll::Ready(out) = fut.as_mut().poll(cx) {
                return Poll::Ready(out);
            }
            if self.0.poll_conn(cx).is_pending() {
                return Poll::Pending;
            }
        })
        .await
    }
}

impl Drop for Detached {
    fn drop(&mut self) {
        self.0.abandon();
    }
}

impl std::fmt::Debug for Detached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Detached")
    }
}

/// Closes the slot's connection ([`ConnSlot::abandon`]) when dropped, unless
/// disarmed: held by a request from before it is sent until its response
/// head arrives.
pub(super) struct Abandon<'a>(Option<&'a ConnSlot>);

impl<'a> Abandon<'a> {
    pub(super) fn new(slot: &'a ConnSlot) -> Self {
        Abandon(Some(slot))
    }

    pub(super) fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for Abandon<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.0 {
            slot.abandon();
        }
    }
}

pin_project_lite::pin_project! {
    /// See [`ConnSlot::within`]. A struct, not an `async fn`: an `async fn`
    /// keeps its argument and the pinned copy it polls, twice the size, and
    /// request futures are copied whole at every move.
    pub(super) struct Within<'a, F> {
        #[pin]
        fut: F,
        slot: &'a ConnSlot,
    }
}

impl<F: Future> Future for Within<'_, F> {
    type Output = Result<F::Output, ()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.fut.poll(cx) {
            return Poll::Ready(Ok(out));
        }
        match this.slot.timer.lock().sleep.as_mut().map(|t| t.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Err(())),
            _ => Poll::Pending,
        }
    }
}
