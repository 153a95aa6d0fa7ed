//! What an S3 write changes, where the path alone does not say (`--store s3`).
//!
//! - A bucket-level request (`/bucket`, `PUT`/`DELETE` of the bucket) is the
//!   collection `/bucket/`: a rule `/bucket/` covers it, and rules inside the
//!   bucket held by other locks make it span locks.
//! - `DeleteObjects` (`POST /bucket?delete`) names its keys in an XML body:
//!   each key is a target `/bucket/key`.
//! - A POST-policy upload (`POST /bucket`, `multipart/form-data`) names its
//!   key in the form's `key` field (`${filename}` replaced by the file's name,
//!   as S3 does): parsed in `filter::form`, strictly.
//! - A virtual-hosted-style request (`Host: bucket.DOMAIN`, `--s3-domain
//!   DOMAIN`) has its bucket in the host: it is matched as `/bucket/...`.
//!
//! Keys are object names, not URL paths: a `%` in a key is literal, so it is
//! escaped before the key goes through the same canonical-path checks as a
//! request path (dot segments, `//`, `\`, control characters are refused).
//! This module only parses; `filter::mod` decides.

use http::HeaderMap;
use quick_xml::events::Event;
use quick_xml::Reader;

use super::query::query_names;

/// Most bytes of a body the filter reads to find a write's targets.
pub const MAX_BODY: usize = 1024 * 1024;
/// Most keys in one DeleteObjects (S3's own limit).
pub const MAX_KEYS: usize = 1000;

/// What kind of store the filter is in front of (`--store`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Store {
    /// A write changes its path (and `Destination`'s): WebDAV, REST, and S3
    /// path-style with one lock per bucket.
    #[default]
    Plain,
    /// S3: bucket-level requests, DeleteObjects keys, POST-policy keys,
    /// virtual-hosted buckets (see the module docs).
    S3,
}

/// The request's path as the store reads it: with `--s3-domain DOMAIN` and a
/// `Host` of `bucket.DOMAIN`, `/bucket` + the path. Still encoded.
///
/// With a domain, the `Host` must be one header of visible ASCII, and a name
/// under the domain must be written as stores compare it byte for byte: in
/// lower case, without a trailing dot. A store that did not fold `BKT.DOMAIN`
/// or `bkt.domain.` as this filter would read the request path-style, as
/// another bucket (`Err`: why, for a 400).
pub fn request_path(
    path: &str,
    headers: &HeaderMap,
    authority: Option<&str>,
    domain: Option<&str>,
) -> Result<String, String> {
    let Some(domain) = domain else { return Ok(path.to_owned()) };
    let mut hosts = headers.get_all(http::header::HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (None, _) => authority,
        (Some(h), None) => Some(h.to_str().map_err(|_| "the Host header is not visible ASCII".to_string())?),
        (Some(_), Some(_)) => return Err("the Host header is repeated".into()),
    };
    forwarded_host_agrees(headers, host)?;
    match host.map(|h| bucket_of_host(h, domain)).transpose()?.flatten() {
        Some(bucket) => Ok(format!("/{bucket}{path}")),
        None => Ok(path.to_owned()),
    }
}

/// A store behind proxies may take the bucket from `X-Forwarded-Host` or
/// `Forwarded: host=` rather than `Host`. Both hops send `X-Forwarded-Host`
/// equal to the `Host` they pass through; one that says otherwise, is
/// repeated or is a list, and any `Forwarded` naming a host, could have the
/// store read another bucket than the filter matched.
fn forwarded_host_agrees(headers: &HeaderMap, host: Option<&str>) -> Result<(), String> {
    let mut xfh = headers.get_all("x-forwarded-host").iter();
    match (xfh.next(), xfh.next()) {
        (None, _) => {}
        (Some(v), None) if host.is_some_and(|h| v.as_bytes() == h.as_bytes()) => {}
        _ => return Err("X-Forwarded-Host differs from Host (or is repeated): the store may read either".into()),
    }
    let names_host = |v: &http::HeaderValue| v.as_bytes().to_ascii_lowercase().windows(5).any(|w| w == b"host=");
    if headers.get_all("forwarded").iter().any(names_host) {
        return Err("a Forwarded header names a host: the store may read the bucket from it".into());
    }
    Ok(())
}

/// `bucket` from `bucket.DOMAIN[:port]`; `Err` for the same name in another
/// spelling (upper case, a trailing dot), and for a host that is not a plain
/// name or IP literal with at most a port: where stores cut the port differs
/// (SeaweedFS at the first `:`), so `bkt.DOMAIN:x` could be bucket `bkt` to
/// one and no bucket to another.
fn bucket_of_host<'h>(host: &'h str, domain: &str) -> Result<Option<&'h str>, String> {
    let malformed = || {
        format!(
            "the Host {host:?} is not a host name or IP literal with at most a port; refused with --s3-domain, since \
             the store may read another bucket from it"
        )
    };
    let name = host_name(host).ok_or_else(malformed)?;
    let domain = domain.trim_matches('.');
    let bucket = |name: &'h str| {
        let cut = name.len().checked_sub(domain.len() + 1)?;
        let (bucket, rest) = name.split_at_checked(cut)?;
        (rest.as_bytes()[0] == b'.' && rest[1..].eq_ignore_ascii_case(domain) && !bucket.is_empty()).then_some(bucket)
    };
    let loose = bucket(name.trim_end_matches('.'));
    if loose.is_some() && (name.ends_with('.') || name.bytes().any(|b| b.is_ascii_uppercase())) {
        return Err(format!(
            "the Host {host:?} names a bucket under --s3-domain {domain} in another spelling than lower case without a \
             trailing dot; refused, since the store may read it as another bucket"
        ));
    }
    Ok(loose)
}

/// The name in `host` (`name[:port]`, `[IPv6][:port]`; "" for an IP
/// literal), if it is that plain: a name of letters, digits, `-`, `.`, `_`,
/// a port of 1 to 5 digits.
fn host_name(host: &str) -> Option<&str> {
    let (name, port) = match host.strip_prefix('[') {
        Some(v6) => {
            let (addr, rest) = v6.split_once(']')?;
            let literal = !addr.is_empty() && addr.bytes().all(|b| b.is_ascii_hexdigit() || b":.".contains(&b));
            (literal.then_some("")?, if rest.is_empty() { None } else { Some(rest.strip_prefix(':')?) })
        }
        None => {
            let (name, port) = host.split_once(':').map_or((host, None), |(n, p)| (n, Some(p)));
            let plain = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
            (plain.then_some(name)?, port)
        }
    };
    let port_ok = port.is_none_or(|p| (1..=5).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()));
    port_ok.then_some(name)
}

/// `/bucket` (one segment) is the bucket itself: the collection `/bucket/`.
pub fn bucket_level(path: &str) -> Option<&str> {
    let rest = path.strip_prefix('/')?;
    (!rest.is_empty() && !rest.contains('/')).then_some(rest)
}

/// The bucket a `/bucket` or `/bucket/` path names, for requests on the
/// bucket itself.
pub fn bucket_of(path: &str) -> Option<&str> {
    bucket_level(path).or_else(|| bucket_level(path.strip_suffix('/')?))
}

/// The bucket a request is in, and a POST acts on: its path's first
/// segment. Stores take
/// DeleteObjects and POST-policy forms at any path in the bucket (SeaweedFS
/// deletes the body's keys for `POST /bucket/any/key?delete`), so the body
/// is read wherever the POST goes.
pub fn post_bucket(path: &str) -> Option<&str> {
    let rest = path.strip_prefix('/')?;
    let bucket = rest.split('/').next()?;
    (!bucket.is_empty()).then_some(bucket)
}

/// SeaweedFS keeps the parts of multipart uploads in progress as ordinary
/// keys under `.uploads/` at the bucket's root, open to any client: a write
/// there can replace or delete the part of an upload another lock's holder
/// is making, whatever lock covers `.uploads/`. So a target there is a
/// write to the whole bucket (`/bucket/`, refused when the bucket is split).
pub fn uploads_area(raw: &str) -> Option<String> {
    let mut segments = raw.strip_prefix('/')?.split('/');
    let (bucket, second) = (segments.next()?, segments.next()?);
    let second = percent_encoding::percent_decode_str(second).decode_utf8_lossy();
    (!bucket.is_empty() && second == ".uploads").then(|| whole_bucket(bucket))
}

/// The target of a write to the whole bucket: the collection `/bucket/`,
/// which every rule inside the bucket falls under (so a split bucket makes
/// it span locks).
pub fn whole_bucket(bucket: &str) -> String {
    format!("/{bucket}/")
}

/// The raw (encoded) path of object `key` in `bucket`: a key's `%` is a
/// literal character, so it is escaped; everything else is checked as the
/// store will see it once decoded.
pub fn key_path(bucket: &str, key: &str) -> String {
    format!("/{bucket}/{}", key.replace('%', "%25"))
}

/// `POST ?delete` (DeleteObjects): a query parameter named `delete` as any
/// store could read the name: percent- and `+`-decoded (Go's `ParseQuery`:
/// `?%64elete` is `delete` to SeaweedFS's router), split at `;` too (older
/// Go did), in any case, spaces around it ignored. Reading too many POSTs as
/// DeleteObjects only costs a refusal (their bodies are not `<Delete>`);
/// too few would let the store delete keys the filter never saw.
pub fn is_delete_objects(query: Option<&str>) -> bool {
    query_names(query).any(|n| n.trim().eq_ignore_ascii_case("delete"))
}

/// The object-level POSTs that name no other target: CreateMultipartUpload
/// (`?uploads`), CompleteMultipartUpload (`?uploadId`), `?restore`,
/// `?select` (names decoded as in [`is_delete_objects`]). Any other POST in
/// a bucket is one the filter cannot see into, checked as a write to the
/// whole bucket: a store may read what it changes from the body (SeaweedFS
/// routes every POST whose `Content-Type` holds `multipart/form-dat` to its
/// form upload, at any path in the bucket, and Go reads more boundary
/// spellings than the filter's strict parser).
pub fn is_object_post(query: Option<&str>, headers: &HeaderMap) -> bool {
    let multipart = headers
        .get_all(http::header::CONTENT_TYPE)
        .iter()
        .any(|v| v.as_bytes().to_ascii_lowercase().windows(10).any(|w| w == b"multipart/"));
    let known =
        |n: &str| ["uploads", "uploadid", "restore", "select"].contains(&n.trim().to_ascii_lowercase().as_str());
    !multipart && query_names(query).any(|n| known(&n))
}

/// `X-Amz-Rename-Source` (RenameObject, `PUT /bucket/key?renameObject`):
/// the object it names is moved, so it is written too. SeaweedFS reads the
/// value (percent-decoded, a leading `/` dropped) as a key in the request's
/// bucket and, when it starts with `bucket/`, also as the key after that,
/// and moves whichever exists: both readings are targets, of the value as
/// sent and decoded. (`bucket/key` in a bucket split between locks is thus
/// refused, `/bucket/bucket/...` being no lock's: send the bare key.) `Err`
/// when it is repeated or not text.
pub fn rename_sources(headers: &HeaderMap, bucket: Option<&str>) -> Result<Vec<String>, String> {
    let mut all = headers.get_all("x-amz-rename-source").iter();
    let v = match (all.next(), all.next()) {
        (None, _) => return Ok(Vec::new()),
        (Some(v), None) => v.to_str().map_err(|_| "X-Amz-Rename-Source is not visible ASCII".to_string())?,
        (Some(_), Some(_)) => return Err("X-Amz-Rename-Source is repeated".into()),
    };
    let decoded = percent_encoding::percent_decode_str(v)
        .decode_utf8()
        .map_err(|_| "X-Amz-Rename-Source does not decode to UTF-8".to_string())?;
    let mut out = Vec::new();
    for v in [v, &decoded] {
        let v = v.strip_prefix('/').unwrap_or(v);
        if v.is_empty() {
            return Err("X-Amz-Rename-Source names no object".into());
        }
        match bucket {
            Some(bucket) => {
                out.push(key_path(bucket, v));
                if v.strip_prefix(bucket).is_some_and(|rest| rest.starts_with('/')) {
                    out.push(format!("/{}", v.replace('%', "%25")));
                }
            }
            None => out.push(format!("/{}", v.replace('%', "%25"))),
        }
    }
    Ok(out)
}

/// Why a DeleteObjects body's keys cannot be read.
#[derive(Debug, PartialEq, Eq)]
pub enum KeysError {
    /// More than [`MAX_KEYS`] (S3 refuses them too): 413, like a long body.
    TooMany,
    /// Not well-formed, or not what S3 takes: 400.
    Malformed(String),
}

/// Whether the body is sent `aws-chunked` (SigV4 streaming: each chunk
/// framed by its length and signature, sometimes trailers after): a
/// `STREAMING-...` payload hash, `aws-chunked` in `Content-Encoding`, or an
/// `x-amz-decoded-content-length`. Stores that decode it (Garage, Ceph RGW)
/// read another body than the bytes the filter would parse.
pub fn is_aws_chunked(headers: &http::HeaderMap) -> bool {
    let has = |name: &str, f: &dyn Fn(&[u8]) -> bool| headers.get_all(name).iter().any(|v| f(v.as_bytes()));
    has("x-amz-content-sha256", &|v| v.len() >= 10 && v[..10].eq_ignore_ascii_case(b"STREAMING-"))
        || has("content-encoding", &|v| {
            v.split(|b| *b == b',').any(|c| c.trim_ascii().eq_ignore_ascii_case(b"aws-chunked"))
        })
        || headers.contains_key("x-amz-decoded-content-length")
}

/// Whether the store unpacks this upload into keys the archive names
/// (MinIO's `X-Amz-Meta-Snowball-Auto-Extract`, whatever its value: MinIO
/// reads it leniently, so its presence decides). Those keys are in the body,
/// not in the path: the filter takes the upload as a write to the whole
/// bucket.
pub fn unpacks_archive(headers: &http::HeaderMap) -> bool {
    headers.contains_key("x-amz-meta-snowball-auto-extract")
}

/// The keys of a DeleteObjects body (`<Delete><Object><Key>k</Key>...`).
pub fn delete_keys(xml: &[u8]) -> Result<Vec<String>, KeysError> {
    delete_keys_inner(xml).map_err(|e| if e.is_empty() { KeysError::TooMany } else { KeysError::Malformed(e) })
}

/// [`delete_keys`]; an empty error is "too many keys". Strict where Go's
/// `encoding/xml` (SeaweedFS, MinIO) reads otherwise: Go decodes the first
/// root element whatever its name and ignores what follows it, and skips
/// elements nested in `<Key>` keeping the text around them. So the body
/// must be one `<Delete>` root, and a `<Key>` text only. Comments and
/// processing instructions are refused, and text outside the root other
/// than whitespace: Garage's parser takes a `<Key>`'s first text node only
/// (`<Key>a<!---->b</Key>` is `a` there, `ab` here), and nothing an SDK
/// sends has them.
fn delete_keys_inner(xml: &[u8]) -> Result<Vec<String>, String> {
    let text = std::str::from_utf8(xml).map_err(|_| "the DeleteObjects body is not UTF-8".to_string())?;
    let mut reader = Reader::from_str(text);
    let mut stack: Vec<String> = Vec::new();
    let (mut keys, mut roots) = (Vec::new(), 0);
    let mut key: Option<String> = None;
    let bad = |e: quick_xml::Error| format!("the DeleteObjects body is not well-formed XML: {e}");
    loop {
        let event = reader.read_event().map_err(bad)?;
        if key.is_some() && matches!(event, Event::Start(_) | Event::Empty(_)) {
            return Err("an element inside a <Key>".into());
        }
        match event {
            Event::Start(e) => {
                let name = e.local_name().as_ref().to_owned();
                if stack.is_empty() {
                    roots += 1;
                    if roots > 1 || name != "Delete" {
                        return Err("the body's root is not one <Delete> element".into());
                    }
                }
                if name == "Key" && stack.len() == 2 && stack[1] == "Object" {
                    key = Some(String::new());
                }
                stack.push(name);
            }
            Event::End(_) => {
                stack.pop();
                if let Some(k) = key.take() {
                    keys.push(k);
                    if keys.len() > MAX_KEYS {
                        return Err(String::new());
                    }
                }
            }
            Event::Empty(e) if stack.is_empty() => {
                let name = e.local_name().as_ref().to_owned();
                return Err(format!("the body's root is an empty <{name}/>"));
            }
            Event::Empty(e) if e.local_name().as_ref() == "Key" && stack.len() == 2 => {
                return Err("an empty <Key/>".into());
            }
            Event::Text(t) if stack.is_empty() && !t.xml10_content().chars().all(|c| c.is_ascii_whitespace()) => {
                return Err("text outside the <Delete> element".into());
            }
            Event::CData(_) | Event::GeneralRef(_) if stack.is_empty() => {
                return Err("text outside the <Delete> element".into());
            }
            Event::Text(t) => {
                if let Some(k) = key.as_mut() {
                    k.push_str(&t.xml10_content());
                }
            }
            Event::CData(t) => {
                if let Some(k) = key.as_mut() {
                    k.push_str(&t.xml10_content());
                }
            }
            Event::GeneralRef(r) => {
                if let Some(k) = key.as_mut() {
                    let c = match r.resolve_char_ref().map_err(|e| format!("a bad character reference: {e}"))? {
                        Some(c) => c,
                        None => match &*r {
                            "lt" => '<',
                            "gt" => '>',
                            "amp" => '&',
                            "apos" => '\'',
                            "quot" => '"',
                            other => return Err(format!("an unknown entity &{other};")),
                        },
                    };
                    k.push(c);
                }
            }
            Event::DocType(_) => return Err("a DOCTYPE (entities are not expanded)".into()),
            Event::Comment(_) => return Err("a comment".into()),
            Event::PI(_) => return Err("a processing instruction".into()),
            Event::Eof => break,
            _ => {}
        }
    }
    if !stack.is_empty() {
        return Err("the DeleteObjects body ends inside an element".into());
    }
    if keys.is_empty() {
        return Err("the DeleteObjects body names no key".into());
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtual_hosts() {
        let h = |hosts: &[&str]| {
            let mut m = HeaderMap::new();
            for host in hosts {
                m.append("host", http::HeaderValue::from_bytes(host.as_bytes()).unwrap());
            }
            m
        };
        let d = Some("s3.example.com");
        let path = |p: &str, hosts: &[&str], dom| request_path(p, &h(hosts), None, dom);
        assert_eq!(path("/k", &["bkt.s3.example.com:8333"], d).unwrap(), "/bkt/k");
        assert_eq!(path("/bkt/k", &["s3.example.com"], d).unwrap(), "/bkt/k", "path-style");
        assert_eq!(path("/k", &["bkt.other.com"], d).unwrap(), "/k");
        assert_eq!(path("/k", &["bkt.s3.example.com"], None).unwrap(), "/k", "no --s3-domain");
        assert_eq!(request_path("/k", &h(&[]), Some("bkt.s3.example.com"), d).unwrap(), "/bkt/k", "authority");
        // Spellings a store may not fold as the filter would, a repeated or non-ASCII Host: refused.
        for hosts in [&["BKT.S3.example.com"][..], &["bkt.s3.example.com."], &["a.s3.example.com", "b.s3.example.com"]]
        {
            assert!(path("/k", hosts, d).is_err(), "{hosts:?}");
        }
        assert!(path("/k", &["bkt\u{e9}.s3.example.com"], d).is_err(), "not ASCII");
        assert_eq!(path("/k", &["OTHER.com"], d).unwrap(), "/k", "outside the domain, any spelling");
        for plain in ["127.0.0.1:8333", "[::1]:8333", "[::1]", "store_1:9000", "localhost"] {
            assert_eq!(path("/k", &[plain], d).unwrap(), "/k", "{plain}");
        }
        // Where a port would be cut differently (SeaweedFS cuts at the first `:`): refused.
        for odd in
            ["bkt.s3.example.com:x", "bkt.s3.example.com:", "a.s3.example.com:1:2", "x@bkt.s3.example.com", "[::1]x"]
        {
            assert!(path("/k", &[odd], d).is_err(), "{odd}");
        }
        // X-Forwarded-Host as both hops send it (equal to Host), and otherwise.
        let with = |name: &str, value: &str| {
            let mut m = h(&["bkt.s3.example.com"]);
            m.append(http::HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
            request_path("/k", &m, None, d)
        };
        assert_eq!(with("x-forwarded-host", "bkt.s3.example.com").unwrap(), "/bkt/k");
        assert_eq!(with("forwarded", "for=10.0.0.1;proto=http").unwrap(), "/bkt/k");
        assert!(with("x-forwarded-host", "other.s3.example.com").is_err());
        assert!(with("x-forwarded-host", "bkt.s3.example.com, other.s3.example.com").is_err());
        assert!(with("forwarded", "for=10.0.0.1;Host=other.s3.example.com").is_err());
    }

    #[test]
    fn buckets_and_keys() {
        assert_eq!(bucket_level("/bkt"), Some("bkt"));
        assert_eq!(bucket_level("/bkt/"), None);
        assert_eq!(bucket_of("/bkt/"), Some("bkt"));
        assert_eq!(bucket_of("/bkt/k"), None);
        assert_eq!(post_bucket("/bkt/a/k"), Some("bkt"));
        assert_eq!(post_bucket("/bkt"), Some("bkt"));
        assert_eq!(post_bucket("/"), None);
        assert_eq!(uploads_area("/b/.uploads/id/0001_x.part").as_deref(), Some("/b/"));
        assert_eq!(uploads_area("/b/%2Euploads/id").as_deref(), Some("/b/"), "decoded");
        assert_eq!(uploads_area("/b/.uploads").as_deref(), Some("/b/"));
        assert_eq!(uploads_area("/b/a/.uploads/x"), None, "only at the bucket's root");
        assert_eq!(uploads_area("/b/.uploadsx"), None);
        assert_eq!(key_path("b", "a/100%/x"), "/b/a/100%25/x");
        assert!(is_delete_objects(Some("delete")));
        assert!(is_delete_objects(Some("x=1&delete=")));
        assert!(!is_delete_objects(Some("deleted")));
        for spelled in ["%64elete", "x=1;delete", "DELETE=", "dele%74e=1", "+delete"] {
            assert!(is_delete_objects(Some(spelled)), "{spelled}");
        }
        assert!(!is_delete_objects(None));
    }

    #[test]
    fn object_posts_and_rename_sources() {
        let ct = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert("content-type", v.parse().unwrap());
            h
        };
        let none = HeaderMap::new();
        for q in ["uploads", "uploadId=abc", "%75ploads=", "restore", "select&select-type=2"] {
            assert!(is_object_post(Some(q), &none), "{q}");
        }
        assert!(!is_object_post(None, &none), "no query: a form to SeaweedFS, if the Content-Type says so");
        assert!(!is_object_post(Some("tagging"), &none));
        assert!(is_object_post(Some("uploadId=1"), &ct("application/xml")));
        assert!(!is_object_post(Some("uploadId=1"), &ct("Multipart/Form-Data; boundary = x")));
        assert!(!is_object_post(Some("uploads"), &ct("multipart/mixed; boundary=x")));

        let h = |values: &[&str]| {
            let mut m = HeaderMap::new();
            for v in values {
                m.append("x-amz-rename-source", v.parse().unwrap());
            }
            m
        };
        assert_eq!(rename_sources(&h(&[]), Some("b")).unwrap(), Vec::<String>::new());
        assert_eq!(
            rename_sources(&h(&["/b/x%2Fy"]), Some("b")).unwrap(),
            ["/b/b/x%252Fy", "/b/x%252Fy", "/b/b/x/y", "/b/x/y"],
            "as sent and decoded, as a key in the bucket and as bucket/key"
        );
        assert_eq!(rename_sources(&h(&["a/k"]), Some("b")).unwrap(), ["/b/a/k", "/b/a/k"], "no other bucket");
        assert_eq!(rename_sources(&h(&["bx/k"]), Some("b")).unwrap(), ["/b/bx/k", "/b/bx/k"]);
        assert!(rename_sources(&h(&["/b/x", "/b/y"]), Some("b")).is_err(), "repeated");
        assert!(rename_sources(&h(&["/"]), Some("b")).is_err(), "no object");
        assert!(rename_sources(&h(&["/b/%ff"]), Some("b")).is_err(), "not UTF-8 once decoded");
    }

    #[test]
    fn delete_objects_keys() {
        let xml = br#"<?xml version="1.0"?><Delete xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Quiet>true</Quiet>
            <Object><Key>a/1&amp;2</Key><VersionId>v</VersionId></Object><Object><Key><![CDATA[b/<x>]]></Key></Object>
            <Object><Key>c/&#233;</Key></Object></Delete>"#;
        assert_eq!(delete_keys(xml).unwrap(), ["a/1&2", "b/<x>", "c/é"]);
        for bad in [
            &b"<Delete><Object><Key>a</Key></Object>"[..],
            b"<Delete></Delete>",
            b"<Delete><Object><Key>a&foo;</Key></Object></Delete>",
            b"<!DOCTYPE x [<!ENTITY e \"b/\">]><Delete><Object><Key>&e;</Key></Object></Delete>",
            b"not xml <",
            // Go reads the first root, whatever its name, and skips elements inside <Key>.
            b"<Foo><Object><Key>b/1</Key></Object></Foo><Delete><Object><Key>a/x</Key></Object></Delete>",
            b"<Delete><Object><Key>a/x</Key></Object></Delete><Delete><Object><Key>b/1</Key></Object></Delete>",
            b"<Delete><Object><Key>a/x</Key></Object></Delete><x/>",
            b"<Delete><Object><Key>b/v2<x></x></Key></Object></Delete>",
            b"<Delete><Object><Key><Key>a/x</Key>b/v3</Key></Object></Delete>",
            b"<Delete><Object><Key>b/v<x/></Key></Object></Delete>",
            // Garage reads a <Key>'s first text node only: `tmp` there.
            b"<Delete><Object><Key>tmp<!---->/f</Key></Object></Delete>",
            b"<Delete><!-- x --><Object><Key>a/x</Key></Object></Delete>",
            b"<Delete><Object><Key>a/x</Key></Object><?pi x?></Delete>",
            // aws-chunked framing read raw: the chunk header's text outside the root, and a comment that spans
            // two chunks hiding a key the store (decoding the chunks) reads.
            b"1f;chunk-signature=ab\r\n<Delete><Object><Key>a/x</Key></Object></Delete>\r\n0;chunk-signature=cd\r\n",
            b"<Delete><Object><!--xx--\r\n2a;chunk-signature=ab\r\n><Key>b/secret</Key><!--y--></Object>\
              <Object><Key>a/ok</Key></Object></Delete>",
            b"<Delete><Object><Key>a/x</Key></Object></Delete>&amp;",
        ] {
            assert!(delete_keys(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let many = format!("<Delete>{}</Delete>", "<Object><Key>k</Key></Object>".repeat(MAX_KEYS + 1));
        assert_eq!(delete_keys(many.as_bytes()), Err(KeysError::TooMany));
        // Whitespace around the root, as SDKs and hand-written bodies have it, is fine.
        assert_eq!(delete_keys(b"\n<Delete><Object><Key>a</Key></Object></Delete>\r\n").unwrap(), ["a"]);
    }

    #[test]
    fn aws_chunked_bodies_are_seen() {
        let h = |pairs: &[(&str, &str)]| {
            let mut m = http::HeaderMap::new();
            for (k, v) in pairs {
                m.append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
            }
            is_aws_chunked(&m)
        };
        assert!(h(&[("x-amz-content-sha256", "STREAMING-AWS4-HMAC-SHA256-PAYLOAD")]));
        assert!(h(&[("x-amz-content-sha256", "streaming-unsigned-payload-trailer")]));
        assert!(h(&[("content-encoding", "gzip, AWS-Chunked")]));
        assert!(h(&[("content-encoding", "gzip"), ("content-encoding", "aws-chunked")]));
        assert!(h(&[("x-amz-decoded-content-length", "66")]));
        assert!(!h(&[("x-amz-content-sha256", "UNSIGNED-PAYLOAD"), ("content-encoding", "gzip")]));
        assert!(!h(&[("x-amz-content-sha256", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")]));
    }
}
