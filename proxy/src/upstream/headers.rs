//! Header hygiene between the client and the upstream: hop-by-hop headers removed both
//! ways, the authority kept as `Host`, and `X-Forwarded-For`/`-Proto` added.

use http::{HeaderMap, HeaderName, HeaderValue, header};

use crate::conn::ConnInfo;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
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

/// Add the client to `X-Forwarded-For` and set `X-Forwarded-Proto`.
pub fn add_forwarded(h: &mut HeaderMap, conn: &ConnInfo) {
    match h.entry(&X_FORWARDED_FOR) {
        header::Entry::Occupied(mut e) => {
            // Several header lines are one comma-separated list (RFC 9110 §5.3): keep every
            // hop, in order, not just the first line.
            let mut v = Vec::with_capacity(64);
            for prev in e.iter() {
                v.extend_from_slice(prev.as_bytes());
                v.extend_from_slice(b", ");
            }
            v.extend_from_slice(conn.remote_ip.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&v) {
                e.insert(v);
            }
        }
        header::Entry::Vacant(e) => {
            e.insert(conn.remote_ip.clone());
        }
    }
    h.insert(&X_FORWARDED_PROTO, conn.proto.clone());
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

    /// An existing X-Forwarded-For is appended to, not replaced.
    #[test]
    fn forwarded_appends() {
        let info = ConnInfo {
            remote: "10.0.0.9:1234".parse().unwrap(),
            remote_ip: HeaderValue::from_static("10.0.0.9"),
            proto: HeaderValue::from_static("https"),
        };
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "1.2.3.4".parse().unwrap());
        add_forwarded(&mut h, &info);
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 10.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "https");
    }
}
