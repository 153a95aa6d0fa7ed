//! The accept loop shared by every server here: HTTP/1.1 and h2c (or TLS),
//! limits, and graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::body::Body;
use super::conn::{Builders, Graceful};
use super::gate::Gated;
use super::idle::{Expired, Idle, Served};
use super::linger::Linger;
use super::streams::Places;
use super::upstream::{pool, ConnSlot, IdlePool};

/// Limits for the accepting side of a server.
#[derive(Clone, Debug)]
pub struct ServerLimits {
    /// How long a client may take to send the request head.
    pub header_read_timeout: Duration,
    /// Largest request head (bytes) hyper buffers.
    pub max_header_bytes: usize,
    /// How long in-flight requests get to finish after shutdown begins.
    pub shutdown_grace: Duration,
    /// A connection with no request in flight and no bytes either way for
    /// this long is closed (HTTP/1 keep-alive and h2c alike), so idle clients
    /// cannot hold sockets forever.
    pub idle_timeout: Duration,
    /// A connection whose client has taken no byte of what was written to it
    /// (its socket full) for this long is closed, request in flight or not.
    pub send_timeout: Duration,
    /// Most connections open at once per server; above it the accept loop
    /// stops accepting until one closes (the kernel's backlog queues the rest).
    /// Each h2c stream in flight takes a place too (`proxy::streams`).
    pub max_connections: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            header_read_timeout: Duration::from_secs(30),
            max_header_bytes: 64 * 1024,
            shutdown_grace: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(60),
            max_connections: 10_000,
        }
    }
}

/// Serves HTTP/1.1 and h2c on `listener` until `shutdown` resolves, then stops
/// accepting and gives in-flight connections `limits.shutdown_grace` to finish.
pub async fn serve<H, F>(listener: TcpListener, limits: ServerLimits, handler: H, shutdown: impl Future<Output = ()>)
where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let cap = connection_cap(&limits);
    serve_capped(listener, None, limits, cap, handler, shutdown).await
}

/// A connection cap that several accept loops can share (the filter's worker
/// threads all accept on one socket and count against one cap).
pub fn connection_cap(limits: &ServerLimits) -> Arc<Semaphore> {
    Arc::new(Semaphore::new(limits.max_connections.clamp(1, Semaphore::MAX_PERMITS)))
}

/// [`serve`], with TLS when `tls` is given. The handshake runs in each
/// connection's own task (bounded by the header timeout), so a slow client
/// cannot stall the accept loop.
///
/// At shutdown every connection is asked to finish (graceful shutdown) and,
/// once the grace period is over, cancelled, and this function waits (up to
/// a second more) until each has seen that: none outlives it.
pub async fn serve_tls<H, F>(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: ServerLimits,
    handler: H,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let cap = connection_cap(&limits);
    serve_capped(listener, tls, limits, cap, handler, shutdown).await
}

/// [`serve_tls`], counting connections against a shared `cap`.
pub async fn serve_capped<H, F>(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: ServerLimits,
    cap: Arc<Semaphore>,
    handler: H,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    // `drain` asks every connection to finish (graceful shutdown); `kill`,
    // cancelled when the grace period is over, ends those that have not;
    // `tracker` knows when they all have.
    let (drain, kill) = (CancellationToken::new(), CancellationToken::new());
    // What every connection's `Ends` watches, shared: an `Arc` clone per
    // connection where cloning the two tokens took a lock each.
    let watched = Arc::new(Watched { limits: limits.clone(), drain: drain.clone(), kill: kill.clone() });
    let tracker = TaskTracker::new();
    // Idle upstream connections handed from one connection to the next,
    // closed when this loop leaves; a task of its own closes those kept too
    // long (it ends with the loop's shutdown).
    let pool = Arc::new(IdlePool::default());
    tokio::spawn(pool::sweep_while(Arc::downgrade(&pool), drain.clone()));
    let builders = Arc::new(Builders::new(limits.max_header_bytes, Places::new(cap.clone(), pool.clone())));
    tokio::pin!(shutdown);
    loop {
        // Under the cap (nearly always), a place is taken without waiting.
        // Over it: wait for a connection to close before accepting more. A
        // parked upstream connection keeps its client connection's place, so
        // this loop closes its oldest to make room, and looks again whenever
        // one is parked while it waits.
        let permit = match cap.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => loop {
                if cap.available_permits() == 0 {
                    pool.evict_oldest();
                }
                tokio::select! {
                    p = cap.clone().acquire_owned() => break Some(p.expect("the cap is never closed")),
                    _ = pool.parked() => {}
                    _ = &mut shutdown => break None,
                }
            },
        };
        let Some(permit) = permit else { break };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let h = handler.clone();
        let idle = Idle::new();
        let busy = idle.clone();
        // Busy until the response body has ended too: a quiet stream
        // (server-sent events, a slow store) is not an idle connection.
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            // A body the handler may answer before reading: the close then
            // lingers (`Linger`) if the client is still sending it.
            if req.version() <= http::Version::HTTP_11 && !http_body::Body::is_end_stream(req.body()) {
                busy.body_coming();
            }
            Served::new(h(req, peer), busy.request())
        });
        let (builders, tls, pool) = (builders.clone(), tls.clone(), pool.clone());
        let ends = Ends { idle, watched: watched.clone() };
        tracker.spawn(async move {
            let io = Linger::new(ends.idle.wrap(stream));
            // This connection's own upstream connection (HTTP/1): opened by
            // its first forwarded request, driven by `run` in this same task.
            // It holds the connection's place under the cap until the
            // connection ends, or until a write the filter carries on after
            // its client left ends too (it takes the slot along); a parked
            // upstream connection keeps it after that.
            let slot = Arc::new(ConnSlot::new(permit, pool));
            let served = slot
                .run(async {
                    match tls {
                        None => Ok(ends.serve(Box::pin(builders.serve(io, svc))).await),
                        Some(acceptor) => match ends.handshake(&acceptor, io).await {
                            Ok(tls) => Ok(ends.serve(Box::pin(builders.serve(tls, svc))).await),
                            Err(why) => Err(why),
                        },
                    }
                })
                .await;
            match served {
                Ok(Ok(())) => {}
                Ok(Err(why)) => tracing::debug!(%peer, "{why}"),
                Err(e) => tracing::debug!(%peer, "{e}"),
            }
        });
    }
    drop(listener);
    // Leaving: nothing more is parked, and what is, is closed.
    pool.close();
    close_all(tracker, drain, kill, limits.shutdown_grace).await;
}

/// Graceful shutdown of the connections `tracker` follows: each is asked to
/// finish (`drain`), and those still open after `grace` are cut (`kill`).
async fn close_all(tracker: TaskTracker, drain: CancellationToken, kill: CancellationToken, grace: Duration) {
    tracker.close();
    drain.cancel();
    tokio::select! {
        _ = tracker.wait() => tracing::debug!("all connections closed"),
        _ = tokio::time::sleep(grace) => {
            tracing::warn!(?grace, "shutdown grace period over; dropping open connections");
            kill.cancel();
            // Each connection sees the kill at its next poll, which the
            // cancellation wakes: none outlives this function. Bounded all
            // the same, against a task that is stuck in a blocking call.
            if tokio::time::timeout(Duration::from_secs(1), tracker.wait()).await.is_err() {
                tracing::warn!(open = tracker.len(), "connections still open a second after the grace period");
            }
        }
    }
}

/// What ends one connection besides the connection itself.
struct Ends {
    idle: Idle,
    watched: Arc<Watched>,
}

/// The limits and signals every connection of an accept loop watches.
struct Watched {
    limits: ServerLimits,
    drain: CancellationToken,
    kill: CancellationToken,
}

/// Why [`Ends::next`] woke.
enum End {
    Drain,
    Expired(Expired),
    Kill,
}

impl Ends {
    /// Serves `conn` until it ends (`Ok`, or `Err` with why it was cut).
    /// Asked to drain, it finishes the requests in flight and closes; idle,
    /// without a request head in time, or at the end of the shutdown grace,
    /// it is dropped. The events are [`Gated`]: not polled on every wake-up
    /// of the connection.
    ///
    /// `conn` comes boxed: hyper's connection is large, and an `async fn`
    /// keeps its arguments twice (copied into its state, then pinned), inside
    /// a future that is moved again; boxed where it is made, it is copied
    /// once per connection.
    async fn serve<C>(&self, mut conn: Pin<Box<C>>) -> Result<(), String>
    where
        C: Graceful,
    {
        let mut events = std::pin::pin!(Gated::new(self.next(true)));
        loop {
            // The events first (a flag check while none has fired): a
            // connection killed at the end of the grace is dropped before it
            // is polled again, so it writes nothing more upstream.
            let end = tokio::select! {
                biased;
                end = events.as_mut() => end,
                r = conn.as_mut() => return r.map_err(|e| format!("connection ended with an error: {e}")),
            };
            match end {
                End::Drain => {
                    self.idle.draining();
                    conn.as_mut().graceful_shutdown();
                    events.set(Gated::new(self.next(false)));
                }
                End::Expired(Expired::Idle) => {
                    return Err(format!("idle for {:?}: closed", self.watched.limits.idle_timeout))
                }
                End::Expired(Expired::Head) => {
                    return Err(format!("no request head in {:?}: closed", self.watched.limits.header_read_timeout))
                }
                End::Expired(Expired::Send) => {
                    return Err(format!(
                        "the client took nothing sent to it for {:?}: closed",
                        self.watched.limits.send_timeout
                    ))
                }
                End::Kill => return Err("dropped at the end of the shutdown grace".into()),
            }
        }
    }

    /// The TLS handshake on `io`, bounded by the header timeout and cut at
    /// the end of the shutdown grace.
    async fn handshake<IO>(
        &self,
        acceptor: &tokio_rustls::TlsAcceptor,
        io: IO,
    ) -> Result<tokio_rustls::server::TlsStream<IO>, String>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let handshake = tokio::time::timeout(self.watched.limits.header_read_timeout, acceptor.accept(io));
        let shaken = tokio::select! {
            r = handshake => r,
            _ = self.watched.kill.cancelled() => return Err("dropped during its TLS handshake".into()),
        };
        match shaken {
            Ok(Ok(tls)) => Ok(tls),
            Ok(Err(e)) => Err(format!("TLS handshake failed: {e}")),
            Err(_) => Err("TLS handshake timed out".to_string()),
        }
    }

    async fn next(&self, drain: bool) -> End {
        let drained = async {
            match drain {
                true => self.watched.drain.cancelled().await,
                false => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = self.watched.kill.cancelled() => End::Kill,
            _ = drained => End::Drain,
            why = self.idle.expired(self.watched.limits.idle_timeout, self.watched.limits.header_read_timeout, self.watched.limits.send_timeout) => End::Expired(why),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::AsyncWriteExt;

    /// `serve_capped` on a port-0 listener: its address, the sender that
    /// stops it, and its task.
    async fn start<H, F>(
        limits: ServerLimits,
        handler: H,
    ) -> (SocketAddr, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>)
    where
        H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Response<Body>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cap = connection_cap(&limits);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_capped(listener, None, limits, cap, handler, async move {
            let _ = stopped.await;
        }));
        (addr, stop, server)
    }

    /// A connection still busy when the shutdown grace ends is dropped then:
    /// its handler (a write being forwarded, in the filter) does not run on
    /// after `serve_capped` returned. (Before, the graceful watcher only asked
    /// it to close, and it ran to its end.)
    #[tokio::test]
    async fn a_connection_busy_past_the_shutdown_grace_is_dropped() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let finished = Arc::new(AtomicBool::new(false));
        let f = finished.clone();
        let limits = ServerLimits { shutdown_grace: Duration::from_millis(100), ..Default::default() };
        let cap = connection_cap(&limits);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let handler = move |_req, _peer| {
            let f = f.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                f.store(true, Ordering::SeqCst);
                Response::new(http_body_util::Empty::new().map_err(|e| match e {}).boxed_unsync())
            }
        };
        let server = tokio::spawn(serve_capped(listener, None, limits, cap, handler, async move {
            let _ = stop_rx.await;
        }));
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"PUT /x HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop_tx.send(()).unwrap();
        server.await.unwrap();
        assert!(!finished.load(Ordering::SeqCst), "serve_capped returned before the handler could end");
        tokio::time::sleep(Duration::from_millis(2000)).await;
        assert!(!finished.load(Ordering::SeqCst), "the handler ran on after serve_capped returned");
    }

    /// A client that dribbles a request head (a byte every 50 ms, slowloris)
    /// is closed at the header timeout; with a longer timeout (the control)
    /// the same client is still connected then.
    #[tokio::test]
    async fn a_request_head_slower_than_the_header_timeout_is_closed() {
        async fn dribble(header_read_timeout: Duration) -> Option<Duration> {
            use tokio::io::AsyncReadExt;
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let limits = ServerLimits { header_read_timeout, ..Default::default() };
            let cap = connection_cap(&limits);
            let handler = |_req, _peer| async {
                Response::new(http_body_util::Empty::new().map_err(|e| match e {}).boxed_unsync())
            };
            let (_stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let server = tokio::spawn(serve_capped(listener, None, limits, cap, handler, async move {
                let _ = stop_rx.await;
            }));
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            let start = tokio::time::Instant::now();
            let mut closed = None;
            for b in b"GET / HTTP/1.1\r\nhost: x\r\nx-slow: ".iter().chain([b'a'; 40].iter()) {
                let mut buf = [0u8; 64];
                tokio::select! {
                    r = c.read(&mut buf) => {
                        assert!(matches!(r, Ok(0) | Err(_)), "no answer to a head never finished: {r:?}");
                        closed = Some(start.elapsed());
                        break;
                    }
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
                if c.write_all(&[*b]).await.is_err() {
                    closed = Some(start.elapsed());
                    break;
                }
            }
            server.abort();
            closed
        }
        let took = dribble(Duration::from_millis(400)).await.expect("closed at the header timeout");
        assert!(took >= Duration::from_millis(380) && took < Duration::from_millis(1200), "{took:?}");
        assert_eq!(dribble(Duration::from_secs(30)).await, None, "control: a 30 s header timeout leaves it open");
    }

    /// A write answered before its body is read (the filter's 409 to a
    /// stale token) reaches a client that sends its whole body before it
    /// reads (Python's `http.client`): the close lingers, reading and
    /// dropping the rest of the body, instead of resetting the connection.
    /// Fails without `Linger` (the client's write is reset). And a request
    /// whose body was read, with `Connection: close`, is closed at once: the
    /// server does not wait for the client to close first.
    #[tokio::test]
    async fn an_answer_before_the_body_reaches_a_client_still_sending_it() {
        use tokio::io::AsyncReadExt;
        let handler = |req: Request<Incoming>, _peer| async move {
            let status = match req.uri().path() {
                // Reads the body, then answers.
                "/read" => {
                    req.into_body().collect().await.unwrap();
                    http::StatusCode::OK
                }
                // Refused on its head.
                _ => http::StatusCode::CONFLICT,
            };
            let mut r = Response::new(http_body_util::Empty::new().map_err(|e| match e {}).boxed_unsync());
            *r.status_mut() = status;
            r
        };
        let (addr, _stop, server) = start(ServerLimits::default(), handler).await;
        const BODY: usize = 32 << 20;
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!("PUT /stale HTTP/1.1\r\nhost: x\r\ncontent-length: {BODY}\r\n\r\n");
        c.write_all(head.as_bytes()).await.unwrap();
        c.write_all(&vec![b'x'; BODY]).await.expect("the whole body written: the server read it on");
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        let got = String::from_utf8_lossy(&got);
        assert!(got.starts_with("HTTP/1.1 409"), "{got}");

        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"PUT /read HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\nconnection: close\r\n\r\nhi")
            .await
            .unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(2), c.read_to_end(&mut got))
            .await
            .expect("closed at once after its answer")
            .unwrap();
        assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
        server.abort();
    }

    /// A shutdown does not linger: a kept-alive client that sent a body
    /// and keeps its connection open does not hold the server's exit up
    /// (a lingering close waits for it to close or go quiet). Fails with
    /// the drain's mark taken out (the exit waits out the quiet time).
    #[tokio::test]
    async fn a_shutdown_closes_without_lingering() {
        use tokio::io::AsyncReadExt;
        let handler = |req: Request<Incoming>, _peer| async move {
            req.into_body().collect().await.unwrap();
            Response::new(http_body_util::Empty::new().map_err(|e| match e {}).boxed_unsync())
        };
        let (addr, stop, server) = start(ServerLimits::default(), handler).await;
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"PUT /x HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nhi").await.unwrap();
        let mut buf = [0u8; 1024];
        let n = c.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        let asked = std::time::Instant::now();
        stop.send(()).unwrap();
        server.await.unwrap();
        assert!(asked.elapsed() < Duration::from_secs(1), "the exit waited {:?}", asked.elapsed());
    }

    /// A shutdown that begins while a close lingers, its client still
    /// uploading, ends the linger: the exit is not held up by the client's
    /// upload. Fails without the drain's check in the linger (the exit
    /// waits while the client sends).
    #[tokio::test]
    async fn a_shutdown_ends_a_lingering_close() {
        use tokio::io::AsyncReadExt;
        let handler = |_req: Request<Incoming>, _peer| async move {
            let mut r = Response::new(http_body_util::Empty::new().map_err(|e| match e {}).boxed_unsync());
            *r.status_mut() = http::StatusCode::CONFLICT;
            r
        };
        let (addr, stop, server) = start(ServerLimits::default(), handler).await;
        let c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut rd, mut wr) = c.into_split();
        // Sends a body far bigger than it ever gets to send, a chunk at a time.
        let uploading = tokio::spawn(async move {
            wr.write_all(b"PUT /x HTTP/1.1\r\nhost: x\r\ncontent-length: 100000000000\r\n\r\n").await.unwrap();
            let chunk = vec![b'x'; 64 << 10];
            for _ in 0..1_000_000 {
                if wr.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        });
        let mut buf = [0u8; 1024];
        let n = rd.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 409"));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!uploading.is_finished(), "the close lingers while the client sends");
        let asked = std::time::Instant::now();
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server's exit waited on the upload")
            .unwrap();
        assert!(asked.elapsed() < Duration::from_secs(1), "the exit waited {:?}", asked.elapsed());
        uploading.abort();
    }
}
