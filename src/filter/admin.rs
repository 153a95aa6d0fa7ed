//! The filter's admin API: health, readiness, metrics, the lock listing and
//! the proactive fence.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::json;
use tokio::time::Instant;

use super::error::FilterError;
use super::Filter;
use crate::fence::{self, FenceRequest, FenceResponse};
use crate::metrics;
use crate::proxy::{self, json_response, Body};
use crate::token::{self, LockName, Token};

impl Filter {
    /// The admin API: health, metrics, lock listing and the proactive fence.
    pub async fn admin(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_owned();
        let not_found = || FilterError::NotFound(format!("no such admin endpoint: {} {path}", req.method()));
        let result = match (req.method(), path.as_str()) {
            (&Method::GET, "/healthz") => Ok(proxy::text_response(StatusCode::OK, "text/plain", "ok\n")),
            (&Method::GET, "/readyz") => Ok(self.readyz()),
            (&Method::GET, "/metrics") => Ok(self.metrics().await),
            (&Method::GET, "/v1/locks") => Ok(self.list_locks().await),
            // `/v1/locks/fence` names no lock: not an endpoint.
            (&Method::POST, p) => match fence::lock_in_path(p) {
                Some(name) => {
                    let name = name.to_owned();
                    self.fence(&name, req).await
                }
                _ => Err(not_found()),
            },
            _ => Err(not_found()),
        };
        result.unwrap_or_else(FilterError::into_response)
    }

    async fn metrics(&self) -> Response<Body> {
        if let Some(s) = &self.shared {
            // The replica set and acknowledgements are read from etcd now;
            // if that fails the scrape shows the last read (and the failure
            // shows in `fencegate_filter_replica_writable`).
            let max_acks = self.cfg.metrics_lock_limit.saturating_mul(8);
            if let Err(e) = s.refresh_view(max_acks).await {
                tracing::debug!(error = %e, "reading the replica set for metrics failed");
            }
        }
        proxy::text_response(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics::render(&self.registry),
        )
    }

    fn readyz(&self) -> Response<Body> {
        let text = |status, body: &'static str| proxy::text_response(status, "text/plain", body);
        if self.shutting_down.load(Ordering::Relaxed) {
            text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
        } else if self.shared.as_ref().is_some_and(|s| !s.writable()) {
            text(StatusCode::SERVICE_UNAVAILABLE, "self-fenced: etcd registration or marks watch not confirmed\n")
        } else if Instant::now() < self.locks.ready_at() {
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                "starting: writes wait out --abort-grace after start-up (the previous process's writes may still land)\n",
            )
        } else {
            text(StatusCode::OK, "ready\n")
        }
    }

    async fn list_locks(&self) -> Response<Body> {
        let all = self.locks.all();
        let locks: Vec<_> = all
            .iter()
            .map(|e| {
                let (highest, durable, set_at, inflight) = e.snapshot();
                let set_at_ms = set_at
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_millis() as u64);
                let inflight: BTreeMap<String, usize> = inflight.into_iter().map(|(t, n)| (t.to_string(), n)).collect();
                json!({ "lock": e.name, "highest": highest, "durable": durable, "set_at_ms": set_at_ms, "inflight": inflight })
            })
            .collect();
        // Says whether a token's raise is checked with etcd ("etcd") or the
        // filter trusts tokens as sent ("off"), so an operator sees it.
        let verification = if self.locks.verifier().is_some() { "etcd" } else { "off" };
        match &self.shared {
            Some(s) => {
                let names: Vec<LockName> = all.iter().map(|e| e.name.clone()).collect();
                let shared = s.describe(&names).await;
                json_response(
                    StatusCode::OK,
                    &json!({ "verification": verification, "locks": locks, "shared": shared }),
                )
            }
            None => json_response(StatusCode::OK, &json!({ "verification": verification, "locks": locks })),
        }
    }

    async fn fence(&self, name: &str, req: Request<Incoming>) -> Result<Response<Body>, FilterError> {
        let lock: LockName = name.parse().map_err(FilterError::Token)?;
        if !self.cfg.protection.protects(&lock) {
            return Err(FilterError::UnknownLock(lock.to_string()));
        }
        let bytes = Limited::new(req.into_body(), 4096)
            .collect()
            .await
            .map_err(|e| FilterError::BadRequest(format!("could not read the body: {e}")))?
            .to_bytes();
        let body: FenceRequest = serde_json::from_slice(&bytes)
            .map_err(|e| FilterError::BadRequest(format!("body must be {{\"token\": N}}: {e}")))?;
        let token = Token::new(body.token).ok_or_else(|| {
            FilterError::Token(token::TokenError::Malformed(format!("token must be in 1..={}", Token::MAX)))
        })?;
        let wait = body.timeout_ms.map(Duration::from_millis).unwrap_or(self.cfg.max_wait);
        let entry = self.locks.entry(&lock);
        if let Err(e) = self.check_shared() {
            self.refusals.count(&self.locks, Some(&lock), &e);
            return Err(e);
        }
        if let Err(e) = entry.fence(token, crate::duration::after(wait)).await {
            let e = FilterError::from(e);
            self.refusals.count(&self.locks, Some(&lock), &e);
            return Err(e);
        }
        let (highest, ..) = entry.snapshot();
        tracing::info!(%lock, token = token.get(), "fenced");
        let answer = FenceResponse { lock: lock.to_string(), token: token.get(), highest };
        Ok(json_response(StatusCode::OK, &serde_json::to_value(answer).expect("serializable")))
    }
}
