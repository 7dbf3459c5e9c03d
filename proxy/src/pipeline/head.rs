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
//!
//! A refusal is a 400 `bad_request`; nothing is decided, spent or forwarded.

use http::request::Parts;
use http::{HeaderValue, header};
use rules::Snapshot;

use crate::respond::GatewayError;
use crate::upstream::headers::strip_hop_by_hop;

/// Check the head and remove its hop-by-hop headers.
pub fn sanitize(parts: &mut Parts, snap: &Snapshot) -> Result<(), GatewayError> {
    host(parts)?;
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
    strip_hop_by_hop(&mut parts.headers);
    Ok(())
}

/// At most one `Host`, agreeing with the target's authority when it has one.
fn host(parts: &Parts) -> Result<(), GatewayError> {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err(GatewayError::BadRequest);
    }
    match (first, parts.uri.authority()) {
        (Some(h), Some(a)) => {
            // The authority without its (deprecated) userinfo.
            let target = a.as_str().rsplit('@').next().unwrap_or_default();
            match h.as_bytes().eq_ignore_ascii_case(target.as_bytes()) {
                true => Ok(()),
                false => Err(GatewayError::BadRequest),
            }
        }
        _ => Ok(()),
    }
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
        assert_eq!(sanitize(&mut ok, &s), Ok(()));
        assert!(ok.headers.get("x-secret").is_none() && ok.headers.get("connection").is_none());
        assert_eq!(ok.headers["x-keep"], "y");
    }
}
