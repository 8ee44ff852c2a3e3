//! Header and URI rewriting between HTTP/1.1 and HTTP/2 hops.

use http::header::{
    CONNECTION, HOST, HeaderMap, HeaderName, HeaderValue, TE, TRANSFER_ENCODING, UPGRADE,
};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Method, Request, Version};

/// The try number (1-based) a request reaches the app with.
pub const HDR_ATTEMPT: HeaderName = HeaderName::from_static("x-mesh-attempt");
/// The caller's identity, set by the inbound for the app.
pub const HDR_CLIENT_ID: HeaderName = HeaderName::from_static("x-mesh-client-id");
/// The W3C trace context header.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// `Keep-Alive` (hop-by-hop; `http` has no constant for it).
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
/// The prefix of every mesh header, which an ingress removes from outside requests.
pub const MESH_PREFIX: &str = "x-mesh-";

/// A new random W3C `traceparent` (version 00, sampled).
///
/// The value is marked sensitive, which HTTP/2 encodes as "never indexed": a value that
/// is new on every request would otherwise be added to the HPACK tables of both
/// sidecars of the hop, evicting the entries (mesh header names, `:authority`) that make
/// the other headers cheap.
pub fn new_traceparent() -> HeaderValue {
    // All-zero ids are invalid; the chance is negligible, but `max(1)` rules it out.
    traceparent(
        fastrand::u64(..),
        fastrand::u64(..).max(1),
        fastrand::u64(..).max(1),
    )
}

/// `00-<trace_hi><trace_lo>-<span>-01`, each id in 16 lowercase hex digits, sensitive.
fn traceparent(trace_hi: u64, trace_lo: u64, span: u64) -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut text = *b"00-00000000000000000000000000000000-0000000000000000-01";
    for (at, id) in [(3, trace_hi), (19, trace_lo), (36, span)] {
        for (i, byte) in text[at..at + 16].iter_mut().enumerate() {
            *byte = HEX[((id >> (60 - 4 * i)) & 0xf) as usize];
        }
    }
    // Hex digits and dashes only: always a valid header value. Owned by a reference-counted
    // array, so that each try's copy of the request's headers shares it (a copied slice
    // would be copied again on its first clone).
    let mut value =
        HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(text)).unwrap_or_else(|_| {
            HeaderValue::from_static("00-00000000000000000000000000000001-0000000000000001-01")
        });
    value.set_sensitive(true);
    value
}

/// Remove hop-by-hop headers (RFC 9110 §7.6.1): `Connection` and every header it names,
/// `Keep-Alive`, `Proxy-*`, `Transfer-Encoding`, `Upgrade`, and `TE` unless it is just
/// `trailers` (the one value HTTP/2 allows; gRPC needs it). With `keep_upgrade`, an
/// upgrade request or `101` response keeps `Upgrade` and `Connection: upgrade`, which
/// the next HTTP/1.1 hop needs to upgrade too.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none of them: one pass over the names (comparisons of known
    // headers, no hashing) instead of a lookup per hop-by-hop name.
    if !headers.keys().any(maybe_hop_by_hop) {
        return;
    }
    let mut named: Vec<HeaderName> = Vec::new();
    let mut upgrade_token = false;
    for value in headers.get_all(CONNECTION) {
        for token in value.to_str().unwrap_or("").split(',') {
            let token = token.trim();
            if token.eq_ignore_ascii_case("upgrade") {
                upgrade_token = true;
            } else if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                named.push(name);
            }
        }
    }
    for name in named {
        // Never let `Connection` remove an end-to-end header the mesh relies on.
        if name != HOST {
            headers.remove(name);
        }
    }
    headers.remove(CONNECTION);
    headers.remove(KEEP_ALIVE);
    headers.remove(TRANSFER_ENCODING);
    let proxy: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with("proxy-"))
        .cloned()
        .collect();
    for name in proxy {
        headers.remove(name);
    }
    let te_trailers = headers.get_all(TE).iter().any(|value| {
        value
            .to_str()
            .unwrap_or("")
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
    });
    headers.remove(TE);
    if te_trailers {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
    if keep_upgrade && upgrade_token && headers.contains_key(UPGRADE) {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(UPGRADE);
    }
}

/// Whether `name` is hop-by-hop by itself, or makes others so (`Connection`).
fn maybe_hop_by_hop(name: &HeaderName) -> bool {
    *name == CONNECTION
        || *name == KEEP_ALIVE
        || *name == TRANSFER_ENCODING
        || *name == TE
        || *name == UPGRADE
        || name.as_str().starts_with("proxy-")
}

/// Whether `req` asks for an HTTP/1.1 protocol upgrade (WebSocket and the like).
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() <= Version::HTTP_11
        && req.headers().contains_key(UPGRADE)
        && req.headers().get_all(CONNECTION).iter().any(|value| {
            value
                .to_str()
                .unwrap_or("")
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
}

/// Whether `req` is an HTTP/2 extended CONNECT (RFC 8441): a CONNECT with a `:protocol`
/// pseudo-header, which hyper hands over as the [`hyper::ext::Protocol`] extension
/// (WebSocket over HTTP/2 and the like). A plain CONNECT (a proxy tunnel) is not.
pub fn is_extended_connect<B>(req: &Request<B>) -> bool {
    req.method() == Method::CONNECT && req.extensions().get::<hyper::ext::Protocol>().is_some()
}

/// Make the URI absolute (`http://<authority><path>`) for an HTTP/2 hop, taking the
/// authority from `Host` when the request came in origin-form over HTTP/1.1, so that
/// `:authority` carries the caller's `Host` unchanged. Without a usable `Host` (an
/// HTTP/1.0 request) the URI stays relative and HTTP/2 sends no `:authority`.
pub fn absolute_uri(uri: &Uri, headers: &HeaderMap) -> Uri {
    if uri.authority().is_some() {
        return uri.clone();
    }
    let Some(authority) = headers
        .get(HOST)
        .and_then(|h| Authority::try_from(h.as_bytes()).ok())
    else {
        return uri.clone();
    };
    let mut parts = uri.clone().into_parts();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(authority);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
}

/// The origin-form (`/path?query`) an HTTP/1.1 hop sends, and make sure `Host` is set
/// (from `:authority` when the request came over HTTP/2 without one). A URI already in
/// origin-form is left as it is.
pub fn origin_form(uri: &Uri, headers: &mut HeaderMap) -> Uri {
    if uri.scheme().is_none() && uri.authority().is_none() && uri.path_and_query().is_some() {
        return uri.clone();
    }
    if !headers.contains_key(HOST) {
        if let Some(value) = uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            headers.insert(HOST, value);
        }
    }
    match uri.path_and_query() {
        Some(pq) => Uri::from(pq.clone()),
        None => Uri::from_static("/"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failing test panics")]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop() {
        let mut h = HeaderMap::new();
        h.insert(
            CONNECTION,
            HeaderValue::from_static("keep-alive, x-private, upgrade"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("proxy-authorization", HeaderValue::from_static("x"));
        h.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(TE, HeaderValue::from_static("trailers, deflate"));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        let mut keep = h.clone();
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h[TE], "trailers");
        assert_eq!(h["x-kept"], "1");
        strip_hop_by_hop(&mut keep, true);
        assert_eq!(keep[UPGRADE], "websocket");
        assert_eq!(keep[CONNECTION], "upgrade");
        assert!(!keep.contains_key("x-private"));
    }

    #[test]
    fn traceparent_format() {
        let t = new_traceparent();
        let t = t.to_str().unwrap();
        let parts: Vec<&str> = t.split('-').collect();
        assert_eq!(parts.len(), 4);
        assert_eq!(
            (parts[0], parts[1].len(), parts[2].len(), parts[3]),
            ("00", 32, 16, "01")
        );
        assert!(
            parts[1]
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(t, new_traceparent().to_str().unwrap());
        assert!(new_traceparent().is_sensitive());
    }

    #[test]
    fn traceparent_digits() {
        let (hi, lo, span) = (
            0x0123_4567_89ab_cdef,
            0xfedc_ba98_7654_3210,
            0x00f0_0000_0000_000a,
        );
        assert_eq!(
            traceparent(hi, lo, span).to_str().unwrap(),
            format!("00-{hi:016x}{lo:016x}-{span:016x}-01")
        );
    }

    #[test]
    fn uri_forms() {
        let mut h = HeaderMap::new();
        h.insert(HOST, HeaderValue::from_static("api.local:8080"));
        let abs = absolute_uri(&Uri::from_static("/a?b=1"), &h);
        assert_eq!(abs, "http://api.local:8080/a?b=1");
        let mut h2 = HeaderMap::new();
        let origin = origin_form(&abs, &mut h2);
        assert_eq!(origin, "/a?b=1");
        assert_eq!(h2[HOST], "api.local:8080");
        assert_eq!(
            absolute_uri(&Uri::from_static("/x"), &HeaderMap::new()),
            "/x"
        );
    }
}
