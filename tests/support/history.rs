//! The history checker for the append workload.
//!
//! The workload: each worker that believes it holds the lock appends a
//! record `worker token seq` to one log file in the store by
//! read-modify-write (GET the log, PUT it back with one more line), and
//! journals every attempt with the answer it got.
//!
//! What must hold of the final log and the journals (the checker's
//! definitions):
//!
//! 1. **Tokens never decrease** along the log. This also says: no record from
//!    a holder whose token is lower than one already in the log.
//! 2. **No acknowledged write is lost.** A write is acknowledged when its PUT
//!    got a 2xx answer. In this workload a later write replaces the whole file
//!    with what it read plus one line, so an acknowledged record disappears
//!    only if a later writer read the log before that record was applied and
//!    wrote after it: a lost update, never legitimate. With the filter and
//!    `--fence-required`, every later holder fenced the filter (draining every
//!    older write) before it could read, so it must have seen the record.
//!    The one legitimate replacement is a record's own writer overwriting it:
//!    impossible here, since a worker's next write starts from a fresh read.
//!    So the rule is strict: every acknowledged record is in the final log.
//! 3. **Records are unique**: the same `(worker, token, seq)` never appears twice.
//!
//! A record whose worker noticed its sidecar's token changed around the write
//! (`token_changed`) carries a token the worker could not be sure of; rule 1
//! skips it.

use std::collections::{HashMap, HashSet};

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Record {
    pub worker: String,
    pub token: u64,
    pub seq: u64,
}

#[derive(Clone, Debug)]
pub struct Attempt {
    pub worker: String,
    pub at_ms: u128,
    pub seq: u64,
    pub token: u64,
    pub status: u16,
    pub token_changed: bool,
}

impl Attempt {
    pub fn acked(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

pub fn parse_log(s: &str) -> Vec<Record> {
    s.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 3, "bad log line {l:?}");
            Record { worker: f[0].into(), token: f[1].parse().unwrap(), seq: f[2].parse().unwrap() }
        })
        .collect()
}

pub fn parse_journal(worker: &str, s: &str) -> Vec<Attempt> {
    s.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Attempt {
                worker: worker.into(),
                at_ms: f[0].parse().unwrap(),
                seq: f[1].parse().unwrap(),
                token: f[2].parse().unwrap(),
                status: f[3].parse().unwrap(),
                token_changed: f[4] == "1",
            }
        })
        .collect()
}

/// Returns every violation found (empty: the history is safe).
pub fn check(log: &[Record], attempts: &[Attempt]) -> Vec<String> {
    let mut v = Vec::new();
    let uncertain: HashSet<(String, u64)> =
        attempts.iter().filter(|a| a.token_changed).map(|a| (a.worker.clone(), a.seq)).collect();
    let mut highest = 0u64;
    let mut seen = HashSet::new();
    for (i, r) in log.iter().enumerate() {
        if !seen.insert(r.clone()) {
            v.push(format!("record {i} {r:?} appears twice"));
        }
        if uncertain.contains(&(r.worker.clone(), r.seq)) {
            continue;
        }
        if r.token < highest {
            v.push(format!(
                "record {i} {r:?} has token {} after token {highest} (a stale holder's write landed)",
                r.token
            ));
        }
        highest = highest.max(r.token);
    }
    let in_log: HashSet<&Record> = log.iter().collect();
    for a in attempts.iter().filter(|a| a.acked()) {
        let r = Record { worker: a.worker.clone(), token: a.token, seq: a.seq };
        if !in_log.contains(&r) && !a.token_changed {
            v.push(format!(
                "acknowledged write {r:?} (status {}) is missing from the final log (lost update)",
                a.status
            ));
        }
    }
    v
}

/// Per-worker summary for printing.
pub fn summary(log: &[Record], attempts: &[Attempt]) -> String {
    let mut by: HashMap<&str, (usize, usize, usize)> = HashMap::new();
    for a in attempts {
        let e = by.entry(&a.worker).or_default();
        e.0 += 1;
        if a.acked() {
            e.1 += 1;
        }
    }
    for r in log {
        by.entry(&r.worker).or_default().2 += 1;
    }
    let mut names: Vec<_> = by.keys().copied().collect();
    names.sort();
    names
        .iter()
        .map(|n| {
            let (att, ack, rec) = by[n];
            format!("{n}: {att} attempts, {ack} acknowledged, {rec} records in log")
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(w: &str, t: u64, s: u64) -> Record {
        Record { worker: w.into(), token: t, seq: s }
    }
    fn att(w: &str, t: u64, s: u64, status: u16) -> Attempt {
        Attempt { worker: w.into(), at_ms: 0, seq: s, token: t, status, token_changed: false }
    }

    #[test]
    fn a_clean_history_passes() {
        let log = vec![rec("a", 5, 1), rec("a", 5, 2), rec("b", 9, 1)];
        let atts = vec![att("a", 5, 1, 201), att("a", 5, 2, 204), att("a", 5, 3, 409), att("b", 9, 1, 204)];
        assert!(check(&log, &atts).is_empty());
    }

    #[test]
    fn each_violation_is_caught() {
        let log = vec![rec("b", 9, 1), rec("a", 5, 3)];
        let atts = vec![att("b", 9, 1, 204), att("b", 9, 2, 204), att("a", 5, 3, 204)];
        let v = check(&log, &atts);
        assert!(v.iter().any(|m| m.contains("after token 9")), "{v:?}");
        assert!(v.iter().any(|m| m.contains("missing")), "{v:?}");
        let v = check(&[rec("a", 1, 1), rec("a", 1, 1)], &[]);
        assert!(v.iter().any(|m| m.contains("twice")), "{v:?}");
    }
}
