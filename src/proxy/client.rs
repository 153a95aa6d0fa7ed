//! A small client for control requests (fences, the demo, tools).

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

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
    let (status, _, body) = send(client, req, timeout).await?;
    Ok((status, body))
}

/// Sends a request built by the caller and collects the whole answer:
/// `(status, headers, body)`, or a sentence saying why there is none.
pub async fn send(
    client: &SimpleClient,
    req: Request<Full<Bytes>>,
    timeout: Duration,
) -> Result<(StatusCode, HeaderMap, Bytes), String> {
    let url = req.uri().to_string();
    let resp = tokio::time::timeout(timeout, client.request(req))
        .await
        .map_err(|_| format!("{url}: timed out"))?
        .map_err(|e| format!("{url}: {}", error_chain(&e)))?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    Ok((parts.status, parts.headers, body))
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
