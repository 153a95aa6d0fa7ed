//! Shared hyper plumbing: the accept loop with graceful shutdown, the pooled
//! upstream client, hop-by-hop header handling and JSON error bodies.
//!
//! Both proxies (sidecar and filter) and both admin servers use these pieces,
//! so timeouts, limits and shutdown behave the same everywhere.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::{json, Value};
use tokio::net::TcpListener;

/// The response body every service here returns: either a streamed upstream
/// body or a small buffered one (errors, admin answers).
pub type Body = UnsyncBoxBody<Bytes, hyper::Error>;

/// A complete body from bytes.
pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never: Infallible| match never {}).boxed_unsync()
}

/// Wraps an upstream body unchanged.
pub fn stream(b: Incoming) -> Body {
    b.boxed_unsync()
}

/// A JSON answer.
pub fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    let mut r = Response::new(full(serde_json::to_vec(v).expect("json values serialize")));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// A JSON error: `{"error": code, "message": ..., <extra fields>}`.
pub fn json_error(status: StatusCode, code: &str, message: &str, extra: Option<Value>) -> Response<Body> {
    let mut v = json!({ "error": code, "message": message });
    if let (Some(Value::Object(extra)), Value::Object(obj)) = (extra, &mut v) {
        obj.extend(extra);
    }
    json_response(status, &v)
}

/// Plain text answer (health checks, metrics).
pub fn text_response(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// Limits for the accepting side of a server.
#[derive(Clone, Debug)]
pub struct ServerLimits {
    /// How long a client may take to send the request head.
    pub header_read_timeout: Duration,
    /// Largest request head (bytes) hyper buffers.
    pub max_header_bytes: usize,
    /// How long in-flight requests get to finish after shutdown begins.
    pub shutdown_grace: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            header_read_timeout: Duration::from_secs(30),
            max_header_bytes: 64 * 1024,
            shutdown_grace: Duration::from_secs(30),
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
    serve_tls(listener, None, limits, handler, shutdown).await
}

/// [`serve`], with TLS when `tls` is given. The handshake runs in each
/// connection's own task (bounded by the header timeout), so a slow client
/// cannot stall the accept loop.
///
/// Every connection task is owned by the `GracefulShutdown` watcher, so no
/// task outlives this function by more than the grace period.
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
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder.http2().timer(TokioTimer::new()).max_header_list_size(limits.max_header_bytes as u32);
    let builder = std::sync::Arc::new(builder);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
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
        let svc = hyper::service::service_fn(move |req| {
            let fut = h(req, peer);
            async move { Ok::<_, Infallible>(fut.await) }
        });
        // A watcher per connection: the task owns it, the accept loop keeps
        // the `GracefulShutdown` that signals them all.
        let (builder, watcher, tls) = (builder.clone(), graceful.watcher(), tls.clone());
        let handshake_timeout = limits.header_read_timeout;
        tokio::spawn(async move {
            let result = match tls {
                None => watcher.watch(builder.serve_connection(TokioIo::new(stream), svc).into_owned()).await,
                Some(acceptor) => match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(tls_stream)) => {
                        watcher.watch(builder.serve_connection(TokioIo::new(tls_stream), svc).into_owned()).await
                    }
                    Ok(Err(e)) => return tracing::debug!(error = %e, %peer, "TLS handshake failed"),
                    Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
                },
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => tracing::debug!("all connections closed"),
        _ = tokio::time::sleep(limits.shutdown_grace) => {
            tracing::warn!(grace = ?limits.shutdown_grace, "shutdown grace period over; dropping open connections")
        }
    }
}

/// A pooled HTTP client for one upstream base URL.
#[derive(Clone, Debug)]
pub struct Upstream {
    client: Client<HttpConnector, Incoming>,
    base: Uri,
    authority: HeaderValue,
    /// How long to wait for the upstream's response head.
    pub response_timeout: Duration,
}

/// Why a request could not be carried to the upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("the upstream did not answer: {0}")]
    Unavailable(String),
    #[error("the upstream did not answer within {0:?}")]
    Timeout(Duration),
}

impl UpstreamError {
    /// The one mapping of upstream failures to answers (502/504).
    pub fn into_response(self) -> Response<Body> {
        match &self {
            UpstreamError::Unavailable(_) => {
                json_error(StatusCode::BAD_GATEWAY, "upstream_unavailable", &self.to_string(), None)
            }
            UpstreamError::Timeout(_) => {
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
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(conn);
        Ok(Upstream { client, base, authority, response_timeout })
    }

    pub fn base(&self) -> &Uri {
        &self.base
    }

    /// Rewrites `req` for the upstream (URI, Host, hop-by-hop headers) and
    /// sends it; resolves when the upstream's response head has arrived. The
    /// body streams both ways: nothing here buffers it.
    /// `peer`, when given, is appended to `X-Forwarded-For`.
    pub async fn send(
        &self,
        mut req: Request<Incoming>,
        peer: Option<SocketAddr>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        *req.uri_mut() = self.target(req.uri());
        *req.version_mut() = http::Version::HTTP_11;
        strip_hop_by_hop(req.headers_mut());
        req.headers_mut().insert(header::HOST, self.authority.clone());
        if let Some(peer) = peer {
            append_forwarded_for(req.headers_mut(), peer);
        }
        let resp = tokio::time::timeout(self.response_timeout, self.client.request(req))
            .await
            .map_err(|_| UpstreamError::Timeout(self.response_timeout))?
            .map_err(|e| UpstreamError::Unavailable(error_chain(&e)))?;
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, body))
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

/// A plain HTTP client for small control requests (fences, the demo, tools).
pub type SimpleClient = Client<HttpConnector, Full<Bytes>>;

pub fn simple_client() -> SimpleClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Sends one small request and collects the answer: `(status, body)`, or a
/// sentence saying why there is none (bad URL, connection error, timeout).
pub async fn call(
    client: &SimpleClient,
    method: &str,
    url: &str,
    content_type: Option<&str>,
    body: impl Into<Bytes>,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), String> {
    let mut b = Request::builder().method(method).uri(url);
    if let Some(ct) = content_type {
        b = b.header(header::CONTENT_TYPE, ct);
    }
    let req = b.body(Full::new(body.into())).map_err(|e| format!("bad request {method} {url}: {e}"))?;
    let resp = tokio::time::timeout(timeout, client.request(req))
        .await
        .map_err(|_| format!("{url}: timed out"))?
        .map_err(|e| format!("{url}: {}", error_chain(&e)))?;
    let status = resp.status();
    let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    Ok((status, body))
}

/// The full cause chain of an error, for messages that say what went wrong.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Headers that describe one connection, not the message (RFC 9110 7.6.1).
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including those the `Connection` header names.
/// `Transfer-Encoding` is left to hyper, which re-frames the body itself.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named.iter().chain(HOP_BY_HOP.iter()) {
        h.remove(n);
    }
}

fn append_forwarded_for(h: &mut HeaderMap, peer: SocketAddr) {
    let name = HeaderName::from_static("x-forwarded-for");
    let ip = peer.ip().to_string();
    let v = match h.get(&name).and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {ip}"),
        None => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&v) {
        h.insert(name, v);
    }
}

/// Resolves on SIGTERM or Ctrl-C: the shutdown future `main` hands to servers.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutdown signal received");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_including_named_ones() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "close, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        h.insert("x-keep", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn target_joins_base_path_and_query() {
        let u = Upstream::new("http://127.0.0.1:9/base/", Duration::from_secs(1), Duration::from_secs(1)).unwrap();
        assert_eq!(u.target(&"/a/b?x=1".parse().unwrap()).to_string(), "http://127.0.0.1:9/base/a/b?x=1");
        let u = Upstream::new("http://h:1", Duration::from_secs(1), Duration::from_secs(1)).unwrap();
        assert_eq!(u.target(&"/".parse().unwrap()).to_string(), "http://h:1/");
        assert!(Upstream::new("https://h", Duration::ZERO, Duration::ZERO).is_err());
    }
}
