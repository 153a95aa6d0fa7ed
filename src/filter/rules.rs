//! Which lock protects which paths, and what paths a write really touches.
//!
//! The store decodes `%XX` escapes (nginx decodes every one, then resolves
//! dot segments and merges slashes), so rules are matched on the *decoded*
//! path, and a path whose decoding the store could read differently from the
//! filter (an encoded `/`, `\`, dot or empty segments, NUL, control
//! characters, invalid UTF-8, `;` path parameters that servlet stores strip)
//! is refused instead of guessed at. The request is still forwarded exactly as
//! received.
//!
//! A write's *targets* are its request path and, when it has one, the path in
//! its `Destination` header (WebDAV COPY and MOVE write there). Every target
//! must be covered by the lock the write names, and no target may be a
//! collection that holds another lock's paths (`DELETE /a/` would delete
//! `/a/b/` too).

use http::{HeaderMap, Uri};
use smallvec::SmallVec;

use super::admission::NamedLock;
use super::error::FilterError;
pub use super::ruleset::RuleSet;
use crate::token::{LockName, LockRef};

/// Which lock protects which paths.
#[derive(Clone, Debug)]
pub enum Protection {
    /// `--lock NAME`: one lock for every path.
    All(NamedLock),
    /// `--protect PREFIX=LOCK ...`: the longest matching prefix wins.
    Rules(RuleSet),
}

impl Protection {
    /// `--lock NAME`.
    pub fn all(lock: LockName) -> Protection {
        Protection::All(NamedLock::new(lock))
    }

    /// `--protect` rules, `(prefix, lock)`; a repeated prefix keeps its last lock.
    pub fn rules(rules: impl IntoIterator<Item = (String, LockName)>) -> Protection {
        Protection::Rules(rules.into_iter().collect())
    }

    /// The lock for a (decoded) path.
    pub fn lock_for(&self, path: &str) -> Option<&NamedLock> {
        match self {
            Protection::All(l) => Some(l),
            Protection::Rules(rules) => rules.lock_for(path),
        }
    }

    pub fn protects(&self, lock: &LockName) -> bool {
        match self {
            Protection::All(l) => l.name() == lock,
            Protection::Rules(rules) => rules.protects(lock),
        }
    }

    /// Parses `--protect` rules (`PREFIX=LOCK` each). A prefix given twice
    /// with two locks is refused: which one the operator meant is a guess,
    /// and a wrong guess fences the path with a lock its writers do not hold
    /// (or with one a zombie does).
    pub fn parse_rules<'a>(rules: impl IntoIterator<Item = &'a str>) -> Result<Protection, String> {
        let mut seen: std::collections::HashMap<String, LockName> = std::collections::HashMap::new();
        for r in rules {
            let (prefix, lock) = Protection::parse_rule(r)?;
            match seen.get(&prefix) {
                Some(l) if *l != lock => {
                    return Err(format!("--protect prefix {prefix:?} is given twice, for locks {l} and {lock}"))
                }
                _ => seen.insert(prefix, lock),
            };
        }
        Ok(Protection::rules(seen))
    }

    /// Parses `PREFIX=LOCK`.
    ///
    /// The prefix must be a path as the filter compares paths: decoded, with
    /// no dot or empty segments and no `;` (parameters are refused in
    /// protected space, or cut with `--allow-path-params`). Any other prefix
    /// matches no path the filter admits, so its rule would protect nothing,
    /// silently: its writes refused as unprotected, or let through unfenced
    /// with `--allow-unprotected`.
    pub fn parse_rule(s: &str) -> Result<(String, LockName), String> {
        let (prefix, lock) =
            s.rsplit_once('=').ok_or_else(|| format!("--protect wants PATH_PREFIX=LOCK, got {s:?}"))?;
        if !prefix.starts_with('/') {
            return Err(format!("--protect prefix {prefix:?} must start with '/'"));
        }
        match canonical_path(prefix, false) {
            _ if prefix.contains(';') => {
                return Err(format!("--protect prefix {prefix:?} holds ';', which no admitted path can have there"))
            }
            Ok(decoded) if decoded != prefix => {
                return Err(format!(
                    "--protect prefix {prefix:?} is compared with decoded paths: write it decoded, as {decoded:?}"
                ))
            }
            Ok(_) => {}
            Err(why) => return Err(format!("--protect prefix {prefix:?} matches no path the filter admits: {why}")),
        }
        Ok((prefix.to_owned(), lock.parse().map_err(|e| format!("--protect {s:?}: {e}"))?))
    }

    /// Locks other than `own` whose rules cover paths inside the collection
    /// `path` (a write to `path` may reach them: DELETE, MOVE and COPY of a
    /// collection act on everything under it). Sorted, no duplicates.
    pub fn other_locks_under(&self, path: &str, own: Option<&LockName>) -> Vec<LockName> {
        let Protection::Rules(rules) = self else { return Vec::new() };
        let mut found: Vec<LockName> = rules
            .below(path)
            // `/a` holds `/a/...`, not `/ab`; `/a/` holds everything after it.
            .filter(|(prefix, _)| path.ends_with('/') || prefix[path.len()..].starts_with('/'))
            .filter(|(_, lock)| Some(*lock) != own)
            .map(|(_, lock)| lock.clone())
            .collect();
        found.sort();
        found.dedup();
        found
    }
}

/// What a write's path looks like once the store has decoded it, or why it
/// is refused.
///
/// With `cut_params`, `;` parameters are cut from every segment before the
/// checks, as servlet stores read paths (`/x/..;/a/f` is then refused as a
/// dot segment); without, `;` is an ordinary character, as nginx reads it.
pub fn canonical_path(raw: &str, cut_params: bool) -> Result<String, String> {
    let bytes = decode(raw)?;
    let path = String::from_utf8(bytes).map_err(|_| "it decodes to invalid UTF-8".to_string())?;
    if !path.starts_with('/') {
        return Err("it does not start with '/'".into());
    }
    if let Some(c) = path.chars().find(|c| c.is_control() || *c == '\\') {
        return Err(format!("it holds {c:?} once decoded"));
    }
    fn cut(s: &str, cut_params: bool) -> &str {
        if cut_params {
            s.split(';').next().unwrap_or("")
        } else {
            s
        }
    }
    let mut segs = path[1..].split('/').map(|s| cut(s, cut_params)).peekable();
    while let Some(s) = segs.next() {
        if s == "." || s == ".." {
            return Err("it has '.' or '..' segments once decoded".into());
        }
        if s.is_empty() && segs.peek().is_some() {
            return Err("it has empty segments ('//') once decoded".into());
        }
    }
    // Nothing cut: the decoded path is the answer, without building it again.
    if !cut_params || !path.contains(';') {
        return Ok(path);
    }
    Ok(format!("/{}", path[1..].split('/').map(|s| cut(s, true)).collect::<Vec<_>>().join("/")))
}

/// Percent-decodes `raw`; an escaped `/` (`%2F`) is refused, since the store
/// would see a separator where the filter saw none, and a `%` not followed
/// by two hex digits is refused as the store would refuse it.
fn decode(raw: &str) -> Result<Vec<u8>, String> {
    let b = raw.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'%' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        let hex = |c: u8| (c as char).to_digit(16);
        let v = match (b.get(i + 1).and_then(|c| hex(*c)), b.get(i + 2).and_then(|c| hex(*c))) {
            (Some(h), Some(l)) => (h * 16 + l) as u8,
            _ => return Err("it has a '%' that is not followed by two hex digits".into()),
        };
        if v == b'/' {
            return Err("it has an encoded '/' (%2F)".into());
        }
        out.push(v);
        i += 3;
    }
    Ok(out)
}

/// The path in a `Destination` header (an absolute URL or an absolute path),
/// still encoded, or `None` when there is no such header.
pub fn destination(headers: &HeaderMap) -> Result<Option<String>, FilterError> {
    // Built at compile time: a `&str` name is parsed again on every lookup.
    const DESTINATION: http::HeaderName = http::HeaderName::from_static("destination");
    let mut all = headers.get_all(DESTINATION).iter();
    let Some(v) = all.next() else { return Ok(None) };
    let bad = |why: &str| FilterError::DestinationMalformed(why.to_string());
    if all.next().is_some() {
        return Err(bad("the Destination header is repeated"));
    }
    let s = v.to_str().map_err(|_| bad("the Destination header is not visible ASCII"))?;
    // A fragment is dropped by the URL parser here and kept in the path by
    // nginx: the two would name different files.
    if s.contains('#') {
        return Err(bad("the Destination header has a '#', which stores read differently"));
    }
    let uri: Uri = s.parse().map_err(|_| bad("the Destination header is not a URL or an absolute path"))?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http" | "https"), Some(_)) | (None, None) => {}
        _ => return Err(bad("the Destination header must be an http(s) URL or an absolute path")),
    }
    let path = uri.path();
    if !path.starts_with('/') || (uri.scheme().is_none() && !s.starts_with('/')) {
        return Err(bad("the Destination header's path must start with '/'"));
    }
    Ok(Some(path.to_owned()))
}

/// The decoded path rules are matched on. A path with `;` parameters is read
/// both ways (as nginx does, and with the parameters cut, as servlet stores
/// do): with `--allow-path-params` the cut reading is used; without, the
/// path is refused if either reading is protected or reaches a protected
/// collection, and passes as it is in unprotected space.
fn decoded(protection: &Protection, raw: &str, allow_params: bool) -> Result<String, String> {
    let literal = canonical_path(raw, false)?;
    if !literal.contains(';') {
        return Ok(literal);
    }
    let cut = canonical_path(raw, true)?;
    if allow_params {
        return Ok(cut);
    }
    let protected = |p: &str| protection.lock_for(p).is_some() || !protection.other_locks_under(p, None).is_empty();
    if protected(&literal) || protected(&cut) {
        return Err(
            "it has ';' path parameters in protected space, which some stores cut (see --allow-path-params)".into()
        );
    }
    Ok(literal)
}

/// The checks of one write's targets against the rules.
#[derive(Debug)]
pub struct Targets<'p> {
    /// (decoded path, its lock), request path first. Inline for the one or
    /// two (a `Destination`) that nearly every write has: no allocation.
    /// The locks are the rules' own, borrowed: no reference count written
    /// per write, and each keeps its entry ([`NamedLock`]).
    pub paths: SmallVec<[(String, Option<&'p NamedLock>); 2]>,
}

impl<'p> Targets<'p> {
    /// Decodes and checks every raw target path. With `--lock` (one lock for
    /// every path) no path can dodge a rule, so paths are taken as they are.
    pub fn resolve(protection: &'p Protection, raw: &[&str], allow_params: bool) -> Result<Targets<'p>, FilterError> {
        let mut paths = SmallVec::with_capacity(raw.len());
        for r in raw {
            let path = match protection {
                Protection::All(_) => (*r).to_owned(),
                Protection::Rules(_) => decoded(protection, r, allow_params)
                    .map_err(|why| FilterError::NotCanonical(format!("{r} ({why})")))?,
            };
            let lock = protection.lock_for(&path);
            let others = protection.other_locks_under(&path, lock.map(NamedLock::name));
            if !others.is_empty() {
                return Err(FilterError::SpansLocks { path, own: lock.map(|l| l.name().clone()), others });
            }
            paths.push((path, lock));
        }
        Ok(Targets { paths })
    }

    /// The lock the write must name: `None` when no target is protected.
    pub fn lock(&self) -> Option<&'p NamedLock> {
        self.paths.iter().find_map(|(_, l)| *l)
    }

    /// The first target no rule covers.
    pub fn unprotected(&self) -> Option<&str> {
        self.paths.iter().find(|(_, l)| l.is_none()).map(|(p, _)| p.as_str())
    }

    /// Every target must be covered by `named` (the write's `Fencing-Lock`).
    pub fn check_lock(&self, named: LockRef<'_>) -> Result<(), FilterError> {
        let covered = |l: &Option<&NamedLock>| l.is_some_and(|l| *l.name() == named);
        if self.paths.iter().all(|(_, l)| covered(l)) {
            return Ok(());
        }
        let name = |l: &Option<&NamedLock>| l.map(|l| l.name().clone());
        let expected = self.paths.iter().find(|(_, l)| !covered(l)).and_then(|(_, l)| name(l));
        let paths = self.paths.iter().map(|(p, l)| (p.clone(), name(l))).collect();
        Err(FilterError::LockMismatch { expected, got: named.to_owned(), paths })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(rs: &[&str]) -> Protection {
        Protection::Rules(rs.iter().map(|r| Protection::parse_rule(r).unwrap()).collect())
    }

    #[test]
    fn longest_prefix_wins() {
        let p = rules(&["/a/=x", "/a/b/=y", "/c=z"]);
        assert_eq!(p.lock_for("/a/file").unwrap().name().as_str(), "x");
        assert_eq!(p.lock_for("/a/b/file").unwrap().name().as_str(), "y");
        assert_eq!(p.lock_for("/cat").unwrap().name().as_str(), "z");
        assert!(p.lock_for("/d").is_none());
        assert!(p.protects(&"y".parse().unwrap()));
        assert!(Protection::parse_rule("a=x").is_err());
        assert!(Protection::parse_rule("/a=b c").is_err());
    }

    /// A prefix no admitted path can start with would protect nothing: with
    /// `--allow-unprotected`, `/a b/f` went through unfenced under a rule
    /// `/a%20b/=x` (a control for the check below).
    #[test]
    fn a_prefix_no_admitted_path_can_match_is_refused() {
        let unchecked = Protection::rules([("/a%20b/".to_string(), "x".parse().unwrap())]);
        let t = Targets::resolve(&unchecked, &["/a%20b/f"], false).unwrap();
        assert_eq!(t.unprotected(), Some("/a b/f"), "the rule as written protects nothing");

        for ok in ["/=x", "/a=x", "/a/=x", "/a.b/c..d/=x", "/été/=x", "/a b/=x"] {
            assert!(Protection::parse_rule(ok).is_ok(), "{ok}");
        }
        for bad in [
            "/a%20b/=x",
            "/a%2Fb/=x",
            "/100%/=x",
            "/a//b/=x",
            "//=x",
            "/a/../b/=x",
            "/./a/=x",
            "/a/./=x",
            "/a;v=1/=x",
            "/a;p/=x",
            "/a\\b/=x",
            "/a\u{7}/=x",
        ] {
            let e = Protection::parse_rule(bad).unwrap_err();
            assert!(e.contains("--protect prefix"), "{bad}: {e}");
        }
        let e = Protection::parse_rule("/a%20b/=x").unwrap_err();
        assert!(e.contains("\"/a b/\""), "{e}");
    }

    #[test]
    fn a_prefix_given_twice_with_two_locks_is_refused() {
        let e = Protection::parse_rules(["/a/=x", "/b/=y", "/a/=z"]).unwrap_err();
        assert!(e.contains("\"/a/\"") && e.contains("x") && e.contains("z"), "{e}");
        let p = Protection::parse_rules(["/a/=x", "/a/=x", "/b/=y"]).unwrap();
        assert_eq!(p.lock_for("/a/f").unwrap().name().as_str(), "x");
        assert_eq!(p.lock_for("/b/f").unwrap().name().as_str(), "y");
    }

    #[test]
    fn canonical_paths() {
        for (raw, want) in [
            ("/", "/"),
            ("/a", "/a"),
            ("/a/b/", "/a/b/"),
            ("/a.b/c..d/.e", "/a.b/c..d/.e"),
            ("/%61/doc", "/a/doc"),
            ("/%c3%a9t%C3%A9", "/été"),
            ("/été", "/été"),
        ] {
            assert_eq!(canonical_path(raw, false).as_deref(), Ok(want), "{raw}");
        }
        for bad in [
            "",
            "a",
            "//a",
            "/a//b",
            "/./a",
            "/a/../b",
            "/a/..",
            "/%2e%2e/a",
            "/a%2Fb",
            "/a\\b",
            "/a%5cb",
            "/a%00b",
            "/a%0ab",
            "/a%7f",
            "/%ff",
            "/%c3",
            "/a%",
            "/a%2",
            "/a%zz",
            "/%2e/a",
            "/a/%2E%2e/",
        ] {
            assert!(canonical_path(bad, false).is_err(), "{bad}");
        }
        assert_eq!(canonical_path("/a;p/doc;v=1", true).as_deref(), Ok("/a/doc"));
        assert_eq!(canonical_path("/a;p/doc", false).as_deref(), Ok("/a;p/doc"));
        assert!(canonical_path("/x/..;/a/f", true).is_err(), "a servlet store reads it as /a/f");
    }

    #[test]
    fn path_params_only_outside_protected_space() {
        let p = rules(&["/a/=A", "/b/c/=C"]);
        let path = |raw: &str, allow: bool| Targets::resolve(&p, &[raw], allow).map(|t| t.paths[0].0.clone());
        for bad in ["/x/..;/a/f", "/a;p/doc", "/a%3bp/doc", "/a/doc;v=1", "/b;x", "/x/..;/b/c/f"] {
            assert!(matches!(path(bad, false), Err(FilterError::NotCanonical(_))), "{bad}");
        }
        assert_eq!(path("/tmp/a;b", false).unwrap(), "/tmp/a;b", "unprotected either way");
        assert_eq!(path("/a;p/doc", true).unwrap(), "/a/doc");
        assert!(path("/x/..;/a/f", true).is_err());
    }

    #[test]
    fn collections_holding_other_locks_paths() {
        let p = rules(&["/a/=A", "/a/b/=B", "/c=C", "/ab/=D"]);
        let names = |v: Vec<LockName>| v.iter().map(|l| l.to_string()).collect::<Vec<_>>();
        let a = p.lock_for("/a/").map(|l| l.name().clone());
        assert_eq!(names(p.other_locks_under("/a/", a.as_ref())), ["B"]);
        assert_eq!(names(p.other_locks_under("/a", None)), ["A", "B"], "/a is the collection /a/");
        assert_eq!(names(p.other_locks_under("/", None)), ["A", "B", "C", "D"]);
        assert!(p.other_locks_under("/a/b/", Some(&"B".parse().unwrap())).is_empty());
        assert!(p.other_locks_under("/a/doc", a.as_ref()).is_empty());
        assert!(p.other_locks_under("/a/b", a.as_ref()).len() == 1, "/a/b holds /a/b/");
        assert!(p.other_locks_under("/a/bc", a.as_ref()).is_empty());
    }

    #[test]
    fn destinations() {
        let h = |v: &[&str]| {
            let mut m = HeaderMap::new();
            for x in v {
                m.append("destination", x.parse().unwrap());
            }
            m
        };
        assert_eq!(destination(&h(&[])).unwrap(), None);
        assert_eq!(destination(&h(&["/a/doc"])).unwrap().as_deref(), Some("/a/doc"));
        assert_eq!(destination(&h(&["http://store:80/a/%64oc?x=1"])).unwrap().as_deref(), Some("/a/%64oc"));
        // `#`: dropped by the URL parser, kept in the path by nginx (`/p/x#/y`).
        for bad in
            [&["a/doc"][..], &["ftp://h/a"], &["http:/a"], &["/a", "/b"], &["*"], &["/p/x#/y"], &["http://h/p#q"]]
        {
            assert!(matches!(destination(&h(bad)), Err(FilterError::DestinationMalformed(_))), "{bad:?}");
        }
    }

    #[test]
    fn every_target_needs_the_named_lock() {
        let p = rules(&["/a/=A", "/c/=C"]);
        let t = Targets::resolve(&p, &["/c/src", "/a/doc"], false).unwrap();
        assert_eq!(t.lock().unwrap().name().as_str(), "C");
        assert!(matches!(t.check_lock(LockRef::parse("C").unwrap()), Err(FilterError::LockMismatch { .. })));
        let t = Targets::resolve(&p, &["/tmp/upload-1", "/%61/doc"], false).unwrap();
        assert_eq!(
            t.lock().unwrap().name().as_str(),
            "A",
            "an unprotected source does not hide a protected destination"
        );
        assert_eq!(t.unprotected(), Some("/tmp/upload-1"));
        assert!(Targets::resolve(&p, &["/a/x", "/a/y"], false)
            .unwrap()
            .check_lock(LockRef::parse("A").unwrap())
            .is_ok());
    }
}
