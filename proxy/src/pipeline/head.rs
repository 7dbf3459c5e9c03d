//! The head phase, before the decision: what a request's head must be for the gateway and
//! the upstream to agree on what it is.
//!
//! - One `Host`, and, when the target carries an authority (absolute form in HTTP/1.1,
//!   `:authority` in HTTP/2), the same one (RFC 9112 §3.2): otherwise the gateway could route
//!   by one host while the upstream serves another.
//! - A `Connection` header may not name `Host` or a header the identity extractors read: a
//!   client could otherwise have the gateway classify, limit and log one user while the
//!   upstream, after hop-by-hop removal, receives none.
//! - Hop-by-hop headers (including those `Connection` names) are removed here, before
//!   classification, so every phase sees the headers the upstream will see.
//! - An HTTP/1.1 request asking to switch protocols is noted ([`UpgradeAsk`]) before its
//!   `Upgrade` goes with the other hop-by-hop headers: only when its route allows that
//!   protocol is the header put back for the upstream (`pipeline::tunnel`). Only a sound
//!   ask counts: HTTP/1.1, `Connection` naming `upgrade`, one `Upgrade` line naming one
//!   protocol, no body (neither `Content-Length` above 0 nor `Transfer-Encoding`), and for
//!   `websocket` a `GET` (RFC 6455 §4.1). Anything else is an ordinary request, its
//!   `Upgrade` removed, so what follows its head on the connection is read as HTTP.
//!
//! A refusal is a 400 `bad_request`; nothing is decided, spent or forwarded.

use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, Version, header};
use rules::Snapshot;

use crate::respond::GatewayError;
use crate::upstream::headers::{has_hop_by_hop, strip_hop_by_hop};

/// An HTTP/1.1 request's ask to switch to one protocol, taken before its `Upgrade` header
/// is removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeAsk {
    /// The one protocol its `Upgrade` names (an HTTP token, as the client wrote it).
    pub protocol: HeaderValue,
}

/// What the head phase found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sane {
    /// The request's ask to switch protocols, when it makes a sound one.
    pub ask: Option<UpgradeAsk>,
    /// Its one `Host`, if any (the later phases leave it as it is: the identity headers may
    /// not be `Host`, nor may `Connection` name it).
    pub host: Option<HeaderValue>,
}

/// Check the head and remove its hop-by-hop headers (see the module docs).
pub fn sanitize(parts: &mut Parts, snap: &Snapshot) -> Result<Sane, GatewayError> {
    let host = host(parts)?;
    // The common request: no `Connection`, no `Upgrade`, nothing to strip.
    if !has_hop_by_hop(&parts.headers) {
        return Ok(Sane { ask: None, host });
    }
    if let Some(c) = parts.headers.get(header::CONNECTION)
        && parts
            .headers
            .get_all(header::CONNECTION)
            .iter()
            .chain(std::iter::once(c))
            .any(|v| names_protected(v, snap))
    {
        return Err(GatewayError::BadRequest);
    }
    let ask = match parts.headers.get(header::UPGRADE) {
        Some(_) => upgrade_ask(parts),
        None => None,
    };
    strip_hop_by_hop(&mut parts.headers);
    Ok(Sane { ask, host })
}

/// The ask of a request carrying `Upgrade`, if it is a sound one (see the module docs).
fn upgrade_ask(parts: &Parts) -> Option<UpgradeAsk> {
    if parts.version != Version::HTTP_11 {
        return None;
    }
    let h = &parts.headers;
    let mut lines = h.get_all(header::UPGRADE).iter();
    let (protocol, None) = (lines.next()?, lines.next()) else {
        return None;
    };
    if protocol.is_empty() || !protocol.as_bytes().iter().all(|&b| is_tchar(b)) {
        return None;
    }
    let names_upgrade = h.get_all(header::CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
    });
    if !names_upgrade || has_body(h) {
        return None;
    }
    if protocol.as_bytes().eq_ignore_ascii_case(b"websocket") && parts.method != Method::GET {
        return None;
    }
    Some(UpgradeAsk {
        protocol: protocol.clone(),
    })
}

/// Whether the head announces a body: bytes after it would be the body's, not the new
/// protocol's, and which is which is exactly what smuggling plays on.
fn has_body(h: &HeaderMap) -> bool {
    h.contains_key(header::TRANSFER_ENCODING)
        || h.get_all(header::CONTENT_LENGTH)
            .iter()
            .any(|v| v.as_bytes().iter().any(|&b| b != b'0'))
}

/// A token character (RFC 9110 §5.6.2).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// At most one `Host`, agreeing with the target's authority when it has one.
fn host(parts: &Parts) -> Result<Option<HeaderValue>, GatewayError> {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err(GatewayError::BadRequest);
    }
    if let (Some(h), Some(a)) = (first, parts.uri.authority()) {
        // The authority without its (deprecated) userinfo.
        let target = a.as_str().rsplit('@').next().unwrap_or_default();
        if !h.as_bytes().eq_ignore_ascii_case(target.as_bytes()) {
            return Err(GatewayError::BadRequest);
        }
    }
    Ok(first.cloned())
}

/// Whether a `Connection` value names `Host` or an identity header.
fn names_protected(v: &HeaderValue, snap: &Snapshot) -> bool {
    let Ok(v) = v.to_str() else {
        return false;
    };
    v.split(',')
        .map(str::trim)
        .any(|t| t.eq_ignore_ascii_case("host") || snap.is_identity_header(t))
}

#[cfg(test)]
mod tests {
    use http::Request;

    use super::*;

    fn snap() -> Snapshot {
        let c = r#"{"schema_version": 1,
          "upstreams": {"up": {"endpoints": ["127.0.0.1:1"]}},
          "routes": [{"name": "default", "upstream": "up"}]}"#;
        rules::load("t.json", c.as_bytes()).unwrap().snapshot
    }

    fn parts(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    /// Duplicate or disagreeing Host, and Connection naming Host or an identity header,
    /// are refused; hop-by-hop headers are gone before anything is decided.
    #[test]
    fn refusals_and_stripping() {
        let s = snap();
        let bad = |p: &mut Parts| sanitize(p, &s) == Err(GatewayError::BadRequest);
        assert!(bad(&mut parts("/", &[("host", "a"), ("host", "b")])));
        assert!(bad(&mut parts(
            "http://a.example/",
            &[("host", "b.example")]
        )));
        assert!(!bad(&mut parts(
            "http://a.example/",
            &[("host", "A.example")]
        )));
        assert!(bad(&mut parts("/", &[("connection", "close, Host")])));
        assert!(bad(&mut parts("/", &[("connection", "x-user-id")])));
        assert!(bad(&mut parts(
            "/",
            &[("connection", "keep-alive"), ("connection", "X-App-Id")]
        )));
        let mut ok = parts(
            "/",
            &[
                ("connection", "x-secret"),
                ("x-secret", "1"),
                ("x-keep", "y"),
            ],
        );
        assert_eq!(sanitize(&mut ok, &s).map(|s| s.ask), Ok(None));
        let mut with_host = parts("/", &[("host", "a.example")]);
        assert_eq!(
            sanitize(&mut with_host, &s).map(|s| s.host),
            Ok(Some(HeaderValue::from_static("a.example")))
        );
        assert!(ok.headers.get("x-secret").is_none() && ok.headers.get("connection").is_none());
        assert_eq!(ok.headers["x-keep"], "y");
    }

    /// Only a sound ask to switch protocols is noted: HTTP/1.1, `Connection: upgrade`, one
    /// `Upgrade` protocol, no body, and a `GET` for websocket; `Upgrade` is removed always.
    #[test]
    fn upgrade_asks() {
        let s = snap();
        let ws = [
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ];
        let ask = |p: &mut Parts| {
            let a = sanitize(p, &s).unwrap();
            assert!(p.headers.get("upgrade").is_none(), "{p:?}");
            a.ask.map(|a| a.protocol)
        };
        assert_eq!(ask(&mut parts("/", &ws)).unwrap(), "websocket");
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut h = ws.to_vec();
            h.extend_from_slice(extra);
            parts("/", &h)
        };
        assert_eq!(
            ask(&mut with(&[("content-length", "0")])).unwrap(),
            "websocket"
        );
        assert_eq!(ask(&mut with(&[("content-length", "5")])), None);
        assert_eq!(ask(&mut with(&[("transfer-encoding", "chunked")])), None);
        assert_eq!(ask(&mut with(&[("upgrade", "h2c")])), None);
        assert_eq!(ask(&mut parts("/", &[("upgrade", "websocket")])), None);
        assert_eq!(
            ask(&mut parts(
                "/",
                &[("connection", "upgrade"), ("upgrade", "h2c, websocket")]
            )),
            None
        );
        let mut post = with(&[]);
        post.method = Method::POST;
        assert_eq!(ask(&mut post), None);
        let mut other = parts("/", &[("connection", "upgrade"), ("upgrade", "x-proto")]);
        other.method = Method::POST;
        assert_eq!(ask(&mut other).unwrap(), "x-proto");
        let mut old = with(&[]);
        old.version = Version::HTTP_10;
        assert_eq!(ask(&mut old), None);
        let mut h2 = with(&[]);
        h2.version = Version::HTTP_2;
        assert_eq!(ask(&mut h2), None);
    }
}
