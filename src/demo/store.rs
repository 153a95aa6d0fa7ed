//! A small in-memory HTTP store with no fencing of its own: the legacy
//! store of the demo (and a handy fake for quick experiments). PUT/POST
//! store the body, GET/HEAD read it, DELETE removes it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use parking_lot::Mutex;
use tokio::net::TcpListener;

use crate::proxy::{self, Body, ServerLimits};

#[derive(Debug, Default)]
pub struct MemStore {
    data: Mutex<HashMap<String, bytes::Bytes>>,
}

impl MemStore {
    pub fn get(&self, path: &str) -> Option<String> {
        self.data.lock().get(path).map(|b| String::from_utf8_lossy(b).into_owned())
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_owned();
        let method = req.method().clone();
        match method {
            Method::GET | Method::HEAD => match self.data.lock().get(&path) {
                Some(b) => proxy::text_response(StatusCode::OK, "text/plain", b.clone()),
                None => proxy::text_response(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
            },
            Method::PUT | Method::POST => {
                let body = match req.into_body().collect().await {
                    Ok(b) => b.to_bytes(),
                    // The sender went away mid-body: store nothing.
                    Err(_) => return proxy::text_response(StatusCode::BAD_REQUEST, "text/plain", "incomplete body\n"),
                };
                let existed = self.data.lock().insert(path, body).is_some();
                let status = if existed { StatusCode::NO_CONTENT } else { StatusCode::CREATED };
                proxy::text_response(status, "text/plain", "")
            }
            Method::DELETE => {
                let existed = self.data.lock().remove(&path).is_some();
                let status = if existed { StatusCode::NO_CONTENT } else { StatusCode::NOT_FOUND };
                proxy::text_response(status, "text/plain", "")
            }
            _ => proxy::text_response(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "method not allowed\n"),
        }
    }
}

/// Serves `store` on `listener` until `shutdown` resolves.
pub async fn serve(store: Arc<MemStore>, listener: TcpListener, shutdown: impl std::future::Future<Output = ()>) {
    proxy::serve(listener, ServerLimits::default(), move |req, _: SocketAddr| store.clone().handle(req), shutdown).await
}
