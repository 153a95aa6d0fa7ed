//! The `--protect` rules' index: the longest rule over a path, and the
//! rules under a collection. What the rules mean is [`super::rules`]'s.

use compact_str::CompactString;
use indexmap::IndexMap;

use crate::token::LockName;

/// `--protect` rules, indexed for the two questions every write asks: which
/// rule is its path's longest prefix, and which rules lie under a collection.
///
/// A sorted map alone answers both, but the first with one lookup per
/// length of the path, each a descent of the tree: with 100,000 rules (a
/// lock per tenant) that was 1.8 µs per write, most of it cache misses on
/// cold nodes. Hashed lookups at only the lengths some rule has, and no range
/// query when the path is as long as the longest rule (nothing can lie
/// under it): 0.6-0.9 µs (`examples/admission_bench.rs`), most of it the
/// one hit's cache misses, for about 10 bytes more per rule.
#[derive(Clone, Debug)]
pub struct RuleSet {
    /// One entry per prefix, in the prefixes' order, so that the rules under
    /// a collection are a run of it; hashed by prefix too. One map for both
    /// (an index per entry beside a sorted vector) keeps the memory per rule
    /// where the tree's was. A prefix of up to 24 bytes is kept in its entry
    /// (`CompactString`), not behind a pointer: with many rules the entry
    /// is out of cache, and comparing the prefix cost one more miss, after
    /// the entry's own (and 24 bytes more per rule, with the allocation's).
    /// Hashed with foldhash: the keys are the operator's prefixes, which a
    /// write's path cannot add to, so how long a lookup probes depends on
    /// those and the per-process seed, not on the paths writes send.
    rules: IndexMap<CompactString, LockName, foldhash::fast::RandomState>,
    /// Every length some prefix has, longest first.
    lens: Vec<usize>,
}

impl FromIterator<(String, LockName)> for RuleSet {
    /// A prefix given twice keeps its last lock, as a map would.
    fn from_iter<I: IntoIterator<Item = (String, LockName)>>(rules: I) -> RuleSet {
        // `new`, not `From<String>`: a prefix too long to fit inline gets an
        // allocation of its own length, not the `String`'s spare capacity.
        let mut sorted: Vec<(CompactString, LockName)> =
            rules.into_iter().map(|(p, l)| (CompactString::new(&p), l)).collect();
        // Stable: of a prefix given twice, the last comes last, and wins
        // when the map takes both in order.
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let rules: IndexMap<CompactString, LockName, _> = sorted.into_iter().collect();
        let mut lens: Vec<usize> = rules.keys().map(|p| p.len()).collect();
        lens.sort_unstable_by(|a, b| b.cmp(a));
        lens.dedup();
        RuleSet { rules, lens }
    }
}

impl RuleSet {
    /// The lock of the longest prefix of `path`.
    pub fn lock_for(&self, path: &str) -> Option<&LockName> {
        self.lens
            .iter()
            .filter(|&&n| n <= path.len() && path.is_char_boundary(n))
            .find_map(|&n| self.rules.get(&path[..n]))
    }

    /// Rules whose prefix is longer than `path` and starts with it.
    pub fn below<'a>(&'a self, path: &'a str) -> impl Iterator<Item = (&'a str, &'a LockName)> + 'a {
        // No prefix is longer than the longest: skip the binary search.
        let longest = self.lens.first().copied().unwrap_or(0);
        let start =
            if path.len() < longest { self.rules.partition_point(|p, _| **p <= *path) } else { self.rules.len() };
        self.rules.as_slice()[start..].iter().map(|(p, l)| (&**p, l)).take_while(move |(p, _)| p.starts_with(path))
    }

    /// Whether some rule names `lock`. A scan: asked once per proactive
    /// fence, not per write, and a set of the locks would cost memory per rule.
    pub fn protects(&self, lock: &LockName) -> bool {
        self.rules.values().any(|l| l == lock)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// The answers of a plain sorted map, looked up at every length (the
    /// index before this one), for comparison.
    fn naive_lock_for<'a>(rules: &'a BTreeMap<String, LockName>, path: &str) -> Option<&'a LockName> {
        (0..=path.len()).rev().filter(|&n| path.is_char_boundary(n)).find_map(|n| rules.get(&path[..n]))
    }

    #[test]
    fn answers_as_a_sorted_map_looked_up_at_every_length() {
        let rules: BTreeMap<String, LockName> = [
            ("/a/", "x"),
            ("/a/b/", "y"),
            ("/a/bc", "w"),
            ("/c", "z"),
            ("/é/", "e"),
            ("/a/b/c/d/", "x"),
            ("/t/1/", "t1"),
            ("/t/12/", "t12"),
        ]
        .iter()
        .map(|(p, l)| (p.to_string(), l.parse().unwrap()))
        .collect();
        // Given in several orders, with a prefix repeated (its last lock
        // wins, as in a map): the index is sorted whatever the input order.
        let given: Vec<(String, LockName)> = rules.clone().into_iter().collect();
        let mut orders = vec![given.clone(), given.iter().rev().cloned().collect()];
        let mut rotated = given.clone();
        rotated.rotate_left(3);
        rotated.insert(1, ("/a/b/".to_string(), "dropped".parse().unwrap()));
        orders.push(rotated);
        for order in orders {
            check(&rules, order.into_iter().collect());
        }
    }

    fn check(rules: &BTreeMap<String, LockName>, set: RuleSet) {
        let paths = [
            "/",
            "/a",
            "/a/",
            "/a/b",
            "/a/b/",
            "/a/bc",
            "/a/bcd",
            "/a/b/c/d/e",
            "/a/b/c/d/",
            "/a/b/c/d",
            "/c",
            "/cat",
            "/d",
            "/é",
            "/é/x",
            "/éé",
            "/t/1",
            "/t/1/",
            "/t/12/x",
            "/t/123/x",
            "/t/",
            "/t",
            // As long as the longest rule, and one shorter: the search for
            // rules below is skipped at the first, not at the second.
            "/a/b/c/dx",
            "/a/b/c/",
        ];
        for path in paths {
            assert_eq!(set.lock_for(path), naive_lock_for(rules, path), "lock for {path}");
            let below: Vec<&str> = set.below(path).map(|(p, _)| p).collect();
            let naive: Vec<&str> =
                rules.keys().filter(|p| p.len() > path.len() && p.starts_with(path)).map(String::as_str).collect();
            assert_eq!(below, naive, "rules below {path}");
        }
        assert!(set.protects(&"t12".parse().unwrap()));
        assert!(!set.protects(&"t2".parse().unwrap()));
    }

    #[test]
    fn a_prefix_given_twice_keeps_its_last_lock() {
        let set: RuleSet =
            [("/a/", "x"), ("/a/", "y")].iter().map(|(p, l)| (p.to_string(), l.parse().unwrap())).collect();
        assert_eq!(set.lock_for("/a/f").unwrap().as_str(), "y");
    }
}
