//! The sidecar's local API (`--admin-listen`) and health port: the lock's
//! state for the app (`GET /v1/lock`, its events), the app's release and
//! rejoin, probes and metrics.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use serde_json::{json, Value};
use tokio::sync::watch;

use super::Sidecar;
use crate::lease::deadline::Stamp;
use crate::lease::keeper::{LockStatus, Phase};
use crate::metrics;
use crate::proxy::{self, json_response, Body};

impl Sidecar {
    fn lock_json(&self) -> Value {
        let s = self.status.borrow().clone();
        let now = Stamp::now();
        let holding = s.write_token(now).is_some();
        json!({
            "lock": self.cfg.keeper.lock,
            "holder": self.cfg.keeper.holder,
            "holding": holding,
            "state": s.phase,
            "token": s.token,
            "last_token": s.last_token,
            "lease_id": s.lease_id.map(|l| format!("{l:x}")),
            "ttl_ms": s.ttl.as_millis() as u64,
            "valid_for_ms": s.valid_for(now).as_millis() as u64,
            "safety_margin_ms": self.cfg.keeper.margin.as_millis() as u64,
            "fenced_out": s.phase == Phase::FencedOut,
            "fenced_out_highest": s.fenced_out_highest,
            "rejoin": self.cfg.keeper.rejoin,
            "last_error": s.last_error,
        })
    }

    /// The health port: probes and metrics only, safe to expose on the pod IP
    /// for kubelet while the local API stays on localhost.
    pub async fn health(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/healthz" | "/readyz" | "/metrics") => self.admin(req).await,
            (m, p) => {
                proxy::json_error(StatusCode::NOT_FOUND, "not_found", &format!("no such endpoint: {m} {p}"), None)
            }
        }
    }

    /// The local API.
    pub async fn admin(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/healthz") => proxy::text_response(StatusCode::OK, "text/plain", "ok\n"),
            (&Method::GET, "/readyz") => {
                let holding = self.status.borrow().write_token(Stamp::now()).is_some();
                if holding || self.cfg.ready_always {
                    proxy::text_response(StatusCode::OK, "text/plain", "ready\n")
                } else {
                    proxy::text_response(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not holding the lock\n")
                }
            }
            (&Method::GET, "/metrics") => proxy::text_response(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                metrics::render(&self.registry),
            ),
            (&Method::GET, "/v1/lock") => json_response(StatusCode::OK, &self.lock_json()),
            (&Method::GET, "/v1/lock/events") => self.events(),
            (&Method::POST, "/v1/lock/release") => {
                let mut status = self.status.clone();
                // The token the app may have seen: the release is of that
                // one only, so that a lock lost and won again before the
                // keeper reads the command is not given up, and nothing is
                // released at all when none was held.
                let Some(token) = status.borrow_and_update().token else {
                    return json_response(StatusCode::ACCEPTED, &json!({ "released": false }));
                };
                if let Some(k) = self.keeper.lock().as_ref() {
                    k.release_token(token);
                }
                // Answered once the keeper has withdrawn the token (it does
                // so before it revokes, and a fence under way is ended), so
                // that no write the app sends after this answer carries it,
                // whichever thread serves that write. Bounded, for a keeper
                // that does not answer. A token that changed (withdrawn, or
                // lost and a new one won) is withdrawn.
                let changed = status.wait_for(|s| s.token != Some(token));
                let withdrawn = matches!(tokio::time::timeout(Duration::from_secs(2), changed).await, Ok(Ok(_)));
                // Not null only when the lock was lost and won again meanwhile
                // (or the token was not withdrawn): the app is still the holder.
                let now = self.status.borrow().token.map(|t| t.get());
                json_response(StatusCode::ACCEPTED, &json!({ "released": true, "withdrawn": withdrawn, "token": now }))
            }
            (&Method::POST, "/v1/lock/rejoin") => {
                let rejoined = self.keeper.lock().as_ref().is_some_and(|k| k.rejoin());
                json_response(StatusCode::ACCEPTED, &json!({ "rejoined": rejoined }))
            }
            (m, p) => {
                proxy::json_error(StatusCode::NOT_FOUND, "not_found", &format!("no such endpoint: {m} {p}"), None)
            }
        }
    }

    /// Server-Sent Events: one event per change of state or token, plus a
    /// `self_fenced` event the moment the safety deadline passes without a
    /// keep-alive, which can come before the keeper itself gives up.
    fn events(self: Arc<Self>) -> Response<Body> {
        struct St {
            sc: Arc<Sidecar>,
            rx: watch::Receiver<LockStatus>,
            last: Option<(Phase, Option<u64>, bool)>,
        }
        let rx = self.status.clone();
        let st = St { sc: self, rx, last: None };
        let stream = futures_util::stream::unfold(st, |mut st| async move {
            // A comment line every 15 s keeps idle proxies from closing the stream.
            let keep_alive_at = tokio::time::Instant::now() + Duration::from_secs(15);
            loop {
                let s = st.rx.borrow_and_update().clone();
                let now = Stamp::now();
                let valid = s.write_token(now).is_some();
                let key = (s.phase, s.token.map(|t| t.get()), valid);
                if st.last != Some(key) {
                    let event = match (s.phase, valid) {
                        (Phase::Holding, true) => "acquired",
                        (Phase::Holding, false) => "self_fenced",
                        (Phase::FencedOut, _) => "fenced_out",
                        (Phase::Fencing, _) => "fencing",
                        (Phase::Stopped, _) => "stopped",
                        (Phase::AwaitingRejoin, _) => "awaiting_rejoin",
                        (Phase::Campaigning, _)
                            if matches!(st.last, Some((Phase::Holding | Phase::Fencing | Phase::FencedOut, ..))) =>
                        {
                            "lost"
                        }
                        (Phase::Campaigning, _) => "campaigning",
                    };
                    st.last = Some(key);
                    let data = st.sc.lock_json();
                    let frame = Bytes::from(format!("event: {event}\ndata: {data}\n\n"));
                    return Some((frame, st));
                }
                // Wake at the self-fencing deadline (it passes without a message), in short steps
                // while it is ahead: the deadline may pass on CLOCK_BOOTTIME during a suspend.
                let step = tokio::time::Instant::now() + Duration::from_millis(100);
                let wake = if valid { s.valid_until.map_or(step, |d| d.mono().min(step)) } else { keep_alive_at };
                tokio::select! {
                    r = st.rx.changed() => if r.is_err() { return None },
                    _ = tokio::time::sleep_until(wake.min(keep_alive_at)) => {
                        if tokio::time::Instant::now() >= keep_alive_at {
                            return Some((Bytes::from_static(b": keep-alive\n\n"), st));
                        }
                    }
                }
            }
        });
        let body = StreamBody::new(stream.map(|b| Ok::<_, proxy::BoxError>(Frame::data(b)))).boxed_unsync();
        let mut r = Response::new(body);
        let h = r.headers_mut();
        h.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/event-stream"));
        h.insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-cache"));
        r
    }
}
