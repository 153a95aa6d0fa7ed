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
