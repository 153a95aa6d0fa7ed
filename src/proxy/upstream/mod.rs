//! Carrying a request to one upstream store.
//!
//! Two ways, one behaviour (the same rewriting, timeouts and 502/504 answers):
//!
//! * **Per-connection** (HTTP/1 downstream, the hot path): each downstream
//!   connection owns one upstream HTTP/1 connection ([`ConnSlot`]), opened on
//!   its first request and driven in the downstream connection's own task
//!   ([`ConnSlot::run`], used there by the accept loop). HTTP/1 without
//!   pipelining has one request at a time per connection, so one upstream
//!   connection per downstream one suffices, and a request needs no pool, no
//!   lock shared with other connections and no hand-off to another task.
//! * **Pooled** (h2c downstream, which multiplexes; anything outside a
//!   connection task): hyper-util's pooled client.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderValue;
use http::{Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tower::Service;

use super::body::{json_error, Body, RequestBody};
use super::client::error_chain;
use super::headers::{append_forwarded_for, binds_connection, set_host, strip_hop_by_hop};

mod joined;
pub mod pool;
mod slot;

pub use pool::IdlePool;
use slot::SLOT;
pub use slot::{ConnSlot, Detached};

/// Closes the current connection task's own upstream connection at once
/// (see [`ConnSlot::run`]), for an answer cut off mid-body: its socket is
/// reset, not shut down after what hyper and the kernel still hold of the
/// request. Outside a connection task, nothing.
pub fn abandon_current() {
    let _ = SLOT.try_with(|s| s.abandon());
}

/// Hands the current connection task's own upstream connection (the one
/// open now, and any a request in flight opens later) to be driven
/// elsewhere: for a request whose answer must be read to its end after its
/// client is gone. Outside a connection task, `None` (a pooled connection
/// is driven by its own task).
pub fn detach_current() -> Option<Detached> {
    SLOT.try_with(|s| s.detach()).ok()
}

/// A client for one upstream base URL: per-connection upstreams where the
/// caller runs inside a connection task with a [`ConnSlot`], else a pool.
#[derive(Clone, Debug)]
pub struct Upstream {
    client: Client<Connector, RequestBody>,
    connector: Connector,
    base: Uri,
    authority: HeaderValue,
    /// `--upstream-host`: the `Host` sent instead of the client's.
    host: Option<HeaderValue>,
    /// How long to wait for the upstream's response head.
    pub response_timeout: Duration,
}

/// hyper-util's connector, each socket set to `SO_LINGER` 0: closing an
/// upstream connection then resets it and drops whatever of the request is
/// still queued in the kernel's send buffer. With the default (a FIN after
/// the queue), a write given up on (the filter's barrier abort, the
/// sidecar's cut-off, a response timeout) went on being delivered, up to a
/// send buffer's worth (megabytes), whenever a stalled store read it again:
/// after its permit's grace, and after a newer holder's write. A close of an
/// idle keep-alive connection resets it too, which costs nothing.
#[derive(Clone, Debug)]
struct Connector(HttpConnector);

type ConnectError = Box<dyn std::error::Error + Send + Sync>;

impl Service<Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = ConnectError;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, ConnectError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), ConnectError>> {
        self.0.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.0.call(uri);
        Box::pin(async move {
            let io = connecting.await?;
            io.inner().set_zero_linger()?;
            Ok(io)
        })
    }
}

/// A boxed upstream send (see [`Upstream::send_again`]).
type SendFuture<'a> = std::pin::Pin<Box<dyn Future<Output = Result<Response<Incoming>, UpstreamError>> + Send + 'a>>;

/// Why a request could not be carried to the upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("the upstream did not answer: {0}")]
    Unavailable(String),
    #[error("the upstream did not answer within {0:?}")]
    Timeout(Duration),
    /// The answer had begun, then nothing more of it came for this long.
    #[error("the upstream sent nothing more of its answer for {0:?}")]
    Quiet(Duration),
}

impl UpstreamError {
    /// The one mapping of upstream failures to answers (502/504).
    pub fn into_response(self) -> Response<Body> {
        match &self {
            UpstreamError::Unavailable(_) => {
                json_error(StatusCode::BAD_GATEWAY, "upstream_unavailable", &self.to_string(), None)
            }
            UpstreamError::Timeout(_) | UpstreamError::Quiet(_) => {
                json_error(StatusCode::GATEWAY_TIMEOUT, "upstream_timeout", &self.to_string(), None)
            }
        }
    }
}

impl Upstream {
    /// `base` is an `http://host:port[/prefix]` URL.
    pub fn new(base: &str, connect_timeout: Duration, response_timeout: Duration) -> Result<Self, String> {
        let base: Uri = base.parse().map_err(|e| format!("bad upstream URL {base:?}: {e}"))?;
        if base.scheme_str() != Some("http") {
            return Err(format!("upstream URL {base} must start with http://"));
        }
        let authority = base.authority().ok_or_else(|| format!("upstream URL {base} has no host"))?;
        let authority = HeaderValue::from_str(authority.as_str()).map_err(|e| e.to_string())?;
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        conn.set_connect_timeout(Some(connect_timeout));
        conn.set_keepalive(Some(Duration::from_secs(60)));
        let conn = Connector(conn);
        // The pooled client serves h2c streams, each holding a place under
        // `--max-connections` while its connection is in use
        // (`proxy::streams`); the idle ones it keeps hold none, so they are
        // as few as a loop's parked connections, and kept as briefly (see
        // `pool::IDLE_FOR`: a store's idle timeout must not close one just
        // as a stream reuses it).
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(pool::IDLE_FOR)
            .pool_max_idle_per_host(pool::MAX_IDLE)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(conn.clone());
        Ok(Upstream { client, connector: conn, base, authority, host: None, response_timeout })
    }

    /// Sends `host` as every request's `Host` instead of the client's (see
    /// `set_host`); `None` keeps the client's.
    pub fn with_host(mut self, host: Option<&str>) -> Result<Self, String> {
        self.host =
            host.map(|h| HeaderValue::from_str(h).map_err(|e| format!("bad upstream host {h:?}: {e}"))).transpose()?;
        Ok(self)
    }

    pub fn base(&self) -> &Uri {
        &self.base
    }

    /// Rewrites `req` for the upstream (URI, hop-by-hop headers, Host as
    /// `set_host` says) and
    /// sends it; resolves when the upstream's response head has arrived. The
    /// body streams both ways: nothing here buffers it.
    /// `peer`, when given, is appended to `X-Forwarded-For`.
    ///
    /// Called in the connection's task (it picks that connection's own
    /// upstream connection then; anywhere else the pool is used).
    pub fn send(
        &self,
        req: Request<Incoming>,
        peer: Option<SocketAddr>,
    ) -> impl Future<Output = Result<Response<Incoming>, UpstreamError>> + Send + '_ {
        Self::send_via(self, req.map(RequestBody::stream), peer)
    }

    /// [`send`](Self::send), the future owning its `Upstream` (it outlives
    /// the caller's borrow: a service's future).
    pub fn send_owned(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: Option<SocketAddr>,
    ) -> impl Future<Output = Result<Response<Incoming>, UpstreamError>> + Send + 'static {
        Self::send_via(self, req.map(RequestBody::stream), peer)
    }

    /// [`send`](Self::send) for a body the filter has partly read (see
    /// [`RequestBody`]).
    pub fn send_body(
        &self,
        req: Request<RequestBody>,
        peer: Option<SocketAddr>,
    ) -> impl Future<Output = Result<Response<Incoming>, UpstreamError>> + Send + '_ {
        Self::send_via(self, req, peer)
    }

    /// [`send_body`](Self::send_body), the future owning its `Upstream`:
    /// one that may outlive its caller (the filter reads a write's answer
    /// on after its client left).
    pub fn send_body_owned(
        self: Arc<Self>,
        req: Request<RequestBody>,
        peer: Option<SocketAddr>,
    ) -> impl Future<Output = Result<Response<Incoming>, UpstreamError>> + Send + 'static {
        Self::send_via(self, req, peer)
    }

    /// The request is rewritten here, when called, and the future returned
    /// holds it once. These futures are nested in every request's future
    /// and copied whole at each move (`memcpy` was 10-13% of a hop's
    /// instructions): as `async fn`s, which move their arguments into
    /// locals and keep both, `send` and `send_body` held the request four
    /// times, 2.5 KB of a 2.8 KB future in the sidecar.
    fn send_via<U>(
        up: U,
        mut req: Request<RequestBody>,
        peer: Option<SocketAddr>,
    ) -> impl Future<Output = Result<Response<Incoming>, UpstreamError>> + Send
    where
        U: std::ops::Deref<Target = Upstream> + Send,
    {
        let authority = req.uri().authority().cloned();
        // h2c downstream multiplexes: its requests share the pool.
        let slot = if req.version() == http::Version::HTTP_2 { None } else { SLOT.try_with(Arc::clone).ok() };
        let binds = binds_connection(req.headers());
        *req.version_mut() = http::Version::HTTP_11;
        strip_hop_by_hop(req.headers_mut());
        // A request that authenticates its connection (NTLM, Negotiate): that
        // connection must never carry another client's requests. The slot's
        // is closed with its client connection instead of parked; one from
        // the shared pool (h2c) is closed after this answer (`Connection:
        // close`), so such a handshake fails there rather than lending one
        // client's login to the next.
        match &slot {
            Some(slot) if binds => slot.bind(),
            None if binds => {
                req.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        set_host(req.headers_mut(), authority.as_ref(), up.host.as_ref(), &up.authority);
        if let Some(peer) = peer {
            append_forwarded_for(req.headers_mut(), peer);
        }
        *req.uri_mut() = match slot {
            Some(_) => up.origin_form(req.uri()),
            None => up.target(req.uri()),
        };
        let t = up.response_timeout;
        // Boxed once here: an `async` block keeps what it captured for its
        // whole life, the request too after it has moved into the send's
        // own future. Unboxed, this future and `send_own`'s each kept a dead
        // 416-byte copy beside the live one (`-Zprint-type-sizes`): the
        // sidecar's boxed request future was 1392 bytes, over glibc's
        // 1032-byte thread cache, so its allocation took malloc's slow path.
        // A box of 416 bytes costs less than the copies and that path.
        let req = Box::new(req);
        async move {
            let resp = match slot {
                Some(slot) => {
                    // Given up on before its head arrived (dropped, timed
                    // out, failed): the connection is closed at once, not
                    // flushed and shut down by hyper at its next poll.
                    let abandon = slot::Abandon::new(&slot);
                    let r = slot
                        .within(t, up.send_own(&slot, req, false))
                        .await
                        .map_err(|_| UpstreamError::Timeout(t))??;
                    abandon.disarm();
                    r
                }
                None => tokio::time::timeout(t, up.client.request(*req))
                    .await
                    .map_err(|_| UpstreamError::Timeout(t))?
                    .map_err(|e| UpstreamError::Unavailable(error_chain(&e)))?,
            };
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Ok(Response::from_parts(parts, body))
        }
    }

    /// Sends on the connection's own upstream connection, opening it first
    /// if there is none (or it was closed). A request is sent again on a new
    /// connection only when hyper hands it back unsent; anything that may
    /// have been written is never retried.
    ///
    /// A function returning an `async` block, not an `async fn`: an `async
    /// fn` moves its arguments into locals and keeps both, the request twice.
    /// The retry is a second call (`retried`), boxed: a loop would keep the
    /// request in a local too. The request comes boxed (see `send_via`) and
    /// leaves its box only where hyper takes it.
    #[allow(clippy::manual_async_fn)] // on purpose: see above
    fn send_own<'a>(
        &'a self,
        slot: &'a ConnSlot,
        req: Box<Request<RequestBody>>,
        retried: bool,
    ) -> impl Future<Output = Result<Response<Incoming>, UpstreamError>> + Send + 'a {
        async move {
            // The connection's own, else an idle one of its accept loop's
            // (not for the retry: that goes on a new connection), else a
            // new one. A connection that served requests before may have
            // been closed by the store meanwhile: a request it hands back
            // unsent is sent again (`fresh` is false).
            let own = slot.take(&self.authority);
            let (mut sender, fresh) = match own.or_else(|| if retried { None } else { slot.reuse(&self.authority) }) {
                Some(s) => (s, false),
                // Boxed: opening a connection is rare (once per downstream
                // connection), and its future would make every request's
                // future bigger.
                None => (Box::pin(self.connect(slot)).await?, true),
            };
            if let Err(e) = sender.ready().await {
                // Closed before anything was sent: open a new one, once.
                if fresh || retried {
                    return Err(UpstreamError::Unavailable(error_chain(&e)));
                }
                return self.send_again(slot, req).await;
            }
            let resp = sender.try_send_request(*req);
            slot.put(sender);
            let unsent = match resp.await {
                Ok(r) => return Ok(r),
                Err(mut e) => match e.take_message() {
                    Some(unsent) if !fresh && !retried => unsent,
                    _ => return Err(UpstreamError::Unavailable(error_chain(e.error()))),
                },
            };
            self.send_again(slot, Box::new(unsent)).await
        }
    }

    /// [`send_own`](Self::send_own)'s one retry, boxed (a future cannot hold
    /// itself).
    fn send_again<'a>(&'a self, slot: &'a ConnSlot, req: Box<Request<RequestBody>>) -> SendFuture<'a> {
        Box::pin(self.send_own(slot, req, true))
    }

    /// Opens a new upstream connection and installs it in `slot` (its task
    /// drives it); the old one, if any, is closed.
    async fn connect(&self, slot: &ConnSlot) -> Result<http1::SendRequest<RequestBody>, UpstreamError> {
        let io = self
            .connector
            .clone()
            .call(self.base.clone())
            .await
            .map_err(|e| UpstreamError::Unavailable(format!("client error (Connect): {}", error_chain(&*e))))?;
        let (sender, conn) = http1::handshake(io).await.map_err(|e| UpstreamError::Unavailable(error_chain(&e)))?;
        slot.install(self.authority.clone(), conn);
        Ok(sender)
    }

    /// The request target for an HTTP/1 connection of our own: origin form.
    fn origin_form(&self, uri: &Uri) -> Uri {
        let base_path = self.base.path().trim_end_matches('/');
        let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        if base_path.is_empty() && pq.starts_with('/') {
            // The common case: the request's path and query as they are (a
            // cheap clone, no formatting).
            let pq = uri.path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
            return Uri::from(pq);
        }
        let sep = if pq.starts_with('/') { "" } else { "/" };
        format!("{base_path}{sep}{pq}").parse().expect("joined from valid parts")
    }

    fn target(&self, uri: &Uri) -> Uri {
        let base_path = self.base.path().trim_end_matches('/');
        if base_path.is_empty() {
            // The common case: no prefix, so the request's path and query are
            // reused as they are (a cheap clone, no formatting).
            let mut parts = self.base.clone().into_parts();
            parts.path_and_query =
                Some(uri.path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")));
            return Uri::from_parts(parts).expect("joined from valid parts");
        }
        let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let pq = if pq.starts_with('/') { pq.to_owned() } else { format!("/{pq}") };
        let mut parts = self.base.clone().into_parts();
        parts.path_and_query = Some(format!("{base_path}{pq}").parse().expect("joined from valid parts"));
        Uri::from_parts(parts).expect("joined from valid parts")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::testing::{
        counting_store, counting_store_closes, front, front_with, h2c, keep_alive_get, one_request, one_request_with,
        KEEP_ALIVE,
    };
    use tokio::net::TcpStream;

    #[test]
    fn target_joins_base_path_and_query() {
        let u = Upstream::new("http://127.0.0.1:9/base/", Duration::from_secs(1), Duration::from_secs(1)).unwrap();
        assert_eq!(u.target(&"/a/b?x=1".parse().unwrap()).to_string(), "http://127.0.0.1:9/base/a/b?x=1");
        assert_eq!(u.origin_form(&"/a/b?x=1".parse().unwrap()).to_string(), "/base/a/b?x=1");
        let u = Upstream::new("http://h:1", Duration::from_secs(1), Duration::from_secs(1)).unwrap();
        assert_eq!(u.target(&"/".parse().unwrap()).to_string(), "http://h:1/");
        assert_eq!(u.origin_form(&"/x?y".parse().unwrap()).to_string(), "/x?y");
        assert!(Upstream::new("https://h", Duration::ZERO, Duration::ZERO).is_err());
    }

    /// A store that closes its connection after every answer: each request on
    /// one keep-alive downstream connection gets a new upstream connection.
    #[tokio::test]
    async fn a_closed_upstream_connection_is_reopened_for_the_next_request() {
        use std::sync::atomic::Ordering::Relaxed;
        let closing = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";
        let (store_addr, accepted) = counting_store(closing, Some(Duration::ZERO)).await;
        let front_addr = front(store_addr, Duration::from_secs(5)).await;
        let mut c = TcpStream::connect(front_addr).await.unwrap();
        for i in 0..3 {
            let got = keep_alive_get(&mut c).await;
            assert!(got.starts_with(b"HTTP/1.1 200"), "request {i}: {}", String::from_utf8_lossy(&got));
        }
        assert_eq!(accepted.load(Relaxed), 3, "one upstream connection per request");
    }

    /// A client that opens a connection per request: each downstream
    /// connection takes the upstream connection the one before left idle,
    /// as nginx's `keepalive` does, instead of opening (and closing) one of
    /// its own. Before the pool, the store saw five connections here.
    #[tokio::test]
    async fn an_idle_upstream_connection_serves_the_next_downstream_connection() {
        use std::sync::atomic::Ordering::Relaxed;
        let (store, accepted) = counting_store(KEEP_ALIVE, None).await;
        let front_addr = front(store, Duration::from_secs(5)).await;
        for i in 0..5 {
            assert_eq!(one_request(front_addr).await, "HTTP/1.1 200 ok", "request {i}");
        }
        assert_eq!(accepted.load(Relaxed), 1, "one upstream connection, reused");
    }

    /// A connection a client authenticated (NTLM, Negotiate: the store runs
    /// what comes on it as that user) is never handed to the next client:
    /// each such client's connection gets a new upstream connection, while
    /// the same requests without it share one (the control, as in the test
    /// above). Before, the second client's requests ran as the first's user.
    #[tokio::test]
    async fn a_connection_a_client_authenticated_is_not_reused_by_another() {
        use std::sync::atomic::Ordering::Relaxed;
        for (auth, connections) in [
            ("Authorization: NTLM TlRMTVNTUAADAAAA\r\n", 3),
            ("Authorization: Negotiate YIIHOQYGKwYB\r\n", 3),
            ("Authorization: Basic dXNlcjpwYXNz\r\n", 1),
            ("", 1),
        ] {
            let (store, accepted) = counting_store(KEEP_ALIVE, None).await;
            let front_addr = front(store, Duration::from_secs(5)).await;
            for i in 0..3 {
                assert_eq!(one_request_with(front_addr, auth).await, "HTTP/1.1 200 ok", "{auth:?} request {i}");
            }
            assert_eq!(accepted.load(Relaxed), connections, "upstream connections with {auth:?}");
        }
    }

    /// The same over h2c, whose streams share the pooled client's
    /// connections: a request that authenticates its connection gets one
    /// that is closed after its answer, never returned to the pool for the
    /// next stream, whoever sends it; requests without it share one (the
    /// control). Before, the pool lent the first client's login to any
    /// h2c client.
    #[tokio::test]
    async fn an_h2c_request_that_authenticates_its_connection_gets_one_of_its_own() {
        use std::sync::atomic::Ordering::Relaxed;
        for (auth, connections) in [(Some("NTLM TlRMTVNTUAADAAAA"), 3), (None, 1)] {
            let (store, accepted) = counting_store(KEEP_ALIVE, None).await;
            let front_addr = front(store, Duration::from_secs(5)).await;
            let (mut send, driver) = h2c(front_addr).await;
            for i in 0..3 {
                let mut req = Request::get("http://a/x");
                if let Some(auth) = auth {
                    req = req.header(http::header::AUTHORIZATION, auth);
                }
                let resp = send.send_request(req.body(http_body_util::Empty::new()).unwrap()).await.unwrap();
                assert_eq!(resp.status(), StatusCode::OK, "{auth:?} request {i}");
                http_body_util::BodyExt::collect(resp.into_body()).await.unwrap();
            }
            assert_eq!(accepted.load(Relaxed), connections, "upstream connections with {auth:?}");
            driver.abort();
        }
    }

    /// A parked connection the store closed meanwhile (its idle timeout) is
    /// not an error: hyper hands the request back unsent, and it goes out on
    /// a new connection.
    #[tokio::test]
    async fn a_parked_connection_the_store_closed_is_replaced() {
        use std::sync::atomic::Ordering::Relaxed;
        let (store, accepted) = counting_store(KEEP_ALIVE, Some(Duration::from_millis(50))).await;
        let front_addr = front(store, Duration::from_secs(5)).await;
        for i in 0..3 {
            assert_eq!(one_request(front_addr).await, "HTTP/1.1 200 ok", "request {i}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(accepted.load(Relaxed), 3, "each parked connection was closed by the store");
    }

    /// A connection is reused only within `IDLE_FOR` of its last request's
    /// start, however long of that it waited in its own client's connection
    /// (the hostile review's case: counted from its parking, a connection
    /// idle for most of a store's idle timeout in its slot was reused just as
    /// the store closed it).
    #[tokio::test]
    async fn a_connection_idle_in_its_client_connection_is_not_reused_past_its_idle_time() {
        use std::sync::atomic::Ordering::Relaxed;
        let (store, accepted) = counting_store(KEEP_ALIVE, None).await;
        let front_addr = front(store, Duration::from_secs(5)).await;
        // A keep-alive client: one request, then quiet past IDLE_FOR, then it closes.
        let mut c = TcpStream::connect(front_addr).await.unwrap();
        keep_alive_get(&mut c).await;
        tokio::time::sleep(pool::IDLE_FOR + Duration::from_millis(300)).await;
        drop(c);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(one_request(front_addr).await, "HTTP/1.1 200 ok");
        assert_eq!(accepted.load(Relaxed), 2, "the stale connection was closed, a new one opened");
    }

    /// A parked connection no client takes is closed once it is past
    /// `IDLE_FOR` (by the accept loop's sweep): before, it stayed open, or
    /// half closed by the store, for as long as no connection came.
    #[tokio::test]
    async fn a_parked_connection_no_client_takes_is_closed_after_its_idle_time() {
        use std::sync::atomic::Ordering::Relaxed;
        let (store, accepted, closed) = counting_store_closes(KEEP_ALIVE, None).await;
        let front_addr = front(store, Duration::from_secs(5)).await;
        assert_eq!(one_request(front_addr).await, "HTTP/1.1 200 ok");
        let parked = std::time::Instant::now();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!((accepted.load(Relaxed), closed.load(Relaxed)), (1, 0), "parked, open");
        while closed.load(Relaxed) == 0 {
            assert!(parked.elapsed() < pool::IDLE_FOR * 2 + Duration::from_secs(1), "still open");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(parked.elapsed() >= pool::IDLE_FOR, "closed after {:?}, before its idle time", parked.elapsed());
    }

    /// A connection given up on is never parked: a client that leaves in the
    /// middle of its request body (the request abandoned, its upstream
    /// connection reset) or of its answer (the answer not read to its end)
    /// leaves nothing for the next client, whose request goes on a new
    /// upstream connection.
    #[tokio::test]
    async fn a_connection_given_up_on_is_not_parked() {
        use std::sync::atomic::Ordering::Relaxed;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // A store that reads each request's head and answers a long body, without reading request bodies.
        let big: &'static [u8] = Box::leak(
            [&b"HTTP/1.1 200 OK\r\nContent-Length: 4000000\r\n\r\n"[..], &vec![b'x'; 4_000_000]]
                .concat()
                .into_boxed_slice(),
        );
        let (store, accepted) = counting_store(big, None).await;
        let front_addr = front(store, Duration::from_secs(5)).await;
        // Leaves mid-answer.
        let mut c = TcpStream::connect(front_addr).await.unwrap();
        c.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 1024];
        assert!(c.read(&mut buf).await.unwrap() > 0);
        drop(c);
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Leaves mid-body: a PUT whose body never comes whole.
        let mut c = TcpStream::connect(front_addr).await.unwrap();
        c.write_all(b"PUT /y HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nonly part").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(c);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = accepted.load(Relaxed);
        let mut c = TcpStream::connect(front_addr).await.unwrap();
        c.write_all(b"GET /z HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        assert!(got.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got[..got.len().min(100)]));
        assert!(got.len() > 4_000_000, "the answer read whole: {} bytes", got.len());
        assert_eq!(accepted.load(Relaxed), before + 1, "a new upstream connection: nothing given up on was parked");
        assert_eq!(before, 2, "each client's request had its own connection");
    }

    /// A parked connection keeps its place under `--max-connections`, and a
    /// loop at the cap closes one to make room: with a cap of 1, clients that
    /// each open a connection are all served (before the eviction, the
    /// second waited for ever behind a parked connection's place).
    #[tokio::test]
    async fn at_the_connection_cap_a_parked_connection_makes_room() {
        let (store, _) = counting_store(KEEP_ALIVE, None).await;
        let limits = crate::proxy::ServerLimits { max_connections: 1, ..Default::default() };
        let front_addr = front_with(store, Duration::from_secs(5), limits).await;
        for i in 0..3 {
            // Well within IDLE_FOR: without the eviction a client waited until the sweep closed the parked one.
            let r = tokio::time::timeout(Duration::from_secs(2), one_request(front_addr)).await;
            assert_eq!(r.expect("served at the cap").as_str(), "HTTP/1.1 200 ok", "request {i}");
        }
    }

    /// The response timeout with one timer per connection: a slow answer is
    /// a 504 at the timeout, and the timer left armed by earlier requests
    /// (moved on by each, fired for nothing while the connection was quiet)
    /// neither cuts a later request short nor lets it wait past its own
    /// timeout.
    #[tokio::test]
    async fn the_response_timeout_counts_from_each_request() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // A keep-alive store: `/wait/<ms>` answers after that long.
        let store = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let store_addr = store.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = store.accept().await.unwrap();
                tokio::spawn(async move {
                    let (mut got, mut buf) = (Vec::new(), [0u8; 1024]);
                    loop {
                        while let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&got[..end]).to_string();
                            got.drain(..end + 4);
                            let ms: u64 =
                                head.split(' ').nth(1).and_then(|p| p.strip_prefix("/wait/")).unwrap().parse().unwrap();
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                            if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await.is_err() {
                                return;
                            }
                        }
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                });
            }
        });
        let front_addr = front(store_addr, Duration::from_millis(300)).await;
        let mut c = TcpStream::connect(front_addr).await.unwrap();
        let mut get = async |ms: u64| {
            let start = std::time::Instant::now();
            c.write_all(format!("GET /wait/{ms} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes()).await.unwrap();
            let (mut got, mut buf) = (Vec::new(), [0u8; 1024]);
            while !(got.ends_with(b"ok") || got.ends_with(b"}")) {
                let n = c.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed after {}", String::from_utf8_lossy(&got));
                got.extend_from_slice(&buf[..n]);
            }
            (String::from_utf8_lossy(&got[..12]).to_string(), start.elapsed())
        };
        for _ in 0..3 {
            assert_eq!(get(0).await.0, "HTTP/1.1 200");
        }
        // Slower than the timeout: 504 at it.
        let (status, took) = get(1000).await;
        assert_eq!(status, "HTTP/1.1 504");
        assert!(took >= Duration::from_millis(290) && took < Duration::from_millis(900), "{took:?}");
        // Quiet past the timeout (the timer fires for nothing), then a
        // request that takes most of its own timeout: answered.
        assert_eq!(get(0).await.0, "HTTP/1.1 200");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (status, took) = get(200).await;
        assert_eq!(status, "HTTP/1.1 200", "{took:?}");
        // Requests that moved the deadline on do not stretch a later one's.
        for _ in 0..5 {
            assert_eq!(get(50).await.0, "HTTP/1.1 200");
        }
        let (status, took) = get(1000).await;
        assert_eq!(status, "HTTP/1.1 504");
        assert!(took < Duration::from_millis(900), "{took:?}");
    }
}
