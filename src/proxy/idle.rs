//! Idle tracking for one connection: the time of its last byte either way
//! and how many requests it has in flight. A connection is idle when it has
//! no request in flight and no bytes have moved for the idle timeout; a
//! request that waits quietly (at the filter's barrier, on a slow store) is
//! not idle.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

#[derive(Debug)]
struct Shared {
    start: Instant,
    /// Milliseconds from `start` to the last byte read or written.
    last_ms: AtomicU64,
    busy: AtomicUsize,
}

/// One connection's activity (cheap to clone: one `Arc`).
#[derive(Clone, Debug)]
pub struct Idle(Arc<Shared>);

/// A request in flight; the connection is busy until it is dropped.
#[derive(Debug)]
pub struct Busy(Arc<Shared>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
        touch(&self.0);
    }
}

fn touch(s: &Shared) {
    s.last_ms.store(s.start.elapsed().as_millis() as u64, Ordering::Relaxed);
}

impl Idle {
    pub fn new() -> Self {
        Idle(Arc::new(Shared { start: Instant::now(), last_ms: AtomicU64::new(0), busy: AtomicUsize::new(0) }))
    }

    /// Marks a request in flight.
    pub fn request(&self) -> Busy {
        self.0.busy.fetch_add(1, Ordering::Relaxed);
        Busy(self.0.clone())
    }

    /// Wraps the connection's stream so every byte counts as activity.
    pub fn wrap<T>(&self, io: T) -> IdleIo<T> {
        IdleIo { io, idle: self.0.clone() }
    }

    /// Resolves once the connection has been idle for `timeout`.
    pub async fn expired(&self, timeout: Duration) {
        loop {
            let quiet =
                self.0.start.elapsed().saturating_sub(Duration::from_millis(self.0.last_ms.load(Ordering::Relaxed)));
            if self.0.busy.load(Ordering::Relaxed) == 0 && quiet >= timeout {
                return;
            }
            // Busy connections are looked at again a full timeout later.
            tokio::time::sleep(timeout.saturating_sub(quiet).max(Duration::from_millis(10))).await;
        }
    }
}

impl Default for Idle {
    fn default() -> Self {
        Idle::new()
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

impl<B> BusyBody<B> {
    pub fn new(inner: B, busy: Busy) -> Self {
        BusyBody { inner, busy: Some(busy) }
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
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            touch(&self.idle);
        }
        r
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            touch(&self.idle);
        }
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

    #[tokio::test(start_paused = true)]
    async fn idle_only_without_requests_or_bytes() {
        let idle = Idle::new();
        let busy = idle.request();
        let t = Duration::from_secs(60);
        let waiting = tokio::spawn({
            let idle = idle.clone();
            async move { idle.expired(t).await }
        });
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert!(!waiting.is_finished(), "a request in flight is not idle");
        drop(busy);
        tokio::time::sleep(Duration::from_secs(59)).await;
        assert!(!waiting.is_finished(), "the timeout counts from the request's end");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(waiting.is_finished());
    }
}
