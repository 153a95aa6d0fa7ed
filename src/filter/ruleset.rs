//! The `--protect` rules' index: the longest rule over a path, and the
//! rules under a collection. What the rules mean is [`super::rules`]'s.

use std::hash::BuildHasher;

use compact_str::CompactString;
use hashbrown::HashTable;

use super::admission::NamedLock;
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
/// one hit's cache misses.
#[derive(Clone, Debug)]
pub struct RuleSet {
    /// Sorted by prefix, so that the rules under a collection are a run of
    /// it; a prefix given once.
    rules: Vec<Rule>,
    /// Indices into `rules`, hashed by prefix: 5 bytes a slot, so that with
    /// many rules more of the index stays in cache. (`IndexMap` is the same
    /// two parts, with 9-byte slots and its entries 8-aligned: see [`Rule`].)
    /// Hashed with foldhash: the keys are the operator's prefixes, which a
    /// write's path cannot add to, so how long a lookup probes depends on
    /// those and the per-process seed, not on the paths writes send.
    index: HashTable<u32>,
    hasher: foldhash::fast::RandomState,
    /// Every length some prefix has, longest first.
    lens: Vec<usize>,
}

/// One rule, in one cache line: the rule's own fields that a write reads
/// (the prefix it compares, its lock's name and entry pointers) are one miss
/// with many rules out of cache, not two. Unaligned, 3 in 4 rules lay across
/// two lines. A prefix of up to 24 bytes is kept inline (`CompactString`),
/// not behind a pointer to one more line; the name's bytes, which the write
/// compares with its `Fencing-Lock`, are behind one.
#[derive(Clone, Debug)]
#[repr(C, align(64))]
struct Rule {
    prefix: CompactString,
    lock: NamedLock,
}

impl FromIterator<(String, LockName)> for RuleSet {
    /// A prefix given twice keeps its last lock, as a map would.
    fn from_iter<I: IntoIterator<Item = (String, LockName)>>(given: I) -> RuleSet {
        // `new`, not `From<String>`: a prefix too long to fit inline gets an
        // allocation of its own length, not the `String`'s spare capacity.
        // Each `String` is dropped as it is read: with many rules, what is
        // freed while building stays in the process's memory.
        let mut sorted: Vec<(CompactString, LockName)> =
            given.into_iter().map(|(p, l)| (CompactString::new(&p), l)).collect();
        // Stable: of a prefix given twice, the last comes last, and wins.
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let mut rules: Vec<Rule> = Vec::with_capacity(sorted.len());
        for (prefix, lock) in sorted {
            match rules.last_mut() {
                Some(last) if last.prefix == prefix => last.lock = NamedLock::new(lock),
                _ => rules.push(Rule { prefix, lock: NamedLock::new(lock) }),
            }
        }
        let hasher = foldhash::fast::RandomState::default();
        let mut index = HashTable::with_capacity(rules.len());
        for (i, rule) in rules.iter().enumerate() {
            let i = u32::try_from(i).expect("fewer than 2^32 rules");
            index.insert_unique(hasher.hash_one(rule.prefix.as_str()), i, |&j| {
                hasher.hash_one(rules[j as usize].prefix.as_str())
            });
        }
        let mut lens: Vec<usize> = rules.iter().map(|r| r.prefix.len()).collect();
        lens.sort_unstable_by(|a, b| b.cmp(a));
        lens.dedup();
        RuleSet { rules, index, hasher, lens }
    }
}

impl RuleSet {
    /// The lock of the longest prefix of `path`.
    pub fn lock_for(&self, path: &str) -> Option<&NamedLock> {
        self.lens.iter().filter(|&&n| n <= path.len() && path.is_char_boundary(n)).find_map(|&n| self.get(&path[..n]))
    }

    /// The lock of the rule whose prefix is exactly `prefix`.
    fn get(&self, prefix: &str) -> Option<&NamedLock> {
        let rule = |i: u32| &self.rules[i as usize];
        let i = self.index.find(self.hasher.hash_one(prefix), |&i| rule(i).prefix == prefix)?;
        Some(&rule(*i).lock)
    }

    /// Rules whose prefix is longer than `path` and starts with it.
    pub fn below<'a>(&'a self, path: &'a str) -> impl Iterator<Item = (&'a str, &'a LockName)> + 'a {
        // No prefix is longer than the longest: skip the binary search.
        let longest = self.lens.first().copied().unwrap_or(0);
        let start =
            if path.len() < longest { self.rules.partition_point(|r| *r.prefix <= *path) } else { self.rules.len() };
        self.rules[start..]
            .iter()
            .map(|r| (r.prefix.as_str(), r.lock.name()))
            .take_while(move |(p, _)| p.starts_with(path))
    }

    /// Whether some rule names `lock`. A scan: asked once per proactive
    /// fence, not per write, and a set of the locks would cost memory per rule.
    pub fn protects(&self, lock: &LockName) -> bool {
        self.rules.iter().any(|r| r.lock.name() == lock)
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
            let set: RuleSet = order.into_iter().collect();
            check(&rules, set.clone());
            check(&rules, set);
        }
    }

    /// Many rules, as one lock per tenant: the index finds each of them.
    #[test]
    fn many_rules_answer_as_a_sorted_map() {
        let rules: BTreeMap<String, LockName> =
            (0..10_000).map(|i| (format!("/t/{i}/"), format!("l{}", i % 977).parse().unwrap())).collect();
        let set: RuleSet = rules.clone().into_iter().collect();
        for i in (0..10_500).step_by(7) {
            for path in [format!("/t/{i}/obj"), format!("/t/{i}"), format!("/t/{i}/")] {
                assert_eq!(set.lock_for(&path).map(NamedLock::name), naive_lock_for(&rules, &path), "{path}");
            }
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
            assert_eq!(set.lock_for(path).map(NamedLock::name), naive_lock_for(rules, path), "lock for {path}");
            let below: Vec<&str> = set.below(path).map(|(p, _)| p).collect();
            let naive: Vec<&str> =
                rules.keys().filter(|p| p.len() > path.len() && p.starts_with(path)).map(String::as_str).collect();
            assert_eq!(below, naive, "rules below {path}");
        }
        assert!(set.protects(&"t12".parse().unwrap()));
        assert!(!set.protects(&"t2".parse().unwrap()));
    }

    #[test]
    fn a_rule_is_one_cache_line() {
        assert_eq!((std::mem::size_of::<Rule>(), std::mem::align_of::<Rule>()), (64, 64));
    }

    #[test]
    fn a_prefix_given_twice_keeps_its_last_lock() {
        let set: RuleSet =
            [("/a/", "x"), ("/a/", "y")].iter().map(|(p, l)| (p.to_string(), l.parse().unwrap())).collect();
        assert_eq!(set.lock_for("/a/f").unwrap().name().as_str(), "y");
    }
}
