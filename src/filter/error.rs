//! The one place where the filter's errors become HTTP answers.

use std::time::Duration;

use http::{HeaderValue, Response, StatusCode};
use serde_json::json;

use super::admission::AdmitError;
use crate::proxy::{json_error, Body, UpstreamError};
use crate::token::{LockName, TokenError};

/// Everything the filter can answer instead of the store's own response.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("{}", mismatch_message(expected.as_ref(), got, paths))]
    LockMismatch { expected: Option<LockName>, got: LockName, paths: Vec<(String, Option<LockName>)> },
    #[error(
        "a write to {path} reaches paths protected by other locks ({}); refused, since one token cannot fence them",
        names(others)
    )]
    SpansLocks { path: String, own: Option<LockName>, others: Vec<LockName> },
    #[error("{0}")]
    DestinationMalformed(String),
    /// `--store s3`: an `X-Amz-Rename-Source` that cannot be read as one key.
    #[error("{0}")]
    RenameSourceMalformed(String),
    #[error("no protection rule covers path {0}; writes to it are refused (see --allow-unprotected)")]
    Unprotected(String),
    #[error("path {0} is not canonical; refused so it cannot dodge a protection rule once the store decodes it")]
    NotCanonical(String),
    #[error(transparent)]
    Admit(#[from] AdmitError),
    #[error("this write was aborted because a newer token fenced lock {0}; whether the store applied it is unknown")]
    Aborted(LockName),
    /// With shared marks: the replica self-fenced while the write was in
    /// flight, and cut it off.
    #[error(
        "this filter replica could not confirm its etcd registration in time while this write to lock {0} was in \
         flight, and cut it off; whether the store applied it is unknown"
    )]
    SelfFenced(LockName),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("lock {0} is not protected by this filter")]
    UnknownLock(String),
    #[error("{0}")]
    BadRequest(String),
    /// `--store s3`: the part of the body that names the write's targets is
    /// longer than the filter reads.
    #[error("{0}")]
    BodyTooLarge(String),
    /// `--store s3`: a body that names the write's targets cannot be read
    /// (DeleteObjects XML that is not well-formed, say).
    #[error("{0}")]
    BodyMalformed(String),
    /// `--store s3`: a body that names the write's targets, sent in an
    /// encoding the filter does not read (`aws-chunked`): the store would
    /// read the decoded body, the filter the bytes on the wire.
    #[error("{0}")]
    BodyEncoded(String),
    /// `--store s3`: the part of the body that names the write's targets did
    /// not arrive within `--header-timeout`.
    #[error("{0}")]
    BodyTimeout(String),
    /// `--s3-domain`: a `Host` the store might read as another bucket.
    #[error("{0}")]
    HostMalformed(String),
    #[error("{0}")]
    NotFound(String),
}

impl FilterError {
    /// The reason label used in metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            FilterError::Token(TokenError::Missing(_)) => "missing",
            FilterError::Token(TokenError::Malformed(_)) => "malformed",
            FilterError::LockMismatch { .. } => "lock_mismatch",
            FilterError::Unprotected(_) => "unprotected",
            FilterError::NotCanonical(_) => "not_canonical",
            FilterError::SpansLocks { .. } => "spans_locks",
            FilterError::DestinationMalformed(_) => "destination_malformed",
            FilterError::RenameSourceMalformed(_) => "rename_source_malformed",
            FilterError::Admit(AdmitError::Stale { .. } | AdmitError::Superseded { .. }) => "stale",
            FilterError::Admit(AdmitError::State(_)) => "state_unavailable",
            FilterError::Admit(AdmitError::BarrierTimeout { .. }) => "barrier_timeout",
            FilterError::Admit(AdmitError::Unverified { .. }) => "unverified",
            FilterError::Admit(AdmitError::VerifyUnavailable { .. }) => "verify_unavailable",
            FilterError::Aborted(_) => "aborted",
            FilterError::SelfFenced(_) => "self_fenced",
            FilterError::Upstream(_) => "upstream",
            FilterError::UnknownLock(_) => "unknown_lock",
            FilterError::BadRequest(_) => "bad_request",
            FilterError::BodyTooLarge(_) => "body_too_large",
            FilterError::BodyMalformed(_) => "body_malformed",
            FilterError::BodyEncoded(_) => "body_encoding_unsupported",
            FilterError::BodyTimeout(_) => "body_timeout",
            FilterError::HostMalformed(_) => "host_malformed",
            FilterError::NotFound(_) => "not_found",
        }
    }

    pub fn into_response(self) -> Response<Body> {
        let msg = self.to_string();
        let retry = |r: Response<Body>, after: Duration| with_retry_after(r, after);
        match self {
            FilterError::Token(TokenError::Missing(_)) => {
                json_error(StatusCode::PRECONDITION_REQUIRED, "fencing_token_missing", &msg, None)
            }
            FilterError::Token(TokenError::Malformed(_)) => {
                json_error(StatusCode::BAD_REQUEST, "fencing_token_malformed", &msg, None)
            }
            FilterError::LockMismatch { expected, got, paths } => {
                let paths: serde_json::Map<String, serde_json::Value> =
                    paths.into_iter().map(|(p, l)| (p, json!(l))).collect();
                json_error(
                    StatusCode::FORBIDDEN,
                    "fencing_lock_mismatch",
                    &msg,
                    Some(json!({ "expected": expected, "lock": got, "paths": paths })),
                )
            }
            FilterError::SpansLocks { path, own, others } => json_error(
                StatusCode::FORBIDDEN,
                "path_spans_locks",
                &msg,
                Some(json!({ "path": path, "lock": own, "locks": others })),
            ),
            FilterError::DestinationMalformed(_) => {
                json_error(StatusCode::BAD_REQUEST, "destination_malformed", &msg, None)
            }
            FilterError::RenameSourceMalformed(_) => {
                json_error(StatusCode::BAD_REQUEST, "rename_source_malformed", &msg, None)
            }
            FilterError::Unprotected(_) => json_error(StatusCode::FORBIDDEN, "path_not_protected", &msg, None),
            FilterError::NotCanonical(_) => json_error(StatusCode::BAD_REQUEST, "path_not_canonical", &msg, None),
            FilterError::Admit(AdmitError::Stale { lock, token, highest }) => json_error(
                StatusCode::CONFLICT,
                "fencing_token_stale",
                &msg,
                Some(json!({ "lock": lock, "token": token, "highest": highest })),
            ),
            FilterError::Admit(AdmitError::State(_)) => retry(
                json_error(StatusCode::SERVICE_UNAVAILABLE, "fencing_state_unavailable", &msg, None),
                Duration::from_secs(1),
            ),
            FilterError::Admit(AdmitError::BarrierTimeout { retry_after, .. }) => {
                retry(json_error(StatusCode::SERVICE_UNAVAILABLE, "fencing_barrier_timeout", &msg, None), retry_after)
            }
            FilterError::Admit(AdmitError::Superseded { lock, token, holder, highest }) => json_error(
                StatusCode::CONFLICT,
                "fencing_token_stale",
                &msg,
                Some(json!({ "lock": lock, "token": token, "highest": highest, "holder_token": holder })),
            ),
            FilterError::Admit(AdmitError::Unverified { lock, token, holder }) => json_error(
                StatusCode::FORBIDDEN,
                "fencing_token_unverified",
                &msg,
                Some(json!({ "lock": lock, "token": token, "holder_token": holder })),
            ),
            FilterError::Admit(AdmitError::VerifyUnavailable { lock, token, .. }) => retry(
                json_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "fencing_verify_unavailable",
                    &msg,
                    Some(json!({ "lock": lock, "token": token })),
                ),
                Duration::from_secs(1),
            ),
            FilterError::Aborted(lock) => json_error(
                StatusCode::CONFLICT,
                "fencing_write_aborted",
                &msg,
                Some(json!({ "lock": lock, "outcome": "unknown" })),
            ),
            FilterError::SelfFenced(lock) => retry(
                json_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "fencing_state_unavailable",
                    &msg,
                    Some(json!({ "lock": lock, "outcome": "unknown" })),
                ),
                Duration::from_secs(1),
            ),
            FilterError::Upstream(e) => e.into_response(),
            FilterError::UnknownLock(_) => json_error(StatusCode::NOT_FOUND, "fencing_lock_unknown", &msg, None),
            FilterError::BadRequest(_) => json_error(StatusCode::BAD_REQUEST, "bad_request", &msg, None),
            FilterError::BodyTooLarge(_) => json_error(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", &msg, None),
            FilterError::BodyMalformed(_) => json_error(StatusCode::BAD_REQUEST, "body_malformed", &msg, None),
            FilterError::BodyEncoded(_) => {
                json_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "body_encoding_unsupported", &msg, None)
            }
            FilterError::BodyTimeout(_) => json_error(StatusCode::REQUEST_TIMEOUT, "body_timeout", &msg, None),
            FilterError::HostMalformed(_) => json_error(StatusCode::BAD_REQUEST, "host_malformed", &msg, None),
            FilterError::NotFound(_) => json_error(StatusCode::NOT_FOUND, "not_found", &msg, None),
        }
    }
}

fn names(locks: &[LockName]) -> String {
    locks.iter().map(|l| l.as_str()).collect::<Vec<_>>().join(", ")
}

fn mismatch_message(expected: Option<&LockName>, got: &LockName, paths: &[(String, Option<LockName>)]) -> String {
    if let [(_, _)] = paths {
        return match expected {
            Some(e) => format!("this path is protected by lock {e}, not {got}"),
            None => format!("this path is not protected by lock {got}"),
        };
    }
    let each: Vec<String> =
        paths.iter().map(|(p, l)| format!("{p}: {}", l.as_ref().map_or("no lock", |l| l.as_str()))).collect();
    format!("every path this write changes must be protected by lock {got}; they are protected by {}", each.join("; "))
}

fn with_retry_after(mut r: Response<Body>, after: Duration) -> Response<Body> {
    let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
    r.headers_mut().insert(http::header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    r
}
