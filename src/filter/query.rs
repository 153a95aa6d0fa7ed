//! What a request's query names, read as the stores decode it: the names of
//! S3 sub-resources (`?delete`, `?uploads`: see [`super::s3`]) and paths a
//! store's HTTP API moves or copies from (SeaweedFS's filer:
//! [`moved_sources`]).

use std::borrow::Cow;

/// The names in a query as any store could read them: percent- and
/// `+`-decoded (Go's `ParseQuery`), split at `;` too (older Go did).
pub(super) fn query_names(query: Option<&str>) -> impl Iterator<Item = Cow<'_, str>> {
    query_pairs(query).map(|(name, _)| name)
}

fn query_pairs(query: Option<&str>) -> impl Iterator<Item = (Cow<'_, str>, Cow<'_, str>)> {
    query.into_iter().flat_map(|q| q.split(';')).flat_map(|p| form_urlencoded::parse(p.as_bytes()))
}

/// The paths a write moves or copies from, named in its query: SeaweedFS's
/// filer takes `POST /dst?mv.from=/src` (a move: `/src` is deleted) and
/// `?cp.from=/src`, so the source is written too. Each is returned as a raw
/// path that decodes to the value the store uses (the query's decoding is
/// the only one it applies: a `%` left in the value is literal). Names are
/// matched in any case and with spaces around them ignored, more broadly
/// than the filer does: a name read too broadly costs a check, one missed a
/// write no lock saw. `Err` for a value that is not an absolute path.
pub fn moved_sources(query: Option<&str>) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for (name, value) in query_pairs(query) {
        let name = name.trim();
        if !(name.eq_ignore_ascii_case("mv.from") || name.eq_ignore_ascii_case("cp.from")) {
            continue;
        }
        if !value.starts_with('/') {
            return Err(format!("the query's {name} must name an absolute path (it names what is moved or copied)"));
        }
        out.push(value.replace('%', "%25"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moved_and_copied_sources_are_read_as_the_filer_reads_them() {
        assert_eq!(moved_sources(None).unwrap(), Vec::<String>::new());
        assert_eq!(moved_sources(Some("a=1&b")).unwrap(), Vec::<String>::new());
        assert_eq!(moved_sources(Some("mv.from=/a/secret")).unwrap(), ["/a/secret"]);
        assert_eq!(moved_sources(Some("x=1&cp.from=%2Fa%2Fb+c")).unwrap(), ["/a/b c"]);
        assert_eq!(moved_sources(Some("%6Dv.from=/a&MV.FROM=/b;cp.from=/c")).unwrap(), ["/a", "/b", "/c"]);
        // A `%` the query's decoding leaves is literal to the store: kept literal here.
        assert_eq!(moved_sources(Some("mv.from=/a/%2541")).unwrap(), ["/a/%2541"]);
        assert!(moved_sources(Some("mv.from=a/secret")).is_err());
        assert!(moved_sources(Some("cp.from=")).is_err());
    }
}
