//! Idle tracking for one connection: whether bytes moved either way, and how
//! many requests it has started and has in flight. Two limits come from it:
//!
//! * **idle**: no request in flight and no bytes either way for the idle
//!   timeout; a request that waits quietly (at the filter's barrier, on a
//!   slow store) is not idle;
//! * **head**: no request in flight, none started, for the header timeout,
//!   bytes or not: a client that sends no request head (or dribbles one, a
//!   byte at a time) in that long is closed. This was hyper's own
//!   `header_read_timeout`, which armed a boxed timer for every request.
//! * **send**: an answer the client has stopped taking (the socket full, not
//!   a byte written) for the send timeout, request in flight or not (nginx's
//!   `send_timeout`). A frozen client otherwise held its answer's body, and
//!   with it the filter's hold on a write (`filter::held`): a newer holder
//!   waited for ever.
//!
//! Nothing here reads the clock per request or per byte: a byte sets a flag,
//! a request bumps two counters, and one timer per connection looks at them
//! [`TICKS`] times per timeout, so a limit takes effect between the timeout
//! and a quarter more (the clock read and the timer per request and per
//! read were about 3% of a hop's instructions).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How many looks per timeout: the limit's precision is a quarter of it.
pub const TICKS: u32 = 4;

#[derive(Debug, Default)]
struct Shared {
    /// Set by every byte read or written and every request's end; cleared
    /// by the watcher at each look.
    active: AtomicBool,
    /// Requests started and ended, ever (wrapping): the watcher compares it
    /// between looks. Ends count too, so that the header timeout counts from
    /// a request's end, not from the look before it (a quarter early).
    started: AtomicUsize,
    busy: AtomicUsize,
    /// The last write found the socket full; cleared by the next byte written.
    blocked: AtomicBool,
    /// Set by every byte written; cleared by the watcher at each look.
    wrote: AtomicBool,
    /// An HTTP/1 request with a body came: when the connection closes, the
    /// client may still be sending it (see `super::linger`).
    body: AtomicBool,
    /// The server is shutting down: the connection closes without
    /// lingering.
    draining: AtomicBool,
}

/// One connection's activity (cheap to clone: one `Arc`).
#[derive(Clone, Debug, Default)]
pub struct Idle(Arc<Shared>);

/// A request in flight; the connection is busy until it is dropped.
#[derive(Debug)]
pub struct Busy(Arc<Shared>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
        self.0.started.fetch_add(1, Ordering::Relaxed);
        touch(&self.0);
    }
}

fn touch(s: &Shared) {
    s.active.store(true, Ordering::Relaxed);
}

/// After a write: progress, or the socket full.
fn wrote(s: &Shared, r: &Poll<io::Result<usize>>) {
    match r {
        Poll::Ready(Ok(n)) if *n > 0 => {
            touch(s);
            s.wrote.store(true, Ordering::Relaxed);
            if s.blocked.load(Ordering::Relaxed) {
                s.blocked.store(false, Ordering::Relaxed);
            }
        }
        Poll::Pending => s.blocked.store(true, Ordering::Relaxed),
        _ => {}
    }
}

/// Which limit closed a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expired {
    /// No request and no bytes for the idle timeout.
    Idle,
    /// No request head in the header timeout.
    Head,
    /// The client took no byte of what was written for the send timeout.
    Send,
}

impl Idle {
    pub fn new() -> Self {
        Idle::default()
    }

    /// Marks a request in flight.
    pub fn request(&self) -> Busy {
        self.0.started.fetch_add(1, Ordering::Relaxed);
        self.0.busy.fetch_add(1, Ordering::Relaxed);
        Busy(self.0.clone())
    }

    /// Marks that an HTTP/1 request with a body came on this connection.
    pub fn body_coming(&self) {
        if !self.0.body.load(Ordering::Relaxed) {
            self.0.body.store(true, Ordering::Relaxed);
        }
    }

    /// Marks the connection as closing for the server's shutdown.
    pub fn draining(&self) {
        self.0.draining.store(true, Ordering::Relaxed);
    }

    /// Wraps the connection's stream so every byte counts as activity.
    pub fn wrap<T>(&self, io: T) -> IdleIo<T> {
        IdleIo { io, idle: self.0.clone() }
    }

    /// Resolves once the connection has been idle for `idle`, has gone
    /// `head` without a request, or has had its writes blocked for `send`
    /// (see the module's doc), whichever is first.
    /// A zero `send` is no send timeout.
    pub async fn expired(&self, idle: Duration, head: Duration, send: Duration) -> Expired {
        let send = if send.is_zero() { crate::duration::FAR } else { send };
        // At most `FAR`: the interval adds its period to the clock at each look.
        let tick = (idle.min(head).min(send) / TICKS).clamp(Duration::from_millis(10), crate::duration::FAR);
        let mut looks = tokio::time::interval_at(crate::duration::after(tick), tick);
        looks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut quiet, mut waiting, mut stuck) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        let mut seen = self.0.started.load(Ordering::Relaxed);
        let mut was_blocked = false;
        loop {
            looks.tick().await;
            let active = self.0.active.swap(false, Ordering::Relaxed);
            // Stuck for a whole tick: blocked at the last look and at this
            // one, and not a byte written between them (a write blocked just
            // before a look counts from that look, not from the one before).
            let blocked = self.0.blocked.load(Ordering::Relaxed);
            let wrote = self.0.wrote.swap(false, Ordering::Relaxed);
            stuck = if blocked && was_blocked && !wrote { stuck + tick } else { Duration::ZERO };
            was_blocked = blocked;
            if stuck >= send {
                return Expired::Send;
            }
            let started = self.0.started.load(Ordering::Relaxed);
            if self.0.busy.load(Ordering::Relaxed) > 0 || started != seen {
                // A request in flight, or one that came and went since the last look.
                (quiet, waiting, seen) = (Duration::ZERO, Duration::ZERO, started);
                continue;
            }
            waiting += tick;
            quiet = if active { Duration::ZERO } else { quiet + tick };
            if waiting >= head {
                return Expired::Head;
            }
            if quiet >= idle {
                return Expired::Idle;
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its connection busy until it ends (or is
    /// dropped).
    pub struct BusyBody<B> {
        #[pin]
        inner: B,
        busy: Option<Busy>,
    }
}

pin_project_lite::pin_project! {
    /// A handler's answer whose body keeps the connection busy until it ends.
    /// A struct, not an `async` block: that block would keep the handler's
    /// future twice (captured, then pinned to be awaited), and hyper boxes
    /// it, copying it whole, on every request.
    pub struct Served<F> {
        #[pin]
        fut: F,
        busy: Option<Busy>,
    }
}

impl<F> Served<F> {
    pub fn new(fut: F, busy: Busy) -> Self {
        Served { fut, busy: Some(busy) }
    }
}

impl<F, B> Future for Served<F>
where
    F: Future<Output = http::Response<B>>,
{
    type Output = Result<http::Response<BusyBody<B>>, std::convert::Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let resp = std::task::ready!(this.fut.poll(cx));
        let busy = this.busy.take();
        Poll::Ready(Ok(resp.map(|inner| BusyBody { inner, busy })))
    }
}

impl<B: http_body::Body> http_body::Body for BusyBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let r = this.inner.poll_frame(cx);
        if matches!(r, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.busy.take();
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A stream that records activity on every byte read or written.
#[derive(Debug)]
pub struct IdleIo<T> {
    io: T,
    idle: Arc<Shared>,
}

impl<T> IdleIo<T> {
    /// Whether the connection's close may linger: [`Idle::body_coming`] was
    /// called, and [`Idle::draining`] was not.
    pub fn may_linger(&self) -> bool {
        self.idle.body.load(Ordering::Relaxed) && !self.idle.draining.load(Ordering::Relaxed)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            touch(&self.idle);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, data);
        wrote(&self.idle, &r);
        r
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        wrote(&self.idle, &r);
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn watch(idle: &Idle, t: Duration, head: Duration) -> tokio::task::JoinHandle<Expired> {
        let idle = idle.clone();
        tokio::spawn(async move { idle.expired(t, head, HOUR).await })
    }

    #[tokio::test(start_paused = true)]
    async fn idle_only_without_requests_or_bytes() {
        let idle = Idle::new();
        let busy = idle.request();
        let t = Duration::from_secs(60);
        let waiting = watch(&idle, t, HOUR);
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert!(!waiting.is_finished(), "a request in flight is not idle");
        drop(busy);
        tokio::time::sleep(Duration::from_secs(59)).await;
        assert!(!waiting.is_finished(), "the timeout counts from the request's end");
        // Within a quarter of the timeout after it.
        tokio::time::sleep(Duration::from_secs(17)).await;
        assert_eq!(waiting.await.unwrap(), Expired::Idle);
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_keep_a_connection_from_idling_but_not_from_the_head_timeout() {
        let idle = Idle::new();
        let (t, head) = (Duration::from_secs(10), Duration::from_secs(30));
        let waiting = watch(&idle, t, head);
        // A byte a second, never a whole request head (slowloris).
        for _ in 0..29 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            touch(&idle.0);
        }
        assert!(!waiting.is_finished(), "bytes are activity: not idle, and the head has time left");
        for _ in 0..9 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            touch(&idle.0);
        }
        assert!(waiting.is_finished(), "no request head within the header timeout and a quarter");
        assert_eq!(waiting.await.unwrap(), Expired::Head);
    }

    /// Found in review: a look saw the request in flight, the request ended
    /// just before the next look, and that look counted a whole tick of
    /// waiting for a head, so the connection was closed three quarters of the
    /// header timeout after the request's end. Fails without the end counted
    /// (closed 24 s after it here).
    #[tokio::test(start_paused = true)]
    async fn the_header_timeout_counts_from_a_requests_end() {
        let idle = Idle::new();
        let head = Duration::from_secs(32);
        let busy = idle.request();
        let waiting = watch(&idle, HOUR, head);
        // Looks every 8 s: at 8 s the request is in flight; it ends just before the look at 16 s.
        tokio::time::sleep(Duration::from_millis(15_999)).await;
        drop(busy);
        tokio::time::sleep(head - Duration::from_millis(2)).await;
        assert!(!waiting.is_finished(), "closed before the header timeout had passed since the request's end");
        tokio::time::sleep(head / TICKS + Duration::from_millis(10)).await;
        assert_eq!(waiting.await.unwrap(), Expired::Head);
    }

    /// A client that stops taking its answer (a frozen zombie, say) is
    /// closed after the send timeout, request in flight or not; one that
    /// takes some of it now and then is not.
    #[tokio::test(start_paused = true)]
    async fn a_client_taking_nothing_is_closed_after_the_send_timeout() {
        let idle = Idle::new();
        let _busy = idle.request();
        let send = Duration::from_secs(60);
        let watching = idle.clone();
        let waiting = tokio::spawn(async move { watching.expired(HOUR, HOUR, send).await });
        for _ in 0..300 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            wrote(&idle.0, &Poll::Ready(Ok(1)));
            wrote(&idle.0, &Poll::Pending);
        }
        assert!(!waiting.is_finished(), "a byte a second is taken: not stuck");
        tokio::time::sleep(send - Duration::from_secs(1)).await;
        assert!(!waiting.is_finished(), "closed before the send timeout");
        // Within a quarter of the timeout after it, and a look's alignment.
        tokio::time::sleep(send / TICKS * 2 + Duration::from_secs(1)).await;
        assert_eq!(waiting.await.unwrap(), Expired::Send);

        // A zero send timeout is none (it closed every connection at its
        // first look before).
        let idle = Idle::new();
        let _busy = idle.request();
        let watching = idle.clone();
        let t = Duration::from_secs(40);
        let waiting = tokio::spawn(async move { watching.expired(t, t, Duration::ZERO).await });
        wrote(&idle.0, &Poll::Pending);
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(!waiting.is_finished(), "no send timeout");
    }

    #[tokio::test(start_paused = true)]
    async fn requests_that_come_and_go_between_looks_keep_a_connection_open() {
        let idle = Idle::new();
        let (t, head) = (Duration::from_secs(10), Duration::from_secs(10));
        let waiting = watch(&idle, t, head);
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            drop(idle.request());
        }
        assert!(!waiting.is_finished(), "a request a second: neither idle nor waiting for a head");
        tokio::time::sleep(Duration::from_millis(12_600)).await;
        assert!(waiting.is_finished());
    }
}
