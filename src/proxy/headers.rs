//! Header rewriting for a forwarded request: hop-by-hop headers,
//! `X-Forwarded-For`, and `Host` / `X-Forwarded-Host`.

use std::net::{IpAddr, SocketAddr};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// The headers that describe one connection, not the message (RFC 9110
/// 7.6.1, and the older `keep-alive` and `proxy-connection`), in the order
/// of their bits in [`hop_by_hop_bit`]. A static, not a constant: a constant
/// array is built and dropped again wherever it is used.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
];
const CONNECTION_BIT: u8 = 1 << 3;

/// The bit of `s` among [`HOP_BY_HOP`], 0 for any other name; `eq` compares
/// it with one of them. By length first: every other name costs one
/// comparison of lengths (comparing each name with the eight was most of
/// this function's cost once). A `HeaderName` is lowercase already, so its
/// comparison is exact (a fixed-length compare the compiler inlines); a
/// name listed in `Connection` is compared ASCII case aside.
#[inline(always)]
fn hop_by_hop_bit(s: &[u8], eq: impl Fn(&[u8], &[u8]) -> bool) -> u8 {
    match s.len() {
        2 if eq(s, b"te") => 1,
        7 if eq(s, b"trailer") => 1 << 1,
        7 if eq(s, b"upgrade") => 1 << 2,
        10 if eq(s, b"connection") => CONNECTION_BIT,
        10 if eq(s, b"keep-alive") => 1 << 4,
        16 if eq(s, b"proxy-connection") => 1 << 5,
        18 if eq(s, b"proxy-authenticate") => 1 << 6,
        19 if eq(s, b"proxy-authorization") => 1 << 7,
        _ => 0,
    }
}

/// Removes hop-by-hop headers, including those the `Connection` header names.
/// `Transfer-Encoding` is left to hyper, which re-frames the body itself.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Most messages carry none of these, and the rest one or two (a store's
    // `Connection: keep-alive`): one pass over the names present, noting
    // each one found as a bit, then removals of what is there, instead of
    // nine hashed removals on every request and response. Bits, not a list
    // of names: nothing to build, clone or drop (this and the exact
    // comparisons took a fifth off the function's instructions, counted).
    let mut present = 0u8;
    for k in h.keys() {
        present |= hop_by_hop_bit(k.as_str().as_bytes(), |a, b| a == b);
    }
    if present == 0 {
        return;
    }
    if present & CONNECTION_BIT != 0 {
        // The names it lists. A hop-by-hop name is among the bits already if
        // the message has it (a store's `Connection: keep-alive` names one,
        // usually absent); any other is looked for among the names present,
        // compared as text (ASCII case aside), and removed only if there:
        // a removal by `&str` parses and hashes the name, and was most of
        // this function's cost on every answer of a store that sends it.
        let mut named: smallvec::SmallVec<[HeaderName; 2]> = smallvec::SmallVec::new();
        for v in h.get_all(header::CONNECTION) {
            for n in v.as_bytes().split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                if n.is_empty() || hop_by_hop_bit(n, |a, b| a == b || a.eq_ignore_ascii_case(b)) != 0 {
                    continue;
                }
                if let Some(k) = h.keys().find(|k| k.as_str().as_bytes().eq_ignore_ascii_case(n)) {
                    named.push(k.clone());
                }
            }
        }
        for n in &named {
            h.remove(n);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            h.remove(name);
        }
    }
}

/// Whether the request authenticates the connection it is sent on rather
/// than itself: NTLM, and Negotiate (which IIS may settle as NTLM, or keep
/// for the connection). A store that answers such a handshake (IIS or
/// SharePoint WebDAV) runs every later request on that connection as the
/// user who authenticated it, so such a connection must never serve another
/// client (see `upstream::pool`). The scheme is the value's first token,
/// compared without case (RFC 9110, 11.1).
pub(crate) fn binds_connection(h: &HeaderMap) -> bool {
    h.get_all(header::AUTHORIZATION).iter().any(|v| {
        let scheme = v.as_bytes().split(|b| *b == b' ' || *b == b'\t').next().unwrap_or_default();
        scheme.eq_ignore_ascii_case(b"NTLM") || scheme.eq_ignore_ascii_case(b"Negotiate")
    })
}

// Names built at compile time: `from_static` outside a constant parses the
// name again on every call.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Appends the client's address to `X-Forwarded-For` (an earlier proxy's
/// value kept in front when it is text). This runs on every request the
/// filter forwards: the address's text is made once per address (see
/// [`address_value`]), and the common case, no earlier value, inserts it as
/// it is.
pub(crate) fn append_forwarded_for(h: &mut HeaderMap, peer: SocketAddr) {
    let addr = address_value(peer.ip());
    // One lookup of the name (an entry), not a lookup and then an insert's
    // second one: 80-100 instructions fewer per request in the filter,
    // counted (bench/README.md).
    let mut prev = match h.entry(X_FORWARDED_FOR) {
        header::Entry::Vacant(e) => {
            e.insert(addr);
            return;
        }
        header::Entry::Occupied(e) => e,
    };
    // An earlier value that is not text is replaced, not copied (an
    // occupied entry's insert replaces every value the name had).
    if prev.get().to_str().is_err() {
        prev.insert(addr);
        return;
    }
    let mut v: smallvec::SmallVec<[u8; 64]> = smallvec::SmallVec::new();
    v.extend_from_slice(prev.get().as_bytes());
    v.extend_from_slice(b", ");
    v.extend_from_slice(addr.as_bytes());
    if let Ok(v) = HeaderValue::from_bytes(&v) {
        prev.insert(v);
    }
}

/// `ip` as a header value, from a one-entry cache per thread: a filter's
/// clients are a few sidecars, each sending request after request on its
/// connections, so the last address is nearly always the one asked for, and
/// a hit is a reference count instead of writing the text and allocating
/// its value (most of what appending cost, about 1% of the filter's
/// instructions per request). Per thread, not shared: the filter runs an
/// event loop per thread, and a shared cache would be a shared write.
fn address_value(ip: IpAddr) -> HeaderValue {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(IpAddr, HeaderValue)>> = const { std::cell::RefCell::new(None) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if let Some((_, v)) = last.as_ref().filter(|(a, _)| *a == ip) {
            return v.clone();
        }
        let v = address_text(ip);
        *last = Some((ip, v.clone()));
        v
    })
}

/// `ip` as text, IPv4 written by hand into a stack buffer (`to_string` and
/// `format!` allocated twice for it).
fn address_text(ip: IpAddr) -> HeaderValue {
    let mut v: smallvec::SmallVec<[u8; 64]> = smallvec::SmallVec::new();
    match ip {
        IpAddr::V4(a) => {
            for (i, o) in a.octets().into_iter().enumerate() {
                if i > 0 {
                    v.push(b'.');
                }
                if o >= 100 {
                    v.push(b'0' + o / 100);
                }
                if o >= 10 {
                    v.push(b'0' + o / 10 % 10);
                }
                v.push(b'0' + o % 10);
            }
        }
        IpAddr::V6(a) => v.extend_from_slice(a.to_string().as_bytes()),
    }
    HeaderValue::from_bytes(&v).expect("an address's text is a valid header value")
}

/// Sets the forwarded request's `Host`. The client's own `Host` goes through
/// unchanged by default (as Envoy and HAProxy do): S3 clients sign it
/// (SigV4), and WebDAV stores compare it with a `Destination`'s host, so a
/// proxy that rewrote it would break both. `upstream_host` (the
/// `--upstream-host` flag) replaces it, for stores that route by name. A
/// request with no host at all (HTTP/1.0) gets `fallback`, the upstream's
/// address. The client's host is also kept in `X-Forwarded-Host`, unless an
/// earlier proxy already recorded the original there.
///
/// `uri_authority` is the request's URI authority before the URI is
/// rewritten: HTTP/2 requests carry their host there (`:authority`), not in a
/// `Host` header.
pub(crate) fn set_host(
    h: &mut HeaderMap,
    uri_authority: Option<&http::uri::Authority>,
    upstream_host: Option<&HeaderValue>,
    fallback: &HeaderValue,
) {
    let (client, single) = {
        let mut hosts = h.get_all(header::HOST).iter();
        (hosts.next().cloned(), hosts.next().is_none())
    };
    // Exactly one `Host` of the client's own goes as it is; a repeated one is
    // sent once (its first value), as before.
    let kept = client.is_some() && single;
    let client = client.or_else(|| uri_authority.and_then(|a| HeaderValue::from_str(a.as_str()).ok()));
    if let (Some(c), false) = (&client, h.contains_key(X_FORWARDED_HOST)) {
        h.insert(X_FORWARDED_HOST, c.clone());
    }
    match (upstream_host, client) {
        // The common case: the client's one `Host`, already there.
        (None, Some(_)) if kept => {}
        (Some(host), _) => {
            h.insert(header::HOST, host.clone());
        }
        (None, client) => {
            h.insert(header::HOST, client.unwrap_or_else(|| fallback.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_bound_authorization_schemes() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            binds_connection(&h)
        };
        assert!(with("NTLM TlRMTVNTUAABAAAAB4IIog=="));
        assert!(with("ntlm TlRMTVNTUAADAAAA"));
        assert!(with("Negotiate YIIHOQYGKwYBBQUCoIIH"));
        assert!(with("NTLM\tTlRMTVNTUAADAAAA"), "a tab after the scheme too");
        assert!(!with("Basic dXNlcjpwYXNz"));
        assert!(!with("Bearer abc"));
        assert!(!with("AWS4-HMAC-SHA256 Credential=x/20261204/us-east-1/s3/aws4_request"));
        assert!(!with("NTLMish x"), "the scheme is the whole first token");
        assert!(!binds_connection(&HeaderMap::new()));
    }

    /// Fails on the old code, which always set `Host` to the upstream's.
    #[test]
    fn host_passes_through_unless_overridden() {
        let fallback = HeaderValue::from_static("store:80");
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "127.0.0.1:7850".parse().unwrap());
        set_host(&mut h, None, None, &fallback);
        assert_eq!(h[header::HOST], "127.0.0.1:7850", "the client's Host, which it signed");
        assert_eq!(h["x-forwarded-host"], "127.0.0.1:7850");
        // The second hop keeps the first hop's X-Forwarded-Host.
        h.insert(header::HOST, "filter:8080".parse().unwrap());
        set_host(&mut h, None, Some(&HeaderValue::from_static("s3.internal")), &fallback);
        assert_eq!(h[header::HOST], "s3.internal", "--upstream-host");
        assert_eq!(h["x-forwarded-host"], "127.0.0.1:7850");
        // HTTP/2: the host is the URI's authority.
        let mut h = HeaderMap::new();
        let uri: http::Uri = "http://app.example:81/x".parse().unwrap();
        set_host(&mut h, uri.authority(), None, &fallback);
        assert_eq!(h[header::HOST], "app.example:81");
        // HTTP/1.0 with no Host: the upstream's address.
        let mut h = HeaderMap::new();
        set_host(&mut h, None, None, &fallback);
        assert_eq!(h[header::HOST], "store:80");
        assert!(!h.contains_key("x-forwarded-host"));
        // A repeated Host goes once, its first value.
        let mut h = HeaderMap::new();
        h.append(header::HOST, "a.example".parse().unwrap());
        h.append(header::HOST, "b.example".parse().unwrap());
        set_host(&mut h, None, None, &fallback);
        assert_eq!(h.get_all(header::HOST).iter().collect::<Vec<_>>(), ["a.example"]);
    }

    #[test]
    fn hop_by_hop_headers_go_including_named_ones() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "close, X-Secret ,,".parse().unwrap());
        h.append(header::CONNECTION, "x-other".parse().unwrap());
        h.insert("x-other", "1".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        h.insert("x-keep", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-keep"));

        // Named in any case, with a hop-by-hop name listed and present, one
        // listed and absent, and a listed name the message does not have.
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "Keep-Alive, X-SECRET, TE, x-absent, Upgrade".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("x-keep", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn forwarded_for_appends_the_client_address_as_text() {
        let name = "x-forwarded-for";
        for (ip, text) in [
            ("0.0.0.0", "0.0.0.0"),
            ("10.0.9.255", "10.0.9.255"),
            ("192.168.100.7", "192.168.100.7"),
            ("::1", "::1"),
            ("::ffff:1.2.3.4", "::ffff:1.2.3.4"),
        ] {
            let peer = SocketAddr::new(ip.parse().unwrap(), 5);
            let mut h = HeaderMap::new();
            append_forwarded_for(&mut h, peer);
            assert_eq!(h[name], text);
            assert_eq!(peer.ip().to_string(), text, "as std writes it");
            append_forwarded_for(&mut h, peer);
            assert_eq!(h[name], format!("{text}, {text}"));
        }
        // Two clients taking turns on one thread: each gets its own address, not the other's cached one.
        let (a, b): (SocketAddr, SocketAddr) = ("10.0.0.1:1".parse().unwrap(), "10.0.0.2:1".parse().unwrap());
        for _ in 0..3 {
            for (peer, text) in [(a, "10.0.0.1"), (b, "10.0.0.2"), (b, "10.0.0.2"), (a, "10.0.0.1")] {
                let mut h = HeaderMap::new();
                append_forwarded_for(&mut h, peer);
                assert_eq!(h[name], text);
            }
        }
        // A previous value that is not text is replaced, not copied.
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_bytes(b"caf\xe9").unwrap());
        append_forwarded_for(&mut h, "1.2.3.4:5".parse().unwrap());
        assert_eq!(h[name], "1.2.3.4");
    }

    /// Each hop-by-hop header alone (no `Connection` to name it) is found.
    #[test]
    fn each_hop_by_hop_header_alone_goes() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            // Its own bit, the one its place in the list removes by.
            assert_eq!(hop_by_hop_bit(name.as_str().as_bytes(), |a, b| a == b), 1 << i, "{name}");
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT, "*/*".parse().unwrap());
            h.append(name.clone(), "x".parse().unwrap());
            h.append(name.clone(), "y".parse().unwrap());
            strip_hop_by_hop(&mut h);
            assert_eq!(h.len(), 1, "{name}: {h:?}");
            assert!(h.contains_key(header::ACCEPT));
        }
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT, "*/*".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "nothing to strip, nothing stripped");
        for other in ["tf", "trailers", "connections", "keep-alivf", "x-proxy-connection", "content-length"] {
            assert_eq!(hop_by_hop_bit(other.as_bytes(), |a, b| a == b), 0, "{other}");
        }
    }
}
