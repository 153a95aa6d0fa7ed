//! The etcd key layout of shared marks, and how a token is stored.
//!
//! ```text
//! <prefix>/marks/<lock>             the lock's highest token
//! <prefix>/replicas/<id>            one key per live replica, on its lease
//! <prefix>/acks/<lock>/<id>         the highest token replica <id> has
//!                                   applied for <lock>, on its lease
//! ```
//!
//! Tokens are stored as 20-digit zero-padded decimals, so etcd's byte-wise
//! value comparison (`Compare::value(.., Less, ..)`) orders them numerically
//! and a raise can be one compare-and-swap transaction.

use crate::token::LockName;

/// The keys under one prefix.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys { prefix: prefix.trim_end_matches('/').to_owned() }
    }

    pub fn marks(&self) -> String {
        format!("{}/marks/", self.prefix)
    }

    pub fn mark(&self, lock: &LockName) -> String {
        format!("{}{lock}", self.marks())
    }

    pub fn replicas(&self) -> String {
        format!("{}/replicas/", self.prefix)
    }

    pub fn replica(&self, id: &str) -> String {
        format!("{}{id}", self.replicas())
    }

    pub fn acks(&self, lock: &LockName) -> String {
        format!("{}/acks/{lock}/", self.prefix)
    }

    pub fn ack(&self, lock: &LockName, id: &str) -> String {
        format!("{}{id}", self.acks(lock))
    }

    /// The prefix of every lock's acknowledgements.
    pub fn all_acks(&self) -> String {
        format!("{}/acks/", self.prefix)
    }

    /// The lock and replica an acknowledgement key names.
    pub fn ack_of<'a>(&self, key: &'a [u8]) -> Option<(LockName, &'a str)> {
        let rest = std::str::from_utf8(key).ok()?.strip_prefix(&self.all_acks())?;
        let (lock, id) = rest.split_once('/')?;
        valid_replica_id(id).then_some((lock.parse().ok()?, id))
    }

    /// The lock a mark key names.
    pub fn lock_of(&self, key: &[u8]) -> Option<LockName> {
        std::str::from_utf8(key).ok()?.strip_prefix(&self.marks())?.parse().ok()
    }
}

/// The last path segment of `key` below `prefix` (a replica id).
pub fn name_below<'a>(prefix: &str, key: &'a [u8]) -> Option<&'a str> {
    std::str::from_utf8(key).ok()?.strip_prefix(prefix).filter(|n| !n.is_empty() && !n.contains('/'))
}

/// A token as stored: 20 digits, so byte order is numeric order.
pub fn encode(t: u64) -> String {
    format!("{t:020}")
}

/// A stored token; `None` for anything [`encode`] would not have written.
pub fn decode(v: &[u8]) -> Option<u64> {
    if v.len() != 20 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// A replica id is used as one key segment: the lock name's alphabet.
pub fn valid_replica_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_orders_numerically() {
        assert!(encode(9) < encode(10));
        assert!(encode(99_999) < encode(100_000));
        assert!(encode(u64::MAX - 1) < encode(u64::MAX));
        assert_eq!(decode(encode(u64::MAX).as_bytes()), Some(u64::MAX));
        assert_eq!(decode(b"12"), None, "not written by encode");
    }

    #[test]
    fn layout() {
        let k = Keys::new("/fg/");
        let l: LockName = "orders".parse().unwrap();
        assert_eq!(k.mark(&l), "/fg/marks/orders");
        assert_eq!(k.lock_of(k.mark(&l).as_bytes()), Some(l.clone()));
        assert_eq!(k.ack(&l, "r1"), "/fg/acks/orders/r1");
        assert_eq!(name_below(&k.acks(&l), b"/fg/acks/orders/r1"), Some("r1"));
        assert_eq!(k.ack_of(k.ack(&l, "r1").as_bytes()), Some((l.clone(), "r1")));
        assert_eq!(k.ack_of(b"/fg/acks/orders/r1/x"), None);
        assert_eq!(name_below(&k.replicas(), k.replica("r-2").as_bytes()), Some("r-2"));
        assert!(!valid_replica_id("a/b"));
    }
}
