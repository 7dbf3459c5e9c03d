//! Validation of how the gateway speaks to an upstream: `tls` and `protocol`, and the
//! features that still speak cleartext HTTP/1.1 only (active health checks, upgrades).

use crate::error::JsonPath;
use crate::model::{Config, Protocol, Route, Upstream, UpstreamKind};

use super::Validator;

/// Longest `server_name`, in bytes (a DNS name, RFC 1035 §2.3.4).
const MAX_SERVER_NAME: usize = 253;

impl Validator<'_> {
    /// The `tls` and `protocol` of upstream `u`, at `up`.
    pub(super) fn upstream_transport(&mut self, up: &JsonPath, u: &Upstream) {
        let plain = u.tls.is_none() && u.protocol == Protocol::Http1;
        if u.kind == UpstreamKind::Embedded && !plain {
            let field = if u.tls.is_some() { "tls" } else { "protocol" };
            self.err(
                up.key(field),
                "an embedded upstream is reached over loopback HTTP/1.1: tls and protocol are for `static` upstreams",
            );
        }
        if u.health_check.is_some() && !plain {
            self.err(
                up.key("health_check"),
                "active health checks speak cleartext HTTP/1.1 and would fail against this upstream's tls or http2 endpoints; rely on outlier ejection (on by default) instead",
            );
        }
        let Some(t) = &u.tls else { return };
        let p = up.key("tls");
        for (field, value) in [
            ("ca_file", &t.ca_file),
            ("client_cert_file", &t.client_cert_file),
            ("client_key_file", &t.client_key_file),
        ] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                self.err(p.key(field), "path must not be empty");
            }
        }
        match (&t.client_cert_file, &t.client_key_file) {
            (Some(_), None) => self.err(
                p.key("client_key_file"),
                "client_cert_file is given without its key: give both, or neither",
            ),
            (None, Some(_)) => self.err(
                p.key("client_cert_file"),
                "client_key_file is given without its certificate: give both, or neither",
            ),
            _ => {}
        }
        if let Some(name) = &t.server_name
            && let Err(msg) = check_server_name(name)
        {
            self.err(p.key("server_name"), msg);
        }
    }

    /// A route that allows upgrades must send them to cleartext HTTP/1.1 upstreams: the
    /// upgrade exchange (and the tunnel after it) has no TLS or HTTP/2 client.
    pub(super) fn upgrade_targets(&mut self, c: &Config, rp: &JsonPath, r: &Route) {
        let named = r.upstream.iter().map(|u| (rp.key("upstream"), u)).chain(
            r.split
                .iter()
                .flatten()
                .enumerate()
                .map(|(i, t)| (rp.key("split").index(i).key("upstream"), &t.upstream)),
        );
        for (at, name) in named {
            let Some(u) = c.upstreams.get(name) else {
                continue;
            };
            if u.tls.is_some() || u.protocol != Protocol::Http1 {
                self.err(
                    at,
                    format!(
                        "upstream {name:?} uses tls or http2, and upgrades (this route's `upgrade`) are forwarded over cleartext HTTP/1.1 only"
                    ),
                );
            }
        }
    }
}

/// A DNS name (letters, digits, `-` and `_` in dot-separated labels of 1..=63 bytes) or an
/// IP address.
fn check_server_name(name: &str) -> Result<(), String> {
    if name.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let labels_ok = name.trim_end_matches('.').split('.').all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    if name.is_empty() || name.len() > MAX_SERVER_NAME || !labels_ok {
        return Err(format!(
            "{name:?} is not a DNS name or IP address (dot-separated labels of letters, digits and `-`, at most {MAX_SERVER_NAME} bytes)"
        ));
    }
    Ok(())
}
