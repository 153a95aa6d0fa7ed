//! The key of an S3 POST-policy upload (`multipart/form-data`), read the
//! way the store will read it, or not at all.
//!
//! The filter and the store parse the same bytes with two parsers. Where
//! they could disagree, the filter would admit a write under one key's lock
//! while the store writes another key: the one thing the filter exists to
//! prevent. So this parser reads the whole form (the filter buffers it, up
//! to `s3::MAX_BODY`), accepts only the plain form that browsers and SDKs
//! send, and calls anything else [`FormKey::Unreadable`] (the filter then
//! treats the upload as a write to the whole bucket, refused when the
//! bucket is split between locks). What it refuses, and which parser does
//! otherwise (Go's `mime/multipart`, the S3 stores written in Go):
//!
//! - a delimiter not followed at once by CRLF or `--` (Go skips transport
//!   padding, and takes `--BQ` as data when the boundary is `B`), a preamble,
//!   an epilogue other than one CRLF, the delimiter's text inside a part;
//! - a part header other than `Content-Disposition` and `Content-Type`
//!   (Go decodes `Content-Transfer-Encoding: quoted-printable` values),
//!   folded or bare-LF header lines, a disposition other than `form-data`
//!   (Go names no field then);
//! - parameters that are not plain `name=token` or `name="text"`: a
//!   backslash in a quoted value (Go keeps some escapes and not others), a
//!   `name*` (RFC 2231, which Go decodes), a name twice; in a part's
//!   `Content-Disposition`, a parameter other than `name` and `filename`,
//!   or a quoted value with `;` or `=` in it (multer, Garage's parser, finds
//!   `name=` inside quotes);
//! - two `key` fields in any case (SeaweedFS folds field names' case, and
//!   reads fields after the file, where AWS S3 stops), a `key` part with a
//!   file name (a file to Go, a field to a parser that ignores file names),
//!   a file part other than one `file` in lower case, a key with leading or
//!   trailing whitespace;
//! - `${filename}` in the key with no file name, an empty one, or one with
//!   `/` or `\` (SeaweedFS keeps `${filename}` when there is no name; Go
//!   keeps only a path's last element).

use http::HeaderMap;

/// What a POST-policy form says about its key.
#[derive(Debug, PartialEq, Eq)]
pub enum FormKey {
    /// The object key (with `${filename}` already replaced).
    Found(String),
    /// The form has no usable key (S3 refuses it), or cannot be read
    /// without guessing.
    Unreadable,
}

/// A POST-policy upload: exactly one `Content-Type`, `multipart/form-data`,
/// with a boundary of RFC 2046's characters. `None` for anything else.
pub fn form_boundary(headers: &HeaderMap) -> Option<String> {
    let mut all = headers.get_all(http::header::CONTENT_TYPE).iter();
    let (Some(ct), None) = (all.next(), all.next()) else { return None };
    let (mime, params) = media_type(ct.to_str().ok()?)?;
    if !mime.eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    let boundary = params.into_iter().find_map(|(k, v)| (k == "boundary").then_some(v))?;
    let bchar = |b: u8| b.is_ascii_alphanumeric() || b"'()+_,-./:=? ".contains(&b);
    let ok = (1..=70).contains(&boundary.len()) && boundary.bytes().all(bchar) && !boundary.ends_with(' ');
    ok.then_some(boundary)
}

/// The key of a whole form (`body`: all of it, to the closing delimiter).
/// Every part is read: stores differ on fields after the file (AWS S3
/// ignores them, SeaweedFS reads them), so the filter reads them too and
/// refuses the forms where the two readings differ.
pub fn form_key(body: &[u8], boundary: &str) -> FormKey {
    scan(body, boundary).map_or(FormKey::Unreadable, FormKey::Found)
}

fn scan(body: &[u8], boundary: &str) -> Option<String> {
    let delim = format!("--{boundary}");
    let delim = delim.as_bytes();
    let end_delim = [&b"\r\n"[..], delim].concat();
    let mut pos = body.starts_with(delim).then_some(delim.len())?;
    let (mut key, mut file) = (None::<String>, None::<Option<String>>);
    loop {
        // After a delimiter: CRLF opens a part; `--` closes the form, and
        // only a CRLF may follow (no epilogue another parser could read on).
        match body.get(pos..pos + 2)? {
            b"\r\n" => pos += 2,
            b"--" if matches!(&body[pos + 2..], b"" | b"\r\n") => break,
            _ => return None,
        }
        let head_end = find(body, b"\r\n\r\n", pos)?;
        let head = &body[pos..head_end];
        find(head, delim, 0).is_none().then_some(())?;
        let part = std::str::from_utf8(head).ok().and_then(part_head)?;
        let value_start = head_end + 4;
        let value_end = find(body, &end_delim, value_start)?;
        let value = &body[value_start..value_end];
        if find(value, delim, 0).is_some() {
            return None;
        }
        pos = value_end + end_delim.len();
        // SeaweedFS folds field names' case (`KEY` is `Key`); a file part
        // (one with a file name) is not a field to it, to AWS S3 it is.
        let name = part.name.to_ascii_lowercase();
        match (name.as_str(), part.filename) {
            ("key", None) if key.is_none() => {
                let k = std::str::from_utf8(value).ok()?;
                (!k.is_empty() && k.trim() == k).then_some(())?;
                key = Some(k.to_owned());
            }
            ("file", filename) if part.name == "file" && file.is_none() => file = Some(filename),
            ("key" | "file", _) | (_, Some(_)) => return None,
            _ => {}
        }
    }
    let (key, filename) = (key?, file?);
    if !key.contains("${filename}") {
        return Some(key);
    }
    // Substituted only with a plain name: stores keep `${filename}` as it is
    // when there is none (SeaweedFS), or keep only a path's last element.
    let f = filename.filter(|f| !f.is_empty() && !f.contains(['/', '\\']))?;
    Some(key.replace("${filename}", &f))
}

/// A part's headers, as far as the key is concerned.
struct PartHead {
    name: String,
    filename: Option<String>,
}

/// `Content-Disposition: form-data; name="..."[; filename="..."]`, with at
/// most a `Content-Type` beside it; `None` for anything else.
fn part_head(head: &str) -> Option<PartHead> {
    let mut disposition = None;
    let mut content_type = false;
    for line in head.split("\r\n") {
        let (name, value) = line.split_once(':')?;
        if name.is_empty() || !name.bytes().all(is_tchar) || line.contains(['\r', '\n']) {
            return None;
        }
        if name.eq_ignore_ascii_case("content-disposition") && disposition.is_none() {
            disposition = Some(value);
        } else if name.eq_ignore_ascii_case("content-type") && !content_type {
            content_type = true;
        } else {
            return None;
        }
    }
    let (kind, params) = media_type(disposition?)?;
    if !kind.eq_ignore_ascii_case("form-data") {
        return None;
    }
    let (mut name, mut filename) = (None, None);
    for (k, v) in params {
        // A quoted `;` or `=` is another parameter to a parser that splits
        // on `;` or looks for `name=` without reading quotes (multer, which
        // Garage uses): `foo="; name=key;"` names the field `key` there.
        if v.contains([';', '=']) {
            return None;
        }
        match k.as_str() {
            "name" => name = Some(v),
            "filename" => filename = Some(v),
            // Browsers and SDKs send no other: nothing to read differently.
            _ => return None,
        }
    }
    Some(PartHead { name: name?, filename })
}

/// `type[; name=value]...` in RFC 9110's grammar, without the parts that
/// parsers read differently (see the module docs). Parameter names are
/// lower-cased; a name given twice is refused.
fn media_type(s: &str) -> Option<(&str, Vec<(String, String)>)> {
    let (kind, mut rest) = s.split_once(';').unwrap_or((s, ""));
    let kind = kind.trim_matches([' ', '\t']);
    if kind.is_empty() || !kind.bytes().all(|b| is_tchar(b) || b == b'/') {
        return None;
    }
    let mut params: Vec<(String, String)> = Vec::new();
    while !rest.trim_matches([' ', '\t']).is_empty() {
        let (name, after) = rest.split_once('=')?;
        let name = name.trim_start_matches([' ', '\t']).to_ascii_lowercase();
        if name.is_empty() || !name.bytes().all(is_tchar) || name.contains('*') {
            return None;
        }
        let (value, after) = if let Some(quoted) = after.strip_prefix('"') {
            let (v, a) = quoted.split_once('"')?;
            if v.contains(['\\', '\r', '\n']) {
                return None;
            }
            (v, a)
        } else {
            let end = after.find([';', ' ', '\t']).unwrap_or(after.len());
            let v = &after[..end];
            if v.is_empty() || !v.bytes().all(is_tchar) {
                return None;
            }
            (v, &after[end..])
        };
        let after = after.trim_start_matches([' ', '\t']);
        rest = match after.strip_prefix(';') {
            Some(r) => r,
            None if after.is_empty() => "",
            None => return None,
        };
        if params.iter().any(|(k, _)| *k == name) {
            return None;
        }
        params.push((name, value.to_owned()));
    }
    Some((kind, params))
}

/// RFC 9110's `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    hay.get(from..)?.windows(needle.len()).position(|w| w == needle).map(|i| i + from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(disposition: &str, value: &str) -> String {
        format!("--XyZ\r\nContent-Disposition: {disposition}\r\n\r\n{value}\r\n")
    }

    fn form(key_part: &str) -> String {
        let file = "--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"Up.txt\"\r\n\
            Content-Type: text/plain\r\n\r\nDATA\r\n--XyZ--\r\n";
        format!("{}{key_part}{file}", part("form-data; name=\"Policy\"", "p"))
    }

    #[test]
    fn the_plain_form_is_read() {
        let f = form(&part("form-data; name=\"key\"", "b/${filename}"));
        assert_eq!(form_key(f.as_bytes(), "XyZ"), FormKey::Found("b/Up.txt".into()));
        assert_eq!(form_key(&f.as_bytes()[..60], "XyZ"), FormKey::Unreadable, "cut short");
        assert_eq!(form_key(f.trim_end().as_bytes(), "XyZ"), FormKey::Found("b/Up.txt".into()), "no final CRLF");
        let token = form(&part("form-data; name=key", "b/k"));
        assert_eq!(form_key(token.as_bytes(), "XyZ"), FormKey::Found("b/k".into()));
        let no_filename = form(&part("form-data; name=\"key\"", "b/x")).replace("; filename=\"Up.txt\"", "");
        assert_eq!(form_key(no_filename.as_bytes(), "XyZ"), FormKey::Found("b/x".into()));
        let upper = form(&part("form-data; name=\"Key\"", "b/k"));
        assert_eq!(form_key(upper.as_bytes(), "XyZ"), FormKey::Found("b/k".into()), "field names fold");
        // Fields after the file are read too (SeaweedFS reads them): the key may come last.
        let after = format!("{}{}--XyZ--\r\n", part("form-data; name=\"file\"; filename=\"f\"", "DATA"), {
            part("form-data; name=\"key\"", "b/last")
        });
        assert_eq!(form_key(after.as_bytes(), "XyZ"), FormKey::Found("b/last".into()));
    }

    /// Each of these reads as another key, or none, in some store's parser.
    #[test]
    fn what_another_parser_could_read_otherwise_is_unreadable() {
        let key = part("form-data; name=\"key\"", "b/k");
        let file = "--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f\"\r\n\r\nD\r\n";
        let cases = [
            // `--XyZQ` is data to Go, a delimiter to a parser that stops at the boundary's text.
            form(&format!("{}{key}", part("form-data; name=\"x-ignore-a\"", "v\r\n--XyZQ\r\nX"))),
            form(&key).replacen("--XyZ\r\n", "--XyZ \r\n", 2),
            format!("preamble\r\n{}", form(&key)),
            format!("{}epilogue --XyZ\r\n", form(&key)),
            form(&key).replace("\r\nContent-Type: text/plain", "\r\nContent-Transfer-Encoding: quoted-printable"),
            form(&part("form-data;\r\n name=\"key\"", "b/k")),
            form(&part("attachment; name=\"key\"", "b/k")),
            form(&part("form-data; name=\"key\\\"\"", "b/k")),
            form(&part("form-data; name*=UTF-8''key", "b/k")),
            form(&part("form-data; name=\"key\"; name=\"x\"", "b/k")),
            form(&part("form-data; filename=\"q;name=zz\"; name=\"KEY\"; x", "b/k")),
            // Quoted `;` and `name=`: the first part is `key` to multer (Garage), `x-ignore-1` here; the second the
            // other way round.
            form(&format!(
                "{}{}",
                part("form-data; foo=\"; name=key;\"; name=\"x-ignore-1\"", "b/secret"),
                part("form-data; foo=\"; name=x-ignore-2;\"; name=\"key\"", "a/ok")
            )),
            form(&part("form-data; filename=\"q;name=zz\"; name=\"key\"", "b/k")),
            form(&part("form-data; name=\"key\"; foo=\"bar\"", "b/k")),
            form(&format!("{key}{}", part("form-data; name=\"KEY\"", "b/k2"))),
            form(&part("form-data; name=\"key\"", " b/k")),
            form(&part("form-data; name=\"key\"", "")),
            form(&part("form-data; name=\"key\"", "b/--XyZ")),
            form(&part("form-data; name=\"key\"", "b/${filename}")).replace("Up.txt", "../a/Up.txt"),
            form(&key).replace("name=\"file\"", "name=\"File\""),
            form(&key).replace("Content-Type: text/plain", "Content-Type: a\r\nContent-Type: b"),
            form(&key).replace("Content-Disposition: form-data; name=\"Policy\"", "Content-Disposition: form-data\n"),
            form(""),
            // A key with a file name: a file to Go, and SeaweedFS then takes the key after the file.
            format!("{}{file}{}--XyZ--\r\n", part("form-data; name=\"key\"; filename=\"k\"", "b/a"), key),
            // A second key after the file (AWS S3 reads the first, SeaweedFS both), a second file, another file field.
            form(&key).replace("--XyZ--", &format!("{}--XyZ--", part("form-data; name=\"key\"", "b/z"))),
            form(&key).replace("--XyZ--", &format!("{file}--XyZ--")),
            form(&format!("{key}{}", part("form-data; name=\"other\"; filename=\"o\"", "O"))),
            // `${filename}` with no file name, or an empty one: SeaweedFS keeps `${filename}`.
            form(&part("form-data; name=\"key\"", "b${filename}/x")).replace("; filename=\"Up.txt\"", ""),
            form(&part("form-data; name=\"key\"", "b${filename}/x")).replace("Up.txt", ""),
            // The file's data holds the delimiter's text; the form ends before its close.
            form(&key).replace("DATA", "DA--XyZTA"),
            form(&key).replace("--XyZ--\r\n", ""),
        ];
        for (i, f) in cases.iter().enumerate() {
            assert_eq!(form_key(f.as_bytes(), "XyZ"), FormKey::Unreadable, "case {i}: {f:?}");
        }
        // The control: the same forms without the twist are read.
        assert_eq!(form_key(form(&key).as_bytes(), "XyZ"), FormKey::Found("b/k".into()));
    }

    #[test]
    fn boundaries() {
        let ct = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert("content-type", v.parse().unwrap());
            form_boundary(&h)
        };
        assert_eq!(ct("multipart/form-data; boundary=\"XyZ\"").as_deref(), Some("XyZ"));
        assert_eq!(ct("Multipart/Form-Data;boundary=a-1").as_deref(), Some("a-1"));
        assert_eq!(ct("multipart/form-data; charset=utf-8; boundary=\"a b\"").as_deref(), Some("a b"));
        for bad in [
            "multipart/mixed; boundary=a",
            "multipart/form-data; boundary=\"a;b\"x",
            "multipart/form-data; boundary=\"a\\b\"",
            "multipart/form-data; boundary=a; boundary=b",
            "multipart/form-data; boundary*=a",
            "multipart/form-data; boundary=\"\"",
            "multipart/form-data; boundary=\"a<b\"",
            "multipart/form-data",
        ] {
            assert_eq!(ct(bad), None, "{bad}");
        }
        let mut two = HeaderMap::new();
        two.append("content-type", "multipart/form-data; boundary=a".parse().unwrap());
        two.append("content-type", "multipart/form-data; boundary=b".parse().unwrap());
        assert_eq!(form_boundary(&two), None, "two Content-Types");
    }
}
