//! How a client connection closes ([`Linger`]): at once, without a
//! `shutdown(2)`, unless the client may still be sending a request body the
//! server did not read; then nginx's lingering close.
//!
//! A proxy answers some requests before reading their bodies: the filter's
//! 409 to a stale write, the sidecar's 503 while it holds no lease. hyper
//! then closes the connection with the rest of the body unread, and a close
//! with unread bytes makes the kernel reset the connection. A client still
//! writing a large upload (Python's `http.client`, which reads the answer
//! only once it has sent everything) got "connection reset" instead of the
//! answer that said why. So when the server closes a connection that had an
//! HTTP/1 request with a body, and the client has not closed its side, the
//! write side is shut down (the answer, then the FIN) and what the client
//! still sends is read and dropped until it closes, sends nothing for
//! [`QUIET`], or [`MOST`] has passed (nginx's `lingering_timeout` and
//! `lingering_time`, the same 5 s and 30 s). Whether the body was
//! read whole cannot be seen from here, and one read to look would race
//! with a client between two writes: so every such close lingers, which
//! for a client that closes on the answer's FIN is one round trip. The
//! connection's own limits bound it too (no request is in flight: the
//! header timeout). A close for the server's shutdown does not linger, and
//! a shutdown that begins while one lingers ends it: it would hold the exit
//! up (and the sidecar's handoff). While it lingers the connection keeps
//! its place under `--max-connections` and its upstream connection, which
//! is parked only after it.
//!
//! Every other close is the socket's close alone: hyper's shutdown right
//! before it was one system call per connection more than nginx makes, for
//! the same FIN after the same bytes.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::idle::IdleIo;

/// Reads per poll while draining, so a client that sends without pause
/// cannot hold the thread (the connection's task polls its halves a few
/// rounds before it yields, `ConnSlot::run`: a few MiB at most).
const DRAIN_READS: usize = 16;

/// A lingering close ends when the client sends nothing for this long
/// (nginx's `lingering_timeout`)...
const QUIET: Duration = Duration::from_secs(5);

/// ... or this long after it began, whatever the client sends (nginx's
/// `lingering_time`).
const MOST: Duration = Duration::from_secs(30);

/// A client connection's stream, closed as the module's doc says.
#[derive(Debug)]
pub struct Linger<T> {
    /// Its activity tracking also says whether a close may linger.
    io: IdleIo<T>,
    /// A read has returned the end of the stream: the client has closed.
    eof: bool,
    state: State,
}

#[derive(Debug)]
enum State {
    Open,
    ShuttingDown,
    /// Until the client closes, is quiet until the timer, or the close has
    /// lingered for [`MOST`] (`until`).
    Draining {
        quiet: Pin<Box<tokio::time::Sleep>>,
        until: tokio::time::Instant,
    },
}

impl<T> Linger<T> {
    pub fn new(io: IdleIo<T>) -> Self {
        Linger { io, eof: false, state: State::Open }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Linger<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = (buf.filled().len(), buf.remaining());
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && before.1 > 0 && buf.filled().len() == before.0 {
            self.eof = true;
        }
        r
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Linger<T> {
    super::forward_writes!(io);

    /// Called once the server is done with the connection, which it closes
    /// when this returns: see the module's doc. (TLS writes its
    /// close_notify above this first, and what is drained here are the
    /// client's records, dropped unread.)
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                State::Open => {
                    ready!(Pin::new(&mut this.io).poll_flush(cx))?;
                    if this.eof || !this.io.may_linger() {
                        return Poll::Ready(Ok(()));
                    }
                    this.state = State::ShuttingDown;
                }
                // The server's shutdown began while this lingered: closed now
                // (`Ends::serve` polls the connection right after it marks it).
                _ if !this.io.may_linger() => return Poll::Ready(Ok(())),
                State::ShuttingDown => {
                    match ready!(Pin::new(&mut this.io).poll_shutdown(cx)) {
                        // The client has reset the connection already.
                        Err(e) if e.kind() == io::ErrorKind::NotConnected => return Poll::Ready(Ok(())),
                        r => r?,
                    }
                    let until = tokio::time::Instant::now() + MOST;
                    this.state = State::Draining { quiet: Box::pin(tokio::time::sleep(QUIET)), until };
                }
                State::Draining { quiet, until } => {
                    let (mut got, mut more) = (false, true);
                    for _ in 0..DRAIN_READS {
                        let mut raw = [MaybeUninit::<u8>::uninit(); 8192];
                        let mut buf = ReadBuf::uninit(&mut raw);
                        match Pin::new(&mut this.io).poll_read(cx, &mut buf) {
                            Poll::Ready(Ok(())) if !buf.filled().is_empty() => got = true,
                            // The end, or an error: the client is gone.
                            Poll::Ready(_) => return Poll::Ready(Ok(())),
                            Poll::Pending => {
                                more = false;
                                break;
                            }
                        }
                    }
                    if got {
                        quiet.as_mut().reset((tokio::time::Instant::now() + QUIET).min(*until));
                    }
                    if more {
                        // Read after read with no pause: the next poll reads
                        // on, unless the close has lingered for [`MOST`] (the
                        // timer's deadline is `until` at the latest; the
                        // hostile review's case: looked at only after a
                        // pause, a client that never paused lingered until
                        // the header timeout closed it).
                        if quiet.as_mut().poll(cx).is_ready() {
                            return Poll::Ready(Ok(()));
                        }
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    ready!(quiet.as_mut().poll(cx));
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A close that lingers behind a client that never pauses (its reads
    /// always find more) ends at [`MOST`]. Fails with the timer looked at
    /// only once the reads pause: the close lingers on past it.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_pauses_lingers_at_most_the_limit() {
        let idle = crate::proxy::idle::Idle::new();
        idle.body_coming();
        let stream = tokio::io::join(tokio::io::repeat(b'x'), tokio::io::sink());
        let mut conn = Linger::new(idle.wrap(stream));
        let mut close = std::pin::pin!(conn.shutdown());
        let mut poll = || close.as_mut().poll(&mut Context::from_waker(std::task::Waker::noop()));
        assert!(poll().is_pending(), "it lingers");
        tokio::time::advance(MOST - Duration::from_secs(1)).await;
        assert!(poll().is_pending(), "it lingers while the client sends, up to the limit");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(matches!(poll(), Poll::Ready(Ok(()))), "closed at the limit");
    }
}
