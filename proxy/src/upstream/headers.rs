//! Header hygiene between the client and the upstream: hop-by-hop headers removed both
//! ways, the authority kept as `Host`, and the forwarding headers (`X-Forwarded-For`,
//! `-Proto`, `-Host`, `Forwarded`) written by the gateway ([`forwarding`], [`Outgoing`]).

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, header};

use crate::conn::{ConnInfo, Hop};
use crate::trace::{TRACEPARENT_LINE_LEN, TraceContext};

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
    if !has_hop_by_hop(h) {
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
pub(super) fn hop_by_hop() -> [&'static HeaderName; 7] {
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

/// Whether `h` has any hop-by-hop field (`Connection` among them). Most messages carry
/// none: one pass over the names (standard ones compare as enum tags) is cheaper than
/// hashing even two of the names for look-ups that find nothing.
pub fn has_hop_by_hop(h: &HeaderMap) -> bool {
    h.keys().any(is_hop_by_hop)
}

fn is_hop_by_hop(n: &HeaderName) -> bool {
    hop_by_hop().contains(&n)
}

/// Carry the authority the client addressed to the upstream as `Host`. An HTTP/2 request
/// has no `Host` header, only `:authority` (in the URI), and the forwarded URI names the
/// endpoint instead; without this an h2 client's upstream would see the endpoint address
/// as `Host` while an HTTP/1.1 client's sees the name it used.
///
/// `host` is the request's `Host` (see `pipeline::head`); returns the one it has now.
pub fn keep_authority(
    parts: &mut http::request::Parts,
    host: Option<HeaderValue>,
) -> Option<HeaderValue> {
    if host.is_some() {
        return host;
    }
    // Never the (deprecated) userinfo part.
    let a = parts.uri.authority()?;
    let host_port = a.as_str().rsplit('@').next().unwrap_or_default();
    let v = HeaderValue::from_str(host_port).ok()?;
    parts.headers.insert(header::HOST, v.clone());
    Some(v)
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

/// The forwarding headers for the hop from the peer to the gateway.
///
/// From a peer that is not a trusted proxy (`peer_trusted` false), whatever the client sent
/// about addresses, scheme or host (`X-Forwarded-For`, `-Proto`, `-Host`, `Forwarded`,
/// `X-Real-IP`, `X-Client-IP`, `True-Client-IP`) is removed here, and the gateway's own view
/// is returned, to be written as the request goes out ([`Outgoing`]): `X-Forwarded-For:
/// <peer>`, `X-Forwarded-Proto: <scheme>`, `X-Forwarded-Host: <Host>` and `Forwarded:
/// for=<peer>;proto=<scheme>;host=<Host>`. From a trusted proxy the chain is kept and
/// written here: the peer is appended to `X-Forwarded-For` and this hop to `Forwarded`, and
/// `X-Forwarded-Proto`/`-Host` are set only when the proxy sent none. `host` is the
/// request's `Host` as [`keep_authority`] returned it.
pub fn forwarding(
    h: &mut HeaderMap,
    host: Option<&HeaderValue>,
    conn: &ConnInfo,
    peer_trusted: bool,
) -> Option<Forwarding> {
    let hop = hop(conn, host);
    if peer_trusted {
        append_list(h, &X_FORWARDED_FOR, hop.for_.as_bytes());
        if !h.contains_key(&X_FORWARDED_PROTO) {
            h.insert(&X_FORWARDED_PROTO, conn.proto());
        }
        if let (false, Some(host)) = (h.contains_key(&X_FORWARDED_HOST), &hop.host) {
            h.insert(&X_FORWARDED_HOST, host.clone());
        }
        append_list(h, &FORWARDED, hop.forwarded.as_bytes());
        return None;
    }
    // One pass over the names (most requests carry none of these) instead of seven hash
    // lookups for removals that find nothing.
    if h.keys().any(is_client_claim) {
        for n in CLAIMS {
            h.remove(n);
        }
    }
    Some(Forwarding(hop))
}

/// The forwarding headers the gateway writes for a peer that is not a trusted proxy.
#[derive(Debug, Clone)]
pub struct Forwarding(Arc<Hop>);

impl Hop {
    fn new(conn: &ConnInfo, host: Option<&HeaderValue>) -> Self {
        let mut hop = Self {
            for_: conn.remote_ip(),
            proto: conn.proto(),
            // A copy of its own: the request's value is a slice of the connection's read
            // buffer, which a kept reference would pin (8 KB) for the connection's life,
            // parked or not.
            host: host.map(|h| HeaderValue::from_bytes(h.as_bytes()).unwrap_or_else(|_| h.clone())),
            forwarded: forwarded_element(conn, host),
            lines: Bytes::new(),
        };
        let mut lines = Vec::new();
        for (n, v) in hop.fields() {
            push_field(&mut lines, n, v);
        }
        hop.lines = lines.into();
        hop
    }

    fn fields(&self) -> impl Iterator<Item = (&'static HeaderName, &HeaderValue)> {
        [
            (&X_FORWARDED_FOR, Some(&self.for_)),
            (&X_FORWARDED_PROTO, Some(&self.proto)),
            (&X_FORWARDED_HOST, self.host.as_ref()),
            (&FORWARDED, Some(&self.forwarded)),
        ]
        .into_iter()
        .filter_map(|(n, v)| Some((n, v?)))
    }
}

/// The connection's [`Hop`] for `host`: the last request's when its `Host` was the same.
fn hop(conn: &ConnInfo, host: Option<&HeaderValue>) -> Arc<Hop> {
    let mut last = conn
        .forwarded_last
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(h) = &*last
        && h.host.as_ref() == host
    {
        return h.clone();
    }
    let h = Arc::new(Hop::new(conn, host));
    *last = Some(h.clone());
    h
}

impl Forwarding {
    fn fields(&self) -> impl Iterator<Item = (&'static HeaderName, &HeaderValue)> {
        self.0.fields()
    }
}

/// What the gateway adds to a request as it goes out: its `traceparent`, and the forwarding
/// headers of a peer that is not a trusted proxy. The gateway's own HTTP/1 client writes
/// them straight into the head it encodes ([`Outgoing::write`]); every other way out puts
/// them in the header map first ([`Outgoing::put`]). Either way the upstream sees the same
/// fields, and the common request does not grow its header map for them.
#[derive(Debug, Clone, Default)]
pub struct Outgoing {
    /// The request ID the gateway gave it (the client sent none it could use).
    pub request_id: Option<HeaderValue>,
    /// The request's trace context, when propagation is on.
    pub trace: Option<TraceContext>,
    /// The forwarding headers, unless the peer is a trusted proxy (written already).
    pub forwarding: Option<Forwarding>,
}

impl Outgoing {
    /// Put the fields in `h` (replacing any of the same names).
    pub fn put(&self, h: &mut HeaderMap) {
        if let Some(id) = &self.request_id {
            h.insert(&X_REQUEST_ID, id.clone());
        }
        if let Some(t) = &self.trace {
            t.put(h);
        }
        for (n, v) in self.forwarding.iter().flat_map(Forwarding::fields) {
            h.insert(n, v.clone());
        }
    }

    /// Append the fields to an HTTP/1 head, one `name: value` line each.
    pub fn write(&self, out: &mut Vec<u8>) {
        if let Some(id) = &self.request_id {
            push_field(out, &X_REQUEST_ID, id);
        }
        if let Some(t) = &self.trace {
            let mut line = [0u8; TRACEPARENT_LINE_LEN];
            out.extend_from_slice(t.header_line(&mut line));
        }
        if let Some(f) = &self.forwarding {
            out.extend_from_slice(&f.0.lines);
        }
    }

    /// The bytes [`Outgoing::write`] appends.
    pub fn len(&self) -> usize {
        let trace = if self.trace.is_some() {
            TRACEPARENT_LINE_LEN
        } else {
            0
        };
        let id =
            (self.request_id.as_ref()).map_or(0, |v| X_REQUEST_ID.as_str().len() + v.len() + 4);
        id + trace + self.forwarding.as_ref().map_or(0, |f| f.0.lines.len())
    }

    /// Whether there is nothing to add.
    pub fn is_empty(&self) -> bool {
        self.request_id.is_none() && self.trace.is_none() && self.forwarding.is_none()
    }
}

/// Append `name: value` and CRLF: one field line of an HTTP/1 head.
pub fn push_field(out: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// This hop as one `Forwarded` element (RFC 7239 §4): `for=<peer>;proto=<scheme>` and
/// `;host=<host>` when there is one; an IPv6 peer as `for="[v6]"`, a host that is not a
/// token (a port's `:`) as a quoted string.
fn forwarded_element(conn: &ConnInfo, host: Option<&HeaderValue>) -> HeaderValue {
    let base = conn.forwarded();
    match host {
        None => base,
        Some(host) => build_forwarded(base, host),
    }
}

/// [`forwarded_element`] with a host, built on the element without one.
fn build_forwarded(base: HeaderValue, host: &HeaderValue) -> HeaderValue {
    let mut v = Vec::with_capacity(base.len() + 8 + host.len());
    v.extend_from_slice(base.as_bytes());
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
    HeaderValue::from_maybe_shared(bytes::Bytes::from(v)).unwrap_or(base)
}

/// The request's ID: the client's, or one the gateway gave it; sent back on the response.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What a client may not say about the hop from it: the four fields the gateway writes and
/// the address headers only the gateway (or a trusted proxy) may set.
static CLAIMS: [&HeaderName; 7] = [
    &X_FORWARDED_FOR,
    &X_FORWARDED_PROTO,
    &X_FORWARDED_HOST,
    &FORWARDED,
    &X_REAL_IP,
    &X_CLIENT_IP,
    &TRUE_CLIENT_IP,
];

/// Whether `n` is one of [`CLAIMS`]: compared only when the length fits.
fn is_client_claim(n: &HeaderName) -> bool {
    let s = n.as_str();
    match s.len() {
        9 | 11 | 14 | 15 | 16 | 17 => CLAIMS.iter().any(|c| c.as_str() == s),
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

    /// [`forwarding`], its fields put in the map at once.
    fn set_forwarding(h: &mut HeaderMap, conn: &ConnInfo, peer_trusted: bool) {
        let host = h.get(header::HOST).cloned();
        let forwarding = forwarding(h, host.as_ref(), conn, peer_trusted);
        Outgoing {
            forwarding,
            ..Outgoing::default()
        }
        .put(h);
    }

    /// What [`Outgoing::write`] adds to a head says what [`Outgoing::put`] puts in the map,
    /// and [`Outgoing::len`] is its length.
    #[test]
    fn written_lines_match_the_fields_put() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "example.test".parse().unwrap());
        h.insert("x-forwarded-for", "203.0.113.7".parse().unwrap());
        let trace = crate::trace::TraceContext {
            trace_id: [7; 16],
            span_id: [9; 8],
            parent_id: None,
            sampled: true,
        };
        let extra = Outgoing {
            request_id: Some(HeaderValue::from_static("tg-1")),
            trace: Some(trace),
            forwarding: forwarding(
                &mut h,
                Some(&HeaderValue::from_static("example.test")),
                &conn("10.0.0.9:1234", "http"),
                false,
            ),
        };
        assert!(
            h.get("x-forwarded-for").is_none(),
            "the claim is gone at once"
        );
        let mut lines = Vec::new();
        extra.write(&mut lines);
        assert_eq!(lines.len(), extra.len());
        let mut put = HeaderMap::new();
        extra.put(&mut put);
        let text = String::from_utf8(lines).unwrap();
        let written: Vec<(&str, &str)> = text
            .split_terminator("\r\n")
            .map(|l| l.split_once(": ").unwrap())
            .collect();
        assert_eq!(written.len(), 6, "{text}");
        assert_eq!(written.len(), put.len());
        for (n, v) in written {
            assert_eq!(put[n], v, "{n}");
        }
        assert!(Outgoing::default().is_empty() && !extra.is_empty());
    }

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
        ConnInfo::new(addr.parse().unwrap(), proto == "https")
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
            ("x-forwarded-for", true),
            ("x-forwarded-proto", true),
            ("x-forwarded-host", true),
            ("forwarded", true),
            ("x-real-ix", false),
            ("x-forwarded-fox", false),
            ("host", false),
        ] {
            assert_eq!(is_client_claim(&HeaderName::from_static(n)), claim, "{n}");
        }
    }

    /// A connection's forwarding headers: reused while the `Host` stays, rebuilt for
    /// another (or none) and after a park, and the lines written are the fields'.
    #[test]
    fn hop_reused_per_host() {
        let c = conn("10.0.0.9:1234", "http");
        let a = HeaderValue::from_static("a.test");
        let b = HeaderValue::from_static("b.test:80");
        let first = hop(&c, Some(&a));
        assert_eq!(first.forwarded, "for=10.0.0.9;proto=http;host=a.test");
        assert!(Arc::ptr_eq(&first, &hop(&c, Some(&a))), "reused");
        let other = hop(&c, Some(&b));
        assert_eq!(
            other.forwarded,
            "for=10.0.0.9;proto=http;host=\"b.test:80\""
        );
        assert_eq!(
            &other.lines[..],
            b"x-forwarded-for: 10.0.0.9\r\nx-forwarded-proto: http\r\n\
              x-forwarded-host: b.test:80\r\n\
              forwarded: for=10.0.0.9;proto=http;host=\"b.test:80\"\r\n"
        );
        let none = hop(&c, None);
        assert_eq!(none.forwarded, "for=10.0.0.9;proto=http");
        assert!(none.host.is_none() && !none.lines.windows(6).any(|w| w == b"-host:"));
        let again = hop(&c, Some(&a));
        assert!(!Arc::ptr_eq(&first, &again), "rebuilt after another host");
        assert_eq!(again.lines, first.lines);
        // A parked connection keeps none; its next request builds the same.
        c.forget_hop();
        assert!(
            c.forwarded_last.lock().unwrap().is_none(),
            "kept while parked"
        );
        let woken = hop(&c, Some(&a));
        assert!(!Arc::ptr_eq(&again, &woken) && woken.lines == again.lines);
    }

    /// The kept `Host` is a copy, not a slice of the head it came in (which would keep the
    /// connection's whole read buffer alive while the connection idles).
    #[test]
    fn hop_keeps_no_slice_of_the_request() {
        let head = bytes::Bytes::from(b"GET / HTTP/1.1\r\nhost: a.test\r\n\r\n".to_vec());
        let host = HeaderValue::from_maybe_shared(head.slice(22..28)).unwrap();
        assert_eq!(host, "a.test");
        let hop = hop(&conn("10.0.0.9:1234", "http"), Some(&host));
        let kept = hop.host.as_ref().unwrap().as_bytes().as_ptr_range();
        let buf = head.as_ptr_range();
        assert!(
            kept.end <= buf.start || kept.start >= buf.end,
            "a slice of the head"
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
