//! One accepted client connection served as HTTP/1.1 or h2c (HTTP/2 with
//! prior knowledge), told apart by its first bytes: [`Builders::serve`].
//!
//! Why not hyper-util's `auto` builder, which does the same: it reads the
//! first 24 bytes (the length of HTTP/2's preface) on their own, so every
//! HTTP/1 connection took one system call more than it needs (hyper then
//! read the rest of the head again), and its stream stayed wrapped in a
//! rewinding reader checked on every read. Here the first read is a whole
//! buffer's worth: a request head that came in one segment is read once,
//! as nginx reads it, and what was read is handed to hyper ahead of the
//! socket ([`Prefixed`]) until it has taken it.
//!
//! An h2c connection's streams each take a place under the connection cap
//! ([`Placing`]); an HTTP/1 connection's service is served as it is.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use hyper::body::{Body, Incoming};
use hyper::rt::bounds::Http2ServerConnExec;
use hyper::server::conn::{http1, http2};
use hyper::service::HttpService;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::streams::{Places, Placing};

/// What an HTTP/2 client with prior knowledge sends first (RFC 9113, 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The first read's size: hyper's own first read buffer. On the stack
/// while it is read, then copied to the heap at the size read.
const FIRST_READ: usize = 8192;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// hyper's settings for each HTTP version, shared by one accept loop's
/// connections.
#[derive(Debug)]
pub struct Builders {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    /// Where an h2c connection's streams take their places.
    places: Places,
}

impl Builders {
    /// `max_header_bytes` bounds a request head (HTTP/1: hyper's read
    /// buffer, at least 8 KiB; h2c: the header list). Each h2c stream in
    /// flight takes one of `places`.
    pub fn new(max_header_bytes: usize, places: Places) -> Self {
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            // The header timeout is the connection's `Idle` watcher's (one
            // timer per connection), not hyper's (a boxed timer armed per
            // request).
            .header_read_timeout(None::<Duration>)
            .max_buf_size(max_header_bytes.max(8192));
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2.timer(TokioTimer::new()).max_header_list_size(max_header_bytes.min(u32::MAX as usize) as u32);
        Builders { http1, http2, places }
    }

    /// Serves `io` with `svc`, in the HTTP version its first bytes name.
    pub fn serve<IO, S>(self: &std::sync::Arc<Self>, io: IO, svc: S) -> Conn<IO, S>
    where
        S: HttpService<Incoming>,
        Placing<S>: HttpService<Incoming>,
    {
        Conn::Sniffing { builders: self.clone(), io: Some(io), svc: Some(svc), first: Vec::new() }
    }
}

/// Why a connection ended badly.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("reading its first bytes: {0}")]
    Read(#[from] io::Error),
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

/// A connection that can be asked to finish what it has started and close
/// (hyper-util's `GracefulConnection`, which only its own types implement).
pub trait Graceful: Future<Output = Result<(), ConnError>> {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

type H1<IO, S> = http1::Connection<TokioIo<Prefixed<IO>>, S>;
type H2<IO, S> = http2::Connection<TokioIo<Prefixed<IO>>, Placing<S>, TokioExecutor>;

pin_project_lite::pin_project! {
    /// See [`Builders::serve`]; poll it to serve the connection.
    #[project = ConnProj]
    pub enum Conn<IO, S>
    where
        S: HttpService<Incoming>,
        Placing<S>: HttpService<Incoming>,
    {
        /// Reading until the first bytes tell the version apart.
        Sniffing {
            builders: std::sync::Arc<Builders>,
            io: Option<IO>,
            svc: Option<S>,
            // What was read, while it could still be HTTP/2's preface
            // (fewer bytes of it than it has): rare, so empty and
            // unallocated otherwise.
            first: Vec<u8>,
        },
        Http1 { #[pin] conn: H1<IO, S> },
        Http2 { #[pin] conn: H2<IO, S> },
        /// Closed before a request (no bytes at all, or asked to drain).
        Closed,
    }
}

/// Which version `seen` (the connection's first bytes) names, or `None`
/// while it could still be either.
fn version(seen: &[u8]) -> Option<bool> {
    match seen.len() < H2_PREFACE.len() {
        true if H2_PREFACE.starts_with(seen) => None,
        _ => Some(seen.starts_with(H2_PREFACE)),
    }
}

impl<IO, S, B, P> Future for Conn<IO, S>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    S: HttpService<Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    B: Body + 'static,
    B::Error: Into<BoxError>,
    Placing<S>: HttpService<Incoming, ResBody = P>,
    P: Body + 'static,
    P::Error: Into<BoxError>,
    TokioExecutor: Http2ServerConnExec<<Placing<S> as HttpService<Incoming>>::Future, P>,
{
    type Output = Result<(), ConnError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let next = match self.as_mut().project() {
                ConnProj::Http1 { conn } => return conn.poll(cx).map_err(Into::into),
                ConnProj::Http2 { conn } => return conn.poll(cx).map_err(Into::into),
                ConnProj::Closed => return Poll::Ready(Ok(())),
                ConnProj::Sniffing { builders, io, svc, first } => {
                    let stream = io.as_mut().expect("a sniffing connection holds its stream");
                    let mut raw = [MaybeUninit::<u8>::uninit(); FIRST_READ];
                    let mut buf = ReadBuf::uninit(&mut raw);
                    ready!(Pin::new(stream).poll_read(cx, &mut buf))?;
                    let got = buf.filled();
                    if got.is_empty() && !first.is_empty() {
                        // Closed in the middle of what could be the preface.
                        return Poll::Ready(Err(ConnError::Read(io::ErrorKind::UnexpectedEof.into())));
                    } else if got.is_empty() {
                        // Closed by the client before a byte (a health
                        // check's connect, say): nothing to answer.
                        Conn::Closed
                    } else {
                        let seen: &[u8] = match first.is_empty() {
                            true => got,
                            false => {
                                first.extend_from_slice(got);
                                first
                            }
                        };
                        match version(seen) {
                            None => {
                                if first.is_empty() {
                                    first.extend_from_slice(got);
                                }
                                continue;
                            }
                            Some(h2) => {
                                let io = Prefixed { prefix: Bytes::copy_from_slice(seen), io: io.take().unwrap() };
                                let (io, svc) = (TokioIo::new(io), svc.take().expect("taken once"));
                                match h2 {
                                    false => Conn::Http1 { conn: builders.http1.serve_connection(io, svc) },
                                    true => {
                                        let svc = Placing::new(svc, builders.places.clone());
                                        Conn::Http2 { conn: builders.http2.serve_connection(io, svc) }
                                    }
                                }
                            }
                        }
                    }
                }
            };
            self.set(next);
        }
    }
}

impl<IO, S, B, P> Graceful for Conn<IO, S>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    S: HttpService<Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    B: Body + 'static,
    B::Error: Into<BoxError>,
    Placing<S>: HttpService<Incoming, ResBody = P>,
    P: Body + 'static,
    P::Error: Into<BoxError>,
    TokioExecutor: Http2ServerConnExec<<Placing<S> as HttpService<Incoming>>::Future, P>,
{
    fn graceful_shutdown(mut self: Pin<&mut Self>) {
        match self.as_mut().project() {
            ConnProj::Http1 { conn } => conn.graceful_shutdown(),
            ConnProj::Http2 { conn } => conn.graceful_shutdown(),
            // No request yet: closed at its next poll.
            ConnProj::Sniffing { .. } => self.set(Conn::Closed),
            ConnProj::Closed => {}
        }
    }
}

/// A stream whose first bytes were read already: it gives those first.
#[derive(Debug)]
pub struct Prefixed<IO> {
    prefix: Bytes,
    io: IO,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.prefix.is_empty() || buf.remaining() == 0 {
            return Pin::new(&mut self.io).poll_read(cx, buf);
        }
        let n = self.prefix.len().min(buf.remaining());
        buf.put_slice(&self.prefix[..n]);
        self.prefix.advance(n);
        if self.prefix.is_empty() {
            // Its memory goes now, not with the connection.
            self.prefix = Bytes::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    super::forward_writes!(io);
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    #[test]
    fn the_first_bytes_name_the_version() {
        assert_eq!(version(b"GET / HTTP/1.1\r\n"), Some(false));
        assert_eq!(version(b"P"), None, "could be the preface");
        assert_eq!(version(b"PRI * HTTP/2.0\r\n"), None);
        assert_eq!(version(b"PUT /x HTTP/1.1\r\n"), Some(false));
        assert_eq!(version(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Some(true));
        assert_eq!(version(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\x12\x04"), Some(true));
        assert_eq!(version(b"PRI * HTTP/1.1\r\n\r\nSM\r\n\r\nmore"), Some(false));
    }

    /// A stream that counts its reads that returned bytes.
    struct Counted(DuplexStream, Arc<AtomicUsize>);

    impl AsyncRead for Counted {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            let before = buf.filled().len();
            let r = Pin::new(&mut self.0).poll_read(cx, buf);
            if buf.filled().len() > before {
                self.1.fetch_add(1, Ordering::SeqCst);
            }
            r
        }
    }

    impl AsyncWrite for Counted {
        fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, data)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    /// Serves one connection whose client end is returned; each answer
    /// names the HTTP version it was asked in. The server's reads that
    /// returned bytes are counted in `reads`.
    fn serve_one(reads: Arc<AtomicUsize>) -> (DuplexStream, tokio::task::JoinHandle<Result<(), ConnError>>) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let svc = hyper::service::service_fn(|req: http::Request<Incoming>| async move {
            let v = format!("{:?}", req.version());
            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(Bytes::from(v))))
        });
        let builders = std::sync::Arc::new(Builders::new(64 * 1024, Places::for_tests()));
        let conn = builders.serve(Counted(server, reads), svc);
        (client, tokio::spawn(conn))
    }

    /// What the client gets until the server closes.
    async fn answer(client: &mut DuplexStream) -> String {
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        String::from_utf8_lossy(&got).into_owned()
    }

    /// A request head that comes whole is read once (hyper-util's `auto`
    /// read it twice: its first 24 bytes, then the rest), and answered as
    /// HTTP/1.1.
    #[tokio::test]
    async fn a_whole_http1_head_is_read_once() {
        let reads = Arc::new(AtomicUsize::new(0));
        let (mut client, served) = serve_one(reads.clone());
        client.write_all(b"GET /x HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n").await.unwrap();
        let got = answer(&mut client).await;
        assert!(got.starts_with("HTTP/1.1 200") && got.ends_with("HTTP/1.1"), "{got}");
        served.await.unwrap().unwrap();
        assert_eq!(reads.load(Ordering::SeqCst), 1, "one read for the whole head");
    }

    /// An HTTP/1 head whose first bytes could begin the preface ("P" of a
    /// PUT) is read on until it cannot, and served whole.
    #[tokio::test]
    async fn a_head_that_starts_like_the_preface_is_http1() {
        let (mut client, served) = serve_one(Arc::default());
        client.write_all(b"P").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        client
            .write_all(b"UT /x HTTP/1.1\r\nhost: a\r\ncontent-length: 2\r\nconnection: close\r\n\r\nhi")
            .await
            .unwrap();
        let got = answer(&mut client).await;
        assert!(got.starts_with("HTTP/1.1 200") && got.ends_with("HTTP/1.1"), "{got}");
        served.await.unwrap().unwrap();
    }

    /// h2c with prior knowledge, its preface split over two writes: an
    /// HTTP/2 client is answered in HTTP/2.
    #[tokio::test]
    async fn h2c_is_told_from_its_preface() {
        let (client, served) = serve_one(Arc::default());
        // The preface in two writes: the client's own IO cuts it.
        struct Split(DuplexStream, bool);
        impl AsyncRead for Split {
            fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, b: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
                Pin::new(&mut self.0).poll_read(cx, b)
            }
        }
        impl AsyncWrite for Split {
            fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, d: &[u8]) -> Poll<io::Result<usize>> {
                let first = std::mem::replace(&mut self.1, false);
                let d = if first { &d[..10.min(d.len())] } else { d };
                Pin::new(&mut self.0).poll_write(cx, d)
            }
            fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                Pin::new(&mut self.0).poll_flush(cx)
            }
            fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                Pin::new(&mut self.0).poll_shutdown(cx)
            }
        }
        let io = TokioIo::new(Split(client, true));
        let (mut send, conn) =
            hyper::client::conn::http2::handshake::<_, _, http_body_util::Empty<Bytes>>(TokioExecutor::new(), io)
                .await
                .unwrap();
        let driver = tokio::spawn(conn);
        let req = http::Request::get("http://a/x").body(http_body_util::Empty::new()).unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        let body = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
        assert_eq!(&body[..], b"HTTP/2.0");
        drop(send);
        driver.await.unwrap().unwrap();
        served.await.unwrap().unwrap();
    }

    /// A client that closes before a byte ends the connection quietly; one
    /// asked to drain before its first bytes closes.
    #[tokio::test]
    async fn closed_or_drained_before_a_byte() {
        let (client, served) = serve_one(Arc::default());
        drop(client);
        served.await.unwrap().unwrap();

        // Closed in the middle of what could be HTTP/2's preface: an error
        // (logged), not a quiet end.
        let (mut client, served) = serve_one(Arc::default());
        client.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        drop(client);
        assert!(matches!(served.await.unwrap(), Err(ConnError::Read(_))));

        let (_client, server) = tokio::io::duplex(1024);
        let svc = hyper::service::service_fn(|_req: http::Request<Incoming>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<Bytes>::new()))
        });
        let mut conn = Box::pin(std::sync::Arc::new(Builders::new(8192, Places::for_tests())).serve(server, svc));
        let pending = std::future::poll_fn(|cx| Poll::Ready(conn.as_mut().poll(cx).is_pending())).await;
        assert!(pending, "waits for its first bytes");
        conn.as_mut().graceful_shutdown();
        assert!(matches!(conn.await, Ok(())));
    }
}
