//! The wire contract shared by the sidecar, the filter and the tests.
//!
//! A fenced write carries two headers:
//!
//! * `Fencing-Lock: <name>`: 1..=128 characters of `A-Za-z0-9._-`;
//! * `Fencing-Token: <decimal integer in 1..=i64::MAX>`.
//!
//! Parsing is strict on purpose: a header sent twice, a leading `+`, spaces
//! inside the number, `0` or a value past [`Token::MAX`] are all malformed.
//! The bound is etcd's: a token is a holder key's create revision, an
//! `int64`, so a larger number was never issued by a real holder; accepting
//! one would let a single forged write raise a lock's mark past every token
//! etcd can ever hand out, ending the lock for good. A
//! lenient parser is how "token 0" or "the first of two tokens" slips past a
//! check, and the filter fails closed instead.

use std::fmt;
use std::num::NonZeroU64;
use std::str::FromStr;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde::{Deserialize, Serialize};

/// `Fencing-Lock`: which lock the token belongs to.
pub static LOCK_HEADER: HeaderName = HeaderName::from_static("fencing-lock");
/// `Fencing-Token`: the holder's fencing token.
pub static TOKEN_HEADER: HeaderName = HeaderName::from_static("fencing-token");
/// Every header whose name starts with this belongs to fencegate; the sidecar
/// strips all of them from what the app sends.
pub const HEADER_PREFIX: &str = "fencing-";

/// Longest lock name accepted.
pub const MAX_LOCK_LEN: usize = 128;

/// A validated lock name. Shared, not owned: the filter's rules, its lock
/// map and every write's targets each hold the name, and a clone is a
/// reference count instead of an allocation (two of them per write).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LockName(Arc<str>);

impl LockName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for LockName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for LockName {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Self, TokenError> {
        Ok(LockRef::parse(s)?.to_owned())
    }
}

/// A lock name read from a request, borrowed from its header and checked as
/// strictly as a [`LockName`]. The filter reads one on every write only to
/// compare it with the lock its rules give the write's targets: borrowed, it
/// costs no allocation; [`to_owned`](Self::to_owned) makes a [`LockName`]
/// where one must be kept (an error that names it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockRef<'a>(&'a str);

impl<'a> LockRef<'a> {
    pub fn parse(s: &'a str) -> Result<Self, TokenError> {
        let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if s.is_empty() || s.len() > MAX_LOCK_LEN || !s.chars().all(ok_char) {
            return Err(TokenError::Malformed(format!(
                "lock name must be 1..={MAX_LOCK_LEN} characters of A-Za-z0-9._- (got {:?})",
                truncate(s)
            )));
        }
        Ok(LockRef(s))
    }

    pub fn as_str(&self) -> &'a str {
        self.0
    }

    pub fn to_owned(self) -> LockName {
        LockName(Arc::from(self.0))
    }
}

impl PartialEq<LockRef<'_>> for LockName {
    fn eq(&self, other: &LockRef<'_>) -> bool {
        self.as_str() == other.0
    }
}

impl TryFrom<String> for LockName {
    type Error = TokenError;
    fn try_from(s: String) -> Result<Self, TokenError> {
        s.parse()
    }
}

impl From<LockName> for String {
    fn from(l: LockName) -> String {
        l.0.to_string()
    }
}

/// A fencing token: a positive integer that grows with every new lock holder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
// Deserialized through `Token::new`, so a JSON token is bounded like a header's.
#[serde(try_from = "u64", into = "u64")]
pub struct Token(NonZeroU64);

impl TryFrom<u64> for Token {
    type Error = TokenError;
    fn try_from(v: u64) -> Result<Self, TokenError> {
        Token::new(v).ok_or_else(|| TokenError::Malformed(format!("fencing token must be in 1..={}", Token::MAX)))
    }
}

impl From<Token> for u64 {
    fn from(t: Token) -> u64 {
        t.get()
    }
}

impl Token {
    /// The largest token: etcd revisions are `int64`.
    pub const MAX: u64 = i64::MAX as u64;

    /// A token, if `v` is in `1..=Token::MAX`.
    pub fn new(v: u64) -> Option<Token> {
        NonZeroU64::new(v).filter(|v| v.get() <= Token::MAX).map(Token)
    }
    pub fn get(self) -> u64 {
        self.0.get()
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for Token {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Self, TokenError> {
        // u64::from_str accepts a leading '+'; the contract says plain digits.
        if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(TokenError::Malformed(format!(
                "fencing token must be a decimal integer in 1..={} (got {:?})",
                Token::MAX,
                truncate(s)
            )));
        }
        let v: u64 =
            s.parse().map_err(|_| TokenError::Malformed(format!("fencing token {:?} overflows a u64", truncate(s))))?;
        if v > Token::MAX {
            return Err(TokenError::Malformed(format!(
                "fencing token {v} is above {} (etcd revisions are int64; no holder was ever given it)",
                Token::MAX
            )));
        }
        Token::new(v).ok_or_else(|| TokenError::Malformed("fencing token must be greater than 0".into()))
    }
}

/// What can be wrong with the fencing headers of a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// One or both headers are absent (HTTP 428).
    #[error("{0}")]
    Missing(String),
    /// A header is present but not valid (HTTP 400).
    #[error("{0}")]
    Malformed(String),
}

/// The lock and token a request carries, the lock borrowed from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fence<'a> {
    pub lock: LockRef<'a>,
    pub token: Token,
}

/// Reads the fencing headers of a request.
///
/// Malformed beats missing: a request with a bad `Fencing-Token` and no
/// `Fencing-Lock` is answered 400, since the client clearly meant to fence.
pub fn parse_headers(headers: &HeaderMap) -> Result<Fence<'_>, TokenError> {
    let lock = single(headers, &LOCK_HEADER)?;
    let token = single(headers, &TOKEN_HEADER)?;
    let lock = lock.map(LockRef::parse).transpose()?;
    let token = token.map(str::parse::<Token>).transpose()?;
    match (lock, token) {
        (Some(lock), Some(token)) => Ok(Fence { lock, token }),
        (None, None) => Err(TokenError::Missing("this write needs the Fencing-Lock and Fencing-Token headers".into())),
        (None, _) => Err(TokenError::Missing("this write needs the Fencing-Lock header".into())),
        (_, None) => Err(TokenError::Missing("this write needs the Fencing-Token header".into())),
    }
}

fn single<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Result<Option<&'a str>, TokenError> {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(TokenError::Malformed(format!("the {name} header must appear once")));
    }
    first.to_str().map(Some).map_err(|_| TokenError::Malformed(format!("the {name} header is not visible ASCII")))
}

/// Writes the two headers, replacing any present.
pub fn insert_headers(headers: &mut HeaderMap, lock: &LockName, token: Token) {
    insert_headers_with(headers, &lock_header_value(lock), token);
}

/// `Fencing-Lock`'s value for `lock`.
pub fn lock_header_value(lock: &LockName) -> HeaderValue {
    // Validated ASCII, so the conversion cannot fail.
    lock.as_str().parse().expect("lock names are header-safe")
}

/// [`insert_headers`] with the lock's value made once by
/// [`lock_header_value`]: a sidecar sends the same lock on every write.
pub fn insert_headers_with(headers: &mut HeaderMap, lock: &HeaderValue, token: Token) {
    insert_header_values(headers, lock.clone(), token_header_value(token));
}

/// `Fencing-Token`'s value for `token`.
pub fn token_header_value(token: Token) -> HeaderValue {
    token.get().into()
}

/// Writes the two headers from values made by [`lock_header_value`] and
/// [`token_header_value`], replacing any present: a sidecar sends the same
/// lock on every write, and the same token until the lock changes hands, so
/// it makes each value once (a clone is a reference count, where making one
/// is an allocation).
pub fn insert_header_values(headers: &mut HeaderMap, lock: HeaderValue, token: HeaderValue) {
    headers.insert(LOCK_HEADER.clone(), lock);
    headers.insert(TOKEN_HEADER.clone(), token);
}

/// The token alone, for a request whose headers this process wrote itself
/// ([`insert_headers`]): `None` when it has none, or anything but one valid
/// token. Not for requests from outside: [`parse_headers`] checks both.
pub fn token_of(headers: &HeaderMap) -> Option<Token> {
    single(headers, &TOKEN_HEADER).ok().flatten()?.parse().ok()
}

/// Removes every `Fencing-*` header: the sidecar's trust boundary.
pub fn strip_headers(headers: &mut HeaderMap) {
    let names: Vec<HeaderName> = headers.keys().filter(|n| n.as_str().starts_with(HEADER_PREFIX)).cloned().collect();
    for n in names {
        headers.remove(&n);
    }
}

/// Which methods count as reads; everything else is a write.
#[derive(Clone, Debug)]
pub struct ReadMethods(Vec<Method>);

impl Default for ReadMethods {
    fn default() -> Self {
        ReadMethods::parse("GET,HEAD,OPTIONS,TRACE,PROPFIND").expect("static list")
    }
}

impl ReadMethods {
    /// A comma-separated list of method names, e.g. `GET,HEAD`.
    pub fn parse(list: &str) -> Result<Self, String> {
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| Method::from_bytes(s.as_bytes()).map_err(|_| format!("bad method name {s:?}")))
            .collect::<Result<Vec<_>, _>>()
            .map(ReadMethods)
    }

    pub fn is_write(&self, m: &Method) -> bool {
        !self.0.contains(m)
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hm(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    #[test]
    fn parses_a_good_pair() {
        let h = hm(&[("Fencing-Lock", "orders.v1_a-b"), ("Fencing-Token", "42")]);
        let f = parse_headers(&h).unwrap();
        assert_eq!(f.lock.as_str(), "orders.v1_a-b");
        assert_eq!(f.token.get(), 42);
        let h = hm(&[("fencing-lock", "x"), ("fencing-token", "9223372036854775807")]);
        assert_eq!(parse_headers(&h).unwrap().token.get(), i64::MAX as u64);
    }

    #[test]
    fn missing_headers_are_missing() {
        for h in [hm(&[]), hm(&[("Fencing-Lock", "a")]), hm(&[("Fencing-Token", "1")])] {
            assert!(matches!(parse_headers(&h), Err(TokenError::Missing(_))), "{h:?}");
        }
    }

    #[test]
    fn malformed_values_are_malformed() {
        let long = "a".repeat(129);
        let cases: Vec<Vec<(&str, &str)>> = vec![
            vec![("Fencing-Lock", "a"), ("Fencing-Token", "0")],
            vec![("Fencing-Lock", "a"), ("Fencing-Token", "-1")],
            vec![("Fencing-Lock", "a"), ("Fencing-Token", "+1")],
            vec![("Fencing-Lock", "a"), ("Fencing-Token", "1.0")],
            vec![("Fencing-Lock", "a"), ("Fencing-Token", "abc")],
            vec![("Fencing-Lock", "a"), ("Fencing-Token", "18446744073709551616")],
            // Above i64::MAX: no etcd revision, so no holder, ever had it (issue 13).
            vec![("Fencing-Lock", "a"), ("Fencing-Token", "9223372036854775808")],
            vec![("Fencing-Lock", "a"), ("Fencing-Token", "18446744073709551615")],
            vec![("Fencing-Lock", "a"), ("Fencing-Token", "99999999999999999999999")],
            vec![("Fencing-Lock", "a"), ("Fencing-Token", "")],
            vec![("Fencing-Lock", "a"), ("Fencing-Token", "1"), ("Fencing-Token", "2")],
            vec![("Fencing-Lock", "a"), ("Fencing-Lock", "a"), ("Fencing-Token", "1")],
            vec![("Fencing-Lock", "a/b"), ("Fencing-Token", "1")],
            vec![("Fencing-Lock", "a b"), ("Fencing-Token", "1")],
            vec![("Fencing-Lock", ""), ("Fencing-Token", "1")],
            vec![("Fencing-Lock", &long), ("Fencing-Token", "1")],
            vec![("Fencing-Token", "zero")],
        ];
        for c in cases {
            assert!(matches!(parse_headers(&hm(&c)), Err(TokenError::Malformed(_))), "{c:?}");
        }
        let ok = "a".repeat(128);
        assert!(parse_headers(&hm(&[("Fencing-Lock", &ok), ("Fencing-Token", "1")])).is_ok());
    }

    /// What the sidecar reads back from headers it wrote: the token, and
    /// nothing from a request with none, two, or a bad one.
    #[test]
    fn token_of_reads_what_insert_headers_wrote() {
        let lock: LockName = "orders".parse().unwrap();
        let mut h = hm(&[("x-keep", "1")]);
        assert_eq!(token_of(&h), None);
        insert_headers(&mut h, &lock, Token::new(42).unwrap());
        assert_eq!(token_of(&h), Some(Token::new(42).unwrap()));
        assert_eq!(parse_headers(&h).unwrap(), Fence { lock: LockRef(lock.as_str()), token: Token::new(42).unwrap() });
        insert_headers_with(&mut h, &lock_header_value(&lock), Token::new(43).unwrap());
        assert_eq!(parse_headers(&h).unwrap().token.get(), 43, "replaced, not appended");
        for bad in [vec![("Fencing-Token", "1"), ("Fencing-Token", "2")], vec![("Fencing-Token", "0")]] {
            assert_eq!(token_of(&hm(&bad)), None, "{bad:?}");
        }
    }

    #[test]
    fn json_tokens_are_bounded_too() {
        assert_eq!(serde_json::from_str::<Token>("7").unwrap().get(), 7);
        assert_eq!(serde_json::to_string(&Token::new(7).unwrap()).unwrap(), "7");
        for bad in ["0", "9223372036854775808", "18446744073709551615"] {
            assert!(serde_json::from_str::<Token>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn strip_removes_every_fencing_header() {
        let mut h = hm(&[("Fencing-Lock", "a"), ("fencing-token", "9"), ("Fencing-Other", "x"), ("x-keep", "1")]);
        strip_headers(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn read_methods() {
        let r = ReadMethods::default();
        for m in ["GET", "HEAD", "OPTIONS", "TRACE", "PROPFIND"] {
            assert!(!r.is_write(&Method::from_bytes(m.as_bytes()).unwrap()));
        }
        for m in ["PUT", "POST", "DELETE", "PATCH", "MKCOL", "COPY", "MOVE", "PROPPATCH", "LOCK"] {
            assert!(r.is_write(&Method::from_bytes(m.as_bytes()).unwrap()));
        }
    }
}
