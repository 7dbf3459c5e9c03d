//! Who may talk to the admin port: the `Host` check (against DNS rebinding), the optional
//! bearer token, and reading the token file.
//!
//! - `Host` must be the port's own bound `IP:port`, `localhost`, `127.0.0.1` or `[::1]`
//!   (with or without a port), or one of `server.admin.allowed_hosts`; anything else, or no
//!   `Host` at all, answers 403 `forbidden_host`. A page served from `evil.example` that
//!   rebinds its name to 127.0.0.1 still sends `Host: evil.example`, so it reads nothing.
//! - With `server.admin.token_file`, every endpoint but `/healthz` and `/readyz` (probes)
//!   requires `Authorization: Bearer <token>`, compared in constant time; 401 otherwise.
//!   The dashboard's static page, script and stylesheet (embedded in the binary, no data)
//!   are open too, so a browser can load the page, which then sends the token on its
//!   fetches of `status.json`.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;

use http::{HeaderMap, HeaderValue, StatusCode, header};
use subtle::ConstantTimeEq;

/// The admin token, replaceable while running: a reload re-reads `server.admin.token_file`
/// and swaps it in (whether one is required is fixed at start-up).
pub type Token = Arc<ArcSwap<Vec<u8>>>;

/// The admin port's access rules.
#[derive(Debug, Clone)]
pub struct Guard {
    /// Allowed `Host` values, lower-case.
    hosts: Vec<String>,
    /// The bearer token, when one is required.
    token: Option<Token>,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 403 `forbidden_host`.
    Host,
    /// 401 `unauthorized`.
    Token,
}

impl Refusal {
    /// Status and JSON body.
    pub fn answer(self) -> (StatusCode, &'static [u8]) {
        match self {
            Self::Host => (StatusCode::FORBIDDEN, br#"{"error":"forbidden_host"}"#),
            Self::Token => (StatusCode::UNAUTHORIZED, br#"{"error":"unauthorized"}"#),
        }
    }
}

// === impl Guard ===

impl Guard {
    /// The rules for an admin port bound to `bound`, with `extra` allowed hosts and an
    /// optional token.
    pub fn new(bound: SocketAddr, extra: &[String], token: Option<Token>) -> Self {
        let port = bound.port();
        let mut hosts = vec![bound.to_string()];
        for name in ["localhost", "127.0.0.1", "[::1]"] {
            hosts.push(name.to_owned());
            hosts.push(format!("{name}:{port}"));
        }
        hosts.extend(extra.iter().map(|h| h.to_ascii_lowercase()));
        Self { hosts, token }
    }

    /// Whether a token is required.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// Check a request for `path` with these headers.
    pub fn check(&self, path: &str, headers: &HeaderMap) -> Result<(), Refusal> {
        let host_ok = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .is_some_and(|h| {
                let h = h.trim();
                self.hosts.iter().any(|a| a.eq_ignore_ascii_case(h))
            });
        if !host_ok {
            return Err(Refusal::Host);
        }
        match &self.token {
            Some(token) if !open_path(path) => {
                let token = token.load();
                if bearer(headers.get(header::AUTHORIZATION)).is_some_and(|t| ct_eq(t, &token)) {
                    Ok(())
                } else {
                    Err(Refusal::Token)
                }
            }
            _ => Ok(()),
        }
    }
}

/// Paths served without the token: the probes and the dashboard's static assets.
fn open_path(path: &str) -> bool {
    matches!(
        path,
        "/healthz"
            | "/readyz"
            | "/admin"
            | "/admin/"
            | "/admin/dashboard"
            | "/admin/dashboard.js"
            | "/admin/dashboard.css"
    )
}

/// The token of `Authorization: Bearer <token>`.
fn bearer(v: Option<&HeaderValue>) -> Option<&[u8]> {
    let v = v?.as_bytes();
    let (scheme, rest) = v.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| rest.trim_ascii())
}

/// Equal, in time independent of where they differ (`subtle`; lengths are not secret).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(host: Option<&str>, auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(v) = host {
            h.insert(header::HOST, v.parse().unwrap());
        }
        if let Some(v) = auth {
            h.insert(header::AUTHORIZATION, v.parse().unwrap());
        }
        h
    }

    /// Own address, loopback names and configured names pass; others and none do not.
    #[test]
    fn hosts() {
        let g = Guard::new(
            "10.0.0.5:9901".parse().unwrap(),
            &["Admin.Internal".into()],
            None,
        );
        for ok in [
            "10.0.0.5:9901",
            "localhost",
            "LOCALHOST:9901",
            "127.0.0.1:9901",
            "[::1]:9901",
            "admin.internal",
        ] {
            assert_eq!(
                g.check("/metrics", &headers(Some(ok), None)),
                Ok(()),
                "{ok}"
            );
        }
        for bad in [
            "evil.example",
            "localhost:80",
            "10.0.0.5",
            "localhost.evil.example",
        ] {
            let got = g.check("/metrics", &headers(Some(bad), None));
            assert_eq!(got, Err(Refusal::Host), "{bad}");
        }
        assert_eq!(
            g.check("/healthz", &headers(None, None)),
            Err(Refusal::Host)
        );
    }

    /// With a token, everything but the probes needs it.
    #[test]
    fn token() {
        let t = b"0123456789abcdef".to_vec();
        let token = Arc::new(ArcSwap::from_pointee(t));
        let g = Guard::new("127.0.0.1:1".parse().unwrap(), &[], Some(token.clone()));
        let h = |a| headers(Some("localhost:1"), a);
        assert_eq!(g.check("/healthz", &h(None)), Ok(()));
        assert_eq!(g.check("/readyz", &h(None)), Ok(()));
        assert_eq!(g.check("/admin/dashboard.js", &h(None)), Ok(()));
        assert_eq!(g.check("/metrics", &h(None)), Err(Refusal::Token));
        let wrong = Some("Bearer 0123456789abcdeX");
        assert_eq!(g.check("/metrics", &h(wrong)), Err(Refusal::Token));
        let short = Some("Bearer 0123");
        assert_eq!(g.check("/metrics", &h(short)), Err(Refusal::Token));
        let right = Some("bearer 0123456789abcdef");
        assert_eq!(g.check("/admin/status.json", &h(right)), Ok(()));
        // A swapped-in token replaces the old one at once.
        token.store(Arc::new(b"fedcba9876543210".to_vec()));
        assert_eq!(g.check("/metrics", &h(right)), Err(Refusal::Token));
        let new = Some("Bearer fedcba9876543210");
        assert_eq!(g.check("/metrics", &h(new)), Ok(()));
    }
}
