//! Header hygiene between the client and the upstream: hop-by-hop headers removed both
//! ways, the authority kept as `Host`, and the forwarding headers (`X-Forwarded-For`,
//! `-Proto`, `-Host`, `Forwarded`) written by the gateway ([`set_forwarding`]).

use http::{HeaderMap, HeaderName, HeaderValue, header};

use crate::conn::ConnInfo;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
static X_CLIENT_IP: HeaderName = HeaderName::from_static("x-client-ip");
static TRUE_CLIENT_IP: HeaderName = HeaderName::from_static("true-client-ip");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Remove hop-by-hop headers (RFC 9110 §7.6.1): `Connection`, the headers it names, and the
/// fixed set that only ever describes one connection.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Most messages carry none: one pass over the names (standard ones compare as enum
    // tags) is cheaper than hashing seven names for removals that find nothing.
    if !h.keys().any(is_hop_by_hop) {
        return;
    }
    if let Some(conn) = h.get(header::CONNECTION) {
        // Rare path: only when a client names extra headers.
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .chain(std::iter::once(conn))
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for n in named {
            h.remove(n);
        }
    }
    for n in hop_by_hop() {
        h.remove(n);
    }
}

/// The fixed hop-by-hop headers (RFC 9110 §7.6.1, plus the legacy `Keep-Alive` and
/// `Proxy-Connection`).
fn hop_by_hop() -> [&'static HeaderName; 7] {
    [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
    ]
}

fn is_hop_by_hop(n: &HeaderName) -> bool {
    hop_by_hop().contains(&n)
}

/// Carry the authority the client addressed to the upstream as `Host`. An HTTP/2 request
/// has no `Host` header, only `:authority` (in the URI), and the forwarded URI names the
/// endpoint instead; without this an h2 client's upstream would see the endpoint address
/// as `Host` while an HTTP/1.1 client's sees the name it used.
pub fn keep_authority(parts: &mut http::request::Parts) {
    if parts.headers.contains_key(header::HOST) {
        return;
    }
    if let Some(a) = parts.uri.authority() {
        // Never the (deprecated) userinfo part.
        let host_port = a.as_str().rsplit('@').next().unwrap_or_default();
        if let Ok(v) = HeaderValue::from_str(host_port) {
            parts.headers.insert(header::HOST, v);
        }
    }
}

/// Append `item` to the list header `name`, joining every existing line into one
/// comma-separated value (several lines are one list, RFC 9110 §5.3): every hop is kept, in
/// order, not just the first line.
fn append_list(h: &mut HeaderMap, name: &HeaderName, item: &[u8]) {
    match h.entry(name) {
        header::Entry::Occupied(mut e) => {
            let mut v = Vec::with_capacity(64);
            for prev in e.iter() {
                v.extend_from_slice(prev.as_bytes());
                v.extend_from_slice(b", ");
            }
            v.extend_from_slice(item);
            if let Ok(v) = HeaderValue::from_bytes(&v) {
                e.insert(v);
            }
        }
        header::Entry::Vacant(e) => {
            if let Ok(v) = HeaderValue::from_bytes(item) {
                e.insert(v);
            }
        }
    }
}

/// Write the forwarding headers for the hop from the peer to the gateway.
///
/// From a peer that is not a trusted proxy (`peer_trusted` false), whatever the client sent
/// about addresses, scheme or host (`X-Forwarded-For`, `-Proto`, `-Host`, `Forwarded`,
/// `X-Real-IP`, `X-Client-IP`, `True-Client-IP`) is removed and replaced by the gateway's
/// own view: `X-Forwarded-For: <peer>`, `X-Forwarded-Proto: <scheme>`, `X-Forwarded-Host:
/// <Host>` and `Forwarded: for=<peer>;proto=<scheme>;host=<Host>`. From a trusted proxy the
/// chain is kept: the peer is appended to `X-Forwarded-For` and this hop to `Forwarded`,
/// and `X-Forwarded-Proto`/`-Host` are set only when the proxy sent none. Call after
/// [`keep_authority`] (the `Host` it keeps is the one forwarded).
pub fn set_forwarding(h: &mut HeaderMap, conn: &ConnInfo, peer_trusted: bool) {
    let host = h.get(header::HOST).cloned();
    let forwarded = forwarded_element(conn, host.as_ref());
    if peer_trusted {
        append_list(h, &X_FORWARDED_FOR, conn.remote_ip.as_bytes());
        if !h.contains_key(&X_FORWARDED_PROTO) {
            h.insert(&X_FORWARDED_PROTO, conn.proto.clone());
        }
        if let (false, Some(host)) = (h.contains_key(&X_FORWARDED_HOST), host) {
            h.insert(&X_FORWARDED_HOST, host);
        }
        append_list(h, &FORWARDED, forwarded.as_bytes());
        return;
    }
    // `insert` replaces every client-sent line of the four written below; the rest go. One
    // pass over the names (most requests carry none of them) instead of three hash lookups.
    if h.keys().any(is_address_claim) {
        for n in [&X_REAL_IP, &X_CLIENT_IP, &TRUE_CLIENT_IP] {
            h.remove(n);
        }
    }
    h.insert(&X_FORWARDED_FOR, conn.remote_ip.clone());
    h.insert(&X_FORWARDED_PROTO, conn.proto.clone());
    if let Some(host) = host {
        h.insert(&X_FORWARDED_HOST, host);
    }
    h.insert(&FORWARDED, forwarded);
}

/// This hop as one `Forwarded` element (RFC 7239 §4): `for=<peer>;proto=<scheme>` and
/// `;host=<host>` when there is one; an IPv6 peer as `for="[v6]"`, a host that is not a
/// token (a port's `:`) as a quoted string.
fn forwarded_element(conn: &ConnInfo, host: Option<&HeaderValue>) -> HeaderValue {
    let Some(host) = host else {
        return conn.forwarded.clone();
    };
    let mut last = conn
        .forwarded_last
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some((h, f)) = &*last
        && h == host
    {
        return f.clone();
    }
    let f = build_forwarded(conn, host);
    *last = Some((host.clone(), f.clone()));
    f
}

/// [`forwarded_element`] with a host, built.
fn build_forwarded(conn: &ConnInfo, host: &HeaderValue) -> HeaderValue {
    let mut v = Vec::with_capacity(conn.forwarded.len() + 8 + host.len());
    v.extend_from_slice(conn.forwarded.as_bytes());
    v.extend_from_slice(b";host=");
    let host = host.as_bytes();
    if !host.is_empty() && host.iter().all(|&b| is_tchar(b)) {
        v.extend_from_slice(host);
    } else {
        v.push(b'"');
        for &b in host {
            if b == b'"' || b == b'\\' {
                v.push(b'\\');
            }
            v.push(b);
        }
        v.push(b'"');
    }
    // Built from a valid value and a token or a quoted string: valid.
    HeaderValue::from_maybe_shared(bytes::Bytes::from(v)).unwrap_or_else(|_| conn.forwarded.clone())
}

/// Whether `n` is one of the address headers only the gateway (or a trusted proxy) may set
/// besides the four it writes: compared only when the length fits.
fn is_address_claim(n: &HeaderName) -> bool {
    let s = n.as_str();
    match s.len() {
        9 => s == X_REAL_IP.as_str(),
        11 => s == X_CLIENT_IP.as_str(),
        14 => s == TRUE_CLIENT_IP.as_str(),
        _ => false,
    }
}

/// A token character (RFC 9110 §5.6.2).
fn is_tchar(b: u8) -> bool {
    matches!(b, b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z' | b'!' | b'#' | b'$' | b'%' | b'&'
        | b'\'' | b'*' | b'+' | b'-' | b'.' | b'^' | b'_' | b'`' | b'|' | b'~')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Headers named in `Connection` go, and so do the fixed hop-by-hop ones; others stay.
    #[test]
    fn hop_by_hop_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::TE, "trailers".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        h.insert("x-keep", "yes".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-keep"], "yes");
    }

    fn conn(addr: &str, proto: &'static str) -> ConnInfo {
        ConnInfo::new(addr.parse().unwrap(), HeaderValue::from_static(proto))
    }

    /// From an untrusted peer every client claim goes; the gateway's own view replaces it.
    #[test]
    fn untrusted_peer_claims_replaced() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "example.test:8080".parse().unwrap());
        h.append("x-forwarded-for", "203.0.113.7".parse().unwrap());
        h.append("x-forwarded-for", "198.51.100.1".parse().unwrap());
        h.insert("x-forwarded-proto", "https".parse().unwrap());
        h.insert("x-forwarded-host", "bank.test".parse().unwrap());
        h.insert("forwarded", "for=203.0.113.7".parse().unwrap());
        h.insert("x-real-ip", "203.0.113.7".parse().unwrap());
        h.insert("x-client-ip", "203.0.113.7".parse().unwrap());
        h.insert("true-client-ip", "203.0.113.7".parse().unwrap());
        h.insert("x-keep", "yes".parse().unwrap());
        set_forwarding(&mut h, &conn("10.0.0.9:1234", "http"), false);
        let all = |n: &str| h.get_all(n).iter().collect::<Vec<_>>();
        assert_eq!(all("x-forwarded-for"), ["10.0.0.9"]);
        assert_eq!(all("x-forwarded-proto"), ["http"]);
        assert_eq!(all("x-forwarded-host"), ["example.test:8080"]);
        assert_eq!(
            all("forwarded"),
            ["for=10.0.0.9;proto=http;host=\"example.test:8080\""]
        );
        for gone in ["x-real-ip", "x-client-ip", "true-client-ip"] {
            assert!(h.get(gone).is_none(), "{gone}: {h:?}");
        }
        assert_eq!(h["x-keep"], "yes");
        assert_eq!(h.len(), 6, "{h:?}");
    }

    /// The token set of RFC 9110 §5.6.2, byte for byte; the claim headers by name.
    #[test]
    fn tchar_and_claims() {
        const TCHAR_SPECIALS: &[u8] = b"!#$%&'*+-.^_`|~";
        for b in 0..=255u8 {
            let want = b.is_ascii_alphanumeric() || TCHAR_SPECIALS.contains(&b);
            assert_eq!(is_tchar(b), want, "{b:#04x}");
        }
        for (n, claim) in [
            ("x-real-ip", true),
            ("x-client-ip", true),
            ("true-client-ip", true),
            ("x-real-ix", false),
            ("x-forwarded-for", false),
            ("host", false),
        ] {
            assert_eq!(is_address_claim(&HeaderName::from_static(n)), claim, "{n}");
        }
    }

    /// The `Forwarded` element of a connection's requests: reused while the `Host` stays,
    /// rebuilt when it changes.
    #[test]
    fn forwarded_reused_per_host() {
        let c = conn("10.0.0.9:1234", "http");
        let a = HeaderValue::from_static("a.test");
        let b = HeaderValue::from_static("b.test:80");
        assert_eq!(
            forwarded_element(&c, Some(&a)),
            "for=10.0.0.9;proto=http;host=a.test"
        );
        assert_eq!(
            forwarded_element(&c, Some(&a)),
            "for=10.0.0.9;proto=http;host=a.test"
        );
        assert_eq!(
            forwarded_element(&c, Some(&b)),
            "for=10.0.0.9;proto=http;host=\"b.test:80\""
        );
        assert_eq!(forwarded_element(&c, None), "for=10.0.0.9;proto=http");
        assert_eq!(
            forwarded_element(&c, Some(&a)),
            "for=10.0.0.9;proto=http;host=a.test"
        );
    }

    /// An IPv6 peer is quoted and bracketed in `Forwarded`; no `Host`, no host part.
    #[test]
    fn forwarded_ipv6_quoted() {
        let mut h = HeaderMap::new();
        set_forwarding(&mut h, &conn("[2001:db8::1]:443", "https"), false);
        assert_eq!(h["forwarded"], "for=\"[2001:db8::1]\";proto=https");
        assert_eq!(h["x-forwarded-for"], "2001:db8::1");
        assert!(h.get("x-forwarded-host").is_none());
    }

    /// From a trusted proxy the chain is kept and this hop appended; its proto and host kept.
    #[test]
    fn trusted_peer_chain_appended() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "api.test".parse().unwrap());
        h.append("x-forwarded-for", "203.0.113.7".parse().unwrap());
        h.append("x-forwarded-for", "198.51.100.1".parse().unwrap());
        h.insert("x-forwarded-proto", "https".parse().unwrap());
        h.insert("forwarded", "for=203.0.113.7;proto=https".parse().unwrap());
        h.insert("x-real-ip", "203.0.113.7".parse().unwrap());
        set_forwarding(&mut h, &conn("10.0.0.9:1234", "http"), true);
        assert_eq!(h["x-forwarded-for"], "203.0.113.7, 198.51.100.1, 10.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "api.test");
        assert_eq!(
            h["forwarded"],
            "for=203.0.113.7;proto=https, for=10.0.0.9;proto=http;host=api.test"
        );
        assert_eq!(h["x-real-ip"], "203.0.113.7");
    }
}
