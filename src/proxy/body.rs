//! Response bodies and the small JSON / text answers every server here gives.

use std::convert::Infallible;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::{json, Value};

/// The response body every service here returns: either a streamed upstream
/// body or a small buffered one (errors, admin answers).
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A response body's error: the upstream's, or the filter cutting a write's
/// answer off (`filter::held`), which ends the client's connection.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A complete body from bytes.
pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never: Infallible| match never {}).boxed_unsync()
}

/// Wraps an upstream body unchanged.
pub fn stream(b: Incoming) -> Body {
    b.map_err(BoxError::from).boxed_unsync()
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

/// Whether a request body must send nothing more (a filter replica that
/// self-fenced while the write was in flight: `filter::shared::cutoff`).
pub trait Halt: Send + Sync + std::fmt::Debug {
    fn halted(&self) -> bool;
}

/// A request body on its way to the upstream: the client's stream as it
/// is, or (when the filter had to read the start of it to see what a write
/// changes, as for S3 DeleteObjects) the bytes already read followed by the
/// rest of the stream, byte for byte what the client sent.
#[derive(Debug)]
pub struct RequestBody {
    prefix: Option<Bytes>,
    rest: Option<Incoming>,
    trailers: Option<http::HeaderMap>,
    /// Checked before each frame: once halted, the body hands on nothing
    /// more (and whoever sends it drops the request, which closes the
    /// upstream connection). In the body, not only around the send: the
    /// upstream connection pulls the body whenever it is woken, even when
    /// the request's own future is not polled.
    halt: Option<std::sync::Arc<dyn Halt>>,
    /// Set once the body's end has been handed on (see [`marking_end`](Self::marking_end)).
    sent: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl RequestBody {
    /// The client's body, unbuffered.
    pub fn stream(b: Incoming) -> Self {
        RequestBody { prefix: None, rest: Some(b), trailers: None, halt: None, sent: None }
    }

    /// `prefix` (already read from the client), then `rest` if the client
    /// has more, then `trailers` if the client's body ended with them.
    pub fn prefixed(prefix: Bytes, rest: Option<Incoming>, trailers: Option<http::HeaderMap>) -> Self {
        RequestBody { prefix: (!prefix.is_empty()).then_some(prefix), rest, trailers, halt: None, sent: None }
    }

    /// The same body, setting `sent` once its end has been handed on (at
    /// once if it has none to send): from then on the upstream has, or will
    /// have, the whole request.
    pub fn marking_end(mut self, sent: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Self {
        self.sent = Some(sent);
        self.mark_if_ended(false);
        self
    }

    /// At its end, after its trailers (hyper may ask no more after them), or
    /// with no byte left of a known length (an h2c client's end of stream
    /// may come in a later frame that hyper, its `Content-Length` written,
    /// never asks for).
    fn mark_if_ended(&self, trailers: bool) {
        if let Some(sent) = &self.sent {
            use http_body::Body;
            if trailers || self.is_end_stream() || self.size_hint().exact() == Some(0) {
                sent.store(true, std::sync::atomic::Ordering::Release);
            }
        }
    }

    /// The same body, sending nothing more once `halt` says so.
    pub fn halted_by(mut self, halt: std::sync::Arc<dyn Halt>) -> Self {
        self.halt = Some(halt);
        self
    }

    fn next_frame(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        use std::task::Poll;
        if let Some(p) = self.prefix.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(p))));
        }
        if let Some(rest) = self.rest.as_mut() {
            match http_body::Body::poll_frame(std::pin::Pin::new(rest), cx) {
                Poll::Ready(None) => self.rest = None,
                other => return other,
            }
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(http_body::Frame::trailers(t))))
    }
}

impl From<Incoming> for RequestBody {
    fn from(b: Incoming) -> Self {
        RequestBody::stream(b)
    }
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        use std::task::Poll;
        // No waker is registered: the request is dropped by its sender, which
        // watches the same condition (`CutOff`), and this body with it.
        if self.halt.as_ref().is_some_and(|h| h.halted()) {
            return Poll::Pending;
        }
        let frame = self.next_frame(cx);
        if let Poll::Ready(r) = &frame {
            self.mark_if_ended(matches!(r, Some(Ok(f)) if f.is_trailers()));
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.trailers.is_none() && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let rest = self.rest.as_ref().map(|r| r.size_hint()).unwrap_or_else(|| http_body::SizeHint::with_exact(0));
        let n = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        // A fresh hint: SizeHint's setters panic when lower passes upper.
        let mut hint = http_body::SizeHint::new();
        if let Some(u) = rest.upper() {
            hint.set_upper(u + n);
        }
        hint.set_lower(rest.lower() + n);
        hint
    }
}
