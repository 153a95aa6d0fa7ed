//! The fence protocol: one definition for both ends.
//!
//! A new holder's sidecar raises a filter's high-water mark before it takes
//! writes, so a zombie is refused from that moment, not from the new holder's
//! first write:
//!
//! ```text
//! POST {filter admin}/v1/locks/{lock}/fence   {"token": N, "timeout_ms": M}
//!   200  {"lock": L, "token": N, "highest": H}   fenced (older writes drained)
//!   409  {"error": "fencing_token_stale", "highest": H, ...}   a higher token was admitted
//!   anything else: the fence did not happen (retry)
//! ```
//!
//! The filter's admin handler parses with [`lock_in_path`] and [`FenceRequest`]
//! and answers [`FenceResponse`]; the sidecar's fencer builds the request with
//! [`path`] and reads the answer with [`Outcome::from_answer`].

use serde::{Deserialize, Serialize};

use crate::token::LockName;

const PREFIX: &str = "/v1/locks/";
const SUFFIX: &str = "/fence";

/// The fence endpoint's path for `lock`.
pub fn path(lock: &LockName) -> String {
    format!("{PREFIX}{lock}{SUFFIX}")
}

/// The lock named in a fence path, unparsed; `None` if `path` is not a fence
/// path (including `/v1/locks/fence`, which names no lock).
pub fn lock_in_path(path: &str) -> Option<&str> {
    let name = path.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
    (!name.is_empty() && !name.contains('/')).then_some(name)
}

/// The request body.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceRequest {
    pub token: u64,
    /// How long the filter may wait for older writes to drain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// The 200 answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceResponse {
    pub lock: String,
    pub token: u64,
    pub highest: u64,
}

/// The part of the 409 answer the fencer needs.
#[derive(Deserialize)]
struct StaleAnswer {
    highest: u64,
}

/// What one fence call came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The filter's mark is at our token (or above it only by our own token).
    Fenced,
    /// The filter has admitted a higher token than ours.
    Stale { highest: u64 },
    /// No answer we can rely on: retry.
    Failed(String),
}

impl Outcome {
    /// Reads a filter's answer (status and body).
    pub fn from_answer(status: u16, body: &[u8]) -> Outcome {
        match status {
            200 => Outcome::Fenced,
            409 => match serde_json::from_slice::<StaleAnswer>(body) {
                Ok(a) => Outcome::Stale { highest: a.highest },
                Err(e) => Outcome::Failed(format!("409 without a readable \"highest\": {e}")),
            },
            s => Outcome::Failed(format!("{s} {}", String::from_utf8_lossy(body))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_round_trips_and_rejects_what_names_no_lock() {
        let lock: LockName = "orders".parse().unwrap();
        assert_eq!(lock_in_path(&path(&lock)), Some("orders"));
        assert_eq!(lock_in_path("/v1/locks/fence"), None);
        assert_eq!(lock_in_path("/v1/locks//fence"), None);
        assert_eq!(lock_in_path("/v1/locks/a/b/fence"), None);
        assert_eq!(lock_in_path("/v1/locks/a"), None);
    }

    #[test]
    fn answers_are_read_strictly() {
        assert_eq!(Outcome::from_answer(200, b"{}"), Outcome::Fenced);
        assert_eq!(
            Outcome::from_answer(409, br#"{"error":"fencing_token_stale","highest":9}"#),
            Outcome::Stale { highest: 9 }
        );
        // A 409 we cannot read is not taken as "fenced out" (nor as fenced).
        assert!(matches!(Outcome::from_answer(409, b"nope"), Outcome::Failed(_)));
        assert!(matches!(Outcome::from_answer(503, b"busy"), Outcome::Failed(_)));
        let r: FenceRequest = serde_json::from_str(r#"{"token": 5}"#).unwrap();
        assert_eq!(r, FenceRequest { token: 5, timeout_ms: None });
    }
}
