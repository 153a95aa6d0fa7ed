//! The pooled client that carries a request to one upstream store.

use std::net::SocketAddr;
use std::time::Duration;

use http::header::HeaderValue;
use http::{Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::body::{json_error, Body, RequestBody};
use super::client::error_chain;
use super::headers::{append_forwarded_for, set_host, strip_hop_by_hop};

/// A pooled HTTP client for one upstream base URL.
#[derive(Clone, Debug)]
pub struct Upstream {
    client: Client<HttpConnector, RequestBody>,
    base: Uri,
    authority: HeaderValue,
    /// `--upstream-host`: the `Host` sent instead of the client's.
    host: Option<HeaderValue>,
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
        Ok(Upstream { client, base, authority, host: None, response_timeout })
    }

    /// Sends `host` as every request's `Host` instead of the client's (see
    /// [`set_host`]); `None` keeps the client's.
    pub fn with_host(mut self, host: Option<&str>) -> Result<Self, String> {
        self.host =
            host.map(|h| HeaderValue::from_str(h).map_err(|e| format!("bad upstream host {h:?}: {e}"))).transpose()?;
        Ok(self)
    }

    pub fn base(&self) -> &Uri {
        &self.base
    }

    /// Rewrites `req` for the upstream (URI, hop-by-hop headers, Host as
    /// [`set_host`] says) and
    /// sends it; resolves when the upstream's response head has arrived. The
    /// body streams both ways: nothing here buffers it.
    /// `peer`, when given, is appended to `X-Forwarded-For`.
    pub async fn send(
        &self,
        req: Request<Incoming>,
        peer: Option<SocketAddr>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        self.send_body(req.map(RequestBody::stream), peer).await
    }

    /// [`send`](Self::send) for a body the filter has partly read (see
    /// [`RequestBody`]).
    pub async fn send_body(
        &self,
        mut req: Request<RequestBody>,
        peer: Option<SocketAddr>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let authority = req.uri().authority().cloned();
        *req.uri_mut() = self.target(req.uri());
        *req.version_mut() = http::Version::HTTP_11;
        strip_hop_by_hop(req.headers_mut());
        set_host(req.headers_mut(), authority.as_ref(), self.host.as_ref(), &self.authority);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_joins_base_path_and_query() {
        let u = Upstream::new("http://127.0.0.1:9/base/", Duration::from_secs(1), Duration::from_secs(1)).unwrap();
        assert_eq!(u.target(&"/a/b?x=1".parse().unwrap()).to_string(), "http://127.0.0.1:9/base/a/b?x=1");
        let u = Upstream::new("http://h:1", Duration::from_secs(1), Duration::from_secs(1)).unwrap();
        assert_eq!(u.target(&"/".parse().unwrap()).to_string(), "http://h:1/");
        assert!(Upstream::new("https://h", Duration::ZERO, Duration::ZERO).is_err());
    }
}
